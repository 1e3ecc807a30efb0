"""The live status of one peer (or of the swarm, for a bootstrap monitor): the single source every view reads.

Subscribers to the event bus (`dragon_swarm.events`) write into a `PeerStatus`; the panel, the dashboard and
`/metrics` only read `PeerStatus.snapshot()`, a plain JSON-ready dict, so every view shows the same numbers.

Vocabulary (as in `dragon_swarm.events`): a *micro-batch* is one forward/backward pass of this peer; an *epoch*
is one swarm-wide optimizer step, i.e. the model version.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from dragon_swarm.events import PeerState

__all__ = [
    "Contribution",
    "ExpertCell",
    "LeaderboardRow",
    "ModelProgress",
    "PeerState",  # re-exported: it lives in dragon_swarm.events
    "PeerStatus",
    "SwarmStats",
]

HISTORY_POINTS = 600
EVENT_LINES = 200


@dataclass
class ModelProgress:
    global_epoch: int = 0  # swarm-wide optimizer steps (the model version)
    local_epoch: int = 0
    samples_accumulated: int = 0  # swarm samples toward the next global step
    target_batch_size: int = 0


@dataclass
class Contribution:
    micro_batches: int = 0  # micro-batches this peer trained, across restarts
    tokens: int = 0
    expert_requests: int = 0  # forward + backward requests its experts answered
    uptime_s: float = 0.0  # total across restarts
    badge: str | None = None


@dataclass
class SwarmStats:
    peers_alive: int = 0  # peers with a live contribution record
    trainers: int = 0  # trainers in the optimizer's progress tracker
    experts_online: int = 0
    experts_total: int = 0
    replicas: int = 0  # (expert, host) pairs online
    swarm_tokens: int = 0  # sum over contribution records
    banned_peers: list[str] = field(default_factory=list)


@dataclass
class ExpertCell:
    uid: str
    hosts: int  # live replicas
    online: bool


@dataclass
class LeaderboardRow:
    name: str
    peer_id: str
    tokens: int
    batches: int
    expert_requests: int
    uptime_s: float
    badge: str | None


class PeerStatus:
    """Thread-safe status board. Writers: the peer's event subscribers. Readers: `snapshot()` only."""

    def __init__(self, name: str, peer_id: str, swarm: str, role: str = "peer", read_only: bool = False):
        self._lock = threading.Lock()
        self.name, self.peer_id, self.swarm, self.role, self.read_only = name, peer_id, swarm, role, read_only
        self.started = time.time()
        self.state = PeerState.JOINING
        self.paused = False
        self.model = ModelProgress()
        self.contribution = Contribution()
        self.swarm_stats = SwarmStats()
        self.micro_batches = 0
        self.loss: float | None = None
        self.tokens_per_second: float | None = None
        self.history: deque[dict[str, float]] = deque(maxlen=HISTORY_POINTS)
        self.history_x = "micro_batches"  # what a history point's "x" counts: "micro_batches" or "epoch"
        # held-out loss by model version (this trainer's, or on a monitor the median over trainers), oldest first
        self.val_history: deque[dict[str, float]] = deque(maxlen=HISTORY_POINTS)
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENT_LINES)
        self.expert_map: list[ExpertCell] = []
        self.leaderboard: list[LeaderboardRow] = []
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    # --- writers ---

    def set_state(self, state: PeerState) -> None:
        with self._lock:
            self.state = PeerState(state)

    def set_paused(self, paused: bool) -> None:
        with self._lock:
            self.paused = paused

    def record_event(self, message: str, when: float | None = None) -> None:
        """One line of the activity log (the same lines the peer logs at INFO and above)."""
        event = {"t": time.time() if when is None else when, "message": message}
        with self._lock:
            self.events.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)

    def add_event_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def record_step(
        self, micro_batches: int, loss: float, tokens_per_second: float, when: float | None = None, epoch: int | None = None
    ) -> None:
        """This peer trained a micro-batch: `micro_batches` is its running count, the charts' x; `epoch` (the model
        version it trained) lets a chart put training loss beside the held-out loss."""
        with self._lock:
            self.micro_batches = micro_batches
            self._record_point("micro_batches", micro_batches, loss, tokens_per_second, when)
            if epoch is not None:
                self.history[-1]["epoch"] = epoch

    def record_val_loss(self, epoch: int, loss: float, when: float | None = None) -> None:
        """The held-out loss of model version `epoch`; a newer value for a version already shown replaces it (a
        monitor's median changes as more trainers report that version)."""
        point = {"t": time.time() if when is None else when, "x": epoch, "val_loss": loss}
        with self._lock:
            for i, old in enumerate(self.val_history):
                if old["x"] == epoch:
                    self.val_history[i] = point
                    break
            else:
                self.val_history.append(point)
                if len(self.val_history) > 1 and self.val_history[-2]["x"] > epoch:  # a late report of an old version
                    self.val_history = deque(sorted(self.val_history, key=lambda p: p["x"]), maxlen=HISTORY_POINTS)

    def record_swarm_point(self, epoch: int, loss: float, tokens_per_second: float, when: float | None = None) -> None:
        """A bootstrap monitor's view of the swarm: its median loss and tokens/s at model version `epoch`."""
        with self._lock:
            self._record_point("epoch", epoch, loss, tokens_per_second, when)

    def _record_point(self, x_name: str, x: int, loss: float, tokens_per_second: float, when: float | None) -> None:
        self.loss, self.tokens_per_second, self.history_x = loss, tokens_per_second, x_name
        self.history.append(
            {"t": time.time() if when is None else when, "x": x, "loss": loss, "tokens_per_second": tokens_per_second}
        )

    def update_model(self, **fields: int) -> None:
        with self._lock:
            self.model = ModelProgress(**{**asdict(self.model), **fields})

    def update_contribution(self, **fields: Any) -> None:
        """Fields of `Contribution`: micro_batches, tokens, expert_requests, uptime_s, badge."""
        with self._lock:
            self.contribution = Contribution(**{**asdict(self.contribution), **fields})

    def update_swarm(
        self,
        stats: SwarmStats | None = None,
        expert_map: list[ExpertCell] | None = None,
        leaderboard: list[LeaderboardRow] | None = None,
    ) -> None:
        with self._lock:
            if stats is not None:
                self.swarm_stats = stats
            if expert_map is not None:
                self.expert_map = list(expert_map)
            if leaderboard is not None:
                self.leaderboard = list(leaderboard)

    # --- reader ---

    def _held_out_locked(self) -> dict[str, Any]:
        latest = self.val_history[-1] if self.val_history else None
        return {
            "loss": None if latest is None else latest["val_loss"],
            "model_version": None if latest is None else latest["x"],
            "history": list(self.val_history),
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything a view shows, as plain JSON-ready data; views rely on these keys.

        `training`: micro_batches (this peer's count), loss and tokens_per_second of the latest point (None
        before the first). `held_out`: loss and model_version of the latest held-out evaluation (None before the
        first) and its history, points {t, x (the model version), val_loss}. `history`: points {t, x, loss, tokens_per_second}, oldest first, where `x` counts
        what `history_x` names: "micro_batches" for a peer, "epoch" (the model version) for a monitor.
        """
        with self._lock:
            return {
                "role": self.role,
                "read_only": self.read_only,
                "name": self.name,
                "peer_id": self.peer_id,
                "swarm": self.swarm,
                "state": self.state.value,
                "paused": self.paused,
                "uptime_s": time.time() - self.started,
                "model": asdict(self.model),
                "training": {
                    "micro_batches": self.micro_batches,
                    "loss": self.loss,
                    "tokens_per_second": self.tokens_per_second,
                },
                "contribution": asdict(self.contribution),
                "swarm_stats": asdict(self.swarm_stats),
                "history": list(self.history),
                "history_x": self.history_x,
                "held_out": self._held_out_locked(),
                "expert_map": [asdict(c) for c in self.expert_map],
                "leaderboard": [asdict(r) for r in self.leaderboard],
                "events": list(self.events),
            }
