"""The command lines: one clear line for bad input, a stable bootstrap identity, clean signal handling."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from benchmarks.local_peers import REPO_ROOT


def run_peer(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dragon_swarm.peer", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )


def assert_one_clear_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--new-swarm", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        ([], "one of the arguments --initial-peers --new-swarm is required"),
        (["--new-swarm", "--max-steps", "many"], "invalid int value: 'many'"),
        (["--new-swarm", "--no-train", "--no-host"], "not allowed with argument"),
        (["--new-swarm", "--experts", "7.0"], "--experts: layer [7] out of range"),
        (["--new-swarm", "--batch-size", "0"], "--batch-size must be positive"),
        (["--new-swarm", "-c", "no-such-config"], "no config named 'no-such-config'"),
        (["--new-swarm", "--attack", "tickle"], "--attack:"),
        (["--new-swarm", "--batch-size", "lots"], "--batch-size must be a positive integer or 'auto'"),
        (["--new-swarm", "--max-memory", "banana"], "--max-memory:"),
        (["--new-swarm", "--dashboard", "99999"], "--dashboard:"),
        (["--new-swarm", "--profile", "no-such-profile"], "--profile:"),
        (["--new-swarm", "--threads", "0"], "--threads must be >= 1"),
        (["--new-swarm", "--name", ""], "--name must be 1-40 printable characters"),
    ],
)
def test_bad_flags_exit_with_one_clear_line(args, expected):
    assert_one_clear_line(run_peer(*args), expected)


def test_broken_config_file_exits_with_one_clear_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text((REPO_ROOT / "configs" / "dragon-tiny.yaml").read_text().replace("d_model: 128", "d_model: 130", 1))
    assert_one_clear_line(run_peer("--new-swarm", "-c", str(broken)), "d_model (130) must be divisible by n_heads (4)")


@pytest.mark.swarm
def test_bootstrap_keeps_its_identity_and_stops_cleanly(launcher, tmp_path):
    identity = tmp_path / "boot.key"
    lines = []
    for run in range(2):
        boot = launcher.start(f"boot{run}", ["--identity", str(identity)], module="dragon_swarm.bootstrap")
        peers = boot.initial_peers()
        assert peers[0].startswith("/ip4/127.0.0.1/tcp/")
        lines.append(peers[0].rsplit("/p2p/", 1)[1])
        boot.proc.send_signal(signal.SIGINT)
        assert boot.wait(timeout=60) == 0
    assert lines[0] == lines[1]
    assert identity.exists()


@pytest.mark.swarm
def test_ctrl_c_saves_and_leaves(launcher, tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole process group, hivemind's helpers included."""
    import os

    from benchmarks.local_peers import read_stats, wait_for_stats
    from tests.swarm.paths import TEST_CONFIG

    stats = tmp_path / "stats.jsonl"
    peer = launcher.start("solo", ["-c", str(TEST_CONFIG), "--new-swarm", "--state-dir", str(tmp_path / "solo"), "--stats-file", str(stats)])
    wait_for_stats(stats, lambda r: len(r) >= 3, timeout=180, processes=[peer])
    os.killpg(peer.pid, signal.SIGINT)
    assert peer.wait(timeout=90) == 0, peer.stderr()[-3000:]
    assert (tmp_path / "solo" / "trainer.safetensors").exists()
    assert len(list((tmp_path / "solo" / "experts").glob("*.safetensors"))) == 8
    steps_done = read_stats(stats)[-1]["micro_batches"]
    from safetensors import safe_open
    import json

    with safe_open(str(tmp_path / "solo" / "trainer.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["counters"])["micro_batches"] == steps_done
