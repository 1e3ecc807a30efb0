"""An averager's control pipe used from several threads: every message arrives whole and in one piece."""

import multiprocessing as mp
import threading

from dragon_swarm.averaging.robust_allreduce import SerialSendPipe

SENDERS, MESSAGES, SIZE = 6, 40, 256 * 1024  # messages larger than one write of the pipe


def _send_from_threads(pipe) -> list:
    received: list = []

    def receive() -> None:
        for _ in range(SENDERS * MESSAGES):
            received.append(receiver.recv())

    receiver, sender = mp.Pipe(duplex=True)
    pipe = pipe(sender)
    reader = threading.Thread(target=receive, daemon=True)
    reader.start()

    def send(thread: int) -> None:
        for i in range(MESSAGES):
            pipe.send((thread, i, bytes([thread]) * SIZE))

    # daemon threads joined with a timeout: a garbled message kills the reader, and the senders then block for good
    threads = [threading.Thread(target=send, args=(t,), daemon=True) for t in range(SENDERS)]
    for t in threads:
        t.start()
    reader.join(timeout=60)
    return received


def test_sends_from_several_threads_arrive_whole():
    received = _send_from_threads(SerialSendPipe)
    assert len(received) == SENDERS * MESSAGES
    for thread, i, payload in received:
        assert payload == bytes([thread]) * SIZE
    for thread in range(SENDERS):  # each thread's messages in its order
        assert [i for t, i, _ in received if t == thread] == list(range(MESSAGES))


def test_the_wrapped_pipe_is_still_the_pipe():
    a, b = mp.Pipe(duplex=True)
    wrapped = SerialSendPipe(a)
    wrapped.send("ping")
    assert b.recv() == "ping"
    b.send("pong")
    assert wrapped.poll(5) and wrapped.recv() == "pong"
    wrapped.close()
    assert a.closed
