"""Per-sender reputation for robust all-reduce: what each peer sent, how far it was from the result, who is banned.

Pure bookkeeping: no network, no hivemind. The robust reducer feeds it once per all-reduce round with every
sender's distance (:meth:`ReputationBook.record_distances`) and after every part it rejects or weight it
disbelieves (:meth:`ReputationBook.record_invalid`); the averager asks
:meth:`ReputationBook.is_banned` before it aggregates a sender's parts or lets it into a group.

Distances are judged per all-reduce round, not per part: the reducer reports each sender's distance from the
robust result over the whole partition it reduced (the root of the sum of squared per-part distances), because in
parts that hold an honest peer's own rare-token embedding rows that peer is legitimately far out (16-44x the
median per part in the robustness benchmark's clean runs, ~1-2x over a partition). The distances are made
scale-free by dividing by a unit: this peer's own distance (a peer known to be honest: colluders sitting on the
result cannot shrink it and make honest peers look far), else the median distance of the round's senders. An
honest sender scores about 1 whatever the gradient scale; a sender pulling away scores its distance in units of
"typical honest spread". The book keeps an exponential moving average (EMA) of that ratio per sender.

A sender is banned for ``ban_seconds`` when

* it sent a malformed part (wrong size or dtype, NaN, Inf): that is proof, not noise (no honest dragon peer
  sends one: trainers skip non-finite steps, fp16 compression clamps to finite values, sizes come from the
  shared config), so the first one bans; the sooner a peer bans, the fewer groups the faulty peer can spoil,
* it collected ``max_invalid`` strikes for softer evidence (e.g. claiming more weight than a peer can hold)
  since its last ban, or
* its distance EMA stayed above ``ban_distance_ratio`` for ``min_observations`` rounds in a row.

Both counters restart after a ban, so a returning peer gets a fresh chance but is banned again as quickly if it
keeps misbehaving. The EMA itself is kept: a peer cannot wash its history by sitting out a ban. A repeat offender
serves longer: a ban that starts after an earlier one ran out lasts twice as long as that one, up to
``max_ban_seconds`` (a liar caught every few minutes is otherwise back in the rounds between catches). A peer that
stays out of trouble for ``max_ban_seconds`` after a ban starts over at ``ban_seconds`` (an honest peer banned by a
fluke is not marked for life).

The defaults are the policy trainers run with (``averaging:`` section of the swarm config, see
``RobustAveragingSettings.from_config``): 5x for 3 rounds, 2 strikes, 300 s.

Tuning: with honest gradients the ratio is ~1 (spread 0.5-2 for small groups), so ``ban_distance_ratio`` of 5
leaves ample margin; lower it to catch subtler attacks at the cost of false bans in tiny groups. Log lines
"banned <peer> for 300 s: ..." say which rule fired. Times are ``time.monotonic()`` seconds unless ``now`` is given.

Thread-safe: the averager's event loop writes while a trainer thread may read :meth:`snapshot`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

__all__ = ["ReputationBook", "SenderRecord"]

logger = logging.getLogger(__name__)


DEFAULT_MAX_BAN_S = 24 * 3600.0
MAX_RATIO = 100.0  # one observation's distance ratio is capped here; a ban ratio of MAX_RATIO never bans


@dataclass
class SenderRecord:
    """What the book knows about one sender (a peer id string)."""

    parts: int = 0  # observations (rounds) in which its parts entered an aggregation
    invalid: int = 0  # parts rejected by validation, all time
    last_invalid_reason: str | None = None
    distance_ema: float | None = None  # EMA of distance / the round's unit distance; None until the first observation
    far_streak: int = 0  # consecutive observations with distance_ema above the ban ratio (since the last ban)
    invalid_strikes: int = 0  # invalid parts since the last ban
    refused_results: int = 0  # aggregates this peer returned as a reducer that we refused (see the runner)
    bans: int = 0
    episodes: int = 0  # separate bans (a ban starting while not banned) since the peer last stayed clean long enough
    banned_until: float = -math.inf
    ban_reason: str | None = None
    last_seen: float = -math.inf


class ReputationBook:
    """Per-sender records and the local ban policy (see the module docstring).

    :param ban_seconds: how long a first ban lasts; each further one (started after the last ran out) lasts twice
      as long as the one before
    :param max_ban_seconds: the longest ban, and how long a peer must stay unbanned to start over at ``ban_seconds``
      (default: 24 h, or ``ban_seconds`` if that is longer)
    :param max_invalid: invalid parts (since the last ban) that trigger a ban
    :param ban_distance_ratio: a distance EMA above this (in units of the round's unit distance, see the module
      docstring) counts as far
    :param min_observations: consecutive far observations (rounds) that trigger a ban
    :param ema_alpha: weight of the newest observation in the distance EMA, in (0, 1]
    :param min_senders: rounds with fewer valid senders update part counts but not the EMA (with 2 senders each
      is exactly as far from the other, so the ratio says nothing about who is wrong), unless the caller gives an
      explicit ``unit`` (distances measured from its own part, in units of its norm: then one other sender is enough)
    :param max_ratio: one observation's ratio is capped here, so a single huge outlier cannot pin the EMA for long
    :param max_records: keep at most this many senders; the least recently seen unbanned ones are forgotten first
      (bounds memory if an attacker cycles through fresh peer ids)
    """

    def __init__(
        self,
        *,
        ban_seconds: float = 300.0,
        max_ban_seconds: float | None = None,
        max_invalid: int = 2,
        ban_distance_ratio: float = 5.0,
        min_observations: int = 3,
        ema_alpha: float = 0.2,
        min_senders: int = 3,
        max_ratio: float = MAX_RATIO,
        max_records: int = 10_000,
    ):
        _require(math.isfinite(ban_seconds) and ban_seconds >= 0, f"ban_seconds must be >= 0, got {ban_seconds!r}")
        max_ban_seconds = max(DEFAULT_MAX_BAN_S, ban_seconds) if max_ban_seconds is None else max_ban_seconds
        _require(
            math.isfinite(max_ban_seconds) and max_ban_seconds >= ban_seconds,
            f"max_ban_seconds must be >= ban_seconds ({ban_seconds:g}), got {max_ban_seconds!r}",
        )
        _require(ban_distance_ratio > 0, f"ban_distance_ratio must be > 0, got {ban_distance_ratio!r}")
        _require(0 < ema_alpha <= 1, f"ema_alpha must be in (0, 1], got {ema_alpha!r}")
        _require(max_ratio >= ban_distance_ratio, f"max_ratio must be >= ban_distance_ratio, got {max_ratio!r}")
        for name, value, minimum in [
            ("max_invalid", max_invalid, 1),
            ("min_observations", min_observations, 1),
            ("min_senders", min_senders, 2),
            ("max_records", max_records, 1),
        ]:
            _require(isinstance(value, int) and value >= minimum, f"{name} must be an int >= {minimum}, got {value!r}")
        self.ban_seconds, self.max_invalid = float(ban_seconds), max_invalid
        self.max_ban_seconds = float(max_ban_seconds)
        self.ban_distance_ratio, self.min_observations = float(ban_distance_ratio), min_observations
        self.ema_alpha, self.min_senders, self.max_ratio = float(ema_alpha), min_senders, float(max_ratio)
        self.max_records = max_records
        self._records: dict[str, SenderRecord] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ writes

    def record_invalid(
        self, peer: str, reason: str, now: float | None = None, *, conclusive: bool = False, may_ban: bool = True
    ) -> bool:
        """Count one strike against ``peer``.

        :param conclusive: the evidence proves the peer faulty (a malformed part): ban at once
        :param may_ban: False records the strike without banning (a peer's own part: it must never ban itself)
        :returns: True if this strike got the peer banned
        """
        now = _now(now)
        with self._lock:
            record = self._record(peer, now)
            record.invalid += 1
            record.invalid_strikes += 1
            record.last_invalid_reason = reason
            if may_ban and conclusive:
                self._ban(peer, record, now, f"malformed part: {reason}")
                return True
            if may_ban and record.invalid_strikes >= self.max_invalid:
                self._ban(peer, record, now, f"{record.invalid_strikes} invalid part(s), last: {reason}")
                return True
            return False

    def record_distances(
        self,
        peers: Sequence[str],
        distances: torch.Tensor,
        now: float | None = None,
        unscored: Sequence[str] = (),
        reference: str | None = None,
        unit: float | None = None,
    ) -> list[str]:
        """Record one observation: ``distances[i]`` is ``peers[i]``'s distance from the robust result.

        The robust reducer calls this once per all-reduce round, with each sender's distance over the whole
        partition it reduced (the root of the sum of squared per-part distances), see the module docstring.

        :param unscored: peers that count toward the median but whose records are not updated: the local peer
          (a peer must never ban itself, which would drop its own partition from every round)
        :param reference: a peer known to be honest (the local peer) whose distance is the unit instead of the
          median distance. Colluders sending the same vector sit right at the robust result; with many of them
          the median distance shrinks and every honest peer looks far out. A peer's own distance cannot be
          shrunk that way. Falls back to the median when the reference is absent or at distance 0.
        :param unit: an explicit unit for the distances (wins over ``reference``), e.g. the norm of our own part
          when the distances are measured from it; with one, rounds of fewer than ``min_senders`` are scored too
        :returns: the peers this observation got banned
        """
        values = torch.as_tensor(distances, dtype=torch.float64).reshape(-1).tolist()
        if len(values) != len(peers):
            raise ValueError(f"got {len(peers)} peers but {len(values)} distances")
        if len(set(peers)) != len(peers):
            raise ValueError(f"peers must be distinct, got {list(peers)}")
        now = _now(now)
        if unit is not None and not (math.isfinite(unit) and unit > 0):
            unit = None
        explicit_unit = unit is not None
        if unit is None and reference is not None and reference in peers:
            own = values[list(peers).index(reference)]
            unit = own if math.isfinite(own) and own > 0 else None
        scored = len(values) >= self.min_senders or explicit_unit  # a unit from outside the round needs no median
        ratios = _normalized(values, self.max_ratio, unit) if scored else [None] * len(values)
        newly_banned = []
        with self._lock:
            for peer, ratio in zip(peers, ratios):
                if peer in unscored:
                    continue
                record = self._record(peer, now)
                record.parts += 1
                if ratio is None:
                    continue
                if record.distance_ema is None:
                    record.distance_ema = ratio
                else:
                    record.distance_ema += self.ema_alpha * (ratio - record.distance_ema)
                record.far_streak = record.far_streak + 1 if record.distance_ema > self.ban_distance_ratio else 0
                if record.far_streak >= self.min_observations:
                    self._ban(
                        peer,
                        record,
                        now,
                        f"distance EMA {record.distance_ema:.2f} > {self.ban_distance_ratio:g} x median "
                        f"for {record.far_streak} rounds",
                    )
                    newly_banned.append(peer)
        return newly_banned

    def record_refused_result(self, peer: str, now: float | None = None) -> None:
        """Count one aggregate that ``peer`` returned and we refused. Not a ban reason on its own: an honest
        reducer in a small group with an attacker can return a poisoned mean without fault of its own."""
        with self._lock:
            self._record(peer, _now(now)).refused_results += 1

    def ban(self, peer: str, reason: str, now: float | None = None) -> None:
        """Ban ``peer`` right away (e.g. on evidence from outside the all-reduce), as long as the policy says."""
        now = _now(now)
        with self._lock:
            self._ban(peer, self._record(peer, now), now, reason)

    def restore_ban(self, peer: str, seconds_left: float, reason: str, now: float | None = None) -> None:
        """Ban ``peer`` for what was left of a ban this peer saved before it restarted (``averaging.ban_store``)."""
        now = _now(now)
        seconds_left = min(max(float(seconds_left), 0.0), self.max_ban_seconds)  # no file bans beyond the policy
        with self._lock:
            record = self._record(peer, now)
            record.episodes = max(record.episodes, 1)  # banned again after this one, it serves the doubled time
            record.banned_until = max(record.banned_until, now + seconds_left)
            record.ban_reason = f"{reason} (kept across a restart)"

    # ------------------------------------------------------------------ reads

    def is_banned(self, peer: str, now: float | None = None) -> bool:
        now = _now(now)
        with self._lock:
            record = self._records.get(peer)
            return record is not None and record.banned_until > now

    def banned(self, now: float | None = None) -> dict[str, float]:
        """:returns: ``{peer: banned_until}`` for every peer banned at ``now``"""
        now = _now(now)
        with self._lock:
            return {peer: r.banned_until for peer, r in self._records.items() if r.banned_until > now}

    def record(self, peer: str) -> SenderRecord | None:
        """A copy of ``peer``'s record, or None if the book has never heard of it."""
        with self._lock:
            record = self._records.get(peer)
            return None if record is None else SenderRecord(**asdict(record))

    def snapshot(self, now: float | None = None) -> dict:
        """A JSON-able summary for stats files and dashboards.

        ``{"now": t, "banned": {peer: seconds_left}, "peers": {peer: {parts, invalid, distance_ema, ...}}}``;
        infinities are written as None (JSON has no Infinity).
        """
        now = _now(now)
        with self._lock:
            peers = {}
            for peer, record in self._records.items():
                fields = asdict(record)
                fields["banned"] = record.banned_until > now
                fields["ban_seconds_left"] = max(0.0, record.banned_until - now) if fields["banned"] else 0.0
                peers[peer] = {key: (None if _is_inf(value) else value) for key, value in fields.items()}
            return {
                "now": now,
                "banned": {peer: fields["ban_seconds_left"] for peer, fields in peers.items() if fields["banned"]},
                "peers": peers,
            }

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def __getstate__(self) -> dict:  # picklable (e.g. for a spawned averager process); the lock is not
        with self._lock:
            state = self.__dict__.copy()
            state["_records"] = {peer: SenderRecord(**asdict(r)) for peer, r in self._records.items()}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ internals

    def _record(self, peer: str, now: float) -> SenderRecord:
        if not isinstance(peer, str) or not peer:
            raise ValueError(f"peer must be a non-empty string (a peer id), got {peer!r}")
        record = self._records.get(peer)
        if record is None:
            if len(self._records) >= self.max_records:
                self._forget_one(now)
            record = self._records[peer] = SenderRecord()
        record.last_seen = max(record.last_seen, now)
        return record

    def _forget_one(self, now: float) -> None:
        unbanned = [peer for peer, r in self._records.items() if r.banned_until <= now]
        candidates = unbanned or list(self._records)  # all banned: forget the ban that ends first
        key = (lambda p: self._records[p].last_seen) if unbanned else (lambda p: self._records[p].banned_until)
        del self._records[min(candidates, key=key)]

    def ban_length(self, episodes: int) -> float:
        """Seconds the ``episodes``-th separate ban of one peer lasts: ``ban_seconds`` doubled per earlier one."""
        return min(self.ban_seconds * 2.0 ** min(max(episodes - 1, 0), 64), self.max_ban_seconds)

    def _ban(self, peer: str, record: SenderRecord, now: float, reason: str) -> None:
        if record.banned_until <= now:  # a new ban, not more evidence during the one it serves
            if now - record.banned_until >= self.max_ban_seconds:
                record.episodes = 0
            record.episodes += 1
        seconds = self.ban_length(record.episodes)
        record.banned_until = max(record.banned_until, now + seconds)
        record.ban_reason = reason
        record.bans += 1
        record.far_streak = record.invalid_strikes = 0
        repeat = f" (ban #{record.episodes})" if record.episodes > 1 else ""
        logger.warning(f"banned {peer} for {seconds:g} s{repeat}: {reason}")


def _normalized(distances: list[float], max_ratio: float, unit: float | None = None) -> list[float]:
    """distance / unit (default: the median distance), capped to [0, max_ratio]; a unit of 0 makes every nonzero
    distance max_ratio."""
    finite = sorted(d for d in distances if math.isfinite(d))
    n = len(finite)
    median = 0.0 if n == 0 else (finite[n // 2] if n % 2 else (finite[n // 2 - 1] + finite[n // 2]) / 2)
    if unit is not None:
        median = unit
    ratios = []
    for d in distances:
        if not math.isfinite(d):
            ratios.append(max_ratio)
        elif median > 0:
            ratios.append(min(max(d / median, 0.0), max_ratio))
        else:
            ratios.append(0.0 if d <= 0 else max_ratio)
    return ratios


def _now(now: float | None) -> float:
    return time.monotonic() if now is None else float(now)


def _is_inf(value) -> bool:
    return isinstance(value, float) and math.isinf(value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
