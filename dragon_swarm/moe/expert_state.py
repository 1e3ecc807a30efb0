"""One expert's full state (weights, AdamW moments, update count) as a value: captured from a backend, sent over the
network as safetensors bytes, validated against the expert's known shapes, chosen or merged robustly, applied.

Used by the state service (`moe.state_service`: a new replica downloads the current weights before it announces
itself online, a standby copy is kept for takeover) and by replica sync (`moe.replica_sync`). Everything here is
pure: no network, tested directly.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from dragon_swarm.averaging.aggregators import centered_clip
from dragon_swarm.config import TrainingSection
from dragon_swarm.model.expert import ExpertFFN
from dragon_swarm.moe.backend import ExpertBackend
from dragon_swarm.state.checkpoint import CheckpointError, pack_module_checkpoint, safetensors_metadata, unpack_module_checkpoint
from dragon_swarm.training.optim import make_adamw

MOMENT_NAMES = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter tensors; `step` is a scalar


class ExpertStateError(ValueError):
    """A received or stored expert state that must not be used: the message says why, in one line."""


@dataclass(frozen=True, eq=False)  # compared by identity: tensors have no single truth value
class ExpertState:
    uid: str
    module: dict[str, torch.Tensor]  # module.state_dict() names
    optimizer: dict[str, Any] | None  # a torch optimizer state_dict
    version: int  # optimizer steps applied
    tokens_processed: int = 0

    def parameter_vector(self) -> torch.Tensor:
        return torch.cat([self.module[name].detach().reshape(-1).to(torch.float64) for name in sorted(self.module)])


@dataclass(frozen=True)
class ExpertTemplate:
    """What every expert of a swarm looks like (all share one shape): checks received states without a backend."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer


def make_template(d_model: int, expert_hidden: int, training: TrainingSection) -> ExpertTemplate:
    module = ExpertFFN(d_model, expert_hidden)
    return ExpertTemplate(module, make_adamw(module.named_parameters(), training.expert_lr, training.betas, training.weight_decay))


def capture(backend: ExpertBackend) -> ExpertState:
    module_state, optimizer_state, info = backend.snapshot()
    return ExpertState(backend.name, module_state, optimizer_state, int(info["version"]), int(info["tokens_processed"]))


def apply(state: ExpertState, backend: ExpertBackend) -> None:
    """Make `backend` hold `state` (validate it first: a partial load leaves the backend half-written)."""
    with backend.lock:
        backend.module.load_state_dict(state.module)
        if state.optimizer is not None:
            backend.optimizer.load_state_dict(state.optimizer)  # torch puts it on the parameters' device of now
        backend.version = state.version
        backend.tokens_processed = state.tokens_processed


def info(state: ExpertState) -> dict[str, Any]:
    return {"uid": state.uid, "version": state.version, "tokens_processed": state.tokens_processed}


def from_checkpoint(module_state: dict, optimizer_state: dict | None, counters: dict[str, Any], uid: str) -> ExpertState:
    version, tokens = counters.get("version", 0), counters.get("tokens_processed", 0)
    if not isinstance(version, int) or version < 0 or not isinstance(tokens, int) or tokens < 0:
        raise ExpertStateError(f"bad counters {counters!r}")
    return ExpertState(uid, module_state, optimizer_state, version, tokens)


def to_bytes(state: ExpertState) -> bytes:
    """The layout of an expert checkpoint file (`state.checkpoint`), in memory: safetensors, never pickle."""
    tensors, metadata = pack_module_checkpoint(state.module, state.optimizer, info(state))
    return safetensors_save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, metadata=metadata)


def from_bytes(data: bytes, source: str) -> ExpertState:
    """Parse what `to_bytes` made; anything else raises ExpertStateError (never executes what it reads)."""
    try:
        tensors = safetensors_load(data)
        metadata = safetensors_metadata(data)
        module_state, optimizer_state, counters = unpack_module_checkpoint(tensors, metadata, source)
    except (SafetensorError, CheckpointError, ValueError, KeyError, struct.error) as e:
        raise ExpertStateError(f"{source}: unreadable expert state ({e})") from None
    uid = counters.get("uid")
    if not isinstance(uid, str):
        raise ExpertStateError(f"{source}: expert state names no uid")
    try:
        return from_checkpoint(module_state, optimizer_state, counters, uid)
    except ExpertStateError as e:
        raise ExpertStateError(f"{source}: {e}") from None


def validate(state: ExpertState, template: ExpertTemplate | ExpertBackend, uid: str) -> None:
    """Refuse a state that is not this expert's: another uid, other tensor names, shapes or dtypes, non-finite
    values, or optimizer moments that do not match the parameters. Raises ExpertStateError."""
    if state.uid != uid:
        raise ExpertStateError(f"state is for {state.uid!r}, expected {uid!r}")
    expected = template.module.state_dict()
    if set(state.module) != set(expected):
        raise ExpertStateError(f"tensor names {sorted(state.module)} differ from {sorted(expected)}")
    for name, tensor in state.module.items():
        _check_tensor(f"{name}", tensor, expected[name])
    if state.optimizer is None:
        return
    params = list(template.module.parameters())
    per_param = state.optimizer.get("state", {})
    for index, values in per_param.items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise ExpertStateError(f"optimizer state for unknown parameter {index!r}")
        for name in MOMENT_NAMES:
            if name in values:
                _check_tensor(f"optimizer {index}.{name}", values[name], params[index].detach())
        step = values.get("step")
        if step is not None and not _is_step_count(step):
            raise ExpertStateError(f"optimizer {index}.step is {step!r}")
    groups = state.optimizer.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(template.optimizer.param_groups):
        raise ExpertStateError("optimizer param groups do not match this expert's optimizer")
    for got, mine in zip(groups, template.optimizer.param_groups):
        if not isinstance(got, dict) or len(got.get("params", ())) != len(mine["params"]):
            raise ExpertStateError("optimizer param groups do not match this expert's optimizer")


def _is_step_count(step: object) -> bool:
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            return False
        step = step.item()
    return isinstance(step, (int, float)) and math.isfinite(step) and step >= 0


def _check_tensor(name: str, tensor: object, expected: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ExpertStateError(f"{name} is not a tensor")
    if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
        raise ExpertStateError(f"{name} is {tensor.dtype} {list(tensor.shape)}, expected {expected.dtype} {list(expected.shape)}")
    if not torch.isfinite(tensor).all():
        raise ExpertStateError(f"{name} has non-finite values")


def robust_choice(candidates: Sequence[ExpertState], reference: ExpertState | None = None) -> ExpertState:
    """The candidate with the smallest total distance to the others (the medoid), counting `reference` (our own
    copy, if any) as one more voter. With honest candidates in the majority the result is an honest state, and it is
    one real state (weights, moments and update count that belong together), never a blend."""
    if not candidates:
        raise ValueError("no candidates")
    if len(candidates) == 1:
        return candidates[0]
    voters = [c.parameter_vector() for c in candidates] + ([reference.parameter_vector()] if reference is not None else [])
    totals = [sum(float(torch.linalg.vector_norm(v - w)) for w in voters) for v in voters[: len(candidates)]]
    best = min(range(len(candidates)), key=lambda i: (totals[i], -candidates[i].version))
    return candidates[best]


@dataclass(frozen=True)
class MergeResult:
    state: ExpertState
    distances: list[float]  # each input's parameter distance from the merged weights, own first
    spread: float  # the median of those distances: how far apart honest replicas typically are


def robust_merge(own: ExpertState, others: Sequence[ExpertState], tau: float = 1.0) -> MergeResult:
    """Replica sync: CenteredClip (relative radius, as the trunk's all-reduce uses) over the replicas' weights and
    AdamW moments, each tensor merged on its own; our own update count and step counters are kept (they count our
    own updates, and AdamW's bias correction must not jump)."""
    states = [own, *others]
    module = {name: _merged([s.module[name] for s in states], tau) for name in own.module}
    optimizer = None
    if own.optimizer is not None:
        optimizer = {"state": {}, "param_groups": own.optimizer["param_groups"]}
        for index, values in own.optimizer["state"].items():
            merged = dict(values)
            for name in MOMENT_NAMES:
                tensors = [s.optimizer["state"][index][name] for s in states if _has_moment(s, index, name)]
                if name in values and len(tensors) == len(states):
                    merged[name] = _merged(tensors, tau)
                    if name == "exp_avg_sq":
                        merged[name] = merged[name].clamp_min(0.0)  # a second moment is never negative
            optimizer["state"][index] = merged
    return _merge_result(ExpertState(own.uid, module, optimizer, own.version, own.tokens_processed), states)


def merge_weights(states: Sequence[ExpertState], tau: float = 1.0) -> MergeResult:
    """An outer round's merge: CenteredClip over the holders' weights in the order given (holders sort by peer id,
    so that every holder reduces the same inputs the same way). The result carries no optimizer state (each holder
    keeps its own moments) and the first state's counters."""
    first = states[0]
    module = {name: _merged([s.module[name] for s in states], tau) for name in first.module}
    return _merge_result(ExpertState(first.uid, module, None, first.version, first.tokens_processed), states)


def _merge_result(result: ExpertState, states: Sequence[ExpertState]) -> MergeResult:
    """`result` with each input's parameter distance from it and their median."""
    merged_vector = result.parameter_vector()
    distances = [float(torch.linalg.vector_norm(s.parameter_vector() - merged_vector)) for s in states]
    return MergeResult(result, distances, float(torch.tensor(distances).median()))


def _has_moment(state: ExpertState, index: int, name: str) -> bool:
    return state.optimizer is not None and name in state.optimizer.get("state", {}).get(index, {})


def _merged(tensors: Sequence[torch.Tensor], tau: float) -> torch.Tensor:
    stacked = torch.stack([t.detach().reshape(-1) for t in tensors])
    value = centered_clip(stacked, tau, relative_tau=True).value
    return value.reshape(tensors[0].shape).to(tensors[0].dtype)
