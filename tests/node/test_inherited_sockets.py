"""A child forked while the peer serves lets go of the peer's connections: what the peer closes is closed for the
other side while the child lives on (`dragon_swarm.node.inherited_sockets`). The stream case runs real p2p daemons."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import socket
import sys
import threading

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from dragon_swarm.node.inherited_sockets import drop_parents_connections, install_inherited_socket_drop, is_parents_connection

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/fd is Linux only")
FORK = mp.get_context("fork")


def test_the_peer_s_connections_are_told_from_what_a_child_shares_with_it():
    assert is_parents_connection(socket.AF_INET, [("127.0.0.1", 4000), ("127.0.0.1", 51234)])
    assert is_parents_connection(socket.AF_INET6, [("::1", 4000, 0, 0)])
    assert is_parents_connection(socket.AF_UNIX, ["", "/tmp/hivemind-p2pd-abc.sock"])  # a connection to the daemon
    assert is_parents_connection(socket.AF_UNIX, ["/tmp/hivemind-p2pclient-xyz.sock", ""])  # a stream the daemon opened
    assert not is_parents_connection(socket.AF_UNIX, ["", ""])  # a multiprocessing pipe (socketpair)
    assert not is_parents_connection(socket.AF_UNIX, ["/tmp/pymp-1/listener-2", ""])  # a multiprocessing manager
    assert not is_parents_connection(socket.AF_UNIX, [b"\x00abstract"])


def _wait_for_release(release, pipe) -> None:
    pipe.send("alive")  # the pipe the child shares with its parent on purpose still works
    release.wait(60)


@pytest.fixture
def forked_child():
    """`start()` forks a child that lives until the test releases it (or 60 s); stopped by the test in any case."""
    release, started = FORK.Event(), []

    def start():
        ours, theirs = FORK.Pipe()
        child = FORK.Process(target=_wait_for_release, args=(release, theirs), daemon=True)
        child.start()
        started.append(child)
        assert ours.poll(30) and ours.recv() == "alive"
        return child

    try:
        yield start
    finally:
        release.set()
        for child in started:
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join(5)


def test_a_tcp_connection_the_peer_closes_ends_while_a_child_forked_meanwhile_lives(forked_child):
    install_inherited_socket_drop()
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as caller:
        served, _ = server.accept()
        child = forked_child()  # holds a copy of `served` unless it let go of it
        served.close()
        caller.settimeout(30)
        assert caller.recv(1) == b""  # end of stream, not a timeout
        assert child.is_alive()


def test_dropping_in_this_process_leaves_pipes_alone():
    ours, theirs = FORK.Pipe()
    # nothing to assert on the count (pytest may hold sockets of its own); the pipe must survive a drop
    drop_parents_connections()
    theirs.send("still here")
    assert ours.poll(5) and ours.recv() == "still here"


@pytest.mark.swarm
def test_a_stream_answered_while_a_child_is_forked_ends_for_the_caller(forked_child):
    install_inherited_socket_drop()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    answering, release_answer = threading.Event(), asyncio.Event()

    async def handler(request, context):
        yield runtime_pb2.ExpertResponse(metadata=b"first")
        answering.set()
        await release_answer.wait()
        yield runtime_pb2.ExpertResponse(metadata=b"last")

    async def fetch(p2p: P2P, peer_id):
        stream = await p2p.iterate_protobuf_handler(peer_id, "slow", runtime_pb2.ExpertUID(uid="x"), runtime_pb2.ExpertResponse)
        return [r.metadata async for r in stream]

    peers = []
    try:
        server = run(P2P.create())
        peers.append(server)
        caller = run(P2P.create(initial_peers=run(server.get_visible_maddrs())))
        peers.append(caller)
        run(server.add_protobuf_handler("slow", handler, runtime_pb2.ExpertUID, stream_output=True))
        answer = asyncio.run_coroutine_threadsafe(fetch(caller, server.peer_id), loop)
        assert answering.wait(30)
        child = forked_child()  # forked while the server's end of the stream is open, as a new handler generation is
        loop.call_soon_threadsafe(release_answer.set)
        assert answer.result(30) == [b"first", b"last"]  # the stream ended although the child still lives
        assert child.is_alive()
    finally:
        for p2p in reversed(peers):
            run(p2p.shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
