"""Real peers through the command line leave nothing behind: after one Ctrl-C or two, every process the peer
started (the DHT process and its p2pd, averagers, expert connection handlers and task pools) is gone, checked by
PID; a second peer on a state dir in use is refused at once with one line; a failed start writes nothing.

Every process is started in its own session and, whatever happens, stopped by PID in a finalizer (each process
the peer was ever seen to have, if it is still that process, then the peer's process group).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.local_peers import PeerProcess
from dragon_swarm.node.processes import ProcessInfo, descendant_pids, is_alive, process_info
from dragon_swarm.node.state_dir import directory_listing
from tests.swarm.paths import TEST_CONFIG

pytestmark = [pytest.mark.swarm, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux only")]

TRAINING = re.compile(r"micro-batch \d+ epoch \d+ loss")  # the trainer's per-step log line
JOINED = "To join this swarm"
# a well-formed peer id nobody listens for on 127.0.0.1:9 (the discard port)
UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"


class CliPeer(PeerProcess):
    """`python -m dragon_swarm.peer ARGS` in its own session; remembers every descendant it was seen with."""

    def __init__(self, log_dir: Path, name: str, args: list[str]):
        super().__init__(name, args, log_dir)
        self.started = time.monotonic()
        self.seen: dict[int, ProcessInfo] = {}

    def record(self) -> None:
        if self.proc.poll() is not None:
            return
        for pid in descendant_pids(self.pid):
            info = process_info(pid)
            seen = self.seen.get(pid)
            # a process caught between fork and exec still shows its parent's name: take the newer look at it
            if info is not None and (seen is None or seen.starttime != info.starttime or seen.comm != info.comm):
                self.seen[pid] = info

    def wait_until(self, done, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            self.record()
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} before {what}:\n{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {what} in {timeout:.0f} s:\n{self.stderr()[-3000:]}")
            time.sleep(0.2)
        self.record()

    def wait_training(self, timeout: float = 150.0) -> None:
        """Joined, hosting and training: every kind of helper process has been forked by now."""
        self.wait_until(lambda: JOINED in self.stdout(), "join line", timeout)
        self.wait_until(lambda: TRAINING.search(self.stderr()) is not None, "training step", timeout)
        time.sleep(1.0)
        self.record()

    def ctrl_c(self, times: int, gap_s: float = 0.3) -> None:
        """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group, children included."""
        for i in range(times):
            if i:
                time.sleep(gap_s)
            try:
                os.killpg(self.pid, signal.SIGINT)
            except ProcessLookupError:
                break

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.record()  # anything forked during shutdown counts too
            time.sleep(0.1)
        code = self.proc.poll()
        if code is None:
            raise AssertionError(f"{self.name} still running {timeout:.0f} s later:\n{self.stderr()[-3000:]}")
        return code

    def alive(self) -> list[int]:
        return [pid for pid, info in self.seen.items() if is_alive(pid, info.starttime)]

    def describe(self, pids: list[int]) -> str:
        return ", ".join(f"{pid} ({self.seen[pid].comm}, parent {self.seen[pid].ppid})" for pid in pids)

    def kill_everything(self) -> None:
        for pid, info in self.seen.items():
            if is_alive(pid, info.starttime):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def cli_peers(tmp_path):
    started: list[CliPeer] = []

    def start(name: str, *args: str) -> CliPeer:
        peer = CliPeer(tmp_path, name, list(args))
        started.append(peer)
        return peer

    try:
        yield start
    finally:
        for peer in reversed(started):
            peer.kill_everything()


def new_swarm_args(state_dir: Path) -> list[str]:
    return ["--new-swarm", "-c", str(TEST_CONFIG), "--no-panel", "--state-dir", str(state_dir)]


@pytest.mark.parametrize("signals", [1, 2], ids=["ctrl-c-once", "ctrl-c-twice"])
def test_ctrl_c_leaves_no_process_behind(cli_peers, tmp_path, signals):
    peer = cli_peers("peer", *new_swarm_args(tmp_path / "state"))
    peer.wait_training()
    children = sorted(peer.seen)
    comms = sorted(info.comm for info in peer.seen.values())
    assert "p2pd" in comms and len(children) >= 3, f"unexpected process tree: {peer.describe(children)}"

    peer.ctrl_c(signals)
    code = peer.wait_exit(timeout=150.0 if signals == 1 else 30.0)
    if signals == 1:
        assert code == 0, peer.stderr()[-3000:]
    else:
        assert code == 128 + signal.SIGINT, peer.stderr()[-3000:]
    deadline = time.monotonic() + 3.0
    while peer.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = peer.alive()
    assert not left, f"alive after the peer exited ({len(left)} of {len(peer.seen)}): {peer.describe(left)}"
    assert not (tmp_path / "state" / "peer.lock").exists() or signals == 2  # a clean exit removes its lock file


def test_second_peer_on_a_state_dir_in_use_is_refused_at_once(cli_peers, tmp_path):
    state = tmp_path / "state"
    first = cli_peers("first", *new_swarm_args(state))
    first.wait_until(lambda: JOINED in first.stdout(), "join line", 150.0)
    before = directory_listing(state)

    second = cli_peers("second", *new_swarm_args(state))
    code = second.wait_exit(timeout=30.0)
    took = time.monotonic() - second.started
    lines = [line for line in second.stderr().splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1, second.stderr()
    assert str(state) in lines[0] and "in use" in lines[0] and str(first.pid) in lines[0], lines[0]
    assert "Traceback" not in second.stderr()
    assert took < 20.0, f"refused only after {took:.1f} s"
    assert not second.seen, f"the refused peer started processes: {second.describe(sorted(second.seen))}"
    assert first.proc.poll() is None, "the running peer was disturbed"
    after = directory_listing(state)
    assert after is not None and after.get("peer.lock") == before.get("peer.lock")  # its lock file untouched


@pytest.mark.parametrize(
    "failure, state_before",
    [("malformed", "absent"), ("unreachable", "absent"), ("unreachable", "existing"), ("dashboard-taken", "existing")],
    ids=["malformed-new-dir", "unreachable-new-dir", "unreachable-existing-dir", "dashboard-taken-existing-dir"],
)
def test_failed_start_writes_nothing(cli_peers, tmp_path, failure, state_before):
    state = tmp_path / "dragon-state" / "dragon-test"
    if state_before == "existing":
        state.mkdir(parents=True)
        (state / "contributions.json").write_text('{"note": "from an earlier run"}')
        (state / "notes.txt").write_text("kept")
    before = directory_listing(tmp_path)
    common = ["-c", str(TEST_CONFIG), "--no-panel", "--state-dir", str(state)]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if failure == "dashboard-taken":
            args = ["--new-swarm", "--dashboard", str(taken.getsockname()[1]), *common]
        else:
            args = ["--initial-peers", "/ip4/127.0.0.1/tcp/notaport" if failure == "malformed" else UNREACHABLE, *common]
        peer = cli_peers("peer", *args)
        code = peer.wait_exit(timeout=120.0)
    took = time.monotonic() - peer.started
    assert code != 0
    assert "error" in peer.stderr() and "Traceback" not in peer.stderr(), peer.stderr()[-3000:]
    logs = {"peer.out", "peer.err"}
    after = {path: entry for path, entry in directory_listing(tmp_path).items() if path not in logs}
    before = {path: entry for path, entry in before.items() if path not in logs}
    assert after == before, f"failed start ({took:.1f} s) changed the state dir:\n{peer.stderr()[-2000:]}"
    left = peer.alive()
    assert not left, f"alive after a failed start: {peer.describe(left)}"


def test_a_peer_killed_outright_takes_its_children_along(cli_peers, tmp_path):
    """SIGKILL to the peer's main process alone (the OOM killer, `kill -9 PID`): nothing of it may run on, holding
    its port, its peer id and its state dir. Forked children get a parent-death signal; the DHT process stops
    its p2pd before it goes."""
    peer = cli_peers("peer", *new_swarm_args(tmp_path / "state"))
    peer.wait_training()
    os.kill(peer.pid, signal.SIGKILL)
    assert peer.wait_exit(timeout=10.0) == -signal.SIGKILL
    deadline = time.monotonic() + 10.0
    while peer.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = peer.alive()
    assert not left, f"alive after the peer was killed ({len(left)} of {len(peer.seen)}): {peer.describe(left)}"
