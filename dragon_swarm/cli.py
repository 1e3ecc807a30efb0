"""Command-line plumbing shared by the peer and the bootstrap: one-line errors, logging."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn


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
