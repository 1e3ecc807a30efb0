"""The userspace WAN link (`benchmarks/wan_link.py`): delay, rate cap, counters, EOF, cut/restore, on plain sockets;
and one pair of real hivemind DHT nodes where one sits behind a link."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from benchmarks.wan_link import WanLink, free_port, wait_until
from benchmarks.wan_peers import WanLinks


class EchoServer:
    """A loopback server: per connection, either echoes, or swallows what it reads and answers how many bytes it got
    once the client half-closes (then closes), or sends `send_on_connect` bytes and closes."""

    def __init__(self, mode: str = "echo", send_on_connect: int = 0):
        self.mode, self.send_on_connect = mode, send_on_connect
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.threads: list[threading.Thread] = []
        self.accepting = threading.Thread(target=self._accept_loop, daemon=True)
        self.accepting.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.mode == "send":
                    conn.sendall(b"x" * self.send_on_connect)
                    return
                total = 0
                while data := conn.recv(65536):
                    total += len(data)
                    self.received += len(data)
                    if self.mode == "echo":
                        conn.sendall(data)
                if self.mode == "count":
                    conn.sendall(str(total).encode())
            except OSError:
                pass

    def close(self) -> None:
        try:  # wakes the thread blocked in accept(), which close() alone does not
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.accepting.join(timeout=5)
        for t in self.threads:
            t.join(timeout=5)


@pytest.fixture
def server() -> Iterator[EchoServer]:
    s = EchoServer("count")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def make_link() -> Iterator:
    links: list[WanLink] = []

    def make(target_port: int, **kwargs) -> WanLink:
        link = WanLink(target_port, **kwargs).start()
        links.append(link)
        return link

    try:
        yield make
    finally:
        for link in links:
            link.stop()


def send_and_count(port: int, payload: bytes, timeout: float = 30.0) -> int:
    """Send payload, half-close, return the server's count of what it got (the answer after our EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while data := s.recv(4096):
            answer += data
    return int(answer)


def test_rate_cap_and_counters(server, make_link):
    link = make_link(server.port, delay_ms=20, mbit=8)
    payload = b"a" * 1_000_000  # 8 Mbit: one second at 8 Mbit/s
    started = time.monotonic()
    assert send_and_count(link.port, payload) == len(payload)
    elapsed = time.monotonic() - started
    assert elapsed >= 0.95, elapsed
    assert elapsed < 6.0, elapsed
    assert link.bytes_in == len(payload)
    assert link.bytes_out == len(str(len(payload)))
    link.reset_counters()
    assert (link.bytes_in, link.bytes_out) == (0, 0)


def test_delay_is_one_way_and_pipelined(make_link):
    echo = EchoServer("echo")
    try:
        link = make_link(echo.port, delay_ms=150)
        with socket.create_connection(("127.0.0.1", link.port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.monotonic()
            s.sendall(b"ping")
            assert s.recv(16) == b"ping"
            rtt = time.monotonic() - started
            assert 0.29 <= rtt < 1.5, rtt  # there and back: 2 x 150 ms
            # 20 messages sent 20 ms apart arrive about 20 ms apart after one RTT, not 20 RTTs later:
            # the delay is propagation, in flight all at once
            started = time.monotonic()
            got = b""

            def receive() -> None:
                nonlocal got
                while len(got) < 20 * 4:
                    got += s.recv(1024)

            receiver = threading.Thread(target=receive)
            receiver.start()
            for i in range(20):
                s.sendall(b"%04d" % i)
                time.sleep(0.02)
            receiver.join(timeout=10)
            elapsed = time.monotonic() - started
            assert got == b"".join(b"%04d" % i for i in range(20))
            assert 0.3 + 0.38 <= elapsed < 2.5, elapsed  # 19 gaps of 20 ms + one RTT; serialized would be >= 6 s
    finally:
        echo.close()


def test_runtime_settings_change(server, make_link):
    link = make_link(server.port, delay_ms=0, mbit=1)
    link.set(mbit=None, delay_ms=0)  # lifted: 2 MB at 1 Mbit/s would take 16 s
    started = time.monotonic()
    assert send_and_count(link.port, b"b" * 2_000_000) == 2_000_000
    assert time.monotonic() - started < 3.0
    link.set(mbit=4)
    started = time.monotonic()
    assert send_and_count(link.port, b"b" * 250_000) == 250_000  # 2 Mbit at 4 Mbit/s
    assert time.monotonic() - started >= 0.45


def test_eof_propagates_both_ways(make_link):
    sender = EchoServer("send", send_on_connect=300_000)
    try:
        link = make_link(sender.port, delay_ms=10, mbit=50)
        with socket.create_connection(("127.0.0.1", link.port), timeout=10) as s:
            got = 0
            while data := s.recv(65536):  # ends only if the server's close crossed the link as EOF
                got += len(data)
        assert got == 300_000
        assert wait_until(lambda: link.bytes_out == 300_000, 5)
    finally:
        sender.close()


def test_half_close_keeps_the_other_direction_open(server, make_link):
    link = make_link(server.port, delay_ms=30)
    # the server answers only after it saw our EOF: the answer must still come back over the half-open connection
    assert send_and_count(link.port, b"c" * 1000) == 1000
    assert link.bytes_in == 1000 and link.bytes_out == 4


def test_concurrent_connections_share_the_rate(server, make_link):
    link = make_link(server.port, mbit=8)
    results: list[int] = []
    started = time.monotonic()
    threads = [threading.Thread(target=lambda: results.append(send_and_count(link.port, b"d" * 250_000))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    elapsed = time.monotonic() - started
    assert results == [250_000] * 4
    assert elapsed >= 0.95, elapsed  # 4 x 2 Mbit through one 8 Mbit/s uplink, not four of them
    assert elapsed < 6.0, elapsed
    assert link.bytes_in == 1_000_000
    assert sum(i for i, _ in link.bytes_from_client_port().values()) == 1_000_000
    assert len(link.bytes_from_client_port()) == 4


def test_cut_drops_and_refuses_then_restore(make_link):
    echo = EchoServer("echo")
    try:
        link = make_link(echo.port)
        port = link.port
        live = socket.create_connection(("127.0.0.1", port), timeout=5)
        live.sendall(b"hi")
        assert live.recv(16) == b"hi"
        link.cut()
        assert link.is_cut
        try:
            dropped = live.recv(16) == b""  # reset or EOF: the connection is gone
        except ConnectionResetError:
            dropped = True
        live.close()
        assert dropped
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        link.restore()
        assert link.port == port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"again")
            assert s.recv(16) == b"again"
    finally:
        echo.close()


def test_unreachable_target_resets_the_dialer(make_link):
    link = make_link(free_port())  # nobody listens there
    with socket.create_connection(("127.0.0.1", link.port), timeout=5) as s:
        try:
            assert s.recv(16) == b""
        except ConnectionResetError:
            pass
    link.stop()  # and the link still stops cleanly


@pytest.fixture
def wan_links() -> Iterator[WanLinks]:
    links = WanLinks()
    try:
        yield links
    finally:
        links.stop_all()


@pytest.fixture
def dhts() -> Iterator[list]:
    started: list = []
    try:
        yield started
    finally:
        for dht in reversed(started):
            dht.shutdown()


@pytest.mark.swarm
def test_real_dht_nodes_dial_the_announced_link(wan_links, dhts):
    from hivemind.utils import get_dht_time

    from dragon_swarm.swarm.dht_node import start_dht, visible_maddrs

    b, a = wan_links.new(delay_ms=10), wan_links.new(delay_ms=10)
    dht_b = start_dht(host_maddrs=[b.host_maddr], announce_maddrs=[b.announce_maddr])
    dhts.append(dht_b)
    # p2pd accepts an announce address other than its listen address and hands out only the announced one
    b_addrs = visible_maddrs(dht_b)
    assert b_addrs and all(f"/tcp/{b.link.port}/" in addr for addr in b_addrs), (b_addrs, b.link.port)
    dht_a = start_dht(initial_peers=b_addrs, host_maddrs=[a.host_maddr], announce_maddrs=[a.announce_maddr])
    dhts.append(dht_a)
    assert dht_a.store("wan-key", "x" * 10_000, get_dht_time() + 60)
    found = dht_b.get("wan-key", latest=True)
    assert found is not None and found.value == "x" * 10_000
    # A dialed B, so A's 10 kB record crossed B's link towards B
    assert b.link.bytes_in > 10_000 and b.link.bytes_out > 0
    # and libp2p dialed from A's listen port, which is how links attribute bytes to the dialer
    assert wan_links.bytes_sent_by(a) >= b.link.bytes_from_client_port()[a.private_port][0] > 10_000
    assert wan_links.unattributed_bytes() == 0
