"""Replica-safe expert registry.

hivemind's `declare_experts` keeps one peer per expert uid, so a second host overwrites the first. We keep
our own record: key `<uid>:hosts`, one subkey per host, signed with the host's RSA key (hivemind's
RSASignatureValidator), so a host can only write its own entry and replicas never overwrite each other.
Online hosts also refresh hivemind's stock `uid -> peer` records, so stock clients (`get_experts`,
`RemoteExpert`) still find every hosted expert.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Literal, Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.moe.server.dht_handler import declare_experts
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

logger = logging.getLogger(__name__)

HostState = Literal["joining", "online", "offline"]


class ExpertHostRecord(BaseModel):
    """What a host says about one expert it serves. Validated strictly on read: peers may be hostile."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    peer_id: str = Field(min_length=1, max_length=128)
    state: HostState
    throughput: float = Field(ge=0.0)  # tokens/s this host can push through the expert
    version: int = Field(ge=0)  # optimizer steps applied to this replica

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


def hosts_key(uid: str) -> str:
    return f"{uid}:hosts"


def _local_subkey(dht: hivemind.DHT) -> bytes:
    # the owner marker makes the validator demand our signature on this subkey
    return dht.peer_id.to_base58().encode() + RSASignatureValidator().local_public_key


def declare_hosted_experts(
    dht: hivemind.DHT,
    records: dict[str, ExpertHostRecord],
    expiration_time: float,
) -> dict[str, bool]:
    """Publish this host's record for each expert; online ones also refresh hivemind's stock records."""
    if not records:
        return {}
    subkey = _local_subkey(dht)
    values = {hosts_key(uid): record.model_dump() for uid, record in records.items()}
    stored = dht.run_coroutine(partial(_store_records, values=values, subkey=subkey, expiration_time=expiration_time))
    result = {uid: bool(stored.get((hosts_key(uid), subkey))) for uid in records}
    online = [uid for uid, record in records.items() if record.state == "online"]
    if online:
        declare_experts(dht, online, expiration_time=expiration_time)
    return result


# module-level coroutines: run_coroutine pickles them into the DHT process
async def _store_records(_dht, node, values: dict, subkey: bytes, expiration_time: float) -> dict:
    keys = list(values)
    return await node.store_many(keys, [values[k] for k in keys], expiration_time, subkeys=[subkey] * len(keys))


async def _get_records(_dht, node, keys: list[str]) -> dict:
    return await node.get_many(keys, get_dht_time())


def find_replicas(dht: hivemind.DHT, uids: Sequence[str], only_online: bool = True) -> dict[str, list[Replica]]:
    """All live, well-formed host records for each uid. Malformed or forged entries are dropped."""
    uids = list(uids)
    if not uids:
        return {}

    found = dht.run_coroutine(partial(_get_records, keys=[hosts_key(uid) for uid in uids]))
    replicas: dict[str, list[Replica]] = {uid: [] for uid in uids}
    for uid in uids:
        entry = found.get(hosts_key(uid))
        if entry is None or not isinstance(entry.value, dict):
            continue
        for subkey, item in entry.value.items():
            record = _parse_record(subkey, item.value)
            if record is None or (only_online and record.state != "online"):
                continue
            replicas[uid].append(Replica(uid, record, item.expiration_time))
        replicas[uid].sort(key=lambda r: r.record.peer_id)
    return replicas


def _parse_record(subkey: object, value: object) -> ExpertHostRecord | None:
    try:
        record = ExpertHostRecord.model_validate(value)
    except ValidationError:
        logger.debug("dropped a malformed expert host record")
        return None
    # the subkey is signed by its owner; a record naming another peer than its subkey is a forgery
    if not isinstance(subkey, bytes) or not subkey.startswith(record.peer_id.encode() + b"[owner:"):
        return None
    return record


def served_throughput(replicas: dict[str, list[Replica]]) -> dict[str, float]:
    return {uid: sum(r.record.throughput for r in reps) for uid, reps in replicas.items()}
