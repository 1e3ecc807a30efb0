"""dragon_swarm.node.state_dir: one peer per state dir (held by another process: refused at once with one line
naming the dir and the PID), and a start-up that fails leaves the state dir as it was."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from dragon_swarm.node.state_dir import LOCK_FILE, StartupGuard, StateDirBusy, StateDirLock, directory_listing
from tests.node.helpers import Helper


@pytest.fixture
def holder():
    """Another process holding the lock on a state dir (its forked child shares the lock, like hivemind's)."""
    started: list[Helper] = []

    def start(state_dir: Path, fork_child: bool = False) -> Helper:
        h = Helper(
            f"""
            from pathlib import Path
            from dragon_swarm.node.state_dir import StateDirLock
            lock = StateDirLock(Path({str(state_dir)!r})).acquire()
            child = None
            if {fork_child!r}:
                child = os.fork()
                if child == 0:
                    while True:
                        time.sleep(1)
            say(locked=True, child=child)
            while True:
                time.sleep(0.1)
            """
        )
        started.append(h)
        h.read()
        return h

    try:
        yield start
    finally:
        for h in started:
            h.cleanup()


def test_lock_is_exclusive_and_names_the_dir_and_pid(tmp_path, holder):
    state = tmp_path / "dragon-state" / "dragon-tiny"
    h = holder(state)
    t0 = time.monotonic()
    with pytest.raises(StateDirBusy) as e:
        StateDirLock(state).acquire()
    assert time.monotonic() - t0 < 1.0  # refused at once, not after waiting
    message = str(e.value)
    assert "\n" not in message
    assert message == f"state dir {state} is in use by another peer (PID {h.pid}); stop it or pass another --state-dir"
    assert e.value.pid == h.pid
    assert (state / LOCK_FILE).read_text().strip() == str(h.pid)  # the refused peer did not touch it


def test_lock_held_by_leftovers_of_a_dead_peer_names_them(tmp_path, holder):
    """A peer that died while a forked child lived on (the old DHT process): the dir is still taken, by that child."""
    state = tmp_path / "state"
    h = holder(state, fork_child=True)
    child = [pid for pid in h.seen if pid != h.pid]
    assert len(child) == 1
    os.kill(h.pid, signal.SIGKILL)
    h.proc.wait(timeout=10)
    with pytest.raises(StateDirBusy) as e:
        StateDirLock(state).acquire()
    assert e.value.holders == child
    assert f"processes left over of a peer that has exited (PID {h.pid}): PID {child[0]}" in str(e.value)


def test_lock_is_free_again_after_the_holder_dies_or_releases(tmp_path, holder):
    state = tmp_path / "state"
    h = holder(state)
    os.kill(h.pid, signal.SIGKILL)  # a crash: the file stays, the lock goes with the process
    h.proc.wait(timeout=10)
    assert (state / LOCK_FILE).exists()
    lock = StateDirLock(state).acquire()
    assert lock.held and (state / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    lock.release()
    assert not (state / LOCK_FILE).exists()  # a clean exit leaves no lock file
    lock.release()  # idempotent
    with StateDirLock(state) as again:
        assert again.held


def test_lock_in_this_process_twice_is_refused(tmp_path):
    with StateDirLock(tmp_path / "s"):
        with pytest.raises(StateDirBusy):
            StateDirLock(tmp_path / "s").acquire()  # another open file: flock conflicts even within one process


def test_a_forked_child_never_releases_the_parents_lock(tmp_path):
    state = tmp_path / "state"
    lock = StateDirLock(state).acquire()
    try:
        pid = os.fork()
        if pid == 0:
            lock.release()  # must do nothing here
            os._exit(0)
        os.waitpid(pid, 0)
        assert (state / LOCK_FILE).exists()
        with pytest.raises(StateDirBusy):
            StateDirLock(state).acquire()
    finally:
        lock.release()


class StartFailed(Exception):
    pass


def _failing_start(state: Path, identity: Path | None = None) -> None:
    """What a start-up that fails after writing looks like: the identity key hivemind generates, counters, a subdir."""
    identity = identity or state / "identity.key"
    identity.parent.mkdir(parents=True, exist_ok=True)
    identity.write_bytes(b"new key")
    (state / "contributions.json").write_text('{"batches": 0}')
    (state / "experts").mkdir(exist_ok=True)
    (state / "experts" / "ffn.0.0.safetensors").write_bytes(b"x" * 10)
    raise StartFailed()


def test_failed_start_in_a_new_state_dir_leaves_nothing(tmp_path):
    state = tmp_path / "dragon-state" / "dragon-test"
    with pytest.raises(StartFailed):
        with StartupGuard(state) as guard:
            assert (state / LOCK_FILE).exists()
            _failing_start(state)
    assert not (tmp_path / "dragon-state").exists()  # the parent it had to create goes too
    assert guard.undone


def test_failed_start_leaves_an_existing_state_dir_as_it_was(tmp_path):
    state = tmp_path / "state"
    (state / "experts").mkdir(parents=True)
    (state / "identity.key").write_bytes(b"old key")
    (state / "contributions.json").write_text('{"batches": 41}')
    (state / "experts" / "ffn.0.1.safetensors").write_bytes(b"y" * 10)
    before = directory_listing(state)
    with pytest.raises(SystemExit):  # cli.fail() raises SystemExit: a one-line failure is a failure too
        with StartupGuard(state):
            (state / "contributions.json").write_text('{"batches": 0}')  # rewritten on the way out
            (state / "experts" / "ffn.0.1.safetensors").unlink()
            (state / "identity.key").write_bytes(b"old key")  # rewritten, same bytes
            raise SystemExit(2)
    assert directory_listing(state) == before


def test_failed_start_removes_an_identity_created_outside_the_state_dir(tmp_path):
    state, identity = tmp_path / "state", tmp_path / "keys" / "peer.key"
    with pytest.raises(StartFailed):
        with StartupGuard(state, also=[identity]):
            _failing_start(state, identity)
    assert not state.exists() and not identity.exists() and not identity.parent.exists()
    assert sorted(os.listdir(tmp_path)) == []


def test_busy_state_dir_is_not_rolled_back(tmp_path, holder):
    """The refused peer must not touch the running peer's files."""
    state = tmp_path / "state"
    holder(state)
    (state / "contributions.json").write_text("{}")
    before = directory_listing(state)
    with pytest.raises(StateDirBusy):
        with StartupGuard(state):
            pass
    assert directory_listing(state) == before


def test_after_a_good_start_everything_is_kept_and_the_lock_released(tmp_path):
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        with StartupGuard(state) as guard:
            guard.started()
            (state / "contributions.json").write_text('{"batches": 3}')
            raise KeyboardInterrupt  # Ctrl-C while training: what was written stays
    assert directory_listing(state) == {"contributions.json": ("file", 14, b'{"batches": 3}')}


def test_interrupted_start_is_rolled_back(tmp_path):
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        with StartupGuard(state):
            (state / "identity.key").write_bytes(b"k")
            raise KeyboardInterrupt
    assert not state.exists()


def test_begin_commit_end_as_a_lifecycle_owner_calls_them(tmp_path, holder):
    """PeerNode's use: begin() in start(), commit() once started, end() always in shutdown()."""
    state, identity = tmp_path / "state", tmp_path / "state" / "identity.key"
    failed = StartupGuard(state, identity)  # a single path is fine for `also`
    failed.end()  # never began (an earlier check failed): nothing happens
    failed.begin()
    identity.parent.mkdir(exist_ok=True)
    identity.write_bytes(b"k")
    assert any("identity.key" in line for line in failed.end())
    assert not state.exists()
    assert failed.end() == []  # idempotent

    good = StartupGuard(state, identity).begin()
    identity.write_bytes(b"k")
    good.commit()
    (state / "contributions.json").write_text("{}")
    assert good.end() == []
    assert directory_listing(state) == {"contributions.json": ("file", 2, b"{}"), "identity.key": ("file", 1, b"k")}

    holder(state)
    before = directory_listing(state)
    busy = StartupGuard(state, identity)
    with pytest.raises(StateDirBusy):
        busy.begin()
    busy.end()  # the shutdown after a refused start must not touch the other peer's dir
    assert directory_listing(state) == before
