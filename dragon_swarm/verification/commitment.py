"""What a sender commits to before its round's parts go out, and the round record that opens the commitment.

The commitment is small (digests and step numbers) and public; the record (the weights and the worker momentum at the
start of the round, the micro-batches' expert transcripts, the vector sent) is served on request and checked against the
commitment digest by digest, so a sender cannot change its story after it learned who checks it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Mapping

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from dragon_swarm.state.checkpoint import safetensors_metadata
from dragon_swarm.verification.transcript import ExpertTranscript

MAX_RECORD_STEPS = 4096


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: equal digests mean bit-equal tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def bytes_digest(*blobs: bytes) -> str:
    h = hashlib.sha256()
    for blob in blobs:
        h.update(hashlib.sha256(blob).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class RoundCommitment:
    epoch: int
    steps: tuple[int, ...]  # the sender's micro-batch numbers, in order (they decide the batches)
    batch_sizes: tuple[int, ...]
    momentum_digest: str
    transcripts_digest: str
    sent_digest: str
    trunk_digest: str  # the weights the round started from

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch, "steps": list(self.steps), "batch_sizes": list(self.batch_sizes),
            "momentum": self.momentum_digest, "transcripts": self.transcripts_digest, "sent": self.sent_digest,
            "trunk": self.trunk_digest,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, value: object) -> "RoundCommitment":
        """Raises ValueError for anything that is not a well-formed commitment (it comes from other peers)."""
        try:
            assert isinstance(value, dict)
            steps, sizes = [int(s) for s in value["steps"]], [int(b) for b in value["batch_sizes"]]
            digests = [str(value[k]) for k in ("momentum", "transcripts", "sent", "trunk")]
            assert 0 < len(steps) == len(sizes) <= MAX_RECORD_STEPS and all(b > 0 for b in sizes)
            assert all(len(d) == 64 for d in digests)
            return cls(int(value["epoch"]), tuple(steps), tuple(sizes), *digests)
        except (AssertionError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed round commitment: {type(e).__name__} {e}") from None


@dataclass
class RoundRecord:
    """Everything that decided what one trainer sent in one round (the names are the trunk parameters')."""

    epoch: int
    steps: list[int]
    batch_sizes: list[int]
    momentum_start: dict[str, torch.Tensor]  # empty: the round started without worker momentum
    transcripts: list[bytes]  # `ExpertTranscript.to_bytes()` per micro-batch
    sent: dict[str, torch.Tensor]
    trunk: dict[str, torch.Tensor] = field(default_factory=dict)  # the weights the round started from

    def commitment(self) -> RoundCommitment:
        return RoundCommitment(
            self.epoch, tuple(self.steps), tuple(self.batch_sizes), tensors_digest(self.momentum_start),
            bytes_digest(*self.transcripts), tensors_digest(self.sent), tensors_digest(self.trunk),
        )  # fmt: skip

    def opens(self, commitment: RoundCommitment) -> str | None:
        """Why this record does not open `commitment`, or None when it does."""
        mine = self.commitment()
        for field_name in ("epoch", "steps", "batch_sizes", "momentum_digest", "transcripts_digest", "sent_digest", "trunk_digest"):
            if getattr(mine, field_name) != getattr(commitment, field_name):
                return f"the record's {field_name} differs from the commitment's"
        return None

    def transcript(self, n: int) -> ExpertTranscript:
        return ExpertTranscript.from_bytes(self.transcripts[n])

    def to_bytes(self) -> bytes:
        tensors = {f"momentum.{k}": v.contiguous() for k, v in self.momentum_start.items()}
        tensors.update({f"sent.{k}": v.contiguous() for k, v in self.sent.items()})
        tensors.update({f"trunk.{k}": v.contiguous() for k, v in self.trunk.items()})
        for n, blob in enumerate(self.transcripts):
            tensors[f"transcript.{n}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        meta = {"epoch": self.epoch, "steps": self.steps, "batch_sizes": self.batch_sizes}
        return save_tensors(tensors, metadata={"round": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "RoundRecord":
        """Raises ValueError on anything that is not a round record."""
        try:
            tensors = load_tensors(data)
            meta = json.loads(safetensors_metadata(data)["round"])
            epoch, steps, sizes = int(meta["epoch"]), [int(s) for s in meta["steps"]], [int(b) for b in meta["batch_sizes"]]
        except Exception as e:  # safetensors raises its own error types for truncated or foreign bytes
            raise ValueError(f"not a round record: {type(e).__name__}: {e}") from None
        momentum = {k.removeprefix("momentum."): v for k, v in tensors.items() if k.startswith("momentum.")}
        sent = {k.removeprefix("sent."): v for k, v in tensors.items() if k.startswith("sent.")}
        trunk = {k.removeprefix("trunk."): v for k, v in tensors.items() if k.startswith("trunk.")}
        transcripts = [tensors[f"transcript.{n}"].numpy().tobytes() for n in range(len(steps)) if f"transcript.{n}" in tensors]
        if len(transcripts) != len(steps) or len(sizes) != len(steps):
            raise ValueError(f"round record has {len(transcripts)} transcript(s) for {len(steps)} step(s)")
        return cls(epoch, steps, sizes, momentum, transcripts, sent, trunk)
