"""Volunteer contribution records: signed per-peer counters in the DHT, published and fetched by every peer.

Every peer publishes one `ContributionRecord` under the shared key `<run_prefix>_contributions`, in its own
signed subkey (`dragon_swarm.swarm.signed_records`), so nobody can overwrite another peer's entry. Any peer fetches
all entries and computes the leaderboard and swarm totals locally (`dragon_swarm.monitor.leaderboard`): no central
server. The local counters and the background publisher are in `dragon_swarm.swarm.counters`.

Trust model (read this before relying on the numbers):
- The numbers are self-reported. A peer can lie about its own work or invent extra peer ids (Sybil); nothing here
  can stop that, the leaderboard is a thank-you board, not an accounting system.
- What the read path does guarantee: a record only counts if it sits under a signed owner subkey whose peer-id
  part equals the record's `peer_id`, so a peer cannot post numbers under another peer's entry.
- hivemind does not bind a peer id to the RSA key, so a hostile peer may sign a subkey `<victim id>[owner:<its own
  key>]`. When several owner keys claim one peer id, the *least generous* claim wins (`parse_contribution_entries`):
  an impersonator can hide or shrink a victim's numbers for a while, never inflate them. The same rule handles an
  honest restart (the RSA key is per process, so the previous session's record lingers until it expires).
"""

from __future__ import annotations

import logging
from typing import Annotated, Iterable, Literal, Mapping

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from dragon_swarm.swarm.signed_records import SignedRecordStore, owner_subkey

logger = logging.getLogger(__name__)

Role = Literal["trainer", "host", "trainer+host", "monitor"]
TRAINER_ROLES = frozenset({"trainer", "trainer+host"})
HOST_ROLES = frozenset({"host", "trainer+host"})

# Records that claim to live longer than this are ignored: a peer could otherwise leave a ghost entry in the
# swarm for days. Publishers must refresh well within it (the default is 120 s, refreshed every 30 s).
MAX_RECORD_TTL_S = 3600.0


class ContributionRecord(BaseModel):
    """What one peer says it contributed. Validated strictly on read: peers may be hostile."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    peer_id: str = Field(min_length=1, max_length=128)
    # public display name; surrounding whitespace is stripped, then control/format characters are refused so a
    # name cannot break the terminal panel or reorder text (e.g. right-to-left overrides)
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40)]
    tokens: int = Field(ge=0)
    batches: int = Field(ge=0)  # micro-batches trained
    expert_requests: int = Field(ge=0)  # forward + backward requests its experts answered
    uptime_s: float = Field(ge=0.0, allow_inf_nan=False)  # total across restarts
    role: Role
    version: int = Field(default=1, ge=1)  # schema version of this record
    loss: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)  # latest training loss; display only
    # latest held-out loss (`training.evaluation`) and the model version it scored; display only (the monitor's
    # median per version), both set or both None
    val_loss: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    val_epoch: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _val_pair(self) -> "ContributionRecord":
        if (self.val_loss is None) != (self.val_epoch is None):
            raise ValueError("val_loss and val_epoch go together")
        return self

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("name must contain printable characters only")
        return value


def default_public_name(peer_id: str) -> str:
    """A display name for volunteers who did not choose one: `volunteer-` + the last 6 characters of the peer id."""
    tail = peer_id[-6:]
    return f"volunteer-{tail}" if tail else "volunteer"


# --- DHT layout -------------------------------------------------------------------------------------------------

RECORDS = SignedRecordStore(ContributionRecord, "contribution record", max_ttl_s=MAX_RECORD_TTL_S)


def contributions_key(run_prefix: str) -> str:
    return f"{run_prefix}_contributions"


def contribution_subkey(peer_id: str, validator: RSASignatureValidator | None = None) -> bytes:
    """This peer's signed subkey under the contributions key (see `signed_records.owner_subkey`)."""
    return owner_subkey(peer_id, validator)


def publish_contribution(
    dht: hivemind.DHT,
    run_prefix: str,
    record: ContributionRecord,
    expiration_s: float = 120.0,
    *,
    validator: RSASignatureValidator | None = None,
) -> bool:
    """Store `record` under this peer's signed subkey for `expiration_s` seconds; True if the DHT accepted it.

    `record.peer_id` must be this DHT's peer id (anything else would be dropped by every reader, so it is a bug:
    ValueError). `validator`: see `signed_records.owner_subkey`. DHT failures are logged and reported as False,
    never raised: a missed publication only makes the entry older until the next one. Republish well within
    `expiration_s`.
    """
    if not 0.0 < expiration_s <= MAX_RECORD_TTL_S:
        raise ValueError(f"expiration_s must be in (0, {MAX_RECORD_TTL_S}], got {expiration_s}")
    own_peer_id = dht.peer_id.to_base58()
    if record.peer_id != own_peer_id:
        raise ValueError(f"record.peer_id {record.peer_id!r} is not this DHT's peer id {own_peer_id!r}")
    try:
        return RECORDS.store(
            dht, contributions_key(run_prefix), record, get_dht_time() + expiration_s, validator=validator
        )
    except Exception as e:  # a dead or overloaded DHT: report, let the caller retry next period
        logger.warning(f"Could not publish the contribution record: {type(e).__name__}: {e}")
        return False


def fetch_contributions(dht: hivemind.DHT, run_prefix: str) -> dict[str, ContributionRecord]:
    """All live, well-formed, owner-signed records: peer_id -> record. Never raises on bad data or DHT errors.

    Searches with `latest=True`, so every node holding the key is asked and their subkeys are merged (slower than
    the first hit, but a leaderboard wants everyone). See `parse_contribution_entries` for what is dropped.
    """
    try:
        entries = RECORDS.fetch(dht, contributions_key(run_prefix), latest=True)
    except Exception as e:
        logger.warning(f"Could not fetch contribution records: {type(e).__name__}: {e}")
        return {}
    return least_generous_claims(entry.record for entry in entries)


def parse_contribution_entries(
    entries: Mapping[object, tuple[object, object]], now: float
) -> dict[str, ContributionRecord]:
    """Pure read-side policy: subkey -> (value, expiration_time) as the DHT returned them, to peer_id -> record.

    Dropped (one debug line each, never raised): expired entries or ones expiring more than MAX_RECORD_TTL_S from
    `now`; subkeys that are not `<peer_id>[owner:...]` bytes (unprotected subkeys pass hivemind's validator, since
    it only checks subkeys that carry a marker); values that fail the strict schema; records whose `peer_id`
    differs from the peer id in their subkey. hivemind's validator has already dropped bad signatures.
    When several owner keys claim one peer id, the least generous record wins (see the module docstring).
    """
    return least_generous_claims(entry.record for entry in RECORDS.parse_entries(entries, now))


def least_generous_claims(records: Iterable[ContributionRecord]) -> dict[str, ContributionRecord]:
    """peer_id -> the least generous of the records that claim it (an impersonator can shrink, never inflate)."""
    claims: dict[str, list[ContributionRecord]] = {}
    for record in records:
        claims.setdefault(record.peer_id, []).append(record)
    accepted = {}
    for peer_id, claimed in claims.items():
        if len(claimed) > 1:
            logger.debug(f"{len(claimed)} owner keys claim peer {peer_id}; keeping the least generous record")
        accepted[peer_id] = min(claimed, key=_generosity)
    return accepted


def _generosity(record: ContributionRecord) -> tuple:
    return (record.tokens, record.batches, record.expert_requests, record.uptime_s, record.name, record.role)
