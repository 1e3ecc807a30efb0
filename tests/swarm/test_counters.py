"""This peer's contribution counters on disk: pure, no network (the publisher runs over real DHTs in
test_contribution_records.py)."""

from __future__ import annotations

import json
import logging
import math
import threading

import pytest
from pydantic import ValidationError

from dragon_swarm.swarm.counters import ContributionCounters

SAVED = {"format": 1, "run_prefix": "run", "peer_id": "p", "tokens": 1, "batches": 0, "expert_requests": 0, "uptime_s": 0.0}


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_counters_roundtrip_through_the_file(tmp_path):
    path = tmp_path / "state" / "contributions.json"
    clock = FakeClock(100.0)
    counters = ContributionCounters("run", "peerA", clock=clock)
    counters.add_batch(tokens=512)
    counters.add_batch(tokens=256, count=2)
    counters.add_tokens(10)
    counters.add_expert_requests(4)
    clock.t = 130.0
    counters.save(path)

    saved = json.loads(path.read_text())
    assert saved["run_prefix"] == "run" and saved["peer_id"] == "peerA"
    assert [p.name for p in path.parent.iterdir()] == ["contributions.json"]  # no temp file left behind

    loaded = ContributionCounters.load(path, "run", clock=FakeClock(0.0))
    assert (loaded.tokens, loaded.batches, loaded.expert_requests, loaded.peer_id) == (778, 3, 4, "peerA")
    assert loaded.uptime_s() == pytest.approx(30.0)


def test_uptime_accumulates_across_sessions_without_double_counting(tmp_path):
    path = tmp_path / "contributions.json"
    clock = FakeClock(0.0)
    first = ContributionCounters("run", clock=clock)
    clock.t = 40.0
    first.save(path)
    clock.t = 50.0
    first.save(path)  # saving twice in one session counts the session once
    assert ContributionCounters.load(path, "run").uptime_s() == pytest.approx(50.0, abs=1.0)

    clock2 = FakeClock(1000.0)
    second = ContributionCounters.load(path, "run", clock=clock2)
    clock2.t = 1025.0
    assert second.uptime_s() == pytest.approx(75.0)
    second.save(path)
    assert ContributionCounters.load(path, "run", clock=FakeClock(0.0)).uptime_s() == pytest.approx(75.0)


def test_missing_file_gives_zeros_silently(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        counters = ContributionCounters.load(tmp_path / "nope.json", "run")
    assert (counters.tokens, counters.batches, counters.expert_requests) == (0, 0, 0)
    assert not caplog.records


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[]",
        json.dumps({**SAVED, "tokens": -1}),
        json.dumps({key: value for key, value in SAVED.items() if key != "uptime_s"}),
        json.dumps({**SAVED, "format": 2}),
        json.dumps({**SAVED, "surprise": True}),
    ],
)
def test_corrupt_file_gives_zeros_with_a_warning(tmp_path, caplog, content):
    path = tmp_path / "contributions.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        counters = ContributionCounters.load(path, "run")
    assert (counters.tokens, counters.batches, counters.expert_requests, counters.uptime_s() < 1.0) == (0, 0, 0, True)
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert path.read_text() == content  # left for inspection


def test_binary_garbage_gives_zeros(tmp_path):
    path = tmp_path / "contributions.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert ContributionCounters.load(path, "run").tokens == 0


def test_another_swarms_file_gives_zeros_with_a_warning(tmp_path, caplog):
    path = tmp_path / "contributions.json"
    other = ContributionCounters("other-run")
    other.add_batch(tokens=99)
    other.save(path)
    with caplog.at_level(logging.WARNING):
        counters = ContributionCounters.load(path, "run")
    assert counters.tokens == 0 and counters.batches == 0 and counters.run_prefix == "run"
    assert any("other-run" in r.getMessage() for r in caplog.records)


def test_negative_or_non_int_counts_are_refused():
    counters = ContributionCounters("run")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            counters.add_tokens(bad)
    with pytest.raises(ValueError):
        counters.add_batch(tokens=-1)
    with pytest.raises(ValueError):
        counters.add_expert_requests(-2)
    assert counters.tokens == 0


def test_to_record_snapshots_the_counters():
    clock = FakeClock(0.0)
    counters = ContributionCounters("run", clock=clock)
    counters.add_batch(tokens=7)
    clock.t = 12.5
    r = counters.to_record("peerA", "alice", "trainer+host")
    assert (r.peer_id, r.name, r.tokens, r.batches, r.uptime_s, r.role) == ("peerA", "alice", 7, 1, 12.5, "trainer+host")
    assert counters.peer_id == "peerA"
    with pytest.raises(ValidationError):
        counters.to_record("peerA", "bad\x00name", "trainer")
    assert math.isfinite(counters.uptime_s())


def test_counters_are_thread_safe():
    counters = ContributionCounters("run")

    def work():
        for _ in range(2000):
            counters.add_batch(tokens=3)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (counters.batches, counters.tokens) == (8000, 24000)
