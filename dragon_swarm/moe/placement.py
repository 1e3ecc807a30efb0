"""Which experts a host takes: the least replicated first, as Petals' servers choose their blocks.

Pure functions over what the replica registry says (`uid -> {peer id: announced throughput}`), tested without a
network; `dragon_swarm.node.startup` feeds them from `moe.registry.find_replicas`.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

Hosts = Mapping[str, Mapping[str, float]]  # expert uid -> {peer id of a live host: its announced tokens/s}


def choose_experts(all_uids: Sequence[str], hosts: Hosts, own_peer_id: str, budget: int) -> list[str]:
    """The `budget` experts this peer should host, in `all_uids` order.

    Placement is judged with this peer taken out (its own records are ignored), so re-running it answers "where
    would I be most useful now". Order of preference: fewest live hosts (every expert gets a first host, then a
    second, ...), then least announced throughput, then a hash of (peer id, uid): peers that choose at the same
    moment from the same registry spread over equally served experts instead of all taking the same ones.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")

    def need(uid: str) -> tuple[int, float, int]:
        others = {peer: rate for peer, rate in hosts.get(uid, {}).items() if peer != own_peer_id}
        return len(others), sum(others.values()), _tiebreak(own_peer_id, uid)

    chosen = set(sorted(all_uids, key=need)[:budget])
    return [uid for uid in all_uids if uid in chosen]


def replica_counts(all_uids: Sequence[str], hosts: Hosts) -> dict[str, int]:
    """Live hosts per expert (0 for an expert nobody serves)."""
    return {uid: len(hosts.get(uid, {})) for uid in all_uids}


def _tiebreak(peer_id: str, uid: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{peer_id}/{uid}".encode(), digest_size=8).digest(), "big")
