"""`python -m dragon_swarm.bootstrap` (or `dragon-bootstrap`): a DHT node with a stable identity that others join
through; with `--monitor`, also a read-only view of the swarm (dashboard, `/metrics`, a summary line a minute)."""

from __future__ import annotations

import logging
from typing import Sequence

from dragon_swarm.node.cli import StopSignal, fail, print_line, run_and_exit, setup_logging

PROG = "dragon_swarm.bootstrap"
logger = logging.getLogger(PROG)


def main(argv: Sequence[str] | None = None) -> int:
    from dragon_swarm.node.bootstrap_options import parse_bootstrap_options

    options = parse_bootstrap_options(argv)
    setup_logging(options.log_level)

    from dragon_swarm.node.parent_death import install_parent_death_signal
    from dragon_swarm.node.processes import become_subreaper, stop_descendants
    from dragon_swarm.swarm.admission import admission_policy
    from dragon_swarm.swarm.dht_node import initial_peers_line, join_error, start_dht

    become_subreaper()  # an orphaned p2pd stays ours to stop
    install_parent_death_signal()  # forked children die with this node, even on SIGKILL
    stop = StopSignal()
    stop.install()
    try:
        dht = start_dht(
            initial_peers=options.initial_peers,
            host_maddrs=options.host_maddrs,
            announce_maddrs=options.announce_maddrs,
            identity_path=options.identity,
            admission=admission_policy(options.identity_bits, options.swarm_key, options.initial_peers),
        )
    except Exception as e:
        stop_descendants()
        fail(PROG, join_error(e) if options.initial_peers else f"could not start the DHT node: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    session = None
    try:
        logger.info(f"Bootstrap node up, peer id {dht.peer_id.to_base58()}")
        print_line(initial_peers_line(dht))
        if options.config is not None:
            try:
                session = start_monitor(dht, options.config, options.dashboard)
            except OSError as e:  # the dashboard's port is taken or the address is not ours
                fail(PROG, f"--dashboard {options.dashboard[0]}:{options.dashboard[1]}: {e.strerror or e}")
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
        stop_descendants()
    return 0


def start_monitor(dht, config, dashboard: tuple[str, int]):
    """Watch the swarm from signed DHT records and serve the read-only dashboard (with /metrics)."""
    from dragon_swarm.events import PeerState
    from dragon_swarm.monitor.session import VolunteerSession

    session = VolunteerSession(config, None, "bootstrap monitor", "monitor", dashboard, panel=False, read_only=True, swarm_refresh_s=5.0)
    session.start_display()
    session.attach(dht, update_model_from_dht=True)
    session.status.set_state(PeerState.MONITORING)
    logger.info(f"Monitoring swarm {config.run_prefix}")
    return session


def log_swarm_summary(snapshot: dict) -> None:
    s, m = snapshot["swarm_stats"], snapshot["model"]
    held_out = snapshot.get("held_out") or {}
    val = "" if held_out.get("loss") is None else f", held-out loss {held_out['loss']:.3f} at model version {held_out['model_version']} (median over trainers)"
    logger.info(
        f"Swarm: {s['peers_alive']} peer(s) alive, {s['trainers']} trainer(s), experts {s['experts_online']}/{s['experts_total']} "
        f"online ({s['replicas']} replicas), model version {m['global_epoch']}, {s['swarm_tokens']:,} tokens trained{val}"
    )


def run() -> None:
    run_and_exit(main)


if __name__ == "__main__":
    run()
