"""What a trainer sends to the swarm's average after each micro-batch: a gradient, and the sample count it claims.

The trainer computes a micro-batch's gradient and hands it to a `GradientContribution`, which turns it into what
is sent. Production uses `HonestContribution`; a test or benchmark may inject another implementation (see
`dragon_swarm.attacks.ByzantineContribution`) without any attack branch in the training loop.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

import torch

V = TypeVar("V")


class GradientContribution(Protocol):
    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The targets this micro-batch trains on."""

    def batch_step(self, step: int) -> int:
        """The step number whose deterministic batch this micro-batch trains on (an honest trainer: `step`)."""

    def report_check(self, verdict: V) -> V:
        """What this trainer says of another's round it recomputed (`dragon_swarm.verification`; honest: the verdict)."""

    def round_start_shift(self, round_number: int) -> float:
        """Local-expert mode: a value added to this trainer's start of outer round `round_number` (honest: 0)."""

    def prepare(
        self, named_params: Sequence[tuple[str, torch.nn.Parameter]], loss: torch.Tensor, batch_size: int, num_peers: int
    ) -> int | None:
        """Rewrite the parameters' `.grad` in place into what is sent; return the sample count to claim, or None to
        drop this micro-batch (nothing reaches the swarm's average)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """State to checkpoint with the trainer (keyed by parameter name)."""

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


class HonestContribution:
    """Clip the gradient to `clip_grad_norm`, then send this worker's momentum `m <- b*m + (1-b)*g` instead of
    the raw gradient (`training.worker_momentum`; Karimireddy, He, Jaggi 2021: honest vectors get less noisy, so
    colluders can no longer hide inside the honest spread). A micro-batch whose loss or gradient is not finite
    (a bad expert output, an overflow) is dropped: it must not reach the swarm's average."""

    def __init__(self, clip_grad_norm: float, worker_momentum: float):
        self.clip_grad_norm, self.beta = clip_grad_norm, worker_momentum
        self.momentum: dict[str, torch.Tensor] = {}

    def targets(self, targets: torch.Tensor) -> torch.Tensor:
        return targets

    def batch_step(self, step: int) -> int:
        return step

    def report_check(self, verdict: V) -> V:
        return verdict

    def round_start_shift(self, round_number: int) -> float:
        return 0.0

    def prepare(
        self, named_params: Sequence[tuple[str, torch.nn.Parameter]], loss: torch.Tensor, batch_size: int, num_peers: int
    ) -> int | None:
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named_params], self.clip_grad_norm)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            return None
        if self.beta > 0:
            for name, p in named_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                m = self.momentum.get(name)
                if m is None:
                    m = self.momentum[name] = p.grad.detach().clone()  # start from the first gradient, not from zero
                else:
                    m.mul_(self.beta).add_(p.grad, alpha=1 - self.beta)
                p.grad.copy_(m)
        return batch_size

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.momentum)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.momentum = dict(tensors)
