"""Tokens/s of a swarm trainer whose experts live on another peer, against the same model with its experts in
the same process, on this machine, in one run. Prints one JSON object.

    python -m benchmarks.remote_vs_local [--config dragon-tiny] [--steps 30]

The swarm side is real: a `--no-train --experts all` host peer and a `--no-host` trainer peer, both
`python -m dragon_swarm.peer` processes on loopback; its tokens/s come from the trainer's stats file (wall
time between its first and last step, so routing, RPC and all-reduce waits are included). The local side runs
the same model with `LocalExperts` and AdamW over all parameters in this process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.wan import derived_config
from dragon_swarm.config import load_config, resolve_config_path
from dragon_swarm.data.corpus import default_data_dir
from dragon_swarm.data.dataset import build_token_stream
from dragon_swarm.model.dispatch import LocalExperts
from dragon_swarm.model.hrm_smoe import HRMSMoE
from benchmarks.local_peers import PeerLauncher, read_stats, stop_peers_on_sigterm

WARMUP_STEPS = 3


def local_tokens_per_second(config, stream, steps: int) -> dict:
    torch.manual_seed(config.swarm.seed)
    model = HRMSMoE(config.model, LocalExperts.from_config(config.model))
    t = config.training
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    seq_len, batch = config.model.seq_len, t.batch_size
    started = None
    losses = []
    for step in range(steps + WARMUP_STEPS):
        if step == WARMUP_STEPS:
            started = time.perf_counter()
        inputs, targets = stream.batch(config.swarm.seed, "local-benchmark", step, batch, seq_len)
        loss, ce, _ = model.compute_loss(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(ce))
    elapsed = time.perf_counter() - started
    return {"tokens_per_second": steps * batch * seq_len / elapsed, "loss_first": losses[0], "loss_last": losses[-1]}


def swarm_tokens_per_second(config_path: Path, steps: int, work_dir: Path) -> dict:
    launcher = PeerLauncher(work_dir)
    try:
        host = launcher.start("host", ["-c", str(config_path), "--new-swarm", "--no-train", "--experts", "all", "--state-dir", str(work_dir / "host")])
        peers = host.initial_peers()
        host.wait_for_log("Serving", timeout=120)
        stats_path = work_dir / "trainer.jsonl"
        trainer = launcher.start(
            "trainer",
            ["-c", str(config_path), "--initial-peers", *peers, "--no-host", "--state-dir", str(work_dir / "trainer"),
             "--max-steps", str(steps + WARMUP_STEPS), "--stats-file", str(stats_path)],
        )  # fmt: skip
        code = trainer.wait(timeout=1800)
        if code != 0:
            raise RuntimeError(f"trainer exited with {code}: {trainer.stderr()[-2000:]}")
        records = read_stats(stats_path)
    finally:
        launcher.stop_all()
    timed = records[WARMUP_STEPS - 1 :]
    tokens = timed[-1]["tokens"] - timed[0]["tokens"]
    elapsed = timed[-1]["time"] - timed[0]["time"]
    return {
        "tokens_per_second": tokens / elapsed,
        "loss_first": records[0]["loss"],
        "loss_last": records[-1]["loss"],
        "epochs": records[-1]["epoch"],
        "expert_failures": records[-1]["expert_failures"],
    }


def main() -> None:
    stop_peers_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="dragon-tiny")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    config_path = resolve_config_path(args.config)
    config = load_config(str(config_path))
    data_dir = default_data_dir()
    stream, _ = build_token_stream(config.data.source, data_dir, data_dir / "cache", config.data.tokenizer, config.data.val_fraction)
    local = local_tokens_per_second(config, stream, args.steps)
    with tempfile.TemporaryDirectory(prefix="dragon-bench-") as tmp:
        # experts on another peer: remote_experts mode whatever the config's own mode
        remote = derived_config(config_path, Path(tmp), "remote", mode="remote_experts")
        swarm = swarm_tokens_per_second(remote, args.steps, Path(tmp))
    print(json.dumps({
        "benchmark": "remote_vs_local",
        "config": args.config,
        "steps": args.steps,
        "batch_size": config.training.batch_size,
        "seq_len": config.model.seq_len,
        "torch_threads": torch.get_num_threads(),
        "local": local,
        "swarm": swarm,
        "ratio_swarm_over_local": swarm["tokens_per_second"] / local["tokens_per_second"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
