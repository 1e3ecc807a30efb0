"""One expert's part of a local-expert outer round on the wire: its holder's pseudo-gradient (the weights it started
the round from minus its weights now) in 8-bit blocks, as the trunk's pseudo-gradient travels, instead of the weights.

Every holder of an expert that ended the last round with the same merge starts the next one from the same weights.
A holder sends its round start's digest with its request; the answer is the delta alone when the digests match
(~1.06 bytes per weight: an int8 code each and a float32 scale per block of 64), and the delta with the sender's
round start in float32 when they do not (a holder that took the expert on mid-round, or whose last merge missed a
partner), so that every holder can rebuild the same weights from what was sent. Every holder, the sender included,
merges the rebuilt weights `start - dequantize(delta)`: holders that see the same snapshots compute the same bits.

Pure: no network, tested directly. Safetensors on the wire, never pickle.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from dragon_swarm.moe.expert_state import ExpertState, ExpertStateError
from dragon_swarm.state.checkpoint import safetensors_metadata

BLOCK = 64  # weights per float32 scale: 4 / 64 bytes of overhead per weight, and a block's outlier spoils only 63 others
LEVELS = 127  # int8 codes -127..127, symmetric: a zero delta stays exactly zero
FORM_DELTA = "delta"  # the requester holds the same round start: the delta alone
FORM_FULL = "start+delta"  # it does not: the sender's round start (float32) travels too


def quantize_blockwise(values: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, shape [blocks, block]; float32 scales, shape [blocks]): each block's largest magnitude maps to
    `LEVELS`. The tail of the last block is padded with zeros. Raises ValueError for non-finite values."""
    flat = values.detach().reshape(-1).to(torch.float32).cpu()
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("non-finite values cannot be quantized")
    blocks = max(1, math.ceil(flat.numel() / block))
    padded = torch.zeros(blocks * block, dtype=torch.float32)
    padded[: flat.numel()] = flat
    padded = padded.view(blocks, block)
    scales = padded.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(padded / safe[:, None] * LEVELS).clamp_(-LEVELS, LEVELS).to(torch.int8)
    return codes, scales


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The float32 values `quantize_blockwise` encoded, in `shape` (the same bits on every machine that runs it)."""
    numel = int(torch.Size(shape).numel())
    values = codes.to(torch.float32) * (scales / LEVELS)[:, None]
    return values.reshape(-1)[:numel].reshape(shape)


def start_digest(start: dict[str, torch.Tensor]) -> str:
    """A short digest of a round start (float32 weights by name): holders with the same start have the same one."""
    h = hashlib.sha256()
    for name in sorted(start):
        h.update(name.encode())
        h.update(start[name].detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class RoundSnapshot:
    """A holder's frozen part of one round for one expert: its round start and its quantized delta."""

    uid: str
    version: int
    tokens_processed: int
    start: dict[str, torch.Tensor]  # float32, by module.state_dict() name
    digest: str  # start_digest(start)
    codes: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]

    def weights(self) -> dict[str, torch.Tensor]:
        """What every holder merges for this snapshot: start - dequantized delta."""
        return {name: self.start[name] - dequantize_blockwise(self.codes[name], self.scales[name], self.start[name].shape) for name in sorted(self.start)}

    def state(self) -> ExpertState:
        return ExpertState(self.uid, self.weights(), None, self.version, self.tokens_processed)


def snapshot(state: ExpertState, start: dict[str, torch.Tensor], digest: str | None = None) -> RoundSnapshot:
    """Freeze `state` (the weights at the round's end) against `start` (the weights the round began from)."""
    if set(start) != set(state.module):
        raise ValueError(f"round start names {sorted(start)} differ from the expert's {sorted(state.module)}")
    codes, scales = {}, {}
    for name in sorted(start):
        codes[name], scales[name] = quantize_blockwise(start[name] - state.module[name].detach().to(torch.float32).cpu())
    return RoundSnapshot(state.uid, state.version, state.tokens_processed, start, digest or start_digest(start), codes, scales)


def to_bytes(snap: RoundSnapshot, requester_digest: str) -> bytes:
    """The answer to a holder whose round start has `requester_digest`: the delta alone when it equals ours."""
    form = FORM_DELTA if requester_digest == snap.digest else FORM_FULL
    tensors = {}
    for name in sorted(snap.start):
        tensors[f"codes.{name}"] = snap.codes[name].contiguous()
        tensors[f"scales.{name}"] = snap.scales[name].contiguous()
        if form == FORM_FULL:
            tensors[f"start.{name}"] = snap.start[name].detach().to(torch.float32).cpu().contiguous()
    metadata = {"uid": snap.uid, "version": str(snap.version), "tokens_processed": str(snap.tokens_processed), "digest": snap.digest, "form": form}
    return safetensors_save(tensors, metadata=metadata)


def from_bytes(data: bytes, source: str, expected: dict[str, torch.Tensor], own_start: dict[str, torch.Tensor], own_digest: str) -> ExpertState:
    """The weights another holder's answer stands for, rebuilt as it rebuilds them (`RoundSnapshot.weights`).
    `expected`: this expert's tensors by name (shapes); `own_start`, `own_digest`: this holder's round start. Anything
    else (other names, shapes or dtypes, non-finite values, a delta against a start we do not hold) raises
    ExpertStateError."""
    try:
        tensors = safetensors_load(data)
        metadata = safetensors_metadata(data)
    except (SafetensorError, ValueError, KeyError, struct.error) as e:
        raise ExpertStateError(f"{source}: unreadable round snapshot ({e})") from None
    form, digest = metadata.get("form"), metadata.get("digest")
    if form not in (FORM_DELTA, FORM_FULL) or not isinstance(metadata.get("uid"), str):
        raise ExpertStateError(f"{source}: not a round snapshot (form {form!r})")
    if form == FORM_DELTA and digest != own_digest:
        raise ExpertStateError(f"{source}: a delta against round start {digest}, ours is {own_digest}")
    names = sorted(expected)
    wanted = {f"codes.{n}" for n in names} | {f"scales.{n}" for n in names} | ({f"start.{n}" for n in names} if form == FORM_FULL else set())
    if set(tensors) != wanted:
        raise ExpertStateError(f"{source}: round snapshot tensors {sorted(tensors)[:6]}... are not this expert's")
    try:
        version, tokens = int(metadata.get("version", "")), int(metadata.get("tokens_processed", ""))
    except ValueError:
        raise ExpertStateError(f"{source}: round snapshot counters are not integers") from None
    weights = {}
    for name in names:
        shape = expected[name].shape
        blocks = max(1, math.ceil(int(shape.numel()) / BLOCK))
        codes, scales = tensors[f"codes.{name}"], tensors[f"scales.{name}"]
        if codes.dtype != torch.int8 or codes.shape != (blocks, BLOCK):
            raise ExpertStateError(f"{source}: codes of {name} are {codes.dtype} {list(codes.shape)}, expected int8 {[blocks, BLOCK]}")
        if scales.dtype != torch.float32 or scales.shape != (blocks,) or not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise ExpertStateError(f"{source}: scales of {name} are not {blocks} finite non-negative float32 values")
        start = own_start[name] if form == FORM_DELTA else tensors[f"start.{name}"]
        if start.dtype != torch.float32 or start.shape != shape:
            raise ExpertStateError(f"{source}: round start of {name} is {start.dtype} {list(start.shape)}, expected float32 {list(shape)}")
        value = start - dequantize_blockwise(codes, scales, shape)
        if not bool(torch.isfinite(value).all()):
            raise ExpertStateError(f"{source}: {name} has non-finite values")
        weights[name] = value
    return ExpertState(metadata["uid"], weights, None, version, tokens)
