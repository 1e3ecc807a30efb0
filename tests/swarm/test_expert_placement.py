"""Experts as a swarm property, on a real loopback swarm: placement spreads three hosts started together, two trainers
train, replicas of one expert converge through replica sync, a new replica downloads the current weights, and when a
host is SIGKILLed the experts only it held come back online on other peers with their trained weights.

One scenario per module (about three minutes on 2 cores); the tests run in file order, each asserting one property.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hivemind.moe.server.dht_handler import get_experts

from benchmarks.local_peers import PeerProcess, read_stats
from dragon_swarm.config import load_config
from dragon_swarm.moe import expert_state
from dragon_swarm.moe.backend import build_expert_backends
from dragon_swarm.moe.expert_uids import all_expert_uids
from dragon_swarm.moe.registry import find_replicas
from dragon_swarm.moe.state_service import ExpertStateService
from dragon_swarm.state.checkpoint import load_module_checkpoint
from dragon_swarm.swarm.dht_node import start_dht
from tests.swarm.paths import TEST_CONFIG

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

CONFIG = load_config(str(TEST_CONFIG))
UIDS = all_expert_uids(CONFIG.expert_prefix, CONFIG.model.num_moe_layers, CONFIG.model.num_experts)
TRAIN_STEPS = 12


@dataclass
class Swarm:
    log_dir: Path
    initial_peers: list[str]
    hosts: dict[str, PeerProcess]  # peer id -> process
    client: object
    service: ExpertStateService
    template: object
    trainers: list[PeerProcess] = field(default_factory=list)
    stats: list[Path] = field(default_factory=list)

    def online(self) -> dict[str, list[str]]:
        return {uid: [r.record.peer_id for r in reps] for uid, reps in find_replicas(self.client, UIDS).items()}

    def download(self, peer: str, uid: str) -> expert_state.ExpertState:
        return self.service.fetch(peer, uid, self.template, timeout=30.0)


def args(initial_peers: list[str], state_dir: Path, *extra: str) -> list[str]:
    return ["-c", str(TEST_CONFIG), "--initial-peers", *initial_peers, "--state-dir", str(state_dir), *extra]


def wait_until(condition, timeout: float, what: str, last_seen=None):
    """condition's first truthy value within `timeout`; else AssertionError naming what `last_seen()` last showed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"not within {timeout:.0f} s: {what}" + (f"; last seen: {last_seen()}" if last_seen else ""))


def relative_distance(a: expert_state.ExpertState, b: expert_state.ExpertState) -> float:
    va, vb = a.parameter_vector(), b.parameter_vector()
    return float(torch.linalg.vector_norm(va - vb) / torch.linalg.vector_norm(va))


@pytest.fixture(scope="module")
def swarm(module_launcher):
    log_dir = module_launcher.log_dir
    boot = module_launcher.bootstrap()
    initial_peers = boot.initial_peers()
    processes = [
        module_launcher.start(f"host{i}", args(initial_peers, log_dir / f"host{i}", "--no-train", "--max-experts", "3"))
        for i in range(3)
    ]  # started together, without --experts: placement chooses
    hosts = {p.peer_id(): p for p in processes}
    client = start_dht(initial_peers=initial_peers)
    service = ExpertStateService(client, f"{CONFIG.run_prefix}.experts", lambda uid: None)
    service.start()
    m = CONFIG.model
    template = build_expert_backends([UIDS[0]], m.d_model, m.expert_hidden, CONFIG.training, 1, 0)[UIDS[0]]
    try:
        yield Swarm(log_dir, initial_peers, hosts, client, service, template)
    finally:
        service.shutdown()
        client.shutdown()


def test_three_hosts_started_together_spread_over_every_expert(swarm):
    def balanced():
        counts = Counter({uid: len(peers) for uid, peers in swarm.online().items()})
        low = min(counts[uid] for uid in UIDS)
        # 9 = 3 hosts x --max-experts 3: a host that took over an orphan beyond its budget has shed it again
        return counts if low >= 1 and max(counts.values()) - low <= 1 and sum(counts.values()) == 9 else None

    # placement checks run every experts.placement_period (jittered), a move at most every third check, and the hosts
    # start on two cores shared with the test: 60 s was too short in one CI run of ~40
    wait_until(
        balanced, 150.0, "every expert hosted, replica counts within 1 of each other, every host at its budget",
        last_seen=lambda: {uid: len(peers) for uid, peers in swarm.online().items()},
    )  # fmt: skip
    experts = get_experts(swarm.client, UIDS)  # stock hivemind clients still find every expert
    assert all(e is not None for e in experts)


def test_trainers_train_on_placed_experts(swarm, module_launcher):
    for i in range(2):
        stats = swarm.log_dir / f"trainer{i}.jsonl"
        swarm.stats.append(stats)
        swarm.trainers.append(
            module_launcher.start(
                f"trainer{i}",
                args(swarm.initial_peers, swarm.log_dir / f"trainer{i}", "--no-host", "--max-steps", str(TRAIN_STEPS), "--stats-file", str(stats)),
            )
        )
    for trainer in swarm.trainers:
        assert trainer.wait(timeout=240) == 0, trainer.stderr()[-3000:]
    for stats in swarm.stats:
        records = read_stats(stats)
        assert records[-1]["micro_batches"] == TRAIN_STEPS
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    versions = {uid: max(r.record.version for r in reps) for uid, reps in find_replicas(swarm.client, UIDS).items()}
    assert sum(v > 0 for v in versions.values()) >= len(UIDS) // 2, versions  # the experts were trained remotely


def test_replicas_of_one_expert_converge(swarm):
    def shared():
        online = swarm.online()
        return [(uid, peers) for uid, peers in online.items() if len(peers) >= 2]

    uid, peers = wait_until(shared, 30.0, "an expert with two hosts")[0]

    def converged():
        a, b = (swarm.download(peer, uid) for peer in peers[:2])
        return relative_distance(a, b) <= 0.01

    wait_until(converged, 30.0, "two replicas within 1% of the weights' norm")
    merged_lines = [line for p in swarm.hosts.values() for line in p.stderr().splitlines() if "Replica sync" in line and "merged" in line]
    assert merged_lines, "no replica sync round was logged"


def test_a_new_replica_starts_from_a_current_host_weights(swarm, module_launcher):
    online = swarm.online()
    uid = next(u for u, peers in online.items() if peers)
    late = module_launcher.start("late-replica", args(swarm.initial_peers, swarm.log_dir / "late", "--no-train", "--experts", uid.rsplit("_", 1)[1].removeprefix("ffn.")))
    late_id = late.peer_id()
    late.wait_for_log("Serving 1 expert(s)", timeout=120)
    logged = re.search(rf"{re.escape(uid)}: downloaded from (\S+) \(version (\d+)", late.stderr())
    assert logged, late.stderr()[-3000:]
    # replicas of one expert have trained different amounts: compare with the host the copy came from
    source = next(peer for peer in swarm.online()[uid] if peer.endswith(logged.group(1)))
    current = swarm.download(source, uid)
    mine = swarm.download(late_id, uid)
    assert int(logged.group(2)) == mine.version == current.version
    # replica sync may have merged the copies since (it never changes a version): within 1% of the weights' norm
    assert relative_distance(current, mine) <= 0.01
    late.stop(timeout=30)


def test_a_killed_host_s_only_copies_come_back_online_with_their_weights(swarm, module_launcher):
    online = swarm.online()
    sole = {uid: peers[0] for uid, peers in online.items() if len(peers) == 1}
    victim = Counter(sole.values()).most_common(1)[0][0]
    victim_uids = [uid for uid, peer in sole.items() if peer == victim]
    time.sleep(2 * CONFIG.experts.placement_period + 2)  # the successors' standby copies are taken after training ended
    before = {uid: swarm.download(victim, uid) for uid in victim_uids}
    swarm.hosts[victim].kill_hard()
    killed_at = time.monotonic()

    def back_online():
        now = swarm.online()
        return now if all(now.get(uid) and victim not in now[uid] for uid in victim_uids) else None

    now = wait_until(back_online, 60.0, f"{victim_uids} online again on other peers")
    took = time.monotonic() - killed_at
    for uid in victim_uids:
        after = swarm.download(now[uid][0], uid)
        assert relative_distance(before[uid], after) < 1e-6, f"{uid} came back with other weights"
        saved, _, info = load_module_checkpoint(swarm.log_dir / f"host{list(swarm.hosts).index(victim)}" / "experts" / f"{uid}.safetensors")
        assert info["version"] <= after.version  # at least as fresh as the victim's last checkpoint
    print(f"takeover of {len(victim_uids)} expert(s) took {took:.1f} s")

    stats = swarm.log_dir / "trainer-after.jsonl"
    trainer = module_launcher.start(
        "trainer-after", args(swarm.initial_peers, swarm.log_dir / "trainer-after", "--no-host", "--max-steps", "4", "--stats-file", str(stats))
    )
    assert trainer.wait(timeout=180) == 0, trainer.stderr()[-3000:]
    assert "Found experts: 8 of 8 online" in trainer.stderr()
