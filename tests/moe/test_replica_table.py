import random

import torch

from dragon_swarm.moe.registry import ExpertHostRecord, Replica
from dragon_swarm.moe.router import (
    BYZANTINE_BAN_FACTOR,
    VERIFY_FIRST_CALLS,
    ReplicaTable,
    Verdict,
    check_output,
    judge_cross_check,
    outputs_disagree,
    relative_difference,
    scale_ratio,
)


def replica(uid: str, peer: str) -> Replica:
    return Replica(uid, ExpertHostRecord(peer_id=peer, state="online", throughput=1.0, version=0), 0.0)


def test_unmeasured_replicas_are_tried_then_the_fastest_wins():
    table = ReplicaTable(ban_seconds=10)
    table.update({"e": [replica("e", "A"), replica("e", "B")]})
    rng = random.Random(0)
    table.record_success("A", 0.5)
    assert table.choose("e", now=0.0, rng=rng) == "B"  # never measured: explore it
    table.record_success("B", 0.1)
    assert table.choose("e", now=0.0, rng=rng) == "B"
    table.record_success("B", 2.0)  # EMA: 0.7*0.1 + 0.3*2.0 = 0.67 > 0.5
    assert abs(table.latency["B"] - 0.67) < 1e-9
    assert table.choose("e", now=0.0, rng=rng) == "A"


def test_failed_replica_is_banned_until_the_ban_expires():
    table = ReplicaTable(ban_seconds=10)
    table.update({"e": [replica("e", "A")]})
    table.record_failure("A", now=100.0)
    assert table.choose("e", now=105.0, rng=random.Random(0)) is None
    assert table.usable("e", now=110.0) == ["A"]


def test_expert_outputs_are_checked():
    x = torch.ones(3, 4)
    assert check_output(torch.zeros(3, 4), x, 30.0) is None
    assert "shape" in check_output(torch.zeros(2, 4), x, 30.0).reason
    assert "non-finite" in check_output(torch.full((3, 4), float("nan")), x, 30.0).reason
    timeout = check_output(TimeoutError(), x, 30.0)
    assert "TimeoutError" in timeout.reason and not timeout.byzantine  # no answer: a timeout ban, not a Byzantine one
    assert check_output(torch.zeros(2, 4), x, 30.0).byzantine


def test_outputs_far_larger_than_their_input_are_refused():
    x = torch.full((3, 4), 0.5)  # RMS 0.5
    assert check_output(torch.full((3, 4), 14.9), x, 30.0) is None  # 29.8 x
    refusal = check_output(torch.full((3, 4), 15.1), x, 30.0)  # 30.2 x
    assert refusal.byzantine and "30.2 x the input's, limit 30 x" in refusal.reason
    assert check_output(torch.full((3, 4), 15.1), x, None) is None  # backward results: no ratio check


def test_an_all_zero_input_does_not_make_every_output_infinitely_large():
    zeros = torch.zeros(3, 4)
    assert check_output(torch.full((3, 4), 0.01), zeros, 30.0) is None  # 10 x the 1e-3 floor
    assert check_output(torch.full((3, 4), 1.0), zeros, 30.0).byzantine  # 1000 x the floor


def test_byzantine_bans_are_per_expert_longer_and_counted():
    table = ReplicaTable(ban_seconds=8)
    table.update({"e": [replica("e", "A"), replica("e", "B")], "f": [replica("f", "A")]})
    assert table.record_byzantine("A", "e", now=100.0) == 8 * BYZANTINE_BAN_FACTOR
    assert table.usable("e", now=101.0) == ["B"]
    assert table.usable("f", now=101.0) == ["A"]  # A lied about e only: f stays usable
    assert table.usable("e", now=100.0 + 8 * BYZANTINE_BAN_FACTOR - 1) == ["B"]  # longer than a timeout ban
    assert table.usable("e", now=100.0 + 8 * BYZANTINE_BAN_FACTOR) == ["A", "B"]
    table.record_byzantine("A", "f", now=200.0)
    assert table.byzantine_bans == 2 and table.byzantine_peers == {"A"}
    assert table.choose("e", now=101.0, rng=random.Random(0), exclude=["B"]) is None


def test_first_calls_of_every_pair_are_always_cross_checked_then_a_fraction():
    table = ReplicaTable(ban_seconds=8)
    for _ in range(VERIFY_FIRST_CALLS):
        assert table.wants_cross_check("A", "e", draw=0.99, fraction=0.05)
        table.record_cross_check("A", "e")
    assert not table.wants_cross_check("A", "e", draw=0.99, fraction=0.05)
    assert table.wants_cross_check("A", "e", draw=0.01, fraction=0.05)
    assert table.wants_cross_check("A", "f", draw=0.99, fraction=0.05)  # per (peer, expert)
    assert not table.wants_cross_check("A", "f", draw=0.0, fraction=0.0)  # 0: cross-checks off


def test_relative_difference():
    a = torch.ones(2, 3)
    assert relative_difference(a, a) == 0.0
    assert abs(relative_difference(a, 100 * a) - 0.99) < 1e-6  # a x100 liar, seen from an honest replica
    assert abs(relative_difference(a, -a) - 2.0) < 1e-6
    assert relative_difference(torch.zeros(2), torch.zeros(2)) == 0.0
    # with a floor (a share of the input's norm), tiny outputs' differences stay small
    assert abs(relative_difference(0.001 * a, 0.002 * a, floor=0.1) - 0.001 * 6**0.5 / 0.1) < 1e-6


def test_fresh_replicas_drifting_apart_agree_thanks_to_the_floor_while_a_x100_liar_does_not():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    norm = float(x.norm())
    fresh = 0.003 * x  # a fresh expert answers ~0.003 x its input
    drifted = 0.003 * torch.roll(x, 1, dims=1)  # another replica after a few different updates: unrelated output
    assert relative_difference(fresh, drifted) > 0.5  # relative to the outputs alone they "disagree"
    assert judge_cross_check(fresh, drifted, 0.5, reference_trusted=True, input_norm=norm) is Verdict.AGREE
    assert judge_cross_check(100 * drifted, fresh, 0.5, reference_trusted=True, input_norm=norm) is Verdict.PRIMARY_WRONG


def test_a_replica_still_near_zero_does_not_make_a_grown_one_a_liar_while_a_x100_liar_still_is():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    norm = float(x.norm())
    grown = 0.1 * x  # one honest replica after a few steps in one direction (a CI run: 38x the other one)
    still_fresh = 0.0026 * torch.roll(x, 1, dims=1)
    assert scale_ratio(grown, still_fresh) > 30  # without a floor they are far apart
    assert judge_cross_check(grown, still_fresh, 1.2, reference_trusted=True, input_norm=norm) is Verdict.AGREE
    assert judge_cross_check(still_fresh, grown, 1.2, reference_trusted=True, input_norm=norm) is Verdict.AGREE
    fresh = 0.003 * x
    assert judge_cross_check(100 * fresh, 0.003 * torch.roll(x, 1, dims=1), 1.2, reference_trusted=True, input_norm=norm) is Verdict.PRIMARY_WRONG
    assert judge_cross_check(100 * grown, still_fresh, 1.2, reference_trusted=True, input_norm=norm) is Verdict.PRIMARY_WRONG


def test_a_x100_liar_is_told_from_a_drifted_honest_replica_by_its_norm():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    honest = 2 * x
    drifted = 2 * x + 1.8 * torch.roll(x, 1, dims=1)  # ~0.9 apart, as measured between unsynced honest replicas
    assert relative_difference(honest, drifted) < 1.2 and scale_ratio(honest, drifted) < 2
    assert not outputs_disagree(honest, drifted, 1.2, float(x.norm()))
    assert relative_difference(100 * honest, drifted) < 1.0  # direction alone cannot exceed 0.99 for a scaled liar
    assert outputs_disagree(100 * honest, drifted, 1.2, float(x.norm()))  # its norm gives it away
    assert outputs_disagree(-honest, honest, 1.2, float(x.norm()))  # a sign flip: 2 apart
    assert scale_ratio(torch.zeros(3), torch.zeros(3)) == 1.0


def test_cross_check_verdicts():
    honest = torch.ones(4, 2)
    close = honest * 1.1
    liar = -honest
    other = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)) * 5
    assert judge_cross_check(honest, close, 0.5, reference_trusted=False) is Verdict.AGREE
    # our own copy is trusted: it decides alone
    assert judge_cross_check(liar, honest, 0.5, reference_trusted=True) is Verdict.PRIMARY_WRONG
    # two remote replicas and no third: nobody can be blamed
    assert judge_cross_check(liar, honest, 0.5, reference_trusted=False) is Verdict.UNRESOLVED
    # a third replica decides by majority, either way
    assert judge_cross_check(liar, honest, 0.5, reference_trusted=False, third=close) is Verdict.PRIMARY_WRONG
    assert judge_cross_check(honest, liar, 0.5, reference_trusted=False, third=close) is Verdict.REFERENCE_WRONG
    # a third that agrees with neither leaves it open
    assert judge_cross_check(liar, honest, 0.5, reference_trusted=False, third=other) is Verdict.UNRESOLVED
