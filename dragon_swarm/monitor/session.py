"""Everything a volunteer sees and controls, fed by events: status board, panel, dashboard, contribution counters.

The node builds a `VolunteerSession` before it joins (so the panel shows JOINING), opens the dashboard early (a
taken port is a cheap, early error), `attach()`es it to the DHT once joined (contribution records and the swarm
view need the DHT), and `shutdown()`s it last. The session subscribes to the events the trainer and the host
publish on the bus; nothing here decides anything about training: it reports and relays Start/Stop (the gate).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

import hivemind

from dragon_swarm.config import SwarmConfig
from dragon_swarm.events import (
    EventBus,
    ExpertBanReport,
    HostReport,
    Paused,
    PauseGate,
    PauseRequested,
    PeerState,
    StateChanged,
    StepReport,
)
from dragon_swarm.monitor.dashboard import Dashboard
from dragon_swarm.monitor.leaderboard import badge_for
from dragon_swarm.monitor.status import PeerStatus
from dragon_swarm.monitor.swarm_view import SwarmWatcher
from dragon_swarm.swarm.contributions import Role, default_public_name
from dragon_swarm.swarm.counters import ContributionCounters, ContributionPublisher

logger = logging.getLogger(__name__)

COUNTERS_FILE = "contributions.json"


class VolunteerSession:
    """:param dashboard: (host, port) to serve the web dashboard on, or None
    :param panel: draw the live terminal panel (only when stdout is a terminal; see `panel.should_use_panel`)
    :param bus: where the trainer and host publish; the session subscribes at construction
    :param gate: the Start/Stop gate the dashboard drives (made here if not given)
    :param read_only: a monitor: the dashboard has no Start/Stop and nothing is trained
    """

    def __init__(
        self,
        config: SwarmConfig,
        state_dir: Path | None,
        name: str | None,
        role: Role,
        dashboard: tuple[str, int] | None,
        panel: bool,
        *,
        bus: EventBus | None = None,
        gate: PauseGate | None = None,
        read_only: bool = False,
        swarm_refresh_s: float = 10.0,
        publish_period_s: float = 15.0,
    ):
        self.config, self.state_dir, self.role = config, state_dir, role
        self._name = name
        self.bus = bus if bus is not None else EventBus()
        self.status = PeerStatus(name or "", "", config.run_prefix, role="monitor" if read_only else "peer", read_only=read_only)
        self.gate = None if read_only else (gate if gate is not None else PauseGate(self.bus))
        self.counters_path = None if state_dir is None else state_dir / COUNTERS_FILE
        self.counters = ContributionCounters.load(self.counters_path, config.run_prefix) if self.counters_path else None
        self._dashboard_address, self._want_panel = dashboard, panel
        self._swarm_refresh_s, self._publish_period_s = swarm_refresh_s, publish_period_s  # see attach()
        self.dashboard: Dashboard | None = None
        self.panel = None
        self._undo_logging: Callable[[], None] | None = None
        self._event_handler: logging.Handler | None = None
        self.publisher: ContributionPublisher | None = None
        self.watcher: SwarmWatcher | None = None
        self._dht: hivemind.DHT | None = None
        self._banned_peers: tuple[str, ...] = ()
        self._requests_reported = 0  # the host's cumulative count at its last report
        self.expert_bans = 0  # expert hosts this trainer refused as Byzantine (ExpertBanReport)
        self._left = False
        self._unsubscribe = [
            self.bus.subscribe(self._on_state, StateChanged),
            self.bus.subscribe(self._on_step, StepReport),
            self.bus.subscribe(self._on_host_report, HostReport),
            self.bus.subscribe(self._on_expert_ban, ExpertBanReport),
            self.bus.subscribe(self._on_pause_requested, PauseRequested),
            self.bus.subscribe(self._on_paused, Paused),
        ]

    # --- before joining ---

    def start_display(self) -> None:
        """Panel (if wanted and stdout is a terminal) and the activity log."""
        from dragon_swarm.monitor.panel import PanelLogHandler, TerminalPanel, install_panel_logging, should_use_panel

        if self._want_panel and should_use_panel():
            self._undo_logging = install_panel_logging(self.status)
            self.panel = TerminalPanel(self.status)
            self.panel.start()
        else:  # plain log lines stay; the dashboard's activity log still gets every INFO+ line
            self._event_handler = PanelLogHandler(self.status, logging.INFO)
            self._event_handler.setFormatter(logging.Formatter("%(message)s"))
            logging.getLogger().addHandler(self._event_handler)
        if self.counters is not None:
            self.show_counters()

    def start_dashboard(self) -> None:
        """Serve the dashboard if one was asked for. Raises OSError when the port is taken or not ours."""
        if self._dashboard_address is not None and self.dashboard is None:
            host, port = self._dashboard_address
            self.dashboard = Dashboard(self.status, self.gate, host, port)
            self.dashboard.start()

    # --- once joined ---

    def attach(self, dht: hivemind.DHT, update_model_from_dht: bool) -> None:
        self._dht = dht
        peer_id = dht.peer_id.to_base58()
        self.status.peer_id = peer_id
        self.status.name = self._name or default_public_name(peer_id)
        if self.counters is not None:
            self.publisher = ContributionPublisher(
                dht, self.config.run_prefix, self.counters, self.counters_path, self.status.name, self.role,
                period_s=self._publish_period_s, expiration_s=max(4 * self._publish_period_s, 60.0),
            )  # fmt: skip
            self.publisher.start()
        self.watcher = SwarmWatcher(
            dht, self.config, self.status, self._swarm_refresh_s, update_model=update_model_from_dht,
            banned_peers=lambda: list(self._banned_peers), local_record=self._local_record,
        )  # fmt: skip
        self.watcher.start()
        self.start_dashboard()

    def _local_record(self):
        if self.counters is None or self.publisher is None:
            return None
        return self.counters.to_record(self.status.peer_id, self.status.name, self.role)

    def show_counters(self) -> None:
        """The contribution counters onto the status board."""
        c = self.counters
        self.status.update_contribution(
            micro_batches=c.batches, tokens=c.tokens, expert_requests=c.expert_requests, uptime_s=c.uptime_s(), badge=badge_for(c.batches)
        )

    def set_role(self, role: Role) -> None:
        self.role = role
        if self.publisher is not None:
            self.publisher.role = role

    # --- event handlers (run in the publisher's thread: quick) ---

    def _on_state(self, event: StateChanged) -> None:
        self.status.set_state(event.state)

    def _on_step(self, report: StepReport) -> None:
        self._banned_peers = report.banned_peers
        self.status.record_step(report.micro_batches, report.loss, report.tokens_per_second, when=report.time, epoch=report.epoch)
        if report.val_loss is not None:
            self.status.record_val_loss(report.epoch, report.val_loss, when=report.time)
        self.status.update_model(
            global_epoch=report.global_epoch,
            local_epoch=report.epoch,
            samples_accumulated=report.samples_accumulated,
            target_batch_size=report.target_batch_size,
        )
        if self.counters is not None:
            self.counters.add_batch(tokens=report.batch_tokens)
            self.counters.set_loss(report.loss)
            if report.val_loss is not None:  # published for the bootstrap monitor's median by model version
                self.counters.set_val_loss(report.epoch, report.val_loss)
            self.show_counters()

    def _on_host_report(self, report: HostReport) -> None:
        served, self._requests_reported = report.requests_served - self._requests_reported, report.requests_served
        if served > 0 and self.counters is not None:
            self.counters.add_expert_requests(served)
            self.show_counters()

    def _on_expert_ban(self, event: ExpertBanReport) -> None:
        self.expert_bans += 1
        self.status.record_event(
            f"Expert host {event.peer_id[-8:]} banned from {event.uid} for {event.seconds:.0f} s: {event.reason} "
            f"({self.expert_bans} expert ban(s) so far)"
        )

    def _on_pause_requested(self, event: PauseRequested) -> None:
        self.status.record_event(
            "Paused by the volunteer: training stops after this step" if event.paused else "Resumed by the volunteer"
        )
        self.status.set_paused(event.paused)

    def _on_paused(self, event: Paused) -> None:
        self.publish_and_save()

    # --- leaving ---

    def publish_and_save(self, timeout_s: float = 15.0) -> bool:
        """Counters to disk, then the record to the DHT (on Stop and on the way out). The disk comes first and the
        DHT call is bounded: a DHT process that died under us (hivemind's can, while averagers shut down) would
        otherwise block the peer from leaving. True when the counters reached the disk."""
        saved = False
        if self.counters is not None and self.counters_path is not None:
            try:
                self.counters.save(self.counters_path)
                saved = True
            except OSError as e:
                logger.error(f"Saving contribution counters failed: {e}")
        if self.publisher is None or self._dht is None or not self._dht.is_alive():
            return saved

        def publish() -> None:
            try:
                self.publisher.publish_now()
            except Exception as e:  # leaving must go on
                logger.warning(f"Publishing contribution failed: {e}")

        thread = threading.Thread(target=publish, name="final-contribution", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            logger.warning(f"Publishing the contribution record took over {timeout_s:.0f} s; it is saved on disk")
        return saved

    def leave(self, save: bool = True) -> None:
        """Stop background DHT traffic and publish the final record; call while the DHT is still healthy, after the
        host's final report and before the trainer and host shut down (idempotent; `shutdown` calls it too).
        `save=False` after a failed start: nothing was contributed, so nothing is written."""
        if self._left:
            return
        self._left = True
        self.status.set_state(PeerState.STOPPING)
        for part in (self.publisher, self.watcher):  # no periodic DHT calls from here on
            if part is not None:
                part.stop()
        if save and self.counters is not None and self.publisher is not None:  # joined: else there is nothing to tell
            self.show_counters()
            saved = self.publish_and_save()
            logger.info(
                f"Contribution {'saved' if saved else 'published (not saved: see above)'}: {self.counters.batches:,} micro-batches, {self.counters.tokens:,} tokens, "
                f"{self.counters.expert_requests:,} expert requests, uptime {self.counters.uptime_s() / 3600:.2f} h"
            )

    def shutdown(self) -> None:
        self.leave()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        if self.dashboard is not None:
            try:
                self.dashboard.shutdown()
            except Exception as e:
                logger.debug(f"Dashboard shutdown: {e!r}")
        if self.panel is not None:
            self.panel.shutdown()
        if self._undo_logging is not None:
            self._undo_logging()
        if self._event_handler is not None:
            logging.getLogger().removeHandler(self._event_handler)
