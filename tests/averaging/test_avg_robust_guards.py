"""Pure guards added around hivemind's all-reduce: the supported epoch, refused aggregates, self-referenced
distances and per-round reducer observations. No network."""

import asyncio
import math

import pytest
import torch

from dragon_swarm.averaging.aggregators import make_aggregator
from dragon_swarm.averaging.reputation import ReputationBook
from dragon_swarm.averaging.robust_allreduce import refused_result_reason
from dragon_swarm.averaging.robust_progress import supported_epoch, trusted_target
from dragon_swarm.averaging.robust_reducer import CAPTURED_RATIO, RejectedPartError, RobustTensorPartReducer


@pytest.mark.parametrize(
    "epochs, local, expected",
    [
        ([10, 10, 10, 50], 10, 10),  # one runaway does not move the swarm's epoch
        ([10, 10, 50, 50, 10], 10, 10),  # two of five neither
        ([10, 10, 50, 50], 10, 50),  # half of the trainers do (a tie is not a minority)
        ([5, 6, 6], 5, 6),  # trainers switching epochs together
        ([5, 5, 6], 5, 6),  # the first one to switch already counts (within one epoch of the rest)
        ([0, 10, 10, 10], 0, 10),  # a late joiner sees the swarm's epoch and catches up
        ([3, 9], 3, 9),  # two trainers: either is half
        ([], 4, 4),  # nobody else: our own epoch
        ([1, 2, 3], 7, 7),  # never below our own epoch
    ],
)
def test_supported_epoch(epochs, local, expected):
    assert supported_epoch(epochs, local) == expected


def test_the_target_batch_keeps_each_trusted_trainer_s_share():
    assert trusted_target(160, trusted=5, banned=0) == 160
    assert trusted_target(160, trusted=3, banned=2) == 96  # 3 honest of 5: 32 samples each, as in a clean swarm
    assert trusted_target(100, trusted=2, banned=1) == 67  # rounded up: never a smaller share than configured
    assert trusted_target(160, trusted=0, banned=3) == 160  # nothing to judge by (no record of our own yet)
    assert trusted_target(1, trusted=1, banned=9) == 1


def test_refused_result_reason_accepts_an_honest_aggregate():
    torch.manual_seed(0)
    own = torch.randn(1000)
    others = [own + torch.randn(1000) for _ in range(3)]
    aggregate = torch.stack([own, *others]).mean(dim=0)
    assert refused_result_reason(aggregate - own, own, norm_per_value=1.0) is None


@pytest.mark.parametrize(
    "delta, reason",
    [
        (torch.full((100,), -1000.0), "more than"),  # a x-1000 pull, e.g. the mean of a 2-peer group with an attacker
        (torch.tensor([math.nan] * 100), "NaN"),
        (torch.zeros(99), "shape"),
    ],
)
def test_refused_result_reason_refuses_garbage(delta, reason):
    own = torch.ones(100)
    assert reason in refused_result_reason(delta, own, norm_per_value=1.0)


def test_refused_result_reason_uses_the_even_spread_scale_for_a_small_own_part():
    # our part is tiny (e.g. embedding rows of tokens only others saw), but our tensors overall are not
    own = torch.full((100,), 1e-6)
    delta = torch.full((100,), 0.5)  # others' rows moved legitimately
    assert refused_result_reason(delta, own, norm_per_value=0.1) is None
    assert refused_result_reason(delta, own, norm_per_value=1e-6) is not None


def test_refused_result_reason_cannot_judge_all_zero_tensors():
    assert refused_result_reason(torch.full((10,), 5.0), torch.zeros(10), norm_per_value=0.0) is None


def test_distances_in_units_of_the_reference_peer():
    # three colluders right at the result make the median distance tiny; judged by the honest local peer's own
    # distance, the other honest peer is normal
    book = ReputationBook(ban_distance_ratio=4.0, min_observations=1, ema_alpha=1.0, min_senders=3)
    peers = ["me", "honest", "c1", "c2", "c3"]
    distances = [1.0, 1.2, 0.01, 0.01, 0.01]
    banned = book.record_distances(peers, distances, now=0.0, unscored=["me"], reference="me")
    assert banned == []
    assert book.record("honest").distance_ema == pytest.approx(1.2)
    assert book.record("me") is None  # measured, never scored
    by_median = ReputationBook(ban_distance_ratio=4.0, min_observations=1, ema_alpha=1.0, min_senders=3)
    assert "honest" in by_median.record_distances(peers, distances, now=0.0)  # what the median unit would do


def test_reducer_records_one_observation_per_round_and_never_scores_itself():
    book = ReputationBook(ban_distance_ratio=4.0, min_observations=1, ema_alpha=1.0, min_senders=3)
    parts = [torch.zeros(4), torch.zeros(4)]  # two parts of 4 values

    async def round_():
        reducer = RobustTensorPartReducer(
            [p.shape for p in parts], [p.dtype for p in parts], ["me", "a", "b", "far"],
            aggregator=make_aggregator("median"), reputation=book, local_sender="me",
        )  # fmt: skip
        values = {"me": 1.0, "a": 1.1, "b": 0.9, "far": 100.0}

        async def send(index, sender):
            return [await reducer.accumulate_part(index, k, torch.full((4,), values[sender])) for k in range(2)]

        await asyncio.gather(*(send(i, s) for i, s in enumerate(["me", "a", "b", "far"])))
        return reducer

    reducer = asyncio.run(round_())
    assert len(reducer.reports) == 2
    assert book.record("far").parts == 1  # one observation for the whole round, not one per part
    assert book.is_banned("far")
    assert book.record("me") is None
    assert not book.is_banned("a") and not book.is_banned("b")


def test_a_weight_nobody_honest_can_have_is_a_strike_once_per_round():
    book = ReputationBook(max_invalid=2, min_senders=3)
    parts = [torch.zeros(4), torch.zeros(4)]

    async def round_(name):
        reducer = RobustTensorPartReducer(
            [p.shape for p in parts], [p.dtype for p in parts], ["me", "a", "liar"],
            aggregator=make_aggregator("centered_clip", tau=1.0), reputation=book, local_sender="me",
            weight_claim_limit=128.0, round_name=name,
        )  # fmt: skip
        weights = {"me": 8.0, "a": 16.0, "liar": 8000.0}

        async def send(index, sender):
            return [await reducer.accumulate_part(index, k, torch.ones(4), weight=weights[sender]) for k in range(2)]

        results = await asyncio.gather(*(send(i, s) for i, s in enumerate(["me", "a", "liar"])))
        return reducer, results

    reducer, results = asyncio.run(round_("r1"))
    assert reducer.weight_liars == {"liar"}
    assert book.record("liar").invalid == 1  # two parts, one strike
    assert all(torch.equal(part, torch.ones(4)) for parts_back in results for part in parts_back)  # data still used
    assert not book.is_banned("liar")
    asyncio.run(round_("r2"))
    assert book.is_banned("liar")
    assert not book.is_banned("a")


def test_colluders_who_outnumber_us_are_judged_from_our_own_part():
    # two x-1000 colluders and us: every aggregate sits among them, so judged by the result they look honest and
    # we look far; judged from our own part they are 1000x out and get banned after 3 rounds
    book = ReputationBook(ban_distance_ratio=5.0, min_observations=3, ema_alpha=0.5, min_senders=3)
    torch.manual_seed(0)
    own = torch.randn(8)

    async def round_():
        reducer = RobustTensorPartReducer(
            [torch.Size([8])], [torch.float32], ["me", "c1", "c2"],
            aggregator=make_aggregator("median"), reputation=book, local_sender="me",
        )  # fmt: skip
        rows = {"me": own, "c1": -1000 * own + 0.1 * torch.randn(8), "c2": -1000 * own + 0.1 * torch.randn(8)}
        await asyncio.gather(*(reducer.accumulate_part(i, 0, rows[s]) for i, s in enumerate(["me", "c1", "c2"])))

    for _ in range(3):
        asyncio.run(round_())
    assert book.is_banned("c1") and book.is_banned("c2")
    assert book.record("me") is None


def _pair_round(book, own, other, aggregator="centered_clip", captured_ratio=CAPTURED_RATIO):
    params = {"tau": 1.0} if aggregator == "centered_clip" else {}
    async def round_():
        reducer = RobustTensorPartReducer(
            [own.shape], [own.dtype], ["me", "other"], aggregator=make_aggregator(aggregator, **params),
            reputation=book, local_sender="me", captured_ratio=captured_ratio,
        )  # fmt: skip
        await asyncio.gather(reducer.accumulate_part(0, 0, own), reducer.accumulate_part(1, 0, other))
        reducer.finalize()

    asyncio.run(round_())


def test_the_other_sender_of_a_pair_is_judged_from_our_own_part():
    # a round of two cannot say which is far by the result; our own part can. An x-1000 partner is banned after
    # 3 pairs, an honest partner (another batch's gradient: as far from ours as ours is long) never is
    generator = torch.Generator().manual_seed(0)
    book = ReputationBook(ban_distance_ratio=5.0, min_observations=3, ema_alpha=0.2, min_senders=3)
    for _ in range(3):
        own = torch.randn(64, generator=generator)
        _pair_round(book, own, -1000 * own)
    assert book.is_banned("other") and book.record("me") is None

    honest_book = ReputationBook(ban_distance_ratio=5.0, min_observations=3, ema_alpha=0.2, min_senders=3)
    for _ in range(100):
        own = torch.randn(64, generator=generator)
        _pair_round(honest_book, own, 0.5 * own + torch.randn(64, generator=generator))
    record = honest_book.record("other")
    assert record.parts == 100 and record.distance_ema < 1.0 and record.bans == 0
    # nor one that averaged a single micro-batch while we averaged 30 (our mean gradient is mostly signal)
    signal_book = ReputationBook(ban_distance_ratio=5.0, min_observations=3, ema_alpha=0.2, min_senders=3)
    signal = 0.1 * torch.randn(64, generator=generator)
    for _ in range(100):
        own = signal + torch.stack([torch.randn(64, generator=generator) for _ in range(30)]).mean(dim=0)
        _pair_round(signal_book, own, signal + torch.randn(64, generator=generator))
    assert signal_book.record("other").bans == 0


def test_the_mean_baseline_leaves_pairs_unscored():
    book = ReputationBook(ban_distance_ratio=5.0, min_observations=1, ema_alpha=1.0, min_senders=3)
    own = torch.randn(64)
    _pair_round(book, own, -1000 * own, aggregator="mean", captured_ratio=None)
    assert book.record("other").distance_ema is None and not book.is_banned("other")


def test_a_peer_never_bans_itself_for_its_own_malformed_part():
    book = ReputationBook()

    async def round_():
        reducer = RobustTensorPartReducer(
            [torch.Size((4,))], [torch.float32], ["me", "a", "b"],
            aggregator=make_aggregator("mean"), reputation=book, local_sender="me", round_name="own",
        )  # fmt: skip
        bad = torch.tensor([0.0, float("nan"), 0.0, 0.0])
        sends = [reducer.accumulate_part(0, 0, bad), reducer.accumulate_part(1, 0, torch.ones(4))]
        sends.append(reducer.accumulate_part(2, 0, torch.full((4,), 3.0)))
        return await asyncio.gather(*sends, return_exceptions=True)

    own, a, b = asyncio.run(round_())

    assert isinstance(own, RejectedPartError)
    torch.testing.assert_close(a, torch.full((4,), 2.0))  # the others still average
    assert book.record("me").invalid == 1 and not book.is_banned("me")
