"""The robust-averaging policy in one object: how parts are aggregated and when a sender is banned.

:class:`RobustAveragingSettings` is what the averagers (:mod:`.robust_allreduce`) take. Its defaults are the
policy dragon_swarm trainers run with; a swarm config's ``averaging:`` section sets it for a whole swarm through
:meth:`RobustAveragingSettings.from_config`, which is how the trainer and the robustness benchmark build it::

    settings = RobustAveragingSettings.from_config(config.averaging, config.training.target_batch_size)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dragon_swarm.averaging.aggregators import AGGREGATORS, Aggregator, make_aggregator
from dragon_swarm.averaging.reputation import DEFAULT_MAX_BAN_S, ReputationBook

if TYPE_CHECKING:
    from dragon_swarm.config import AveragingSection

__all__ = ["RESULT_DISTANCE_LIMIT", "RobustAveragingSettings"]

RESULT_DISTANCE_LIMIT = 20.0  # see robust_allreduce.RobustAllReduceRunner


@dataclass(frozen=True)
class RobustAveragingSettings:
    """How robust averaging aggregates and when it bans. Checked on construction.

    :param aggregator: one of ``mean``, ``median``, ``trimmed_mean``, ``centered_clip``
      (:data:`~.aggregators.AGGREGATORS`)
    :param tau: CenteredClip radius; see ``aggregators.centered_clip`` for tuning
    :param relative_tau: read tau as a multiple of each part's median distance to the coordinate-wise median
      (scale-free, the default); False reads it in the units of the averaged tensors (L2 norm over one part,
      so it scales with ``part_size_bytes``)
    :param trim_ratio: fraction trimmed from each end by ``trimmed_mean``
    :param max_iters: CenteredClip iteration cap per part
    :param tol: CenteredClip stops when an update is shorter than this (absolute)
    :param max_weight: the ``mean`` aggregator caps each sender's self-reported weight here (hivemind's
      GradientAverager sends its accumulated sample count: set this to the samples an honest peer gathers
      per round, or leave 1 to weigh everyone equally). Robust aggregators ignore weights.
    :param ban_seconds, max_ban_seconds, max_invalid, ban_distance_ratio, min_observations, ema_alpha: the ban policy, see
      :class:`~.reputation.ReputationBook`. The defaults: a sender 5x farther from the robust result than this
      peer, over a whole round's partition, 3 rounds in a row, or with 2 impossible weight claims, is banned for
      300 s; one malformed part (NaN/Inf, wrong size) bans at once. ``max_ban_seconds``: a repeat offender's
      doubled bans stop growing here (24 h)
    :param refuse_banned_peers: refuse banned peers in matchmaking (as leader and as follower)
    :param ignore_banned_reducers: keep local values for the partition of a banned peer that is in our group
      anyway (let in by a leader that has not banned it) instead of taking its aggregate
    :param avoid_banned_groups: a round whose group holds a peer this one bans brings back nothing: we keep our
      local values for every partition (the banned peer's part still reaches us through the reducers that do not
      ban it), while still sending our parts and reducing our partition, without the banned peer's part, for the
      honest members, who would otherwise lose our partition of their round
    :param signed_parts: every received part must carry its sender's signature (`averaging.part_signatures`); a
      part without one is malformed. Rejected non-finite parts become accusations (`averaging.accusations`).
      Every peer of the swarm must then sign (give the averager a ``signer``)
    :param result_distance_limit: refuse aggregates returned farther than this from our own part, in units of our
      scale (see ``RobustAllReduceRunner``); None turns the check off. By default on for the robust
      aggregators and off for ``mean``, which stays the unprotected baseline that benchmarks compare against.
    :param weight_claim_limit: a sender claiming a weight above this (e.g. more samples than an honest peer can
      gather in one round) is lying; each round it does so counts as an invalid part toward a ban. None: off
    """

    aggregator: str = "centered_clip"
    tau: float = 1.0
    relative_tau: bool = True
    trim_ratio: float = 0.2
    max_iters: int = 50
    tol: float = 1e-6
    max_weight: float = 1.0
    ban_seconds: float = 300.0
    max_ban_seconds: float = DEFAULT_MAX_BAN_S
    max_invalid: int = 2
    ban_distance_ratio: float = 5.0
    min_observations: int = 3
    ema_alpha: float = 0.2
    refuse_banned_peers: bool = True
    ignore_banned_reducers: bool = True
    avoid_banned_groups: bool = True
    signed_parts: bool = False
    result_distance_limit: float | None | str = "auto"
    weight_claim_limit: float | None = None

    def __post_init__(self):
        if self.result_distance_limit == "auto":
            limit = None if self.aggregator == "mean" else RESULT_DISTANCE_LIMIT
            object.__setattr__(self, "result_distance_limit", limit)
        if self.weight_claim_limit is not None and not self.weight_claim_limit > 0:
            raise ValueError(f"weight_claim_limit must be > 0 or None, got {self.weight_claim_limit!r}")
        if self.result_distance_limit is not None and not self.result_distance_limit > 0:
            raise ValueError(f"result_distance_limit must be > 0 or None, got {self.result_distance_limit!r}")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {self.aggregator!r}; known: {', '.join(sorted(AGGREGATORS))}")
        self.make_aggregator()
        self.make_reputation_book()

    @classmethod
    def from_config(
        cls, averaging: AveragingSection, target_batch_size: int | None = None, signing: bool = False
    ) -> "RobustAveragingSettings":
        """The settings a swarm config's ``averaging:`` section describes.

        :param target_batch_size: the swarm's ``training.target_batch_size``; the weight-claim limit is
          ``averaging.weight_claim_factor`` times it (hivemind weighs gradients by the samples a peer accumulated
          since the last round: an honest peer never holds more than the target plus a few micro-batches of
          overshoot). None, or a null factor, turns the weight-claim check off.
        :param signing: the caller gives its averager a ``PartSigner``; only then does ``averaging.signed_parts``
          turn ``signed_parts`` on (a peer that demands signatures must sign its own parts)
        """
        factor = averaging.weight_claim_factor
        return cls(
            aggregator=averaging.aggregator,
            tau=averaging.tau,
            relative_tau=averaging.relative_tau,
            trim_ratio=averaging.trim_ratio,
            ban_seconds=averaging.ban_seconds,
            max_ban_seconds=averaging.max_ban_seconds,
            max_invalid=averaging.ban_strikes,
            ban_distance_ratio=averaging.ban_distance_ratio,
            min_observations=averaging.ban_rounds,
            weight_claim_limit=None if target_batch_size is None or factor is None else factor * target_batch_size,
            signed_parts=averaging.signed_parts and signing,
        )

    def make_aggregator(self) -> Aggregator:
        params = {
            "mean": dict(max_weight=self.max_weight),
            "median": {},
            "trimmed_mean": dict(trim_ratio=self.trim_ratio),
            "centered_clip": dict(tau=self.tau, max_iters=self.max_iters, tol=self.tol, relative_tau=self.relative_tau),
        }.get(self.aggregator, {})
        return make_aggregator(self.aggregator, **params)

    def make_reputation_book(self) -> ReputationBook:
        return ReputationBook(
            ban_seconds=self.ban_seconds,
            max_ban_seconds=self.max_ban_seconds,
            max_invalid=self.max_invalid,
            ban_distance_ratio=self.ban_distance_ratio,
            min_observations=self.min_observations,
            ema_alpha=self.ema_alpha,
        )
