"""The live status of one peer (or of the swarm, for a bootstrap monitor): the single source every view reads.

The peer's threads write into a `PeerStatus`; the panel, the dashboard and `/metrics` only read
`PeerStatus.snapshot()`, a plain JSON-ready dict, so every view shows the same numbers.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class PeerState(str, Enum):
    IDLE = "IDLE"  # started, or paused by the volunteer (Stop button): not stepping
    JOINING = "JOINING"  # connecting to the DHT, finding experts
    SYNCING = "SYNCING"  # downloading the swarm's model state
    TRAINING = "TRAINING"  # computing micro-batches
    AVERAGING = "AVERAGING"  # all-reducing with other trainers (a global step)
    HOSTING = "HOSTING"  # serving experts only (--no-train)
    MONITORING = "MONITORING"  # a bootstrap monitor: watches the swarm, trains nothing
    STOPPING = "STOPPING"  # finishing the step, saving, leaving


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
    steps: int = 0  # micro-batches this peer trained (its "batches")
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
    """Thread-safe status board. Writers: the peer's threads. Readers: `snapshot()` only."""

    def __init__(self, name: str, peer_id: str, swarm: str, role: str = "peer", read_only: bool = False):
        self._lock = threading.Lock()
        self.name, self.peer_id, self.swarm, self.role, self.read_only = name, peer_id, swarm, role, read_only
        self.started = time.time()
        self.state = PeerState.JOINING
        self.paused = False
        self.model = ModelProgress()
        self.contribution = Contribution()
        self.swarm_stats = SwarmStats()
        self.step = 0
        self.loss: float | None = None
        self.tokens_per_second: float | None = None
        self.history: deque[dict[str, float]] = deque(maxlen=HISTORY_POINTS)
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENT_LINES)
        self.expert_map: list[ExpertCell] = []
        self.leaderboard: list[LeaderboardRow] = []
        self._listeners: list = []

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

    def add_event_listener(self, listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def record_step(self, step: int, loss: float, tokens_per_second: float, when: float | None = None) -> None:
        with self._lock:
            self.step, self.loss, self.tokens_per_second = step, loss, tokens_per_second
            self.history.append(
                {"t": time.time() if when is None else when, "step": step, "loss": loss, "tokens_per_second": tokens_per_second}
            )

    def update_model(self, **fields: int) -> None:
        with self._lock:
            self.model = ModelProgress(**{**asdict(self.model), **fields})

    def update_contribution(self, **fields: Any) -> None:
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

    def snapshot(self) -> dict[str, Any]:
        """Everything a view shows, as plain JSON-ready data (see the keys below; views rely on them)."""
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
                "training": {"step": self.step, "loss": self.loss, "tokens_per_second": self.tokens_per_second},
                "contribution": asdict(self.contribution),
                "swarm_stats": asdict(self.swarm_stats),
                "history": list(self.history),
                "expert_map": [asdict(c) for c in self.expert_map],
                "leaderboard": [asdict(r) for r in self.leaderboard],
                "events": list(self.events),
            }


class TrainingSwitch:
    """Start/Stop from the dashboard: Stop lets the current step finish, then the trainer waits here."""

    def __init__(self, status: PeerStatus | None = None):
        self._running = threading.Event()
        self._running.set()
        self.status = status

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def pause(self) -> None:
        if not self.paused and self.status is not None:
            self.status.record_event("Paused by the volunteer: training stops after this step")
        self._running.clear()
        if self.status is not None:
            self.status.set_paused(True)

    def resume(self) -> None:
        if self.paused and self.status is not None:
            self.status.record_event("Resumed by the volunteer")
        self._running.set()
        if self.status is not None:
            self.status.set_paused(False)

    def wait_until_running(self, stop: threading.Event, poll_s: float = 0.2) -> bool:
        """Block while paused; True when training may go on, False when `stop` was set meanwhile."""
        while not self._running.wait(poll_s):
            if stop.is_set():
                return False
        return not stop.is_set()
