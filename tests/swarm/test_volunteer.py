"""What a volunteer sees and does, against real peers on loopback: the dashboard's Start/Stop in headless
Chromium, the bootstrap monitor and /metrics, SIGINT leaving a consistent state dir, counters surviving a
restart, the live panel in a pseudo-terminal, and `--batch-size auto` under a small memory cap.

One swarm per module (a bootstrap with --monitor and one peer that trains and hosts all experts); the tests
run in file order and the last ones stop and restart that peer.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dragon_swarm.state.checkpoint import load_tensors
from benchmarks.local_peers import PeerProcess, REPO_ROOT, read_stats, wait_for_stats
from tests.monitor.browser import chromium_driver, require_browser
from tests.pty_run import run_on_pty, screen_text
from tests.swarm.paths import TEST_CONFIG

pytestmark = pytest.mark.swarm

DASHBOARD_URL = re.compile(r"Dashboard at (http://\S+/)")
WAIT_S = 90.0


def dashboard_url(process: PeerProcess, timeout: float = WAIT_S) -> str:
    process.wait_for_log("Dashboard at ", timeout)
    return DASHBOARD_URL.search(process.stderr()).group(1)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_until(condition, message: str, timeout: float = WAIT_S, processes: tuple[PeerProcess, ...] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for process in processes:
            if process.proc.poll() is not None:
                raise AssertionError(f"{process.name} exited with {process.proc.returncode}: {process.stderr()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(message)


class Swarm:
    def __init__(self, launcher, work: Path):
        self.launcher, self.work = launcher, work
        self.state_dir, self.stats = work / "alice", work / "alice.jsonl"
        self.boot = launcher.start(
            "monitor", ["--monitor", "-c", str(TEST_CONFIG), "--dashboard", "0"], module="dragon_swarm.bootstrap"
        )
        self.initial_peers = self.boot.initial_peers()
        self.peer = self.start_peer("alice")

    def start_peer(self, name: str, *extra: str) -> PeerProcess:
        args = ["-c", str(TEST_CONFIG), "--initial-peers", *self.initial_peers, "--name", "alice", "--experts", "all",
                "--state-dir", str(self.state_dir), "--stats-file", str(self.stats), "--dashboard", "0", *extra]  # fmt: skip
        return self.launcher.start(name, args)


@pytest.fixture(scope="module")
def swarm(module_launcher, tmp_path_factory) -> Swarm:
    return Swarm(module_launcher, tmp_path_factory.mktemp("volunteer"))


@pytest.mark.browser
def test_dashboard_stop_and_start_pause_and_resume_a_real_peer(swarm):
    require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = dashboard_url(swarm.peer)
    wait_for_stats(swarm.stats, lambda records: len(records) >= 2, WAIT_S, [swarm.peer])
    with chromium_driver() as driver:
        driver.get(url)

        def wait(condition, message):
            return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(lambda _: condition(), message)

        def shown_step() -> int:
            text = driver.find_element(By.ID, "micro-batches").text.replace(",", "")
            return int(text) if text.isdigit() else -1

        wait(lambda: shown_step() >= 2, "the dashboard never showed the peer's steps")
        wait(lambda: driver.find_element(By.ID, "state").text in ("TRAINING", "AVERAGING"), "state not shown")
        wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#expert-map .cell.online")) == 8, "swarm map incomplete")

        driver.find_element(By.ID, "stop-button").click()
        wait(lambda: get_json(url + "api/status")["state"] == "IDLE", "Stop did not pause the peer")
        paused_at = len(read_stats(swarm.stats))
        wait(lambda: driver.find_element(By.ID, "state").text.startswith("IDLE"), "the page did not show IDLE")
        time.sleep(6.0)  # several steps' worth of time: a running peer would have stepped
        assert len(read_stats(swarm.stats)) == paused_at, "the peer kept stepping after Stop"
        assert "Paused at micro-batch" in swarm.peer.stderr()
        # a paused peer takes its experts offline (announced in the DHT)
        monitor = dashboard_url(swarm.boot)
        wait(lambda: get_json(monitor + "api/status")["swarm_stats"]["experts_online"] == 0, "experts stayed online")

        driver.find_element(By.ID, "start-button").click()
        wait_for_stats(swarm.stats, lambda records: len(records) >= paused_at + 2, WAIT_S, [swarm.peer])
        wait(lambda: shown_step() >= paused_at + 2, "the page did not show the resumed steps")
        assert "Resuming training at micro-batch" in swarm.peer.stderr()


def test_bootstrap_monitor_shows_the_swarm_read_only(swarm):
    url = dashboard_url(swarm.boot)

    def complete():
        status = get_json(url + "api/status")
        s = status["swarm_stats"]
        return status if s["experts_online"] == 8 and s["trainers"] >= 1 and s["peers_alive"] >= 1 else None

    status = wait_until(complete, "the monitor never saw the peer and its 8 experts", processes=(swarm.boot, swarm.peer))
    assert status["read_only"] and status["state"] == "MONITORING"
    assert [row["name"] for row in status["leaderboard"]] == ["alice"]
    assert len(status["expert_map"]) == 8 and all(cell["hosts"] == 1 for cell in status["expert_map"])
    metrics = urllib.request.urlopen(url + "metrics", timeout=10).read().decode()
    assert re.search(r"^dragon_experts_online 8(\.0)?$", metrics, re.M), metrics
    assert re.search(r'^dragon_peer_state\{state="MONITORING"\} 1(\.0)?$', metrics, re.M), metrics
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(url + "api/stop", data=b"", method="POST"), timeout=10)
    assert refused.value.code == 403


def test_peer_metrics_follow_its_steps(swarm):
    url = dashboard_url(swarm.peer)
    steps = len(read_stats(swarm.stats))
    metrics = urllib.request.urlopen(url + "metrics", timeout=10).read().decode()
    shown = int(float(re.search(r"^dragon_micro_batches_total (\S+)$", metrics, re.M).group(1)))
    assert shown >= steps - 1  # the stats line and the status board are written in the same step
    assert re.search(r"^dragon_tokens_per_second \d", metrics, re.M), metrics


def test_sigint_finishes_the_step_and_leaves_a_consistent_state_dir(swarm):
    swarm.peer.proc.send_signal(signal.SIGINT)
    assert swarm.peer.wait(timeout=120) == 0, swarm.peer.stderr()[-3000:]
    records = read_stats(swarm.stats)
    counters = json.loads((swarm.state_dir / "contributions.json").read_text())
    assert counters["batches"] == records[-1]["micro_batches"], (counters, records[-1])  # no contribution lost
    assert counters["tokens"] == records[-1]["tokens"]
    tensors, metadata = load_tensors(swarm.state_dir / "trainer.safetensors")
    assert json.loads(metadata["counters"])["micro_batches"] == records[-1]["micro_batches"]
    for uid in range(8):
        load_tensors(next((swarm.state_dir / "experts").glob(f"*_ffn.{uid // 4}.{uid % 4}.safetensors")))
    leftovers = [p.name for p in swarm.state_dir.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert not leftovers, leftovers
    assert "Contribution saved" in swarm.peer.stderr()


def test_restart_continues_the_counters(swarm):
    before = json.loads((swarm.state_dir / "contributions.json").read_text())
    steps_before = read_stats(swarm.stats)[-1]["micro_batches"]
    restarted = swarm.start_peer("alice-again", "--max-steps", str(steps_before + 2))
    assert restarted.wait(timeout=300) == 0, restarted.stderr()[-3000:]
    after = json.loads((swarm.state_dir / "contributions.json").read_text())
    assert f"Resumed trainer at micro-batch {steps_before}" in restarted.stderr()
    assert after["batches"] == before["batches"] + 2
    assert after["tokens"] > before["tokens"]
    assert after["uptime_s"] > before["uptime_s"]
    assert after["peer_id"] == before["peer_id"]


def test_panel_shows_real_numbers_in_a_terminal(tmp_path):
    stats = tmp_path / "stats.jsonl"
    args = [sys.executable, "-m", "dragon_swarm.peer", "--new-swarm", "-c", str(TEST_CONFIG), "--max-steps", "4",
            "--state-dir", str(tmp_path / "state"), "--stats-file", str(stats), "--name", "panel-test"]  # fmt: skip
    code, raw = run_on_pty(args, timeout_s=240)
    screen = screen_text(raw)
    assert code == 0, screen[-3000:]
    last = read_stats(stats)[-1]
    assert "panel-test" in screen
    assert "TRAINING" in screen or "AVERAGING" in screen
    assert f"last loss {last['loss']:.3f}" in screen  # the closing summary: the same number as the stats file
    assert "Activity" in screen and "Swarm" in screen
    assert "INFO dragon_swarm" not in screen  # log lines went into the panel, not over it


def test_batch_size_auto_respects_a_small_memory_cap(tmp_path):
    stats = tmp_path / "stats.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "dragon_swarm.peer", "--new-swarm", "-c", str(TEST_CONFIG), "--no-panel", "--max-steps", "1",
         "--batch-size", "auto", "--max-memory", "120MiB", "--state-dir", str(tmp_path / "s"), "--stats-file", str(stats)],
        capture_output=True, text=True, timeout=400, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = re.search(r"Batch size auto: (\d+) sequences \(measured ([\d.]+) (KiB|MiB|GiB) per step", result.stderr)
    assert chosen, result.stderr[-3000:]
    batch, measured = int(chosen.group(1)), float(chosen.group(2)) * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[chosen.group(3)]
    assert measured <= 120
    assert 1 <= batch < 256  # the cap, not the search's upper bound, decided
    assert read_stats(stats)[0]["tokens"] == batch * 32  # the trainer used it (seq_len 32 in the test config)
