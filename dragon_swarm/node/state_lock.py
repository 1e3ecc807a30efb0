"""One peer per state dir: `StateDirLock` is an exclusive, non-blocking `flock` on `<state dir>/peer.lock`, which
holds the owner's PID. A second peer on the same dir is refused at once with one line naming the dir and that PID.
The lock belongs to the open file, so hivemind's forked children share it: while any process of a peer is alive (a
leftover DHT process still announcing the old peer id), the dir stays locked. It is released and the file removed
on a clean exit; after a crash the file stays but its lock is gone with the processes, and the next peer simply
takes it over.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = "peer.lock"

__all__ = ["LOCK_FILE", "StateDirBusy", "StateDirLock"]


class StateDirBusy(RuntimeError):
    """Another peer (or processes left over from one) holds the state dir. `str()` is the one line to show."""

    def __init__(self, state_dir: Path, pid: int | None, holders: list[int] | None = None):
        self.state_dir, self.pid, self.holders = Path(state_dir), pid, holders or []
        if pid is not None and _pid_alive(pid):
            who = f"another peer (PID {pid})"
        elif self.holders:
            gone = f" of a peer that has exited (PID {pid})" if pid is not None else ""
            who = f"processes left over{gone}: PID {', '.join(map(str, self.holders))}"
        else:
            who = "another peer"
        super().__init__(f"state dir {state_dir} is in use by {who}; stop it or pass another --state-dir")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not a peer
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _processes_with_open(file_stat: os.stat_result) -> list[int]:
    """PIDs (of this user) that have the file open: who really holds a lock whose recorded owner is gone."""
    found = []
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if st.st_ino == file_stat.st_ino and st.st_dev == file_stat.st_dev:
                found.append(pid)
                break
    return sorted(found)


class StateDirLock:
    """Exclusive lock on a state dir (see the module docstring). `acquire()` creates the dir if needed and raises
    `StateDirBusy` at once when another process holds it; `release()` removes the lock file. Re-entrant use is an
    error; a forked child never releases its parent's lock."""

    def __init__(self, state_dir: Path | str, name: str = LOCK_FILE):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / name
        self._fd: int | None = None
        self._owner_pid: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None and self._owner_pid == os.getpid()

    def acquire(self) -> "StateDirLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this process")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    pid = self._read_pid(fd)
                    holders = [] if pid is not None and _pid_alive(pid) else _processes_with_open(os.fstat(fd))
                finally:
                    os.close(fd)
                raise StateDirBusy(self.state_dir, pid, [h for h in holders if h != os.getpid()]) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous owner may have removed the file between our open and our flock: then we hold a lock on
            # a file nobody else will ever open. Only a lock on the file that is at the path counts.
            try:
                at_path = os.stat(self.path)
                mine = os.fstat(fd)
                same = (at_path.st_ino, at_path.st_dev) == (mine.st_ino, mine.st_dev)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._fd, self._owner_pid = fd, os.getpid()
            return self
        raise StateDirBusy(self.state_dir, None)

    @staticmethod
    def _read_pid(fd: int) -> int | None:
        """The holder writes its PID right after locking: give it a moment if the file is still empty."""
        deadline = time.monotonic() + 0.5
        while True:
            try:
                text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            except OSError:
                return None
            if text.isdigit():
                return int(text)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def release(self) -> None:
        """Remove the lock file and unlock (idempotent). In a forked child this does nothing."""
        if self._fd is None or self._owner_pid != os.getpid():
            return
        fd, self._fd = self._fd, None
        try:
            try:
                at_path, mine = os.stat(self.path), os.fstat(fd)
                if (at_path.st_ino, at_path.st_dev) == (mine.st_ino, mine.st_dev):
                    os.unlink(self.path)  # before unlocking: a peer waiting on this file then retries the new one
            except FileNotFoundError:
                pass
            except OSError as e:  # a read-only or replaced state dir: the lock is released all the same
                logger.warning(f"Could not remove the lock file {self.path}: {e.strerror or e}")
            # explicitly: forked children share this open file and would otherwise keep it locked
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "StateDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
