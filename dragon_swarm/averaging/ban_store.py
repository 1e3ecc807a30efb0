"""Bans survive a restart: the trainer writes the bans its averager holds to `<state-dir>/bans.json` when it saves,
and seeds a fresh averager's reputation book from that file at start.

The book keeps time on the monotonic clock, which restarts with the process; the file stores wall-clock expiry
times. A saved ban can only be shortened on load (never beyond `max_ban_seconds` from now), so a tampered file cannot
ban a peer for longer than the policy allows; a broken file is reported and ignored (no bans restored).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from dragon_swarm.averaging.reputation import ReputationBook
from dragon_swarm.state.atomic import atomic_write

logger = logging.getLogger(__name__)

BANS_FILE = "bans.json"
MAX_SAVED_BANS = 10_000


def bans_from_snapshot(snapshot: dict, now_wall: float | None = None) -> dict[str, dict]:
    """`ReputationBook.snapshot()` (or an averager's `get_reputation()`) -> `{peer: {"until": wall time, "reason"}}`."""
    now_wall = time.time() if now_wall is None else now_wall
    peers = snapshot.get("peers", {})
    bans = {}
    for peer, seconds_left in snapshot.get("banned", {}).items():
        if isinstance(seconds_left, (int, float)) and math.isfinite(seconds_left) and seconds_left > 0:
            reason = (peers.get(peer) or {}).get("ban_reason") or "no reason kept"
            bans[str(peer)] = {"until": now_wall + float(seconds_left), "reason": str(reason)[:300]}
    return bans


def save_bans(path: Path, bans: dict[str, dict]) -> None:
    payload = {"version": 1, "bans": dict(list(bans.items())[:MAX_SAVED_BANS])}
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))


def load_bans(path: Path, now_wall: float | None = None) -> dict[str, tuple[float, str]]:
    """`{peer: (seconds left, reason)}` of the bans in `path` that have not expired; {} when there is no file or
    it is unusable (one warning line)."""
    path = Path(path)
    if not path.exists():
        return {}
    now_wall = time.time() if now_wall is None else now_wall
    try:
        payload = json.loads(path.read_text())
        entries = payload["bans"]
        if not isinstance(entries, dict):
            raise ValueError("'bans' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning(f"Saved bans in {path} are unreadable, starting without them: {e}")
        return {}
    bans = {}
    for peer, entry in list(entries.items())[:MAX_SAVED_BANS]:
        until = entry.get("until") if isinstance(entry, dict) else None
        if not isinstance(peer, str) or not peer or not isinstance(until, (int, float)) or not math.isfinite(until):
            continue
        if until > now_wall:
            bans[peer] = (until - now_wall, str(entry.get("reason", "no reason kept"))[:300])
    return bans


def seed_book(book: ReputationBook, bans: dict[str, tuple[float, str]]) -> ReputationBook:
    for peer, (seconds_left, reason) in bans.items():
        book.restore_ban(peer, seconds_left, reason)
    if bans:
        logger.info(f"Restored {len(bans)} ban(s) from before the restart")
    return book
