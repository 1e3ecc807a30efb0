"""Typed configuration of the HRM-sMoE model.

One frozen, strict pydantic model holds every number the model needs; it is built once from the YAML `model:`
section (`ModelConfig.from_dict`) and passed down as is. Unknown keys are errors: a typo in a swarm config must
not silently fall back to a default, because peers with different model shapes must never mix.

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

from typing import Annotated, Any, Mapping

from pydantic import Field, ValidationError, model_validator

from dragon_swarm.schema import Schema, interval, one_line

PositiveInt = Annotated[int, Field(gt=0)]


class ModelConfigError(ValueError):
    """A model section that cannot be used; one line."""


class ModelConfig(Schema):
    """Shape and regularisation of the HRM-sMoE model.

    Tuning advice: the recurrence multiplies compute, not parameters. One
    forward runs each low-level block `h_cycles * l_cycles` times and each
    high-level block `h_cycles` times, so a remote MoE layer is called that many
    times per step; keep `h_cycles * l_cycles` small (4 is plenty) on slow links,
    or turn on `one_step_grad` so that only the last two steps need backward.

    Ints given for floats are stored as floats: `aux_loss_weight: 0` and `0.0` give the same `to_dict()`, which
    the swarm hashes. Direct construction is validated too (pydantic's ValidationError is a ValueError).
    """

    vocab_size: PositiveInt
    seq_len: PositiveInt  # maximum context length (size of the learned position table)
    d_model: PositiveInt
    n_heads: PositiveInt
    h_layers: PositiveInt  # transformer blocks in the high-level (slow) module
    l_layers: PositiveInt  # transformer blocks in the low-level (fast) module
    h_cycles: PositiveInt  # high-level steps per forward
    l_cycles: PositiveInt  # low-level steps per high-level step
    num_experts: PositiveInt  # experts per MoE layer
    top_k: PositiveInt  # experts each token is sent to
    expert_hidden: PositiveInt  # hidden width of one expert FFN
    aux_loss_weight: Annotated[float, Field(ge=0.0)]  # weight of the load-balancing loss in the total loss (NaN fails)
    dropout: Annotated[float, interval(0.0, 1.0, "[)")] = 0.0
    # HRM's one-step gradient approximation: every step except the final
    # low-level step and the final high-level step runs under torch.no_grad,
    # so memory and backward traffic do not grow with the number of cycles.
    one_step_grad: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> "ModelConfig":
        problems = []
        if self.d_model % self.n_heads != 0:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.top_k > self.num_experts:
            problems.append(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

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

        Raises ModelConfigError (a ValueError), one line naming unknown keys, missing keys and invalid values.
        """
        if not isinstance(d, Mapping):
            raise ModelConfigError(f"model config must be a mapping, got {type(d).__name__}")
        try:
            return cls.model_validate(dict(d))
        except ValidationError as e:
            raise ModelConfigError(f"invalid ModelConfig: {one_line(e, cls)}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict that round-trips through `from_dict` (and YAML/JSON)."""
        return self.model_dump()

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with `changes` applied."""
        return type(self).from_dict({**self.to_dict(), **changes})
