"""Small real process trees for the tests in tests/node: each helper script is a separate Python process that
forks children on request and prints JSON lines; nothing is ever killed by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from dragon_swarm.node.processes import is_alive, process_info

REPO_ROOT = Path(__file__).resolve().parents[2]

# Forks a child that forks a grandchild; both ignore SIGINT and SIGTERM unless told otherwise. Prints
# {"child": pid, "grandchild": pid} once both run.
PRELUDE = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    from dragon_swarm.node import parent_death as D, processes as P

    def stubborn():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def tree(ignore=True, child_exits=False):
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            if ignore:
                stubborn()
            grandchild = os.fork()
            if grandchild == 0:
                if ignore:
                    stubborn()
                while True:
                    time.sleep(1)
            os.write(w, f"{grandchild}\\n".encode())
            if child_exits:
                os._exit(0)
            while True:
                time.sleep(1)
        grandchild = int(os.read(r, 64).decode())
        os.close(r), os.close(w)
        return child, grandchild

    def say(**kw):
        sys.stdout.write(json.dumps(kw) + "\\n")
        sys.stdout.flush()
    """
)


class Helper:
    """A helper script run as its own process (in its own session, stopped by PID at the end)."""

    def __init__(self, body: str):
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        self.seen: dict[int, int] = {}  # pid -> start time of every process the helper reported

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self, timeout: float = 20.0) -> dict:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"helper said nothing in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"helper exited ({self.proc.wait()}): {self.proc.stderr.read()}")
        message = json.loads(line)
        for value in message.values():
            for pid in value if isinstance(value, list) else [value]:
                if isinstance(pid, int) and pid > 1 and pid not in self.seen:
                    info = process_info(pid)
                    if info is not None:
                        self.seen[pid] = info.starttime
        return message

    def alive(self, pids) -> list[int]:
        return [pid for pid in pids if is_alive(pid, self.seen.get(pid))]

    def wait_gone(self, pids, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            left = self.alive(pids)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)

    def cleanup(self) -> None:
        """SIGKILL every process the helper reported that is still the same process, then the helper."""
        for pid, start in self.seen.items():
            if is_alive(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
