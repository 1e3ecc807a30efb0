"""What the held-out evaluation costs next to training, in one process (experts local), as JSON.

    .venv/bin/python -m benchmarks.eval_overhead -c dragon-tiny --trainers 2

Times micro-batches (forward, backward, AdamW) and evaluations (`training.evaluation`, forward only) of the config's
model, then reports evaluation time as a share of the training time between two evaluations: `eval_every` model
versions of `target_batch_size / (batch_size * trainers)` micro-batches each, for one trainer.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dragon_swarm.config import load_config
from dragon_swarm.data.corpus import default_data_dir
from dragon_swarm.data.dataset import build_token_stream
from dragon_swarm.model.dispatch import LocalExperts
from dragon_swarm.model.hrm_smoe import HRMSMoE
from dragon_swarm.training.evaluation import eval_batches, evaluate_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="dragon-tiny")
    parser.add_argument("--trainers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--evals", type=int, default=4)
    args = parser.parse_args()
    config = load_config(args.config)
    m, t = config.model, config.training
    data_dir = default_data_dir()
    train, val = build_token_stream(config.data.source, data_dir, data_dir / "cache", config.data.tokenizer, config.data.val_fraction)
    torch.manual_seed(0)
    model = HRMSMoE(m, LocalExperts.from_config(m))
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr)

    def step(i: int) -> None:
        inputs, targets = train.batch(config.swarm.seed, "bench", i, t.batch_size, m.seq_len)
        loss, _, _ = model.compute_loss(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(0)  # warm-up
    started = time.perf_counter()
    for i in range(args.steps):
        step(i + 1)
    step_s = (time.perf_counter() - started) / args.steps
    batches = eval_batches(val.tokens, m.seq_len, t.eval_batches, config.swarm.seed)
    evaluate_loss(model, batches)  # warm-up
    started = time.perf_counter()
    for _ in range(args.evals):
        evaluate_loss(model, batches)
    eval_s = (time.perf_counter() - started) / args.evals
    per_version = t.target_batch_size / (t.batch_size * args.trainers)
    between = t.eval_every * per_version * step_s
    print(json.dumps({
        "config": args.config, "trainers": args.trainers, "micro_batch_s": round(step_s, 4), "eval_s": round(eval_s, 4),
        "eval_sequences": sum(len(x) for x, _ in batches), "micro_batches_between_evals": t.eval_every * per_version,
        "eval_overhead_percent": round(100 * eval_s / between, 2) if between else None,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
