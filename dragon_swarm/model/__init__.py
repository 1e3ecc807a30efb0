"""The HRM-sMoE model: single-process code; where experts live is a dispatcher's business."""

from dragon_swarm.model.config import ModelConfig
from dragon_swarm.model.dispatch import ExpertDispatcher, LocalExperts
from dragon_swarm.model.expert import ExpertFFN
from dragon_swarm.model.hrm_smoe import (
    HRMSMoE,
    MoEFeedForward,
    Routing,
    count_parameters,
    load_balancing_loss,
    route,
)

__all__ = [
    "ExpertDispatcher",
    "ExpertFFN",
    "HRMSMoE",
    "LocalExperts",
    "ModelConfig",
    "MoEFeedForward",
    "Routing",
    "count_parameters",
    "load_balancing_loss",
    "route",
]
