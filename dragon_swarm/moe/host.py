"""Expert host: serves experts over hivemind's MoE RPC, trains them on every backward, announces them,
checkpoints them in safetensors.

Built from hivemind's pieces (ModuleBackend, ConnectionHandler, Runtime) instead of hivemind's Server,
because the Server announces with `declare_experts` (one host per uid) and checkpoints with torch.save.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Sequence

import hivemind
import torch
from hivemind.moe.server.runtime import Runtime
from hivemind.utils import get_dht_time

from dragon_swarm.background import PeriodicThread
from dragon_swarm.config import ExpertsSection
from dragon_swarm.events import EventBus, HostReport
from dragon_swarm.moe.backend import ExpertBackend, move_optimizer_state_to_parameters, save_expert
from dragon_swarm.moe.handler import ValidatingConnectionHandler
from dragon_swarm.moe.registry import ExpertHostRecord, declare_hosted_experts
from dragon_swarm.node.inherited_sockets import install_inherited_socket_drop

logger = logging.getLogger(__name__)


class ExpertAnnouncer(PeriodicThread):
    """Re-announces the host's experts (online, or offline while paused) before their records expire."""

    def __init__(self, host: "ExpertHost"):
        super().__init__("expert-announcer", host.settings.update_period)
        self.host = host

    def tick(self) -> None:
        self.host.announce("offline" if self.host.paused else "online")


class CheckpointSaver(PeriodicThread):
    """Saves every hosted expert (weights, optimizer state, update count) every `period_s` seconds."""

    def __init__(self, host: "ExpertHost", period_s: float):
        super().__init__("expert-checkpointer", period_s)
        self.host = host

    def tick(self) -> None:
        try:
            self.host.save_checkpoints()
        except OSError as e:
            logger.error(f"Saving expert checkpoints failed: {e}")


class HostReporter(PeriodicThread):
    """Publishes the host's counters (`report()`) as a `HostReport` every few seconds, and once more when stopped, so
    that what was served right before leaving is counted too."""

    def __init__(self, report: Callable[[], HostReport], bus: EventBus, period_s: float = 5.0):
        super().__init__("expert-host-reporter", period_s, final_tick=True)
        self.report, self.bus = report, bus

    def tick(self) -> None:
        self.bus.publish(self.report())


class ExpertHost:
    """Owns the runtime, connection handlers, the announcer, checkpoint and report threads of the experts it serves.

    Construct, then `start()`, then `shutdown()`; nothing starts in the constructor. Counters go out as
    `HostReport` events on `bus`.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        backends: dict[str, ExpertBackend],
        settings: ExpertsSection,
        hidden_dim: int,
        checkpoint_dir: Path | None,
        throughput: float,
        num_handlers: int = 2,
        checkpoint_period: float = 60.0,
        device: str = "cpu",
        bus: EventBus | None = None,
        adaptive: bool = False,
        report_source: Callable[[], HostReport] | None = None,
        surplus: Sequence[str] = (),
    ):
        self.dht, self.backends, self.settings = dht, backends, settings
        self.checkpoint_dir, self.throughput, self.checkpoint_period = checkpoint_dir, throughput, checkpoint_period
        self.bus = bus if bus is not None else EventBus()
        self.adaptive = adaptive  # announced: this host follows placement (takeover, rebalancing)
        self.surplus = frozenset(surplus)  # announced: held beyond the budget until another host serves them
        # what the reporter publishes: the owner's totals when this host is one generation of several (moe.hosting)
        self.report_source = report_source if report_source is not None else self.report
        max_tokens = min(backend.forward_pool.max_batch_size for backend in backends.values())
        self.handlers = [
            ValidatingConnectionHandler(dht, backends, hidden_dim=hidden_dim, max_tokens=max_tokens, max_requests_per_s=settings.max_requests_per_s / num_handlers)
            for _ in range(num_handlers)
        ]
        self.runtime = Runtime(backends, prefetch_batches=1, device=torch.device(device))
        self._paused = threading.Event()
        self._duties: list[PeriodicThread] = []

    @property
    def uids(self) -> list[str]:
        return list(self.backends)

    def save_checkpoints(self) -> None:
        if self.checkpoint_dir is None:
            return
        for uid, backend in self.backends.items():
            save_expert(self.checkpoint_dir / f"{uid}.safetensors", backend)

    def start(self) -> None:
        # a new generation forks while this peer serves state downloads: the children must not keep those streams open
        install_inherited_socket_drop()
        # handlers are forked processes: fork them before the runtime starts threads, as hivemind's Server does
        for handler in self.handlers:
            handler.run_in_background(await_ready=True, timeout=60)
        self.runtime.start()
        if not self.runtime.ready.wait(timeout=60):
            raise RuntimeError("expert runtime did not start within 60 s")
        for backend in self.backends.values():  # the runtime has moved the modules to their device by now
            move_optimizer_state_to_parameters(backend.optimizer)
        self.announce("online")
        self._duties = [ExpertAnnouncer(self), CheckpointSaver(self, self.checkpoint_period), HostReporter(self.report_source, self.bus)]
        for duty in self._duties:
            duty.start()
        logger.info(f"Serving {len(self.backends)} expert(s): {', '.join(self.uids)} ({self.throughput:.0f} tokens/s each)")

    def announce(self, state: str, uids: Sequence[str] | None = None) -> None:
        records = {
            uid: ExpertHostRecord(
                peer_id=self.dht.peer_id.to_base58(),
                state=state,
                throughput=float(self.throughput),
                version=backend.version,
                adaptive=self.adaptive,
                surplus=uid in self.surplus,
            )
            for uid, backend in self.backends.items()
            if uids is None or uid in uids
        }
        try:
            declare_hosted_experts(self.dht, records, expiration_time=get_dht_time() + self.settings.expiration)
        except Exception as e:  # a flaky DHT must not kill the host; the next period retries
            logger.warning(f"Announcing experts failed, will retry in {self.settings.update_period:.0f} s: {e}")

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def pause(self) -> None:
        """Stop offering the experts (the volunteer pressed Stop): save them and tell routers they are offline.
        Requests already on their way are still answered."""
        if self._paused.is_set():
            return
        self._paused.set()
        self.save_checkpoints()
        self.announce("offline")
        logger.info(f"Paused hosting: {len(self.backends)} expert(s) saved and announced offline")

    def resume(self) -> None:
        if not self._paused.is_set():
            return
        self._paused.clear()
        self.announce("online")
        logger.info(f"Resumed hosting {len(self.backends)} expert(s)")

    def report(self) -> HostReport:
        backends = list(self.backends.values())
        return HostReport(
            experts_served=len(backends),
            tokens_processed=sum(b.tokens_processed for b in backends),
            requests_served=sum(b.requests_served for b in backends),
            updates=sum(b.version for b in backends),
        )

    def stop_reporting(self) -> None:
        """Stop the background duties; the reporter publishes its final `HostReport` on the way out. The owner calls
        this before it publishes the peer's final contribution record."""
        for duty in self._duties:
            duty.stop()

    def shutdown(self, offline: Sequence[str] | None = None) -> None:
        """Save, announce `offline` (default: every expert) as offline, stop serving. A host replaced by another
        generation of the same peer (`moe.hosting`) announces only the experts it drops."""
        self.stop_reporting()
        self.save_checkpoints()  # first: nothing after this may lose the experts' progress
        if self.dht.is_alive():
            self.announce("offline", self.uids if offline is None else offline)
        for handler in self.handlers:
            if handler.is_alive():
                handler.shutdown()
        self.runtime.shutdown()
        self.runtime.join(timeout=10)
        logger.info(f"Expert host stopped; {len(self.backends)} checkpoint(s) saved")
