"""End to end: headless Chromium drives the dashboard of a fake trainer; Stop really stops its micro-batches."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from dragon_swarm.events import PauseGate
from dragon_swarm.monitor.dashboard import Dashboard
from dragon_swarm.monitor.status import ExpertCell, LeaderboardRow, PeerState, PeerStatus, SwarmStats
from tests.monitor.browser import chromium_driver, require_browser
from tests.monitor.serving import serving, wired_gate

pytestmark = pytest.mark.browser

WAIT_S = 20
SCREENSHOT = "/tmp/dashboard.png"
EXPERTS = [ExpertCell(f"expert.{i}", hosts=(i % 3) + 1 if i % 4 else 0, online=bool(i % 4)) for i in range(12)]
OTHERS = [
    LeaderboardRow("bob", "QmBob", 2_500_000, 1220, 48_000, 7200.0, "Founding dragon"),
    LeaderboardRow("carol", "QmCarol", 1_200_000, 600, 12_345, 3600.0, None),
    LeaderboardRow("dave", "QmDave", 90_000, 44, 0, 600.0, None),
]


class FakeTrainer:
    """Trains micro-batches while the gate is open, like the real trainer: a pause takes effect between two.

    `lock` is held for the whole of a micro-batch, so a test that holds it knows none is half done.
    """

    def __init__(self, status: PeerStatus, gate: PauseGate, step_s: float = 0.1):
        self.status, self.gate, self.step_s = status, gate, step_s
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-trainer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        micro_batch = 0
        while self.gate.wait_until_running(self._stop):
            with self.lock:
                if self.gate.paused:  # paused between the wait and the lock: do not start a micro-batch
                    continue
                micro_batch += 1
                self._train(micro_batch)
            self._stop.wait(self.step_s)

    def _train(self, micro_batch: int) -> None:
        tokens = micro_batch * 2048
        loss = 4.0 / (1 + 0.05 * micro_batch) + 0.05 * (micro_batch % 3)
        self.status.record_step(micro_batch, loss=loss, tokens_per_second=20_000 + 150 * (micro_batch % 7))
        self.status.update_contribution(
            micro_batches=micro_batch,
            tokens=tokens,
            expert_requests=micro_batch * 3,
            uptime_s=3600 + micro_batch * self.step_s,
            badge="Early bird",
        )
        self.status.update_model(
            global_epoch=5 + micro_batch // 20, samples_accumulated=(micro_batch % 20) * 16, target_batch_size=320
        )
        me = LeaderboardRow("ada", "QmAda", tokens, micro_batch, micro_batch * 3, 3600.0, "Early bird")
        rows = sorted([*OTHERS, me], key=lambda row: row.tokens, reverse=True)
        self.status.update_swarm(
            SwarmStats(
                peers_alive=4,
                trainers=3,
                experts_online=sum(cell.online for cell in EXPERTS),
                experts_total=len(EXPERTS),
                replicas=sum(cell.hosts for cell in EXPERTS),
                swarm_tokens=sum(row.tokens for row in rows),
                banned_peers=["QmMallory"],
            ),
            leaderboard=rows,
        )
        if micro_batch % 10 == 0:
            self.status.record_event(f"Micro-batch {micro_batch}: averaged gradients with 3 trainers in 0.4 s")


def _status(read_only: bool = False) -> PeerStatus:
    role = "monitor" if read_only else "peer"  # read-only is what a bootstrap monitor serves
    status = PeerStatus(name="ada", peer_id="QmAda", swarm="tiny-dragon", role=role, read_only=read_only)
    status.set_state(PeerState.MONITORING if read_only else PeerState.TRAINING)
    status.update_swarm(expert_map=EXPERTS, leaderboard=OTHERS)
    status.record_event("Joined swarm tiny-dragon through 1 bootstrap peer")
    status.record_event("Downloaded the model state from QmBob (global step 5)")
    return status


@pytest.fixture(scope="module")
def driver():
    require_browser()
    with chromium_driver() as chrome:
        yield chrome


@pytest.fixture
def training() -> Iterator[tuple[Dashboard, PeerStatus, PauseGate, FakeTrainer]]:
    status = _status()
    gate = wired_gate(status)
    trainer = FakeTrainer(status, gate)
    with serving(status, gate) as dashboard:
        try:
            trainer.start()
            yield dashboard, status, gate, trainer
        finally:
            trainer.stop()


@pytest.fixture
def monitor() -> Iterator[Dashboard]:
    with serving(_status(read_only=True), None) as dashboard:
        yield dashboard


def _wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda _: condition(), message)


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _count(driver, element_id: str) -> int | None:
    text = _text(driver, element_id).replace(",", "")
    return int(text) if text.isdigit() else None


def _page_micro_batches(driver) -> int | None:
    return _count(driver, "micro-batches")


def _updates(driver) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.updates)"))


def test_dashboard_shows_the_peer_and_start_stop_controls_training(driver, training):
    from selenium.webdriver.common.by import By

    dashboard, status, gate, trainer = training
    driver.get(dashboard.url)

    # The page renders the live status.
    _wait(driver, lambda: _text(driver, "state") == "TRAINING", "state badge never showed TRAINING")
    assert _text(driver, "name") == "ada"
    first = _wait(driver, lambda: _page_micro_batches(driver), "micro-batches never appeared")
    _wait(driver, lambda: (_page_micro_batches(driver) or 0) > first, "micro-batches did not increase while training")
    assert _text(driver, "loss-legend") == "by micro-batch"
    _wait(
        driver,
        lambda: (_count(driver, "contrib-micro-batches") or 0) >= first,
        "the contribution's micro-batches never showed",
    )
    _wait(
        driver,
        lambda: len(driver.find_elements(By.CSS_SELECTOR, "#expert-map .cell")) == len(EXPERTS),
        "expert map does not have one cell per expert",
    )
    assert len(driver.find_elements(By.CSS_SELECTOR, "#expert-map .cell.online")) == sum(c.online for c in EXPERTS)
    _wait(
        driver,
        lambda: len(driver.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")) == len(OTHERS) + 1,
        "leaderboard rows missing",
    )
    assert driver.find_element(By.CSS_SELECTOR, "#leaderboard tbody tr.me").text.split()[1] == "ada"
    assert _text(driver, "loss") not in ("", "—")
    events = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#events li")]
    assert "Joined swarm" in events[-1] and "Downloaded the model state" in events[-2]  # newest first
    start, stop = driver.find_element(By.ID, "start-button"), driver.find_element(By.ID, "stop-button")
    assert stop.is_displayed() and stop.is_enabled() and not start.is_enabled()

    # Let the charts fill a little, then keep a picture of the page for a human to look at.
    _wait(driver, lambda: (_page_micro_batches(driver) or 0) >= 25, "micro-batches never reached 25")
    driver.save_screenshot(SCREENSHOT)

    # Stop: the gate closes, the trainer parks, and the page's micro-batch count stops moving.
    stop.click()
    _wait(driver, lambda: gate.paused, "Stop did not pause the gate")
    with trainer.lock:  # any micro-batch in progress has finished; none will start while paused
        frozen = status.snapshot()["training"]["micro_batches"]
    _wait(driver, lambda: _page_micro_batches(driver) == frozen, "page did not show the last micro-batch")
    _wait(driver, lambda: driver.find_element(By.ID, "paused").is_displayed(), "PAUSED badge missing")
    _wait(driver, lambda: start.is_enabled() and not stop.is_enabled(), "buttons did not flip on pause")
    seen = _updates(driver)
    _wait(driver, lambda: _updates(driver) >= seen + 3, "page stopped polling")  # three fresh polls...
    assert _page_micro_batches(driver) == frozen  # ...all showing the same count
    assert status.snapshot()["training"]["micro_batches"] == frozen

    # Start: training resumes and the count moves again.
    start.click()
    _wait(driver, lambda: not gate.paused, "Start did not resume the gate")
    _wait(driver, lambda: (_page_micro_batches(driver) or 0) > frozen, "micro-batches did not increase after Start")
    _wait(driver, lambda: not driver.find_element(By.ID, "paused").is_displayed(), "PAUSED badge stuck")
    _wait(driver, lambda: stop.is_enabled() and not start.is_enabled(), "buttons did not flip on resume")
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, f"the page logged errors: {errors}"


def test_read_only_dashboard_has_no_controls(driver, monitor):
    from selenium.webdriver.common.by import By

    driver.get(monitor.url)
    _wait(driver, lambda: _text(driver, "state") == "MONITORING", "state badge never showed MONITORING")
    _wait(driver, lambda: _updates(driver) >= 1, "page never rendered")
    for element_id in ("start-button", "stop-button"):
        button = driver.find_element(By.ID, element_id)
        assert not button.is_displayed() and not button.is_enabled()
    assert _text(driver, "micro-batches-unit") == "Model version"  # a monitor shows the swarm's progress
    assert _text(driver, "micro-batches") == "0"
    assert _text(driver, "loss") == "—"  # no loss yet: null renders as a dash
    assert len(driver.find_elements(By.CSS_SELECTOR, "#expert-map .cell")) == len(EXPERTS)
