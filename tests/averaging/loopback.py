"""Real hivemind DHTs on 127.0.0.1 for in-process averaging tests."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import hivemind

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def start_loopback_dhts(count: int, into: list[hivemind.DHT], identities: Sequence[Path] | None = None) -> list[hivemind.DHT]:
    """Start `count` DHTs joined through the first; each is appended to `into` as soon as it runs, so the
    caller's finally-block shuts down whatever started even if a later start fails. `identities`: one identity
    key file per DHT (created if missing), so that the peer ids are those of keys the test can sign with."""
    paths = [str(path) for path in identities] if identities is not None else [None] * count
    first = hivemind.DHT(host_maddrs=LOOPBACK, identity_path=paths[0], start=True)
    into.append(first)
    initial_peers = [str(maddr) for maddr in first.get_visible_maddrs()]
    for path in paths[1:count]:
        into.append(hivemind.DHT(host_maddrs=LOOPBACK, initial_peers=initial_peers, identity_path=path, start=True))
    return into


def shut_down(averagers: Sequence, dhts: Sequence[hivemind.DHT]) -> None:
    """Stop averagers first (they use the DHTs), then the DHTs: every test's finally-block."""
    for averager in averagers:
        averager.shutdown()
    for dht in dhts:
        dht.shutdown()
