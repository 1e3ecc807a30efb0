"""Several micro-batches in flight (`training.pipeline`): results in order, from the weights they are applied to.

Pure: a counting job for the ordering and staleness rules, and a real HRM-sMoE whose experts answer after a delay (as
remote ones do) for the claim that matters, that a training loop with 2 micro-batches in flight computes exactly what
the sequential loop computes, optimizer steps between micro-batches included. The remote-expert swarm runs a trainer
with 2 in flight in `tests/swarm/test_swarm_training.py`.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dragon_swarm.model import HRMSMoE, LocalExperts, ModelConfig
from dragon_swarm.training.pipeline import MicroBatchPipeline, weights_version, worth_starting_ahead
from dragon_swarm.verification.transcript import RecordingDispatcher


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Weights:
    """A stand-in for the trunk: a version that the 'optimizer step' bumps."""

    def __init__(self):
        self.version = 0


def test_results_come_back_in_order_and_a_stale_one_is_computed_again():
    weights, computed = Weights(), []

    def compute(index: int) -> tuple[int, int]:
        computed.append(index)
        return index, weights.version

    pipeline = MicroBatchPipeline(compute, depth=3, current_version=lambda: weights.version)
    try:
        results = []
        for index in range(10):
            results.append(pipeline.next(index))
            if index == 4:  # an optimizer step after micro-batch 4: 5 and 6 were computed from the old weights
                weights.version += 1
        assert [i for i, _ in results] == list(range(10))
        assert all(version == (0 if i <= 4 else 1) for i, version in results), results
        assert pipeline.recomputed == 1
        assert computed.count(5) == 2 and computed.count(6) == 2  # both discarded, both computed again
    finally:
        pipeline.close()


def test_no_prefetch_launches_only_the_asked_micro_batch():
    computed = []
    pipeline = MicroBatchPipeline(lambda i: computed.append(i) or i, depth=4, current_version=lambda: 0)
    try:
        assert pipeline.next(0, prefetch=False) == 0
        assert pipeline.next(1, prefetch=False) == 1
        assert computed == [0, 1]
        assert pipeline.next(2) == 2  # prefetching again: 3, 4, 5 start
        assert pipeline.next(7, prefetch=False) == 7  # a jump discards what was in flight
    finally:
        pipeline.close()
    assert sorted(set(computed)) == [0, 1, 2, 3, 4, 5, 7]


def test_a_failure_is_raised_in_order_unless_the_job_was_stale():
    weights = Weights()

    def compute(index: int) -> int:
        if index == 2 and weights.version == 0:
            raise RuntimeError("modified by an inplace operation")  # what autograd says when a step hit it
        if index == 5:
            raise ValueError("bad batch")
        return index

    pipeline = MicroBatchPipeline(compute, depth=2, current_version=lambda: weights.version)
    try:
        assert pipeline.next(0) == 0
        assert pipeline.next(1) == 1
        weights.version += 1  # micro-batch 2 failed under a step: stale, computed again
        assert pipeline.next(2) == 2
        assert pipeline.next(3) == 3
        assert pipeline.next(4) == 4
        with pytest.raises(ValueError, match="bad batch"):
            pipeline.next(5)
    finally:
        pipeline.close()


def test_micro_batches_start_ahead_only_when_the_next_step_is_further_away_than_they_take():
    assert worth_starting_ahead(seconds_to_next_step=10.0, micro_batch_seconds=2.0, ahead=1)
    assert not worth_starting_ahead(10.0, 2.0, ahead=4)  # 5 micro-batches take 10 s: the last would be stale
    assert not worth_starting_ahead(3.0, 2.0, ahead=1)  # a swarm stepping every round of micro-batches
    assert not worth_starting_ahead(0.0, 2.0, ahead=1)  # ready to step now
    assert not worth_starting_ahead(100.0, None, ahead=1)  # nothing measured yet
    assert not worth_starting_ahead(float("inf"), 2.0, ahead=1)  # no estimate yet (right after a step)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match=">= 1"):
        MicroBatchPipeline(lambda i: i, depth=0, current_version=lambda: 0)


def test_weights_version_changes_with_in_place_updates_only():
    p = torch.nn.Parameter(torch.ones(3))
    before = weights_version([p])
    p.grad = torch.ones(3)  # a gradient is not a weight change
    assert weights_version([p]) == before
    with torch.no_grad():
        p.add_(1.0)
    assert weights_version([p]) > before


class SlowExperts:
    """Wraps a dispatcher (experts in this process, or remote ones); with `delay`, each layer's call first waits
    that long, as a round trip to remote experts does. Counts the calls under way at once."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay
        self.num_layers, self.num_experts = inner.num_layers, inner.num_experts
        self._lock = threading.Lock()
        self.waiting = self.most_waiting = 0

    def alive_mask(self, layer):
        return self.inner.alive_mask(layer)

    def dispatch(self, layer, inputs):
        with self._lock:
            self.waiting += 1
            self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            time.sleep(self.delay)
            return self.inner.dispatch(layer, inputs)
        finally:
            with self._lock:
                self.waiting -= 1


def run_loop(model: HRMSMoE, recorder: RecordingDispatcher, batches: list[torch.Tensor], depth: int,
             step_every: int = 3, announce_steps: bool = True) -> tuple[list[float], list[int], int]:
    """A trainer's loop: forward/backward (pipelined at `depth`), then in order set the gradients, and every
    `step_every` micro-batches an SGD step on the trunk; `announce_steps`: no prefetch before a step, as the trainer
    does when an epoch is due. Returns the losses, the expert calls each micro-batch recorded and the recomputations."""
    params = list(model.trunk_parameters())
    optimizer = torch.optim.SGD(params, lr=0.5)

    def compute(index: int):
        recorder.begin()
        batch = batches[index]
        loss, _, _ = model.compute_loss(batch[:, :-1], batch[:, 1:])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return float(loss), grads, len(recorder.take().calls)

    pipeline = MicroBatchPipeline(compute, depth, lambda: weights_version(params))
    losses, recorded = [], []
    try:
        for index in range(len(batches)):
            stepping = (index + 1) % step_every == 0
            loss, grads, calls = pipeline.next(index, prefetch=not (stepping and announce_steps))
            recorded.append(calls)
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
            losses.append(loss)
            if stepping:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        pipeline.close()
    return losses, recorded, pipeline.recomputed


def random_batches(vocab_size: int, seq_len: int, count: int, batch_size: int = 3) -> list[torch.Tensor]:
    return [
        torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(i))
        for i in range(count)
    ]


def train_losses(depth: int, announce_steps: bool = True, step_every: int = 3):
    """`run_loop` on a small HRM-sMoE whose experts answer after 10 ms; also returns the experts."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(
        vocab_size=97, seq_len=12, d_model=32, n_heads=4, h_layers=1, l_layers=2, h_cycles=2, l_cycles=2,
        num_experts=4, top_k=2, expert_hidden=40, aux_loss_weight=0.01,
    ))  # fmt: skip
    experts = SlowExperts(LocalExperts.from_config(cfg), delay=0.01)
    recorder = RecordingDispatcher(experts)
    model = HRMSMoE(cfg, recorder)
    batches = random_batches(cfg.vocab_size, cfg.seq_len, 9)
    losses, recorded, recomputed = run_loop(model, recorder, batches, depth, step_every, announce_steps)
    return losses, recorded, experts, recomputed


def test_two_in_flight_compute_what_the_sequential_loop_computes():
    sequential, sequential_calls, sequential_experts, _ = train_losses(depth=1)
    pipelined, pipelined_calls, experts, recomputed = train_losses(depth=2)
    assert sequential_experts.most_waiting == 1
    assert experts.most_waiting >= 2, "the two micro-batches never waited for their experts at the same time"
    assert pipelined == pytest.approx(sequential, rel=1e-6, abs=1e-6)
    unstepped, _, _, _ = train_losses(depth=1, step_every=10**9)
    assert unstepped[:3] == sequential[:3] and abs(unstepped[3] - sequential[3]) > 1e-4  # the steps changed the weights
    # each thread recorded its own micro-batch's expert calls (verification transcripts), none of the other's
    assert pipelined_calls == sequential_calls
    assert recomputed == 0  # no prefetch across an announced step: nothing computed twice


def test_a_step_the_loop_did_not_announce_costs_a_recomputation_not_a_stale_result():
    sequential, _, _, _ = train_losses(depth=1)
    pipelined, _, _, recomputed = train_losses(depth=2, announce_steps=False)
    assert recomputed == 2  # the micro-batch after each step (3 and 6) had started from the old weights
    assert pipelined == pytest.approx(sequential, rel=1e-6, abs=1e-6)
