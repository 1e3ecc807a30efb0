"""`--client-mode` (a peer behind a NAT): it only trains, and says so when asked to host; `--auto-relay` instead keeps
it reachable through a relay."""

import pytest

from tests.node.test_options import one_line_exit, parse


def test_client_mode_trains_and_hosts_nothing():
    options = parse("--new-swarm", "--client-mode")
    assert options.client_mode and options.train and options.host_spec == ""


@pytest.mark.parametrize("extra", [["--experts", "all"], ["--no-train"]])
def test_client_mode_refuses_to_host(capsys, extra):
    assert "--client-mode only trains" in one_line_exit(capsys, "--new-swarm", "--client-mode", *extra)


def test_auto_relay_is_an_alternative_to_client_mode(capsys):
    options = parse("--new-swarm", "--auto-relay")
    assert options.auto_relay and not options.client_mode and options.host_spec is None  # may host: reachable via relay
    assert "--auto-relay makes a peer behind a NAT reachable" in one_line_exit(capsys, "--new-swarm", "--client-mode", "--auto-relay")
