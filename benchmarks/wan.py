"""Training throughput over an emulated WAN: real peers on loopback, each behind its own userspace link
(``benchmarks.wan_link``: one-way delay, rate cap per direction). Prints one JSON object.

    python -m benchmarks.wan --peers 2 --steps 10 --delay-ms 25 --mbit 20
    python -m benchmarks.wan --mode remote_experts --peers 4 --steps 30 --delay-ms 50 --mbit 10 --config tests/configs/swarm-test.yaml
    python -m benchmarks.wan --mode local_experts ...   # once the config has training.mode (else: a JSON error)

``remote_experts``: a bootstrap, one expert host (``--no-train --experts all``) and ``--peers`` trainers
(``--no-host --max-steps S --stats-file ...``); every peer, the bootstrap too, listens on a private port and
announces its link's port, so every connection crosses exactly one link: the dialed peer's (RTT = 2 x
``--delay-ms``, the dialed peer's ``--mbit`` cap each way). Then the same swarm again without links, for comparison.

``local_experts``: the same run with ``training.mode: local_experts`` written into a derived copy of the config,
no expert host and trainers without ``--no-host`` (each holds the experts placement gives it and trains them
locally; mind ``training.sync_every`` against ``--steps``). Available only when
``dragon_swarm.config.TrainingSection`` has a ``mode`` field; otherwise it prints
``{"mode": "local_experts", "error": ...}`` and exits 2.

Reported, per trainer and averaged over trainers: ``tokens_per_second``: tokens trained between its first and last
stats record over the wall time between them (start-up excluded); ``bytes_per_token``: bytes it sent over the
links in that same window (read from the links' counters, sampled while it trains) per token;
``total_bytes_per_token``: everything it sent from start to exit, start-up included, per token it trained.
A trainer's sent bytes are its own link's ``bytes_out`` (connections others dialed to it) plus what it sent into
other peers' links on connections it dialed (``WanLinks.bytes_sent_by``). ``loopback_tokens_per_second``: the
same trainers with no links.

In the same run (same ``--peers``, so the same CPU share on this machine), the same trainers **alone**, sync off,
no links, all at once: ``alone_tokens_per_second``. ``local_experts``: each trainer its own swarm
(``--new-swarm``) with ``training.sync_every`` huge (no outer step, nothing sent); ``remote_experts``: each trainer
its own swarm hosting ``--experts all`` itself (its experts in its own process). The swarm-side window ends on a
round boundary in ``local_experts`` (it holds whole rounds: ``sync_every`` micro-batches and one outer step each).

Learning: ``val_loss``: the swarm's model after the run (the trainers' and the host's state dirs assembled with
``python -m dragon_swarm.export``; in ``local_experts`` the trunk saved is the start of the round after the last
outer step) on the config's held-out split (``training.evaluation``, ``--eval-batches`` fixed batches of 8);
``single_process_val_loss``: the same model (same init) trained in this process on as many tokens as all trainers
together, micro-batch by micro-batch, with the config's inner optimizer (trunk AdamW with warm-up, each expert its own
AdamW at ``expert_lr``, clipping as the peers do), evaluated the same way. Every derived config sets
``training.eval_every: 0``: the peers do not evaluate during the timed window; this script evaluates afterwards.

``--project-125m``: from the measured bytes one trainer sends per outer round (``local_experts``), the bytes per
hour one ``hrm-smoe-125m`` volunteer would send (scaled by the trunk size ratio, ``count_parameters``, and by the
averaging codec's bytes per value), for micro-batch times given by ``--mb-seconds``, against the original plan's
660 MB/hour.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.local_peers import REPO_ROOT, PeerLauncher, PeerProcess, read_stats
from benchmarks.wan_peers import PeerLink, WanLinks

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "tests" / "configs" / "swarm-test.yaml"
SAMPLE_S = 0.25  # how often the links' counters are read while the trainers train
MODES = ("remote_experts", "local_experts")


def peer_args(config: Path, initial_peers: list[str], state_dir: Path, *extra: str) -> list[str]:
    return ["-c", str(config), "--initial-peers", *initial_peers, "--state-dir", str(state_dir), *extra]


def local_experts_config(config: Path, work: Path) -> Path | None:
    """A copy of ``config`` with ``training.mode: local_experts``, or None while the schema has no such field."""
    from dragon_swarm.config import TrainingSection

    if "mode" not in TrainingSection.model_fields:
        return None
    data = yaml.safe_load(config.read_text())
    data.setdefault("training", {})["mode"] = "local_experts"
    derived = work / f"{config.stem}-local-experts.yaml"
    derived.write_text(yaml.safe_dump(data, sort_keys=False))
    return derived


def _expert_count(config: Path) -> int:
    from dragon_swarm.config import load_config

    m = load_config(str(config)).model
    return m.num_moe_layers * m.num_experts


def _bytes_at(samples: list[tuple[float, int]], t: float) -> float:
    """The counter at wall time ``t``, linearly interpolated between the samples around it."""
    times = [s[0] for s in samples]
    i = bisect.bisect_left(times, t)
    if i == 0:
        return float(samples[0][1])
    if i >= len(samples):
        return float(samples[-1][1])
    (t0, b0), (t1, b1) = samples[i - 1], samples[i]
    return b0 + (b1 - b0) * (t - t0) / (t1 - t0) if t1 > t0 else float(b1)


def run_swarm(
    config: Path, work: Path, trainers: int, steps: int, *, delay_ms: float | None, mbit: float | None,
    expert_host: bool = True, timeout: float = 900.0,
) -> dict:  # fmt: skip
    """One swarm; ``delay_ms=None``: no links at all (loopback). Returns the per-trainer results."""
    work.mkdir(parents=True, exist_ok=True)
    launcher = PeerLauncher(work)
    links = WanLinks()
    use_links = delay_ms is not None

    def flags() -> tuple[PeerLink | None, list[str]]:
        if not use_links:
            return None, []
        peer = links.new(delay_ms or 0.0, mbit)
        return peer, peer.flags

    try:
        _, bootstrap_flags = flags()
        bootstrap = launcher.bootstrap("bootstrap", *bootstrap_flags)
        initial = bootstrap.initial_peers()
        if expert_host:
            _, host_flags = flags()
            host = launcher.start("host", peer_args(config, initial, work / "host", "--no-train", "--experts", "all", *host_flags))
            host.wait_for_log(f"Serving {_expert_count(config)} expert(s)", timeout=240)
        stats = [work / f"trainer{i}.jsonl" for i in range(trainers)]
        procs: list[PeerProcess] = []
        trainer_links: list[PeerLink | None] = []
        for i in range(trainers):
            link, trainer_flags = flags()
            trainer_links.append(link)
            # local_experts trainers hold (placement picks) and train their own experts: no --no-host there
            role = ["--no-host"] if expert_host else []
            args = peer_args(config, initial, work / f"trainer{i}", *role, "--max-steps", str(steps), "--stats-file", str(stats[i]))
            procs.append(launcher.start(f"trainer{i}", [*args, *trainer_flags]))
        samples: list[list[tuple[float, int]]] = [[] for _ in range(trainers)]
        deadline = time.monotonic() + timeout
        while any(p.proc.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"trainers did not finish {steps} steps in {timeout} s")
            now = time.time()
            for i, link in enumerate(trainer_links):
                if link is not None:
                    samples[i].append((now, links.bytes_sent_by(link)))
            time.sleep(SAMPLE_S)
        results = []
        for i, (proc, path, link) in enumerate(zip(procs, stats, trainer_links)):
            records = read_stats(path)
            result: dict = {"exit_code": proc.proc.returncode, "micro_batches": len(records)}
            if proc.proc.returncode != 0:
                result["stderr_tail"] = proc.stderr()[-1500:]
            if len(records) >= 2:
                first, last = records[0], records[-1]
                window_tokens = last["tokens"] - first["tokens"]
                window_s = last["time"] - first["time"]
                result.update(tokens=last["tokens"], window_s=round(window_s, 2), tokens_per_second=window_tokens / window_s if window_s > 0 else None)
                if link is not None:
                    total = links.bytes_sent_by(link)
                    sent = _bytes_at(samples[i], last["time"]) - _bytes_at(samples[i], first["time"])
                    result.update(
                        bytes_sent=total,
                        bytes_received=links.bytes_received_by(link),
                        own_link_bytes_out=link.link.bytes_out,
                        bytes_per_token=sent / window_tokens if window_tokens else None,
                        total_bytes_per_token=total / last["tokens"] if last["tokens"] else None,
                    )
            results.append(result)
        # bytes the links could not attribute to a dialer: nonzero means bytes_sent undercounts
        return {"trainers": results, "unattributed_bytes": links.unattributed_bytes() if use_links else None}
    finally:
        launcher.stop_all()
        links.stop_all()  # after the peers: they leave through their links


def _mean(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def run(mode: str, config: Path, work: Path, peers: int, steps: int, delay_ms: float, mbit: float | None, loopback: bool, timeout: float) -> dict:
    expert_host = mode == "remote_experts"
    started = time.monotonic()
    wan = run_swarm(config, work / "wan", peers, steps, delay_ms=delay_ms, mbit=mbit, expert_host=expert_host, timeout=timeout)
    wan_s = time.monotonic() - started
    base = None
    if loopback:
        base = run_swarm(config, work / "loopback", peers, steps, delay_ms=None, mbit=None, expert_host=expert_host, timeout=timeout)
    tps = _mean(wan["trainers"], "tokens_per_second")
    loop_tps = _mean(base["trainers"], "tokens_per_second") if base else None
    return {
        "mode": mode,
        "peers": peers,
        "steps": steps,
        "delay_ms": delay_ms,
        "rtt_ms": 2 * delay_ms,
        "mbit": mbit,
        "tokens_per_second": tps,  # mean over trainers
        "loopback_tokens_per_second": loop_tps,
        "slowdown": loop_tps / tps if tps and loop_tps else None,
        "bytes_per_token": _mean(wan["trainers"], "bytes_per_token"),
        "total_bytes_per_token": _mean(wan["trainers"], "total_bytes_per_token"),
        "unattributed_bytes": wan["unattributed_bytes"],
        "per_trainer": wan["trainers"],
        "loopback_per_trainer": base["trainers"] if base else None,
        "wan_wall_s": round(wan_s, 1),
        "wall_s": round(time.monotonic() - started, 1),
        "logs": str(work),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="remote_experts")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--peers", type=int, default=2, help="trainers (besides the bootstrap and the expert host)")
    p.add_argument("--steps", type=int, default=10, help="micro-batches per trainer")
    p.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay of every link (RTT = 2x)")
    p.add_argument("--mbit", type=float, default=20.0, help="rate cap of every link, each direction, Mbit/s (0: none)")
    p.add_argument("--no-loopback", action="store_true", help="skip the comparison run without links")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the trainers, per run")
    p.add_argument("--keep-logs", type=Path, default=None, help="put the peers' logs here instead of a temporary folder")
    args = p.parse_args(argv)
    if args.peers < 1 or args.steps < 2:
        p.error("--peers must be >= 1 and --steps >= 2 (throughput is measured between the first and last step)")
    if args.delay_ms < 0 or args.mbit < 0:
        p.error("--delay-ms and --mbit must be >= 0")
    work = args.keep_logs or Path(tempfile.mkdtemp(prefix="dragon-wan-"))
    work.mkdir(parents=True, exist_ok=True)
    config = args.config
    if args.mode == "local_experts":
        derived = local_experts_config(config, work)
        if derived is None:
            print(json.dumps({"mode": args.mode, "error": "local_experts mode is not available yet: the config has no training.mode"}))
            return 2
        config = derived
    result = run(args.mode, config, work, args.peers, args.steps, args.delay_ms, args.mbit or None, not args.no_loopback, args.timeout)
    print(json.dumps(result))
    return 0 if all(t["exit_code"] == 0 for t in result["per_trainer"]) else 1


if __name__ == "__main__":
    sys.exit(main())
