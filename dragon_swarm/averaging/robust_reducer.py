"""A drop-in for hivemind's ``TensorPartReducer`` that aggregates each tensor part with a robust aggregator.

hivemind's reducer sums parts into one accumulator as they arrive, which only allows a weighted mean. This one
keeps each sender's part until all current senders have sent theirs, then runs the configured aggregator
(:mod:`.aggregators`) over the stack. Every sender still gets back ``result - its own part``, as in hivemind.

Before a part may enter the stack:

* a sender banned in the :class:`~.reputation.ReputationBook` is excluded from the whole round up front, and
  its parts are refused with ``BannedException`` (the runner drops it quietly);
* the part is checked with :func:`~.aggregators.validate_part` against this reducer's own local part (size,
  dtype, NaN, Inf). An invalid part excludes its sender from this part and all later parts of the round, bans
  it in the book at once (a malformed part is proof of a faulty peer; the local peer's own part is recorded but
  never bans itself), is logged once per (round, peer), and raises :class:`RejectedPartError`; hivemind's runner
  then drops the sender for the round and answers INTERNAL_ERROR;
* a part with weight <= 0 (or NaN) is awaited and answered but not aggregated: hivemind.Optimizer sends real
  tensors with weight 0 when a peer only tags along.

Weights are self-reported, so only the ``mean`` aggregator looks at them (capped, see ``aggregators.mean``).
When the round ends, each sender's distance from the result over all parts it entered (root of the sum of
squares) goes into the book once: a whole partition is a far steadier witness than one sparse part. Distances are
judged in units of the local peer's own distance (it knows itself to be honest), and the local peer is never
scored. If the result lies more than ``CAPTURED_RATIO`` times our own part's norm away from our part, colluders
outnumbered us in this group and sit at the result; then every sender is judged by its distance from *our* part,
in units of its norm. So is the other sender of a round of two (fewer than the book's ``min_senders``), where the
result cannot tell which of the two is far, in units of ``PAIR_NORM_SLACK`` times that norm: an attacker far out of
scale that keeps landing in pairs with us is banned as fast as in a larger group.

Order matters: validation happens *before* ``num_parts_received`` is incremented. hivemind's ``on_sender_failed``
uses that counter to decide whether the sender still owes the current part; counting a rejected part would make
the current part wait for it until the sender timeout.

The aggregation runs in the event loop's default thread pool (torch releases the GIL), so that the averager keeps
serving streams and timers meanwhile; the debug line "aggregated part ... in X ms" tells how long it takes.
Tuning: CenteredClip costs ``max_iters`` passes over a ``[senders, part_size]`` float64 stack per part.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer

from dragon_swarm.averaging.aggregators import Aggregator, validate_part
from dragon_swarm.averaging.reputation import ReputationBook

__all__ = ["PartReport", "RejectedPartError", "RobustTensorPartReducer"]

logger = logging.getLogger(__name__)

# a round whose result lies this many times our own part's norm away from our part was captured by colluders
CAPTURED_RATIO = 10.0
# in a round of two, the other sender is judged in units of this many times our own part's norm: an honest partner
# that averaged one micro-batch while we averaged 30 is ~4-5x our (noise-averaged) norm away from us; an x1000
# attacker still scores the cap
PAIR_NORM_SLACK = 5.0


@dataclass(frozen=True)
class PartReport:
    """How one part was aggregated: which senders entered it, their distances from the result, iterations."""

    part_index: int
    senders: tuple[str, ...]
    distances: tuple[float, ...]
    iterations: int


class RejectedPartError(AllreduceException):
    """A sender's part failed validation; the sender is excluded from the rest of the round."""


class RobustTensorPartReducer(TensorPartReducer):
    """Robust aggregation of one all-reduce round's parts (see the module docstring).

    :param part_shapes: shapes of this peer's local parts, in order (as for ``TensorPartReducer``)
    :param part_dtypes: dtypes of this peer's local parts; received parts must match
    :param sender_ids: peer id string of each sender, by sender index (the runner's ``sender_peer_ids``)
    :param aggregator: from :func:`~.aggregators.make_aggregator`
    :param reputation: where rejections and distances are recorded and bans are looked up
    :param round_name: a short label for log lines, e.g. the group id in hex
    :param clock: time source for the book (monotonic seconds)
    :param local_sender: this peer's own id: measured, never scored in the book
    :param captured_ratio: see ``CAPTURED_RATIO``; None judges every round by the result and leaves rounds of two
      unscored (the ``mean`` baseline)
    :param weight_claim_limit: a weight above this is a lie: one invalid strike per round for its sender (the part
      itself still counts; robust aggregators ignore weights anyway)
    :param on_rejected: called with (sender index, part index, reason) for every part rejected as malformed
    """

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        part_dtypes: Sequence[torch.dtype],
        sender_ids: Sequence[str],
        *,
        aggregator: Aggregator,
        reputation: ReputationBook,
        round_name: str = "",
        clock: Callable[[], float] = time.monotonic,
        local_sender: str | None = None,
        weight_claim_limit: float | None = None,
        captured_ratio: float | None = CAPTURED_RATIO,
        on_rejected: Callable[[int, int, str], None] | None = None,
    ):
        # set before super().__init__, which calls our reset_accumulators
        self.part_dtypes, self.sender_ids = tuple(part_dtypes), tuple(map(str, sender_ids))
        self.aggregator, self.reputation, self.round_name, self.clock = aggregator, reputation, round_name, clock
        self.rejected: dict[str, str] = {}  # sender id -> reason, for this round
        self._aggregation: asyncio.Task | None = None  # the running aggregation of the current part, if any
        self.reports: list[PartReport] = []  # one per aggregated part, in order
        self.local_sender = None if local_sender is None else str(local_sender)
        self._squared_distances: dict[str, float] = {}  # sender -> sum over this round's parts of distance^2
        self._squared_from_local: dict[str, float] = {}  # sender -> sum of squared distances from our own parts
        self._local_squared_norm = 0.0
        self._round_recorded = False
        self.weight_claim_limit, self.captured_ratio = weight_claim_limit, captured_ratio
        self.weight_liars: set[str] = set()
        self.on_rejected = on_rejected  # (sender index, part index, reason): the runner keeps the evidence
        super().__init__(part_shapes, num_senders=len(self.sender_ids))
        if len(self.part_dtypes) != self.num_parts:
            self.finished.set()  # so that __del__ does not warn about a round that never started
            raise ValueError(f"got {self.num_parts} part shapes but {len(self.part_dtypes)} dtypes")

        now = clock()
        self.banned_senders = {sender for sender in self.sender_ids if reputation.is_banned(sender, now)}
        if self.banned_senders and not self.finished.is_set():
            logger.info(f"round {round_name}: ignoring parts from banned sender(s) {sorted(self.banned_senders)}")
            for sender_index, sender in enumerate(self.sender_ids):
                if sender in self.banned_senders:
                    self.sender_failed_after[sender_index] = 0
            self.num_current_senders = self._count_current_senders()

    def reset_accumulators(self):
        """Start collecting the next part: one slot per sender instead of a running sum."""
        if self.current_part_index >= self.num_parts - 1:
            self.finalize()
            return
        self.current_part_index += 1
        self.current_part_accumulated_from = 0
        self.current_part_future = asyncio.Future()
        self.num_current_senders = self._count_current_senders()
        self.parts: dict[int, torch.Tensor] = {}  # sender index -> its part, only valid parts with weight > 0
        self.weights: dict[int, float] = {}

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """Validate and store one sender's part, wait until the part is aggregated, return the aggregate."""
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        sender = self.sender_ids[sender_index]
        if self.sender_failed_after[sender_index] != math.inf:
            raise BannedException(f"sender {sender} is excluded from round {self.round_name}")
        reason = validate_part(tensor_part, math.prod(self.part_shapes[part_index]), self.part_dtypes[part_index])
        if reason is not None:
            self._reject(sender_index, part_index, reason)
            raise RejectedPartError(f"part {part_index} from {sender} rejected: {reason}")
        self.num_parts_received[sender_index] += 1

        while part_index > self.current_part_index:  # wait for the previous parts to finish (as in hivemind)
            await asyncio.wait(
                {self.current_part_future, asyncio.create_task(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != math.inf:
            raise BannedException(f"sender {sender} was excluded from round {self.round_name} in background")
        assert part_index == self.current_part_index

        if self.weight_claim_limit is not None and not weight <= self.weight_claim_limit and sender not in self.weight_liars:
            self.weight_liars.add(sender)  # once per round: the claim repeats in every part
            self.reputation.record_invalid(sender, f"claimed weight {weight:g} > {self.weight_claim_limit:g}", self.clock())
            logger.warning(f"round {self.round_name}: {sender} claims weight {weight:g}, more than the {self.weight_claim_limit:g} an honest peer can have")
        current_part_future = self.current_part_future
        if weight > 0:  # False for NaN too
            self.parts[sender_index] = tensor_part.reshape(-1)
            self.weights[sender_index] = float(weight)
        self.current_part_accumulated_from += 1
        self.check_current_part_finished()
        return await current_part_future

    def on_sender_failed(self, sender_index: int):
        """Exclude a sender from the parts it has not sent yet. Idempotent: a sender we already excluded (banned
        up front or rejected) is reported again by the runner when its stream ends."""
        if self.sender_failed_after[sender_index] != math.inf:
            return
        super().on_sender_failed(sender_index)

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from < self.num_current_senders or self._aggregation is not None:
            return
        future, part_index = self.current_part_future, self.current_part_index
        if self.current_part_accumulated_from == 0:
            future.cancel()  # nobody is waiting for this part (all its senders failed)
        elif not self.parts:
            future.set_exception(
                AllreduceException(f"round {self.round_name} part {part_index}: no valid part with weight > 0")
            )
        else:
            self._aggregation = asyncio.create_task(self._aggregate_current_part())
            return  # the task moves on to the next part when done
        self.reset_accumulators()

    async def _aggregate_current_part(self):
        """Aggregate in a worker thread (CenteredClip on a 512 KiB part can take a second), so that the event
        loop keeps serving streams and timers; the part stays current until its result is set."""
        future, part_index = self.current_part_future, self.current_part_index
        indices = sorted(self.parts)
        senders = [self.sender_ids[i] for i in indices]
        stack = torch.stack([self.parts[i] for i in indices])
        weights = torch.tensor([self.weights[i] for i in indices], dtype=torch.float64)
        started = time.perf_counter()
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, self.aggregator, stack, weights)
        except Exception as e:  # fail this part for its waiting senders instead of leaving them hanging
            logger.exception(f"round {self.round_name}: aggregating part {part_index} failed")
            if not future.done():
                future.set_exception(AllreduceException(f"aggregating part {part_index} failed: {e!r}"))
        else:
            elapsed_ms = (time.perf_counter() - started) * 1e3
            for sender, distance in zip(senders, result.distances.tolist()):
                self._squared_distances[sender] = self._squared_distances.get(sender, 0.0) + float(distance) ** 2
            if self.local_sender in senders:
                local = stack[senders.index(self.local_sender)].double()
                self._local_squared_norm += float(local.pow(2).sum())
                from_local = (stack.double() - local).pow(2).sum(dim=1).tolist()
                for sender, squared in zip(senders, from_local):
                    self._squared_from_local[sender] = self._squared_from_local.get(sender, 0.0) + squared
            self.reports.append(
                PartReport(part_index, tuple(senders), tuple(result.distances.tolist()), result.iterations)
            )
            logger.debug(
                f"round {self.round_name}: aggregated part {part_index} ({result.value.numel()} values, "
                f"{len(indices)} senders, {result.iterations} iterations) in {elapsed_ms:.1f} ms"
            )
            if not future.done():  # finalize() cancels it if the round was aborted meanwhile
                future.set_result(result.value.reshape(self.part_shapes[part_index]))
        finally:
            self._aggregation = None
        if not self.finished.is_set():
            self.reset_accumulators()

    def finalize(self):
        self._record_round_distances()
        super().finalize()

    def _record_round_distances(self) -> None:
        """One observation per round and sender (see the module docstring); senders that were rejected or
        excluded midway are judged by the parts they did enter."""
        if self._round_recorded or not self._squared_distances:
            return
        self._round_recorded = True
        senders = sorted(self._squared_distances)
        unscored = () if self.local_sender is None else (self.local_sender,)
        own_norm = math.sqrt(self._local_squared_norm)
        own_distance = math.sqrt(self._squared_distances.get(self.local_sender, 0.0)) if self.local_sender else 0.0
        captured = self.captured_ratio is not None and own_norm > 0 and own_distance > self.captured_ratio * own_norm
        # us and one other: the result says nothing about which of two is far, but our own part is honest to us. In a
        # sign_flip run a trainer kept landing in pairs with an attacker and wasted 10 rounds before verification
        # banned it (100-197 s), while its distance rule never scored a pair
        pair = self.captured_ratio is not None and own_norm > 0 and self.local_sender in senders and len(senders) < self.reputation.min_senders
        if (captured or pair) and set(senders) <= set(self._squared_from_local):
            # colluders outnumbered us in this group (judging by the result would clear them), or the result cannot
            # tell: judge everyone by their distance from our own part, in units of its norm
            distances = torch.tensor([math.sqrt(self._squared_from_local[s]) for s in senders], dtype=torch.float64)
            if captured:
                logger.info(f"round {self.round_name}: result {own_distance / own_norm:.0f}x our norm away from our part; judging senders by their distance from it")
            unit = own_norm if captured else PAIR_NORM_SLACK * own_norm
            self.reputation.record_distances(senders, distances, self.clock(), unscored=unscored, unit=unit)
            return
        distances = torch.tensor([math.sqrt(self._squared_distances[s]) for s in senders], dtype=torch.float64)
        self.reputation.record_distances(senders, distances, self.clock(), unscored=unscored, reference=self.local_sender)

    def reject(self, sender_index: int, part_index: int, reason: str) -> None:
        """Reject a part the runner found malformed before it reached `accumulate_part` (e.g. its signature)."""
        if self.sender_failed_after[sender_index] == math.inf:
            self._reject(sender_index, part_index, reason)

    def _reject(self, sender_index: int, part_index: int, reason: str):
        sender = self.sender_ids[sender_index]
        if self.on_rejected is not None and sender != self.local_sender:
            try:
                self.on_rejected(sender_index, part_index, reason)
            except Exception:  # keeping evidence must never break the round
                logger.exception(f"round {self.round_name}: keeping the evidence of a rejected part failed")
        self.reputation.record_invalid(sender, reason, self.clock(), conclusive=True, may_ban=sender != self.local_sender)
        if sender not in self.rejected:  # log once per (round, peer)
            self.rejected[sender] = reason
            logger.warning(
                f"round {self.round_name}: rejected part {part_index} from {sender} ({reason}); "
                f"excluded from the rest of the round"
            )
        self.on_sender_failed(sender_index)

    def _count_current_senders(self) -> int:
        return sum(self.current_part_index < failed_after for failed_after in self.sender_failed_after)
