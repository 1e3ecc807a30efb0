"""No process a peer starts outlives it: find its descendants through /proc, stop them by PID (SIGTERM, a bounded
wait, then SIGKILL) and keep orphaned grandchildren findable. (A peer that dies outright: `parent_death`.)

What runs under a peer (hivemind 1.1.12; a trainer+host of dragon-test: 23 processes), and why each piece is here:

* forked `multiprocessing` children (daemon=True): the `hivemind.DHT` process, two `DecentralizedAverager`s
  (the optimizer's state and gradient averagers), the expert `ConnectionHandler`s (2) and `TaskPool`s (forward and
  backward per expert: 16, forked from hivemind's Runtime *thread*); the DHT process starts the only `p2pd` (Go,
  exec'd through asyncio, so no Python fork hook runs in it), which everybody else reaches by `replicate_p2p()`;
  and `torch_shm_manager`, exec'd by torch in the peer for tensors shared with those children.
* Daemon children are only terminated by multiprocessing's atexit hook, which `os._exit` skips, and the peer
  always ends with `os._exit` (cli.run_and_exit, the second signal, the shutdown watchdog). Forked children ignore
  SIGINT (cli.StopSignal; hivemind's DHT and averagers set SIG_IGN themselves), so Ctrl-C never stops them:
  whatever hivemind's own shutdown did not stop ran on (and p2pd with a live DHT process) -> `stop_descendants`
  at exit, `exit_now` for the second signal.
* A peer killed outright (SIGKILL, OOM) runs no exit code at all -> `parent_death.install_parent_death_signal`.
* A child forked while the peer serves (a placement change forks new handlers and task pools) would hold copies of
  the peer's open streams, which then end for the caller only when that child exits ->
  `inherited_sockets.install_inherited_socket_drop`.
* p2pd is the DHT process's child. If that process dies first, p2pd is orphaned and re-parented to init, out of
  the peer's tree. (This p2pd was seen to exit by itself within half a second once its DHT process died, but
  nothing guarantees it.) `become_subreaper()` re-parents such orphans to the peer, where `descendant_pids()`
  still sees them, and `die_with_descendants` lets a forked child on SIGTERM stop its own children first.

Nothing is ever looked up or killed by name; a PID is only signalled after checking (through its start time and a
pidfd) that it is still the process that was found as a descendant, so a reused PID is never hit.
Linux only; elsewhere these functions do nothing (become_subreaper() is False, descendant_pids() is []).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import NoReturn

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

_LINUX = sys.platform.startswith("linux")
_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and _LINUX:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
    return _libc


def _prctl(option: int, arg2: int | ctypes.c_void_p = 0) -> bool:
    if _load_libc() is None:
        return False
    try:
        arg = arg2 if isinstance(arg2, ctypes.c_void_p) else ctypes.c_ulong(arg2)
        return _libc.prctl(ctypes.c_int(option), arg, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False


# --- finding processes ---


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    state: str  # R, S, D, T, Z (zombie: dead, waiting to be reaped by its parent), X, ...
    starttime: int  # clock ticks since boot; (pid, starttime) names one process even when PIDs are reused
    comm: str


def process_info(pid: int) -> ProcessInfo | None:
    """What /proc/PID/stat says, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:  # comm is in parentheses and may itself contain spaces and parentheses: split at the last ')'
        left, right = data.index(b"("), data.rindex(b")")
        fields = data[right + 2 :].split()
        return ProcessInfo(pid, int(fields[1]), fields[0].decode(), int(fields[19]), data[left + 1 : right].decode(errors="replace"))
    except (ValueError, IndexError):
        return None


def process_table() -> dict[int, ProcessInfo]:
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            info = process_info(int(name))
            if info is not None:
                table[info.pid] = info
    return table


def _descendants(table: dict[int, ProcessInfo], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found, frontier = [], [root]
    while frontier:
        kids = sorted(k for parent in frontier for k in children.get(parent, ()) if k != root)
        found.extend(kids)
        frontier = kids
    return found


def descendant_pids(root: int | None = None) -> list[int]:
    """Every process below `root` (default: this one) by parent links, parents before their children.
    Zombies are included (they still hold their PID until reaped)."""
    return _descendants(process_table(), os.getpid() if root is None else root)


def is_alive(pid: int, starttime: int | None = None) -> bool:
    """True while the process runs: False once it is gone or a zombie, or when `pid` now names another process
    than the one that started at `starttime` (from `process_info`)."""
    info = process_info(pid)
    if info is None or info.state in ("Z", "X", "x"):
        return False
    return starttime is None or info.starttime == starttime


# --- orphans re-parent to the peer ---


def become_subreaper() -> bool:
    """PR_SET_CHILD_SUBREAPER: descendants orphaned by a dying child (p2pd when the DHT process dies) re-parent to
    this process rather than to init, so they stay findable by `descendant_pids()` and stoppable at exit.
    The flag is not inherited by forked children. Returns False where unsupported."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def is_subreaper() -> bool:
    value = ctypes.c_int(0)
    return _prctl(PR_GET_CHILD_SUBREAPER, ctypes.cast(ctypes.pointer(value), ctypes.c_void_p)) and value.value != 0


# --- stopping them ---


class _Target:
    __slots__ = ("pid", "starttime", "comm", "pidfd")

    def __init__(self, info: ProcessInfo):
        self.pid, self.starttime, self.comm = info.pid, info.starttime, info.comm
        self.pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                fd = os.pidfd_open(info.pid)
            except OSError:
                fd = None
            if fd is not None:
                again = process_info(info.pid)  # still the same process now that the pidfd pins it?
                if again is not None and again.starttime == info.starttime:
                    self.pidfd = fd
                else:
                    os.close(fd)

    def alive(self) -> bool:
        return is_alive(self.pid, self.starttime)

    def signal(self, sig: int) -> None:
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            elif is_alive(self.pid, self.starttime):  # no pidfd: the start time check is the best there is
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        except OSError:
            pass

    def close(self) -> None:
        if self.pidfd is not None:
            try:
                os.close(self.pidfd)
            except OSError:
                pass
            self.pidfd = None


def _reap(me: int, pids: set[int]) -> None:
    """Collect those of `pids` that are dead children of ours, so that they do not stay as zombies holding their
    PIDs. multiprocessing's children first, through multiprocessing, so that their Process objects learn their
    exit code; then the rest (orphans re-parented to a subreaper, plain forks). Children of ours that are not in
    `pids` are left to whoever waits for them."""
    mp_process = sys.modules.get("multiprocessing.process")
    if mp_process is not None:
        try:
            mp_process.active_children()
        except Exception:  # noqa: BLE001 - reaping is best effort
            pass
    for pid in pids:
        info = process_info(pid)
        if info is not None and info.ppid == me and info.state == "Z":
            try:
                os.waitpid(info.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            except OSError:
                pass


class _Sweep:
    """One `stop_descendants` call: the processes found under `root` so far, each pinned by its start time."""

    def __init__(self, root: int, poll_s: float):
        self.me, self.root, self.poll_s = os.getpid(), root, poll_s
        self.targets: dict[int, _Target] = {}
        self.zombies: set[int] = set()

    def collect(self, sig: int) -> int:
        """Find descendants not seen yet and send them `sig`; returns how many were new."""
        table = process_table()
        new = 0
        for pid in _descendants(table, self.root):
            info = table[pid]
            if pid == self.me:
                continue
            if info.state in ("Z", "X", "x"):
                self.zombies.add(pid)  # already dead; reaped below if it is our child
                continue
            known = self.targets.get(pid)
            if known is not None and known.starttime == info.starttime:
                continue
            if known is not None:
                known.close()
            target = self.targets[pid] = _Target(info)
            target.signal(sig)
            if sig != signal.SIGKILL and info.state in ("T", "t"):
                target.signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
            new += 1
        return new

    def wait(self, seconds: float, sig: int) -> list[_Target]:
        """Until all are gone (late newcomers get `sig` too) or `seconds` passed; returns those still alive."""
        deadline = time.monotonic() + seconds
        while True:
            self.reap()
            new = self.collect(sig)
            alive = [t for t in self.targets.values() if t.alive()]
            if (not alive and not new) or time.monotonic() >= deadline:
                return alive
            time.sleep(self.poll_s)

    def reap(self) -> None:
        _reap(self.me, self.zombies | set(self.targets))

    def close(self) -> None:
        for target in self.targets.values():
            target.close()


def stop_descendants(
    grace_s: float = 5.0, *, kill_wait_s: float = 2.0, root: int | None = None, poll_s: float = 0.05, log: bool = True
) -> list[int]:
    """Stop every descendant of `root` (default: this process), by PID, never this process itself: SIGTERM to all
    of them, wait up to `grace_s` for them to go, SIGKILL what is left and wait up to `kill_wait_s` more.
    Processes that appear meanwhile (late forks, orphans re-parented to a subreaper) are stopped too. Returns the
    PIDs that had to be SIGKILLed (empty when all went on SIGTERM).

    Those of them that are children of this process are reaped (zombies too): `multiprocessing` children through
    multiprocessing, so their Process objects report the exit code; a `subprocess.Popen` whose child was reaped
    here reads ECHILD on wait() (returncode 0). So call it when the peer is done with its children: after the
    graceful shutdown, or instead of it. Bounded: returns after about grace_s + kill_wait_s at most (a process in
    uninterruptible sleep may outlive it)."""
    if not _LINUX:
        return []
    sweep = _Sweep(os.getpid() if root is None else root, poll_s)
    killed: list[int] = []
    try:
        sweep.collect(signal.SIGTERM)
        left = sweep.wait(grace_s, signal.SIGTERM) if sweep.targets else []
        if left:
            for target in left:
                target.signal(signal.SIGKILL)
            killed = [t.pid for t in left]
            if log:
                names = ", ".join(f"{t.pid} ({t.comm})" for t in left)
                logger.warning(f"Killed {len(left)} process(es) that did not stop within {grace_s:g} s of SIGTERM: {names}")
            before = set(sweep.targets)
            still = sweep.wait(kill_wait_s, signal.SIGKILL)
            killed += [pid for pid in sweep.targets if pid not in before]  # appeared late: went straight to SIGKILL
            if still and log:
                logger.error(f"Processes still alive after SIGKILL: {', '.join(str(t.pid) for t in still)}")
        sweep.reap()
    finally:
        sweep.close()
    return killed


def exit_now(code: int, grace_s: float = 1.0) -> NoReturn:
    """Leave at once but take every descendant along: for the second Ctrl-C and the shutdown watchdog, in place of
    a bare `os._exit(code)`. Further SIGINT/SIGTERM are ignored while descendants are stopped (a few seconds at
    most: `grace_s` of SIGTERM, then SIGKILL). Safe to call from a signal handler or from any thread."""
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        stop_descendants(grace_s=grace_s, kill_wait_s=1.0)
    except BaseException:  # noqa: BLE001 - whatever happens, exit
        pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def die_with_descendants(signum: int) -> NoReturn:
    """For a forked child's SIGTERM handler (cli.StopSignal in a child): stop what this child started (the DHT
    child's p2pd), then die of `signum` with its default action, as if there had been no handler."""
    try:
        stop_descendants(grace_s=0.5, kill_wait_s=0.5, log=False)
    finally:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        time.sleep(1.0)
        os._exit(128 + signum)


__all__ = [
    "ProcessInfo",
    "become_subreaper",
    "descendant_pids",
    "die_with_descendants",
    "exit_now",
    "is_alive",
    "is_subreaper",
    "process_info",
    "process_table",
    "stop_descendants",
]
