"""The terminal panel: what it shows for a snapshot, that it runs on a real pseudo-terminal without being torn
by log lines, and that logging is rerouted into the activity log and back."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rich.console import Console

from dragon_swarm.monitor.panel import (
    PanelLogHandler,
    human_count,
    human_duration,
    install_panel_logging,
    progress_bar,
    render_panel,
    should_use_panel,
    sparkline,
)
from dragon_swarm.monitor.status import LeaderboardRow, PeerState, PeerStatus, SwarmStats
from tests.pty_run import run_on_pty, screen_text

REPO_ROOT = Path(__file__).resolve().parents[2]


def as_text(renderable, width: int = 120) -> str:
    console = Console(record=True, width=width, force_terminal=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def busy_peer() -> PeerStatus:
    status = PeerStatus("alice", "12D3KooWAlicePeerIdentity", "demo-swarm")
    status.set_state(PeerState.TRAINING)
    t0 = time.time() - 3600
    for micro_batch in range(1, 61):
        status.record_step(micro_batch, 5.0 - micro_batch * 0.0443, 1500.0, when=t0 + micro_batch)  # last: 2.342
    status.record_step(61, 2.345, 1234.0, when=t0 + 61)
    status.update_model(global_epoch=42, local_epoch=41, samples_accumulated=37, target_batch_size=64)
    status.update_contribution(
        micro_batches=1234, tokens=5_600_000, expert_requests=789, uptime_s=3725.0, badge="early bird"
    )
    status.update_swarm(
        stats=SwarmStats(
            peers_alive=12,
            trainers=8,
            experts_online=30,
            experts_total=32,
            replicas=64,
            swarm_tokens=123_456_789,
            banned_peers=["12D3KooWBad"],
        ),
        leaderboard=[
            LeaderboardRow(f"volunteer-{i}", f"pid-{i}", 10_000_000 - i * 1_000_000, 500 - i, 10 * i, 7200.0, None)
            for i in range(7)
        ],
    )
    for i in range(30):
        status.record_event(f"event {i:02d}: averaged with 3 peers in 1.2 s", when=t0 + 100 + i)
    return status


# --- render_panel ---


def test_panel_shows_the_snapshot() -> None:
    text = as_text(render_panel(busy_peer().snapshot()))

    for expected in ("alice", "demo-swarm", "TRAINING", "Model version", "42", "37/64 samples", "58%"):
        assert expected in text, expected
    assert "2.345" in text  # loss, 3 decimals
    assert "5.60M" in text and "789" in text  # tokens, expert requests
    assert re.search(r"Micro-batches\s+1\.23k", text)  # the contribution's micro-batches, labelled as such
    assert "Loss, last 61 micro-batches" in text  # the loss chart's points, named for what they are
    assert "1h 02m" in text and "early bird" in text
    assert "30/32" in text and "123M" in text  # experts online/total, swarm tokens
    assert "1.23k" in text  # tokens/s of the last micro-batch
    # top 5 by tokens, not the 6th
    for i in range(5):
        assert f"volunteer-{i}" in text
    assert "volunteer-5" not in text
    assert any(block in text for block in "▁▂▃▄▅▆▇█")  # the loss sparkline
    # the newest events are shown, newest at the bottom; the oldest fell off
    assert "event 29" in text and "event 28" in text and "event 00" not in text
    assert text.index("event 28") < text.index("event 29")
    assert re.search(r"\d\d:\d\d:\d\d event 29", text)


def test_panel_fits_the_width_and_height() -> None:
    snapshot = busy_peer().snapshot()
    for width in (100, 120):
        lines = as_text(render_panel(snapshot, width=width, height=40), width=width).splitlines()
        assert len(lines) == 40
        assert max(len(line) for line in lines) <= width
        assert "event 29" in lines[-2]  # the newest event sits right above the log box's bottom border

    # a short terminal drops the leaderboard and chart before the activity log
    short = as_text(render_panel(snapshot, width=120, height=24)).splitlines()
    assert len(short) <= 24 and "event 29" in "\n".join(short)


def test_paused_badge_and_narrow_terminal() -> None:
    status = busy_peer()
    status.set_paused(True)
    text = as_text(render_panel(status.snapshot(), width=80), width=80)
    assert "TRAINING" in text and "PAUSED" in text and "37/64" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_empty_snapshots_render() -> None:
    fresh = as_text(render_panel(PeerStatus("bob", "pid-bob", "s").snapshot()))
    assert "JOINING" in fresh and "no activity yet" in fresh and "—" in fresh

    bare = as_text(render_panel({}, width=100, height=30), width=100)
    assert "—" in bare

    odd = {
        "training": {"loss": float("nan"), "tokens_per_second": None},
        "model": {"samples_accumulated": None, "target_batch_size": None},
        "history": [{"loss": float("nan")}],
        "events": [{"t": None, "message": None}],
        "leaderboard": [{"name": None, "tokens": None}],
        "swarm_stats": {"banned_peers": None},
    }
    assert "nan" in as_text(render_panel(odd))


def test_monitor_charts_the_swarm_by_model_version() -> None:
    status = PeerStatus("watcher", "pid-mon", "demo-swarm", role="monitor", read_only=True)
    status.set_state(PeerState.MONITORING)
    for epoch in range(3, 8):
        status.record_swarm_point(epoch, 3.0 - epoch * 0.1, 5000.0)
    snapshot = status.snapshot()
    assert snapshot["history_x"] == "epoch" and [p["x"] for p in snapshot["history"]] == [3, 4, 5, 6, 7]
    assert snapshot["training"]["micro_batches"] == 0  # a monitor trains nothing itself
    text = as_text(render_panel(snapshot, width=120, height=40), width=120)
    assert "Loss, last 5 model versions" in text and "2.300" in text  # the median loss at version 7


def test_formatting_helpers() -> None:
    assert [human_count(v) for v in (None, 0, 999, 1234, 12_345, 999_999, 5_600_000, 2.5e9)] == [
        "—",
        "0",
        "999",
        "1.23k",
        "12.3k",
        "1.00M",
        "5.60M",
        "2.50B",
    ]
    assert [human_duration(v) for v in (None, 45, 185, 3725, 2 * 86400 + 3 * 3600)] == [
        "—",
        "45s",
        "3m 05s",
        "1h 02m",
        "2d 03h",
    ]
    assert progress_bar(37, 64, 10).plain.startswith("█████")
    assert progress_bar(0, 0, 10).plain == "░" * 10
    assert progress_bar(64, 64, 10).plain == "█" * 10

    assert sparkline([], 10) == []
    assert sparkline([1.0, 2.0, 3.0], 10) == ["▁▅█"]
    assert len(sparkline(list(range(100)), 20, rows=3)) == 3
    assert all(len(line) == 20 for line in sparkline([float(i) for i in range(100)], 20, rows=3))


# --- the live panel on a pseudo-terminal ---

PANEL_SCRIPT = textwrap.dedent(
    """
    import logging, sys, time
    from dragon_swarm.monitor.panel import TerminalPanel, install_panel_logging, should_use_panel
    from dragon_swarm.monitor.status import PeerState, PeerStatus

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    print("USE_PANEL=" + str(should_use_panel()), flush=True)
    status = PeerStatus("pty-peer", "pid-pty", "pty-swarm")
    undo = install_panel_logging(status)
    panel = TerminalPanel(status, refresh_per_second=8)
    panel.start()
    status.set_state(PeerState.TRAINING)
    for micro_batch in range(1, 4):
        status.record_step(micro_batch, 2.5 - micro_batch * 0.1, 321.0)
        time.sleep(0.1)
    status.update_model(global_epoch=17, local_epoch=17, samples_accumulated=37, target_batch_size=64)
    status.update_contribution(micro_batches=4242, tokens=987, expert_requests=55)
    logging.getLogger("peer").info("hello from the log")
    time.sleep(2)
    panel.shutdown()
    panel.shutdown()
    undo()
    """
)


def test_live_panel_on_a_pseudo_terminal() -> None:
    code, raw = run_on_pty([sys.executable, "-c", PANEL_SCRIPT])
    text = screen_text(raw)

    assert code == 0, text[-3000:]
    assert "USE_PANEL=True" in text
    for expected in ("pty-peer", "pty-swarm", "TRAINING", "Model version", "17", "37/64 samples", "4.24k", "987", "55"):
        assert expected in text, expected
    assert "2.200" in text  # the last loss, 3 decimals
    assert "hello from the log" in text  # the log line landed in the activity box...
    assert "INFO peer: hello from the log" not in text  # ...and not as a raw line that would tear the panel
    assert "pty-peer left swarm pty-swarm: 4.24k micro-batches, 987 tokens, 55 expert requests served" in text
    assert text.count("left swarm") == 1  # the second shutdown() did nothing


def test_should_use_panel_only_on_a_terminal() -> None:
    master, slave = pty.openpty()
    read_end, write_end = os.pipe()
    with os.fdopen(slave, "w") as tty, os.fdopen(write_end, "w") as pipe:
        term = {"TERM": "xterm-256color"}
        assert should_use_panel(tty, term)
        assert not should_use_panel(pipe, term)
        assert not should_use_panel(tty, {"TERM": "dumb"})
        assert not should_use_panel(tty, {**term, "DRAGON_NO_PANEL": "1"})
        assert not should_use_panel(io.StringIO(), term)
    assert not should_use_panel(tty, term)  # closed
    os.close(master)
    os.close(read_end)


# --- logging into the panel ---


@pytest.fixture
def clean_root():
    """Give the test a root logger of its own and put pytest's handlers back afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    root.handlers[:] = []
    root.setLevel(logging.INFO)
    try:
        yield root
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_log_handler_records_info_and_above(clean_root) -> None:
    status = PeerStatus("p", "pid", "s")
    handler = PanelLogHandler(status)
    handler.setFormatter(logging.Formatter("%(message)s"))
    clean_root.addHandler(handler)
    log = logging.getLogger("dragon_swarm.test_panel")

    log.debug("too chatty")
    log.info("Joined the swarm with %d peers", 7)
    try:
        raise ValueError("bad shard")
    except ValueError:
        log.exception("Step failed")

    messages = [e["message"] for e in status.snapshot()["events"]]
    assert messages == ["Joined the swarm with 7 peers", "Step failed (ValueError: bad shard)"]


def test_log_handler_ignores_reentrant_logging(clean_root) -> None:
    status = PeerStatus("p", "pid", "s")
    log = logging.getLogger("dragon_swarm.test_panel.reentrant")
    status.add_event_listener(lambda event: log.info("listener saw %s", event["message"]))
    clean_root.addHandler(PanelLogHandler(status))

    log.info("once")

    assert [e["message"] for e in status.snapshot()["events"]] == ["once"]


def test_install_and_undo_panel_logging(clean_root, tmp_path: Path) -> None:
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stdout = logging.StreamHandler(sys.stdout)
    to_file = logging.FileHandler(tmp_path / "peer.log")
    clean_root.handlers[:] = [to_stderr, to_file, to_stdout]
    status = PeerStatus("p", "pid", "s")

    undo = install_panel_logging(status)
    try:
        assert to_stderr not in clean_root.handlers and to_stdout not in clean_root.handlers
        assert to_file in clean_root.handlers  # files are not the terminal: keep writing them
        panel_handlers = [h for h in clean_root.handlers if isinstance(h, PanelLogHandler)]
        assert len(panel_handlers) == 1 and panel_handlers[0].level == logging.INFO
        logging.getLogger("dragon_swarm.test_panel").info("Downloaded state at epoch %d", 3)
        assert status.snapshot()["events"][-1]["message"] == "Downloaded state at epoch 3"
    finally:
        undo()
        to_file.close()

    assert clean_root.handlers == [to_stderr, to_file, to_stdout]
    undo()  # twice is harmless
    assert clean_root.handlers == [to_stderr, to_file, to_stdout]
