"""The admission gate's pure parts: identity work, membership proofs, rate-limit rules, key files (no network;
tests/swarm/test_private_swarm.py runs the gate on real peers)."""

from __future__ import annotations

import json

import pytest
from hivemind.p2p import PeerID

from dragon_swarm.keys import main as keys_main
from dragon_swarm.swarm.admission import (
    AdmissionPolicy,
    RateLimit,
    check_proof,
    membership_mac,
    new_swarm_key,
    peer_ids_of,
    read_swarm_key,
)
from dragon_swarm.swarm.identity_work import ensure_work, find_work, leading_zero_bits, load_work, work_bits, work_path

PEER = PeerID.from_base58("QmXV1SzyBVz5cNpo9YpjqkTNxGBqBnvnPBnULMxKyzeS9W")
OTHER = PeerID.from_base58("QmZXvoR7CQerdtvJ1Vi2CM9Usu4shBp22WcAEfEYTArZyp")
KEY = bytes(range(32))


def test_leading_zero_bits_counts_bits_not_bytes():
    assert leading_zero_bits(b"\xff") == 0
    assert leading_zero_bits(b"\x01\xff") == 7
    assert leading_zero_bits(b"\x00\x10") == 11
    assert leading_zero_bits(b"\x00\x00") == 16


def test_found_work_carries_the_bits_and_is_bound_to_the_peer_id():
    nonce = find_work(PEER.to_bytes(), 6, start=0)
    assert work_bits(PEER.to_bytes(), nonce) >= 6
    # the same nonce for another id is just a random try: about 1 in 64 would pass; these two ids are checked
    assert work_bits(OTHER.to_bytes(), nonce) < 6
    assert work_bits(PEER.to_bytes(), nonce[:7]) == 0  # malformed nonce


def test_work_is_saved_beside_the_identity_and_reused(tmp_path):
    identity = tmp_path / "id.key"
    work = ensure_work(PEER.to_bytes(), 4, identity)
    assert work.bits >= 4 and work_path(identity).exists()
    assert load_work(identity, PEER.to_bytes()) == work
    assert ensure_work(PEER.to_bytes(), 4, identity).nonce == work.nonce  # no new search
    assert load_work(identity, OTHER.to_bytes()) is None  # a work file for another identity is not used
    saved = json.loads(work_path(identity).read_text())
    work_path(identity).write_text(json.dumps({**saved, "nonce": "00" * 8}))
    assert ensure_work(PEER.to_bytes(), 4, identity).bits >= 4  # a forged file is checked, and redone
    work_path(identity).write_text("garbage")
    assert load_work(identity, PEER.to_bytes()) is None


def test_a_proof_admits_only_with_the_key_and_enough_work():
    nonce, challenger = b"n" * 16, OTHER.to_bytes()
    work = find_work(PEER.to_bytes(), 3, start=0)
    good_mac = membership_mac(KEY, nonce, challenger, PEER.to_bytes())
    policy = AdmissionPolicy(swarm_key=KEY, identity_bits=3)
    assert check_proof(policy, nonce, challenger, PEER, good_mac, work) is None
    assert check_proof(policy, nonce, challenger, PEER, membership_mac(b"k" * 32, nonce, challenger, PEER.to_bytes()), work) == "no proof of the swarm key"
    assert check_proof(policy, b"m" * 16, challenger, PEER, good_mac, work) == "no proof of the swarm key"  # replayed for another nonce
    assert check_proof(policy, nonce, PEER.to_bytes(), PEER, good_mac, work) == "no proof of the swarm key"  # for another challenger
    assert "the swarm asks 3" in check_proof(policy, nonce, challenger, PEER, good_mac, b"")
    # the initial peers one was given are exempt from the work, never from the key
    trusted = AdmissionPolicy(swarm_key=KEY, identity_bits=3, trusted_peers=frozenset([PEER.to_base58()]))
    assert check_proof(trusted, nonce, challenger, PEER, good_mac, b"") is None
    assert check_proof(trusted, nonce, challenger, PEER, b"", b"") == "no proof of the swarm key"
    assert check_proof(AdmissionPolicy(identity_bits=3), nonce, challenger, PEER, b"", work) is None  # public swarm


def test_policy_rules_and_defaults():
    assert not AdmissionPolicy().challenges  # the default only rate-limits
    assert AdmissionPolicy(identity_bits=1).challenges and AdmissionPolicy(swarm_key=KEY).challenges
    policy = AdmissionPolicy(rate_limits=(("rpc_join_group", RateLimit(1.0, 3.0)),))
    assert policy.rate_limit_for("prefix_x::RobustDecentralizedAverager.rpc_join_group") == RateLimit(1.0, 3.0)
    assert policy.rate_limit_for("ConnectionHandler.rpc_forward") is None
    with pytest.raises(ValueError, match="at least 16 bytes"):
        AdmissionPolicy(swarm_key=b"short")
    with pytest.raises(ValueError, match="identity_bits"):
        AdmissionPolicy(identity_bits=40)


def test_peer_ids_of_initial_peers():
    maddr = f"/ip4/127.0.0.1/tcp/5/p2p/{PEER.to_base58()}"
    assert peer_ids_of([maddr, maddr.replace("tcp/5", "udp/5/quic"), "/ip4/1.2.3.4/tcp/1", "not a maddr"]) == [PEER.to_base58()]


def test_swarm_key_files(tmp_path, capsys):
    path = tmp_path / "swarm.key"
    assert keys_main(["swarm-key", str(path)]) == 0
    assert len(read_swarm_key(path)) == 32
    assert keys_main(["swarm-key", str(path)]) == 1  # never overwritten
    assert "never overwritten" in capsys.readouterr().err
    bad = tmp_path / "bad.key"
    bad.write_text("not hex")
    with pytest.raises(ValueError, match="hex digits"):
        read_swarm_key(bad)
    bad.write_text("abcd")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        read_swarm_key(bad)
    with pytest.raises(ValueError, match="cannot read"):
        read_swarm_key(tmp_path / "missing.key")
    assert len(bytes.fromhex(new_swarm_key())) == 32


def test_identity_command_makes_a_key_with_its_work(tmp_path, capsys):
    identity = tmp_path / "id.key"
    assert keys_main(["identity", str(identity), "--bits", "3"]) == 0
    peer = PeerID.from_identity(identity.read_bytes())
    assert peer.to_base58() in capsys.readouterr().out
    assert load_work(identity, peer.to_bytes()).bits >= 3
