"""A dashboard served on a free loopback port for the length of a `with` block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dragon_swarm.monitor.dashboard import Dashboard
from dragon_swarm.monitor.status import PeerStatus, TrainingSwitch


@contextmanager
def serving(status: PeerStatus, switch: TrainingSwitch | None) -> Iterator[Dashboard]:
    """`switch=None` serves it read-only, as a bootstrap monitor does; always shut down on exit."""
    dashboard = Dashboard(status, switch)
    dashboard.start()
    try:
        yield dashboard
    finally:
        dashboard.shutdown()
