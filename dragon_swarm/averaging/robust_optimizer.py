"""hivemind.Optimizer whose gradient AND state averaging both go through the robust reducer.

Stock hivemind.Optimizer also averages parameters with peers every `average_state_every` epochs, with a plain
mean: one Byzantine peer could poison every honest model through that path even when gradient averaging is
robust. Here the state averager uses the same robust all-reduce, validation and bans.
"""

from __future__ import annotations

from typing import Optional

import hivemind
from hivemind.optim.state_averager import TrainingStateAverager

from dragon_swarm.averaging.reputation import ReputationBook
from dragon_swarm.averaging.robust_allreduce import (
    RobustAveragingSettings,
    _RobustAveragerMixin,
    make_grad_averager_factory,
)


class RobustTrainingStateAverager(_RobustAveragerMixin, TrainingStateAverager):
    """``TrainingStateAverager`` with robust all-reduce and local bans."""

    def __init__(self, *, settings: RobustAveragingSettings, reputation: Optional[ReputationBook] = None, **kwargs):
        self._init_robust(settings, reputation)
        super().__init__(**kwargs)


class RobustOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer with robust gradient and state averaging (`robust` picks the aggregator)."""

    def __init__(self, *, robust: RobustAveragingSettings, **kwargs):
        self._robust_settings = robust  # read by _make_state_averager, which the base __init__ calls
        kwargs.setdefault("grad_averager_factory", make_grad_averager_factory(robust))
        super().__init__(**kwargs)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        # the same arguments hivemind.Optimizer passes to its stock TrainingStateAverager
        return RobustTrainingStateAverager(
            settings=self._robust_settings,
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )
