"""How the swarm is doing, read from signed DHT records only: expert replicas, trainers' progress, contributions.

`collect_swarm_view` is one read of the DHT; `SwarmWatcher` (a `PeriodicThread`) repeats it in the background and
writes the result into a `PeerStatus`. Peers and the bootstrap monitor use the same code, so both show the same
numbers.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import hivemind
from hivemind.optim.progress_tracker import LocalTrainingProgress

from dragon_swarm.averaging.robust_progress import supported_epoch
from dragon_swarm.background import PeriodicThread
from dragon_swarm.config import SwarmConfig
from dragon_swarm.moe.expert_uids import all_expert_uids
from dragon_swarm.moe.registry import find_replicas
from dragon_swarm.monitor.leaderboard import leaderboard, network_stats
from dragon_swarm.monitor.status import ExpertCell, LeaderboardRow, PeerStatus, SwarmStats
from dragon_swarm.swarm.contributions import ContributionRecord, fetch_contributions

logger = logging.getLogger(__name__)

SPEED_WINDOW_S = 60.0  # the monitor's swarm tokens/s is averaged over this long


@dataclass(frozen=True)
class SwarmProgress:
    trainers: int
    global_epoch: int  # the epoch most trainers agree on (robust_progress.supported_epoch)
    samples_accumulated: int  # toward the next global step, from trainers at that epoch


@dataclass(frozen=True)
class SwarmView:
    stats: SwarmStats
    expert_map: list[ExpertCell]
    leaderboard: list[LeaderboardRow]
    progress: SwarmProgress
    contributions: dict[str, ContributionRecord]
    median_loss: float | None  # over trainers' self-reported latest losses (display only)
    val_losses: dict[int, float]  # model version -> median held-out loss over the trainers that reported it


def median_loss(records: dict[str, ContributionRecord]) -> float | None:
    """Pure: the median of the reported losses; a few lying peers cannot move it far."""
    return _median([r.loss for r in records.values() if r.loss is not None])


def median_val_losses(records: dict[str, ContributionRecord]) -> dict[int, float]:
    """Pure: model version -> the median of the held-out losses trainers reported for that version (each record
    carries its trainer's latest evaluation only, so this is a median over the trainers that reported it)."""
    by_version: dict[int, list[float]] = {}
    for r in records.values():
        if r.val_loss is not None and r.val_epoch is not None:
            by_version.setdefault(r.val_epoch, []).append(r.val_loss)
    return {version: _median(losses) for version, losses in sorted(by_version.items())}


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def read_swarm_progress(dht: hivemind.DHT, run_prefix: str) -> SwarmProgress:
    """The trainers' progress records (hivemind's ProgressTracker key), summarized robustly."""
    entry = dht.get(f"{run_prefix}_progress", latest=True)
    reports: list[LocalTrainingProgress] = []
    if entry is not None and isinstance(entry.value, dict):
        for item in entry.value.values():
            try:
                progress = LocalTrainingProgress.parse_obj(item.value)
            except Exception:  # malformed or empty records are someone else's problem, not the monitor's
                continue
            if not progress.client_mode:
                reports.append(progress)
    return summarize_progress(reports)


def summarize_progress(reports: list[LocalTrainingProgress]) -> SwarmProgress:
    """Pure: the supported epoch and the samples gathered for it."""
    epoch = supported_epoch([r.epoch for r in reports], 0)
    samples = sum(r.samples_accumulated for r in reports if r.epoch == epoch)
    return SwarmProgress(trainers=len(reports), global_epoch=epoch, samples_accumulated=samples)


def collect_swarm_view(
    dht: hivemind.DHT,
    config: SwarmConfig,
    banned_peers: list[str] | None = None,
    local_record: ContributionRecord | None = None,
) -> SwarmView:
    """One read of the DHT. `local_record` (this peer's live counters) replaces its own published record, which
    is up to one publishing period old."""
    m = config.model
    uids = all_expert_uids(config.expert_prefix, m.num_moe_layers, m.num_experts)
    replicas = find_replicas(dht, uids)
    expert_map = [ExpertCell(uid=uid, hosts=len(replicas.get(uid, [])), online=bool(replicas.get(uid))) for uid in uids]
    records = fetch_contributions(dht, config.run_prefix)
    if local_record is not None:
        records[local_record.peer_id] = local_record
    totals = network_stats(records)
    progress = read_swarm_progress(dht, config.run_prefix)
    stats = SwarmStats(
        peers_alive=int(totals["peers_alive"]),
        trainers=progress.trainers,
        experts_online=sum(cell.online for cell in expert_map),
        experts_total=len(expert_map),
        replicas=sum(cell.hosts for cell in expert_map),
        swarm_tokens=int(totals["swarm_tokens"]),
        banned_peers=list(banned_peers or []),
    )
    return SwarmView(stats, expert_map, leaderboard(records), progress, records, median_loss(records), median_val_losses(records))


class SwarmWatcher(PeriodicThread):
    """Refreshes `status` from the DHT right after `start()` and then every `period_s` seconds in a daemon thread;
    `stop()` ends it.

    :param update_model: also set the model version and progress from the trainers' records (the bootstrap
      monitor and host-only peers; a trainer's own optimizer knows these better and sets them itself)
    :param banned_peers: returns this peer's current bans, shown in the swarm stats
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        config: SwarmConfig,
        status: PeerStatus,
        period_s: float = 10.0,
        update_model: bool = False,
        banned_peers: Callable[[], list[str]] | None = None,
        local_record: Callable[[], ContributionRecord | None] | None = None,
    ):
        super().__init__("swarm-watcher", period_s, first_tick_now=True)
        self.dht, self.config, self.status = dht, config, status
        self.update_model, self.banned_peers, self.local_record = update_model, banned_peers, local_record
        # (time, swarm tokens) over the last minute: records are republished every ~15 s, so a shorter window
        # sees bursts instead of the swarm's speed
        self._token_samples: deque[tuple[float, int]] = deque()
        self.last_view: SwarmView | None = None

    def refresh(self) -> SwarmView:
        view = collect_swarm_view(
            self.dht,
            self.config,
            self.banned_peers() if self.banned_peers else None,
            self.local_record() if self.local_record else None,
        )
        self.status.update_swarm(view.stats, view.expert_map, view.leaderboard)
        if self.update_model:
            self.status.update_model(
                global_epoch=view.progress.global_epoch,
                local_epoch=view.progress.global_epoch,
                samples_accumulated=view.progress.samples_accumulated,
                target_batch_size=self.config.training.target_batch_size,
            )
        if self.status.role == "monitor":  # its charts show the swarm: median loss by model version, tokens/s
            self._record_swarm_speed(view)
            for version, loss in view.val_losses.items():
                self.status.record_val_loss(version, loss)
        self.last_view = view
        return view

    def _record_swarm_speed(self, view: SwarmView) -> None:
        now, tokens = time.time(), view.stats.swarm_tokens
        self._token_samples.append((now, tokens))
        while len(self._token_samples) > 2 and now - self._token_samples[1][0] >= SPEED_WINDOW_S:
            self._token_samples.popleft()
        then, tokens_then = self._token_samples[0]
        speed = max(0.0, (tokens - tokens_then) / (now - then)) if now > then else None
        if view.median_loss is not None and speed is not None:
            self.status.record_swarm_point(view.progress.global_epoch, view.median_loss, speed, when=now)

    def tick(self) -> None:
        try:
            self.refresh()
        except Exception as e:  # the DHT may be busy or shutting down; the next round retries
            logger.debug(f"Swarm view refresh failed: {e!r}")
