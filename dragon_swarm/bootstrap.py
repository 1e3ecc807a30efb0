"""`python -m dragon_swarm.bootstrap`: a DHT node with a stable identity that others join through."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from dragon_swarm.cli import CleanArgumentParser, StopSignal, fail, print_line, run_and_exit, setup_logging

PROG = "dragon_swarm.bootstrap"
logger = logging.getLogger(PROG)


def build_parser() -> CleanArgumentParser:
    p = CleanArgumentParser(prog=PROG, description="Run a fixed bootstrap node of a dragon_swarm swarm.")
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], help="listen addresses, e.g. /ip4/0.0.0.0/tcp/31337")
    p.add_argument("--announce-maddrs", nargs="+", default=[], help="public addresses others should dial")
    p.add_argument("--identity", type=Path, default=None, help="private key file; same peer id across restarts (created if missing)")
    p.add_argument("--initial-peers", nargs="+", default=[], help="other bootstrap nodes to link with")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    stop = StopSignal()
    stop.install()

    from dragon_swarm.swarm.dht_node import initial_peers_line, start_dht

    try:
        dht = start_dht(
            initial_peers=args.initial_peers,
            host_maddrs=args.host_maddrs,
            announce_maddrs=args.announce_maddrs,
            identity_path=args.identity,
        )
    except Exception as e:
        fail(PROG, f"could not start the DHT node: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    try:
        logger.info(f"Bootstrap node up, peer id {dht.peer_id.to_base58()}")
        print_line(initial_peers_line(dht))
        while not stop.event.wait(60.0):
            logger.info("Bootstrap node alive")
    finally:
        logger.info("Shutting down")
        dht.shutdown()
    return 0


def run() -> None:
    run_and_exit(main)


if __name__ == "__main__":
    run()
