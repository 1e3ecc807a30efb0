"""Replica-safe expert registry.

hivemind's `declare_experts` keeps one peer per expert uid, so a second host overwrites the first. We keep
our own record: key `<uid>:hosts`, one subkey per host, signed with the host's RSA key
(`dragon_swarm.swarm.signed_records`), so a host can only write its own entry and replicas never overwrite each other.
Online hosts also refresh hivemind's stock `uid -> peer` records, so stock clients (`get_experts`,
`RemoteExpert`) still find every hosted expert.

Why one record per expert and not one per host and MoE layer (fewer signed records per announcement): every DHT
store first looks up its key, and each node on the way answers with the key's whole dictionary, so a store costs in
proportion to the hosts under its key: a layer's hosts are many more than one expert's replicas.
Measured with per-layer records in `python -m benchmarks.registry_traffic --experts 16 --rows 8` (signed records
only, bytes a host sends per announcement): 164 kB per-layer against 187 kB per-expert with 4 hosts (`--nodes 5`),
but 365 kB against 272 kB with 8 hosts (`--nodes 9`), and the gap grows with the swarm.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import hivemind
from hivemind.moe.server.dht_handler import declare_experts
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dragon_swarm.swarm.signed_records import SignedRecordStore

logger = logging.getLogger(__name__)

HostState = Literal["joining", "online", "offline"]


class ExpertHostRecord(BaseModel):
    """What a host says about one expert it serves. Validated strictly on read: peers may be hostile."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    peer_id: str = Field(min_length=1, max_length=128)
    state: HostState
    throughput: float = Field(ge=0.0)  # tokens/s this host can push through the expert
    version: int = Field(ge=0)  # optimizer steps applied to this replica
    adaptive: bool = False  # this host follows placement: it takes over orphaned experts and rebalances
    # held beyond this host's budget (taken over as an orphan): it drops it once another host serves it, so
    # rebalancing peers count this replica as missing (`moe.placement.firm_hosts`)
    surplus: bool = False

    @field_validator("throughput")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("throughput must be finite")
        return value


@dataclass(frozen=True)
class Replica:
    uid: str
    record: ExpertHostRecord
    expiration_time: float


HOST_RECORDS = SignedRecordStore(ExpertHostRecord, "expert host record")


def hosts_key(uid: str) -> str:
    return f"{uid}:hosts"


def declare_hosted_experts(
    dht: hivemind.DHT,
    records: dict[str, ExpertHostRecord],
    expiration_time: float,
) -> dict[str, bool]:
    """Publish this host's record for each expert; online ones also refresh hivemind's stock records."""
    if not records:
        return {}
    stored = HOST_RECORDS.store_many(dht, {hosts_key(uid): record for uid, record in records.items()}, expiration_time)
    result = {uid: stored[hosts_key(uid)] for uid in records}
    online = [uid for uid, record in records.items() if record.state == "online"]
    if online:
        declare_experts(dht, online, expiration_time=expiration_time)
    return result


def find_replicas(
    dht: hivemind.DHT, uids: Sequence[str], only_online: bool = True, latest: bool = False
) -> dict[str, list[Replica]]:
    """All live, well-formed host records for each uid. Malformed or forged entries are dropped.

    `latest=True` asks every node that holds a uid's key and merges what they hold. A DHT node that has just stored
    its own record for a uid may be one of the nodes that keep that key; a plain read is then answered from its own
    storage, which holds only its own record until the other hosts refresh theirs (one `update_period`): a new
    replica must ask with `latest=True` or it sees nobody to download from.
    """
    uids = list(uids)
    if not uids:
        return {}
    found = HOST_RECORDS.fetch_many(dht, [hosts_key(uid) for uid in uids], latest=latest)
    replicas: dict[str, list[Replica]] = {}
    for uid in uids:
        replicas[uid] = sorted(
            (
                Replica(uid, entry.record, entry.expiration_time)
                for entry in found[hosts_key(uid)]
                if not only_online or entry.record.state == "online"
            ),
            key=lambda r: r.record.peer_id,
        )
    return replicas


def served_throughput(replicas: dict[str, list[Replica]]) -> dict[str, float]:
    return {uid: sum(r.record.throughput for r in reps) for uid, reps in replicas.items()}
