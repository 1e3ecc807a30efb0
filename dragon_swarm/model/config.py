"""Typed configuration of the HRM-sMoE model.

One frozen dataclass holds every number the model needs; it is built once from
the YAML `model:` section (`ModelConfig.from_dict`) and passed down as is.
Unknown keys are errors: a typo in a swarm config must not silently fall back
to a default, because peers with different model shapes must never mix.

MoE layer numbering (shared with the router and expert hosts)
-------------------------------------------------------------
Every transformer block has exactly one MoE feed-forward, so there are
`h_layers + l_layers` MoE layers:

    high-level blocks  ->  MoE layers 0 .. h_layers-1
    low-level blocks   ->  MoE layers h_layers .. h_layers+l_layers-1

Expert uids follow hivemind's grid convention `<prefix>.<moe_layer>.<expert_index>`,
with `expert_index` in `0 .. num_experts-1`. A layer keeps its number across
recurrent cycles: the same experts serve every cycle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class ModelConfig:
    """Shape and regularisation of the HRM-sMoE model.

    Tuning advice: the recurrence multiplies compute, not parameters. One
    forward runs each low-level block `h_cycles * l_cycles` times and each
    high-level block `h_cycles` times, so a remote MoE layer is called that many
    times per step; keep `h_cycles * l_cycles` small (4 is plenty) on slow links,
    or turn on `one_step_grad` so that only the last two steps need backward.
    """

    vocab_size: int
    seq_len: int  # maximum context length (size of the learned position table)
    d_model: int
    n_heads: int
    h_layers: int  # transformer blocks in the high-level (slow) module
    l_layers: int  # transformer blocks in the low-level (fast) module
    h_cycles: int  # high-level steps per forward
    l_cycles: int  # low-level steps per high-level step
    num_experts: int  # experts per MoE layer
    top_k: int  # experts each token is sent to
    expert_hidden: int  # hidden width of one expert FFN
    aux_loss_weight: float  # weight of the load-balancing loss in the total loss
    dropout: float = 0.0
    # HRM's one-step gradient approximation: every step except the final
    # low-level step and the final high-level step runs under torch.no_grad,
    # so memory and backward traffic do not grow with the number of cycles.
    one_step_grad: bool = False

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int):
                    problems.append(f"{f.name} must be an int, got {value!r}")
                elif value <= 0:
                    problems.append(f"{f.name} must be positive, got {value}")
            elif f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    problems.append(f"{f.name} must be a number, got {value!r}")
                else:
                    # 0 and 0.0 must give the same to_dict(): the swarm hashes it.
                    object.__setattr__(self, f.name, float(value))
            elif f.type == "bool" and not isinstance(value, bool):
                problems.append(f"{f.name} must be a bool, got {value!r}")
        if problems:  # the checks below assume the right types
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

        if self.d_model % self.n_heads != 0:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.top_k > self.num_experts:
            problems.append(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")
        if not self.aux_loss_weight >= 0.0:  # also rejects NaN
            problems.append(f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def num_moe_layers(self) -> int:
        """MoE layers in the model: one per block, high-level blocks first."""
        return self.h_layers + self.l_layers

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a plain mapping (the YAML `model:` section).

        Raises ValueError naming unknown keys, missing keys and invalid values.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"model config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        required = {
            f.name
            for f in fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        unknown = sorted(set(d) - known)
        missing = sorted(required - set(d))
        problems = []
        if unknown:
            problems.append(f"unknown keys: {', '.join(map(str, unknown))}")
        if missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict that round-trips through `from_dict` (and YAML/JSON)."""
        return dataclasses.asdict(self)
