"""Contribution records over three real hivemind DHTs on loopback, including forged records.

Each DHT gets its own RSA key. `start_dht` installs `RSASignatureValidator()`, which uses the *process-wide* key, so
three DHTs started by it in one test process would share a key and peer B could legitimately sign peer A's subkey;
separate keys make the forgery tests mean what they say (in production each peer is its own process).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from dragon_swarm.monitor.leaderboard import leaderboard, network_stats
from dragon_swarm.swarm.contributions import (
    ContributionRecord,
    contribution_subkey,
    contributions_key,
    fetch_contributions,
    publish_contribution,
)
from dragon_swarm.swarm.counters import ContributionCounters, ContributionPublisher
from dragon_swarm.swarm.dht_node import LOOPBACK_MADDR, use_fork_start_method

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(120)]


@dataclass
class Peer:
    dht: hivemind.DHT
    validator: RSASignatureValidator

    @property
    def peer_id(self) -> str:
        return self.dht.peer_id.to_base58()

    def record(self, tokens: int, batches: int, role: str = "trainer", peer_id: str | None = None) -> ContributionRecord:
        return ContributionRecord(
            peer_id=peer_id or self.peer_id,
            name=f"peer-{self.peer_id[-4:]}",
            tokens=tokens,
            batches=batches,
            expert_requests=0,
            uptime_s=1.0,
            role=role,
        )


@pytest.fixture(scope="module")
def peers():
    """Peers A, B, C joined through A, each with its own RSA signing key; always shut down."""
    use_fork_start_method()
    started: list[Peer] = []
    try:
        for _ in range(3):
            validator = RSASignatureValidator(RSAPrivateKey())
            initial_peers = [str(m) for m in started[0].dht.get_visible_maddrs()] if started else []
            dht = hivemind.DHT(
                host_maddrs=[LOOPBACK_MADDR],
                initial_peers=initial_peers,
                record_validators=[validator],
                start=True,
            )
            started.append(Peer(dht, validator))
        yield started
    finally:
        for peer in reversed(started):
            peer.dht.shutdown()


def test_every_peer_sees_every_record_and_the_same_leaderboard(peers):
    prefix = "lb"
    tokens, batches = [300, 100, 200], [1_000, 100_000, 10_000]
    for i, peer in enumerate(peers):
        role = "host" if i == 1 else "trainer"
        assert publish_contribution(peer.dht, prefix, peer.record(tokens[i], batches[i], role), validator=peer.validator)

    expected_order = [peers[0].peer_id, peers[2].peer_id, peers[1].peer_id]
    for peer in peers:
        records = fetch_contributions(peer.dht, prefix)
        assert set(records) == {p.peer_id for p in peers}
        rows = leaderboard(records)
        assert [row.peer_id for row in rows] == expected_order
        assert [row.badge for row in rows] == ["bronze", "silver", "gold"]
        stats = network_stats(records)
        assert (stats["peers_alive"], stats["swarm_tokens"], stats["trainers"], stats["hosts"]) == (3, 600, 2, 1)


def test_a_record_under_another_peers_owner_subkey_is_refused_by_the_validator(peers):
    a, b, c = peers
    prefix = "forge-owner"
    genuine = a.record(tokens=100, batches=10)
    assert publish_contribution(a.dht, prefix, genuine, validator=a.validator)

    # B writes A's exact subkey (A's peer id + A's public key); B cannot sign it, so every node refuses it.
    # It expires after A's record, so the signature is the only reason left to refuse it.
    forged = a.record(tokens=10**12, batches=10**9)
    subkey = contribution_subkey(a.peer_id, a.validator)
    stored = b.dht.store(contributions_key(prefix), forged.model_dump(), get_dht_time() + 300, subkey=subkey)
    assert stored is False
    assert fetch_contributions(c.dht, prefix) == {a.peer_id: genuine}


def test_a_record_naming_another_peer_is_dropped_on_read(peers):
    a, b, c = peers
    prefix = "forge-claim"
    genuine_a = a.record(tokens=100, batches=10)
    assert publish_contribution(a.dht, prefix, genuine_a, validator=a.validator)
    assert publish_contribution(b.dht, prefix, b.record(tokens=5, batches=1), validator=b.validator)

    inflated_a = a.record(tokens=10**12, batches=10**9)
    with pytest.raises(ValueError):  # the API refuses to publish a record for another peer...
        publish_contribution(b.dht, prefix, inflated_a, validator=b.validator)

    # ...so B goes around it. Its own subkey, validly signed by B, but the record names A: readers drop it.
    # (hivemind keeps the value that expires last per subkey, so B must outlive its own 120 s record)
    key, later = contributions_key(prefix), get_dht_time() + 300
    assert b.dht.store(key, inflated_a.model_dump(), later, subkey=contribution_subkey(b.peer_id, b.validator))
    # A's peer id with B's own key: also validly signed (hivemind does not tie peer ids to RSA keys); two owner
    # keys now claim A and the least generous claim wins
    assert b.dht.store(key, inflated_a.model_dump(), later, subkey=contribution_subkey(a.peer_id, b.validator))
    # a subkey with no owner marker passes hivemind's validator (nothing to check) but not ours
    assert b.dht.store(key, inflated_a.model_dump(), later, subkey=a.peer_id.encode())

    records = fetch_contributions(c.dht, prefix)
    assert records == {a.peer_id: genuine_a}  # B's overwritten own entry is gone too: it no longer names B


def test_publisher_publishes_fetches_saves_and_stops(peers, tmp_path):
    a, b, c = peers
    prefix = "publisher"
    assert publish_contribution(a.dht, prefix, a.record(tokens=50, batches=5), validator=a.validator)

    counters_path = tmp_path / "contributions.json"
    counters = ContributionCounters(prefix)
    counters.add_batch(tokens=1234)
    updates: list[dict[str, ContributionRecord]] = []
    both_seen = threading.Event()

    def on_update(records: dict[str, ContributionRecord]) -> None:
        updates.append(records)
        if {a.peer_id, c.peer_id} <= set(records):
            both_seen.set()

    publisher = ContributionPublisher(
        c.dht, prefix, counters, counters_path, "carol", "trainer+host", on_update,
        period_s=0.2, expiration_s=30.0, validator=c.validator,
    )  # fmt: skip
    publisher.start()
    try:
        assert both_seen.wait(20.0)
        assert counters_path.exists()
        counters.add_batch(tokens=1)
        assert publisher.publish_now()
        assert ContributionCounters.load(counters_path, prefix).tokens == 1235
    finally:
        publisher.stop()
        publisher.stop()  # idempotent
    assert not publisher.is_alive()
    seen_by_b = fetch_contributions(b.dht, prefix)
    assert seen_by_b[c.peer_id].name == "carol" and seen_by_b[c.peer_id].tokens == 1235
