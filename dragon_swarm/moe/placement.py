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


def successors(uid: str, candidates: Sequence[str]) -> list[str]:
    """Who takes `uid` over when its hosts are gone, best first: a per-(peer, uid) hash, so each expert has its own
    order, the load of many orphans spreads over the candidates, and every peer computes the same order."""
    return sorted(set(candidates), key=lambda peer: _tiebreak(peer, uid))


def takeover(all_uids: Sequence[str], hosts: Hosts, candidates: Sequence[str], own_peer_id: str, orphan_ticks: Mapping[str, int]) -> list[str]:
    """The experts nobody hosts that this peer should take now. `orphan_ticks[uid]` counts the checks in a row that
    found `uid` without a host: the first successor takes it at the second (one empty read of the DHT is not a
    death), the k-th (0-based) at the (k+2)-th, so a successor that is gone or stuck is replaced without every
    candidate jumping in together."""
    taken = []
    for uid in all_uids:
        if hosts.get(uid):
            continue
        order = successors(uid, [*candidates, own_peer_id])
        if order.index(own_peer_id) + 2 <= orphan_ticks.get(uid, 0):
            taken.append(uid)
    return taken


def standby(all_uids: Sequence[str], hosts: Hosts, candidates: Sequence[str], own_peer_id: str, hosted: Sequence[str]) -> list[str]:
    """Experts served by exactly one other peer for which this peer is the first successor: it keeps a fresh copy
    of them, so losing that host loses minutes of training, not all of it."""
    chosen = []
    for uid in all_uids:
        peers = list(hosts.get(uid, {}))
        if len(peers) != 1 or peers[0] == own_peer_id or uid in hosted:
            continue
        order = successors(uid, [p for p in [*candidates, own_peer_id] if p != peers[0]])
        if order and order[0] == own_peer_id:
            chosen.append(uid)
    return chosen


def standby_downloads(chosen: Sequence[str], versions: Mapping[str, int], copied: Mapping[str, int]) -> tuple[list[str], dict[str, int]]:
    """Which of the `chosen` standby copies (`standby`) to download now, given each expert's announced version and
    the version of the copy this peer holds (`copied`), and which copies to remember for the next check.

    A copy is remembered only while its expert stays singly hosted: with other replicas, replica sync may merge
    them, which changes the weights and not the version, so a copy from before is stale at the same version."""
    kept = {uid: version for uid, version in copied.items() if uid in set(chosen)}
    return [uid for uid in chosen if kept.get(uid) != versions[uid]], kept


def firm_hosts(hosts: Hosts, surplus: Mapping[str, set[str]]) -> dict[str, dict[str, float]]:
    """`hosts` without the replicas their hosts hold beyond their budget (announced `surplus`): those hosts drop
    them as soon as another host serves them, so for rebalancing such an expert needs a host. Without this, a peer
    that took over an orphan beyond its budget while all its experts had no other host would stay over budget for
    good: nobody else gains by moving (the swarm's minimum replication stays 1), and it may drop none of them."""
    return {uid: {peer: rate for peer, rate in peers.items() if peer not in surplus.get(uid, set())} for uid, peers in hosts.items()}


def rebalance(
    all_uids: Sequence[str], hosts: Hosts, own_peer_id: str, hosted: Sequence[str], margin: float, budget: int | None = None
) -> list[str] | None:
    """Petals' rule for blocks, for experts: re-run placement with this peer taken out; move only if that raises the
    swarm's minimum replication, or keeps it and raises the least-served expert's throughput by `margin` (a clear
    gain, so peers do not move back and forth). Experts no other peer hosts are always kept. A peer over its `budget`
    (after a takeover) sheds the experts others serve best. Returns the new set, or None to stay."""
    hosted = [uid for uid in all_uids if uid in set(hosted)]
    if not hosted:
        return None
    others = {uid: {p: r for p, r in hosts.get(uid, {}).items() if p != own_peer_id} for uid in all_uids}
    own_rate = max((hosts.get(uid, {}).get(own_peer_id, 0.0) for uid in hosted), default=0.0)
    must_keep = [uid for uid in hosted if not others[uid]]
    free = [uid for uid in all_uids if uid not in must_keep]
    size = len(hosted) if budget is None else max(min(len(hosted), budget), len(must_keep))
    rest = choose_experts(free, others, own_peer_id, size - len(must_keep))
    proposal = [uid for uid in all_uids if uid in set(must_keep) | set(rest)]
    if set(proposal) == set(hosted):
        return None
    if size < len(hosted):
        return proposal

    def balance(mine: Sequence[str]) -> tuple[int, float]:
        counts = {uid: len(others[uid]) + (uid in mine) for uid in all_uids}
        rates = {uid: sum(others[uid].values()) + (own_rate if uid in mine else 0.0) for uid in all_uids}
        least = min(counts.values())
        return least, min(rate for uid, rate in rates.items() if counts[uid] == least)

    (count_now, rate_now), (count_new, rate_new) = balance(hosted), balance(proposal)
    if count_new > count_now or (count_new == count_now and rate_new >= margin * max(rate_now, 1e-9)):
        return proposal
    return None
