import random

from dragon_swarm.moe.registry import ExpertHostRecord, Replica
from dragon_swarm.moe.router import ReplicaTable, _check_output

import torch


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
    good = torch.zeros(3, 4)
    assert _check_output(good, torch.Size([3, 4])) is None
    assert "shape" in _check_output(torch.zeros(2, 4), torch.Size([3, 4]))
    assert "non-finite" in _check_output(torch.full((3, 4), float("nan")), torch.Size([3, 4]))
    assert "TimeoutError" in _check_output(TimeoutError(), torch.Size([3, 4]))
