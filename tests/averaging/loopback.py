"""Real hivemind DHTs on 127.0.0.1 for in-process averaging tests."""

from __future__ import annotations

import hivemind

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def start_loopback_dhts(count: int, into: list[hivemind.DHT]) -> list[hivemind.DHT]:
    """Start `count` DHTs joined through the first; each is appended to `into` as soon as it runs, so the
    caller's finally-block shuts down whatever started even if a later start fails."""
    first = hivemind.DHT(host_maddrs=LOOPBACK, start=True)
    into.append(first)
    initial_peers = [str(maddr) for maddr in first.get_visible_maddrs()]
    for _ in range(count - 1):
        into.append(hivemind.DHT(host_maddrs=LOOPBACK, initial_peers=initial_peers, start=True))
    return into
