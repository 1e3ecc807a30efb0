"""Verification by recomputation on a real loopback swarm, as JSON: detection, false accusations, cost.

    .venv/bin/python -m benchmarks.verification_swarm --trainers 4 --liars 1 --steps 60 --checks-per-round 1

Starts a bootstrap, one expert host (all experts) and `--trainers` trainers, `--liars` of them with the hidden
`--attack other_batch` (honest-looking gradients of batches they did not commit to), all on the test config with
verification on. Honest trainers run `--steps` micro-batches; liars run until the honest ones are done. From the
logs: every check made (round, checker, sender, verdict, seconds), the round each liar was first caught in and
first banned by each honest trainer, any accusation of an honest trainer, and each trainer's own summary line
(check seconds as a share of its training time).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import yaml

from benchmarks.local_peers import PeerLauncher, read_stats, stop_peers_on_sigterm
from tests.swarm.paths import TEST_CONFIG

VERIFIED = re.compile(
    r"Verified round (\d+) of trainer (\w+) by recomputation \((\d+) micro-batch\(es\), ([\d.]+) MB record, ([\d.]+) s.*\): (honest|LIE), error (\S+)"
)
SKIPPED = re.compile(r"Round (\d+) of trainer (\w+) not checked: (.*)")
LIED = re.compile(r"Trainer (\w+) lied in round (\d+)")
CONFIRMED = re.compile(r"Confirmed evidence against trainer (\w+) \(round (\d+)\)")
SUMMARY = re.compile(r"Verification summary: (\d+) round\(s\) recomputed in ([\d.]+) s = ([\d.]+)% of ([\d.]+) s training")


def main() -> None:
    stop_peers_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainers", type=int, default=4)
    p.add_argument("--liars", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--checks-per-round", type=int, default=1)
    p.add_argument("--work-dir", type=Path, default=None)
    args = p.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dragon-verify-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = yaml.safe_load(TEST_CONFIG.read_text())
    settings["averaging"]["matchmaking_time"] = 3.0  # several processes share the cores: all of them in one group
    settings["verification"] = {"enabled": True, "checks_per_round": args.checks_per_round}
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    launcher = PeerLauncher(work)
    try:
        boot = launcher.start("boot", ["--identity", str(work / "boot.key")], module="dragon_swarm.bootstrap")
        common = ["-c", str(config), "--initial-peers", *boot.initial_peers()]
        host = launcher.start("host", [*common, "--no-train", "--experts", "all", "--state-dir", str(work / "host")])
        host.wait_for_log("Serving", timeout=180)
        trainers = []
        for i in range(args.trainers):
            liar = i >= args.trainers - args.liars
            extra = ["--attack", "other_batch"] if liar else ["--max-steps", str(args.steps)]
            stats = work / f"trainer{i}.jsonl"
            process = launcher.start(f"trainer{i}", [*common, "--no-host", "--state-dir", str(work / f"t{i}"), "--stats-file", str(stats), *extra])
            trainers.append((process, liar, stats))
        for process, liar, _ in trainers:
            if not liar:
                process.wait(timeout=3600)
        for process, liar, _ in trainers:
            if liar:
                process.stop()
        print(json.dumps(report(trainers, args), indent=None))
    finally:
        launcher.stop_all()


def report(trainers, args) -> dict:
    ids = {process.name: process.peer_id() for process, _, _ in trainers}
    short = {peer[-8:]: name for name, peer in ids.items()}
    liars = {process.name for process, liar, _ in trainers if liar}
    checks, skipped, caught, confirmed, summaries, rounds = [], 0, {}, {}, {}, 0
    for process, liar, stats in trainers:
        log = process.stderr()
        for m in VERIFIED.finditer(log):
            checks.append({"round": int(m[1]), "checker": process.name, "sender": short.get(m[2], m[2]), "micro_batches": int(m[3]),
                           "record_mb": float(m[4]), "seconds": float(m[5]), "verdict": m[6], "error": float(m[7])})  # fmt: skip
        skipped += len(SKIPPED.findall(log))
        for m in LIED.finditer(log):
            caught.setdefault(short.get(m[1], m[1]), []).append({"by": process.name, "round": int(m[2])})
        for m in CONFIRMED.finditer(log):
            confirmed.setdefault(short.get(m[1], m[1]), []).append({"by": process.name, "round": int(m[2])})
        summary = SUMMARY.search(log)
        if summary:
            summaries[process.name] = {"checks": int(summary[1]), "check_s": float(summary[2]), "share_percent": float(summary[3]), "train_s": float(summary[4])}
        records = read_stats(stats) if stats.exists() else []
        if records and not liar:
            rounds = max(rounds, int(records[-1]["epoch"]))
        if not liar and records:
            banned = [r for r in records if any(ids[l] in r["banned_peers"] for l in liars)]
            summaries.setdefault(process.name, {})["liar_banned_from_epoch"] = int(banned[0]["epoch"]) if banned else None
    honest_checks = [c for c in checks if c["sender"] not in liars]
    liar_checks = [c for c in checks if c["sender"] in liars]
    return {
        "trainers": args.trainers, "liars": args.liars, "steps": args.steps, "checks_per_round": args.checks_per_round,
        "rounds": rounds, "checks": len(checks), "skipped": skipped,
        "honest_checks": len(honest_checks), "honest_accused": sum(c["verdict"] == "LIE" for c in honest_checks),
        "honest_max_error": max((c["error"] for c in honest_checks), default=None),
        "liar_checks": len(liar_checks), "liar_checks_caught": sum(c["verdict"] == "LIE" for c in liar_checks),
        "first_caught_round": {l: min((c["round"] for c in caught.get(l, [])), default=None) for l in liars},
        "confirmed_by": {l: sorted({c["by"] for c in confirmed.get(l, [])}) for l in liars},
        "mean_check_s": round(sum(c["seconds"] for c in checks) / len(checks), 3) if checks else None,
        "mean_record_mb": round(sum(c["record_mb"] for c in checks) / len(checks), 2) if checks else None,
        "per_trainer": summaries,
    }  # fmt: skip


if __name__ == "__main__":
    main()
