"""Several micro-batches in flight: while one waits for its experts' answers over the network, the next computes.

In remote-expert mode a micro-batch makes one round of expert calls per MoE layer forward and another backward, each
waiting a round trip; over a home link most of a micro-batch is spent waiting (SWARM and Learning@home overlap such
waits the same way). `MicroBatchPipeline` runs up to `depth` micro-batches at once in worker threads and hands their
results back strictly in order, so the training loop applies them exactly as the sequential loop would.

Every result must come from the weights it is applied to: a micro-batch computed before an optimizer step (or a state
download) is stale. Each job records the trunk's *weights version* when it starts (`weights_version`: the sum of the
parameters' in-place version counters, which every optimizer step and state load bumps); a result whose version is
no longer the current one is discarded together with every job after it, and recomputed from the current weights.
The caller launches extra jobs only while the swarm's next step is expected after they would be applied
(`worth_starting_ahead`; `next(..., prefetch=False)` otherwise), so a transition costs at most the jobs already
running, and a swarm that steps after every round of micro-batches runs them one at a time. An expert host still sees the discarded jobs' calls: in remote-
expert mode it trains on what callers send, as it does for any caller's micro-batch.

The weights the workers read are never changed by them (gradients come from `torch.autograd.grad`, not
`.backward()`), so the threads share the model safely; a job that fails because the main thread changed the weights
under it (autograd's in-place check) is simply stale.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Iterable, TypeVar

import torch

logger = logging.getLogger(__name__)

R = TypeVar("R")


def worth_starting_ahead(seconds_to_next_step: float, micro_batch_seconds: float | None, ahead: int) -> bool:
    """Whether to start `ahead` micro-batches beyond the current one: only when the swarm's next optimizer step is
    expected after all of them would be applied. A result started before a step is stale and computed again, so in a
    swarm that steps every round of micro-batches (a target batch about one micro-batch per trainer) starting ahead
    only wastes compute and bandwidth. With no measured micro-batch or no estimate of the next step (hivemind's is
    infinite right after a step, until it has heard from the swarm): not ahead. Pure."""
    if micro_batch_seconds is None or micro_batch_seconds <= 0 or not math.isfinite(seconds_to_next_step):
        return False
    return seconds_to_next_step > (ahead + 1) * micro_batch_seconds


def weights_version(params: Iterable[torch.Tensor]) -> int:
    """A number that changes whenever any of `params` is modified in place (optimizer steps, state loads)."""
    return sum(int(p._version) for p in params)


@dataclasses.dataclass
class _Job(Generic[R]):
    index: int
    version: int
    future: Future


class MicroBatchPipeline(Generic[R]):
    """Run `compute(index)` for micro-batches index, index+1, ... up to `depth` at once; `next(index)` returns the
    result of `index`, computed from the current weights (see the module docstring). `close()` waits for the
    workers and discards what they were computing. Not thread-safe: one training loop drives it."""

    def __init__(self, compute: Callable[[int], R], depth: int, current_version: Callable[[], int]):
        if depth < 1:
            raise ValueError(f"micro-batches in flight must be >= 1, got {depth}")
        self.compute, self.depth, self.current_version = compute, depth, current_version
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="micro-batch")
        self._jobs: collections.deque[_Job[R]] = collections.deque()
        self.recomputed = 0  # results discarded as stale and computed again

    def next(self, index: int, prefetch: bool = True) -> R:
        """The result of micro-batch `index`. With `prefetch`, keep the micro-batches after it computing meanwhile."""
        if self._jobs and self._jobs[0].index != index:  # the caller skipped or went back: start over from `index`
            self._discard()
        retried = False
        while True:
            if not self._jobs:
                self._launch(index)
            if prefetch:
                while len(self._jobs) < self.depth:
                    self._launch(self._jobs[-1].index + 1)
            job = self._jobs.popleft()
            try:
                result, error = job.future.result(), None
            except Exception as e:  # noqa: BLE001 - re-raised below unless the job was stale
                result, error = None, e
            if job.version == self.current_version() or retried:
                # a second stale result in a row means the weights keep changing under every job (a background
                # state average): take it, as the sequential loop takes a micro-batch that straddled such a change
                if error is not None:
                    self._discard()
                    raise error
                return result
            logger.debug(f"micro-batch {index} was computed from weights since replaced: computing it again")
            self.recomputed += 1
            retried = True
            self._discard()

    def _launch(self, index: int) -> None:
        version = self.current_version()
        self._jobs.append(_Job(index, version, self._pool.submit(self.compute, index)))

    def _discard(self) -> None:
        while self._jobs:
            job = self._jobs.popleft()
            try:
                job.future.result()
            except Exception as e:  # noqa: BLE001 - a discarded job's failure changes nothing
                logger.debug(f"discarded micro-batch {job.index} had failed: {e!r}")

    def close(self) -> None:
        self._discard()
        self._pool.shutdown(wait=True)
