"""The last K model versions of a trainer's trunk, kept for rollback: `<state-dir>/versions/trainer-v<epoch>.safetensors`.

Each file has the layout of the trainer checkpoint (`training.checkpoint`: `read_trainer_state` reads it, so does
`python -m dragon_swarm.export --from-state-dir DIR --model-version N`) with the trunk and counters only: the
optimizer state is left out, since a rollback restarts the optimizer anyway and it would triple the size. A version is
written once, when the trainer first sees it (after the swarm's step or a state download), atomically; the oldest
beyond K are deleted after the new one is safely on disk.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

from dragon_swarm.training.checkpoint import TrainerState, save_trainer_state

logger = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
_NAME = re.compile(r"^trainer-v(\d+)\.safetensors$")


def version_path(state_dir: Path, epoch: int) -> Path:
    return Path(state_dir) / VERSIONS_DIR / f"trainer-v{epoch}.safetensors"


def kept_versions(state_dir: Path) -> list[int]:
    """The model versions kept in `state_dir`, oldest first."""
    folder = Path(state_dir) / VERSIONS_DIR
    if not folder.is_dir():
        return []
    found = (_NAME.match(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def trunk_only(state: TrainerState) -> TrainerState:
    """`state` without optimizer state and worker momentum: what a kept version holds."""
    return TrainerState(
        state.trunk, {"state": {}, "param_groups": []}, {}, state.micro_batches, state.tokens, state.local_epoch,
        val_loss=state.val_loss, val_epoch=state.val_epoch,
    )  # fmt: skip


class VersionKeeper:
    """`maybe_keep(epoch, make_state)` after every micro-batch: writes the version when it is new. keep 0: off."""

    def __init__(self, state_dir: Path, keep: int, run_prefix: str, peer_id: str):
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.state_dir, self.keep, self.run_prefix, self.peer_id = Path(state_dir), keep, run_prefix, peer_id
        self._last: int | None = None

    def maybe_keep(self, epoch: int, make_state: Callable[[], TrainerState]) -> bool:
        """Write version `epoch` unless it is the one written last or already on disk; True when written. Never
        raises for a full disk or the like: versions are a convenience, training must go on."""
        if self.keep == 0 or epoch == self._last:
            return False
        self._last = epoch
        path = version_path(self.state_dir, epoch)
        if path.exists():  # kept before a restart
            return False
        try:
            if not save_trainer_state(path, trunk_only(make_state()), self.run_prefix, self.peer_id):
                return False  # a non-finite trunk: save_trainer_state said so
            self._rotate()
        except OSError as e:
            logger.warning(f"Keeping model version {epoch} failed: {e}")
            return False
        return True

    def _rotate(self) -> None:
        for epoch in kept_versions(self.state_dir)[: -self.keep]:
            version_path(self.state_dir, epoch).unlink(missing_ok=True)
