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
    p.add_argument("--monitor", action="store_true", help="also watch the swarm of -c CONFIG: read-only dashboard and /metrics")
    p.add_argument("-c", "--config", default=None, help="the swarm's config (YAML path or name in configs/), needed by --monitor")
    p.add_argument("--dashboard", default=None, metavar="[HOST:]PORT", help="where --monitor serves its dashboard (default: a free loopback port)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = dashboard = None
    if (args.dashboard is not None or args.config is not None) and not args.monitor:
        parser.error("--dashboard and -c go with --monitor")
    if args.monitor:
        from dragon_swarm.config import ConfigError, load_config
        from dragon_swarm.monitor.dashboard import parse_listen_address

        try:
            config = load_config(args.config)
        except ConfigError as e:
            fail(PROG, str(e))
        try:
            dashboard = parse_listen_address(args.dashboard) if args.dashboard else ("127.0.0.1", 0)
        except ValueError as e:
            parser.error(f"--dashboard: {e}")
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
    session = None
    try:
        logger.info(f"Bootstrap node up, peer id {dht.peer_id.to_base58()}")
        print_line(initial_peers_line(dht))
        if config is not None:
            try:
                session = start_monitor(dht, config, dashboard)
            except OSError as e:  # the dashboard's port is taken or the address is not ours
                fail(PROG, f"--dashboard {dashboard[0]}:{dashboard[1]}: {e.strerror or e}")
        while not stop.event.wait(60.0):
            if session is None:
                logger.info("Bootstrap node alive")
            else:
                log_swarm_summary(session.status.snapshot())
    finally:
        logger.info("Shutting down")
        if session is not None:
            session.shutdown()
        dht.shutdown()
    return 0


def start_monitor(dht, config, dashboard: tuple[str, int]):
    """Watch the swarm from signed DHT records and serve the read-only dashboard (with /metrics)."""
    from dragon_swarm.monitor.session import VolunteerSession
    from dragon_swarm.monitor.status import PeerState

    session = VolunteerSession(config, None, "bootstrap monitor", "monitor", dashboard, panel=False, read_only=True, swarm_refresh_s=5.0)
    session.start_display()
    session.attach(dht, update_model_from_dht=True)
    session.set_state(PeerState.MONITORING)
    logger.info(f"Monitoring swarm {config.run_prefix}")
    return session


def log_swarm_summary(snapshot: dict) -> None:
    s, m = snapshot["swarm_stats"], snapshot["model"]
    logger.info(
        f"Swarm: {s['peers_alive']} peer(s) alive, {s['trainers']} trainer(s), experts {s['experts_online']}/{s['experts_total']} "
        f"online ({s['replicas']} replicas), model version {m['global_epoch']}, {s['swarm_tokens']:,} tokens trained"
    )


def run() -> None:
    run_and_exit(main)


if __name__ == "__main__":
    run()
