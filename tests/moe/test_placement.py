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


from dragon_swarm.moe.placement import rebalance, standby, successors, takeover  # noqa: E402


def test_successors_are_one_order_per_expert_that_every_peer_computes_alike():
    peers = ["QmA", "QmB", "QmC", "QmD"]
    assert successors(UIDS[0], peers) == successors(UIDS[0], list(reversed(peers)))
    firsts = {successors(uid, peers)[0] for uid in UIDS}
    assert len(firsts) > 1  # orphans spread over the candidates


def test_an_orphan_is_taken_by_its_first_successor_then_by_the_next_if_it_stays_orphaned():
    hosts = {uid: {"QmA": 1.0} for uid in UIDS[1:]}  # UIDS[0] has no host
    order = successors(UIDS[0], ["QmA", "QmB", "QmC"])
    def takers(ticks: int) -> list[str]:
        return [peer for peer in order if takeover(UIDS, hosts, [p for p in order if p != peer], peer, {UIDS[0]: ticks}) == [UIDS[0]]]

    assert takers(1) == []  # one empty read is not a death
    assert takers(2) == [order[0]]
    assert takers(3) == order[:2]  # the first successor did not act: the next one does too
    assert takeover(UIDS, {uid: {"QmA": 1.0} for uid in UIDS}, ["QmA"], "QmB", {UIDS[0]: 5}) == []


def test_standby_copies_go_to_the_successor_of_singly_hosted_experts():
    hosts = {UIDS[0]: {"QmA": 1.0}, UIDS[1]: {"QmA": 1.0, "QmB": 1.0}}
    keepers = [p for p in ("QmB", "QmC") if UIDS[0] in standby(UIDS, hosts, [q for q in ("QmB", "QmC") if q != p], p, [])]
    assert keepers == [successors(UIDS[0], ["QmB", "QmC"])[0]]
    assert UIDS[1] not in standby(UIDS, hosts, ["QmB"], "QmC", [])  # two hosts: no standby needed
    assert standby(UIDS, hosts, ["QmB"], "QmA", [UIDS[0]]) == []  # its own host keeps no standby


def test_a_standby_copy_is_downloaded_again_when_its_expert_was_shared_in_between():
    from dragon_swarm.moe.placement import standby_downloads

    due, copied = standby_downloads([UIDS[0], UIDS[1]], {UIDS[0]: 5, UIDS[1]: 2}, {})
    assert due == [UIDS[0], UIDS[1]] and copied == {}  # the caller records what it downloaded
    copied = {UIDS[0]: 5, UIDS[1]: 2}
    assert standby_downloads([UIDS[0], UIDS[1]], {UIDS[0]: 5, UIDS[1]: 3}, copied) == ([UIDS[1]], copied)  # trained since
    # UIDS[0] gains a second host (replica sync may merge the two), then loses it again at the same version
    due, copied = standby_downloads([UIDS[1]], {UIDS[1]: 2}, copied)
    assert due == [] and copied == {UIDS[1]: 2}
    assert standby_downloads([UIDS[0], UIDS[1]], {UIDS[0]: 5, UIDS[1]: 2}, copied)[0] == [UIDS[0]]


def test_rebalance_moves_to_the_least_served_and_never_orphans_an_expert():
    uids = UIDS[:4]
    # A hosts e0, e1 that B and C also host; e3 has nobody: moving raises the minimum replication from 0 to 1
    hosts = {uids[0]: {"A": 1.0, "B": 1.0, "C": 1.0}, uids[1]: {"A": 1.0, "B": 1.0}, uids[2]: {"C": 1.0}}
    new = rebalance(uids, hosts, "A", [uids[0], uids[1]], margin=1.15)
    assert new is not None and uids[3] in new and len(new) == 2
    # C is the only host of e2: whatever it does, it keeps e2
    assert uids[2] in rebalance(uids, hosts, "C", [uids[0], uids[2]], margin=1.15)
    # a balanced swarm stays put (no gain of min replication, no throughput gain above the margin)
    even = {uid: {"A": 1.0, "B": 1.0} for uid in uids}
    assert rebalance(uids, even, "A", uids, margin=1.15) is None
    assert rebalance(uids, {uids[0]: {"A": 1.0, "B": 1.0}, uids[1]: {"B": 1.0}, uids[2]: {"A": 1.0}, uids[3]: {"B": 1.0}}, "A", [uids[0], uids[2]], margin=1.15) is None


def test_a_peer_over_its_budget_sheds_what_others_serve_best_and_keeps_its_only_copies():
    uids = UIDS[:4]
    hosts = {uids[0]: {"A": 1.0, "B": 1.0, "C": 1.0}, uids[1]: {"A": 1.0, "B": 1.0}, uids[2]: {"A": 1.0}, uids[3]: {"A": 1.0}}
    assert rebalance(uids, hosts, "A", uids, margin=1.15, budget=3) == [uids[1], uids[2], uids[3]]
    assert rebalance(uids, hosts, "A", uids, margin=1.15, budget=1) == [uids[2], uids[3]]  # only copies stay


def test_an_orphan_taken_beyond_the_budget_moves_to_a_peer_with_a_duplicate_and_is_then_shed():
    from dragon_swarm.moe.placement import firm_hosts

    # the stuck state of one CI run: 8 experts, 3 hosts of budget 3; A took an orphan over (4 experts, all its only
    # copies), B and C split the other 4 with two duplicates: nobody gains by moving, and A may drop none
    a, b, c = UIDS[:4], [UIDS[4], UIDS[5], UIDS[6]], [UIDS[5], UIDS[6], UIDS[7]]
    hosts = {uid: {p: 1.0 for p, held in (("A", a), ("B", b), ("C", c)) if uid in held} for uid in UIDS}
    assert all(rebalance(UIDS, hosts, p, held, margin=1.15, budget=3) is None for p, held in (("B", b), ("C", c)))
    assert rebalance(UIDS, hosts, "A", a, margin=1.15, budget=3) is None

    # A announces the orphan it took last as surplus: B (or C) moves a duplicated expert there, keeping its only copy
    firm = firm_hosts(hosts, {a[3]: {"A"}})
    moved = rebalance(UIDS, firm, "B", b, margin=1.15, budget=3)
    assert moved is not None and a[3] in moved and UIDS[4] in moved and len(moved) == 3

    # the peers keep checking in turn (A's surplus mark lasts while it is over budget): the swarm settles at 9
    # replicas, every expert hosted, counts within 1, nobody over budget, within a few checks
    held = {"A": a, "B": b, "C": c}
    for check in range(12):
        peer = "ABC"[check % 3]
        now = {uid: {p: 1.0 for p, mine in held.items() if uid in mine} for uid in UIDS}
        surplus = {a[3]: {"A"}} if len(held["A"]) > 3 and a[3] in held["A"] else {}
        new = rebalance(UIDS, firm_hosts(now, surplus), peer, held[peer], margin=1.15, budget=3)
        if new is not None:
            assert all(any(uid in mine for mine in {**held, peer: new}.values()) for uid in UIDS), f"{peer} orphaned an expert"
            held[peer] = new
    counts = [sum(uid in mine for mine in held.values()) for uid in UIDS]
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1 and sum(counts) == 9, held
    assert all(len(mine) == 3 for mine in held.values()), held
