"""Contribution records, leaderboard, swarm totals and local counters: pure, no network."""

from __future__ import annotations

import json
import logging
import math
import threading

import pytest
from pydantic import ValidationError

from dragon_swarm.swarm.contributions import (
    MAX_RECORD_TTL_S,
    ContributionCounters,
    ContributionRecord,
    badge_for,
    default_public_name,
    leaderboard,
    network_stats,
    parse_contribution_entries,
)

MARKER = b"[owner:ssh-rsa AAAAB3NzaC1yc2E]"
OTHER_MARKER = b"[owner:ssh-rsa AAAAotherkey]"
NOW = 1_000_000.0
SAVED = {"format": 1, "run_prefix": "run", "peer_id": "p", "tokens": 1, "batches": 0, "expert_requests": 0, "uptime_s": 0.0}


def fields(**overrides) -> dict:
    base = dict(peer_id="12D3KooWpeerA", name="alice", tokens=10, batches=2, expert_requests=1, uptime_s=5.0, role="trainer")
    return {**base, **overrides}


def record(**overrides) -> ContributionRecord:
    return ContributionRecord(**fields(**overrides))


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- record schema ---


def test_a_valid_record_roundtrips_and_strips_its_name():
    r = ContributionRecord.model_validate(fields(name="  alice  ", uptime_s=3))
    assert r.name == "alice" and r.uptime_s == 3.0 and r.version == 1
    assert ContributionRecord.model_validate(r.model_dump()) == r


@pytest.mark.parametrize(
    "bad",
    [
        {"name": ""},
        {"name": "   "},
        {"name": "x" * 41},
        {"name": "evil\nname"},
        {"name": "rtl\u202eoverride"},
        {"name": 5},
        {"peer_id": ""},
        {"peer_id": "p" * 129},
        {"tokens": -1},
        {"batches": -1},
        {"expert_requests": -3},
        {"uptime_s": -0.5},
        {"uptime_s": float("nan")},
        {"uptime_s": float("inf")},
        {"tokens": 1.0},  # strict: no silent float -> int
        {"tokens": "10"},
        {"batches": True},
        {"role": "admin"},
        {"version": 0},
        {"extra": 1},
    ],
)
def test_bad_records_are_rejected(bad):
    with pytest.raises(ValidationError):
        ContributionRecord.model_validate(fields(**bad))


def test_records_are_frozen():
    with pytest.raises(ValidationError):
        record().tokens = 10**9


def test_default_public_name_uses_the_peer_id_tail():
    assert default_public_name("12D3KooWabcdef123456") == "volunteer-123456"
    ContributionRecord.model_validate(fields(name=default_public_name("12D3KooWabcdef123456")))
    assert default_public_name("") == "volunteer"


# --- badges, leaderboard, totals ---


@pytest.mark.parametrize(
    "batches, badge",
    [(0, None), (999, None), (1000, "bronze"), (9999, "bronze"), (10000, "silver"), (99999, "silver"), (100000, "gold")],
)
def test_badges_at_their_boundaries(batches, badge):
    assert badge_for(batches) == badge


def test_leaderboard_orders_by_tokens_then_batches_then_peer_id_and_limits():
    records = {
        r.peer_id: r
        for r in [
            record(peer_id="c", tokens=5, batches=1),
            record(peer_id="b", tokens=50, batches=1),
            record(peer_id="a", tokens=50, batches=1),
            record(peer_id="d", tokens=50, batches=1500),
            record(peer_id="e", tokens=0, batches=0),
        ]
    }
    rows = leaderboard(records)
    assert [row.peer_id for row in rows] == ["d", "a", "b", "c", "e"]
    assert rows[0].badge == "bronze" and rows[1].badge is None
    assert (rows[0].name, rows[0].tokens, rows[0].batches, rows[0].expert_requests, rows[0].uptime_s) == (
        "alice",
        50,
        1500,
        1,
        5.0,
    )
    assert [row.peer_id for row in leaderboard(records, limit=2)] == ["d", "a"]
    assert leaderboard(records, limit=0) == []
    assert leaderboard({}) == []
    with pytest.raises(ValueError):
        leaderboard(records, limit=-1)


def test_network_stats_sums_and_counts_roles():
    records = {
        "a": record(peer_id="a", tokens=10, batches=1, expert_requests=0, role="trainer"),
        "b": record(peer_id="b", tokens=0, batches=0, expert_requests=7, role="host"),
        "c": record(peer_id="c", tokens=5, batches=2, expert_requests=3, role="trainer+host"),
        "d": record(peer_id="d", tokens=0, batches=0, expert_requests=0, role="monitor"),
    }
    assert network_stats(records) == {
        "peers_alive": 4,
        "swarm_tokens": 15,
        "swarm_batches": 3,
        "expert_requests": 10,
        "trainers": 2,
        "hosts": 2,
    }
    assert network_stats({}) == dict.fromkeys(
        ["peers_alive", "swarm_tokens", "swarm_batches", "expert_requests", "trainers", "hosts"], 0
    )


# --- read-side policy over raw DHT entries ---


def entry(value, ttl: float = 60.0):
    return (value, NOW + ttl)


def test_entries_are_accepted_only_under_their_own_signed_subkey(caplog):
    a = fields(peer_id="A")
    entries = {
        b"A" + MARKER: entry(a),
        b"B" + MARKER: entry(fields(peer_id="C")),  # claims another peer's id: forged
        b"D": entry(fields(peer_id="D")),  # no owner marker: nobody signed it
        b"E" + MARKER + b"junk": entry(fields(peer_id="E")),
        "F" + MARKER.decode(): entry(fields(peer_id="F")),  # str subkey
        b"G" + MARKER: entry({**fields(peer_id="G"), "tokens": -5}),
        b"H" + MARKER: entry(["not", "a", "dict"]),
        b"I" + MARKER: entry(fields(peer_id="I"), ttl=-1.0),  # expired
        b"J" + MARKER: entry(fields(peer_id="J"), ttl=MAX_RECORD_TTL_S + 60),  # ghost that never expires
        b"K" + MARKER: (fields(peer_id="K"), None),
        b"L" + MARKER: (fields(peer_id="L"), float("nan")),
    }
    with caplog.at_level(logging.DEBUG, logger="dragon_swarm.swarm.contributions"):
        accepted = parse_contribution_entries(entries, now=NOW)
    assert accepted == {"A": ContributionRecord.model_validate(a)}
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == len(entries) - 1


def test_conflicting_owner_keys_for_one_peer_keep_the_least_generous_claim():
    genuine = fields(peer_id="A", tokens=100, batches=10)
    inflated = fields(peer_id="A", tokens=10**12, batches=10**9)  # an impersonator signing with its own key
    accepted = parse_contribution_entries({b"A" + MARKER: entry(genuine), b"A" + OTHER_MARKER: entry(inflated)}, NOW)
    assert accepted["A"].tokens == 100
    # the flip side, documented: an impersonator can shrink a victim's entry, never grow it
    zeroed = fields(peer_id="A", tokens=0, batches=0)
    accepted = parse_contribution_entries({b"A" + MARKER: entry(genuine), b"A" + OTHER_MARKER: entry(zeroed)}, NOW)
    assert accepted["A"].tokens == 0


# --- local counters ---


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
