"""VolunteerSession's contribution counters without a swarm, fed by events: what the expert host served up to the
moment the peer leaves is counted and saved."""

import json

from dragon_swarm.config import load_config
from dragon_swarm.events import EventBus, HostReport, StepReport
from dragon_swarm.moe.host import HostReporter
from dragon_swarm.monitor.session import VolunteerSession
from tests.swarm.paths import TEST_CONFIG


class CountingHost:
    """Stands in for ExpertHost.report(): a request counter the test moves."""

    requests = 0

    def report(self) -> HostReport:
        return HostReport(experts_served=8, tokens_processed=0, requests_served=self.requests, updates=0)


def step(n: int) -> StepReport:
    return StepReport(
        micro_batches=n, epoch=0, loss=5.0, aux_loss=0.0, tokens=256 * n, batch_tokens=256, samples_per_second=1.0,
        tokens_per_second=256.0, peers=1, experts_online=8, expert_failures=0, banned_peers=(), rejected_parts=0,
        global_epoch=0, samples_accumulated=0, target_batch_size=32,
    )  # fmt: skip


def test_requests_served_just_before_leaving_are_counted_and_saved(tmp_path):
    config = load_config(str(TEST_CONFIG))
    bus = EventBus()
    session = VolunteerSession(config, tmp_path, "ada", "trainer+host", dashboard=None, panel=False, bus=bus)
    host = CountingHost()
    reporter = HostReporter(host.report, bus, period_s=60.0)  # the period never comes round in this test
    reporter.start()
    host.requests = 130  # served within the reporter's period, right before the peer leaves
    reporter.stop()  # the owner stops the host's duties before the final contribution record

    session.leave()
    session.publish_and_save()  # what leave() does once the peer has joined a DHT

    assert session.counters.expert_requests == 130
    saved = json.loads((tmp_path / "contributions.json").read_text())
    assert saved["expert_requests"] == 130
    session.shutdown()


def test_step_reports_count_micro_batches_and_tokens(tmp_path):
    config = load_config(str(TEST_CONFIG))
    bus = EventBus()
    session = VolunteerSession(config, tmp_path, "ada", "trainer", dashboard=None, panel=False, bus=bus)
    for n in (1, 2, 3):
        bus.publish(step(n))
    snapshot = session.status.snapshot()
    assert session.counters.batches == 3 and session.counters.tokens == 3 * 256
    assert snapshot["contribution"]["micro_batches"] == 3
    session.shutdown()
