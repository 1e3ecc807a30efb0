"""Shut down what an in-process swarm fixture started, last first, even when one shutdown fails."""

from __future__ import annotations

from contextlib import contextmanager, suppress
from typing import Callable, Iterator


@contextmanager
def shutdowns() -> Iterator[Callable[[Callable[[], object]], None]]:
    """`with shutdowns() as later: ...; later(dht.shutdown)`: every registered shutdown runs at exit, in reverse."""
    stack: list[Callable[[], object]] = []
    try:
        yield stack.append
    finally:
        for shutdown in reversed(stack):
            with suppress(Exception):
                shutdown()
