"""Signed, owner-keyed records in the DHT: the one way a peer publishes something only it may write.

A peer stores a pydantic record under a shared key K in its own subkey `<peer_id>[owner:<rsa public key>]`.
hivemind's RSASignatureValidator (installed by `dragon_swarm.swarm.dht_node.start_dht`) makes every DHT node demand
the owner's signature on a subkey that carries an owner marker, so nobody can overwrite another peer's entry.
Readers fetch all entries of K and keep only those that
- validate against the record's pydantic model (peers may be hostile: models should be strict),
- sit under a bytes subkey that is exactly `<record.peer_id>[owner:...]` (a subkey without a marker passes
  hivemind's validator unchecked; a record naming another peer than its subkey is a forgery),
- and, if the store was built with `max_ttl_s`, expire in the future but no later than `max_ttl_s` from now.
Each dropped entry costs one debug line, never an exception.

hivemind does not bind a peer id to an RSA key: a hostile peer may sign `<victim id>[owner:<its own key>]`. Several
entries may therefore name one peer; what to do with them is the caller's policy (see `swarm.contributions`).

Used by `moe.registry` (expert host records, key `<uid>:hosts`) and `swarm.contributions` (contribution records).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Generic, Mapping, Sequence, TypeVar

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ValidationError

logger = logging.getLogger(__name__)

OWNER_MARKER_RE = re.compile(rb"\[owner:[^\]]+\]")


R = TypeVar("R", bound=BaseModel)


def owner_subkey(peer_id: str, validator: RSASignatureValidator | None = None) -> bytes:
    """`<peer_id>[owner:<public key>]`: the owner marker makes every DHT node demand the owner's signature.

    `validator` must be the RSASignatureValidator installed in the DHT that will store the record (that DHT signs
    with its own key). The default, `RSASignatureValidator()`, uses this process's key, which is what
    `dragon_swarm.swarm.dht_node.start_dht` installs; pass an explicit one when a DHT got its own private key.
    """
    validator = validator if validator is not None else RSASignatureValidator()
    return peer_id.encode() + validator.local_public_key


@dataclass(frozen=True)
class SignedEntry(Generic[R]):
    """One accepted entry: the validated record, the subkey it was signed under and its expiration time."""

    record: R
    subkey: bytes
    expiration_time: float


class SignedRecordStore(Generic[R]):
    """Stores and fetches records of one pydantic model (with a `peer_id: str` field) under owner-signed subkeys.

    :param model: the record's pydantic model; every fetched value is validated with `model.model_validate`
    :param label: what a record is, for log lines ("expert host record")
    :param max_ttl_s: if given, entries that expired or expire more than this many seconds from now are dropped
      (a peer could otherwise leave a ghost entry for days), and `store` refuses such expiration times
    """

    def __init__(self, model: type[R], label: str, *, max_ttl_s: float | None = None):
        if "peer_id" not in model.model_fields:
            raise TypeError(f"{model.__name__} has no peer_id field; owner-keyed records must name their peer")
        if max_ttl_s is not None and not max_ttl_s > 0:
            raise ValueError(f"max_ttl_s must be > 0, got {max_ttl_s!r}")
        self.model, self.label, self.max_ttl_s = model, label, max_ttl_s

    # --- write side ---

    def store(
        self,
        dht: hivemind.DHT,
        key: str,
        record: R,
        expiration_time: float,
        *,
        validator: RSASignatureValidator | None = None,
    ) -> bool:
        """Store `record` under `key` in this peer's signed subkey; True if the DHT accepted it. DHT errors raise."""
        return self.store_many(dht, {key: record}, expiration_time, validator=validator)[key]

    def store_many(
        self,
        dht: hivemind.DHT,
        records: Mapping[str, R],
        expiration_time: float,
        *,
        validator: RSASignatureValidator | None = None,
    ) -> dict[str, bool]:
        """Store each `key -> record` in one DHT traversal; key -> whether the DHT accepted it. DHT errors raise.

        Every record must name this DHT's peer (every reader would drop it otherwise, so it is a bug: ValueError).
        `validator`: see `owner_subkey`.
        """
        if not records:
            return {}
        own_peer_id = dht.peer_id.to_base58()
        for record in records.values():
            if record.peer_id != own_peer_id:
                raise ValueError(f"{self.label}: peer_id {record.peer_id!r} is not this DHT's peer id {own_peer_id!r}")
        if self.max_ttl_s is not None:
            now = get_dht_time()
            if not now < expiration_time <= now + self.max_ttl_s:
                raise ValueError(f"{self.label}: expiration must be within (0, {self.max_ttl_s}] s from now")
        subkey = owner_subkey(own_peer_id, validator)
        keys = list(records)
        values = [records[key].model_dump() for key in keys]
        stored = dht.run_coroutine(
            partial(_store_many, keys=keys, values=values, subkey=subkey, expiration_time=expiration_time)
        )
        return {key: bool(stored.get((key, subkey))) for key in keys}

    # --- read side ---

    def fetch(self, dht: hivemind.DHT, key: str, *, latest: bool = False) -> list[SignedEntry[R]]:
        """Accepted entries of one key (see `fetch_many`)."""
        return self.fetch_many(dht, [key], latest=latest)[key]

    def fetch_many(
        self, dht: hivemind.DHT, keys: Sequence[str], *, latest: bool = False
    ) -> dict[str, list[SignedEntry[R]]]:
        """key -> accepted entries, for every key asked (empty when nobody published). DHT errors raise.

        `latest=False` takes the first live value found per key (fast); `latest=True` asks every node holding the
        key and merges their subkeys (slower; for lists that want everyone, such as a leaderboard).
        """
        keys = list(keys)
        if not keys:
            return {}
        found = dht.run_coroutine(partial(_get_many, keys=keys, latest=latest))
        now = get_dht_time()
        return {key: self.parse_entries(raw_entries(found.get(key)), now) for key in keys}

    def parse_entries(self, entries: Mapping[object, tuple[object, object]], now: float) -> list[SignedEntry[R]]:
        """Pure read-side policy: subkey -> (value, expiration_time) as the DHT returned them, to accepted entries
        (in the order given). hivemind's validator has already dropped bad signatures."""
        accepted = []
        for subkey, (value, expiration_time) in entries.items():
            entry = self._parse_entry(subkey, value, expiration_time, now)
            if entry is not None:
                accepted.append(entry)
        return accepted

    def _parse_entry(self, subkey: object, value: object, expiration_time: object, now: float) -> SignedEntry[R] | None:
        if self.max_ttl_s is not None and (
            not isinstance(expiration_time, (int, float))
            or not math.isfinite(expiration_time)
            or not now < expiration_time <= now + self.max_ttl_s
        ):
            logger.debug(f"dropped a {self.label} with an expired or implausible expiration time")
            return None
        if not isinstance(subkey, bytes):
            logger.debug(f"dropped a {self.label} under a non-bytes subkey")
            return None
        try:
            record = self.model.model_validate(value)
        except ValidationError:
            logger.debug(f"dropped a malformed {self.label}")
            return None
        prefix = record.peer_id.encode()
        # the signed part of the subkey names its peer; a record naming another peer is a forgery
        if not subkey.startswith(prefix) or OWNER_MARKER_RE.fullmatch(subkey[len(prefix) :]) is None:
            logger.debug(f"dropped a {self.label} for {record.peer_id} under a subkey it does not own")
            return None
        return SignedEntry(record, subkey, expiration_time)  # type: ignore[arg-type]


def raw_entries(found: object) -> dict[object, tuple[object, object]]:
    """A DHT get result for a dictionary key as subkey -> (value, expiration_time); {} when nothing was found or a
    hostile peer replaced the dictionary by a plain value."""
    if found is None or not isinstance(getattr(found, "value", None), dict):
        return {}
    return {
        subkey: (getattr(item, "value", None), getattr(item, "expiration_time", None))
        for subkey, item in found.value.items()
    }


# module-level coroutines: run_coroutine pickles them into the DHT process
async def _store_many(_dht, node, keys: list[str], values: list, subkey: bytes, expiration_time: float) -> dict:
    return await node.store_many(keys, values, expiration_time, subkeys=[subkey] * len(keys))


async def _get_many(_dht, node, keys: list[str], latest: bool) -> dict:
    # sufficient_expiration_time=None: the first value alive now (hivemind's default); inf: the latest one
    return await node.get_many(keys, sufficient_expiration_time=float("inf") if latest else None)
