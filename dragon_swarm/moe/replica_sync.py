"""The duties that make experts a swarm property: `ReplicaSync` keeps the replicas of an expert together and
`PlacementKeeper` keeps every expert hosted and the hosts in balance.

Replica sync is pull-based robust gossip rather than one hivemind all-reduce group per expert: an averager is a
process holding its own copy of the tensors, and a host of 8-32 experts would need that many; the download path
exists anyway (joining, takeover). Each round a host fetches the state of its expert's other replicas, drops those
too far from its own, merges the rest with CenteredClip (weights and AdamW moments, `moe.expert_state`) and applies
the change as a delta, so updates the runtime made meanwhile are kept. Local-expert mode's outer rounds
(`merge_round`) merge the frozen weights of the round alone, each sent as its 8-bit delta from the round start
(`moe.round_delta`), in peer-id order; each holder keeps its own AdamW moments. Every honest replica computes its own robust
result, so a Byzantine replica moves an honest one no more than it would move the trunk's all-reduce; one that is
far from the robust result round after round is banned like a trainer (the config's `averaging:` ban policy).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from dragon_swarm.background import PeriodicThread
from dragon_swarm.moe import expert_state, placement
from dragon_swarm.moe.expert_state import MOMENT_NAMES, ExpertState, ExpertStateError
from dragon_swarm.moe.registry import find_replicas
from dragon_swarm.moe.round_delta import RoundSnapshot

if TYPE_CHECKING:
    from dragon_swarm.moe.hosting import ExpertHosting

logger = logging.getLogger(__name__)

# a replica this far from ours (relative to our weights' norm) is not merged at all: honest replicas trained apart for a
# sync period were measured up to ~0.4 apart early in training (Adam moves small weights fast); 2 is garbage
MAX_RELATIVE_DISTANCE = 2.0
MAX_PEERS_PER_SYNC = 4
MAX_PARALLEL_MERGES = 8
ROUND_SNAPSHOT_WAIT_S = 20.0  # how long to wait for another holder to reach the same outer round
REBALANCE_COOLDOWN = 3  # placement checks between two moves of one peer: the swarm's records settle first
JITTER = 0.3


class ReplicaSync(PeriodicThread):
    def __init__(self, hosting: "ExpertHosting"):
        super().__init__("expert-replica-sync", hosting.config.experts.sync_period, jitter=JITTER)
        self.hosting = hosting
        avg = hosting.config.averaging
        self.ban_ratio, self.ban_rounds, self.ban_seconds = avg.ban_distance_ratio, avg.ban_rounds, avg.ban_seconds
        self._book_lock = threading.Lock()  # merges of several experts run in parallel threads
        self.strikes: dict[tuple[str, str], int] = defaultdict(int)  # (uid, peer) -> rounds in a row far away
        self.banned_until: dict[tuple[str, str], float] = {}
        self.rounds = 0
        self.last_distance: dict[str, float] = {}  # uid -> relative distance to the other replicas before merging
        self.round_partners: dict[str, list[str]] = {}  # uid -> the holders whose snapshot the last round merged
        # uid -> the weights the last round's merge computed: the same bits on every holder that merged the same
        # snapshots (the backend holds them up to the rounding of applying them as a delta)
        self.round_results: dict[str, dict[str, torch.Tensor]] = {}

    def tick(self) -> None:
        backends = self.hosting.backends
        if not backends or self.hosting.paused:
            return
        found = find_replicas(self.hosting.dht, list(backends))
        now = time.monotonic()
        for uid, backend in backends.items():
            if self.stopping:
                return
            peers = [
                r.record.peer_id for r in found.get(uid, [])
                if r.record.peer_id != self.hosting.own_peer_id and self.banned_until.get((uid, r.record.peer_id), 0.0) <= now
            ]  # fmt: skip
            if peers:
                with self.hosting.round_lock:  # a placement change hands the experts over before or after this merge
                    if self.hosting.backend(uid) is backend:
                        self.sync_one(uid, backend, peers[:MAX_PEERS_PER_SYNC])

    def sync_one(
        self, uid: str, backend, peers: list[str], tag: str | None = None, own: ExpertState | None = None, own_round: RoundSnapshot | None = None
    ) -> bool:
        """Merge `uid` with its replicas on `peers`. With a round `tag`, every holder merges the frozen snapshots of
        that round (`ExpertHosting.merge_frozen`; `own_round` is ours), so holders that see the same snapshots reach
        the same state."""
        own = own if own is not None else expert_state.capture(backend)
        own_vector = own.parameter_vector()
        own_norm = max(float(torch.linalg.vector_norm(own_vector)), 1e-12)
        others, sources = [], []
        for peer in peers:
            try:
                state = self._fetch(peer, uid, backend, tag, own_round)
            except ExpertStateError as e:
                logger.warning(f"Replica sync {uid}: {e}")
                continue
            distance = float(torch.linalg.vector_norm(state.parameter_vector() - own_vector)) / own_norm
            if distance > MAX_RELATIVE_DISTANCE:
                logger.warning(f"Replica sync {uid}: {peer[-8:]} is {distance:.0%} of the weights' norm away from ours; not merged")
                self._strike(uid, peer, f"{distance:.0%} of the weights' norm away")
                continue
            others.append(state)
            sources.append(peer)
        if tag is not None:
            self.round_partners[uid] = sources
            self.round_results.pop(uid, None)
        if not others:
            return False
        if tag is None:
            merged = expert_state.robust_merge(own, others)
            distances = merged.distances[1:]
        else:
            # an outer round: weights only, everyone's (ours too) rebuilt from what crossed the wire, in peer-id
            # order, so that holders who fetched the same snapshots compute the same merge
            entries = sorted([(self.hosting.own_peer_id, own_round.state()), *zip(sources, others)], key=lambda e: e[0])
            merged = expert_state.merge_weights([state for _, state in entries])
            by_peer = dict(zip((peer for peer, _ in entries), merged.distances))
            distances = [by_peer[peer] for peer in sources]
        before = max(float(torch.linalg.vector_norm(s.parameter_vector() - own_vector)) for s in others) / own_norm
        self.last_distance[uid] = before
        apply_delta(backend, own, merged.state)
        if tag is not None:
            self.round_results[uid] = merged.state.module
        with self._book_lock:
            self.rounds += 1
        logger.info(
            f"Replica sync {uid}: merged {len(others) + 1} replicas (farthest was {before:.2%} of the weights' norm away)"
        )
        if len(others) >= 2:  # with two replicas nobody can tell which one is off
            for peer, distance in zip(sources, distances):
                if distance > self.ban_ratio * max(merged.spread, 1e-12):
                    self._strike(uid, peer, f"{distance / max(merged.spread, 1e-12):.1f}x the replicas' median distance from the robust result")
                else:
                    self.strikes.pop((uid, peer), None)
        return True

    def _fetch(self, peer: str, uid: str, backend, tag: str | None, own_round: RoundSnapshot | None = None) -> ExpertState:
        if tag is None:
            return self.hosting.state_service.fetch(peer, uid, backend, timeout=30.0)
        deadline = time.monotonic() + ROUND_SNAPSHOT_WAIT_S
        while True:  # a holder reaches the round boundary a moment after us: its snapshot may not exist yet
            try:
                return self.hosting.state_service.fetch(peer, uid, backend, timeout=30.0, tag=tag, own_round=own_round)
            except ExpertStateError as e:
                if ("no snapshot" not in str(e) and "too many" not in str(e)) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def merge_round(self, tag: str, captured: dict[str, ExpertState], snapshots: dict[str, RoundSnapshot]) -> int:
        """Local-expert mode's outer step for the experts: merge each held expert's `tag` snapshot with the other
        holders' snapshots of the same round (`captured`: the states the snapshots froze, which the merge's change is
        applied against). Returns how many experts were merged."""
        backends = self.hosting.backends
        found = find_replicas(self.hosting.dht, list(backends))
        now, jobs = time.monotonic(), []
        for uid, backend in backends.items():
            peers = [
                r.record.peer_id for r in found.get(uid, [])
                if r.record.peer_id != self.hosting.own_peer_id and self.banned_until.get((uid, r.record.peer_id), 0.0) <= now
            ]  # fmt: skip
            if peers and uid in snapshots:
                jobs.append((uid, backend, peers[:MAX_PEERS_PER_SYNC]))
        self.round_partners, self.round_results = {}, {}
        if not jobs:
            return 0
        # the experts are independent: their downloads overlap (one at a time, a round's merge took ~1 s per expert
        # at 50 ms RTT); each expert's merge touches only its own backend
        with ThreadPoolExecutor(max_workers=min(len(jobs), MAX_PARALLEL_MERGES), thread_name_prefix="merge") as pool:
            done = pool.map(lambda job: self.sync_one(job[0], job[1], job[2], tag=tag, own=captured[job[0]], own_round=snapshots[job[0]]), jobs)
            return sum(1 for ok in done if ok)

    def _strike(self, uid: str, peer: str, why: str) -> None:
        with self._book_lock:
            self._strike_locked(uid, peer, why)

    def _strike_locked(self, uid: str, peer: str, why: str) -> None:
        self.strikes[(uid, peer)] += 1
        if self.strikes[(uid, peer)] >= self.ban_rounds:
            self.banned_until[(uid, peer)] = time.monotonic() + self.ban_seconds
            self.strikes.pop((uid, peer), None)
            logger.warning(f"Replica sync {uid}: banned {peer[-8:]} for {self.ban_seconds:.0f} s: {why}, {self.ban_rounds} rounds in a row")


def apply_delta(backend, before: ExpertState, after: ExpertState) -> None:
    """Move the backend by (after - before): what the runtime trained since `before` was captured stays."""
    with backend.lock:
        state = backend.module.state_dict()
        with torch.no_grad():
            for name, tensor in state.items():
                tensor.add_((after.module[name] - before.module[name]).to(tensor.device, tensor.dtype))
        if before.optimizer is None or after.optimizer is None:
            return
        params = [p for group in backend.optimizer.param_groups for p in group["params"]]
        for index, values in after.optimizer["state"].items():
            live = backend.optimizer.state.get(params[index]) if index < len(params) else None
            for name in MOMENT_NAMES:
                if live is not None and name in live and name in values and name in before.optimizer["state"].get(index, {}):
                    delta = values[name] - before.optimizer["state"][index][name]
                    live[name].add_(delta.to(live[name].device, live[name].dtype))
                    if name == "exp_avg_sq":
                        live[name].clamp_(min=0.0)


class PlacementKeeper(PeriodicThread):
    """Takes over experts nobody hosts, keeps standby copies of experts with a single host, and rebalances (Petals'
    rule, `moe.placement.rebalance`). Only adaptive hosts run it: a volunteer's explicit `--experts` list stays."""

    def __init__(self, hosting: "ExpertHosting"):
        super().__init__("expert-placement", hosting.config.experts.placement_period, jitter=JITTER)
        self.hosting = hosting
        self.orphan_ticks: dict[str, int] = {}
        self.standby_versions: dict[str, int] = {}
        self.takeovers = 0
        self._quiet_ticks = 0  # checks since this peer last changed its set: it rebalances only after REBALANCE_COOLDOWN

    def tick(self) -> None:
        h = self.hosting
        if h.paused:  # the volunteer pressed Stop: this peer takes nothing on
            return
        found = find_replicas(h.dht, h.all_uids, only_online=False)
        live = {uid: [r for r in reps if r.record.state != "offline"] for uid, reps in found.items()}
        hosts = {uid: {r.record.peer_id: r.record.throughput for r in reps} for uid, reps in live.items()}
        me = h.own_peer_id
        candidates = sorted({r.record.peer_id for reps in live.values() for r in reps if r.record.adaptive} - {me})
        for uid in h.all_uids:
            if hosts.get(uid):
                self.orphan_ticks.pop(uid, None)
            else:
                self.orphan_ticks[uid] = self.orphan_ticks.get(uid, 0) + 1
        self._quiet_ticks += 1
        current = h.uids
        take = [uid for uid in placement.takeover(h.all_uids, hosts, candidates, me, self.orphan_ticks) if uid not in current]
        if take:
            over = len(current) + len(take) - h.budget
            note = f"; {over} over this peer's budget of {h.budget}: an expert nobody hosts comes first" if over > 0 else ""
            logger.warning(f"Taking over {len(take)} expert(s) nobody hosts: {', '.join(take)}{note}")
            h.change([*current, *take], "takeover", surplus=take[len(take) - over :] if over > 0 else ())
            self.takeovers += len(take)
            self._quiet_ticks = 0
            return
        chosen = placement.standby(h.all_uids, hosts, candidates, me, current)
        only_host = {uid: live[uid][0].record for uid in chosen}
        due, self.standby_versions = placement.standby_downloads(chosen, {uid: r.version for uid, r in only_host.items()}, self.standby_versions)
        for uid in due:
            self._refresh_standby(uid, only_host[uid].peer_id)
        if self._quiet_ticks < REBALANCE_COOLDOWN:
            return
        firm = placement.firm_hosts(hosts, {uid: {r.record.peer_id for r in reps if r.record.surplus} for uid, reps in live.items()})
        proposal = placement.rebalance(h.all_uids, firm, me, current, h.config.experts.rebalance_margin, h.budget)
        if proposal is not None:
            why = "over budget: shedding the best served" if len(proposal) < len(current) else "the swarm's least served experts gain a host"
            h.change(proposal, f"rebalancing: {why}")
            self._quiet_ticks = 0

    def _refresh_standby(self, uid: str, peer: str) -> None:
        try:
            state = self.hosting.state_service.fetch(peer, uid, self.hosting.template, timeout=60.0)
        except ExpertStateError as e:
            logger.warning(f"Standby copy of {uid}: {e}")
            return
        if self.standby_versions.get(uid) == state.version:
            return
        self.hosting.save_standby(uid, state)
        if uid not in self.standby_versions:
            logger.info(f"Keeping a standby copy of {uid} (its only host is {peer[-8:]}; version {state.version})")
        self.standby_versions[uid] = state.version
