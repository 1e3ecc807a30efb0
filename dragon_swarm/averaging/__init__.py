"""Averaging: Byzantine-robust aggregation math and numpy-2 compatible compression codecs for hivemind's all-reduce.

* :mod:`.aggregators` — pure functions ``[n, d] stack -> AggregationResult`` (mean, median, trimmed mean,
  CenteredClip) and :func:`validate_part`; no network, no hivemind.
* :mod:`.compression` — fp16 and 8-bit codecs in hivemind's wire format; call :func:`install_codecs` in
  every peer before starting averagers.
* :mod:`.reputation` — per-sender records (invalid parts, distance from the robust result) and local bans; pure.
* :mod:`.settings` — :class:`RobustAveragingSettings`, the aggregation and ban policy (built from a config's
  ``averaging:`` section by ``RobustAveragingSettings.from_config``).
* :mod:`.robust_reducer` — hivemind ``TensorPartReducer`` that validates parts and aggregates them robustly.
* :mod:`.robust_allreduce` — averagers (plain and gradient, for hivemind.Optimizer) that use that reducer and
  refuse banned peers in matchmaking.
"""

from dragon_swarm.averaging.aggregators import (
    AGGREGATORS,
    AggregationResult,
    Aggregator,
    centered_clip,
    make_aggregator,
    mean,
    median,
    trimmed_mean,
    validate_part,
)
from dragon_swarm.averaging.compression import (
    CODECS,
    Blockwise8BitCodec,
    Quantile8BitCodec,
    Uniform8BitCodec,
    install_codecs,
    make_compression,
)
from dragon_swarm.averaging.reputation import ReputationBook, SenderRecord
from dragon_swarm.averaging.robust_allreduce import (
    RobustAllReduceRunner,
    RobustDecentralizedAverager,
    RobustGradientAverager,
    make_grad_averager_factory,
)
from dragon_swarm.averaging.robust_reducer import PartReport, RejectedPartError, RobustTensorPartReducer
from dragon_swarm.averaging.settings import RobustAveragingSettings
