"""Bans survive a restart: saved with wall-clock expiry, restored into a fresh book, never lengthened by the file."""

import json
import time

from dragon_swarm.averaging.ban_store import bans_from_snapshot, load_bans, save_bans, seed_book
from dragon_swarm.averaging.reputation import ReputationBook


def test_a_ban_survives_a_save_and_a_restart(tmp_path):
    before = ReputationBook(ban_seconds=300.0)
    before.ban("QmLiar", "malformed part: NaN", now=1000.0)
    bans = bans_from_snapshot(before.snapshot(now=1100.0), now_wall=50_000.0)  # 200 s left
    save_bans(tmp_path / "bans.json", bans)

    restored = load_bans(tmp_path / "bans.json", now_wall=50_050.0)  # the peer restarted 50 s later
    assert set(restored) == {"QmLiar"} and abs(restored["QmLiar"][0] - 150.0) < 1e-6
    book = seed_book(ReputationBook(ban_seconds=300.0), restored)
    assert book.is_banned("QmLiar") and "malformed part" in book.record("QmLiar").ban_reason
    assert not book.is_banned("QmHonest")


def test_expired_bans_are_dropped_and_a_file_cannot_lengthen_a_ban(tmp_path):
    path = tmp_path / "bans.json"
    path.write_text(json.dumps({"version": 1, "bans": {
        "QmOld": {"until": 10.0, "reason": "x"},
        "QmForever": {"until": 1e18, "reason": "tampered"},
        "": {"until": 1e18}, "QmBad": {"until": "never"}, "QmNaN": {"until": float("nan")},
    }}))  # fmt: skip
    restored = load_bans(path, now_wall=100.0)
    assert set(restored) == {"QmForever"}
    book = seed_book(ReputationBook(ban_seconds=300.0, max_ban_seconds=1200.0), restored)
    assert book.is_banned("QmForever")
    assert book.record("QmForever").banned_until - time.monotonic() <= 1200.0  # the policy's longest ban at most


def test_a_broken_file_restores_nothing(tmp_path):
    for text in ("not json", "[]", '{"bans": 3}', '{"nothing": {}}'):
        (tmp_path / "bans.json").write_text(text)
        assert load_bans(tmp_path / "bans.json") == {}
    assert load_bans(tmp_path / "missing.json") == {}
