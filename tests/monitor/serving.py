"""A dashboard served on a free loopback port for the length of a `with` block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dragon_swarm.events import EventBus, PauseGate, PauseRequested
from dragon_swarm.monitor.dashboard import Dashboard
from dragon_swarm.monitor.status import PeerStatus


def wired_gate(status: PeerStatus) -> PauseGate:
    """A gate whose Start/Stop reaches the status board through the bus, as the volunteer session wires it."""
    bus = EventBus()
    bus.subscribe(lambda event: status.set_paused(event.paused), PauseRequested)
    return PauseGate(bus)


@contextmanager
def serving(status: PeerStatus, gate: PauseGate | None) -> Iterator[Dashboard]:
    """`gate=None` serves it read-only, as a bootstrap monitor does; always shut down on exit."""
    dashboard = Dashboard(status, gate)
    dashboard.start()
    try:
        yield dashboard
    finally:
        dashboard.shutdown()
