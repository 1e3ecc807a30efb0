"""The event bus and the pause gate: pure, no network."""

import threading

from dragon_swarm.events import EventBus, HostReport, PauseGate, PauseRequested, StateChanged, PeerState


def test_handlers_get_only_the_types_they_asked_for_in_order():
    bus = EventBus()
    seen: list[tuple[str, object]] = []
    bus.subscribe(lambda e: seen.append(("state", e)), StateChanged)
    bus.subscribe(lambda e: seen.append(("all", e)))
    bus.publish(StateChanged(PeerState.TRAINING))
    bus.publish(HostReport(1, 2, 3, 4))
    assert seen == [
        ("state", StateChanged(PeerState.TRAINING)),
        ("all", StateChanged(PeerState.TRAINING)),
        ("all", HostReport(1, 2, 3, 4)),
    ]


def test_a_failing_handler_does_not_stop_the_others_or_the_publisher():
    bus = EventBus()
    got = []

    def broken(event):
        raise RuntimeError("view bug")

    bus.subscribe(broken)
    bus.subscribe(got.append)
    bus.publish(HostReport(0, 0, 0, 0))
    assert got == [HostReport(0, 0, 0, 0)]


def test_unsubscribe_stops_delivery():
    bus = EventBus()
    got = []
    unsubscribe = bus.subscribe(got.append)
    unsubscribe()
    bus.publish(HostReport(0, 0, 0, 0))
    assert got == []


def test_gate_publishes_only_real_changes_and_releases_waiters():
    bus = EventBus()
    requests = []
    bus.subscribe(requests.append, PauseRequested)
    gate = PauseGate(bus)
    gate.pause()
    gate.pause()
    assert gate.paused and requests == [PauseRequested(True)]
    stop = threading.Event()
    released = []
    waiter = threading.Thread(target=lambda: released.append(gate.wait_until_running(stop, poll_s=0.01)))
    waiter.start()
    gate.resume()
    waiter.join(5)
    assert released == [True] and requests == [PauseRequested(True), PauseRequested(False)]


def test_gate_wait_ends_false_when_the_peer_stops_while_paused():
    gate = PauseGate()
    gate.pause()
    stop = threading.Event()
    stop.set()
    assert gate.wait_until_running(stop, poll_s=0.01) is False
