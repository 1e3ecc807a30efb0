"""Everything a volunteer sees and controls, owned in one place: status board, panel, dashboard, contributions.

The peer builds a `VolunteerSession` before it joins (so the panel shows JOINING), `attach()`es it to the DHT once
joined (contribution records and the swarm view need the DHT), hands `hooks()` to the trainer, and `shutdown()`s
it last. Nothing here decides anything about training; it reports and relays Start/Stop.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

import hivemind

from dragon_swarm.config import SwarmConfig
from dragon_swarm.monitor.dashboard import Dashboard
from dragon_swarm.monitor.status import PeerState, PeerStatus, TrainingSwitch
from dragon_swarm.monitor.swarm_view import SwarmWatcher
from dragon_swarm.swarm.contributions import (
    ContributionCounters,
    ContributionPublisher,
    Role,
    badge_for,
    default_public_name,
)

logger = logging.getLogger(__name__)

COUNTERS_FILE = "contributions.json"


class VolunteerSession:
    """:param dashboard: (host, port) to serve the web dashboard on, or None
    :param panel: draw the live terminal panel (only when stdout is a terminal; see `panel.should_use_panel`)
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
        read_only: bool = False,
        swarm_refresh_s: float = 10.0,
        publish_period_s: float = 15.0,
    ):
        self.config, self.state_dir, self.role = config, state_dir, role
        self._name = name
        self.status = PeerStatus(name or "", "", config.run_prefix, role="monitor" if read_only else "peer", read_only=read_only)
        self.switch = None if read_only else TrainingSwitch(self.status)
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
        self._counting_host_requests: threading.Thread | None = None
        self._stop = threading.Event()
        self.banned_peers: Callable[[], list[str]] = lambda: []
        self._dht: hivemind.DHT | None = None
        self._published_on_leaving = False

    # --- before joining ---

    def start_display(self) -> None:
        """Panel (if wanted and stdout is a terminal) and the activity log; the dashboard comes with `attach`."""
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
            banned_peers=lambda: self.banned_peers(), local_record=self._local_record,
        )  # fmt: skip
        self.watcher.start()
        if self._dashboard_address is not None:
            host, port = self._dashboard_address
            self.dashboard = Dashboard(self.status, self.switch, host, port)
            self.dashboard.start()

    def _local_record(self):
        if self.counters is None or self.publisher is None:
            return None
        return self.counters.to_record(self.status.peer_id, self.status.name, self.role)

    def count_host_requests(self, host) -> None:
        """Add the expert host's served requests to the counters every few seconds."""

        def loop() -> None:
            seen = int(host.stats()["expert_requests"])
            while True:
                leaving = self._stop.wait(5.0)
                now = int(host.stats()["expert_requests"])
                if now > seen and self.counters is not None:
                    self.counters.add_expert_requests(now - seen)
                    self.show_counters()
                seen = now
                if leaving:  # one last count, so that what was served since the previous one is saved too
                    return

        self._counting_host_requests = threading.Thread(target=loop, name="host-request-counter", daemon=True)
        self._counting_host_requests.start()

    def show_counters(self) -> None:
        """The contribution counters onto the status board (the trainer calls this after every step)."""
        c = self.counters
        self.status.update_contribution(
            steps=c.batches, tokens=c.tokens, expert_requests=c.expert_requests, uptime_s=c.uptime_s(), badge=badge_for(c.batches)
        )

    def set_role(self, role: Role) -> None:
        self.role = role
        if self.publisher is not None:
            self.publisher.role = role

    def set_state(self, state: PeerState) -> None:
        self.status.set_state(state)

    # --- leaving ---

    def publish_and_save(self, timeout_s: float = 15.0) -> None:
        """Counters to disk, then the record to the DHT (on Stop and on the way out). The disk comes first and the
        DHT call is bounded: a DHT process that died under us (hivemind's can, while averagers shut down) would
        otherwise block the peer from leaving."""
        if self.counters is not None and self.counters_path is not None:
            try:
                self.counters.save(self.counters_path)
            except OSError as e:
                logger.error(f"Saving contribution counters failed: {e}")
        if self.publisher is None or self._dht is None or not self._dht.is_alive():
            return

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

    def leave(self) -> None:
        """Stop background DHT traffic and publish the final record; call while the DHT is still healthy, before
        the trainer and host shut down (idempotent; `shutdown` calls it if the peer did not)."""
        if self._published_on_leaving:
            return
        self._published_on_leaving = True
        self._stop.set()
        if self._counting_host_requests is not None:
            self._counting_host_requests.join(timeout=10.0)
        self.status.set_state(PeerState.STOPPING)
        for part in (self.publisher, self.watcher):  # no periodic DHT calls from here on
            if part is not None:
                try:
                    part.shutdown()
                except Exception as e:
                    logger.debug(f"{type(part).__name__} shutdown: {e!r}")
        if self.counters is not None and self.publisher is not None:  # joined: otherwise there is nothing to tell
            self.show_counters()
            self.publish_and_save()
            logger.info(
                f"Contribution saved: {self.counters.batches:,} batches, {self.counters.tokens:,} tokens, "
                f"{self.counters.expert_requests:,} expert requests, uptime {self.counters.uptime_s() / 3600:.2f} h"
            )

    def shutdown(self) -> None:
        self.leave()
        for part in (self.dashboard,):
            if part is not None:
                try:
                    part.shutdown()
                except Exception as e:
                    logger.debug(f"{type(part).__name__} shutdown: {e!r}")
        if self.panel is not None:
            self.panel.shutdown()
        if self._undo_logging is not None:
            self._undo_logging()
        if self._event_handler is not None:
            logging.getLogger().removeHandler(self._event_handler)
