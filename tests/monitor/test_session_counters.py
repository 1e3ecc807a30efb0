"""VolunteerSession's contribution counters without a swarm: what the expert host served up to the moment the
peer leaves is counted and saved."""

import json
import threading

from dragon_swarm.config import load_config
from dragon_swarm.monitor.session import VolunteerSession
from tests.swarm.paths import TEST_CONFIG


class CountingHost:
    """Stands in for ExpertHost.stats(): a request counter the test moves."""

    def __init__(self) -> None:
        self.requests = 0
        self.lock = threading.Lock()

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"expert_requests": self.requests}


def test_requests_served_just_before_leaving_are_counted_and_saved(tmp_path):
    config = load_config(str(TEST_CONFIG))
    session = VolunteerSession(config, tmp_path, "ada", "trainer+host", dashboard=None, panel=False)
    host = CountingHost()
    session.count_host_requests(host)
    with host.lock:
        host.requests = 130  # served within the counter's 5 s period, right before the peer leaves

    session.leave()
    session.publish_and_save()  # what leave() does once the peer has joined a DHT

    assert session.counters.expert_requests == 130
    saved = json.loads((tmp_path / "contributions.json").read_text())
    assert saved["expert_requests"] == 130
    session.shutdown()
