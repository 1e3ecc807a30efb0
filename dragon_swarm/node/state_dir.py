"""A start-up that fails writes nothing to the state dir (the lock itself is `state_lock.StateDirLock`).

`StartupGuard` remembers what the state dir (and any other paths start-up may write, such as an `--identity` file
elsewhere) looked like before start-up, takes the lock, and if start-up fails (any exception, `SystemExit` from a
one-line `fail()` and `KeyboardInterrupt` included) puts things back: whatever start-up created is removed (the
identity key hivemind generates when the file is missing, contributions.json, the lock file, directories it made),
small files it changed are restored, and nothing that was there before is deleted.

    guard = StartupGuard(options.state_dir, options.identity)
    guard.begin()            # snapshot + lock; StateDirBusy (one line) if another peer has the dir
    ... load data, start the DHT, join, start the roles ...
    guard.commit()           # start-up succeeded: from here on, what the peer writes is kept
    ... run ...
    ... shut everything down, stop_descendants() ...
    guard.end()              # always, last: rolls back if commit() never came, releases the lock

or as a context manager (`with StartupGuard(...) as guard: ...; guard.commit()`), where an exception before
`commit()` rolls back and leaving the block normally counts as a commit.

Everything started during start-up (DHT, host, session) must be shut down before `end()`, or it could write
again after the rollback.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

from dragon_swarm.node.state_lock import LOCK_FILE, StateDirBusy, StateDirLock
from dragon_swarm.state.atomic import atomic_write


# --- a failed start writes nothing ---


@dataclass(frozen=True)
class _Entry:
    kind: str  # "file", "dir", "link", "other"
    size: int
    mtime_ns: int
    inode: int
    mode: int
    content: bytes | None  # small regular files only: what a rollback puts back
    target: str | None = None  # symlinks


def _entry(path: Path, keep_bytes: int) -> _Entry | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return _Entry("link", 0, st.st_mtime_ns, st.st_ino, st.st_mode, None, os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return _Entry("dir", 0, st.st_mtime_ns, st.st_ino, st.st_mode, None)
    if stat.S_ISREG(st.st_mode):
        content = None
        if st.st_size <= keep_bytes:
            try:
                content = path.read_bytes()
            except OSError:
                content = None
        return _Entry("file", st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode, content)
    return _Entry("other", 0, st.st_mtime_ns, st.st_ino, st.st_mode, None)


def _walk(root: Path) -> list[Path]:
    """Every path under root (not following symlinks), parents before children."""
    found: list[Path] = []
    stack = [root]
    while stack:
        here = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except (NotADirectoryError, FileNotFoundError, PermissionError):
            continue
        for e in entries:
            found.append(Path(e.path))
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
    return found


def _missing_ancestors(path: Path) -> list[Path]:
    """The directories above `path` that do not exist yet, deepest first."""
    missing = []
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing


class StartupGuard:
    """Snapshot on entry, exclusive lock, rollback of start-up on failure (see the module docstring).

    :param state_dir: the peer's state dir (need not exist yet)
    :param also: other files start-up may create or change (an --identity outside the state dir)
    :param lock: take the state dir's `StateDirLock` on entry and release it on exit
    :param keep_bytes: files up to this size are remembered whole, so that a rollback can restore them if
        start-up rewrote them; bigger files that start-up changed can only be reported
    """

    def __init__(
        self, state_dir: Path | str, also: Path | str | Iterable[Path | str | None] | None = (), lock: bool = True, keep_bytes: int = 1 << 20
    ):
        self.state_dir = Path(state_dir)
        if also is None or isinstance(also, (str, os.PathLike)):
            also = [also]
        self.also = [Path(p) for p in also if p is not None]
        self.keep_bytes = keep_bytes
        self.lock = StateDirLock(self.state_dir) if lock else None
        self._committed = False
        self._began = False
        self._before: dict[Path, _Entry] = {}
        self._roots: list[Path] = []
        self._made_dirs: list[Path] = []  # directories that did not exist, deepest first
        self.undone: list[str] = []  # what the rollback did, for the log

    # --- the snapshot ---

    def _snapshot(self) -> None:
        self._roots = [self.state_dir] + [p for p in self.also if not _inside(p, self.state_dir)]
        made: list[Path] = []
        for root in self._roots:
            entry = _entry(root, self.keep_bytes)
            if entry is None:
                made += [root] if root == self.state_dir else []
                made += _missing_ancestors(root)
                continue
            self._before[root] = entry
            if root.is_dir():  # a symlinked state dir is walked through its link
                for path in _walk(root):
                    sub = _entry(path, self.keep_bytes)
                    if sub is not None:
                        self._before[path] = sub
        # deepest first, each once
        self._made_dirs = sorted({p.absolute() for p in made}, key=lambda p: len(p.parts), reverse=True)

    # --- as calls, for a lifecycle owner whose start and shutdown are separate methods ---

    def begin(self) -> "StartupGuard":
        """Snapshot, then take the lock. Raises `StateDirBusy` (one line) when another peer holds the dir; then
        this guard stays inert and `end()` touches nothing. Call it before anything writes to the state dir."""
        if self._began:
            raise RuntimeError("StartupGuard.begin() called twice")
        self._snapshot()
        if self.lock is not None:
            self.lock.acquire()  # StateDirBusy: not ours, nothing to undo (and nothing here is ours to touch)
        self._began = True
        return self

    def commit(self) -> None:
        """Start-up succeeded: from now on what is written in the state dir is kept, whatever happens."""
        self._committed = True

    started = commit

    @property
    def committed(self) -> bool:
        return self._committed

    def end(self) -> list[str]:
        """Always, last (after every process that could write there has stopped): before `commit()` this is a
        failed start, rolled back; then the lock is released and its file removed. Idempotent; does nothing if
        `begin()` never succeeded. Returns what the rollback undid (empty after a good start)."""
        if not self._began:
            return []
        self._began = False
        undone: list[str] = []
        try:
            if not self._committed:
                undone = self.rollback()
        finally:
            if self.lock is not None:
                self.lock.release()
            if not self._committed:
                self._remove_made_dirs()
        return undone

    # --- as a context manager: a failure (exception) before commit() rolls back ---

    def __enter__(self) -> "StartupGuard":
        return self.begin()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and not self._committed:
            self._committed = True  # the block ended normally: whatever it did stays
        self.end()
        return False

    # --- the rollback ---

    def rollback(self) -> list[str]:
        """Put the state dir (and `also`) back as it was on entry, except the lock file (see `__exit__`).
        Returns (and logs at DEBUG) one line per thing undone."""
        lock_path = self.lock.path if self.lock is not None and self.lock.held else None
        now: list[Path] = []
        for root in self._roots:
            if root.is_dir():
                now += _walk(root)
            if os.path.lexists(root):
                now.append(root)
        # new things: deepest first, so directories are empty by the time they are removed
        for path in sorted(set(now), key=lambda p: len(p.parts), reverse=True):
            if path == lock_path or path in self._before:
                continue
            if path.absolute() in self._made_dirs:
                continue  # removed at the very end, if empty (the lock file may still be in it)
            self._remove(path)
        # things that were there: put back what start-up changed or removed (files remembered whole)
        for path, entry in sorted(self._before.items(), key=lambda kv: len(kv[0].parts)):
            if entry.kind == "dir":
                if not path.is_dir():
                    path.mkdir(parents=True, exist_ok=True)
                    os.chmod(path, stat.S_IMODE(entry.mode))
                    self.undone.append(f"recreated {path}")
                continue
            if entry.kind == "link":
                if not path.is_symlink() or os.readlink(path) != entry.target:
                    self._remove(path, note=False)
                    os.symlink(entry.target, path)
                    self.undone.append(f"restored link {path}")
                continue
            if entry.kind != "file":
                continue
            current = _entry(path, self.keep_bytes)
            if current is not None and current.kind == "file" and (current.inode, current.size, current.mtime_ns) == (entry.inode, entry.size, entry.mtime_ns):
                continue
            if entry.content is None:
                self.undone.append(f"could not restore {path}: start-up changed it and it is too big to keep")
                logger.warning(f"{path} was changed during a start-up that failed; it cannot be restored")
                continue
            if current is not None and current.kind == "file" and current.content == entry.content:
                os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns))
                continue
            self._restore(path, entry)
        for line in self.undone:
            logger.debug(f"Start-up rollback: {line}")
        return self.undone

    def _remove(self, path: Path, note: bool = True) -> None:
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()  # only empty: what start-up made; its new contents went first
            else:
                path.unlink()
            if note:
                self.undone.append(f"removed {path}")
        except FileNotFoundError:
            pass
        except OSError as e:
            self.undone.append(f"could not remove {path}: {e.strerror or e}")

    def _restore(self, path: Path, entry: _Entry) -> None:
        assert entry.content is not None
        if path.is_dir() and not path.is_symlink():
            self.undone.append(f"could not restore {path}: a directory is in its place")
            return
        def write(tmp: Path) -> None:
            tmp.write_bytes(entry.content)
            os.chmod(tmp, stat.S_IMODE(entry.mode))
            os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns))

        try:
            atomic_write(path, write)
            self.undone.append(f"restored {path}")
        except OSError as e:
            self.undone.append(f"could not restore {path}: {e.strerror or e}")

    def _remove_made_dirs(self) -> None:
        """Directories start-up created (the state dir, its parents, an --identity's dir), if they are empty now."""
        for path in self._made_dirs:
            try:
                path.rmdir()
                self.undone.append(f"removed {path}")
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    self.undone.append(f"could not remove {path}: {e.strerror or e}")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.absolute().relative_to(root.absolute())
        return True
    except ValueError:
        return False


def directory_listing(root: Path | str) -> dict[str, tuple[str, int, bytes | None]] | None:
    """{relative path: (kind, size, content of small files)} under root, or None if root does not exist: what
    tests compare before and after a failed start."""
    root = Path(root)
    if not os.path.lexists(root):
        return None
    listing = {}
    for path in _walk(root):
        entry = _entry(path, 1 << 16)
        if entry is not None:
            listing[str(path.relative_to(root))] = (entry.kind, entry.size, entry.content)
    return listing


__all__ = ["LOCK_FILE", "StartupGuard", "StateDirBusy", "StateDirLock", "directory_listing"]
