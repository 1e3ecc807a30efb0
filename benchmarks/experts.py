"""Experts as a swarm property, measured on real peers on loopback. Prints one JSON object.

    python -m benchmarks.experts --scenario takeover [--config tests/configs/swarm-test.yaml]
    python -m benchmarks.experts --scenario sync --steps 30
    python -m benchmarks.experts --scenario byzantine_host --steps 30
    python -m benchmarks.experts --scenario all

``takeover``: a bootstrap, three hosts started together without ``--experts`` (``--max-experts 3``: placement
spreads them over the 8 experts) and a trainer that keeps training. Once placement has settled, the host holding
the most only-copies is SIGKILLed; reported: seconds from the kill until every expert it alone held is online on
another peer (``takeover_s``; its records first have to expire: ``experts.expiration``), whether the weights that
came back are the ones it had (relative distance to a download taken just before the kill, beside the distance of
the seeded init to it: the trainer trains on, so the copy lags by up to one placement period), and
the trainer's micro-batches while it happened.

``sync``: two hosts of every expert (``--experts all``) and two trainers; every ``--sample-s`` seconds the two
replicas of each expert are downloaded and their relative parameter distance ``‖a - b‖ / ‖a‖`` recorded, during
training and for a while after it (``distance_curve``: max and mean over experts).

``byzantine_host``: two hosts of every expert and two trainers, once clean and once with one host started with
the hidden ``--expert-attack scale_outputs`` (outputs x100). Reported: the trainers' final loss (mean of the last
3 micro-batches of each), ``ratio = attacked / clean``, and each trainer's bans of the Byzantine host from its log.
TEST/BENCHMARK ONLY: the attack mode lives in ``dragon_swarm.attacks``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks.local_peers import PeerLauncher, read_stats, stop_peers_on_sigterm

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "tests" / "configs" / "swarm-test.yaml"


class Observer:
    """A client DHT in this process that reads the registry and downloads expert states, as any peer would."""

    def __init__(self, config_path: Path, initial_peers: list[str]):
        from dragon_swarm.config import load_config
        from dragon_swarm.moe.backend import build_expert_backends
        from dragon_swarm.moe.expert_uids import all_expert_uids
        from dragon_swarm.moe.state_service import ExpertStateService
        from dragon_swarm.swarm.dht_node import start_dht

        self.config = config = load_config(str(config_path))
        m = config.model
        self.uids = all_expert_uids(config.expert_prefix, m.num_moe_layers, m.num_experts)
        self.dht = start_dht(initial_peers=initial_peers)
        self.service = ExpertStateService(self.dht, f"{config.run_prefix}.experts", lambda uid: None)
        self.service.start()
        self.template = build_expert_backends([self.uids[0]], m.d_model, m.expert_hidden, config.training, 1, 0)[self.uids[0]]

    def online(self) -> dict[str, list[str]]:
        from dragon_swarm.moe.registry import find_replicas

        return {uid: [r.record.peer_id for r in reps] for uid, reps in find_replicas(self.dht, self.uids).items()}

    def download(self, peer: str, uid: str):
        return self.service.fetch(peer, uid, self.template, timeout=30.0)

    def seeded_init(self, uid: str):
        from dragon_swarm.moe import expert_state
        from dragon_swarm.moe.backend import build_expert_backends

        m = self.config.model
        fresh = build_expert_backends([uid], m.d_model, m.expert_hidden, self.config.training, 1, self.config.swarm.seed)[uid]
        return expert_state.capture(fresh)

    def close(self) -> None:
        self.service.shutdown()
        self.dht.shutdown()


def relative_distance(a, b) -> float:
    va, vb = a.parameter_vector(), b.parameter_vector()
    return float(torch.linalg.vector_norm(va - vb) / torch.linalg.vector_norm(va))


def peer_args(config: Path, initial_peers: list[str], state_dir: Path, *extra: str) -> list[str]:
    return ["-c", str(config), "--initial-peers", *initial_peers, "--state-dir", str(state_dir), *extra]


def wait_until(condition, timeout: float, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    return None


def takeover(config: Path, work: Path) -> dict:
    launcher = PeerLauncher(work)
    observer = None
    try:
        initial = launcher.bootstrap().initial_peers()
        hosts = [launcher.start(f"host{i}", peer_args(config, initial, work / f"host{i}", "--no-train", "--max-experts", "3")) for i in range(3)]
        by_id = {p.peer_id(): p for p in hosts}
        observer = Observer(config, initial)
        started = time.monotonic()
        settled = wait_until(lambda: _settled(observer, 9), 120.0, 1.0)
        settle_s = time.monotonic() - started
        stats = work / "trainer.jsonl"
        trainer = launcher.start("trainer", peer_args(config, initial, work / "trainer", "--no-host", "--stats-file", str(stats)))
        wait_until(lambda: len(read_stats(stats)) >= 5, 180.0)
        time.sleep(2 * observer.config.experts.placement_period + 2)  # standby copies of the latest weights
        online = observer.online()
        sole = {uid: peers[0] for uid, peers in online.items() if len(peers) == 1}
        victim = Counter(sole.values()).most_common(1)[0][0]
        victim_uids = sorted(uid for uid, peer in sole.items() if peer == victim)
        before = {uid: observer.download(victim, uid) for uid in victim_uids}
        batches_at_kill = len(read_stats(stats))
        by_id[victim].kill_hard()
        killed = time.monotonic()
        back = wait_until(lambda: _back(observer, victim, victim_uids), 180.0)
        takeover_s = time.monotonic() - killed if back else None
        distances, from_init = {}, {}
        if back:
            for uid in victim_uids:
                distances[uid] = relative_distance(before[uid], observer.download(back[uid][0], uid))
                from_init[uid] = relative_distance(before[uid], observer.seeded_init(uid))
        time.sleep(5)
        batches_after = len(read_stats(stats))
        trainer.stop(timeout=30)
        return {
            "scenario": "takeover",
            "placement_settled": bool(settled),
            "placement_settle_s": round(settle_s, 1),
            "experts_lost_with_host": len(victim_uids),
            "takeover_s": round(takeover_s, 1) if takeover_s is not None else None,
            "record_expiration_s": observer.config.experts.expiration,
            "placement_period_s": observer.config.experts.placement_period,
            # the trainer trains on: the copy lags the victim by up to one placement period, and the new host trains
            "back_vs_victim_max_relative_distance": max(distances.values()) if distances else None,
            "seeded_init_vs_victim_min_relative_distance": min(from_init.values()) if from_init else None,
            "trainer_micro_batches_from_kill_to_5s_after_takeover": batches_after - batches_at_kill,
        }
    finally:
        if observer is not None:
            observer.close()
        launcher.stop_all()


def _settled(observer: Observer, slots: int):
    counts = Counter({uid: len(p) for uid, p in observer.online().items()})
    low = min(counts[uid] for uid in observer.uids)
    return low >= 1 and max(counts.values()) - low <= 1 and sum(counts.values()) == slots


def _back(observer: Observer, victim: str, uids: list[str]):
    now = observer.online()
    return now if all(now.get(uid) and victim not in now[uid] for uid in uids) else None


def sync(config: Path, work: Path, steps: int, sample_s: float, after_s: float) -> dict:
    launcher = PeerLauncher(work)
    observer = None
    try:
        initial = launcher.bootstrap().initial_peers()
        hosts = [launcher.start(f"host{i}", peer_args(config, initial, work / f"host{i}", "--no-train", "--experts", "all")) for i in range(2)]
        ids = [p.peer_id() for p in hosts]
        for host in hosts:
            host.wait_for_log("Serving 8 expert(s)", 120)
        observer = Observer(config, initial)
        trainers = [
            launcher.start(f"trainer{i}", peer_args(config, initial, work / f"trainer{i}", "--no-host", "--max-steps", str(steps)))
            for i in range(2)
        ]
        curve, started, training_ended = [], time.monotonic(), None
        while True:
            now = time.monotonic() - started
            if training_ended is None and all(t.proc.poll() is not None for t in trainers):
                training_ended = now
            if training_ended is not None and now - training_ended > after_s:
                break
            distances = []
            for uid in observer.uids:
                try:
                    distances.append(relative_distance(observer.download(ids[0], uid), observer.download(ids[1], uid)))
                except Exception as e:  # a host busy or restarting: skip this sample
                    print(f"sample skipped: {e}", file=sys.stderr)
            if distances:
                curve.append({"t_s": round(now, 1), "training": training_ended is None, "max": max(distances), "mean": statistics.fmean(distances)})
            time.sleep(sample_s)
        rounds = sum(h.stderr().count("Replica sync") for h in hosts)
        return {
            "scenario": "sync",
            "sync_period_s": observer.config.experts.sync_period,
            "steps_per_trainer": steps,
            "sync_rounds_logged": rounds,
            "max_distance_while_training": max((c["max"] for c in curve if c["training"]), default=None),
            "max_distance_at_end": curve[-1]["max"] if curve else None,
            "distance_curve": curve,
        }
    finally:
        if observer is not None:
            observer.close()
        launcher.stop_all()


def byzantine_host(config: Path, work: Path, steps: int) -> dict:
    clean = _expert_run(config, work / "clean", steps, attacked=False)
    attacked = _expert_run(config, work / "attacked", steps, attacked=True)
    ratio = attacked["final_loss"] / clean["final_loss"] if clean["final_loss"] and attacked["final_loss"] else None
    return {"scenario": "byzantine_host", "steps": steps, "clean": clean, "attacked": attacked, "ratio": ratio}


def _expert_run(config: Path, work: Path, steps: int, attacked: bool) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    launcher = PeerLauncher(work)
    try:
        initial = launcher.bootstrap().initial_peers()
        honest = launcher.start("host-honest", peer_args(config, initial, work / "host-honest", "--no-train", "--experts", "all"))
        extra = ("--expert-attack", "scale_outputs") if attacked else ()
        other = launcher.start("host-other", peer_args(config, initial, work / "host-other", "--no-train", "--experts", "all", *extra))
        other_id = other.peer_id()
        for host in (honest, other):
            host.wait_for_log("Serving 8 expert(s)", 120)
        stats = [work / f"trainer{i}.jsonl" for i in range(2)]
        trainers = [
            launcher.start(f"trainer{i}", peer_args(config, initial, work / f"trainer{i}", "--no-host", "--max-steps", str(steps), "--stats-file", str(stats[i])))
            for i in range(2)
        ]
        for trainer in trainers:
            trainer.wait(timeout=600)
        finals, bans = [], []
        for trainer, path in zip(trainers, stats):
            records = read_stats(path)
            finals.extend(r["loss"] for r in records[-3:])
            bans.append(sum(1 for line in trainer.stderr().splitlines() if other_id[-8:] in line and "ban" in line.lower()))
        return {
            "final_loss": statistics.fmean(finals) if finals else None,
            "ban_log_lines_per_trainer": bans,
            "trainer_exit_codes": [t.proc.returncode for t in trainers],
        }
    finally:
        launcher.stop_all()


def main(argv: list[str] | None = None) -> None:
    stop_peers_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=("takeover", "sync", "byzantine_host", "all"), default="all")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--steps", type=int, default=30, help="micro-batches per trainer (sync, byzantine_host)")
    p.add_argument("--sample-s", type=float, default=3.0, help="sync: seconds between distance samples")
    p.add_argument("--after-s", type=float, default=15.0, help="sync: seconds to keep sampling after training")
    p.add_argument("--keep-logs", type=Path, default=None, help="put the peers' logs here instead of a temporary folder")
    args = p.parse_args(argv)
    work = args.keep_logs or Path(tempfile.mkdtemp(prefix="dragon-experts-"))
    work.mkdir(parents=True, exist_ok=True)
    scenarios = ("takeover", "sync", "byzantine_host") if args.scenario == "all" else (args.scenario,)
    results = {}
    for name in scenarios:
        (work / name).mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        if name == "takeover":
            result = takeover(args.config, work / name)
        elif name == "sync":
            result = sync(args.config, work / name, args.steps, args.sample_s, args.after_s)
        else:
            result = byzantine_host(args.config, work / name, args.steps)
        result["wall_s"] = round(time.monotonic() - started, 1)
        results[name] = result
    print(json.dumps(results if len(results) > 1 else results[scenarios[0]]))


if __name__ == "__main__":
    main()
