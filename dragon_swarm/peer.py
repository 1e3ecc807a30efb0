"""`python -m dragon_swarm.peer`: join a swarm (or start one) to train, host experts, or both."""

from __future__ import annotations

import argparse
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dragon_swarm.cli import (
    CleanArgumentParser,
    StopSignal,
    exit_if_shutdown_hangs,
    fail,
    print_line,
    run_and_exit,
    setup_logging,
)
from dragon_swarm.config import ConfigError, SwarmConfig, load_config
from dragon_swarm.moe.expert_uids import (
    ExpertSpecError,
    all_expert_uids,
    choose_unserved_experts,
    expand_expert_spec,
)

PROG = "dragon_swarm.peer"
logger = logging.getLogger(PROG)


def build_parser() -> CleanArgumentParser:
    p = CleanArgumentParser(prog=PROG, description="Join a dragon_swarm swarm: train, host experts, or both.")
    join = p.add_mutually_exclusive_group(required=True)
    join.add_argument("--initial-peers", nargs="+", metavar="MADDR", help="multiaddrs of any peers of the swarm (e.g. a bootstrap)")
    join.add_argument("--new-swarm", action="store_true", help="start a fresh swarm on this machine")
    p.add_argument("-c", "--config", default=None, help="swarm config: a YAML path or a name in configs/ (default: dragon-tiny)")
    p.add_argument("--experts", default=None, help="host these experts: comma list of LAYER.INDEX, ffn.LAYER.[a:b] grid patterns or 'all'")
    role = p.add_mutually_exclusive_group()
    role.add_argument("--no-train", action="store_true", help="only host experts")
    role.add_argument("--no-host", action="store_true", help="only train")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--stats-file", type=Path, default=None, help="append one JSON object per optimizer step here")
    p.add_argument("--state-dir", type=Path, default=None, help="identity, checkpoints and counters (default: ./dragon-state/<swarm>)")
    p.add_argument("--identity", type=Path, default=None, help="private key file; the peer id is stable across restarts")
    p.add_argument("--device", default="cpu", help="torch device for the trunk and hosted experts")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch size (overrides training.batch_size)")
    p.add_argument("--host-maddrs", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], help="listen addresses; use /ip4/0.0.0.0/tcp/PORT to accept others")
    p.add_argument("--announce-maddrs", nargs="+", default=[], help="public addresses others should dial")
    p.add_argument("--data-dir", type=Path, default=None, help="where corpora live (default: the project's data/)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # TEST/BENCHMARK ONLY: makes this trainer Byzantine (see dragon_swarm.attacks); hidden from --help
    p.add_argument("--attack", default=None, help=argparse.SUPPRESS)
    return p


@dataclass(frozen=True)
class PeerOptions:
    config: SwarmConfig
    config_name: str
    initial_peers: tuple[str, ...]
    train: bool
    host_spec: str | None  # None: choose automatically; "" : host nothing
    max_steps: int | None
    stats_file: Path | None
    state_dir: Path
    identity: Path
    device: str
    batch_size: int
    host_maddrs: tuple[str, ...]
    announce_maddrs: tuple[str, ...]
    data_dir: Path | None
    attack: str | None


def parse_options(argv: Sequence[str] | None) -> tuple[PeerOptions, str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {}
    if args.batch_size is not None:
        if args.batch_size <= 0:
            parser.error("--batch-size must be positive")
        overrides["training.batch_size"] = args.batch_size
    if args.max_steps is not None and args.max_steps < 0:
        parser.error("--max-steps must be >= 0")
    if args.attack is not None:
        from dragon_swarm.attacks import parse_attack

        try:
            parse_attack(args.attack)
        except ValueError as e:
            parser.error(f"--attack: {e}")
    if args.no_host and args.experts:
        parser.error("--experts and --no-host contradict each other")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        fail(PROG, str(e))
    host_spec = "" if args.no_host else args.experts
    if host_spec:
        try:
            expand_expert_spec(host_spec, config.expert_prefix, config.model.num_moe_layers, config.model.num_experts)
        except ExpertSpecError as e:
            fail(PROG, f"--experts: {e}")
    state_dir = args.state_dir or Path("dragon-state") / config.swarm.name
    options = PeerOptions(
        config=config,
        config_name=args.config or "dragon-tiny",
        initial_peers=tuple(args.initial_peers or ()),
        train=not args.no_train,
        host_spec=host_spec,
        max_steps=args.max_steps,
        stats_file=args.stats_file,
        state_dir=state_dir,
        identity=args.identity or state_dir / "identity.key",
        device=args.device,
        batch_size=config.training.batch_size,
        host_maddrs=tuple(args.host_maddrs),
        announce_maddrs=tuple(args.announce_maddrs),
        data_dir=args.data_dir,
        attack=args.attack,
    )
    return options, args.log_level


def main(argv: Sequence[str] | None = None) -> int:
    options, log_level = parse_options(argv)
    setup_logging(log_level)
    config = options.config
    options.state_dir.mkdir(parents=True, exist_ok=True)

    train_stream = None
    if options.train:
        from dragon_swarm.data.corpus import CorpusError, default_data_dir
        from dragon_swarm.data.dataset import build_token_stream

        data_dir = options.data_dir or default_data_dir()
        # tokenizers' thread pool would be forked along with hivemind's processes
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            train_stream, _ = build_token_stream(
                config.data.source,
                data_dir,
                data_dir / "cache",
                config.data.tokenizer,
                config.data.val_fraction,
            )
        except (CorpusError, OSError, ValueError) as e:
            fail(PROG, f"data: {e}")
        largest_id = int(train_stream.tokens.max())
        if largest_id >= config.model.vocab_size:
            fail(PROG, f"tokenizer {config.data.tokenizer} produces id {largest_id} but model.vocab_size is {config.model.vocab_size}")
        logger.info(f"Data: {config.data.source}, {train_stream.num_tokens:,} training tokens")

    stop = StopSignal()
    stop.install()

    from dragon_swarm.swarm.config_check import mismatch_message, other_config_hashes
    from dragon_swarm.swarm.dht_node import initial_peers_line, start_dht

    try:
        dht = start_dht(
            initial_peers=options.initial_peers,
            host_maddrs=options.host_maddrs,
            announce_maddrs=options.announce_maddrs,
            identity_path=options.identity,
        )
    except Exception as e:  # p2pd errors: bad multiaddr, taken identity, unreachable peers
        fail(PROG, f"could not join the swarm: {str(e).splitlines()[0] if str(e) else type(e).__name__}")

    host = dispatcher = trainer = None
    try:
        if options.initial_peers:
            others = other_config_hashes(dht, config)
            if others:
                fail(PROG, mismatch_message(config, others, options.config_name))
        announcer = threading.Thread(target=_keep_announcing_config, args=(dht, config, stop.event), daemon=True)
        announcer.start()
        logger.info(f"Swarm {config.run_prefix}, peer id {dht.peer_id.to_base58()}")
        print_line(f"To join this swarm: python -m dragon_swarm.peer -c {options.config_name} {initial_peers_line(dht)}")

        host = start_host(dht, options)
        if options.train:
            dispatcher, trainer = start_trainer(dht, options, train_stream, host.backends if host is not None else {})
            stop.install()  # hivemind's averagers set SIGINT to "ignore" in this process when they start
            if options.max_steps is None or trainer.step < options.max_steps:
                trainer.sync_with_swarm()
            trainer.train(options.max_steps, stop.event)
            logger.info(f"Training stopped at step {trainer.step}, epoch {trainer.optimizer.local_epoch}")
        else:
            if host is None:
                fail(PROG, "nothing to do: --no-train and no experts to host")
            while not stop.event.wait(30.0):
                stats = host.stats()
                logger.info(f"Hosting {stats['experts_served']} experts: {stats['expert_tokens_processed']:,} tokens served, {stats['expert_updates']} updates")
    finally:
        stop.event.set()  # ends the background announcer
        exit_if_shutdown_hangs(120.0)
        if trainer is not None:
            trainer.shutdown()
        if dispatcher is not None:
            dispatcher.shutdown()
        if host is not None:
            host.shutdown()
        dht.shutdown()
    return 0


def _keep_announcing_config(dht, config: SwarmConfig, stop: threading.Event) -> None:
    from dragon_swarm.swarm.config_check import ANNOUNCE_SECONDS, announce_config

    while True:
        try:
            announce_config(dht, config)
        except Exception as e:  # the DHT may be shutting down; the next round retries
            logger.debug(f"Config announcement failed: {e}")
        if stop.wait(ANNOUNCE_SECONDS / 3):
            return


def start_host(dht, options: PeerOptions):
    from dragon_swarm.moe.host import ExpertHost, build_expert_backends, measure_throughput
    from dragon_swarm.moe.registry import find_replicas, served_throughput

    config = options.config
    prefix, m = config.expert_prefix, config.model
    if options.host_spec == "":
        return None
    if options.host_spec:
        uids = expand_expert_spec(options.host_spec, prefix, m.num_moe_layers, m.num_experts)
    else:
        everything = all_expert_uids(prefix, m.num_moe_layers, m.num_experts)
        uids = choose_unserved_experts(everything, served_throughput(find_replicas(dht, everything)))
        logger.info(f"Auto-selected {len(uids)} expert(s) nobody serves yet")
        if not uids:
            return None
    backends = build_expert_backends(uids, m.d_model, m.expert_hidden, config.training, config.experts.max_batch_size, config.swarm.seed)
    host = ExpertHost(
        dht,
        backends,
        config.experts,
        hidden_dim=m.d_model,
        checkpoint_dir=options.state_dir / "experts",
        throughput=measure_throughput(m.d_model, m.expert_hidden),
        device=options.device,
    )
    host.load_checkpoints()
    host.start()
    return host


def start_trainer(dht, options: PeerOptions, train_stream, local_backends):
    from dragon_swarm.moe.router import RemoteExpertDispatcher
    from dragon_swarm.training.trainer import Trainer

    config = options.config
    m = config.model
    dispatcher = RemoteExpertDispatcher(
        dht, config.expert_prefix, m.num_moe_layers, m.num_experts, m.d_model, config.experts, seed=config.swarm.seed, local_backends=local_backends
    )
    dispatcher.start()
    if not dispatcher.wait_for_experts(timeout=60.0):
        logger.warning(f"Some MoE layers have no live expert yet ({dispatcher.online_experts()} online); training with what is there")
    else:
        logger.info(f"Found experts: {dispatcher.online_experts()} of {m.num_moe_layers * m.num_experts} online")
    trainer = Trainer(
        config, dht, dispatcher, train_stream, options.state_dir, options.stats_file, options.batch_size, options.device, attack=options.attack
    )
    return dispatcher, trainer


def run() -> None:
    run_and_exit(main)


if __name__ == "__main__":
    run()
