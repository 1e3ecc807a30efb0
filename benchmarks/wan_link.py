"""A userspace WAN emulator: a TCP forwarder with a one-way delay and a rate cap per direction.

This kernel has no ``tc netem``, so a peer is put "behind" a :class:`WanLink` instead: the peer listens on a
private loopback port, announces the link's port, and every connection another peer opens to it crosses the link.

    with WanLink(target_port=private, delay_ms=25, mbit=20) as link:
        ...  # dial 127.0.0.1:link.port
        print(link.bytes_in, link.bytes_out)

Only connections *dialed to* the peer cross its link: a connection that peer A dials to peer B crosses B's link
alone (in both directions, since libp2p reuses it both ways), never A's. With every peer behind a link of the
same settings each connection therefore sees one link's delay each way (RTT = 2 x delay_ms) and one link's rate
cap, i.e. the dialed peer's uplink/downlink. Which links a peer's bytes cross depends on who dialed whom; to
attribute bytes to the dialing peer, :meth:`WanLink.bytes_from_client_port` splits the counters by the dialer's
source port (libp2p's TCP transport dials from its listen port when it can, see ``benchmarks.wan_peers``).

Per direction of each connection: a reader takes chunks from the source, waits for the link's shared rate cap
(a FIFO serialization clock per direction per link: all connections of the link share the bandwidth, as on a
real uplink), stamps each chunk ``deliver_at = now + delay`` and queues it; a writer delivers chunks at their
time. So the delay is a propagation delay (pipelined, not per chunk serialized) and the rate a real cap.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

CHUNK = 16384  # bytes read at once: small enough that connections sharing a capped link interleave finely
MAX_IN_FLIGHT_CHUNKS = 1024  # per direction of a connection: bounds memory if the receiver stops reading
_KEEP: Any = object()  # set(): leave this setting as it is (None already means "no cap")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (another process could take it before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class _Direction:
    """One direction of the link (the peer's uplink or downlink): a rate cap shared by all connections."""

    bits_per_second: float | None = None
    busy_until: float = 0.0  # loop time when the link finishes sending what is already scheduled

    async def transmit(self, nbytes: int) -> None:
        """Wait until ``nbytes`` have been serialized onto the link behind whatever other connections queued."""
        rate = self.bits_per_second
        if not rate:
            return
        now = asyncio.get_running_loop().time()
        # an idle link does not bank credit: a burst after a pause goes at the rate too, like a real wire
        start = max(now, self.busy_until)
        self.busy_until = start + nbytes * 8 / rate
        await asyncio.sleep(self.busy_until - now)


@dataclass
class _Counters:
    bytes_in: int = 0
    bytes_out: int = 0
    by_client_port: dict[int, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))


class WanLink:
    """A TCP forwarder ``127.0.0.1:port`` -> ``target_host:target_port`` with a one-way delay and a rate cap per
    direction, in its own asyncio thread. ``bytes_in`` counts bytes delivered towards the target (the peer),
    ``bytes_out`` bytes delivered from it. Settings change at runtime with :meth:`set`; :meth:`cut` drops every
    connection and refuses new ones until :meth:`restore`."""

    def __init__(
        self,
        target_port: int,
        delay_ms: float = 0.0,
        mbit: float | None = None,
        *,
        target_host: str = "127.0.0.1",
        listen_host: str = "127.0.0.1",
        down_mbit: float | None = None,
    ):
        """``mbit`` caps both directions; ``down_mbit`` (towards the peer), if given, overrides it for that one."""
        self.target_host, self.target_port, self.listen_host = target_host, target_port, listen_host
        self.delay_s = delay_ms / 1000.0
        self._up = _Direction(_bits(mbit))  # from the peer: its uplink
        self._down = _Direction(_bits(down_mbit if down_mbit is not None else mbit))
        self._counters = _Counters()
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()
        self._is_cut = False

    # ---- settings and counters (any thread) ----

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("WanLink is not started")
        return self._port

    @property
    def bytes_in(self) -> int:
        return self._counters.bytes_in

    @property
    def bytes_out(self) -> int:
        return self._counters.bytes_out

    @property
    def delay_ms(self) -> float:
        return self.delay_s * 1000.0

    @property
    def is_cut(self) -> bool:
        return self._is_cut

    def bytes_from_client_port(self) -> dict[int, tuple[int, int]]:
        """``{dialer's source port: (bytes_in, bytes_out)}`` over every connection since the last reset."""
        return {port: (v[0], v[1]) for port, v in list(self._counters.by_client_port.items())}

    def reset_counters(self) -> None:
        self._counters = _Counters()

    def set(self, *, delay_ms: float | None = None, mbit: float | None = _KEEP, down_mbit: float | None = _KEEP) -> None:
        """Change the settings for data read from now on (chunks already scheduled keep their times).
        ``mbit=None`` lifts the cap; ``mbit`` alone sets both directions."""
        if delay_ms is not None:
            self.delay_s = delay_ms / 1000.0
        if mbit is not _KEEP:
            self._up.bits_per_second = self._down.bits_per_second = _bits(mbit)
        if down_mbit is not _KEEP:
            self._down.bits_per_second = _bits(down_mbit)

    # ---- lifecycle ----

    def start(self) -> "WanLink":
        if self._thread is not None:
            return self
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name=f"wan-link->{self.target_port}", daemon=True)
        self._thread.start()
        started.wait()
        try:
            self._call(self._listen(0))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then end the thread. Idempotent."""
        if self._thread is None or self._loop is None:
            return
        try:
            if self._loop.is_running():
                self._call(self._close_all(close_server=True))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()
            self._thread = None

    def cut(self) -> None:
        """A partition: drop every connection (resets, no goodbye) and refuse new ones (the port stops listening)."""
        self._is_cut = True
        self._call(self._close_all(close_server=True))

    def restore(self) -> None:
        """End a :meth:`cut`: listen on the same port again."""
        if not self._is_cut:
            return
        self._call(self._listen(self.port))
        self._is_cut = False

    def __enter__(self) -> "WanLink":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ---- the loop thread ----

    def _run(self, started: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(started.set)
        self._loop.run_forever()

    def _call(self, coro, timeout: float = 10.0):
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self, port: int) -> None:
        # reuse_address: after a cut the same port is bound again while old connections sit in TIME_WAIT
        self._server = await asyncio.start_server(self._accept, self.listen_host, port, reuse_address=True, backlog=256)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _close_all(self, close_server: bool) -> None:
        if close_server and self._server is not None:
            self._server.close()
            self._server = None
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._is_cut:
            _abort(client_writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        server_writer = None
        try:
            try:
                server_reader, server_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                return  # the peer is not listening: the dialer sees its connection reset, as it would directly
            peer = client_writer.get_extra_info("peername")
            port_counts = self._counters.by_client_port[peer[1] if peer else 0]
            counters = self._counters

            def count_in(n: int) -> None:
                counters.bytes_in += n
                port_counts[0] += n

            def count_out(n: int) -> None:
                counters.bytes_out += n
                port_counts[1] += n

            pumps = [
                asyncio.create_task(self._pump(client_reader, server_writer, self._down, count_in)),
                asyncio.create_task(self._pump(server_reader, client_writer, self._up, count_out)),
            ]
            try:
                done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
                # a reset on one side resets the other: the pumps that failed leave the connection half-dead
                if any(t.exception() is not None for t in done):
                    for t in pending:
                        t.cancel()
                    _abort(client_writer)
                    _abort(server_writer)
                    await asyncio.gather(*pending, return_exceptions=True)
            except asyncio.CancelledError:  # cut() or stop(): drop the connection without a goodbye
                for t in pumps:
                    t.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                _abort(client_writer)
                _abort(server_writer)
                raise
        finally:
            self._connections.discard(task)
            for w in (client_writer, server_writer):
                if w is not None and not w.is_closing():
                    w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: _Direction, count) -> None:
        """Copy one direction: read, wait for the shared rate cap, deliver ``delay`` later; EOF is delivered too.
        Raises when either side fails (a reset), so the caller can reset the other side."""
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(MAX_IN_FLIGHT_CHUNKS)
        loop = asyncio.get_running_loop()

        async def read() -> None:
            while True:
                data = await reader.read(CHUNK)
                if data:
                    await direction.transmit(len(data))
                # stamped after transmission: the delay is propagation, on top of the time on the wire
                await queue.put((loop.time() + self.delay_s, data or None))
                if not data:
                    return

        async def deliver() -> None:
            while True:
                deliver_at, data = await queue.get()
                wait = deliver_at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()  # a half-close: the other direction goes on
                    return
                writer.write(data)
                await writer.drain()
                count(len(data))

        tasks = [asyncio.create_task(read()), asyncio.create_task(deliver())]
        try:
            # a failed receiver must also stop a reader blocked on a full queue, hence both as tasks
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            t.result()


def _bits(mbit: float | None) -> float | None:
    if mbit is None:
        return None
    if mbit <= 0:
        raise ValueError(f"mbit must be > 0 (None: no cap), got {mbit}")
    return mbit * 1e6


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
