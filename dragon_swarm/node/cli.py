"""Command-line plumbing shared by the peer and the bootstrap: one-line errors, logging."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Callable, NoReturn

logger = logging.getLogger(__name__)


class CleanArgumentParser(argparse.ArgumentParser):
    """Bad flags end with one clear line (and a hint), not a usage dump or a traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # hivemind sets up its own handler; keep one format and spare people its debug chatter
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    quiet = level.upper() != "DEBUG"
    logging.getLogger("hivemind").setLevel(logging.WARNING if quiet else logging.DEBUG)
    # epoch transitions and state downloads are events people want to see
    logging.getLogger("hivemind.optim.optimizer").setLevel(logging.INFO)


def print_line(text: str) -> None:
    """Lines meant for the user (the join command) go to stdout, flushed, so scripts can read them at once."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class StopSignal:
    """First SIGINT/SIGTERM sets `event` (finish the current step, save, leave); a second exits at once.

    hivemind forks helper processes (DHT, task pools, connection handlers) that inherit this handler. In them
    SIGINT is ignored, because Ctrl-C in a terminal reaches the whole process group and the parent still needs
    its DHT to leave cleanly; SIGTERM keeps its default action, which is how the parent stops them.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.owner_pid = os.getpid()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        from dragon_swarm.node.processes import die_with_descendants, exit_now

        if os.getpid() != self.owner_pid:
            if signum == signal.SIGTERM:
                die_with_descendants(signum)  # the DHT process takes its p2pd along
            return
        if self.event.is_set():
            exit_now(128 + signum)
        logger.info(f"Received {signal.Signals(signum).name}: finishing the current step, saving state, leaving")
        self.event.set()


def exit_if_shutdown_hangs(seconds: float) -> threading.Timer:
    """Last resort once state is saved: a peer whose helpers died under it must not hang forever on leaving."""

    def _give_up() -> None:
        from dragon_swarm.node.processes import exit_now

        logger.error(f"Shutdown took over {seconds:.0f} s; exiting without waiting for the rest")
        exit_now(1)

    timer = threading.Timer(seconds, _give_up)
    timer.daemon = True
    timer.start()
    return timer


def run_and_exit(main: Callable[[], int]) -> NoReturn:
    """Run a CLI main, then skip interpreter teardown: everything is saved and shut down by then, and hivemind's
    p2p clients print tracebacks from destructors that no longer have an event loop."""
    from dragon_swarm.node.processes import stop_descendants

    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            sys.stderr.write(f"{e.code}\n")
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    stop_descendants(grace_s=5.0)  # no child outlives the peer, whatever happened above
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
