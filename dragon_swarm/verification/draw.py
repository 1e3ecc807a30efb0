"""Who checks whom in a round: a draw every peer computes alike, that nobody can steer alone.

The seed hashes the round's epoch with every commitment of that round; commitments are published before the parts,
so when the draw becomes known no sender can change what it committed to, and a sender cannot pick its checker
without grinding its own commitment against everyone else's (which it does not know before publishing).
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence


def round_seed(epoch: int, commitment_digests: Mapping[str, str]) -> bytes:
    """commitment_digests: peer id -> the digest of its commitment."""
    h = hashlib.sha256(f"dragon-verify|{epoch}".encode())
    for peer in sorted(commitment_digests):
        h.update(f"|{peer}={commitment_digests[peer]}".encode())
    return h.digest()


def assign_checks(seed: bytes, peers: Sequence[str], checks: int) -> list[tuple[str, str]]:
    """(checker, sender) pairs: `checks` distinct senders (at most one per peer), each checked by another peer."""
    unique = sorted(set(peers))
    if len(unique) < 2 or checks <= 0:
        return []
    order = sorted(unique, key=lambda peer: hashlib.sha256(seed + peer.encode()).digest())
    n = len(order)
    shift = 1 + int.from_bytes(hashlib.sha256(seed + b"|shift").digest()[:8], "big") % (n - 1)  # 1..n-1: never oneself
    return [(order[(i + shift) % n], order[i]) for i in range(min(checks, n))]
