"""Forked children follow the peer when it dies, for whatever reason (SIGKILL and the OOM killer included).

See `install_parent_death_signal`; the rest of process hygiene (finding and stopping descendants) is
`dragon_swarm.node.processes`.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from dragon_swarm.node.processes import _LINUX, PR_SET_PDEATHSIG, _load_libc, _prctl

__all__ = ["install_parent_death_signal"]

_death_signal: int | None = None
_forked_from_main: dict[int, tuple[int, bool]] = {}  # forking thread id -> (parent pid, forked from the main thread)


def _before_fork() -> None:
    _forked_from_main[threading.get_ident()] = (os.getpid(), threading.current_thread() is threading.main_thread())


def _after_fork_in_parent() -> None:
    _forked_from_main.pop(threading.get_ident(), None)


def _after_fork_in_child() -> None:
    sig = _death_signal
    parent, from_main = _forked_from_main.pop(threading.get_ident(), (None, False))
    _forked_from_main.clear()
    if sig is None or parent is None:
        return
    if from_main and _prctl(PR_SET_PDEATHSIG, sig):
        if os.getppid() != parent:  # the parent died between fork and prctl: the signal was never going to come
            os.kill(os.getpid(), sig)
        return
    # Forked from another thread: PR_SET_PDEATHSIG fires when the forking *thread* exits, even though the parent
    # process lives on, so it would kill this child too early. Watch the parent process instead.
    _watch_parent(parent, sig)


def _watch_parent(parent: int, sig: int, period_s: float = 1.0) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period_s)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="parent-death-watch", daemon=True).start()


def install_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Every process forked (os.fork, multiprocessing) from now on, by this process or by its forked children,
    receives `sig` when the process that forked it dies, for whatever reason (SIGKILL included).

    A child forked from the main thread gets PR_SET_PDEATHSIG. That is safe there only: the kernel sends the
    signal when the parent *thread* that forked exits (even if the process lives on), and in CPython the main
    thread lives exactly as long as the process. A child forked from any other thread (hivemind's Runtime thread
    starts its TaskPools) gets a small daemon thread that polls getppid() once a second instead.
    Exec'd programs started through subprocess/asyncio (p2pd) run no Python fork hooks: `die_with_descendants`
    in the forked parent's SIGTERM handler and `stop_descendants` in the peer take care of them.
    Idempotent; the last `sig` wins. Returns False where unsupported."""
    global _death_signal
    if not _LINUX or not hasattr(os, "register_at_fork"):
        return False
    _load_libc()  # now: a child must not dlopen between fork and prctl
    if _death_signal is None:
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
    _death_signal = int(sig)
    return True
