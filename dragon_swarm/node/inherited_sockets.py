"""A forked child lets go of its parent's network connections, so that a connection the parent closes is closed.

`fork` copies every file descriptor. A stream that the peer answers through its p2p daemon ends, for the caller, when
the daemon sees the peer's end of it close, i.e. when *every* process holding a copy of that socket has closed it. A
peer forks while it serves: each placement change starts a new generation of expert connection handlers and task
pools, and a child forked while another peer's download was in flight kept that stream open for the child's whole
life. Seen in CI: a host's answers to three round-snapshot requests were sent in full, and the two holders that asked
waited out their 30 s timeout, merged without it, and the expert's holders ended the run apart.

A forked child never uses its parent's connections (they belong to the parent's event loop, which does not run in
the child), so right after the fork it points each of them at /dev/null: the copy is gone, and the descriptor
number stays taken, so a stale object of the parent's that closes it later cannot close a socket of the child's.
What counts as the parent's connection: sockets of the p2p daemon (unix sockets named `hivemind-p2p*`: the
daemon's control socket and the peer's stream listener) and every TCP/UDP socket (dashboards, forwarders).
Anonymous socket pairs (multiprocessing pipes, which the child shares with its parent on purpose) and any other
named unix socket (multiprocessing managers reconnect after a fork themselves) are left alone.
"""

from __future__ import annotations

import os
import socket
import stat

__all__ = ["install_inherited_socket_drop", "is_parents_connection", "drop_parents_connections"]

P2P_SOCKET_PREFIX = "hivemind-p2p"  # hivemind names its daemon's and its clients' unix sockets /tmp/hivemind-p2p*.sock
_installed = False


def is_parents_connection(family: int, names: list) -> bool:
    """Whether a socket of `family` with local/peer addresses `names` is one a forked child must let go of."""
    if family in (socket.AF_INET, socket.AF_INET6):
        return True
    if family == socket.AF_UNIX:
        return any(isinstance(name, str) and os.path.basename(name).startswith(P2P_SOCKET_PREFIX) for name in names)
    return False


def _socket_names(sock: socket.socket) -> list:
    names = []
    for get in (sock.getsockname, sock.getpeername):
        try:
            names.append(get())
        except OSError:  # a listener has no peer
            pass
    return names


def drop_parents_connections() -> int:
    """Point every descriptor of this process that is one of the parent's connections at /dev/null. Returns how
    many. Meant for a freshly forked child; never raises."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return 0
    devnull, dropped = -1, 0
    try:
        for fd in fds:
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    continue
                sock = socket.socket(fileno=fd)
            except OSError:  # closed meanwhile (the listing's own descriptor), or not a socket we can ask
                continue
            try:
                family, names = sock.family, _socket_names(sock)
            finally:
                sock.detach()  # the descriptor is not ours to close
            if not is_parents_connection(family, names):
                continue
            if devnull < 0:
                devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            os.dup2(devnull, fd, inheritable=False)
            dropped += 1
    except OSError:
        pass
    finally:
        if devnull >= 0:
            os.close(devnull)
    return dropped


def install_inherited_socket_drop() -> bool:
    """Every process forked from now on (os.fork, multiprocessing) by this process or its forked children drops the
    connections it inherited (`drop_parents_connections`). Idempotent. False where unsupported (not Linux)."""
    global _installed
    if not hasattr(os, "register_at_fork") or not os.path.isdir("/proc/self/fd"):
        return False
    if not _installed:
        os.register_at_fork(after_in_child=drop_parents_connections)
        _installed = True
    return True
