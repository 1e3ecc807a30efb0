"""Tensor codecs for all-reduce that work on numpy 2, in hivemind's own wire format.

Why this module exists: hivemind 1.1.12's 8-bit codecs (``Uniform8BitQuantization``,
``Quantile8BitQuantization``, ``BlockwiseQuantization``) compress fine, but their ``extract`` reads the
message header with ``int(np.frombuffer(buffer, count=1, dtype=np.int64))``. numpy 2 no longer converts a
1-element 1-D array to a Python int, so every decode raises ``TypeError: only 0-dimensional arrays can be
converted to Python scalars``. Inside an all-reduce that exception is caught, the sender is banned from the
round and everyone silently keeps their local values for that part; the only trace is a warning like
"Averaging: received 33.3% results".

Our codecs subclass the stock ones and override only ``extract``:
* ``compress`` stays hivemind's, so the bytes on the wire are exactly what stock hivemind sends (peers still
  on numpy 1 can talk to us) and the message's ``compression`` field keeps the proper ``CompressionType``;
* ``extract`` parses the header safely and checks every length against the declared shape *before*
  decoding, because the bytes come from a possibly hostile peer: a short absmax array or codebook would
  otherwise make bitsandbytes' native kernel read past the buffer. A malformed message raises ValueError.

``Float16Compression`` (fp16) works on numpy 2 as it is and is used unchanged. Note that it clamps ±Inf to
±65504 on the sender, so Inf never reaches the receiver's validation; NaN passes through.

Every peer must call :func:`install_codecs` before starting its averager (the averager is a forked
process and inherits the patched table): the receiving side of an all-reduce, and the reducer sending
results back, use hivemind's global codec table, not the ``compression=`` instance given to the averager.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import torch
from hivemind.compression import CompressionBase, CompressionInfo, Float16Compression, NoCompression
from hivemind.compression import serialization as _hivemind_serialization
from hivemind.compression.quantization import (
    BlockwiseQuantization,
    Quantile8BitQuantization,
    Uniform8BitQuantization,
)
from hivemind.proto import runtime_pb2

__all__ = [
    "BLOCKWISE_BLOCK_SIZE",
    "CODECS",
    "Blockwise8BitCodec",
    "Quantile8BitCodec",
    "Uniform8BitCodec",
    "install_codecs",
    "make_compression",
]

logger = logging.getLogger(__name__)

# Not sent on the wire: both ends must agree on it. hivemind hard-codes 4096 (quantization.py).
BLOCKWISE_BLOCK_SIZE = 4096
_CODEBOOK_SIZE = 256  # 8-bit indices address exactly 256 codebook entries
_INT64_BYTES, _FLOAT32_BYTES = 8, 4
_FLOAT_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class Uniform8BitCodec(Uniform8BitQuantization):
    """hivemind's UNIFORM_8BIT (256 uniform bins over mean ± 3σ, each decoded to its bin's average) with a
    decoder that works on numpy 2. Values beyond 3σ land in the edge bins, so outliers lose precision."""

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        return _extract_codebook_message(serialized_tensor)

    def __repr__(self):
        return f"dragon_swarm.{self.__class__.__name__}()"


class Quantile8BitCodec(Quantile8BitQuantization):
    """hivemind's QUANTILE_8BIT (256 equal-count bins, each decoded to its bin's average) with a decoder that
    works on numpy 2."""

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        return _extract_codebook_message(serialized_tensor)

    def __repr__(self):
        return f"dragon_swarm.{self.__class__.__name__}()"


class Blockwise8BitCodec(BlockwiseQuantization):
    """hivemind's BLOCKWISE_8BIT (bitsandbytes' blockwise dynamic quantization: per block of 4096 values one
    float32 absmax, and one uint8 code per value into a 256-entry codebook) with a decoder that works on
    numpy 2 and validates the message before handing it to bitsandbytes.

    Wire layout: ``int64 n_blocks | int64 codebook_size | float32 absmax[n_blocks] | float32 codebook[256]
    | uint8 codes[numel]``. Error: ``|x̂ - x| ≤ 0.0071 · absmax(block)`` with bitsandbytes' dynamic codebook.
    NaN inputs decode to finite numbers (absmax skips NaN), so check gradients for NaN before averaging.
    """

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_blockwise

        shape, numel, dtype = _parse_metadata(serialized_tensor)
        buffer = bytearray(serialized_tensor.buffer)  # a writable copy: torch warns on read-only arrays
        num_blocks, codebook_size = _read_int64(buffer, 0), _read_int64(buffer, _INT64_BYTES)
        expected_blocks = math.ceil(numel / BLOCKWISE_BLOCK_SIZE)
        if num_blocks != expected_blocks:
            raise ValueError(f"{numel} values need {expected_blocks} absmax blocks, message declares {num_blocks}")
        if codebook_size != _CODEBOOK_SIZE:
            raise ValueError(f"codebook must have {_CODEBOOK_SIZE} entries, message declares {codebook_size}")
        absmax_offset = 2 * _INT64_BYTES
        codebook_offset = absmax_offset + num_blocks * _FLOAT32_BYTES
        codes_offset = codebook_offset + codebook_size * _FLOAT32_BYTES
        _check_length(buffer, codes_offset + numel)

        absmax = np.frombuffer(buffer, dtype=np.float32, count=num_blocks, offset=absmax_offset)
        codebook = np.frombuffer(buffer, dtype=np.float32, count=codebook_size, offset=codebook_offset)
        codes = np.frombuffer(buffer, dtype=np.uint8, count=numel, offset=codes_offset)
        result = dequantize_blockwise(
            torch.as_tensor(codes).reshape(shape),
            absmax=torch.as_tensor(absmax),
            code=torch.as_tensor(codebook),
            blocksize=BLOCKWISE_BLOCK_SIZE,
            nested=False,
        )
        return result.to(dtype).requires_grad_(serialized_tensor.requires_grad)

    def __repr__(self):
        return f"dragon_swarm.{self.__class__.__name__}()"


# name -> codec factory; these names are what configs use (AveragingSection.compression)
CODECS: dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16Compression,  # stock hivemind codec: works on numpy 2 unchanged
    "uniform8bit": Uniform8BitCodec,
    "quantile8bit": Quantile8BitCodec,
    "blockwise8bit": Blockwise8BitCodec,
}

_REPLACEMENTS = (Uniform8BitCodec, Quantile8BitCodec, Blockwise8BitCodec)


def install_codecs() -> list[str]:
    """Replace hivemind's broken 8-bit decoders in its global codec table with ours. Idempotent.

    After this, ``hivemind.compression.deserialize_torch_tensor`` (used by every all-reduce, on every
    peer that called it) decodes UNIFORM_8BIT, QUANTILE_8BIT and BLOCKWISE_8BIT messages correctly.
    Call it in each peer before starting DHT/averager processes, so that the forked children inherit it.

    :returns: the CompressionType names replaced by this call (empty if all were already installed)
    """
    table = _hivemind_serialization._BASE_COMPRESSION_TYPES
    replaced = []
    for codec_class in _REPLACEMENTS:
        type_name = runtime_pb2.CompressionType.Name(codec_class.compression_type)
        if type(table.get(type_name)) is not codec_class:
            table[type_name] = codec_class()
            replaced.append(type_name)
    if replaced:
        logger.info(f"Installed numpy-2 compatible decoders for {', '.join(replaced)}")
    return replaced


def make_compression(name: str) -> CompressionBase:
    """A codec for ``DecentralizedAverager(compression=...)``, by config name: one of :data:`CODECS`.

    Also calls :func:`install_codecs`, since a peer sending 8-bit parts must be able to decode the
    8-bit results that come back.
    """
    if name not in CODECS:
        raise ValueError(f"unknown compression {name!r}; known: {', '.join(CODECS)}")
    install_codecs()
    codec = CODECS[name]()
    if isinstance(codec, Blockwise8BitCodec):
        _load_bitsandbytes(codec)
    return codec


def _load_bitsandbytes(codec: Blockwise8BitCodec) -> None:
    """Import bitsandbytes and run its blockwise kernels once, here. Left to the first all-reduce, the import happens
    in several of hivemind's executor threads at once, and a thread that finds the package half-imported fails with
    "Could not run 'bitsandbytes::quantize_blockwise' ... from the 'CPU' backend": that member's parts never leave and
    the whole group waits out the all-reduce timeout. A forked averager process inherits the loaded package."""
    probe = torch.linspace(-1.0, 1.0, 64)
    codec.extract(codec.compress(probe, CompressionInfo.from_tensor(probe)))


def _extract_codebook_message(serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
    """Decode hivemind's codebook layout: ``int64 codebook_size | float32 codebook[] | uint8 indices[numel]``."""
    shape, numel, dtype = _parse_metadata(serialized_tensor)
    buffer = bytearray(serialized_tensor.buffer)  # a writable copy: torch warns on read-only arrays
    codebook_size = _read_int64(buffer, 0)
    if not 1 <= codebook_size <= _CODEBOOK_SIZE:
        raise ValueError(f"codebook must have 1..{_CODEBOOK_SIZE} entries, message declares {codebook_size}")
    indices_offset = _INT64_BYTES + codebook_size * _FLOAT32_BYTES
    _check_length(buffer, indices_offset + numel)

    codebook = torch.as_tensor(np.frombuffer(buffer, dtype=np.float32, count=codebook_size, offset=_INT64_BYTES))
    indices = torch.as_tensor(np.frombuffer(buffer, dtype=np.uint8, count=numel, offset=indices_offset)).long()
    if numel and int(indices.max()) >= codebook_size:
        raise ValueError(f"index {int(indices.max())} is out of range for a codebook of {codebook_size} entries")
    result = codebook.to(dtype)[indices].reshape(shape)
    return result.requires_grad_(serialized_tensor.requires_grad)


def _parse_metadata(serialized_tensor: runtime_pb2.Tensor) -> tuple[tuple[int, ...], int, torch.dtype]:
    if serialized_tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"8-bit codecs carry floating point tensors only, message says {serialized_tensor.dtype!r}")
    shape = tuple(serialized_tensor.size)  # uint32 on the wire, so never negative
    return shape, math.prod(shape), _FLOAT_DTYPES[serialized_tensor.dtype]


def _read_int64(buffer: bytearray, offset: int) -> int:
    _check_length(buffer, offset + _INT64_BYTES, exact=False)
    # indexing [0] gives a numpy scalar; int() of the 1-element *array* is what numpy 2 refuses
    return int(np.frombuffer(buffer, dtype=np.int64, count=1, offset=offset)[0])


def _check_length(buffer: bytearray, expected: int, exact: bool = True) -> None:
    if len(buffer) < expected or (exact and len(buffer) != expected):
        raise ValueError(f"malformed message: buffer has {len(buffer)} bytes, expected {expected}")
