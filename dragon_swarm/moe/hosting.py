"""What a peer hosts, over time: the owner of the expert host, its state service and its placement duties.

hivemind's runtime and connection handlers serve a fixed set of experts (the handlers are forked processes with
their own copy of the expert table), so a change of set (takeover, rebalancing) starts a new generation of
`ExpertHost` with the new set and stops the old one; experts kept across the change carry their exact state over,
copied at the moment of the switch (`_hand_over`), after the new experts' downloads, never during a merge.

In local-expert mode the trainer ends a round in two halves: between two micro-batches `freeze_round` freezes each held
expert as the round's snapshot against the weights it started the round from (`moe.round_delta`); `merge_frozen`
(possibly on another thread while training goes on) merges the snapshots with its other holders'.

A new expert never starts blind: before it is announced `online` it is announced `joining` and filled with the
freshest state there is: a robust choice among its live replicas (`moe.state_service`), else this peer's own
checkpoint (a standby copy kept for takeover is one), else the seeded init, with a log line saying so.

Duties (`PeriodicThread`s, jittered): `PlacementKeeper` (takeover of orphaned experts, standby copies, rebalancing;
only for adaptive hosts, i.e. placement chose their experts) and `ReplicaSync` (robust averaging with the other
replicas of each hosted expert).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import hivemind
import torch
from hivemind.utils import get_dht_time

from dragon_swarm.config import SwarmConfig
from dragon_swarm.events import EventBus, HostReport
from dragon_swarm.moe import expert_state, round_delta
from dragon_swarm.moe.backend import ExpertBackend, ExpertTamper, build_expert_backends
from dragon_swarm.moe.expert_state import ExpertState, ExpertStateError
from dragon_swarm.moe.expert_uids import all_expert_uids
from dragon_swarm.moe.host import ExpertHost
from dragon_swarm.moe.registry import ExpertHostRecord, declare_hosted_experts, find_replicas
from dragon_swarm.moe.replica_sync import PlacementKeeper, ReplicaSync
from dragon_swarm.moe.round_delta import RoundSnapshot
from dragon_swarm.moe.state_service import ExpertStateService
from dragon_swarm.state.checkpoint import CheckpointError, load_module_checkpoint, save_module_checkpoint

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 60.0
PARALLEL_FILLS = 4  # new experts downloaded at once (x up to 3 hosts each: ~0.7 GB in flight for hrm-smoe-125m)


@dataclass(frozen=True)
class FrozenRound:
    """The held experts as one outer round left them (`ExpertHosting.freeze_round`): the states captured (a merge's
    change is applied against these) and the snapshots served to the other holders."""

    captured: dict[str, ExpertState]
    snapshots: dict[str, RoundSnapshot]


class ExpertHosting:
    """Construct (starts nothing), `start(uids)`, `change(uids)` any number of times, `shutdown()`.

    `on_change(backends)` listeners hear every new set (the router calls local experts directly). Counters in
    `report()` add up over generations.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        config: SwarmConfig,
        checkpoint_dir: Path | None,
        throughput: float,
        device: str = "cpu",
        bus: EventBus | None = None,
        tamper: ExpertTamper | None = None,
        adaptive: bool = False,
        budget: int | None = None,
        periodic_sync: bool = True,
        own_trainer: bool = False,
    ):
        m = config.model
        self.dht, self.config, self.checkpoint_dir, self.throughput = dht, config, checkpoint_dir, throughput
        self.device, self.bus, self.tamper, self.adaptive = device, bus if bus is not None else EventBus(), tamper, adaptive
        self.all_uids = all_expert_uids(config.expert_prefix, m.num_moe_layers, m.num_experts)
        self.budget = budget if budget is not None else len(self.all_uids)
        # False in local-expert mode: the trainer merges replicas itself at its round boundaries (`freeze_round`)
        self.periodic_sync = periodic_sync
        self.own_trainer = own_trainer  # this peer also trains: its experts judge remote updates by its own first
        self.replica_sync = ReplicaSync(self)
        self.own_peer_id = dht.peer_id.to_base58()
        self.template = expert_state.make_template(m.d_model, m.expert_hidden, config.training)
        self.host: ExpertHost | None = None
        # the current generation's experts: switched at the hand-over, before the old host stops and the new one
        # starts, so a merge or a state download never reaches a generation that is on its way out
        self._backends: dict[str, ExpertBackend] = {}
        self.state_service = ExpertStateService(dht, f"{config.run_prefix}.experts", self.backend, self.round_snapshot)
        self._rounds: dict[str, dict[str, RoundSnapshot]] = {}  # local-expert mode: the last outer rounds' snapshots
        # local-expert mode: the weights each held expert started the current outer round from, and their digest
        self._round_starts: dict[str, tuple[dict[str, torch.Tensor], str]] = {}
        self.listeners: list[Callable[[dict[str, ExpertBackend]], None]] = []
        self._retired = HostReport(0, 0, 0, 0)
        self._change_lock = threading.RLock()
        # held by a merge (an outer round's, from its snapshots to its last applied delta; a periodic replica sync's, per
        # expert) and by a placement change while it hands the kept experts over (`_hand_over`)
        self.round_lock = threading.RLock()
        self._paused = False
        self._surplus: set[str] = set()  # held beyond the budget: see `ExpertHostRecord.surplus`
        self._duties: list = []
        self.changes = 0

    # --- what is hosted ---

    @property
    def uids(self) -> list[str]:
        return list(self._backends)

    @property
    def backends(self) -> dict[str, ExpertBackend]:
        return dict(self._backends)

    def backend(self, uid: str) -> ExpertBackend | None:
        return self._backends.get(uid)

    def start(self, uids: Sequence[str]) -> None:
        self.state_service.start()
        self._switch(list(uids))
        self._duties = [self.replica_sync] if self.periodic_sync else []
        if self.adaptive:
            self._duties.append(PlacementKeeper(self))
        for duty in self._duties:
            duty.start()

    def change(self, uids: Sequence[str], reason: str, surplus: Sequence[str] = ()) -> None:
        """Host `uids` from now on: new experts join (download first), dropped ones are saved and announced
        offline. No expert is ever left with zero hosts by this peer's choice: the callers (placement) keep
        those. `surplus`: experts taken beyond the budget, announced as such while the peer stays over it."""
        with self._change_lock:
            old = set(self.uids)
            self._surplus = set(surplus) | (self._surplus & set(uids)) if len(uids) > self.budget else set()
            if set(uids) == old:
                return
            added, dropped = sorted(set(uids) - old), sorted(old - set(uids))
            logger.info(f"Placement ({reason}): taking {len(added)} expert(s) {', '.join(added) or '-'}; dropping {len(dropped)} {', '.join(dropped) or '-'}")
            self._switch(list(uids))
            self.changes += 1

    def _switch(self, uids: list[str]) -> None:
        m = self.config.model
        uids = [uid for uid in self.all_uids if uid in set(uids)]
        old_host, old_backends = self.host, dict(self._backends)
        kept = [uid for uid in uids if uid in old_backends]
        backends = build_expert_backends(
            uids, m.d_model, m.expert_hidden, self.config.training, self.config.experts.max_batch_size, self.config.swarm.seed,
            tamper=self.tamper, own_trainer=self.own_trainer,
        )  # fmt: skip
        new = [uid for uid in uids if uid not in old_backends]
        self._announce(new, "joining")
        # in parallel: a host that trains serves a state between its micro-batches (it holds its experts' locks for
        # a whole one), so one download after another waits one micro-batch each (a CI join took 48 s for 6 experts)
        if new:
            with ThreadPoolExecutor(max_workers=min(PARALLEL_FILLS, len(new)), thread_name_prefix="expert-fill") as pool:
                list(pool.map(lambda uid: self._fill(uid, backends[uid]), new))
        self._hand_over(old_backends, kept, backends)
        if old_host is not None:
            old_host.shutdown(offline=[uid for uid in old_host.uids if uid not in uids])
            totals = old_host.report()
            r = self._retired
            self._retired = HostReport(
                0, r.tokens_processed + totals.tokens_processed, r.requests_served + totals.requests_served, r.updates + totals.updates
            )
        host = ExpertHost(
            self.dht, backends, self.config.experts, hidden_dim=m.d_model, checkpoint_dir=self.checkpoint_dir,
            throughput=self.throughput, checkpoint_period=self.config.experts.checkpoint_period, device=self.device,
            bus=self.bus, adaptive=self.adaptive, report_source=self.report, surplus=sorted(self._surplus & set(uids)),
        )  # fmt: skip
        try:
            host.start()
        except Exception:
            self.host, self._backends = None, {}  # the old generation is gone: the next placement check starts over from nothing
            raise
        self.host = host
        if self._paused:
            host.pause()

    def _hand_over(self, old: dict[str, ExpertBackend], kept: list[str], backends: dict[str, ExpertBackend]) -> None:
        """Move the kept experts into the new generation at one moment, after the downloads: under the old
        backends' locks (no update lands between the copy and the switch) and the round lock (an outer round's merge
        applies its result to the backends it started with), then point the listeners (the trainer's in-process
        dispatch) at the new set. Copied earlier, every update made during the downloads would be lost, and a merge
        that ended meanwhile too (a test run on a loaded machine lost a whole round of expert merges this way)."""
        with self.round_lock, ExitStack() as held:
            for uid in sorted(kept):
                held.enter_context(old[uid].lock)
            for uid in kept:
                expert_state.apply(expert_state.capture(old[uid]), backends[uid])
            self._backends = dict(backends)
            if not self.periodic_sync:  # an expert taken on starts its round here; a kept one keeps its round start
                self._round_starts = {
                    uid: self._round_starts[uid] if uid in kept and uid in self._round_starts else _round_start(b) for uid, b in backends.items()
                }  # fmt: skip
            for listener in self.listeners:
                listener(dict(backends))

    def _fill(self, uid: str, backend: ExpertBackend) -> None:
        """The freshest state for a new replica: a live replica's, else our own checkpoint, else the seeded init."""
        own = self._own_checkpoint(uid, backend)
        replicas = self._online_hosts(uid)
        if replicas:
            got = self.state_service.fetch_robust(replicas, uid, backend, DOWNLOAD_TIMEOUT_S, reference=own)
            if got is not None:
                state, source, _ = got
                expert_state.apply(state, backend)
                logger.info(f"{uid}: downloaded from {source[-8:]} (version {state.version}, {len(replicas)} replica(s) online)")
                return
        if own is not None:
            expert_state.apply(own, backend)
            why = "no live replica answered" if replicas else "no live replica"
            logger.info(f"{uid}: {why}; resumed from this peer's copy (standby or checkpoint, version {own.version})")
            return
        logger.info(f"{uid}: no live replica and no checkpoint: starting from the seeded init")

    def _own_checkpoint(self, uid: str, template: ExpertBackend) -> ExpertState | None:
        path = self.checkpoint_dir / f"{uid}.safetensors" if self.checkpoint_dir is not None else None
        if path is None or not path.exists():
            return None
        try:
            state = expert_state.from_checkpoint(*load_module_checkpoint(path), uid)
            expert_state.validate(state, template, uid)
        except (CheckpointError, ExpertStateError) as e:
            logger.error(f"{uid}: checkpoint {path} unusable, ignoring it: {e}")
            return None
        return state

    def _online_hosts(self, uid: str) -> list[str]:
        try:
            # latest: this peer has just announced itself `joining`, and may keep the key itself (see find_replicas)
            found = find_replicas(self.dht, [uid], latest=True)[uid]
        except Exception as e:
            logger.warning(f"{uid}: looking up its replicas failed: {e}")
            return []
        return [r.record.peer_id for r in found if r.record.peer_id != self.own_peer_id]

    def _announce(self, uids: Sequence[str], state: str) -> None:
        if not uids:
            return
        records = {
            uid: ExpertHostRecord(peer_id=self.own_peer_id, state=state, throughput=float(self.throughput), version=0, adaptive=self.adaptive)
            for uid in uids
        }
        try:
            declare_hosted_experts(self.dht, records, expiration_time=get_dht_time() + self.config.experts.expiration)
        except Exception as e:
            logger.warning(f"Announcing {len(records)} expert(s) as {state} failed: {e}")

    def save_standby(self, uid: str, state: ExpertState) -> None:
        """Keep a copy of an expert this peer may have to take over, where a takeover looks first."""
        if self.checkpoint_dir is not None:
            save_module_checkpoint(self.checkpoint_dir / f"{uid}.safetensors", state.module, state.optimizer, expert_state.info(state))

    def round_snapshot(self, uid: str, tag: str) -> RoundSnapshot | None:
        return self._rounds.get(tag, {}).get(uid)

    def freeze_round(self, tag: str) -> FrozenRound:
        """Local-expert mode's outer step for the held experts, first half, at the round boundary: snapshot them as
        round `tag` and serve the snapshots (other holders download exactly these). Cheap (a copy and an 8-bit delta
        per expert), so a trainer that overlaps the rest of the round with training does this between two
        micro-batches and the snapshot is exactly the round's end."""
        with self.round_lock:  # a placement change hands its experts over before or after, never in between
            backends = self.backends
            captured = {uid: expert_state.capture(b) for uid, b in backends.items()}
            snapshots = {}
            for uid, state in captured.items():
                start, digest = self._round_starts.get(uid) or _round_start(backends[uid])
                snapshots[uid] = round_delta.snapshot(state, start, digest)
            # this round and the previous one: a holder that is a round behind still finds what it asks for
            self._rounds = {**{t: v for t, v in list(self._rounds.items())[-1:]}, tag: snapshots}
            return FrozenRound(captured, snapshots)

    def merge_frozen(self, tag: str, frozen: FrozenRound) -> int:
        """The second half of the outer step (`freeze_round`): fetch the other holders' snapshots of round `tag` and
        merge; returns the experts merged. Each merge moves its backend by (merged - frozen), so training done since
        the freeze is kept: this may run in another thread while training goes on (it takes each expert's lock only
        to apply its merge)."""
        with self.round_lock:
            backends = self.backends
            merged = self.replica_sync.merge_round(tag, frozen.captured, frozen.snapshots)
            # the next round starts from the merge's result, the same bits on every holder that merged the same
            # snapshots (the next delta carries whatever the backend holds beyond it); an expert not merged starts
            # from its weights when it was frozen
            results = self.replica_sync.round_results
            self._round_starts = {
                uid: _round_start_of(results[uid]) if uid in results
                else _round_start_of(frozen.captured[uid].module) if uid in frozen.captured else _round_start(b)
                for uid, b in backends.items()
            }  # fmt: skip
            return merged

    def wait_for_round_partners(self, tag: str, timeout: float, stop: threading.Event | None = None) -> bool:
        """Before a trainer stops after its last round: wait (up to `timeout`, or until `stop` is set) until every
        holder whose round `tag` snapshot this peer merged has fetched this peer's snapshot too, so that both end
        the round with the same expert. True when all of them have."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [
                (uid, peer) for uid, peers in self.replica_sync.round_partners.items()
                for peer in peers if peer not in self.state_service.fetched_by(uid, tag)
            ]  # fmt: skip
            if not missing:
                return True
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                holders = sorted({peer[-8:] for _, peer in missing})
                logger.info(f"Stopping before {len(holders)} holder(s) ({', '.join(holders)}) fetched this peer's last round of {len(missing)} expert(s)")
                return False
            time.sleep(0.2)

    # --- the host's interface, for the lifecycle owner ---

    def report(self) -> HostReport:
        host, r = self.host, self._retired
        now = host.report() if host is not None else HostReport(0, 0, 0, 0)
        return HostReport(
            now.experts_served, r.tokens_processed + now.tokens_processed, r.requests_served + now.requests_served, r.updates + now.updates
        )

    def pause(self) -> None:
        with self._change_lock:
            self._paused = True
            if self.host is not None:
                self.host.pause()

    def resume(self) -> None:
        with self._change_lock:
            self._paused = False
            if self.host is not None:
                self.host.resume()

    @property
    def paused(self) -> bool:
        return self._paused

    def stop_placement(self) -> None:
        """No takeover, standby copy or rebalancing from now on (a change in flight is finished first): for a peer
        about to leave, whose experts must stay as its last round left them."""
        for duty in self._duties:
            if isinstance(duty, PlacementKeeper):
                duty.stop()

    def stop_reporting(self) -> None:
        for duty in self._duties:
            duty.stop()
        if self.host is not None:
            self.host.stop_reporting()

    def shutdown(self) -> None:
        self.stop_reporting()
        with self._change_lock:
            if self.host is not None:
                self.host.shutdown()
            self.state_service.shutdown()


def _round_start(backend: ExpertBackend) -> tuple[dict[str, torch.Tensor], str]:
    """The backend's weights now (float32, on the CPU) as a round start, with their digest."""
    with backend.lock:
        return _round_start_of(backend.module.state_dict())


def _round_start_of(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """A copy of `weights` (float32, on the CPU) as a round start, with its digest."""
    start = {name: t.detach().to("cpu", torch.float32, copy=True) for name, t in weights.items()}
    return start, round_delta.start_digest(start)


def expert_memory_bytes(config: SwarmConfig) -> int:
    """One hosted expert's memory: weights, gradients and two AdamW moments, float32."""
    m = config.model
    params = 2 * m.d_model * m.expert_hidden + m.expert_hidden + m.d_model
    return 4 * 4 * params


def memory_budget(config: SwarmConfig, memory_bytes: int, share: float = 0.25) -> int:
    """How many experts fit in `share` of `memory_bytes` (the rest is for the trunk, activations and the OS)."""
    return max(1, int(share * memory_bytes) // expert_memory_bytes(config))
