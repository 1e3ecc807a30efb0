"""The sender's side: keep, micro-batch by micro-batch, what decided this round's sent vector.

The trainer calls `begin_round` with its worker momentum before the round's first micro-batch, `add` after each
micro-batch's contribution has been prepared (the parameters' `.grad` hold what hivemind accumulates), and `close`
when the round's all-reduce starts. The sent vector is accumulated here exactly as hivemind's GradientAverager does
it (weights batch size over the first one's, divided by the number of micro-batches), by parameter name.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from dragon_swarm.verification.commitment import RoundRecord


class RoundLedger:
    def __init__(self) -> None:
        self.begin_round({})

    def begin_round(self, momentum: Mapping[str, torch.Tensor], trunk: Mapping[str, torch.Tensor] | None = None) -> None:
        self.momentum_start = {k: v.detach().cpu().clone() for k, v in momentum.items()}
        self.trunk = dict(trunk or {})  # read-only: the caller's CPU copy (`VerificationService.remember_trunk`)
        self.steps: list[int] = []
        self.batch_sizes: list[int] = []
        self.transcripts: list[bytes] = []
        self._accumulated: dict[str, torch.Tensor] = {}

    @property
    def empty(self) -> bool:
        return not self.steps

    def started_from(self, named_params: Sequence[tuple[str, torch.nn.Parameter]]) -> bool:
        """Whether the weights are still the ones this round started from (a state download changes them without
        always changing the version number; hivemind then drops the gradients accumulated so far, and so must we)."""
        return all(name in self.trunk and torch.equal(p.detach().cpu(), self.trunk[name]) for name, p in named_params)

    @torch.no_grad()
    def add(self, step: int, batch_size: int, named_params: Sequence[tuple[str, torch.nn.Parameter]], transcript: bytes) -> None:
        anchor = self.batch_sizes[0] if self.batch_sizes else batch_size
        for name, p in named_params:
            grad = p.grad.detach().cpu() if p.grad is not None else torch.zeros_like(p, device="cpu")
            acc = self._accumulated.get(name)
            if acc is None:
                acc = self._accumulated[name] = torch.zeros_like(grad)
            acc.add_(grad, alpha=batch_size / anchor)
        self.steps.append(step)
        self.batch_sizes.append(batch_size)
        self.transcripts.append(transcript)

    def close(self, epoch: int) -> RoundRecord:
        """The record of the round so far (the ledger keeps it until `begin_round`)."""
        sent = {k: v / max(1, len(self.steps)) for k, v in self._accumulated.items()}
        return RoundRecord(epoch, list(self.steps), list(self.batch_sizes), dict(self.momentum_start), list(self.transcripts), sent, dict(self.trunk))
