"""A benchmark stopped with SIGTERM stops the peers it started (`benchmarks.local_peers.stop_peers_on_sigterm`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from benchmarks.local_peers import REPO_ROOT

# a stand-in benchmark: starts one long-lived child through PeerLauncher (a plain HTTP server, no swarm needed),
# prints its PID and waits, as a benchmark does while its peers train
BENCHMARK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from benchmarks.local_peers import PeerLauncher, stop_peers_on_sigterm
    stop_peers_on_sigterm()
    launcher = PeerLauncher(Path(sys.argv[1]))
    try:
        child = launcher.start("server", ["0", "--bind", "127.0.0.1"], module="http.server")
        print(child.pid, flush=True)
        time.sleep(120)
    finally:
        launcher.stop_all()
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_a_benchmark_stops_its_peers(tmp_path):
    bench = subprocess.Popen([sys.executable, "-c", BENCHMARK, str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(bench.stdout.readline())
        assert alive(child)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)  # reaped by the launcher's stop: gone, not a zombie of ours
        assert not alive(child), "the benchmark left its peer running"
    finally:
        if bench.poll() is None:
            bench.kill()
        if child is not None and alive(child):
            os.killpg(child, signal.SIGKILL)
