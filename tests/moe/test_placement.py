"""Expert placement as a pure function over registry records."""

import pytest

from dragon_swarm.moe.placement import choose_experts, replica_counts

UIDS = [f"s_ffn.{layer}.{index}" for layer in range(2) for index in range(4)]


def test_least_replicated_first_then_least_throughput():
    hosts = {
        UIDS[0]: {"QmA": 100.0, "QmB": 100.0},
        UIDS[1]: {"QmA": 100.0},
        UIDS[2]: {"QmB": 50.0},
        # UIDS[3:] have no host
    }
    assert choose_experts(UIDS, hosts, "QmMe", 5) == UIDS[3:]  # the five unserved
    assert choose_experts(UIDS, hosts, "QmMe", 6) == [UIDS[2], *UIDS[3:]]  # then the one at 50 tokens/s
    assert choose_experts(UIDS, hosts, "QmMe", 8) == UIDS
    assert choose_experts(UIDS, hosts, "QmMe", 0) == []


def test_own_records_do_not_count_so_a_rerun_keeps_a_sound_choice():
    mine = choose_experts(UIDS, {}, "QmMe", 3)
    announced = {uid: {"QmMe": 100.0} for uid in mine}
    assert choose_experts(UIDS, announced, "QmMe", 3) == mine


def test_peers_choosing_at_the_same_moment_spread_out():
    choices = [set(choose_experts(UIDS, {}, peer, 4)) for peer in ("QmAlice", "QmBob", "QmCarol", "QmDave")]
    assert len({frozenset(c) for c in choices}) > 1  # not everyone takes the same four
    assert all(len(c) == 4 for c in choices)


def test_three_hosts_with_room_for_everything_replicate_evenly():
    hosts: dict[str, dict[str, float]] = {}
    for peer in ("QmAlice", "QmBob", "QmCarol"):
        for uid in choose_experts(UIDS, hosts, peer, len(UIDS)):
            hosts.setdefault(uid, {})[peer] = 100.0
    counts = replica_counts(UIDS, hosts)
    assert min(counts.values()) >= 1 and max(counts.values()) - min(counts.values()) <= 1


def test_hosts_joining_one_after_another_fill_the_gaps_first():
    hosts: dict[str, dict[str, float]] = {}
    for peer in ("QmAlice", "QmBob", "QmCarol", "QmDave"):
        for uid in choose_experts(UIDS, hosts, peer, 3):
            hosts.setdefault(uid, {})[peer] = 100.0
    counts = replica_counts(UIDS, hosts)  # 12 slots over 8 experts: every expert hosted, none thrice
    assert min(counts.values()) == 1 and max(counts.values()) == 2


def test_negative_budget_is_refused():
    with pytest.raises(ValueError):
        choose_experts(UIDS, {}, "QmMe", -1)
