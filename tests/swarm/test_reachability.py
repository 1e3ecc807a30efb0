"""The start-up reachability check (issue 12, item 3): a peer asks others to dial it back at the address it
announces. Real DHTs and p2pd on loopback: a reachable peer hears so, a peer announcing a port nobody listens on
is told what to do, and nobody can make a peer dial an address on another IP. The pure parts without a network."""

from __future__ import annotations

import logging

import pytest

from benchmarks.wan_link import free_port
from dragon_swarm.swarm.dht_node import start_dht, visible_maddrs
from dragon_swarm.swarm.reachability import check_reachability, dialable_maddrs, verdict_line
from tests.swarm.shutdowns import shutdowns


def test_only_tcp_addresses_on_the_asking_ip_are_dialed():
    asked = ["/ip4/10.0.0.5/tcp/31338/p2p/QmXV1SzyBVz5cNpo9YpjqkTNxGBqBnvnPBnULMxKyzeS9W", "/ip4/8.8.8.8/tcp/53",
             "/ip4/10.0.0.5/udp/31338/quic", "/dns4/example.com/tcp/1", "garbage"]  # fmt: skip
    assert [str(m) for m in dialable_maddrs(asked, {"10.0.0.5"})] == ["/ip4/10.0.0.5/tcp/31338"]
    assert dialable_maddrs(asked, {"192.168.1.2"}) == []
    # a question over loopback may name any loopback address (a test swarm, or a forwarder on this machine)
    assert [str(m) for m in dialable_maddrs(["/ip4/127.0.0.1/tcp/5"], {"127.0.0.1"})] == ["/ip4/127.0.0.1/tcp/5"]
    assert dialable_maddrs(["/ip4/127.0.0.1/tcp/5"], {"10.0.0.5"}) == []


def test_the_verdict_is_one_line_saying_what_to_do():
    assert verdict_line({}, ["/ip4/1.2.3.4/tcp/31338"]) is None
    level, line = verdict_line({"a": (True, "x"), "b": (False, "y")}, ["/ip4/1.2.3.4/tcp/31338"])
    assert level == logging.INFO and line.startswith("Reachable: 1 of 2 peer(s)")
    level, line = verdict_line({"a": (False, "dialing failed")}, ["/ip4/1.2.3.4/tcp/31338"])
    assert level == logging.WARNING and "Forward TCP port 31338" in line and "--client-mode" in line and "\n" not in line


@pytest.mark.swarm
def test_peers_dial_back_what_others_announce():
    with shutdowns() as later:
        helper = start_dht()
        later(helper.shutdown)
        reachable = start_dht(initial_peers=visible_maddrs(helper))
        later(reachable.shutdown)
        answers = check_reachability(reachable, [helper.peer_id.to_base58()], visible_maddrs(reachable))
        assert list(answers.values())[0][0] is True, answers

        dead_port = free_port()  # announced, but nothing listens there: a router without port forwarding
        hidden = start_dht(initial_peers=visible_maddrs(helper), announce_maddrs=[f"/ip4/127.0.0.1/tcp/{dead_port}"])
        later(hidden.shutdown)
        ok, detail = check_reachability(hidden, [helper.peer_id.to_base58()], [f"/ip4/127.0.0.1/tcp/{dead_port}"])[helper.peer_id.to_base58()]
        assert not ok and "failed" in detail

        ok, detail = check_reachability(reachable, [helper.peer_id.to_base58()], ["/ip4/10.9.8.7/tcp/4000"])[helper.peer_id.to_base58()]
        assert not ok and "no announced TCP address on the IP" in detail  # no dialing of third parties
