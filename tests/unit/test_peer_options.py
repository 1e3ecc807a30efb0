"""Peer command-line defaults that depend on other flags (pure parsing, no peer started)."""

import pytest

from dragon_swarm.peer import default_host_maddrs, parse_options


@pytest.mark.parametrize(
    "initial_peers, expected",
    [
        ((), "/ip4/127.0.0.1/tcp/0"),  # --new-swarm: nobody else needs to reach us
        (("/ip4/127.0.0.1/tcp/4242/p2p/QmX",), "/ip4/127.0.0.1/tcp/0"),
        (("/ip4/127.0.0.1/tcp/1/p2p/QmX", "/ip4/203.0.113.7/tcp/31337/p2p/QmY"), "/ip4/0.0.0.0/tcp/0"),
        (("/dns4/boot.example.org/tcp/31337/p2p/QmY",), "/ip4/0.0.0.0/tcp/0"),
    ],
)
def test_listen_address_follows_where_the_swarm_is(initial_peers, expected):
    assert default_host_maddrs(initial_peers) == [expected]


def test_profile_sets_defaults_and_flags_win():
    options, _ = parse_options(["--new-swarm", "--profile", "cpu-laptop", "--threads", "1"])
    assert options.device == "cpu" and options.batch_size_auto and options.max_memory == "50%"
    assert options.threads == 1  # the flag, not the profile's 2
    host_only, _ = parse_options(["--new-swarm", "--profile", "expert-host"])
    assert not host_only.train


def test_explicit_batch_size_beats_the_profiles_auto():
    options, _ = parse_options(["--new-swarm", "--profile", "cpu-laptop", "--batch-size", "4"])
    assert not options.batch_size_auto and options.batch_size == 4
