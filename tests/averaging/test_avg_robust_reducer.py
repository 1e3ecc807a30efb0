"""RobustTensorPartReducer driven in-process with asyncio, as hivemind tests its TensorPartReducer; no network.

Each simulated sender sends its parts in order and waits for each result before the next part, as
hivemind's AllReduceRunner does; a sender whose part raises stops sending (the runner drops its stream).
Every round runs under a timeout, so a part that waits for a rejected sender fails the test instead of hanging.
"""

import asyncio
import logging
import time

import pytest
import torch
from hivemind.averaging.partition import AllreduceException, BannedException

from dragon_swarm.averaging.aggregators import make_aggregator
from dragon_swarm.averaging.reputation import ReputationBook
from dragon_swarm.averaging.robust_reducer import PartReport, RejectedPartError, RobustTensorPartReducer

SENDERS = ["peer0", "peer1", "peer2", "peer3", "peer4"]
ROUND_TIMEOUT = 5.0


def _reducer(part_shapes, *, aggregator="centered_clip", book=None, num_senders=len(SENDERS), **params):
    """Must be called inside a running event loop (the reducer creates asyncio futures)."""
    if aggregator == "centered_clip":
        params.setdefault("tau", 1.0)
    return RobustTensorPartReducer(
        [torch.Size(shape) for shape in part_shapes],
        [torch.float32] * len(part_shapes),
        SENDERS[:num_senders],
        aggregator=make_aggregator(aggregator, **params),
        reputation=book if book is not None else ReputationBook(),
        round_name="test",
    )


async def _send_all(reducer, parts_by_sender, weights=None):
    """Run all senders concurrently; returns, per sender, the list of results (an exception ends the list)."""
    weights = weights or [1.0] * len(parts_by_sender)

    async def sender(index):
        outputs = []
        for part_index, part in enumerate(parts_by_sender[index]):
            try:
                outputs.append(await reducer.accumulate_part(index, part_index, part, weight=weights[index]))
            except AllreduceException as e:
                outputs.append(e)
                break
        return outputs

    return await asyncio.wait_for(
        asyncio.gather(*(sender(i) for i in range(len(parts_by_sender)))), timeout=ROUND_TIMEOUT
    )


def _round(part_shapes, parts_by_sender, weights=None, **reducer_kwargs):
    async def main():
        reducer = _reducer(part_shapes, num_senders=len(parts_by_sender), **reducer_kwargs)
        outputs = await _send_all(reducer, parts_by_sender, weights)
        return reducer, outputs

    return asyncio.run(main())


def _honest_parts(num_senders, d=64, spread=0.1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=generator)
    return [base + spread * torch.randn(d, generator=generator) for _ in range(num_senders)]


# ---------------------------------------------------------------- honest rounds


@pytest.mark.parametrize("aggregator", ["mean", "centered_clip"])
def test_honest_parts_give_the_mean_to_every_sender(aggregator):
    # Prepare: centered_clip with a tau above every honest distance is exactly the mean
    parts = _honest_parts(5)
    params = {"tau": 100.0} if aggregator == "centered_clip" else {}

    # Execute
    reducer, outputs = _round([(64,)], [[p] for p in parts], aggregator=aggregator, **params)

    # Assert
    expected = torch.stack(parts).mean(dim=0)
    for sender_outputs in outputs:
        torch.testing.assert_close(sender_outputs[0], expected, atol=1e-5, rtol=0)
    assert reducer.finished.is_set()
    assert reducer.reports == [
        PartReport(0, tuple(SENDERS), reducer.reports[0].distances, reducer.reports[0].iterations)
    ]


def test_multiple_parts_are_aggregated_in_order_with_their_shapes():
    part_shapes = [(10,), (3,), (7,)]
    generator = torch.Generator().manual_seed(1)
    parts = [[torch.randn(shape, generator=generator) for shape in part_shapes] for _ in range(3)]

    reducer, outputs = _round(part_shapes, parts, aggregator="mean")

    for part_index, shape in enumerate(part_shapes):
        expected = torch.stack([sender[part_index] for sender in parts]).mean(dim=0)
        for sender_outputs in outputs:
            assert sender_outputs[part_index].shape == torch.Size(shape)
            torch.testing.assert_close(sender_outputs[part_index], expected)
    assert [report.part_index for report in reducer.reports] == [0, 1, 2]


def test_distances_are_recorded_in_the_book():
    book = ReputationBook()
    parts = _honest_parts(5)

    reducer, _ = _round([(64,)], [[p] for p in parts], aggregator="mean", book=book)

    result = torch.stack(parts).mean(dim=0)
    for sender, part, distance in zip(SENDERS, parts, reducer.reports[0].distances):
        assert book.record(sender).parts == 1
        assert distance == pytest.approx(torch.linalg.vector_norm(part - result).item(), rel=1e-4)
        assert book.record(sender).distance_ema is not None


# ---------------------------------------------------------------- attacks


def test_sign_flipped_part_moves_the_mean_but_not_centered_clip():
    # Prepare: four honest parts and one that is the honest mean times -1000
    honest = _honest_parts(4, spread=0.1)
    honest_mean = torch.stack(honest).mean(dim=0)
    parts = [[p] for p in honest] + [[-1000.0 * honest_mean]]
    honest_spread = max(torch.linalg.vector_norm(p - honest_mean).item() for p in honest)

    # Execute
    _, clipped = _round([(64,)], parts, aggregator="centered_clip", tau=honest_spread)
    _, averaged = _round([(64,)], parts, aggregator="mean")

    # Assert: CenteredClip lands within the honest cloud, the mean is dragged ~200x the mean's norm away
    clipped_error = torch.linalg.vector_norm(clipped[0][0] - honest_mean).item()
    mean_error = torch.linalg.vector_norm(averaged[0][0] - honest_mean).item()
    assert clipped_error < honest_spread
    assert mean_error > 100 * torch.linalg.vector_norm(honest_mean).item()


def test_attacker_is_far_in_the_book_and_banned_after_enough_parts():
    book = ReputationBook(min_observations=3, ban_seconds=60.0)
    honest = _honest_parts(4)
    attacker = -1000.0 * torch.stack(honest).mean(dim=0)

    for round_index in range(3):
        _round([(64,)], [[p] for p in honest] + [[attacker]], tau=1.0, book=book)

    assert book.is_banned("peer4")
    assert not any(book.is_banned(sender) for sender in SENDERS[:4])


def test_inflated_weight_is_capped_in_the_mean():
    parts = _honest_parts(3, seed=2)
    parts[2] = parts[2] + 100.0

    _, outputs = _round([(64,)], [[p] for p in parts], weights=[1.0, 1.0, 1e9], aggregator="mean", max_weight=1.0)

    torch.testing.assert_close(outputs[0][0], torch.stack(parts).mean(dim=0))


# ---------------------------------------------------------------- invalid parts


def _nan_part(d):
    part = torch.zeros(d)
    part[3] = float("nan")
    return part


def _inf_part(d):
    part = torch.zeros(d)
    part[0] = float("-inf")
    return part


@pytest.mark.parametrize(
    "bad_part, reason_fragment",
    [
        (_nan_part(64), "NaN"),
        (_inf_part(64), "Inf"),
        (torch.zeros(63), "expected 64 values"),
        (torch.zeros(1), "expected 64 values"),  # hivemind's reducer would broadcast a 1-element part
        (torch.zeros(64, dtype=torch.float64), "dtype"),
        (torch.zeros(64, dtype=torch.float16), "dtype"),
    ],
    ids=["nan", "inf", "short", "one element", "float64", "float16"],
)
def test_invalid_part_is_rejected_recorded_and_excluded(bad_part, reason_fragment, caplog):
    # Prepare
    book = ReputationBook()
    honest = _honest_parts(4)
    parts = [[p] for p in honest[:2]] + [[bad_part]] + [[p] for p in honest[2:]]

    # Execute
    with caplog.at_level(logging.WARNING, logger="dragon_swarm.averaging.robust_reducer"):
        reducer, outputs = _round([(64,)], parts, aggregator="mean", book=book)

    # Assert: the sender got an error, the others got the mean of the four valid parts
    assert isinstance(outputs[2][0], RejectedPartError)
    expected = torch.stack(honest).mean(dim=0)
    for index in (0, 1, 3, 4):
        torch.testing.assert_close(outputs[index][0], expected)
    record = book.record("peer2")
    assert record.invalid == 1 and reason_fragment in record.last_invalid_reason and record.parts == 0
    assert reason_fragment in reducer.rejected["peer2"]
    assert "peer2" not in reducer.reports[0].senders
    reducer_lines = [r.getMessage() for r in caplog.records if r.name.endswith("robust_reducer") and "peer2" in r.getMessage()]
    assert reducer_lines == [
        f"round test: rejected part 0 from peer2 ({record.last_invalid_reason}); excluded from the rest of the round"
    ]
    # a malformed part is proof: banned at the first one, the reason kept
    assert book.is_banned("peer2") and record.ban_reason == f"malformed part: {record.last_invalid_reason}"
    assert book.banned().keys() == {"peer2"}


def test_rejected_sender_is_excluded_from_later_parts_and_logged_once(caplog):
    # Prepare: peer1 sends a NaN second part; it must not be waited for in part three
    part_shapes = [(8,), (8,), (8,)]
    book = ReputationBook()

    async def main():
        reducer = _reducer(part_shapes, num_senders=3, aggregator="mean", book=book)
        good = [torch.full((8,), float(i)) for i in range(3)]
        senders = [[good[0]] * 3, [good[1], _nan_part(8), good[1]], [good[2]] * 3]
        outputs = await _send_all(reducer, senders)
        late = None
        try:  # a rejected sender that tries again in the same round is refused without a second record
            await reducer.accumulate_part(1, 2, good[1])
        except AllreduceException as e:
            late = e
        return reducer, outputs, late

    # Execute
    with caplog.at_level(logging.WARNING, logger="dragon_swarm.averaging.robust_reducer"):
        reducer, outputs, late = asyncio.run(main())

    # Assert
    torch.testing.assert_close(outputs[1][0], torch.full((8,), 1.0))  # part 0 included peer1
    assert isinstance(outputs[1][1], RejectedPartError)
    torch.testing.assert_close(outputs[0][1], torch.full((8,), 1.0))  # mean of 0 and 2
    torch.testing.assert_close(outputs[0][2], torch.full((8,), 1.0))
    assert isinstance(late, BannedException)
    assert book.record("peer1").invalid == 1
    assert len([r for r in caplog.records if r.name.endswith("robust_reducer") and "peer1" in r.getMessage()]) == 1
    assert reducer.finished.is_set()


def test_rejection_of_the_last_awaited_sender_completes_the_part():
    # the other senders are already waiting when the invalid part arrives: rejecting it must release them
    async def main():
        reducer = _reducer([(4,)], num_senders=3, aggregator="mean")
        waiting = [asyncio.create_task(reducer.accumulate_part(i, 0, torch.full((4,), float(i)))) for i in (0, 1)]
        await asyncio.sleep(0.01)
        assert not any(task.done() for task in waiting)
        with pytest.raises(RejectedPartError):
            await reducer.accumulate_part(2, 0, _nan_part(4))
        return await asyncio.wait_for(asyncio.gather(*waiting), ROUND_TIMEOUT)

    results = asyncio.run(main())

    for result in results:
        torch.testing.assert_close(result, torch.full((4,), 0.5))


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_non_positive_weight_part_is_answered_but_not_aggregated(weight):
    # Prepare: the zero-weight sender's part is huge; it must not show up in the result
    book = ReputationBook()
    honest = _honest_parts(3)
    parts = [[p] for p in honest] + [[torch.full((64,), 1e6)]]

    # Execute
    reducer, outputs = _round([(64,)], parts, weights=[1.0, 1.0, 1.0, weight], aggregator="mean", book=book)

    # Assert: everyone, the zero-weight sender included, gets the mean of the three others
    expected = torch.stack(honest).mean(dim=0)
    for sender_outputs in outputs:
        torch.testing.assert_close(sender_outputs[0], expected)
    assert reducer.reports[0].senders == tuple(SENDERS[:3])
    assert book.record("peer3") is None


def test_all_zero_weights_fail_the_part_for_every_waiting_sender():
    parts = [[p] for p in _honest_parts(3)]

    _, outputs = _round([(64,)], parts, weights=[0.0, 0.0, 0.0], aggregator="mean")

    assert all(isinstance(sender_outputs[0], AllreduceException) for sender_outputs in outputs)


# ---------------------------------------------------------------- bans and failures


def test_banned_sender_is_ignored_and_not_awaited():
    # Prepare
    book = ReputationBook()
    book.ban("peer1", "test")
    good = [torch.full((4,), float(i)) for i in range(3)]

    async def main():
        reducer = _reducer([(4,), (4,)], num_senders=3, aggregator="mean", book=book)
        # the banned sender does not even send: the others must finish without it
        honest_outputs = await _send_all(reducer, [[good[0]] * 2, [], [good[2]] * 2])
        with pytest.raises(BannedException):
            await reducer.accumulate_part(1, 0, good[1])
        reducer.on_sender_failed(1)  # the runner reports the dropped stream; must be a no-op
        return reducer, honest_outputs

    # Execute
    reducer, outputs = asyncio.run(main())

    # Assert
    for sender in (0, 2):
        for part in outputs[sender]:
            torch.testing.assert_close(part, torch.full((4,), 1.0))
    assert reducer.banned_senders == {"peer1"}
    assert book.record("peer1").parts == 0 and book.record("peer1").invalid == 0


def test_sender_failing_mid_round_is_dropped_from_the_current_part():
    # hivemind semantics kept: on_sender_failed before its part arrives releases the others
    async def main():
        reducer = _reducer([(4,)], num_senders=3, aggregator="mean")
        waiting = [asyncio.create_task(reducer.accumulate_part(i, 0, torch.full((4,), float(i)))) for i in (0, 1)]
        await asyncio.sleep(0.01)
        reducer.on_sender_failed(2)
        reducer.on_sender_failed(2)  # repeated reports are harmless
        return await asyncio.wait_for(asyncio.gather(*waiting), ROUND_TIMEOUT)

    results = asyncio.run(main())

    for result in results:
        torch.testing.assert_close(result, torch.full((4,), 0.5))


def test_aggregator_failure_fails_the_part_instead_of_hanging():
    def broken_aggregator(parts, weights=None):
        raise RuntimeError("boom")

    async def main():
        reducer = RobustTensorPartReducer(
            [torch.Size((4,))], [torch.float32], SENDERS[:2], aggregator=broken_aggregator, reputation=ReputationBook()
        )
        return await _send_all(reducer, [[torch.zeros(4)], [torch.ones(4)]])

    outputs = asyncio.run(main())

    assert all(isinstance(sender_outputs[0], AllreduceException) for sender_outputs in outputs)


def test_event_loop_keeps_running_while_a_part_is_aggregated():
    # a slow aggregator (as CenteredClip on a big part) must not block the loop: it runs in a worker thread
    mean = make_aggregator("mean")

    def slow_mean(parts, weights=None):
        time.sleep(0.3)
        return mean(parts, weights)

    async def main():
        reducer = RobustTensorPartReducer(
            [torch.Size((4,))], [torch.float32], SENDERS[:2], aggregator=slow_mean, reputation=ReputationBook()
        )
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        outputs = await _send_all(reducer, [[torch.zeros(4)], [torch.ones(4)]])
        ticking.cancel()
        return outputs, ticks

    outputs, ticks = asyncio.run(main())

    torch.testing.assert_close(outputs[0][0], torch.full((4,), 0.5))
    assert ticks >= 10, f"the loop ticked only {ticks} times during a 0.3 s aggregation"


def test_mismatched_shapes_and_dtypes_raise():
    async def main():
        RobustTensorPartReducer(
            [torch.Size((4,))], [], SENDERS[:2], aggregator=make_aggregator("mean"), reputation=ReputationBook()
        )

    with pytest.raises(ValueError):
        asyncio.run(main())
