"""Where an honest trainer's averaging rounds went, read from its log: so that a bad robustness run can be explained
from its JSON alone (issue 13, item 1). Pure text processing, tested on sample lines.

Counted per trainer:
- rounds that did not average with the group, by reason (hivemind's and our runner's own log lines);
- for each attacker, seconds from the attack's start (the attacker's first micro-batch) to this trainer's first ban
  of it (`Banned trainer ...` from the trainer, or the reputation book's `banned ...` line), None if never;
- parts it refused, by reason (`rejected part ... (reason)`), and aggregates it refused or ignored.

And for all honest trainers together, from their stats records: the swarm's pace while they all train
(`epochs_per_micro_batch_together`).
"""

from __future__ import annotations

import re
from collections import Counter

_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)")
# (substring of a log line, reason reported)
ROUND_OUTCOMES = (
    ("Skipping pre-scheduled averaging round: there are no other peers", "alone: no other trainer ready"),
    ("Proceeding with local gradients", "fell back to local gradients"),
    ("could not find a group", "no group found"),
    ("Unable to run All-Reduce", "all-reduce failed"),
    ("keeping local values for this peer's own partition", "own partition kept local"),
    ("ignoring the aggregates of banned reducer", "banned reducer's partition kept local"),
    ("peer(s) this peer bans", "group held a banned peer: kept local"),
    ("refused the aggregate of part", "a reducer's aggregate refused"),
)
_REJECTED = re.compile(r"rejected part \d+ from (\S+) \((.*)\); excluded")
_BANNED = re.compile(r"(?:Banned trainer|banned) (Qm\w+) for [\d.]+ s: (.*)$")
_FIRST_STEP = re.compile(r"micro-batch 1 epoch")


def seconds_of_day(line: str) -> int | None:
    match = _TIME.match(line)
    if match is None:
        return None
    h, m, s = (int(g) for g in match.groups())
    return h * 3600 + m * 60 + s


def _elapsed(start: int, end: int) -> int:
    """Seconds from `start` to `end` (times of day): negative when `end` came first, e.g. a ban logged a second before
    the first micro-batch line. Logs carry the time of day only; a run never lasts half a day."""
    delta = (end - start) % 86400
    return delta - 86400 if delta > 43200 else delta


def attack_start(attacker_log: str) -> int | None:
    """Time of day (s) of the attacker's first micro-batch: from then on it sends poisoned gradients."""
    for line in attacker_log.splitlines():
        if _FIRST_STEP.search(line):
            return seconds_of_day(line)
    return None


def account_trainer(log: str, attackers: dict[str, int | None]) -> dict:
    """`attackers`: attacker peer id -> its attack start (time of day, s). Returns the trainer's accounting."""
    rounds: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    first_ban: dict[str, int] = {}
    ban_reasons: dict[str, str] = {}
    for line in log.splitlines():
        for needle, reason in ROUND_OUTCOMES:
            if needle in line:
                rounds[reason] += 1
        rejected = _REJECTED.search(line)
        if rejected:
            refused[_reason_class(rejected.group(2))] += 1
        banned = _BANNED.search(line)
        if banned:
            peer, when = banned.group(1), seconds_of_day(line)
            if peer not in first_ban and when is not None:
                first_ban[peer], ban_reasons[peer] = when, banned.group(2)[:160]
    bans = {}
    for peer, started in attackers.items():
        if peer in first_ban:
            bans[peer] = {
                "seconds_after_attack_start": _elapsed(started, first_ban[peer]) if started is not None else None,
                "reason": ban_reasons[peer],
            }
        else:
            bans[peer] = None
    honest_banned = sorted(peer for peer in first_ban if peer not in attackers)
    return {"rounds_not_averaged": dict(rounds), "refused_parts": dict(refused), "bans": bans, "honest_peers_banned": honest_banned}


def _reason_class(reason: str) -> str:
    """'contains 64 NaN value(s) out of 64' -> 'contains NaN'; numbers vary by part, the kind is what counts."""
    reason = re.sub(r"[-+]?\d[\d.e+-]*", "N", reason)
    return re.sub(r"\s+", " ", reason).strip()[:120]


def epochs_per_micro_batch_together(traces: list[list[dict]]) -> float | None:
    """Model versions the swarm advanced per micro-batch of an honest trainer, while every honest trainer was training:
    from the last one's first record to the first one's last. Final epochs also count the micro-batches a trainer ran
    before the others had started (alone, against a target sized for all) and the swarm's epoch when a fast trainer
    stopped; this pace counts neither. `traces`: each trainer's stats records (`time`, `epoch`). Mean over trainers;
    None when the trainers never trained at the same time."""
    if not traces or any(not trace for trace in traces):
        return None
    start, end = max(trace[0]["time"] for trace in traces), min(trace[-1]["time"] for trace in traces)
    paces = []
    for trace in traces:
        inside = [r for r in trace if start <= r["time"] <= end]
        if len(inside) >= 2:
            paces.append((inside[-1]["epoch"] - inside[0]["epoch"]) / (len(inside) - 1))
    return sum(paces) / len(paces) if len(paces) == len(traces) else None
