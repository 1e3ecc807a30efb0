"""This peer's own contribution: lifetime counters kept on disk, and the thread that publishes them.

Counters live in `state_dir/contributions.json` (`ContributionCounters`), written atomically, so a volunteer keeps
its totals across restarts; `ContributionPublisher` saves them and republishes this peer's record every `period_s`
(records and their trust model: `dragon_swarm.swarm.contributions`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Callable, Literal

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dragon_swarm.background import PeriodicThread
from dragon_swarm.state.atomic import atomic_write_text
from dragon_swarm.swarm.contributions import ContributionRecord, Role, fetch_contributions, publish_contribution

logger = logging.getLogger(__name__)

COUNTERS_FILE_FORMAT = 1


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
        self._last_val: tuple[int, float] | None = None  # (model version, held-out loss); not persisted either
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
        """Write atomically (`state.atomic`): a crash leaves the old or the new file. Raises OSError if the disk
        refuses; the old file is then untouched."""
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
        atomic_write_text(Path(path), json.dumps(payload, indent=1))

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

    def set_val_loss(self, epoch: int, loss: float) -> None:
        """The latest held-out loss and the model version it scored (non-finite values are not published)."""
        with self._lock:
            self._last_val = (int(epoch), float(loss)) if math.isfinite(loss) and loss >= 0 and epoch >= 0 else None

    def to_record(self, peer_id: str, name: str, role: Role) -> ContributionRecord:
        """A consistent snapshot as a record; raises pydantic.ValidationError for an invalid name or role."""
        with self._lock:
            self._peer_id = peer_id
            tokens, batches, requests = self._tokens, self._batches, self._expert_requests
            uptime, loss, val = self._uptime_locked(), self._last_loss, self._last_val
        return ContributionRecord(
            peer_id=peer_id,
            name=name,
            tokens=tokens,
            batches=batches,
            expert_requests=requests,
            uptime_s=uptime,
            role=role,
            loss=loss,
            val_epoch=None if val is None else val[0],
            val_loss=None if val is None else val[1],
        )


def _check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"counts are non-negative ints, got {count!r}")


class ContributionPublisher(PeriodicThread):
    """Every `period_s` (and once right after `start()`): save the counters file, publish this peer's record, fetch
    everyone's, call `on_update`.

    Built, then `start()`ed, then `stop()`ped; the owner (the peer) calls `publish_now()`
    on the way out so the final numbers land in the DHT. `on_update(records)` runs on the publisher thread; keep it
    quick (it feeds the UI). Each step is guarded separately: an error is logged and the next period tries again.
    `expiration_s` must exceed `period_s`, or records blink out between refreshes; 3-4 periods ride out a missed
    publication or two. `name` is the volunteer's public name (kept as `public_name`: `name` is the thread's).
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
        super().__init__("contribution-publisher", period_s, first_tick_now=True)
        if expiration_s <= period_s:
            raise ValueError(f"expiration_s ({expiration_s}) must exceed period_s ({period_s})")
        self.dht, self.run_prefix, self.counters, self.counters_path = dht, run_prefix, counters, Path(counters_path)
        self.peer_id = dht.peer_id.to_base58()
        self.public_name, self.role, self.on_update = name, role, on_update
        self.expiration_s, self.validator = expiration_s, validator
        counters.to_record(self.peer_id, name, role)  # fail at construction on a bad name or role, not in the thread

    def publish_now(self) -> bool:
        """Save the counters file, then publish synchronously; True if the DHT stored the record."""
        self._save()
        return self._publish()

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the loop and join it (a DHT call in flight is waited for up to `timeout_s`). Idempotent."""
        super().stop(timeout_s)

    def tick(self) -> None:
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
        except OSError as e:  # a full or read-only disk: one line each period, not a traceback
            logger.error(f"Could not save contribution counters to {self.counters_path}: {e.strerror or e}")
        except Exception:
            logger.exception(f"Could not save contribution counters to {self.counters_path}")

    def _publish(self) -> bool:
        try:
            record = self.counters.to_record(self.peer_id, self.public_name, self.role)
            ok = publish_contribution(self.dht, self.run_prefix, record, self.expiration_s, validator=self.validator)
        except Exception:
            logger.exception("Could not publish the contribution record")
            return False
        if not ok:
            logger.info("The DHT did not accept this peer's contribution record; retrying next period")
        return ok
