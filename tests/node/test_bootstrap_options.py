"""The bootstrap's options: flags derived from one schema, DRAGON_BOOTSTRAP_* env vars, one-line errors."""

import pytest

from dragon_swarm.node.bootstrap_options import parse_bootstrap_options


def test_defaults_and_flags():
    options = parse_bootstrap_options([], env={})
    assert options.host_maddrs == ("/ip4/127.0.0.1/tcp/0",) and options.initial_peers == () and options.config is None
    monitor = parse_bootstrap_options(["--monitor", "-c", "dragon-tiny", "--dashboard", "0.0.0.0:9000"], env={})
    assert monitor.config.swarm.name == "dragon-tiny" and monitor.dashboard == ("0.0.0.0", 9000)
    assert parse_bootstrap_options(["--monitor"], env={}).dashboard == ("127.0.0.1", 0)


def test_env_vars_have_their_own_prefix_and_flags_win():
    env = {"DRAGON_BOOTSTRAP_HOST_MADDRS": "/ip4/0.0.0.0/tcp/31337", "DRAGON_HOST_MADDRS": "/ip4/9.9.9.9/tcp/1"}
    assert parse_bootstrap_options([], env=env).host_maddrs == ("/ip4/0.0.0.0/tcp/31337",)
    assert parse_bootstrap_options(["--host-maddrs", "/ip4/127.0.0.1/tcp/5"], env=env).host_maddrs == ("/ip4/127.0.0.1/tcp/5",)
    assert parse_bootstrap_options([], env={"DRAGON_CONFIG": "no-such"}).config is None  # the peer's var is not ours


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--dashboard", "9000"], "dragon_swarm.bootstrap: error: --dashboard and -c go with --monitor (see --help)"),
        (["--monitor", "--dashboard", "99999"], "--dashboard: bad listen address"),
        (["--monitor", "-c", "no-such-config"], "no config named 'no-such-config'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        parse_bootstrap_options(argv, env={})
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0]
