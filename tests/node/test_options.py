"""The peer's options: the flags derived from one schema, env vars, and where each value comes from
(flags > DRAGON_* env vars > --profile > the swarm config file > defaults). Pure parsing, no peer started."""

import subprocess
import sys
from pathlib import Path

import pytest

from dragon_swarm.node.options import PeerFlags, build_parser, default_host_maddrs, parse_peer_options

TINY = Path(__file__).resolve().parents[2] / "configs" / "dragon-tiny.yaml"


def parse(*argv: str, env: dict | None = None):
    return parse_peer_options(list(argv), env=env or {})


def one_line_exit(capsys, *argv: str, env: dict | None = None) -> str:
    with pytest.raises(SystemExit) as info:
        parse(*argv, env=env)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("dragon_swarm.peer: error: ")
    return lines[0]


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
    if initial_peers:
        assert parse("--initial-peers", *initial_peers).host_maddrs == (expected,)


def test_defaults():
    options = parse("--new-swarm")
    assert (options.config_name, options.device, options.batch_size, options.batch_size_auto) == ("dragon-tiny", "cpu", 16, False)
    assert options.train and options.host_spec is None and options.panel and options.log_level == "INFO"
    assert options.state_dir == Path("dragon-state/dragon-tiny") and options.identity == options.state_dir / "identity.key"
    assert (options.max_steps, options.threads, options.max_memory, options.dashboard, options.attack) == (None,) * 5


def test_flags_reach_their_options(tmp_path):
    options = parse(
        "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmX", "-c", str(TINY), "--no-host", "--max-steps", "7",
        "--stats-file", str(tmp_path / "s.jsonl"), "--state-dir", str(tmp_path), "--name", " alice ",
        "--dashboard", "8080", "--no-panel", "--device", "auto", "--max-memory", "6GiB", "--threads", "3",
        "--batch-size", "4", "--announce-maddrs", "/ip4/1.2.3.4/tcp/5", "--data-dir", str(tmp_path),
        "--log-level", "DEBUG", "--attack", "sign-flip",
    )  # fmt: skip
    assert options.initial_peers == ("/ip4/127.0.0.1/tcp/1/p2p/QmX",) and options.config_name == str(TINY)
    assert options.host_spec == "" and options.max_steps == 7 and options.stats_file == tmp_path / "s.jsonl"
    assert options.identity == tmp_path / "identity.key" and options.name == "alice"
    assert options.dashboard == ("127.0.0.1", 8080) and not options.panel
    assert (options.device, options.max_memory, options.threads, options.batch_size) == ("auto", "6GiB", 3, 4)
    assert options.config.training.batch_size == 4
    assert options.announce_maddrs == ("/ip4/1.2.3.4/tcp/5",) and options.data_dir == tmp_path
    assert options.log_level == "DEBUG" and options.attack == "sign-flip"


def test_profile_sets_defaults_and_flags_win():
    options = parse("--new-swarm", "--profile", "cpu-laptop", "--threads", "1")
    assert options.device == "cpu" and options.batch_size_auto and options.max_memory == "50%"
    assert options.threads == 1  # the flag, not the profile's 2
    host_only = parse("--new-swarm", "--profile", "expert-host")
    assert not host_only.train and host_only.host_spec is None
    assert parse("--new-swarm", "--profile", "expert-host", "--no-host").train  # --no-host keeps training on


def test_in_flight_flag_sets_the_peer_local_key():
    remote = str(Path(__file__).resolve().parents[1] / "configs" / "swarm-test.yaml")  # a remote_experts swarm
    options = parse("--new-swarm", "-c", remote, "--in-flight", "3")
    assert options.config.training.micro_batches_in_flight == 3
    assert options.config.run_prefix == parse("--new-swarm", "-c", remote).config.run_prefix


def test_explicit_batch_size_beats_the_profiles_auto():
    options = parse("--new-swarm", "--profile", "cpu-laptop", "--batch-size", "4")
    assert not options.batch_size_auto and options.batch_size == 4


def write_profile(tmp_path: Path, batch_size: int) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(f"description: test\ndevice: cpu\nbatch_size: {batch_size}\n")
    return str(path)


def test_batch_size_precedence_flag_env_profile_file(tmp_path):
    profile = write_profile(tmp_path, 5)
    env = {"DRAGON_BATCH_SIZE": "6"}
    assert parse("--new-swarm").batch_size == 16  # the config file's training.batch_size
    assert parse("--new-swarm", "--profile", profile).batch_size == 5  # profile > file
    assert parse("--new-swarm", "--profile", profile, env=env).batch_size == 6  # env > profile
    assert parse("--new-swarm", "--profile", profile, "--batch-size", "7", env=env).batch_size == 7  # flag > env
    assert parse("--new-swarm", env={"DRAGON_BATCH_SIZE": "auto"}).batch_size_auto


def test_every_flag_has_an_env_var_except_the_hidden_and_panel_ones():
    env = {
        "DRAGON_NEW_SWARM": "true", "DRAGON_CONFIG": str(TINY), "DRAGON_MAX_MEMORY": "50%", "DRAGON_THREADS": "2",
        "DRAGON_NO_TRAIN": "1", "DRAGON_LOG_LEVEL": "WARNING", "DRAGON_ATTACK": "nan", "DRAGON_NO_PANEL": "",
    }  # fmt: skip
    options = parse(env=env)
    assert options.config_name == str(TINY) and options.max_memory == "50%" and options.threads == 2
    assert not options.train and options.log_level == "WARNING"
    assert options.attack is None and options.panel  # a Byzantine peer only by an explicit flag
    # a flag beats the env var, even one of the same exclusive group
    assert parse("--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmX", env={"DRAGON_NEW_SWARM": "1"}).initial_peers
    peers = parse(env={"DRAGON_INITIAL_PEERS": "[/ip4/127.0.0.1/tcp/1/p2p/QmX, /ip4/127.0.0.1/tcp/2/p2p/QmY]"})
    assert len(peers.initial_peers) == 2


def test_flags_are_derived_from_the_schema():
    parser = build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    for field in PeerFlags.model_fields:
        assert "--" + field.replace("_", "-") in flags
    help_text = parser.format_help()
    assert "--attack" not in help_text and "DRAGON_MAX_MEMORY" in help_text
    assert "counted across restarts" in " ".join(help_text.split())


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        (["--new-swarm", "--bogus-flag"], {}, "unrecognized arguments: --bogus-flag (see --help)"),
        ([], {}, "one of the arguments --initial-peers --new-swarm is required"),
        (["--new-swarm", "--max-steps", "many"], {}, "invalid int value: 'many'"),
        (["--new-swarm", "--max-steps", "-1"], {}, "--max-steps must be >= 0, got -1"),
        (["--new-swarm", "--no-train", "--no-host"], {}, "not allowed with argument"),
        (["--new-swarm", "--no-host", "--experts", "all"], {}, "--experts and --no-host contradict each other"),
        (["--new-swarm", "--experts", "7.0"], {}, "--experts: layer [7] out of range"),
        (["--new-swarm", "--batch-size", "0"], {}, "--batch-size must be positive"),
        (["--new-swarm", "--batch-size", "lots"], {}, "--batch-size must be a positive integer or 'auto'"),
        (["--new-swarm"], {"DRAGON_BATCH_SIZE": "lots"}, "--batch-size must be a positive integer or 'auto'"),
        (["--new-swarm", "-c", "no-such-config"], {}, "no config named 'no-such-config'"),
        (["--new-swarm", "--attack", "tickle"], {}, "--attack:"),
        (["--new-swarm", "--max-memory", "banana"], {}, "--max-memory: cannot read memory limit"),
        (["--new-swarm", "--dashboard", "99999"], {}, "--dashboard:"),
        (["--new-swarm", "--profile", "no-such-profile"], {}, "--profile: no peer profile named"),
        (["--new-swarm", "--threads", "0"], {}, "--threads must be >= 1"),
        (["--new-swarm", "--name", ""], {}, "--name must be 1-40 printable characters"),
        (["--new-swarm", "--log-level", "LOUD"], {}, "invalid choice: 'LOUD'"),
        (["--new-swarm"], {"DRAGON_NO_TRAIN": "maybe"}, "Unexpected value for DRAGON_NO_TRAIN"),
    ],
)
def test_bad_input_exits_with_one_clear_line(capsys, argv, env, expected):
    assert expected in one_line_exit(capsys, *argv, env=env)


def test_broken_config_file_exits_with_one_line_naming_it(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(TINY.read_text().replace("d_model: 128", "d_model: 130", 1))
    line = one_line_exit(capsys, "--new-swarm", "-c", str(broken))
    assert str(broken) in line and "d_model (130) must be divisible by n_heads (4)" in line


def test_bad_profile_file_exits_with_one_line(capsys, tmp_path):
    profile = tmp_path / "mine.yaml"
    profile.write_text("description: x\ngpus: 2\n")
    assert "--profile: " in one_line_exit(capsys, "--new-swarm", "--profile", str(profile))


def test_help_runs_in_a_fresh_process():
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from dragon_swarm.node.options import build_parser; build_parser().print_help()"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and "[env var: DRAGON_PROFILE]" in " ".join(result.stdout.split())
