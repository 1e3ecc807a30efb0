"""ReputationBook: counts, scale-free distance EMA, both ban rules, expiry, snapshots, threads; no network."""

import json
import math
import pickle
import threading

import pytest
import torch

from dragon_swarm.averaging.reputation import ReputationBook

A, B, C, D = "peerA", "peerB", "peerC", "peerD"


def _book(**overrides) -> ReputationBook:
    params = dict(
        ban_seconds=100.0, max_invalid=3, ban_distance_ratio=4.0, min_observations=3, ema_alpha=0.5, min_senders=3
    )
    params.update(overrides)
    return ReputationBook(**params)


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "bad",
    [
        dict(ban_seconds=-1.0),
        dict(ban_seconds=math.inf),
        dict(max_invalid=0),
        dict(max_invalid=2.5),
        dict(ban_distance_ratio=0.0),
        dict(min_observations=0),
        dict(ema_alpha=0.0),
        dict(ema_alpha=1.5),
        dict(min_senders=1),
        dict(max_ratio=1.0),  # below ban_distance_ratio: the ratio rule could never fire
        dict(max_records=0),
    ],
)
def test_invalid_parameters_raise(bad):
    with pytest.raises(ValueError):
        _book(**bad)


def test_unknown_peer_is_clean():
    book = _book()

    assert not book.is_banned(A, now=0.0)
    assert book.record(A) is None
    assert book.banned(now=0.0) == {}
    assert book.snapshot(now=0.0) == {"now": 0.0, "banned": {}, "peers": {}}
    assert len(book) == 0


@pytest.mark.parametrize("peer", ["", None, 42])
def test_peer_must_be_a_nonempty_string(peer):
    with pytest.raises(ValueError):
        _book().record_invalid(peer, "NaN", now=0.0)


# ---------------------------------------------------------------- invalid parts


def test_invalid_parts_are_counted_with_reason():
    book = _book()

    banned = book.record_invalid(A, "contains 3 NaN value(s)", now=1.0)

    record = book.record(A)
    assert not banned
    assert record.invalid == 1 and record.invalid_strikes == 1 and record.parts == 0
    assert record.last_invalid_reason == "contains 3 NaN value(s)"
    assert not book.is_banned(A, now=1.0)


def test_max_invalid_parts_ban_for_ban_seconds():
    book = _book(max_invalid=3, ban_seconds=100.0)

    results = [book.record_invalid(A, f"bad {i}", now=10.0 + i) for i in range(3)]

    assert results == [False, False, True]
    assert book.is_banned(A, now=12.0)
    assert book.is_banned(A, now=111.9)
    assert not book.is_banned(A, now=112.0)  # banned until 12 + 100, exclusive
    assert book.banned(now=50.0) == {A: 112.0}
    assert book.banned(now=112.0) == {}
    record = book.record(A)
    assert record.bans == 1 and record.invalid_strikes == 0 and "bad 2" in record.ban_reason
    assert not book.is_banned(B, now=50.0)


def test_strikes_restart_after_a_ban_but_totals_do_not():
    book = _book(max_invalid=2, ban_seconds=10.0)
    book.record_invalid(A, "x", now=0.0)
    book.record_invalid(A, "x", now=0.0)  # banned until 10

    after_one = book.record_invalid(A, "x", now=20.0)
    after_two = book.record_invalid(A, "x", now=21.0)

    assert not after_one and after_two
    record = book.record(A)
    assert record.invalid == 4 and record.bans == 2
    assert book.is_banned(A, now=40.0) and not book.is_banned(A, now=41.0)  # a second ban: twice the first


def test_conclusive_evidence_bans_at_once_and_restarts_strikes():
    book = _book(max_invalid=3, ban_seconds=100.0)
    book.record_invalid(A, "claimed weight 9e9", now=0.0)  # a soft strike first

    banned = book.record_invalid(A, "contains 1 NaN value(s)", now=1.0, conclusive=True)

    record = book.record(A)
    assert banned and book.is_banned(A, now=100.9) and not book.is_banned(A, now=101.0)
    assert record.invalid == 2 and record.invalid_strikes == 0 and record.bans == 1
    assert record.ban_reason == "malformed part: contains 1 NaN value(s)"


def test_a_strike_that_may_not_ban_is_still_counted():
    book = _book(max_invalid=1)

    results = [book.record_invalid(A, "NaN", now=float(i), conclusive=True, may_ban=False) for i in range(3)]

    assert results == [False, False, False]
    assert not book.is_banned(A, now=3.0)
    assert book.record(A).invalid == 3


# ---------------------------------------------------------------- distances


def test_distance_ratio_is_relative_to_the_part_median():
    book = _book(ema_alpha=0.5)

    book.record_distances([A, B, C], torch.tensor([1.0, 2.0, 10.0]), now=0.0)

    assert book.record(A).distance_ema == pytest.approx(0.5)
    assert book.record(B).distance_ema == pytest.approx(1.0)
    assert book.record(C).distance_ema == pytest.approx(5.0)
    assert all(book.record(p).parts == 1 for p in (A, B, C))


def test_even_number_of_senders_uses_the_middle_average_as_median():
    book = _book()

    book.record_distances([A, B, C, D], [1.0, 2.0, 4.0, 8.0], now=0.0)

    assert book.record(D).distance_ema == pytest.approx(8.0 / 3.0)


def test_ema_update_follows_alpha():
    book = _book(ema_alpha=0.25, ban_distance_ratio=50.0, max_ratio=100.0)

    book.record_distances([A, B, C], [1.0, 1.0, 10.0], now=0.0)  # C: 10
    book.record_distances([A, B, C], [1.0, 1.0, 2.0], now=1.0)  # C: 10 + 0.25 * (2 - 10) = 8

    assert book.record(C).distance_ema == pytest.approx(8.0)
    assert book.record(C).parts == 2


def test_distances_are_scale_free():
    small, large = _book(), _book()

    small.record_distances([A, B, C], [0.001, 0.002, 0.01], now=0.0)
    large.record_distances([A, B, C], [1000.0, 2000.0, 10000.0], now=0.0)

    for peer in (A, B, C):
        assert small.record(peer).distance_ema == pytest.approx(large.record(peer).distance_ema)


def test_too_few_senders_count_parts_but_not_distances():
    book = _book(min_senders=3)

    book.record_distances([A, B], [1.0, 100.0], now=0.0)

    assert book.record(B).parts == 1
    assert book.record(B).distance_ema is None


def test_an_explicit_unit_scores_a_round_of_two():
    book = _book(min_senders=3)  # distances measured from A's own part, in units of its norm (2.0)

    book.record_distances([A, B], [0.0, 100.0], now=0.0, unscored=[A], unit=2.0)

    assert book.record(B).distance_ema == pytest.approx(50.0)


def test_zero_median_makes_any_nonzero_distance_maximal():
    book = _book(max_ratio=50.0)

    book.record_distances([A, B, C], [0.0, 0.0, 3.0], now=0.0)

    assert book.record(A).distance_ema == 0.0
    assert book.record(C).distance_ema == 50.0


def test_single_ratio_is_capped_and_nonfinite_counts_as_cap():
    book = _book(max_ratio=20.0)

    book.record_distances([A, B, C, D], [1.0, 1.0, 1e12, math.nan], now=0.0)

    assert book.record(C).distance_ema == 20.0
    assert book.record(D).distance_ema == 20.0


def test_far_sender_is_banned_after_min_observations_in_a_row():
    book = _book(min_observations=3, ban_distance_ratio=4.0, ban_seconds=100.0)

    newly_banned = [book.record_distances([A, B, C], [1.0, 1.0, 10.0], now=float(t)) for t in range(3)]

    assert newly_banned == [[], [], [C]]
    assert book.is_banned(C, now=2.0) and not book.is_banned(C, now=102.0)
    assert not book.is_banned(A, now=2.0) and not book.is_banned(B, now=2.0)
    record = book.record(C)
    assert record.bans == 1 and record.far_streak == 0 and "distance EMA" in record.ban_reason


def test_streak_breaks_when_the_ema_falls_back_below_the_ratio():
    book = _book(min_observations=3, ema_alpha=1.0)  # alpha 1: the EMA is the latest ratio

    book.record_distances([A, B, C], [1.0, 1.0, 10.0], now=0.0)
    book.record_distances([A, B, C], [1.0, 1.0, 10.0], now=1.0)
    book.record_distances([A, B, C], [1.0, 1.0, 1.0], now=2.0)  # back to normal: streak resets
    book.record_distances([A, B, C], [1.0, 1.0, 10.0], now=3.0)
    book.record_distances([A, B, C], [1.0, 1.0, 10.0], now=4.0)

    assert not book.is_banned(C, now=4.0)
    assert book.record(C).far_streak == 2


def test_ema_survives_the_ban_so_a_returning_attacker_is_rebanned_quickly():
    book = _book(min_observations=2, ema_alpha=0.1, ban_seconds=10.0)
    for t in range(2):
        book.record_distances([A, B, C], [1.0, 1.0, 100.0], now=float(t))
    assert book.is_banned(C, now=1.0)

    # after the ban, C behaves: its EMA (still high) decays but stays above 4 for a while
    book.record_distances([A, B, C], [1.0, 1.0, 1.0], now=20.0)
    book.record_distances([A, B, C], [1.0, 1.0, 1.0], now=21.0)

    assert book.is_banned(C, now=21.0)
    assert book.record(C).bans == 2


def test_honest_jitter_is_never_banned():
    generator = torch.Generator().manual_seed(0)
    book = _book(min_observations=3)

    for t in range(200):
        distances = 1.0 + 0.5 * torch.rand(5, generator=generator)
        book.record_distances([A, B, C, D, "peerE"], distances, now=float(t))

    assert book.banned(now=200.0) == {}
    assert all(book.record(p).parts == 200 for p in (A, B, C, D))


@pytest.mark.parametrize(
    "peers, distances",
    [([A, B], [1.0, 2.0, 3.0]), ([A, A, B], [1.0, 2.0, 3.0])],
    ids=["length mismatch", "duplicate peer"],
)
def test_bad_distance_records_raise(peers, distances):
    with pytest.raises(ValueError):
        _book().record_distances(peers, distances, now=0.0)


def test_distances_accept_any_float_dtype():
    book = _book()

    book.record_distances([A, B, C], torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16), now=0.0)

    assert book.record(C).distance_ema == pytest.approx(1.5)


# ---------------------------------------------------------------- manual bans, clock, snapshots


def test_manual_ban_extends_but_never_shortens():
    book = _book(ban_seconds=100.0)

    book.ban(A, "seen forging records", now=0.0)
    book.ban(A, "again", now=50.0)  # until 150
    book.ban(A, "again", now=10.0)  # would be 110: keeps 150

    assert book.banned(now=120.0) == {A: 150.0}
    assert book.record(A).bans == 3 and book.record(A).ban_reason == "again"


def test_a_repeat_offender_serves_doubled_bans_up_to_the_longest():
    book = _book(ban_seconds=100.0, max_ban_seconds=350.0)
    lengths = []
    now = 0.0
    for _ in range(5):  # banned again each time the last ban has just run out
        book.ban(A, "lied", now=now)
        lengths.append(book.banned(now=now)[A] - now)
        now = book.banned(now=now)[A]
    assert lengths == [100.0, 200.0, 350.0, 350.0, 350.0]
    assert book.record(A).episodes == 5


def test_more_evidence_during_a_ban_does_not_escalate_it():
    book = _book(ban_seconds=100.0)
    book.ban(A, "lied", now=0.0)
    book.ban(A, "lied again, same ban", now=50.0)  # extends to 150, still the first ban
    assert book.record(A).episodes == 1 and book.banned(now=60.0) == {A: 150.0}
    book.ban(A, "back and lying", now=151.0)
    assert book.banned(now=151.0) == {A: 351.0}  # the second ban: doubled


def test_a_peer_clean_for_the_longest_ban_starts_over():
    book = _book(ban_seconds=100.0, max_ban_seconds=1000.0)
    book.ban(A, "fluke", now=0.0)
    book.ban(A, "fluke", now=200.0)  # second: 200 s, until 400
    book.ban(A, "much later", now=400.0 + 1000.0)  # clean for max_ban_seconds after it ended
    assert book.record(A).episodes == 1 and book.banned(now=1400.0) == {A: 1500.0}


@pytest.mark.parametrize("longest", [50.0, math.inf, -1.0])
def test_the_longest_ban_must_be_finite_and_hold_the_first(longest):
    with pytest.raises(ValueError, match="max_ban_seconds"):
        _book(ban_seconds=100.0, max_ban_seconds=longest)


def test_default_clock_is_monotonic():
    book = _book(ban_seconds=1000.0)

    book.ban(A, "test")

    assert book.is_banned(A)
    assert A in book.banned()


def test_snapshot_is_json_and_reports_bans():
    book = _book(ban_seconds=100.0)
    book.record_distances([A, B, C], [1.0, 1.0, 3.0], now=0.0)
    book.ban(C, "manual", now=0.0)

    snapshot = book.snapshot(now=40.0)

    json.dumps(snapshot, allow_nan=False)  # raises on inf/nan
    assert snapshot["now"] == 40.0
    assert snapshot["banned"] == {C: 60.0}
    assert snapshot["peers"][C]["banned"] is True and snapshot["peers"][C]["ban_seconds_left"] == 60.0
    assert snapshot["peers"][A]["banned"] is False and snapshot["peers"][A]["banned_until"] is None
    assert snapshot["peers"][A]["parts"] == 1 and snapshot["peers"][C]["distance_ema"] == pytest.approx(3.0)
    assert set(snapshot["peers"][A]) >= {"parts", "invalid", "distance_ema", "bans", "last_invalid_reason"}


def test_record_returns_a_copy():
    book = _book()
    book.record_invalid(A, "x", now=0.0)

    book.record(A).invalid = 99

    assert book.record(A).invalid == 1


def test_pickle_round_trip_keeps_records_and_a_working_lock():
    book = _book()
    book.record_invalid(A, "x", now=0.0)
    book.ban(B, "y", now=0.0)

    copy = pickle.loads(pickle.dumps(book))
    copy.record_invalid(A, "z", now=1.0)

    assert copy.record(A).invalid == 2 and book.record(A).invalid == 1
    assert copy.is_banned(B, now=1.0)


def test_records_are_bounded_and_banned_peers_are_kept():
    book = _book(max_records=3)
    book.ban(A, "keep me", now=0.0)
    book.record_invalid(B, "x", now=1.0)
    book.record_invalid(C, "x", now=2.0)

    book.record_invalid(D, "x", now=3.0)  # evicts B, the least recently seen unbanned

    assert len(book) == 3
    assert book.record(B) is None
    assert book.record(A) is not None and book.is_banned(A, now=3.0)


def test_concurrent_writers_lose_no_counts():
    book = _book(max_invalid=10**9)
    threads_n, per_thread = 8, 500

    def work(index):
        for i in range(per_thread):
            book.record_invalid(A, "x", now=float(i))
            book.record_distances([A, B, f"peer{index}"], [1.0, 1.0, 1.0], now=float(i))
            book.snapshot(now=float(i))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert book.record(A).invalid == threads_n * per_thread
    assert book.record(A).parts == threads_n * per_thread
    assert book.record(B).parts == threads_n * per_thread


def test_a_ban_ratio_of_max_ratio_never_bans_for_distance():
    # the state averager's setting: parameters of trainers in step are identical (median distance 0), so one
    # version behind reads as the capped maximum every round; that must not ban an honest trainer
    from dragon_swarm.averaging.reputation import MAX_RATIO

    book = ReputationBook(ban_distance_ratio=MAX_RATIO, min_observations=1)
    for round_index in range(20):
        book.record_distances([A, B, C], [0.0, 0.0, 1e6], now=float(round_index))
    assert book.record(C).distance_ema == MAX_RATIO
    assert not book.is_banned(C, now=20.0)
