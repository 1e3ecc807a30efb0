"""Contribution records and the read-side policy over raw DHT entries: pure, no network."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from dragon_swarm.swarm.contributions import (
    MAX_RECORD_TTL_S,
    ContributionRecord,
    default_public_name,
    parse_contribution_entries,
)

MARKER = b"[owner:ssh-rsa AAAAB3NzaC1yc2E]"
OTHER_MARKER = b"[owner:ssh-rsa AAAAotherkey]"
NOW = 1_000_000.0


def fields(**overrides) -> dict:
    base = dict(peer_id="12D3KooWpeerA", name="alice", tokens=10, batches=2, expert_requests=1, uptime_s=5.0, role="trainer")
    return {**base, **overrides}


def record(**overrides) -> ContributionRecord:
    return ContributionRecord(**fields(**overrides))


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
    with caplog.at_level(logging.DEBUG, logger="dragon_swarm.swarm"):  # the store and the policy both log
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
