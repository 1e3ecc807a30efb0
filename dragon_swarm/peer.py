"""`python -m dragon_swarm.peer` (or `dragon-peer`): join a swarm (or start one) to train, host experts, or both.

A thin command line over `dragon_swarm.node.PeerNode`, which owns the peer's lifecycle; this file parses the
options, owns the signals and turns a failed start into one line.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from dragon_swarm.node.cli import StopSignal, run_and_exit, setup_logging

PROG = "dragon_swarm.peer"
logger = logging.getLogger(PROG)


def main(argv: Sequence[str] | None = None) -> int:
    from dragon_swarm.node.options import parse_peer_options

    options = parse_peer_options(argv)
    setup_logging(options.log_level)

    from dragon_swarm.node.peer_node import PeerNode
    from dragon_swarm.node.inherited_sockets import install_inherited_socket_drop
    from dragon_swarm.node.parent_death import install_parent_death_signal
    from dragon_swarm.node.processes import become_subreaper
    from dragon_swarm.node.startup import StartupError

    become_subreaper()  # orphaned grandchildren (p2pd) stay ours to stop
    install_parent_death_signal()  # before the first fork: forked children die with the peer, even on SIGKILL
    install_inherited_socket_drop()  # a child forked while the peer serves must not hold its streams open
    stop = StopSignal()
    stop.install()
    node = PeerNode(options, stop.event, contribution=_injected_contribution(options), expert_tamper=_injected_expert_tamper(options))
    failed_start = None
    try:
        node.start()
        stop.install()  # hivemind's averagers set SIGINT to "ignore" in this process when they start
        node.run()
    except StartupError as e:
        failed_start = str(e)
    finally:
        node.shutdown()
    if failed_start is not None:  # after the shutdown: the panel is gone, so the line stays readable
        sys.stderr.write(f"{PROG}: error: {failed_start}\n")
        return 2
    return 0


def _injected_contribution(options):
    """TEST/BENCHMARK ONLY: the hidden `--attack NAME` makes this trainer Byzantine by injecting the attack's
    contribution (see dragon_swarm.attacks); production never imports that module."""
    if options.attack is None:
        return None
    from dragon_swarm.attacks import ByzantineContribution

    t = options.config.training
    return ByzantineContribution(options.attack, options.config.swarm.seed, t.clip_grad_norm, t.worker_momentum)


def _injected_expert_tamper(options):
    """TEST/BENCHMARK ONLY: the hidden `--expert-attack MODE` makes this peer's expert path Byzantine (its hosted
    experts' outputs or the gradients it sends experts; see dragon_swarm.attacks.ExpertAttack)."""
    if options.expert_attack is None:
        return None
    from dragon_swarm.attacks import ExpertTamper

    return ExpertTamper(options.expert_attack, options.config.swarm.seed)


def run() -> None:
    run_and_exit(main)


if __name__ == "__main__":
    run()
