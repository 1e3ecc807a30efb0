"""What a peer's parts tell each other: its state, the Start/Stop gate and typed events on one bus.

The trainer and the expert host *publish* (`EventBus.publish`); the status board, panel, dashboard, `/metrics`,
stats file and contribution counters *subscribe*. This module sits at the bottom of the package: it imports
nothing from dragon_swarm, so `training/` and `moe/` can report without knowing who listens.

Vocabulary used in every event and view: a *micro-batch* is one forward/backward pass of one peer on its own
data; an *epoch* (hivemind's word) is one swarm-wide optimizer step, i.e. the model version.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, TypeVar

logger = logging.getLogger(__name__)


class PeerState(str, Enum):
    IDLE = "IDLE"  # started, or paused by the volunteer (Stop button): not stepping
    JOINING = "JOINING"  # connecting to the DHT, finding experts
    SYNCING = "SYNCING"  # downloading the swarm's model state
    TRAINING = "TRAINING"  # computing micro-batches
    AVERAGING = "AVERAGING"  # all-reducing with other trainers (a global step)
    HOSTING = "HOSTING"  # serving experts only (--no-train)
    MONITORING = "MONITORING"  # a bootstrap monitor: watches the swarm, trains nothing
    STOPPING = "STOPPING"  # finishing the step, saving, leaving


@dataclass(frozen=True)
class StateChanged:
    state: PeerState


@dataclass(frozen=True)
class StepReport:
    """One micro-batch trained by this peer (published after the optimizer call that follows it)."""

    micro_batches: int  # micro-batches this peer has trained, across restarts
    epoch: int  # this peer's model version (swarm-wide optimizer steps it has applied)
    loss: float  # cross-entropy of this micro-batch, nats/token
    aux_loss: float
    tokens: int  # tokens this peer has trained on, across restarts
    batch_tokens: int  # tokens in this micro-batch
    samples_per_second: float
    tokens_per_second: float
    peers: int  # trainers in the swarm's progress tracker
    experts_online: int
    expert_failures: int
    banned_peers: tuple[str, ...]  # trainers this peer currently refuses in averaging
    rejected_parts: int  # invalid gradient parts received so far (wrong size/dtype, NaN, Inf)
    global_epoch: int  # the swarm's epoch as this peer's progress tracker sees it
    samples_accumulated: int  # swarm samples toward the next global step
    target_batch_size: int
    # held-out loss of model version `epoch` (nats/token, `training.evaluation`), None when this micro-batch did
    # not evaluate; eval_seconds is what that evaluation took (not part of samples/tokens_per_second)
    val_loss: float | None = None
    eval_seconds: float | None = None
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class HostReport:
    """Cumulative counters of this peer's expert host since it started (published every few seconds and once
    more when the host stops)."""

    experts_served: int
    tokens_processed: int
    requests_served: int  # forward and backward batches its experts ran
    updates: int  # optimizer steps applied to its experts


@dataclass(frozen=True)
class BanReport:
    """This peer started refusing another trainer in averaging."""

    peer_id: str
    seconds: float
    reason: str


@dataclass(frozen=True)
class ExpertBanReport:
    """This trainer refused an expert host's output as Byzantine (too large, non-finite, misshapen, or outvoted by
    other replicas) and stopped calling that host for that expert."""

    peer_id: str  # the host
    uid: str  # the expert it lied about
    seconds: float  # ban length
    reason: str
    calls: int  # calls this trainer had sent that host when it was banned


@dataclass(frozen=True)
class PauseRequested:
    """The volunteer pressed Stop (paused=True) or Start; the trainer acts on it at its next step boundary."""

    paused: bool


@dataclass(frozen=True)
class Paused:
    """The trainer (or a host-only peer) has stopped at a step boundary and saved its state."""


@dataclass(frozen=True)
class Resumed:
    """Work goes on after a pause."""


E = TypeVar("E")


class EventBus:
    """Synchronous publish/subscribe: handlers run in the publisher's thread, in subscription order.

    A handler must be quick (it runs inside the training loop); one that raises is logged and skipped, so a broken
    view can never stop training.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handlers: list[tuple[tuple[type, ...], Callable[[object], None]]] = []

    def subscribe(self, handler: Callable[[E], None], *event_types: type[E]) -> Callable[[], None]:
        """Call `handler(event)` for every published event of these types (all events when none are given).
        Returns a function that unsubscribes it."""
        entry = (tuple(event_types), handler)
        with self._lock:
            self._handlers.append(entry)

        def unsubscribe() -> None:
            with self._lock:
                if entry in self._handlers:
                    self._handlers.remove(entry)

        return unsubscribe

    def publish(self, event: object) -> None:
        with self._lock:
            handlers = list(self._handlers)
        for types, handler in handlers:
            if types and not isinstance(event, types):
                continue
            try:
                handler(event)
            except Exception:
                logger.exception(f"Event handler {getattr(handler, '__qualname__', handler)!r} failed on {type(event).__name__}")


class PauseGate:
    """Start/Stop: `pause()` lets the current step finish, then the trainer waits in `wait_until_running`."""

    def __init__(self, bus: EventBus | None = None) -> None:
        self._running = threading.Event()
        self._running.set()
        self._bus = bus

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def pause(self) -> None:
        was_paused = self.paused
        self._running.clear()
        if not was_paused and self._bus is not None:
            self._bus.publish(PauseRequested(True))

    def resume(self) -> None:
        was_paused = self.paused
        self._running.set()
        if was_paused and self._bus is not None:
            self._bus.publish(PauseRequested(False))

    def wait_until_running(self, stop: threading.Event, poll_s: float = 0.2) -> bool:
        """Block while paused; True when work may go on, False when `stop` was set meanwhile."""
        while not self._running.wait(poll_s):
            if stop.is_set():
                return False
        return not stop.is_set()
