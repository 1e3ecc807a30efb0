"""The expert registry's read side: host records are validated strictly and must sit under their own subkey."""

from dragon_swarm.moe.registry import HOST_RECORDS, ExpertHostRecord, Replica, served_throughput


def _parse_record(subkey: object, value: object):
    accepted = HOST_RECORDS.parse_entries({subkey: (value, 0.0)}, now=0.0)
    return accepted[0].record if accepted else None


def test_host_records_are_validated_strictly():
    good = {"peer_id": "QmPeer", "state": "online", "throughput": 10.0, "version": 3}
    subkey = b"QmPeer[owner:key]"
    assert _parse_record(subkey, good).version == 3
    assert _parse_record(b"QmOther[owner:key]", good) is None  # names a peer its signer is not
    assert _parse_record(subkey, {**good, "state": "dancing"}) is None
    assert _parse_record(subkey, {**good, "throughput": float("inf")}) is None
    assert _parse_record(subkey, {**good, "extra": 1}) is None
    assert _parse_record(subkey, "not a dict") is None


def test_served_throughput_sums_the_replicas_of_each_expert():
    def replica(uid: str, peer: str, throughput: float) -> Replica:
        return Replica(uid, ExpertHostRecord(peer_id=peer, state="online", throughput=throughput, version=0), 0.0)

    found = {"e0": [replica("e0", "A", 10.0), replica("e0", "B", 5.0)], "e1": []}
    assert served_throughput(found) == {"e0": 15.0, "e1": 0.0}
