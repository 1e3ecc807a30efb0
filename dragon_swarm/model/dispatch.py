"""The seam between the model and the routing layer.

The model decides *which* experts a token goes to (the gate lives in the
trunk); an `ExpertDispatcher` decides *where* those experts run and whether
they are reachable. `LocalExperts` keeps them in this process; the swarm's
remote dispatcher (in `dragon_swarm.moe`) finds them in the DHT and calls them
over hivemind. The model code is the same for both.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from dragon_swarm.model.config import ModelConfig
from dragon_swarm.model.expert import ExpertFFN


@runtime_checkable
class ExpertDispatcher(Protocol):
    """Where the experts of every MoE layer live.

    Layers are numbered as in `dragon_swarm.model.config` (high-level blocks
    first); experts within a layer are numbered 0 .. num_experts-1.
    """

    num_layers: int
    num_experts: int

    def alive_mask(self, layer: int) -> torch.Tensor:
        """bool [num_experts]: experts that can be routed to right now.

        Called once per layer invocation, just before gating; dead experts get
        no tokens and take no part in the load-balancing loss.
        """
        ...

    def dispatch(self, layer: int, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Run experts of `layer` on their tokens.

        inputs: expert index -> tokens [n_i, d_model] (only experts with n_i > 0).
        Returns expert index -> outputs [n_i, d_model], differentiable with
        respect to the inputs. An expert missing from the result failed (dead,
        slow, rejected output) and is skipped by the model; the result must not
        contain experts that were not asked. The model calls this once per layer
        invocation with every chosen expert, so an implementation may call all
        of them in parallel under one deadline.
        """
        ...


class LocalExperts(nn.Module):
    """All experts in this process, always alive.

    `experts[layer][index]` is an `ExpertFFN`. Used for single-machine training,
    tests, and as the reference the remote dispatcher must match.
    """

    def __init__(self, num_layers: int, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.experts = nn.ModuleList(
            nn.ModuleList(ExpertFFN(d_model, hidden) for _ in range(num_experts)) for _ in range(num_layers)
        )

    @classmethod
    def from_config(cls, config: ModelConfig) -> "LocalExperts":
        return cls(config.num_moe_layers, config.num_experts, config.d_model, config.expert_hidden)

    def alive_mask(self, layer: int) -> torch.Tensor:
        return torch.ones(self.num_experts, dtype=torch.bool)

    def dispatch(self, layer: int, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        layer_experts = self.experts[layer]
        return {index: layer_experts[index](tokens) for index, tokens in inputs.items()}
