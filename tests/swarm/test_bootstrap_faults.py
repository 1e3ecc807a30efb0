"""The bootstrap goes down (issue 12, item 1): running peers keep training; a new peer given two bootstraps joins
through the live one; the bootstrap restarted with the same identity and port is joinable again. Real peers on
loopback, SIGKILL for the fault."""

from __future__ import annotations

import time

import pytest

from benchmarks.local_peers import read_stats, wait_for_stats
from benchmarks.wan_link import free_port
from tests.swarm.paths import TEST_CONFIG

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


def bootstrap_args(log_dir, name: str, port: int, *extra: str) -> list[str]:
    return ["--identity", str(log_dir / f"{name}.key"), "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", *extra]


def test_peers_outlive_their_bootstrap_and_join_through_another_or_its_restart(module_launcher):
    launch, log_dir = module_launcher.start, module_launcher.log_dir
    port1, port2 = free_port(), free_port()
    boot1 = launch("boot1", bootstrap_args(log_dir, "boot1", port1), module="dragon_swarm.bootstrap")
    first = boot1.initial_peers()
    boot2 = launch("boot2", bootstrap_args(log_dir, "boot2", port2, "--initial-peers", *first), module="dragon_swarm.bootstrap")
    second = boot2.initial_peers()
    common = ["-c", str(TEST_CONFIG)]
    host = launch("host", [*common, "--initial-peers", *first, *second, "--no-train", "--experts", "all", "--state-dir", str(log_dir / "host")])
    host.wait_for_log("Serving 8 expert(s)", timeout=120)
    stats = log_dir / "runner.jsonl"
    runner = launch("runner", [*common, "--initial-peers", *first, "--no-host", "--state-dir", str(log_dir / "runner"), "--stats-file", str(stats)])
    wait_for_stats(stats, lambda r: len(r) >= 3, 180, [runner, host])

    boot1.kill_hard()  # the bootstrap the runner joined through is gone
    before = len(read_stats(stats))
    time.sleep(10)
    assert len(read_stats(stats)) > before + 2, "the running trainer stopped training when its bootstrap died"

    # a newcomer given both bootstraps joins through the live one and trains with the swarm's experts
    late_stats = log_dir / "late.jsonl"
    late = launch("late", [*common, "--initial-peers", *first, *second, "--no-host", "--max-steps", "3",
                           "--state-dir", str(log_dir / "late"), "--stats-file", str(late_stats)])  # fmt: skip
    assert late.wait(timeout=180) == 0, late.stderr()[-3000:]
    assert read_stats(late_stats)[-1]["experts_online"] == 8

    # the bootstrap restarted with the same key and port has the same address; a newcomer joins through it alone
    again = launch("boot1-again", bootstrap_args(log_dir, "boot1", port1, "--initial-peers", *second), module="dragon_swarm.bootstrap")
    assert again.initial_peers() == first
    newcomer = launch("newcomer", [*common, "--initial-peers", *first, "--no-host", "--max-steps", "2",
                                   "--state-dir", str(log_dir / "newcomer")])  # fmt: skip
    assert newcomer.wait(timeout=180) == 0, newcomer.stderr()[-3000:]
    assert "Found experts: 8 of 8 online" in newcomer.stderr()
    runner.stop()
