"""Training throughput over an emulated WAN: real peers on loopback, each behind its own userspace link
(``benchmarks.wan_link``: one-way delay, rate cap per direction). Prints one JSON object.

    python -m benchmarks.wan --peers 2 --steps 10 --delay-ms 25 --mbit 20
    python -m benchmarks.wan --mode remote_experts --peers 4 --steps 30 --delay-ms 50 --mbit 10 --config tests/configs/swarm-test.yaml
    python -m benchmarks.wan --mode remote_experts --in-flight 2 ...   # 2 micro-batches in flight per trainer
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
AdamW at ``expert_lr``, clipping as the peers do), evaluated the same way. ``global_batch_val_loss``: the same, on
the same tokens in ``--peers`` times larger micro-batches (synchronous data-parallel training of the trainers, the
baseline DiLoCo compares against), with ``val_loss_ratio_global_batch``. Every derived config sets
``training.eval_every: 0``: the peers do not evaluate during the timed window; this script evaluates afterwards.

``--project-125m``: from the measured bytes one trainer sends per outer round (``local_experts``), the bytes per
hour one ``hrm-smoe-125m`` volunteer would send (the measured overhead over the protocol's own bytes,
``round_bytes_model``, carried over to the 125m trunk, its ``training.outer_compression`` and
``--held-experts-125m`` experts held by 2 volunteers each), for micro-batch times given by ``--mb-seconds``, against
the original plan's 660 MB/hour. The hosts' expert announcements are paid per second, not per round
(``ANNOUNCE_BYTES_PER_EXPERT`` every ``experts.update_period``): they are taken out of the measured round before
the overhead is computed and added back per hour of the target.
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

from benchmarks.local_peers import REPO_ROOT, PeerLauncher, PeerProcess, read_stats, stop_peers_on_sigterm
from benchmarks.wan_peers import PeerLink, WanLinks

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "tests" / "configs" / "swarm-test.yaml"
SAMPLE_S = 0.25  # how often the links' counters are read while the trainers train
MODES = ("remote_experts", "local_experts")
NO_SYNC = 10**9  # training.sync_every of the "alone" local-expert trainers: no outer step ever happens
DEFAULT_EVAL_BATCHES = 16  # x 8 held-out sequences: the config's eval_batches (2 in swarm-test) is too noisy to compare
PLAN_BYTES_PER_HOUR = 660e6  # the original plan's budget per volunteer
TARGET_125M = Path(__file__).resolve().parent.parent / "configs" / "hrm-smoe-125m.yaml"
CODEC_BYTES_PER_VALUE = {"none": 4.0, "fp16": 2.0, "uniform8bit": 1.0, "quantile8bit": 1.0, "blockwise8bit": 1.0}
EXPERT_DELTA_BYTES_PER_VALUE = 1.0 + 4.0 / 64  # moe.round_delta: an int8 code per weight, a float32 scale per 64
# what one announcement of one held expert (our signed replica record and hivemind's stock record, each stored on
# the DHT's 5 nearest nodes) costs its host: `python -m benchmarks.registry_traffic --nodes 5 --experts 8 --rows 1
# --update-period 5 --seconds 30` measured 134,836 bytes per announcement of 8 experts. The same per expert whether
# they share a MoE layer or not: the signed and stock phases of `--experts 8 --rows 2` (dragon-tiny's layout) sum to
# 17,420 bytes per expert, of `--experts 16 --rows 8` (hrm-smoe-125m's: 8 layers) to 17,378
ANNOUNCE_BYTES_PER_EXPERT = 16_855.0


def peer_args(config: Path, initial_peers: list[str], state_dir: Path, *extra: str) -> list[str]:
    return ["-c", str(config), "--initial-peers", *initial_peers, "--state-dir", str(state_dir), *extra]


def derived_config(config: Path, work: Path, name: str, **training: object) -> Path:
    """A copy of ``config`` with ``training`` fields overridden, written into ``work``."""
    data = yaml.safe_load(config.read_text())
    data.setdefault("training", {}).update(training)
    derived = work / f"{config.stem}-{name}.yaml"
    derived.write_text(yaml.safe_dump(data, sort_keys=False))
    return derived


def local_experts_config(config: Path, work: Path) -> Path | None:
    """A copy of ``config`` with ``training.mode: local_experts``, or None while the schema has no such field."""
    from dragon_swarm.config import TrainingSection

    if "mode" not in TrainingSection.model_fields:
        return None
    return derived_config(config, work, "local-experts", mode="local_experts")


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


def timed_window(records: list[dict], round_len: int | None) -> tuple[dict, dict]:
    """(first, last) stats records of the timed window: from the first to the last record, start-up excluded.
    With ``round_len`` (local_experts, outer step after every ``round_len``-th micro-batch) the window starts at the
    first record after the first outer step (that step also waits for the slowest trainer to start up) and ends
    ``k * round_len`` micro-batches later, ``k`` as large as the records allow, so it holds exactly ``k`` whole rounds
    (``k * round_len`` micro-batches and ``k`` outer steps). Falls back to a shorter start when the records hold no
    whole round after the first one. Pure."""
    first, last = records[0], records[-1]
    if not round_len:
        return first, last
    by_mb = {r["micro_batches"]: r for r in records}
    for start_mb in (first["micro_batches"] + round_len, first["micro_batches"]):
        start = by_mb.get(start_mb)
        if start is None:
            continue
        ends = [r for r in records if r["micro_batches"] > start_mb and (r["micro_batches"] - start_mb) % round_len == 0]
        if ends:
            return start, ends[-1]
    return first, last


def bytes_window(records: list[dict], first: dict, last: dict, round_len: int | None) -> tuple[dict, dict]:
    """(start, end) records between which a trainer's bytes are counted: the timed window, each end moved on to the
    first record whose model version shows every outer round with its boundary up to there applied. A synchronous
    round is applied at its boundary (nothing moves); an overlapped one (``training.outer_overlap``) sends its bytes
    after the boundary and is applied some micro-batches later, so the window's last round is counted whole and the
    round before its first is not counted in it. Pure."""
    if not round_len:
        return first, last

    def applied(edge: dict) -> dict:
        rounds = edge["micro_batches"] // round_len
        later = [r for r in records if r["micro_batches"] >= edge["micro_batches"] and r.get("epoch", rounds) >= rounds]
        return later[0] if later else records[-1]

    return applied(first), applied(last)


def _collect(procs, stats, trainer_links, samples, links, round_len) -> list[dict]:
    results = []
    for i, (proc, path, link) in enumerate(zip(procs, stats, trainer_links)):
        records = read_stats(path)
        result: dict = {"exit_code": proc.proc.returncode, "micro_batches": len(records)}
        if proc.proc.returncode != 0:
            result["stderr_tail"] = proc.stderr()[-1500:]
        if len(records) >= 2:
            first, last = timed_window(records, round_len)
            window_tokens = last["tokens"] - first["tokens"]
            window_s = last["time"] - first["time"]
            result.update(
                tokens=records[-1]["tokens"], window_micro_batches=last["micro_batches"] - first["micro_batches"],
                window_s=round(window_s, 2), tokens_per_second=window_tokens / window_s if window_s > 0 else None,
                experts_held=records[-1].get("experts_online"), loss_first=records[0]["loss"], loss_last=records[-1]["loss"],
            )  # fmt: skip
            if round_len:
                result["window_rounds"] = (last["micro_batches"] - first["micro_batches"]) // round_len
                result["rounds"] = records[-1]["epoch"]
            if link is not None:
                total = links.bytes_sent_by(link)
                start, end = bytes_window(records, first, last, round_len)
                sent = _bytes_at(samples[i], end["time"]) - _bytes_at(samples[i], start["time"])
                result.update(
                    bytes_sent=total,
                    window_bytes_sent=round(sent),
                    bytes_received=links.bytes_received_by(link),
                    own_link_bytes_out=link.link.bytes_out,
                    bytes_per_token=sent / window_tokens if window_tokens else None,
                    total_bytes_per_token=total / records[-1]["tokens"] if records[-1]["tokens"] else None,
                )
                if round_len and result["window_rounds"]:
                    result["bytes_per_round"] = sent / result["window_rounds"]
        results.append(result)
    return results


def _wait_all(procs: list[PeerProcess], timeout: float, steps: int, on_tick=None) -> None:
    deadline = time.monotonic() + timeout
    while any(p.proc.poll() is None for p in procs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"trainers did not finish {steps} steps in {timeout} s")
        if on_tick is not None:
            on_tick()
        time.sleep(SAMPLE_S)


def run_swarm(
    config: Path, work: Path, trainers: int, steps: int, *, delay_ms: float | None, mbit: float | None,
    expert_host: bool = True, timeout: float = 900.0, round_len: int | None = None,
) -> dict:  # fmt: skip
    """One swarm; ``delay_ms=None``: no links at all (loopback). Returns the per-trainer results and the state dirs
    (trainers', then the expert host's) for export."""
    work.mkdir(parents=True, exist_ok=True)
    launcher = PeerLauncher(work)
    links = WanLinks()
    use_links = delay_ms is not None
    state_dirs = [work / f"trainer{i}" for i in range(trainers)] + ([work / "host"] if expert_host else [])

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

        def sample() -> None:
            now = time.time()
            for i, link in enumerate(trainer_links):
                if link is not None:
                    samples[i].append((now, links.bytes_sent_by(link)))

        _wait_all(procs, timeout, steps, sample)
        sample()
        results = _collect(procs, stats, trainer_links, samples, links, round_len)
        # bytes the links could not attribute to a dialer: nonzero means bytes_sent undercounts
        return {"trainers": results, "unattributed_bytes": links.unattributed_bytes() if use_links else None, "state_dirs": state_dirs}
    finally:
        launcher.stop_all()  # SIGTERM first: trainers and host save their trunk and experts
        links.stop_all()  # after the peers: they leave through their links


def run_alone(config: Path, work: Path, trainers: int, steps: int, *, mode: str, timeout: float, round_len: int | None) -> dict:
    """The same trainers, all at once (same CPU share), each alone in its own swarm, no links, sync off."""
    work.mkdir(parents=True, exist_ok=True)
    launcher = PeerLauncher(work)
    if mode == "local_experts":
        config = derived_config(config, work, "alone", sync_every=NO_SYNC)
        role: list[str] = []
    else:
        role = ["--experts", "all"]  # hosts its experts in its own process and trains on them
    try:
        stats = [work / f"trainer{i}.jsonl" for i in range(trainers)]
        procs = [
            launcher.start(f"trainer{i}", ["-c", str(config), "--new-swarm", "--state-dir", str(work / f"trainer{i}"), *role,
                                          "--max-steps", str(steps), "--stats-file", str(stats[i])])
            for i in range(trainers)
        ]  # fmt: skip
        _wait_all(procs, timeout, steps)
        return {"trainers": _collect(procs, stats, [None] * trainers, [], None, round_len)}
    finally:
        launcher.stop_all()


def _mean(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.fmean(values) if values else None


# --- learning: the swarm's model and one process's, on the held-out split ---


def load_streams(config):
    from dragon_swarm.data.corpus import default_data_dir
    from dragon_swarm.data.dataset import build_token_stream

    data_dir = default_data_dir()
    return build_token_stream(config.data.source, data_dir, data_dir / "cache", config.data.tokenizer, config.data.val_fraction)


def held_out_set(config, val_stream, num_batches: int):
    from dragon_swarm.training.evaluation import eval_batches

    return eval_batches(val_stream.tokens, config.model.seq_len, num_batches, config.swarm.seed)


def swarm_val_loss(config_path: Path, state_dirs: list[Path], out: Path, eval_set) -> dict:
    """Export the state dirs into one model file (``python -m dragon_swarm.export``), evaluate it on ``eval_set``."""
    from dragon_swarm.generate import load_exported_model
    from dragon_swarm.training.evaluation import evaluate_loss

    dirs = [str(d) for d in state_dirs if d.is_dir()]
    command = [sys.executable, "-m", "dragon_swarm.export", "--from-state-dir", *dirs, "-c", str(config_path), "--out", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"error": f"export failed ({done.returncode}): {done.stderr[-1500:]}"}
    loaded = load_exported_model(out)
    return {
        "val_loss": evaluate_loss(loaded.model, eval_set),
        "model_version": int(loaded.metadata.get("model_version", -1)),
        "experts_missing": json.loads(loaded.metadata.get("experts_missing", "[]")),
        "tokens_trained": int(loaded.metadata.get("tokens_trained", 0)),
    }


def single_process_model(config):
    """The swarm's initial model in one process: the trunk as a trainer seeds it, every expert as its host seeds it."""
    import torch

    from dragon_swarm.export import expert_state_name, fresh_expert_state
    from dragon_swarm.model.dispatch import LocalExperts
    from dragon_swarm.model.hrm_smoe import HRMSMoE
    from dragon_swarm.moe.expert_uids import all_expert_uids, parse_uid

    m = config.model
    experts = LocalExperts.from_config(m)
    torch.manual_seed(config.swarm.seed)  # as the trainers seed their fresh trunk
    model = HRMSMoE(m, experts)
    state = model.state_dict()
    for uid in all_expert_uids(config.expert_prefix, m.num_moe_layers, m.num_experts):
        _, layer, index = parse_uid(uid)
        for name, t in fresh_expert_state(uid, config).items():
            state[expert_state_name(layer, index, name)] = t
    model.load_state_dict(state, strict=True)
    return model


def train_single_process(config, train_stream, micro_batches: int, batch_size: int):
    """``micro_batches`` micro-batches of ``batch_size`` sequences with the peers' inner optimizers: the trunk with
    AdamW (matrices decayed) and the warm-up schedule, clipped to ``clip_grad_norm``; each expert with its own AdamW
    at ``expert_lr``, clipped on its own to ``expert_clip_grad_norm`` (as ``ExpertBackend.on_backward``)."""
    import torch

    from dragon_swarm.training.optim import decay_param_groups, make_adamw
    from dragon_swarm.training.trainer import warmup_schedule

    t, m = config.training, config.model
    model = single_process_model(config)
    trunk = list(model.named_trunk_parameters())
    trunk_params = [p for _, p in trunk]
    inner = torch.optim.AdamW(decay_param_groups(trunk, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, warmup_schedule(t.warmup_steps))
    expert_modules = [e for layer in model.dispatcher.experts for e in layer]
    expert_opts = [make_adamw(e.named_parameters(), t.expert_lr, t.betas, t.weight_decay) for e in expert_modules]
    losses, started = [], time.perf_counter()
    for step in range(micro_batches):
        inputs, targets = train_stream.batch(config.swarm.seed, "wan-single-process", step, batch_size, m.seq_len)
        loss, ce, _ = model.compute_loss(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trunk_params, t.clip_grad_norm)
        inner.step()
        scheduler.step()
        inner.zero_grad(set_to_none=True)
        for module, opt in zip(expert_modules, expert_opts):
            if any(p.grad is not None for p in module.parameters()):  # as a host: only experts that got tokens step
                torch.nn.utils.clip_grad_norm_(list(module.parameters()), t.expert_clip_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
        losses.append(float(ce.detach()))
    elapsed = time.perf_counter() - started
    tokens = micro_batches * batch_size * m.seq_len
    return model, {"micro_batches": micro_batches, "tokens": tokens, "loss_first": losses[0] if losses else None,
                   "loss_last": losses[-1] if losses else None, "tokens_per_second": tokens / elapsed if elapsed else None}  # fmt: skip


# --- the hrm-smoe-125m projection ---


def round_bytes_model(trunk: int, codec_bytes: float, group: int, held_expert_params: int, holders: int) -> float:
    """What one trainer sends per outer round, by the protocol: the butterfly all-reduce of the pseudo-gradient (its
    parts to the other reducers, the aggregate of its own partition back to them: 2 (n-1)/n trunk-sized vectors) and
    the 8-bit delta of each held expert to every other holder (`moe.round_delta`: a byte per weight and a float32
    scale per block). Pure."""
    allreduce = 2.0 * (group - 1) / group * trunk * codec_bytes if group > 1 else 0.0
    return allreduce + held_expert_params * EXPERT_DELTA_BYTES_PER_VALUE * max(holders - 1, 0)


def project_volunteer_bytes_per_hour(
    bytes_per_round: float, measured_config: Path, mb_seconds: list[float], *, peers: int, held_experts: float,
    target_config: Path = TARGET_125M, target_held_experts: int = 16, target_holders: int = 2,
    round_s: float | None = None, announce_bytes_per_expert: float = ANNOUNCE_BYTES_PER_EXPERT,
) -> dict:  # fmt: skip
    """Bytes per hour one local-expert volunteer of ``target_config`` sends, from the bytes one trainer of
    ``measured_config`` sent per outer round. The hosts' expert announcements are paid per second: with the measured
    round's length ``round_s``, ``held_experts`` announced every ``experts.update_period`` are taken out of the
    measured bytes, and the target's ``target_held_experts`` are added back per hour. What is left of the measured
    round over `round_bytes_model` of the measured swarm (``peers`` trainers, each holding ``held_experts`` experts,
    every expert held by all of them) gives the overhead (libp2p framing, DHT, matchmaking, retries), which
    multiplies `round_bytes_model` of the target (the same group, ``target_held_experts`` held by
    ``target_holders`` each). A target round lasts ``sync_every`` micro-batches of ``mb_seconds`` each (the outer
    step's own time is left out: it adds to the round and so lowers the rate)."""
    from dragon_swarm.config import load_config
    from dragon_swarm.model.hrm_smoe import count_parameters

    measured, target = load_config(str(measured_config)), load_config(str(target_config))
    count_m, count_t = count_parameters(measured.model), count_parameters(target.model)
    codec_m = CODEC_BYTES_PER_VALUE.get(measured.training.outer_compression, 4.0)
    codec_t = CODEC_BYTES_PER_VALUE.get(target.training.outer_compression, 4.0)
    model_m = round_bytes_model(count_m["trunk"], codec_m, peers, round(held_experts * count_m["per_expert"]), peers)
    model_t = round_bytes_model(count_t["trunk"], codec_t, peers, target_held_experts * count_t["per_expert"], target_holders)
    announce_m = announce_bytes_per_expert * held_experts * round_s / measured.experts.update_period if round_s else 0.0
    announce_t_per_s = announce_bytes_per_expert * target_held_experts / target.experts.update_period
    overhead = max(bytes_per_round - announce_m, 0.0) / model_m if model_m else 1.0
    per_round = overhead * model_t
    rows = []
    for s in mb_seconds:
        round_s_t = target.training.sync_every * s
        per_hour = per_round * 3600.0 / round_s_t + announce_t_per_s * 3600.0
        rows.append({"micro_batch_s": s, "round_s": round_s_t, "bytes_per_hour": per_hour, "mb_per_hour": per_hour / 1e6, "vs_plan": per_hour / PLAN_BYTES_PER_HOUR})
    return {
        "target_config": str(target_config),
        "measured_bytes_per_round": bytes_per_round,
        "measured_round_s": round_s,
        "announce_bytes_per_round_measured": announce_m,
        "modelled_bytes_per_round_measured": model_m,
        "overhead": overhead,
        "trunk_params_target": count_t["trunk"],
        "codec_target": target.training.outer_compression,
        "held_experts_target": target_held_experts,
        "holders_target": target_holders,
        "group_target": peers,
        "bytes_per_round_target": per_round,
        "announce_mb_per_hour_target": announce_t_per_s * 3600.0 / 1e6,
        "sync_every_target": target.training.sync_every,
        "plan_mb_per_hour": PLAN_BYTES_PER_HOUR / 1e6,
        "rows": rows,
    }


def run(
    mode: str, config: Path, work: Path, peers: int, steps: int, delay_ms: float, mbit: float | None, loopback: bool,
    timeout: float, *, alone: bool = True, learning: bool = True, eval_batches: int = DEFAULT_EVAL_BATCHES,
) -> dict:  # fmt: skip
    from dragon_swarm.config import load_config

    expert_host = mode == "remote_experts"
    cfg = load_config(str(config))
    round_len = cfg.training.sync_every if mode == "local_experts" else None
    started = time.monotonic()
    wan = run_swarm(config, work / "wan", peers, steps, delay_ms=delay_ms, mbit=mbit, expert_host=expert_host, timeout=timeout, round_len=round_len)
    wan_s = time.monotonic() - started
    eval_set = train_stream = None
    swarm = None
    if learning:
        train_stream, val_stream = load_streams(cfg)
        eval_set = held_out_set(cfg, val_stream, eval_batches)
        swarm = swarm_val_loss(config, wan["state_dirs"], work / "wan" / "model.safetensors", eval_set)
    base = None
    if loopback:
        base = run_swarm(config, work / "loopback", peers, steps, delay_ms=None, mbit=None, expert_host=expert_host, timeout=timeout, round_len=round_len)
    lone = run_alone(config, work / "alone", peers, steps, mode=mode, timeout=timeout, round_len=round_len) if alone else None
    tps = _mean(wan["trainers"], "tokens_per_second")
    loop_tps = _mean(base["trainers"], "tokens_per_second") if base else None
    alone_tps = _mean(lone["trainers"], "tokens_per_second") if lone else None
    result = {
        "mode": mode,
        "config": str(config),
        "peers": peers,
        "steps": steps,
        "delay_ms": delay_ms,
        "rtt_ms": 2 * delay_ms,
        "mbit": mbit,
        "outer_overlap": cfg.training.outer_overlap if mode == "local_experts" else None,
        "micro_batches_in_flight": cfg.training.micro_batches_in_flight,
        "target_batch_size": cfg.training.target_batch_size,
        "tokens_per_second": tps,  # mean over trainers
        "alone_tokens_per_second": alone_tps,
        "over_alone": tps / alone_tps if tps and alone_tps else None,
        "loopback_tokens_per_second": loop_tps,
        "over_loopback": tps / loop_tps if tps and loop_tps else None,
        "slowdown": loop_tps / tps if tps and loop_tps else None,
        "bytes_per_token": _mean(wan["trainers"], "bytes_per_token"),
        "total_bytes_per_token": _mean(wan["trainers"], "total_bytes_per_token"),
        "bytes_per_round": _mean(wan["trainers"], "bytes_per_round"),
        "unattributed_bytes": wan["unattributed_bytes"],
    }
    if learning:
        tokens = sum(r.get("tokens", 0) for r in wan["trainers"])
        batch = cfg.training.batch_size
        micro_batches = tokens // (batch * cfg.model.seq_len)
        model, single = train_single_process(cfg, train_stream, micro_batches, batch)
        from dragon_swarm.training.evaluation import evaluate_loss

        single["val_loss"] = evaluate_loss(model, eval_set)
        # the same tokens in peers-times larger micro-batches: what synchronous data-parallel training of these
        # trainers would compute (DiLoCo's baseline), against the stricter one-trainer-batch figure above
        model, synced = train_single_process(cfg, train_stream, micro_batches // peers, batch * peers)
        synced["val_loss"] = evaluate_loss(model, eval_set)
        result.update(
            val_loss=swarm.get("val_loss"),
            single_process_val_loss=single["val_loss"],
            val_loss_ratio=swarm["val_loss"] / single["val_loss"] if swarm.get("val_loss") else None,
            global_batch_val_loss=synced["val_loss"],
            val_loss_ratio_global_batch=swarm["val_loss"] / synced["val_loss"] if swarm.get("val_loss") else None,
            eval_sequences=sum(len(t) for t, _ in eval_set),
            swarm_model=swarm,
            single_process=single,
            global_batch=synced,
        )
    result.update(
        per_trainer=wan["trainers"],
        loopback_per_trainer=base["trainers"] if base else None,
        alone_per_trainer=lone["trainers"] if lone else None,
        wan_wall_s=round(wan_s, 1),
        wall_s=round(time.monotonic() - started, 1),
        logs=str(work),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    stop_peers_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="remote_experts")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--peers", type=int, default=2, help="trainers (besides the bootstrap and the expert host)")
    p.add_argument("--steps", type=int, default=10, help="micro-batches per trainer")
    p.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay of every link (RTT = 2x)")
    p.add_argument("--mbit", type=float, default=20.0, help="rate cap of every link, each direction, Mbit/s (0: none)")
    p.add_argument("--no-loopback", action="store_true", help="skip the comparison run without links")
    p.add_argument("--no-alone", action="store_true", help="skip the comparison run of the trainers alone, sync off")
    p.add_argument("--no-learning", action="store_true", help="skip val_loss and single_process_val_loss")
    p.add_argument("--eval-batches", type=int, default=DEFAULT_EVAL_BATCHES, help="held-out batches of 8 sequences")
    p.add_argument("--project-125m", action="store_true", help="local_experts: project bytes/hour of an hrm-smoe-125m volunteer")
    p.add_argument("--mb-seconds", type=float, nargs="+", default=[0.5, 2.0, 40.0],
                   help="hrm-smoe-125m micro-batch times to project for (default: fast GPU, slow GPU, 2-core CPU)")  # fmt: skip
    p.add_argument("--held-experts-125m", type=int, default=16,
                   help="--project-125m: experts one hrm-smoe-125m volunteer holds (each held by 2), of 128")
    p.add_argument("--sync-every", type=int, default=None, help="local_experts: training.sync_every of the swarm (default: the config's)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="local_experts: training.outer_overlap of the swarm (default: the config's)")
    p.add_argument("--in-flight", type=int, default=1,
                   help="remote_experts: micro-batches each trainer computes at once (training.micro_batches_in_flight)")
    p.add_argument("--target-batch", type=int, default=None,
                   help="training.target_batch_size of the swarm (default: the config's): micro-batches per model version")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the trainers, per run")
    p.add_argument("--keep-logs", type=Path, default=None, help="put the peers' logs here instead of a temporary folder")
    args = p.parse_args(argv)
    if args.peers < 1 or args.steps < 2:
        p.error("--peers must be >= 1 and --steps >= 2 (throughput is measured between the first and last step)")
    if args.delay_ms < 0 or args.mbit < 0:
        p.error("--delay-ms and --mbit must be >= 0")
    if args.in_flight < 1 or (args.in_flight > 1 and args.mode != "remote_experts"):
        p.error("--in-flight must be >= 1, and more than 1 only with --mode remote_experts")
    if args.project_125m and args.mode != "local_experts":
        p.error("--project-125m needs --mode local_experts (it scales the bytes of an outer round)")
    work = args.keep_logs or Path(tempfile.mkdtemp(prefix="dragon-wan-"))
    work.mkdir(parents=True, exist_ok=True)
    config = args.config
    if args.mode == "local_experts":
        derived = local_experts_config(config, work)
        if derived is None:
            print(json.dumps({"mode": args.mode, "error": "local_experts mode is not available yet: the config has no training.mode"}))
            return 2
        config = derived
    # the peers do not evaluate during the timed window (this script evaluates afterwards)
    overrides = {"micro_batches_in_flight": args.in_flight} if args.in_flight > 1 else {}
    if args.target_batch is not None:
        overrides["target_batch_size"] = args.target_batch
    if args.sync_every is not None:
        overrides["sync_every"] = args.sync_every
    if args.overlap is not None:
        overrides["outer_overlap"] = args.overlap
    config = derived_config(config, work, "bench", eval_every=0, **overrides)
    result = run(
        args.mode, config, work, args.peers, args.steps, args.delay_ms, args.mbit or None, not args.no_loopback, args.timeout,
        alone=not args.no_alone, learning=not args.no_learning, eval_batches=args.eval_batches,
    )  # fmt: skip
    if args.project_125m:
        if result.get("bytes_per_round"):
            try:
                held = _mean(result["per_trainer"], "experts_held") or 0.0
                round_s = [t["window_s"] / t["window_rounds"] for t in result["per_trainer"] if t.get("window_rounds")]
                result["project_125m"] = project_volunteer_bytes_per_hour(
                    result["bytes_per_round"], config, args.mb_seconds, peers=args.peers, held_experts=held,
                    target_held_experts=args.held_experts_125m, round_s=sum(round_s) / len(round_s) if round_s else None,
                )  # fmt: skip
            except Exception as e:  # a config that does not load must not lose the measurements
                result["project_125m"] = {"error": f"{type(e).__name__}: {e}"}
        else:
            result["project_125m"] = {"error": "no outer round inside the timed window: raise --steps"}
    print(json.dumps(result))
    return 0 if all(t["exit_code"] == 0 for t in result["per_trainer"]) else 1


if __name__ == "__main__":
    sys.exit(main())
