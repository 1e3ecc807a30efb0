"""`python -m dragon_swarm.peer`: join a swarm (or start one) to train, host experts, or both."""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
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
    p.add_argument("--name", default=None, help="public name on the swarm's leaderboard (default: volunteer-<end of peer id>)")
    p.add_argument("--dashboard", default=None, metavar="[HOST:]PORT", help="serve a web dashboard with Start/Stop here (e.g. 8080; loopback unless HOST is given)")
    p.add_argument("--no-panel", action="store_true", help="plain log lines even in a terminal")
    p.add_argument("--profile", default=None, help="resource profile from peers/*.yaml (e.g. cpu-laptop, gpu-8gb, gpu-24gb) or a YAML path")
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--max-memory", default=None, help="memory cap for training: a fraction (0.5, 50%%) or a size (6GiB, 800MiB)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--batch-size", default=None, help="micro-batch size, or 'auto': the largest that fits --max-memory, measured")
    p.add_argument(
        "--host-maddrs",
        nargs="+",
        default=None,
        help="listen addresses (default: a free port on all interfaces when joining peers on other machines, "
        "loopback otherwise; e.g. /ip4/0.0.0.0/tcp/31338 for a fixed port)",
    )
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
    name: str | None = None
    dashboard: tuple[str, int] | None = None
    panel: bool = True
    threads: int | None = None
    max_memory: str | None = None
    batch_size_auto: bool = False


def default_host_maddrs(initial_peers: Sequence[str]) -> list[str]:
    """Loopback for a one-machine swarm; all interfaces when any initial peer is elsewhere, since peers on other
    machines must be able to dial back (averaging and expert calls go both ways)."""
    loopback = ("/ip4/127.", "/ip6/::1/", "/dns/localhost/", "/dns4/localhost/")
    if any(not maddr.startswith(loopback) for maddr in initial_peers):
        return ["/ip4/0.0.0.0/tcp/0"]
    return ["/ip4/127.0.0.1/tcp/0"]


def parse_options(argv: Sequence[str] | None) -> tuple[PeerOptions, str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    profile = None
    if args.profile is not None:
        from dragon_swarm.resources import load_profile

        try:
            profile = load_profile(args.profile)
        except (ValueError, OSError) as e:
            parser.error(f"--profile: {e}")
    # flags win over the profile, the profile over the defaults
    device = args.device or (profile.device if profile else None) or "cpu"
    max_memory = args.max_memory or (profile.max_memory if profile else None)
    threads = args.threads if args.threads is not None else (profile.threads if profile else None)
    batch_size = args.batch_size if args.batch_size is not None else (profile.batch_size if profile else None)
    if profile is not None and not profile.train and not args.no_host:
        args.no_train = True
    if profile is not None and not profile.host_experts and not args.no_train and not args.experts:
        args.no_host = True
    overrides = {}
    batch_size_auto = str(batch_size) == "auto"
    if batch_size is not None and not batch_size_auto:
        try:
            batch_size = int(batch_size)
        except ValueError:
            parser.error(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}")
        if batch_size <= 0:
            parser.error("--batch-size must be positive")
        overrides["training.batch_size"] = batch_size
    if threads is not None and threads < 1:
        parser.error("--threads must be >= 1")
    if max_memory is not None:
        from dragon_swarm.resources import parse_memory_limit

        try:
            parse_memory_limit(str(max_memory), 1 << 40)  # syntax only; the real total is read at start
        except ValueError as e:
            parser.error(f"--max-memory: {e}")
    dashboard = None
    if args.dashboard is not None:
        from dragon_swarm.monitor.dashboard import parse_listen_address

        try:
            dashboard = parse_listen_address(args.dashboard)
        except ValueError as e:
            parser.error(f"--dashboard: {e}")
    if args.name is not None and not (1 <= len(args.name.strip()) <= 40 and args.name.isprintable()):
        parser.error("--name must be 1-40 printable characters")
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
        device=device,
        batch_size=config.training.batch_size,
        host_maddrs=tuple(args.host_maddrs or default_host_maddrs(args.initial_peers or ())),
        announce_maddrs=tuple(args.announce_maddrs),
        data_dir=args.data_dir,
        attack=args.attack,
        name=args.name.strip() if args.name else None,
        dashboard=dashboard,
        panel=not args.no_panel,
        threads=threads,
        max_memory=None if max_memory is None else str(max_memory),
        batch_size_auto=batch_size_auto,
    )
    return options, args.log_level


def apply_resources(options: PeerOptions) -> PeerOptions:
    """Threads, device, memory cap and the measured `--batch-size auto`; returns options with the final values.
    Runs before the DHT starts: the batch-size probe forks this process."""
    from dragon_swarm import resources

    threads = resources.apply_threads(options.threads)
    try:
        device = resources.resolve_device(options.device)
        total = resources.total_memory_bytes(device)
    except (ValueError, RuntimeError, AssertionError) as e:  # torch asserts when built without CUDA
        fail(PROG, f"--device {options.device}: {e}")
    cap = None
    if options.max_memory is not None:
        cap = resources.parse_memory_limit(options.max_memory, total)
        resources.apply_memory_cap(device, cap)
    logger.info(
        f"Resources: device {device}, {threads} thread(s), memory cap "
        + (f"{resources.format_bytes(cap)} of {resources.format_bytes(total)}" if cap else f"none ({resources.format_bytes(total)} total)")
    )
    batch_size = options.batch_size
    if options.batch_size_auto and options.train:
        budget = cap if cap is not None else resources.parse_memory_limit("50%", total)
        logger.info(f"Measuring the largest micro-batch that fits {resources.format_bytes(budget)} (--batch-size auto)...")
        try:
            batch_size, measured = resources.auto_batch_size(options.config, budget, device)
        except ValueError as e:
            fail(PROG, f"--batch-size auto: {e}")
        above = [size for size in measured if size > batch_size]
        over = f"; {min(above)} needs {resources.format_bytes(measured[min(above)] or 0) if measured[min(above)] else 'more than fits'}" if above else ""
        logger.info(
            f"Batch size auto: {batch_size} sequences (measured {resources.format_bytes(measured[batch_size])} per step "
            f"of the {resources.format_bytes(budget)} cap{over})"
        )
    return replace(options, device=device, batch_size=batch_size, threads=threads)


def load_training_data(options: PeerOptions):
    """The token stream this trainer draws its shards from; exits with one line on unusable data."""
    config = options.config
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
    return train_stream


def main(argv: Sequence[str] | None = None) -> int:
    options, log_level = parse_options(argv)
    setup_logging(log_level)
    config = options.config
    options.state_dir.mkdir(parents=True, exist_ok=True)

    from dragon_swarm.monitor.session import VolunteerSession

    role = "trainer+host" if options.train and options.host_spec != "" else ("trainer" if options.train else "host")
    session = VolunteerSession(config, options.state_dir, options.name, role, options.dashboard, options.panel)
    session.start_display()  # first: the volunteer sees JOINING while data loads and the batch size is measured
    try:
        options = apply_resources(options)
        train_stream = load_training_data(options) if options.train else None
    except BaseException:
        session.shutdown()
        raise

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
        session.shutdown()
        fail(PROG, f"could not join the swarm: {str(e).splitlines()[0] if str(e) else type(e).__name__}")

    host = dispatcher = trainer = None
    try:
        try:
            session.attach(dht, update_model_from_dht=not options.train)
        except OSError as e:  # the dashboard's port is taken or the address is not ours
            fail(PROG, f"--dashboard {options.dashboard[0]}:{options.dashboard[1]}: {e.strerror or e}")
        if options.initial_peers:
            others = other_config_hashes(dht, config)
            if others:
                fail(PROG, mismatch_message(config, others, options.config_name))
        announcer = threading.Thread(target=_keep_announcing_config, args=(dht, config, stop.event), daemon=True)
        announcer.start()
        logger.info(f"Swarm {config.run_prefix}, peer id {dht.peer_id.to_base58()}")
        print_line(f"To join this swarm: python -m dragon_swarm.peer -c {options.config_name} {initial_peers_line(dht)}")

        host = start_host(dht, options)
        if host is not None:
            session.count_host_requests(host)
        elif options.train:
            session.set_role("trainer")  # auto-selection found every expert served: this peer only trains
        if options.train:
            from dragon_swarm.training.trainer import VolunteerHooks

            hooks = VolunteerHooks(
                session.status,
                session.switch,
                session.counters,
                on_pause=lambda: (host.pause() if host is not None else None, session.publish_and_save()),
                on_resume=lambda: host.resume() if host is not None else None,
                show_contribution=session.show_counters,
            )
            dispatcher, trainer = start_trainer(dht, options, train_stream, host.backends if host is not None else {}, hooks)
            session.banned_peers = lambda: sorted(trainer._reported_bans)
            stop.install()  # hivemind's averagers set SIGINT to "ignore" in this process when they start
            if options.max_steps is None or trainer.step < options.max_steps:
                trainer.sync_with_swarm()
            trainer.train(options.max_steps, stop.event)
            logger.info(f"Training stopped at step {trainer.step}, epoch {trainer.optimizer.local_epoch}")
        else:
            if host is None:
                fail(PROG, "nothing to do: --no-train and no experts to host")
            serve_until_stopped(host, session, stop.event)
    finally:
        stop.event.set()  # ends the background announcer
        exit_if_shutdown_hangs(120.0)
        session.leave()  # the final contribution record, while the DHT is surely healthy
        if trainer is not None:
            trainer.shutdown()
        if dispatcher is not None:
            dispatcher.shutdown()
        if host is not None:
            host.shutdown()
        session.shutdown()  # publishes the final contribution record: before the DHT goes
        dht.shutdown()
    return 0


def serve_until_stopped(host, session, stop: threading.Event, log_every_s: float = 30.0) -> None:
    """A host-only peer: serve, follow Start/Stop, log what was served every `log_every_s` seconds."""
    from dragon_swarm.monitor.status import PeerState

    last_log = time.monotonic()
    while not stop.wait(0.5):
        if session.switch.paused != host.paused:
            host.pause() if session.switch.paused else host.resume()
            if session.switch.paused:
                session.publish_and_save()
        session.set_state(PeerState.IDLE if host.paused else PeerState.HOSTING)
        if time.monotonic() - last_log >= log_every_s:
            last_log = time.monotonic()
            stats = host.stats()
            logger.info(
                f"Hosting {stats['experts_served']} experts: {stats['expert_tokens_processed']:,} tokens served, "
                f"{stats['expert_requests']:,} requests, {stats['expert_updates']} updates"
            )


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


def start_trainer(dht, options: PeerOptions, train_stream, local_backends, hooks=None):
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
        config, dht, dispatcher, train_stream, options.state_dir, options.stats_file, options.batch_size, options.device, attack=options.attack,
        hooks=hooks,
    )
    return dispatcher, trainer


def run() -> None:
    run_and_exit(main)


if __name__ == "__main__":
    run()
