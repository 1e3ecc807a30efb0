"""One expert of an MoE layer: a SwiGLU feed-forward.

The same class runs inside `LocalExperts` (single process, tests, tiny runs) and
on expert hosts behind hivemind's ModuleBackend, which is why its interface is
exactly one tensor in and one tensor out, with no state beyond its weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExpertFFN(nn.Module):
    """SwiGLU MLP: d_model -> hidden (gated) -> d_model.

    No normalisation inside: the trunk applies RMSNorm before the MoE layer, so
    every replica of an expert sees inputs of the same scale no matter which
    trainer sent them. Parameters: 3 * d_model * hidden, no biases.
    """

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.d_model = d_model
        self.hidden = hidden
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The expert initialises itself (the trunk's init never touches it)
        # because hosts build experts without ever building a trunk.
        # Same small-normal init as the trunk's linears, so a locally hosted
        # and a remotely hosted expert start from the same distribution.
        for lin in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(lin.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, d_model] -> [N, d_model]."""
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
