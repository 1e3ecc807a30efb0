"""Codecs: round trips through hivemind's (de)serializer, error bounds, hostile messages, and why they exist."""

import math

import numpy as np
import pytest
import torch
from hivemind.compression import (
    CompressionInfo,
    Float16Compression,
    NoCompression,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.compression import serialization as hivemind_serialization
from hivemind.compression.quantization import (
    _BLOCKWISE_QUANTIZATION_BLOCKSIZE,
    BlockwiseQuantization,
    Quantile8BitQuantization,
    Uniform8BitQuantization,
)
from hivemind.proto import runtime_pb2

from dragon_swarm.averaging.compression import (
    BLOCKWISE_BLOCK_SIZE,
    CODECS,
    Blockwise8BitCodec,
    Quantile8BitCodec,
    Uniform8BitCodec,
    install_codecs,
    make_compression,
)

# 0-dim, one element, below / exactly / above / not a multiple of the 4096 block, multi-dimensional
SHAPES = [(), (1,), (7,), (4096,), (4097,), (10_000,), (3, 5, 7)]

# bitsandbytes' signed dynamic codebook: the largest gap between neighbouring codes is 0.0141 (near ±1) and the
# codebook spans [-0.99297, 1], so nearest-code rounding errs by at most 0.00704 * absmax of the block.
BLOCKWISE_RELATIVE_ERROR = 0.0071
# fp16 has 10 mantissa bits: relative error <= 2**-11 for normal numbers
FP16_RELATIVE_ERROR = 2.0**-11


@pytest.fixture(autouse=True)
def _installed():
    install_codecs()


def _round_trip(codec, tensor: torch.Tensor) -> tuple[runtime_pb2.Tensor, torch.Tensor]:
    message = serialize_torch_tensor(tensor, codec.compression_type)
    return message, deserialize_torch_tensor(message)


def _blockwise_absmax_per_element(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.reshape(-1)
    absmax = torch.stack([block.abs().max() for block in flat.split(BLOCKWISE_BLOCK_SIZE)])
    return absmax.repeat_interleave(BLOCKWISE_BLOCK_SIZE)[: flat.numel()].reshape(tensor.shape)


# ---------------------------------------------------------------- why our codecs exist


@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2, reason="stock 8-bit decoders work on numpy 1.x")
@pytest.mark.parametrize(
    "stock_codec", [Uniform8BitQuantization(), Quantile8BitQuantization(), BlockwiseQuantization()]
)
def test_stock_8bit_decoders_fail_on_numpy_2(stock_codec):
    """hivemind 1.1.12 decodes its header with int(np.frombuffer(..., count=1)), which numpy >= 2 refuses.
    If this test starts failing, the stock decoder works again and our overrides may be dropped."""
    # Prepare
    tensor = torch.randn(100)
    message = stock_codec.compress(tensor, CompressionInfo.from_tensor(tensor))

    # Execute / Assert
    with pytest.raises(TypeError, match="only 0-dimensional arrays can be converted to Python scalars"):
        stock_codec.extract(message)


def test_stock_fp16_decoder_works_on_this_numpy():
    """hivemind's Float16Compression needs no replacement; if this fails, add an fp16 codec of our own."""
    # Prepare
    tensor = torch.randn(100)
    codec = Float16Compression()

    # Execute
    decoded = codec.extract(codec.compress(tensor, CompressionInfo.from_tensor(tensor)))

    # Assert
    torch.testing.assert_close(decoded, tensor, atol=0, rtol=FP16_RELATIVE_ERROR)


# ---------------------------------------------------------------- install / make


def test_install_codecs_replaces_the_8bit_decoders_and_is_idempotent():
    # Prepare
    table = hivemind_serialization._BASE_COMPRESSION_TYPES

    # Execute
    first = install_codecs()
    instances = {name: table[name] for name in ("UNIFORM_8BIT", "QUANTILE_8BIT", "BLOCKWISE_8BIT")}
    second = install_codecs()

    # Assert: the autouse fixture already installed them, so neither call has anything left to do
    assert first == [] and second == []
    assert type(instances["UNIFORM_8BIT"]) is Uniform8BitCodec
    assert type(instances["QUANTILE_8BIT"]) is Quantile8BitCodec
    assert type(instances["BLOCKWISE_8BIT"]) is Blockwise8BitCodec
    assert all(table[name] is codec for name, codec in instances.items())


def test_install_codecs_reports_what_it_replaced():
    # Prepare: put a stock decoder back
    table = hivemind_serialization._BASE_COMPRESSION_TYPES
    table["BLOCKWISE_8BIT"] = BlockwiseQuantization()

    # Execute
    replaced = install_codecs()

    # Assert
    assert replaced == ["BLOCKWISE_8BIT"]
    assert type(table["BLOCKWISE_8BIT"]) is Blockwise8BitCodec


@pytest.mark.parametrize(
    "name, expected_class, expected_type",
    [
        ("none", NoCompression, runtime_pb2.CompressionType.NONE),
        ("fp16", Float16Compression, runtime_pb2.CompressionType.FLOAT16),
        ("uniform8bit", Uniform8BitCodec, runtime_pb2.CompressionType.UNIFORM_8BIT),
        ("quantile8bit", Quantile8BitCodec, runtime_pb2.CompressionType.QUANTILE_8BIT),
        ("blockwise8bit", Blockwise8BitCodec, runtime_pb2.CompressionType.BLOCKWISE_8BIT),
    ],
)
def test_make_compression_returns_codec_that_tags_messages_with_the_proper_enum(name, expected_class, expected_type):
    # Prepare
    codec = make_compression(name)
    tensor = torch.randn(10)

    # Execute
    message = codec.compress(tensor, CompressionInfo.from_tensor(tensor))

    # Assert
    assert type(codec) is expected_class
    assert message.compression == expected_type


def test_make_compression_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown compression 'int4'"):
        make_compression("int4")


def test_codec_names_cover_what_configs_use():
    assert {"none", "fp16", "blockwise8bit"} <= set(CODECS)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("shape", SHAPES)
def test_blockwise_round_trip_error_within_block_absmax_bound(shape):
    # Prepare
    torch.manual_seed(0)
    tensor = torch.randn(shape) * 3

    # Execute
    message, decoded = _round_trip(Blockwise8BitCodec(), tensor)

    # Assert
    assert message.compression == runtime_pb2.CompressionType.BLOCKWISE_8BIT
    assert decoded.shape == tensor.shape and decoded.dtype == tensor.dtype
    bound = BLOCKWISE_RELATIVE_ERROR * _blockwise_absmax_per_element(tensor)
    assert ((decoded - tensor).abs() <= bound).all()


def test_blockwise_round_trip_of_an_empty_tensor():
    _, decoded = _round_trip(Blockwise8BitCodec(), torch.zeros(0, 3))

    assert decoded.shape == (0, 3)


def test_blockwise_error_constant_matches_the_bitsandbytes_codebook():
    # Prepare
    tensor = torch.randn(10)
    message = Blockwise8BitCodec().compress(tensor, CompressionInfo.from_tensor(tensor))
    codebook = torch.from_numpy(np.frombuffer(message.buffer, dtype=np.float32, count=256, offset=16 + 4).copy())

    # Execute: the worst case of nearest-code rounding over [-1, 1]
    worst = max(codebook.diff().max().item() / 2, 1 - codebook.max().item(), 1 + codebook.min().item())

    # Assert
    assert worst <= BLOCKWISE_RELATIVE_ERROR


def test_blockwise_keeps_blocks_independent():
    # Prepare: one huge value in the second block must not blur the first block
    tensor = torch.randn(2 * BLOCKWISE_BLOCK_SIZE)
    tensor[BLOCKWISE_BLOCK_SIZE] = 1e4

    # Execute
    _, decoded = _round_trip(Blockwise8BitCodec(), tensor)

    # Assert
    first_block = slice(0, BLOCKWISE_BLOCK_SIZE)
    error = (decoded[first_block] - tensor[first_block]).abs().max()
    assert error <= BLOCKWISE_RELATIVE_ERROR * tensor[first_block].abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_blockwise_round_trip_keeps_dtype(dtype):
    # Prepare
    tensor = torch.randn(5000).to(dtype)

    # Execute
    _, decoded = _round_trip(Blockwise8BitCodec(), tensor)

    # Assert
    assert decoded.dtype == dtype
    bound = BLOCKWISE_RELATIVE_ERROR * _blockwise_absmax_per_element(tensor.float()) + 1e-2
    assert ((decoded.float() - tensor.float()).abs() <= bound).all()


def test_blockwise_decoder_agrees_with_bitsandbytes_directly():
    # Prepare
    from bitsandbytes.functional import dequantize_blockwise, quantize_blockwise

    tensor = torch.randn(10_000)
    codes, state = quantize_blockwise(tensor, blocksize=BLOCKWISE_BLOCK_SIZE, nested=False)

    # Execute
    _, decoded = _round_trip(Blockwise8BitCodec(), tensor)

    # Assert
    torch.testing.assert_close(decoded, dequantize_blockwise(codes, state), atol=0, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp16_round_trip_error_within_half_precision(shape):
    # Prepare
    torch.manual_seed(1)
    tensor = torch.randn(shape)

    # Execute
    message, decoded = _round_trip(make_compression("fp16"), tensor)

    # Assert
    assert message.compression == runtime_pb2.CompressionType.FLOAT16
    assert decoded.shape == tensor.shape
    # relative bound for normal numbers, plus half the smallest subnormal step for values near zero
    assert ((decoded - tensor).abs() <= FP16_RELATIVE_ERROR * tensor.abs() + 2.0**-25).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_uniform8bit_round_trip_error_within_one_bin(shape):
    """Bound: 256 bins of width w = 6σ/256 (code = round((x - mean) / w) + 128, clamped to 0..255), each decoded
    to the average of its members, so a value off by less than 126.5 w from the mean is decoded with error
    below w (0.0234σ); everything beyond lands in the two edge bins and may be off by much more."""
    # Prepare
    torch.manual_seed(2)
    tensor = torch.randn(shape)

    # Execute
    message, decoded = _round_trip(Uniform8BitCodec(), tensor)

    # Assert
    assert message.compression == runtime_pb2.CompressionType.UNIFORM_8BIT
    assert decoded.shape == tensor.shape
    if tensor.numel() <= 1:
        torch.testing.assert_close(decoded, tensor, atol=0, rtol=0)
        return
    centered = tensor - tensor.mean()
    sigma = centered.norm() / math.sqrt(tensor.numel() - 1)
    bin_width = 6 * sigma / 256
    in_range = centered.abs() < 126 * bin_width
    assert ((decoded - tensor).abs()[in_range] <= bin_width * 1.0001).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_quantile8bit_round_trip_decodes_each_value_to_its_bin_average(shape):
    """Bound: each value is decoded to the average of the values sharing its code, and bins are contiguous
    ranges of the sorted values, so the error is below the width of the value's own bin."""
    # Prepare
    torch.manual_seed(3)
    tensor = torch.randn(shape)

    # Execute
    message, decoded = _round_trip(Quantile8BitCodec(), tensor)

    # Assert
    assert message.compression == runtime_pb2.CompressionType.QUANTILE_8BIT
    assert decoded.shape == tensor.shape
    flat, flat_decoded = tensor.reshape(-1), decoded.reshape(-1)
    for code_value in flat_decoded.unique():
        members = flat[flat_decoded == code_value]
        torch.testing.assert_close(code_value, members.mean(), atol=1e-5, rtol=1e-5)
        assert (members - code_value).abs().max() <= members.max() - members.min() + 1e-6
    assert flat_decoded.unique().numel() <= 256
    # bins are contiguous: in value order, the decoded values never go down
    decoded_in_value_order = flat_decoded[flat.argsort()]
    assert (decoded_in_value_order.diff() >= 0).all()


def test_our_encoders_send_exactly_what_stock_hivemind_sends():
    # Prepare
    tensor = torch.randn(10_000)
    info = CompressionInfo.from_tensor(tensor)
    pairs = [
        (Uniform8BitCodec(), Uniform8BitQuantization()),
        (Quantile8BitCodec(), Quantile8BitQuantization()),
        (Blockwise8BitCodec(), BlockwiseQuantization()),
    ]

    # Execute / Assert
    for ours, stock in pairs:
        assert ours.compress(tensor, info) == stock.compress(tensor, info), type(ours).__name__


def test_block_size_matches_hivemind():
    assert BLOCKWISE_BLOCK_SIZE == _BLOCKWISE_QUANTIZATION_BLOCKSIZE


# ---------------------------------------------------------------- hostile messages


def _blockwise_message(numel: int = 5000) -> runtime_pb2.Tensor:
    tensor = torch.randn(numel)
    return Blockwise8BitCodec().compress(tensor, CompressionInfo.from_tensor(tensor))


def _replace(message: runtime_pb2.Tensor, **fields) -> runtime_pb2.Tensor:
    """A copy of ``message`` with some fields replaced, as a hostile sender would craft it."""
    original = dict(buffer=message.buffer, size=message.size, dtype=message.dtype, compression=message.compression)
    return runtime_pb2.Tensor(**{**original, **fields})


def _with_header(message: runtime_pb2.Tensor, offset: int, value: int) -> runtime_pb2.Tensor:
    buffer = bytearray(message.buffer)
    buffer[offset : offset + 8] = np.int64(value).tobytes()
    return _replace(message, buffer=bytes(buffer))


@pytest.mark.parametrize(
    "tamper, message_pattern",
    [
        (lambda m: _with_header(m, 0, 1), "need 2 absmax blocks, message declares 1"),
        (lambda m: _with_header(m, 8, 16), "codebook must have 256 entries"),
        (lambda m: _replace(m, buffer=m.buffer[:-1]), "buffer has"),
        (lambda m: _replace(m, size=[10**9]), "absmax blocks"),
        (lambda m: _replace(m, buffer=m.buffer[:10]), "buffer has 10 bytes"),
        (lambda m: _replace(m, dtype="int64"), "floating point"),
    ],
)
def test_blockwise_decoder_rejects_malformed_messages(tamper, message_pattern):
    # Prepare
    hostile = tamper(_blockwise_message())

    # Execute / Assert
    with pytest.raises(ValueError, match=message_pattern):
        deserialize_torch_tensor(hostile)


def test_codebook_decoder_rejects_out_of_range_indices():
    # Prepare: declare a 2-entry codebook and shrink the buffer to match, leaving indices up to 255
    tensor = torch.randn(100)
    message = Uniform8BitCodec().compress(tensor, CompressionInfo.from_tensor(tensor))
    codes = message.buffer[8 + 256 * 4 :]
    buffer = np.int64(2).tobytes() + np.zeros(2, dtype=np.float32).tobytes() + codes
    hostile = _replace(message, buffer=buffer)

    # Execute / Assert
    with pytest.raises(ValueError, match="out of range for a codebook of 2 entries"):
        deserialize_torch_tensor(hostile)


def test_codebook_decoder_rejects_wrong_length():
    # Prepare
    tensor = torch.randn(100)
    message = Quantile8BitCodec().compress(tensor, CompressionInfo.from_tensor(tensor))
    hostile = _replace(message, buffer=message.buffer + b"\0")

    # Execute / Assert
    with pytest.raises(ValueError, match="malformed message"):
        deserialize_torch_tensor(hostile)


def test_blockwise_non_finite_absmax_decodes_to_non_finite_values_for_validation_to_catch():
    # Prepare: a hostile sender puts Inf into the first block's absmax
    message = _blockwise_message(100)
    buffer = bytearray(message.buffer)
    buffer[16:20] = np.float32(np.inf).tobytes()
    hostile = _replace(message, buffer=bytes(buffer))

    # Execute
    decoded = deserialize_torch_tensor(hostile)

    # Assert
    assert not torch.isfinite(decoded).all()
