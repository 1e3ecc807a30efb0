"""Volunteer contribution records: signed per-peer counters in the DHT, a leaderboard and swarm totals from them.

Every peer publishes one `ContributionRecord` under the shared key `<run_prefix>_contributions`, in its own
subkey `<peer_id>[owner:<rsa public key>]`. hivemind's RSASignatureValidator makes that subkey writable only by
the holder of the matching private key, so nobody can overwrite another peer's entry. Any peer fetches all
entries and computes the leaderboard and swarm totals locally: no central server.

Trust model (read this before relying on the numbers):
- The numbers are self-reported. A peer can lie about its own work or invent extra peer ids (Sybil); nothing here
  can stop that, the leaderboard is a thank-you board, not an accounting system.
- What the read path does guarantee: a record only counts if it sits under a signed owner subkey whose peer-id
  part equals the record's `peer_id`, so a peer cannot post numbers under another peer's entry.
- hivemind does not bind a peer id to the RSA key, so a hostile peer may sign a subkey `<victim id>[owner:<its own
  key>]`. When several owner keys claim one peer id, the *least generous* claim wins (`parse_contribution_entries`):
  an impersonator can hide or shrink a victim's numbers for a while, never inflate them. The same rule handles an
  honest restart (the RSA key is per process, so the previous session's record lingers until it expires).

Counters live in `state_dir/contributions.json` (`ContributionCounters`), written atomically, so a volunteer keeps
its totals across restarts; `ContributionPublisher` republishes them every `period_s`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Annotated, Callable, Literal, Mapping

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from dragon_swarm.monitor.status import LeaderboardRow

logger = logging.getLogger(__name__)

Role = Literal["trainer", "host", "trainer+host", "monitor"]
TRAINER_ROLES = frozenset({"trainer", "trainer+host"})
HOST_ROLES = frozenset({"host", "trainer+host"})

# Badges by micro-batches trained, highest first. Names are metals; the UI may show the threshold next to them.
BADGES: tuple[tuple[int, str], ...] = ((100_000, "gold"), (10_000, "silver"), (1_000, "bronze"))

# Records that claim to live longer than this are ignored: a peer could otherwise leave a ghost entry in the
# swarm for days. Publishers must refresh well within it (the default is 120 s, refreshed every 30 s).
MAX_RECORD_TTL_S = 3600.0

COUNTERS_FILE_FORMAT = 1

_OWNER_MARKER_RE = re.compile(rb"\[owner:[^\]]+\]")


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


def contributions_key(run_prefix: str) -> str:
    return f"{run_prefix}_contributions"


def contribution_subkey(peer_id: str, validator: RSASignatureValidator | None = None) -> bytes:
    """`<peer_id>[owner:<public key>]`: the owner marker makes every DHT node demand the owner's signature.

    `validator` must be the RSASignatureValidator installed in the DHT that will store the record (that DHT signs
    with its own key). The default, `RSASignatureValidator()`, uses this process's key, which is what
    `dragon_swarm.swarm.dht_node.start_dht` installs; pass an explicit one when a DHT got its own private key.
    """
    validator = validator if validator is not None else RSASignatureValidator()
    return peer_id.encode() + validator.local_public_key


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
    ValueError). `validator`: see `contribution_subkey`. DHT failures are logged and reported as False, never raised:
    a missed publication only makes the entry older until the next one. Republish well within `expiration_s`.
    """
    if not 0.0 < expiration_s <= MAX_RECORD_TTL_S:
        raise ValueError(f"expiration_s must be in (0, {MAX_RECORD_TTL_S}], got {expiration_s}")
    own_peer_id = dht.peer_id.to_base58()
    if record.peer_id != own_peer_id:
        raise ValueError(f"record.peer_id {record.peer_id!r} is not this DHT's peer id {own_peer_id!r}")
    subkey = contribution_subkey(own_peer_id, validator)
    try:
        stored = dht.run_coroutine(
            partial(
                _store_record,
                key=contributions_key(run_prefix),
                value=record.model_dump(),
                subkey=subkey,
                expiration_time=get_dht_time() + expiration_s,
            )
        )
    except Exception as e:  # a dead or overloaded DHT: report, let the caller retry next period
        logger.warning(f"Could not publish the contribution record: {type(e).__name__}: {e}")
        return False
    return bool(stored)


def fetch_contributions(dht: hivemind.DHT, run_prefix: str) -> dict[str, ContributionRecord]:
    """All live, well-formed, owner-signed records: peer_id -> record. Never raises on bad data or DHT errors.

    Searches with `latest=True`, so every node holding the key is asked and their subkeys are merged (slower than
    the first hit, but a leaderboard wants everyone). See `parse_contribution_entries` for what is dropped.
    """
    try:
        found = dht.run_coroutine(partial(_get_latest, key=contributions_key(run_prefix)))
    except Exception as e:
        logger.warning(f"Could not fetch contribution records: {type(e).__name__}: {e}")
        return {}
    if found is None or not isinstance(found.value, dict):
        return {}  # nobody published yet, or a hostile peer replaced the dictionary by a plain value
    entries = {}
    for subkey, item in found.value.items():
        value, expiration_time = getattr(item, "value", None), getattr(item, "expiration_time", None)
        entries[subkey] = (value, expiration_time)
    return parse_contribution_entries(entries, now=get_dht_time())


# module-level coroutines: run_coroutine pickles them into the DHT process
async def _store_record(_dht, node, key: str, value: dict, subkey: bytes, expiration_time: float) -> bool:
    return await node.store(key, value, expiration_time, subkey=subkey)


async def _get_latest(_dht, node, key: str):
    return await node.get(key, latest=True)


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
    claims: dict[str, list[ContributionRecord]] = {}
    for subkey, (value, expiration_time) in entries.items():
        record = _parse_entry(subkey, value, expiration_time, now)
        if record is not None:
            claims.setdefault(record.peer_id, []).append(record)

    accepted = {}
    for peer_id, records in claims.items():
        if len(records) > 1:
            logger.debug(f"{len(records)} owner keys claim peer {peer_id}; keeping the least generous record")
        accepted[peer_id] = min(records, key=_generosity)
    return accepted


def _generosity(record: ContributionRecord) -> tuple:
    return (record.tokens, record.batches, record.expert_requests, record.uptime_s, record.name, record.role)


def _parse_entry(subkey: object, value: object, expiration_time: object, now: float) -> ContributionRecord | None:
    if (
        not isinstance(expiration_time, (int, float))
        or not math.isfinite(expiration_time)
        or not now < expiration_time <= now + MAX_RECORD_TTL_S
    ):
        logger.debug("dropped a contribution record with an expired or implausible expiration time")
        return None
    if not isinstance(subkey, bytes):
        logger.debug("dropped a contribution record under a non-bytes subkey")
        return None
    try:
        record = ContributionRecord.model_validate(value)
    except ValidationError:
        logger.debug("dropped a malformed contribution record")
        return None
    prefix = record.peer_id.encode()
    # the signed part of the subkey names its peer; a record naming another peer is a forgery
    if not subkey.startswith(prefix) or _OWNER_MARKER_RE.fullmatch(subkey[len(prefix) :]) is None:
        logger.debug(f"dropped a contribution record for {record.peer_id} under a subkey it does not own")
        return None
    return record


# --- pure views -------------------------------------------------------------------------------------------------


def badge_for(batches: int) -> str | None:
    """Badge for a lifetime count of micro-batches: bronze from 1,000, silver from 10,000, gold from 100,000.

    Returns "bronze", "silver" or "gold" (the UI adds the threshold if it wants), None below 1,000.
    """
    for threshold, badge in BADGES:
        if batches >= threshold:
            return badge
    return None


def leaderboard(records: Mapping[str, ContributionRecord], limit: int = 20) -> list[LeaderboardRow]:
    """Top `limit` rows by tokens, then batches (both descending), then peer id; monitors included if they list."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    ranked = sorted(records.values(), key=lambda r: (-r.tokens, -r.batches, r.peer_id))[:limit]
    return [
        LeaderboardRow(
            name=r.name,
            peer_id=r.peer_id,
            tokens=r.tokens,
            batches=r.batches,
            expert_requests=r.expert_requests,
            uptime_s=r.uptime_s,
            badge=badge_for(r.batches),
        )
        for r in ranked
    ]


def network_stats(records: Mapping[str, ContributionRecord]) -> dict[str, int]:
    """Swarm totals over live records. A "trainer+host" counts both as a trainer and as a host."""
    values = list(records.values())
    return {
        "peers_alive": len(values),
        "swarm_tokens": sum(r.tokens for r in values),
        "swarm_batches": sum(r.batches for r in values),
        "expert_requests": sum(r.expert_requests for r in values),
        "trainers": sum(r.role in TRAINER_ROLES for r in values),
        "hosts": sum(r.role in HOST_ROLES for r in values),
    }


# --- local counters ---------------------------------------------------------------------------------------------


class _CountersFile(BaseModel):
    """On-disk schema of contributions.json; anything else is treated as corrupt."""

    model_config = ConfigDict(strict=True, extra="forbid")

    format: Literal[1]
    run_prefix: str
    peer_id: str
    tokens: int = Field(ge=0)
    batches: int = Field(ge=0)
    expert_requests: int = Field(ge=0)
    uptime_s: float = Field(ge=0.0, allow_inf_nan=False)


class ContributionCounters:
    """This peer's lifetime counters for one swarm, kept across restarts in `state_dir/contributions.json`.

    Thread-safe: trainer, expert host and publisher threads update and read it concurrently. `uptime_s()` is the
    stored total of earlier sessions plus the time since this object was created (monotonic clock), so saving
    several times in one session never double-counts.
    """

    def __init__(
        self,
        run_prefix: str,
        peer_id: str = "",
        *,
        tokens: int = 0,
        batches: int = 0,
        expert_requests: int = 0,
        uptime_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._lock = threading.Lock()
        self.run_prefix = run_prefix
        self._peer_id = peer_id
        self._tokens, self._batches, self._expert_requests = tokens, batches, expert_requests
        self._previous_uptime_s = uptime_s
        self._last_loss: float | None = None  # not persisted: a loss from an old session says nothing now
        self._clock = clock
        self._session_started = clock()

    @classmethod
    def load(
        cls, path: Path, run_prefix: str, *, clock: Callable[[], float] = time.monotonic
    ) -> ContributionCounters:
        """Counters saved for `run_prefix`; zeros for a missing file, and zeros plus a warning for a corrupt file or
        one from another swarm (its numbers mean nothing here). Never raises; the file is left as it is and is only
        replaced by the next `save`."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(run_prefix, clock=clock)
        except (OSError, UnicodeDecodeError) as e:
            logger.warning(f"Cannot read {path} ({type(e).__name__}: {e}); contribution counters start from zero")
            return cls(run_prefix, clock=clock)
        try:
            saved = _CountersFile.model_validate(json.loads(text))
        except (ValueError, ValidationError):  # JSONDecodeError is a ValueError
            logger.warning(f"{path} is corrupt; contribution counters start from zero")
            return cls(run_prefix, clock=clock)
        if saved.run_prefix != run_prefix:
            logger.warning(
                f"{path} belongs to swarm {saved.run_prefix!r}, not {run_prefix!r}; contribution counters start from zero"
            )
            return cls(run_prefix, clock=clock)
        return cls(
            run_prefix,
            saved.peer_id,
            tokens=saved.tokens,
            batches=saved.batches,
            expert_requests=saved.expert_requests,
            uptime_s=saved.uptime_s,
            clock=clock,
        )

    def save(self, path: Path) -> None:
        """Write atomically (temp file in the same directory, fsync, rename): a crash leaves the old or the new file.
        Raises OSError if the disk refuses; the old file is then untouched."""
        path = Path(path)
        with self._lock:
            payload = {
                "format": COUNTERS_FILE_FORMAT,
                "run_prefix": self.run_prefix,
                "peer_id": self._peer_id,
                "tokens": self._tokens,
                "batches": self._batches,
                "expert_requests": self._expert_requests,
                "uptime_s": self._uptime_locked(),
            }
        # disk I/O outside the lock: trainers must not wait on fsync to count a batch
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(payload, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    # --- writers ---

    def add_tokens(self, count: int) -> None:
        _check_count(count)
        with self._lock:
            self._tokens += count

    def add_batch(self, tokens: int = 0, count: int = 1) -> None:
        """`count` micro-batches trained, holding `tokens` tokens in total."""
        _check_count(tokens)
        _check_count(count)
        with self._lock:
            self._batches += count
            self._tokens += tokens

    def add_expert_requests(self, count: int = 1) -> None:
        _check_count(count)
        with self._lock:
            self._expert_requests += count

    # --- readers ---

    @property
    def peer_id(self) -> str:
        """The peer id of the last record made (stored in the file for inspection; a new identity keeps the
        counters, since they count the volunteer's machine, not one key)."""
        with self._lock:
            return self._peer_id

    @property
    def tokens(self) -> int:
        with self._lock:
            return self._tokens

    @property
    def batches(self) -> int:
        with self._lock:
            return self._batches

    @property
    def expert_requests(self) -> int:
        with self._lock:
            return self._expert_requests

    def uptime_s(self) -> float:
        """Seconds online over all sessions: the stored total plus this session so far."""
        with self._lock:
            return self._uptime_locked()

    def _uptime_locked(self) -> float:
        return self._previous_uptime_s + max(0.0, self._clock() - self._session_started)

    def set_loss(self, loss: float) -> None:
        """The latest training loss, published with the record (non-finite values are not published)."""
        with self._lock:
            self._last_loss = float(loss) if math.isfinite(loss) and loss >= 0 else None

    def to_record(self, peer_id: str, name: str, role: Role) -> ContributionRecord:
        """A consistent snapshot as a record; raises pydantic.ValidationError for an invalid name or role."""
        with self._lock:
            self._peer_id = peer_id
            tokens, batches, requests, uptime = (
                self._tokens,
                self._batches,
                self._expert_requests,
                self._uptime_locked(),
            )
            loss = self._last_loss
        return ContributionRecord(
            peer_id=peer_id,
            name=name,
            tokens=tokens,
            batches=batches,
            expert_requests=requests,
            uptime_s=uptime,
            role=role,
            loss=loss,
        )


def _check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"counts are non-negative ints, got {count!r}")


# --- background publisher ---------------------------------------------------------------------------------------


class ContributionPublisher:
    """Every `period_s`: save the counters file, publish this peer's record, fetch everyone's, call `on_update`.

    Built, then `start()`ed, then `shutdown()`; the owner (the peer) calls `publish_now()` on the way out so the
    final numbers land in the DHT. `on_update(records)` runs on the publisher thread; keep it quick (it feeds the
    UI). Each step is guarded separately: an error is logged and the next period tries again.
    `expiration_s` must exceed `period_s`, or records blink out between refreshes; 3-4 periods ride out a missed
    publication or two.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_prefix: str,
        counters: ContributionCounters,
        counters_path: Path,
        name: str,
        role: Role,
        on_update: Callable[[dict[str, ContributionRecord]], None] | None = None,
        *,
        period_s: float = 30.0,
        expiration_s: float = 120.0,
        validator: RSASignatureValidator | None = None,
    ):
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        if expiration_s <= period_s:
            raise ValueError(f"expiration_s ({expiration_s}) must exceed period_s ({period_s})")
        self.dht, self.run_prefix, self.counters, self.counters_path = dht, run_prefix, counters, Path(counters_path)
        self.peer_id = dht.peer_id.to_base58()
        self.name, self.role, self.on_update = name, role, on_update
        self.period_s, self.expiration_s, self.validator = period_s, expiration_s, validator
        counters.to_record(self.peer_id, name, role)  # fail at construction on a bad name or role, not in the thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shutdown_lock = threading.Lock()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("ContributionPublisher already started")
        self._thread = threading.Thread(target=self._run, name="contribution-publisher", daemon=True)
        self._thread.start()

    def publish_now(self) -> bool:
        """Save the counters file, then publish synchronously; True if the DHT stored the record."""
        self._save()
        return self._publish()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the loop and join it (a DHT call in flight is waited for up to `timeout_s`). Idempotent."""
        with self._shutdown_lock:
            self._stop.set()
            thread = self._thread
            if thread is not None and thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout_s)
                if thread.is_alive():
                    logger.warning(f"Contribution publisher did not stop within {timeout_s:.0f} s; leaving it (daemon)")

    def _run(self) -> None:
        while not self._stop.is_set():
            self._tick()
            self._stop.wait(self.period_s)

    def _tick(self) -> None:
        self._save()
        self._publish()
        try:
            records = fetch_contributions(self.dht, self.run_prefix)
            if self.on_update is not None:
                self.on_update(records)
        except Exception:
            logger.exception("Contribution update failed; retrying next period")

    def _save(self) -> None:
        try:
            self.counters.save(self.counters_path)
        except Exception:
            logger.exception(f"Could not save contribution counters to {self.counters_path}")

    def _publish(self) -> bool:
        try:
            record = self.counters.to_record(self.peer_id, self.name, self.role)
            ok = publish_contribution(self.dht, self.run_prefix, record, self.expiration_s, validator=self.validator)
        except Exception:
            logger.exception("Could not publish the contribution record")
            return False
        if not ok:
            logger.info("The DHT did not accept this peer's contribution record; retrying next period")
        return ok

