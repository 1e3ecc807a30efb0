"""Launch real peers (`python -m dragon_swarm.peer` / `.bootstrap`) on this machine as subprocesses and always
reap them: used by the swarm tests and the benchmarks.

Each peer runs in its own session, so stopping it by its PID's process group also stops the DHT process,
p2pd and connection handlers it forked; nothing is ever killed by name.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_PEER_ID = re.compile(r"peer id (Qm\w+)")
_MADDR = re.compile(r"--initial-peers ((?:/\S+ ?)+)")


class PeerProcess:
    def __init__(self, name: str, args: list[str], log_dir: Path, module: str = "dragon_swarm.peer"):
        self.name = name
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env=env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def initial_peers(self, timeout: float = 90.0) -> list[str]:
        """The multiaddrs this peer printed in its `--initial-peers` line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _MADDR.search(self.stdout())
            if match:
                return match.group(1).split()
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} printed no --initial-peers line in {timeout} s:\n{self.stderr()[-3000:]}")

    def peer_id(self, timeout: float = 120.0) -> str:
        """The peer id this peer logged at start (`... peer id Qm...`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _PEER_ID.search(self.stderr())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} logged no peer id in {timeout} s")

    def wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stderr():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before logging {text!r}:\n{self.stderr()[-3000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} did not log {text!r} in {timeout} s:\n{self.stderr()[-3000:]}")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill_hard(self) -> None:
        """SIGKILL the whole process group: what a crashed or unplugged machine looks like to the swarm."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM to the peer's main process (graceful: finish the step, save, stop its helpers, leave), then
        SIGKILL the whole group if anything lingers. Like systemd's KillMode=mixed: the helpers are the
        parent's to stop."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        code = self.proc.poll()
        try:  # leftovers of the group (DHT process, p2pd) go too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)
        return code


def read_stats(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return records


def wait_for_stats(path: Path, predicate, timeout: float, processes: list[PeerProcess]) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_stats(path)
        if records and predicate(records):
            return records
        for p in processes:
            if p.proc.poll() is not None and p.proc.returncode != 0:
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{p.stderr()[-3000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"stats in {path} did not reach the expected state in {timeout} s; last: {read_stats(path)[-1:]}")


class PeerLauncher:
    """Starts peers for one test and stops every one of them at teardown, also when the test fails."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.processes: list[PeerProcess] = []

    def start(self, name: str, args: list[str], module: str = "dragon_swarm.peer") -> PeerProcess:
        process = PeerProcess(name, args, self.log_dir, module)
        self.processes.append(process)
        return process

    def bootstrap(self, name: str = "bootstrap", *extra: str) -> PeerProcess:
        return self.start(name, ["--identity", str(self.log_dir / f"{name}.key"), *extra], module="dragon_swarm.bootstrap")

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop(timeout=20)


def stop_peers_on_sigterm() -> None:
    """For a benchmark's main: SIGTERM (a `timeout`, a supervisor) becomes SystemExit, so its `finally:
    launcher.stop_all()` stops the peers it started instead of leaving them running. Tests have fixtures for this."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)
