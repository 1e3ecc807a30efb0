"""`--new-swarm --init-from model.safetensors`: a new swarm starts from an exported model (the rollback path).

Before the host and the trainer start, the model file (`python -m dragon_swarm.export`) is turned into what they
resume from anyway, so no other start-up code needs to know about it:

- the trunk becomes the trainer checkpoint (`training.checkpoint`) with `local_epoch` = the file's model version,
  so the model version continues from the file's; the optimizer starts fresh (its moments are not exported);
- every expert becomes `<state-dir>/experts/<uid>.safetensors` (`state.checkpoint`, version 0: no update applied by
  this peer yet), which `moe.hosting` loads as this peer's own checkpoint when no live replica exists, as in a new
  swarm. Experts this peer does not host stay there as standby copies for a later takeover.

Refused with one line: a file of another config (its hash differs from the swarm config's), a file that does not
fit that config's model, and a state dir that already holds a trainer or expert checkpoint (the rollback must not
mix with an older run: use a fresh --state-dir). Runs after the state-dir lock is taken, so a failed start
removes what it wrote (`node.state_dir.StartupGuard`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dragon_swarm.config import SwarmConfig
from dragon_swarm.model.dispatch import LocalExperts
from dragon_swarm.model.hrm_smoe import HRMSMoE
from dragon_swarm.moe.expert_uids import all_expert_uids, parse_uid
from dragon_swarm.node.startup import StartupError
from dragon_swarm.state.checkpoint import CheckpointError, load_tensors, save_module_checkpoint
from dragon_swarm.training.checkpoint import CHECKPOINT_NAME, TrainerState, save_trainer_state

logger = logging.getLogger(__name__)

EXPERTS_DIR = "experts"


@dataclass(frozen=True)
class ModelFile:
    trunk: dict[str, torch.Tensor]
    experts: dict[str, dict[str, torch.Tensor]]  # uid -> ExpertFFN state_dict
    model_version: int
    tokens: int


def read_model_file(path: Path, config: SwarmConfig) -> ModelFile:
    """The trunk, experts and model version of an exported file, checked against `config`. Raises StartupError."""
    path = Path(path)
    where = f"--init-from {path}"
    if not path.is_file():
        raise StartupError(f"{where}: no such file")
    try:
        tensors, metadata = load_tensors(path)
    except CheckpointError as e:
        raise StartupError(f"{where}: {e}") from None
    file_hash = metadata.get("config_hash")
    if file_hash != config.swarm_hash():
        raise StartupError(
            f"{where} was exported from a swarm with config {file_hash or '(none: not a dragon_swarm.export file)'}, "
            f"this swarm's config is {config.swarm_hash()}; start with the config the model was trained with (-c)"
        )
    try:
        model_version, tokens = int(metadata["model_version"]), int(metadata.get("tokens_trained", 0))
        if model_version < 0 or tokens < 0:
            raise ValueError("negative counter")
    except (KeyError, ValueError) as e:
        raise StartupError(f"{where}: no usable model_version in its metadata ({e})") from None
    m = config.model
    expected = HRMSMoE(m, LocalExperts.from_config(m)).state_dict()
    problem = _shape_problem(tensors, expected)
    if problem:
        raise StartupError(f"{where} does not fit the config's model: {problem}")
    trunk = {k: v for k, v in tensors.items() if not k.startswith("dispatcher.")}
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for uid in all_expert_uids(config.expert_prefix, m.num_moe_layers, m.num_experts):
        _, layer, index = parse_uid(uid)
        prefix = f"dispatcher.experts.{layer}.{index}."
        experts[uid] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return ModelFile(trunk, experts, model_version, tokens)


def _shape_problem(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        return f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    for name, t in expected.items():
        if tuple(tensors[name].shape) != tuple(t.shape):
            return f"{name} has shape {tuple(tensors[name].shape)}, the model needs {tuple(t.shape)}"
        if tensors[name].is_floating_point() and not bool(torch.isfinite(tensors[name]).all()):
            return f"{name} has non-finite values"
    return None


def existing_state(state_dir: Path) -> list[Path]:
    """Checkpoints already in `state_dir` that a rollback would mix with."""
    state_dir = Path(state_dir)
    found = [state_dir / CHECKPOINT_NAME] if (state_dir / CHECKPOINT_NAME).exists() else []
    experts = state_dir / EXPERTS_DIR
    if experts.is_dir():
        found += sorted(experts.glob("*.safetensors"))
    return found


def fresh_optimizer_state(config: SwarmConfig) -> dict:
    """What the trainer's optimizer is restored from. Remote-expert mode: empty (hivemind keeps the zero moments it
    made itself, and `Trainer._restore` takes only the model version); local-expert mode: a fresh AdamW's state,
    which `LocalExpertsTrainer` loads as it is."""
    if config.training.mode != "local_experts":
        return {"state": {}, "param_groups": []}
    from dragon_swarm.training.optim import decay_param_groups
    from dragon_swarm.training.trainer import warmup_schedule

    t = config.training
    model = HRMSMoE(config.model, LocalExperts.from_config(config.model))
    inner = torch.optim.AdamW(decay_param_groups(model.named_trunk_parameters(), t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    torch.optim.lr_scheduler.LambdaLR(inner, warmup_schedule(t.warmup_steps))  # adds initial_lr, as the trainer's has
    return inner.state_dict()


def init_state_dir(model_path: Path, config: SwarmConfig, state_dir: Path, train: bool, host: bool, peer_id: str = "init-from") -> int:
    """Write the trainer checkpoint (if `train`) and the experts' checkpoints (if `host`) of the model file into a
    fresh `state_dir`; returns the model version the swarm continues from. Raises StartupError (one line)."""
    existing = existing_state(state_dir)
    if existing:
        raise StartupError(
            f"--init-from: --state-dir {state_dir} already holds {existing[0].name}{' and more' if len(existing) > 1 else ''} "
            "of an earlier run; use a fresh --state-dir for the new swarm"
        )
    model = read_model_file(model_path, config)
    if train:
        state = TrainerState(model.trunk, fresh_optimizer_state(config), {}, micro_batches=0, tokens=0, local_epoch=model.model_version)
        if not save_trainer_state(Path(state_dir) / CHECKPOINT_NAME, state, config.run_prefix, peer_id):
            raise StartupError(f"--init-from {model_path}: the trunk has non-finite values")
    if host:
        for uid, weights in model.experts.items():  # names and shapes: checked by read_model_file
            info = {"uid": uid, "version": 0, "tokens_processed": 0, "init_from_model_version": model.model_version}
            save_module_checkpoint(Path(state_dir) / EXPERTS_DIR / f"{uid}.safetensors", weights, None, info)
    logger.info(
        f"Starting from {model_path}: model version {model.model_version} "
        f"({'trunk' if train else ''}{' and ' if train and host else ''}{f'{len(model.experts)} experts' if host else ''} written to {state_dir})"
    )
    return model.model_version
