"""Recompute what a trainer sent in one round, and compare.

The checker runs the sender's micro-batches through the same code the sender ran: the model at the round's version,
the sender's batches (rebuilt from swarm seed, sender id and step), its recorded expert answers, `HonestContribution`
(clipping, worker momentum from the committed start) and hivemind's accumulation (each micro-batch weighted by its
batch size over the first's, the sum divided by the number of micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from dragon_swarm.model.config import ModelConfig
from dragon_swarm.model.hrm_smoe import HRMSMoE
from dragon_swarm.training.contribution import HonestContribution
from dragon_swarm.verification.commitment import RoundRecord
from dragon_swarm.verification.transcript import ExpertTranscript, ReplayDispatcher, TranscriptMismatch

BatchOf = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (step, batch size) -> (inputs, targets)

# float32 replays of one model on one kind of machine agree to ~1e-6; across CPU kinds and thread counts
# reductions run in other orders. A lie worth telling (another batch's gradient, shuffled labels) is off by > 0.3.
DEFAULT_TOLERANCE = 1e-2


@dataclass(frozen=True)
class Verdict:
    honest: bool
    relative_error: float  # ||recomputed - sent|| / ||recomputed||; inf when the replay itself failed
    reason: str


def recompute_sent(
    model_config: ModelConfig, trunk: Mapping[str, torch.Tensor], record: RoundRecord, batch_of: BatchOf,
    clip_grad_norm: float, worker_momentum: float,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The vector an honest sender of `record` sent, by name. Raises TranscriptMismatch when the recorded expert
    answers do not fit the replay (another routing: the record is not of this model on these batches)."""
    model = HRMSMoE(model_config, ReplayDispatcher(ExpertTranscript(), model_config.num_moe_layers, model_config.num_experts))
    model.load_trunk_state_dict(dict(trunk))
    model.train()
    named = list(model.named_trunk_parameters())
    contribution = HonestContribution(clip_grad_norm, worker_momentum)
    contribution.load_state_tensors({k: v.detach().clone() for k, v in record.momentum_start.items()})
    accumulated = {name: torch.zeros_like(p) for name, p in named}
    anchor = record.batch_sizes[0]
    for n, (step, batch_size) in enumerate(zip(record.steps, record.batch_sizes)):
        replay = ReplayDispatcher(record.transcript(n), model_config.num_moe_layers, model_config.num_experts)
        model.dispatcher = replay
        model.zero_grad(set_to_none=True)
        inputs, targets = batch_of(step, batch_size)
        loss, _, _ = model.compute_loss(inputs, targets)
        loss.backward()
        if not replay.finished():
            raise TranscriptMismatch(f"micro-batch {step}: the record holds expert calls the replay never made")
        if contribution.prepare(named, loss, batch_size, 0) is None:
            raise TranscriptMismatch(f"micro-batch {step}: not finite in the replay (an honest sender drops such a batch)")
        with torch.no_grad():
            for name, p in named:
                accumulated[name].add_(p.grad, alpha=batch_size / anchor)
    return {name: t / len(record.steps) for name, t in accumulated.items()}


def relative_l2(theirs: Mapping[str, torch.Tensor], ours: Mapping[str, torch.Tensor]) -> float:
    """||theirs - ours|| / ||ours|| over all named tensors together (NaN when theirs is not finite)."""
    diff = sum(float((theirs[k].float() - v.float()).pow(2).sum()) for k, v in ours.items()) ** 0.5
    norm = sum(float(v.float().pow(2).sum()) for v in ours.values()) ** 0.5
    return diff / max(norm, 1e-12)


def compare_sent(recomputed: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor], tolerance: float) -> Verdict:
    """Honest when the sent vector is within `tolerance` of the recomputation (relative L2 over the whole vector)."""
    if set(recomputed) != set(sent):
        return Verdict(False, float("inf"), f"sent {len(sent)} tensors, the model has {len(recomputed)}")
    for name, r in recomputed.items():
        if sent[name].shape != r.shape:
            return Verdict(False, float("inf"), f"{name}: sent shape {tuple(sent[name].shape)}, expected {tuple(r.shape)}")
    error = relative_l2(sent, recomputed)
    if not error == error:  # NaN sent
        return Verdict(False, float("inf"), "the sent vector is not finite")
    if error > tolerance:
        return Verdict(False, error, f"sent vector is {error:.3g} (relative L2) away from its recomputation (tolerance {tolerance:g})")
    return Verdict(True, error, "matches its recomputation")


def verify_round(
    model_config: ModelConfig, trunk: Mapping[str, torch.Tensor], record: RoundRecord, batch_of: BatchOf,
    clip_grad_norm: float, worker_momentum: float, tolerance: float = DEFAULT_TOLERANCE,
) -> Verdict:  # fmt: skip
    """Recompute and compare; a record that cannot even be replayed is a lie of its own."""
    try:
        recomputed = recompute_sent(model_config, trunk, record, batch_of, clip_grad_norm, worker_momentum)
    except (TranscriptMismatch, ValueError) as e:
        return Verdict(False, float("inf"), f"cannot be replayed: {e}")
    return compare_sent(recomputed, record.sent, tolerance)
