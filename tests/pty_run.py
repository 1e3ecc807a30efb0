"""Run a command on a pseudo-terminal, as a volunteer's terminal would, and read back what it drew."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import time
from typing import Sequence

from benchmarks.local_peers import REPO_ROOT

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


def run_on_pty(args: Sequence[str], timeout_s: float = 60.0, columns: int = 120, lines: int = 40) -> tuple[int, str]:
    """Run `args` with a pseudo-terminal as stdin/stdout/stderr (in its own session, killed by PID if it
    overstays); its exit code and everything it drew, raw (ANSI escapes included)."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("DRAGON_NO_PANEL", "NO_COLOR")}
    env.update(TERM="xterm-256color", COLUMNS=str(columns), LINES=str(lines), PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        list(args), stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO_ROOT, start_new_session=True
    )
    os.close(slave)  # only the child holds it now, so reading the master ends (EIO) when the child exits
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every holder of the slave side is gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", errors="replace")


def screen_text(raw: str) -> str:
    return ANSI.sub("", raw).replace("\r", "")
