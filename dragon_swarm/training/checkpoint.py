"""The trainer's checkpoint: trunk weights, optimizer state, worker momentum and counters in one safetensors file."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dragon_swarm.state.checkpoint import (
    CheckpointError,
    load_tensors,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    save_tensors_atomic,
)

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "trainer.safetensors"


@dataclass
class TrainerState:
    trunk: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch optimizer state_dict, local_epoch in optimizer["state"]
    momentum: dict[str, torch.Tensor]
    micro_batches: int
    tokens: int
    local_epoch: int
    val_loss: float | None = None  # the latest held-out loss this trainer measured, and at which model version
    val_epoch: int | None = None


def save_trainer_state_or_log(path: Path, state: TrainerState, run_prefix: str, peer_id: str) -> bool:
    """`save_trainer_state`, with a disk that refuses (full, read-only, gone) costing one error line instead of the
    peer: the write is atomic, so the last good checkpoint stays as it was and training can go on."""
    try:
        return save_trainer_state(path, state, run_prefix, peer_id)
    except OSError as e:
        logger.error(f"Could not save the trainer checkpoint {path} at micro-batch {state.micro_batches}: {e.strerror or e}; the last one saved is kept")
        return False


def save_trainer_state(path: Path, state: TrainerState, run_prefix: str, peer_id: str) -> bool:
    """Write atomically; False (and the previous file kept) when the trunk holds NaN/Inf: never overwrite the last
    good checkpoint with a poisoned model."""
    if not all(bool(torch.isfinite(t).all()) for t in state.trunk.values() if t.is_floating_point()):
        logger.error(f"Trunk has non-finite weights at micro-batch {state.micro_batches}; keeping the previous checkpoint")
        return False
    optim_tensors, optim_rest = optimizer_state_to_tensors(state.optimizer)
    tensors = {f"trunk.{k}": v for k, v in state.trunk.items()}
    tensors.update(optim_tensors)
    tensors.update({f"momentum.{k}": v for k, v in state.momentum.items()})
    counters = {"micro_batches": state.micro_batches, "tokens": state.tokens, "local_epoch": state.local_epoch}
    if state.val_loss is not None and state.val_epoch is not None and math.isfinite(state.val_loss):
        counters.update(val_loss=float(state.val_loss), val_epoch=int(state.val_epoch))
    metadata = {"optimizer": json.dumps(optim_rest), "counters": json.dumps(counters), "swarm": run_prefix, "peer_id": peer_id}
    save_tensors_atomic(path, tensors, metadata)
    return True


def read_trainer_state(path: Path, run_prefix: str) -> TrainerState | None:
    """The saved state, or None when there is none; a corrupt file or one of another swarm is reported, not used.
    Names and shapes are checked by the caller (`HRMSMoE.load_trunk_state_dict`)."""
    if not path.exists():
        return None
    try:
        tensors, metadata = load_tensors(path)
        if metadata.get("swarm") != run_prefix:
            logger.error(f"{path} belongs to swarm {metadata.get('swarm')}, not {run_prefix}; starting fresh")
            return None
        counters = json.loads(metadata["counters"])
        return TrainerState(
            trunk={k[len("trunk.") :]: v for k, v in tensors.items() if k.startswith("trunk.")},
            optimizer=optimizer_state_from_tensors(tensors, json.loads(metadata["optimizer"])),
            momentum={k[len("momentum.") :]: v for k, v in tensors.items() if k.startswith("momentum.")},
            micro_batches=int(counters["micro_batches"]),
            tokens=int(counters["tokens"]),
            local_epoch=int(counters["local_epoch"]),
            val_loss=float(counters["val_loss"]) if counters.get("val_loss") is not None else None,
            val_epoch=int(counters["val_epoch"]) if counters.get("val_epoch") is not None else None,
        )
    except (CheckpointError, KeyError, ValueError, TypeError) as e:
        logger.error(f"Trainer checkpoint unusable, starting fresh: {e}")
        return None
