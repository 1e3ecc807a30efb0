"""A progress tracker whose view of the swarm's epoch a minority of peers cannot push ahead.

hivemind's ProgressTracker takes the swarm's epoch as the *largest* epoch any peer reports. A trainer that is
behind that epoch downloads the state from peers and skips its optimizer steps until it has caught up, so a
single peer reporting a far-ahead epoch (a liar, or a banned attacker whose averaging rounds all fail and who
therefore steps alone, faster than the swarm) stalls every honest trainer.

Here an epoch counts only if at least half of the reporting trainers are within one epoch of it
(:func:`supported_epoch`), and records of peers this trainer has banned are ignored altogether. In an honest
swarm this gives the same answer as hivemind: trainers step together, so the leaders are at most one epoch ahead
of the rest, and a late joiner is outnumbered by the peers it must catch up with.

The target batch follows the trainers this one trusts (:func:`trusted_target`): a banned trainer's samples never
reach our averages, so with 2 of 5 reporting trainers banned the 3 others would each have to fill 5/3 of their
share of the configured target before every step, and reach fewer epochs in the same time than a clean swarm.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

from hivemind.optim.progress_tracker import GlobalTrainingProgress, LocalTrainingProgress, ProgressTracker
from hivemind.p2p import PeerID

logger = logging.getLogger(__name__)


def supported_epoch(epochs: Sequence[int], local_epoch: int) -> int:
    """The largest reported epoch E such that at least ceil(n/2) of the n reports are >= E - 1, and never less
    than ``local_epoch``. Pure.

    Examples: [10, 10, 10, 50] -> 10 (one runaway); [5, 6, 6] -> 6 (peers switching epochs); [0, 10, 10, 10]
    -> 10 (a late joiner sees the swarm's epoch); [3, 9] -> 9 (with two reports, either one is half).
    """
    reports = sorted(int(e) for e in epochs)
    needed = math.ceil(len(reports) / 2)
    best = int(local_epoch)
    for candidate in set(reports):
        if candidate > best and sum(e >= candidate - 1 for e in reports) >= needed:
            best = candidate
    return best


def trusted_target(configured: int, trusted: int, banned: int) -> int:
    """The target batch for a swarm where `banned` of the `trusted + banned` trainers reporting progress are
    banned by this trainer: each trusted trainer keeps the share of the configured target it had. Pure."""
    if trusted <= 0 or banned <= 0:
        return configured
    return max(1, math.ceil(configured * trusted / (trusted + banned)))


class RobustProgressTracker(ProgressTracker):
    """``ProgressTracker`` with :func:`supported_epoch` and ignored peers (see the module docstring).

    ``ignore_peers(ids)`` replaces the set of peers (base58 ids) whose progress records are ignored; the trainer
    passes its current bans after every step.
    """

    def __init__(self, *args, **kwargs):
        self._ignored_peers: frozenset[str] = frozenset()
        self._reported_runaways: set[str] = set()
        self._configured_target: int | None = None  # hivemind's target_batch_size, before trusted_target
        self.reported_epochs: dict[str, int] = {}  # peer (base58) -> epoch of its latest progress record
        super().__init__(*args, **kwargs)

    def ignore_peers(self, peer_ids: Iterable[str]) -> None:
        self._ignored_peers = frozenset(map(str, peer_ids))

    def _parse_swarm_progress_data(self, metadata) -> GlobalTrainingProgress:
        if isinstance(metadata, dict) and metadata:
            metadata = self._credible_records(metadata)
        return super()._parse_swarm_progress_data(metadata)

    def _credible_records(self, metadata: dict) -> dict:
        """Drop records of ignored peers and of trainers ahead of the supported epoch; hivemind's own parser
        then takes the largest remaining epoch, which is the supported one."""
        parsed, ignored = {}, set()
        for subkey, entry in metadata.items():
            if entry.value is None:
                continue
            try:
                progress = LocalTrainingProgress.parse_obj(entry.value)
                sender = PeerID(progress.peer_id).to_base58()
            except Exception as e:  # the DHT schema validates records; this is a second line of defence
                logger.debug(f"ignoring malformed progress record: {e!r}")
                continue
            if sender in self._ignored_peers:
                ignored.add(sender)
                continue
            parsed[subkey] = (entry, progress, sender)
        self.reported_epochs = {sender: int(progress.epoch) for _, progress, sender in parsed.values()}
        self._follow_trusted_trainers(len({sender for _, _, sender in parsed.values()}), len(ignored))
        epochs = [progress.epoch for _, progress, _ in parsed.values() if not progress.client_mode]
        ceiling = supported_epoch(epochs, self.local_progress.epoch)
        credible = {}
        for subkey, (entry, progress, sender) in parsed.items():
            if progress.epoch > ceiling:
                if sender not in self._reported_runaways:
                    self._reported_runaways.add(sender)
                    logger.warning(
                        f"Ignoring progress of trainer {sender}: it reports epoch {progress.epoch}, but most of the "
                        f"swarm is at epoch {ceiling} or below"
                    )
                continue
            credible[subkey] = entry
        return credible

    def _follow_trusted_trainers(self, trusted: int, banned: int) -> None:
        if self._configured_target is None:
            self._configured_target = self.target_batch_size
        target = trusted_target(self._configured_target, trusted, banned)
        if target != self.target_batch_size:
            logger.warning(
                f"Target batch now {target} samples (configured {self._configured_target}): {banned} of the "
                f"{trusted + banned} trainers reporting progress are banned here, their samples never reach our averages"
            )
            self.target_batch_size = target
