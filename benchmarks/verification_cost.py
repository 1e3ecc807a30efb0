"""What verification by recomputation costs one trainer, in one process (experts local), as JSON.

    .venv/bin/python -m benchmarks.verification_cost -c dragon-tiny --micro-batches 4

Times a sender's micro-batch (forward and backward of the trunk with the experts answering, as a trainer runs it)
without and with the transcript recorder and ledger, and a checker's recomputation of a round of
`--micro-batches` micro-batches (the trunk only: expert answers come from the transcript); reports the bytes of a
round record. A swarm of N trainers with `checks_per_round` k recomputes k rounds per round, so each trainer spends
about k/N of `recompute_round_s` per round next to its own `round_train_s`.
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
from dragon_swarm.training.contribution import HonestContribution
from dragon_swarm.verification.ledger import RoundLedger
from dragon_swarm.verification.recompute import verify_round
from dragon_swarm.verification.transcript import RecordingDispatcher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="dragon-tiny")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config)
    m, t = config.model, config.training
    data_dir = default_data_dir()
    train, _ = build_token_stream(config.data.source, data_dir, data_dir / "cache", config.data.tokenizer, config.data.val_fraction)
    torch.manual_seed(0)
    experts = LocalExperts.from_config(m)
    recorder = RecordingDispatcher(experts)
    plain_model = HRMSMoE(m, experts)
    recording_model = HRMSMoE(m, recorder)  # the experts are not its parameters: as with the remote router
    recording_model.load_trunk_state_dict(plain_model.trunk_state_dict())
    peer = "bench-sender"

    def run_round(record: bool) -> tuple[float, RoundLedger]:
        contribution, ledger = HonestContribution(t.clip_grad_norm, t.worker_momentum), RoundLedger()
        model = recording_model if record else plain_model
        named = list(model.named_trunk_parameters())
        ledger.begin_round({}, {k: v.clone() for k, v in model.trunk_state_dict().items()} if record else None)
        started = time.perf_counter()
        for step in range(args.micro_batches):
            recorder.begin()
            model.zero_grad(set_to_none=True)
            inputs, targets = train.batch(config.swarm.seed, peer, step, t.batch_size, m.seq_len)
            loss, _, _ = model.compute_loss(inputs, targets)
            loss.backward()
            contribution.prepare(named, loss, t.batch_size, 2)
            if record:
                ledger.add(step, t.batch_size, named, recorder.take().to_bytes())
        return time.perf_counter() - started, ledger

    run_round(False)  # warm-up
    plain = min(run_round(False)[0] for _ in range(args.repeat))
    recorded_runs = [run_round(True) for _ in range(args.repeat)]
    recorded = min(seconds for seconds, _ in recorded_runs)
    record = recorded_runs[-1][1].close(0)
    record_bytes = len(record.to_bytes())
    batch_of = lambda step, size: train.batch(config.swarm.seed, peer, step, size, m.seq_len)  # noqa: E731
    timings, verdict = [], None
    for _ in range(args.repeat):
        started = time.perf_counter()
        verdict = verify_round(m, record.trunk, record, batch_of, t.clip_grad_norm, t.worker_momentum, config.verification.tolerance)
        timings.append(time.perf_counter() - started)
    print(json.dumps({
        "config": args.config, "micro_batches": args.micro_batches, "batch_size": t.batch_size, "threads": torch.get_num_threads(),
        "round_train_s": round(plain, 3), "round_train_recorded_s": round(recorded, 3),
        "recording_overhead_percent": round(100 * (recorded - plain) / plain, 1),
        "recompute_round_s": round(min(timings), 3), "recompute_vs_train_percent": round(100 * min(timings) / plain, 1),
        "record_bytes": record_bytes, "record_bytes_per_micro_batch": record_bytes // args.micro_batches,
        "honest_verdict": verdict.honest, "honest_error": verdict.relative_error,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
