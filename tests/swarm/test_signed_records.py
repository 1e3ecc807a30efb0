"""The signed, owner-keyed record store: its read-side policy without a network, then a round trip over two real
loopback DHTs (store_many, fetch_many, a forged and a malformed entry dropped)."""

from __future__ import annotations

import logging

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from pydantic import BaseModel, ConfigDict, Field

from dragon_swarm.swarm.dht_node import LOOPBACK_MADDR, use_fork_start_method
from dragon_swarm.swarm.signed_records import SignedRecordStore, owner_subkey, raw_entries

MARKER = b"[owner:ssh-rsa AAAAB3NzaC1yc2E]"
NOW = 1_000_000.0


class Note(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    peer_id: str = Field(min_length=1)
    text: str


NOTES = SignedRecordStore(Note, "note")
BOUNDED = SignedRecordStore(Note, "note", max_ttl_s=60.0)


def note(peer_id: str, text: str = "hi") -> dict:
    return {"peer_id": peer_id, "text": text}


def test_only_well_formed_records_under_their_own_owner_subkey_are_accepted(caplog):
    entries = {
        b"A" + MARKER: (note("A"), NOW + 10),
        b"B" + MARKER: (note("C"), NOW + 10),  # forged: B's subkey, a record naming C
        b"D": (note("D"), NOW + 10),  # no owner marker: nobody had to sign it
        b"E" + MARKER + b"[owner:x]": (note("E"), NOW + 10),  # junk after the marker
        "F" + MARKER.decode(): (note("F"), NOW + 10),  # str subkey
        b"G" + MARKER: ({"peer_id": "G", "text": 5}, NOW + 10),  # malformed
        b"H" + MARKER: ({**note("H"), "extra": 1}, NOW + 10),  # malformed
        b"I" + MARKER: ("not a dict", NOW + 10),  # malformed
    }
    with caplog.at_level(logging.DEBUG, logger="dragon_swarm.swarm.signed_records"):
        accepted = NOTES.parse_entries(entries, now=NOW)
    assert [(e.record, e.subkey, e.expiration_time) for e in accepted] == [(Note(**note("A")), b"A" + MARKER, NOW + 10)]
    assert len(caplog.records) == len(entries) - 1  # one debug line per dropped entry


def test_expiration_is_checked_only_when_the_store_asks():
    entries = {
        b"A" + MARKER: (note("A"), NOW + 30),
        b"B" + MARKER: (note("B"), NOW - 1),  # expired
        b"C" + MARKER: (note("C"), NOW + 3600),  # a ghost that claims to live for an hour
        b"D" + MARKER: (note("D"), None),
        b"E" + MARKER: (note("E"), float("nan")),
    }
    assert [e.record.peer_id for e in BOUNDED.parse_entries(entries, NOW)] == ["A"]
    assert [e.record.peer_id for e in NOTES.parse_entries(entries, NOW)] == ["A", "B", "C", "D", "E"]


def test_raw_entries_of_nothing_or_a_plain_value_are_empty():
    assert raw_entries(None) == {}
    assert raw_entries(ValueWithExpiration("plain", NOW)) == {}


def test_a_model_without_peer_id_is_refused():
    class Anonymous(BaseModel):
        text: str

    with pytest.raises(TypeError):
        SignedRecordStore(Anonymous, "anonymous")


@pytest.mark.swarm
@pytest.mark.timeout(120)
def test_round_trip_over_real_dhts_drops_forged_and_malformed_entries():
    use_fork_start_method()
    dhts: list[tuple[hivemind.DHT, RSASignatureValidator]] = []
    try:
        for _ in range(2):  # each with its own key, as two peers in two processes
            validator = RSASignatureValidator(RSAPrivateKey())
            initial_peers = [str(m) for m in dhts[0][0].get_visible_maddrs()] if dhts else []
            dht = hivemind.DHT(
                host_maddrs=[LOOPBACK_MADDR], initial_peers=initial_peers, record_validators=[validator], start=True
            )
            dhts.append((dht, validator))
        (a, key_a), (b, key_b) = dhts
        id_a, id_b = (d.peer_id.to_base58() for d in (a, b))
        later = get_dht_time() + 60

        stored = NOTES.store_many(a, {"k1": Note(peer_id=id_a, text="one"), "k2": Note(peer_id=id_a, text="two")}, later, validator=key_a)
        assert stored == {"k1": True, "k2": True}
        assert NOTES.store(b, "k1", Note(peer_id=id_b, text="b's"), later, validator=key_b)
        with pytest.raises(ValueError):  # the API refuses a record naming another peer...
            NOTES.store(b, "k1", Note(peer_id=id_a, text="forged"), later, validator=key_b)
        # ...so B goes around it: its own signed subkey holding a record that names A (forged), and a malformed value
        assert b.store("k2", note(id_a, "forged"), later, subkey=owner_subkey(id_b, key_b))
        assert b.store("k3", {"peer_id": id_b, "text": 5}, later, subkey=owner_subkey(id_b, key_b))

        found = NOTES.fetch_many(b, ["k1", "k2", "k3", "nothing"], latest=True)
        assert sorted((e.record.peer_id, e.record.text) for e in found["k1"]) == sorted([(id_a, "one"), (id_b, "b's")])
        assert [(e.record.peer_id, e.record.text) for e in found["k2"]] == [(id_a, "two")]
        assert found["k3"] == [] and found["nothing"] == []
        assert [e.record.text for e in NOTES.fetch(a, "k2", latest=True)] == ["two"]
    finally:
        for dht, _ in reversed(dhts):
            dht.shutdown()
