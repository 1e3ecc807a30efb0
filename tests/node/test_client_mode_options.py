"""`--client-mode` (a peer behind a NAT): it only trains, and says so when asked to host."""

import pytest

from tests.node.test_options import one_line_exit, parse


def test_client_mode_trains_and_hosts_nothing():
    options = parse("--new-swarm", "--client-mode")
    assert options.client_mode and options.train and options.host_spec == ""


@pytest.mark.parametrize("extra", [["--experts", "all"], ["--no-train"]])
def test_client_mode_refuses_to_host(capsys, extra):
    assert "--client-mode only trains" in one_line_exit(capsys, "--new-swarm", "--client-mode", *extra)
