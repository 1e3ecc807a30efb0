"""The steps of a peer's start-up, each a function the lifecycle owner (`PeerNode`) calls in order.

Every step that can fail for a reason the volunteer can fix raises `StartupError` with one line meant for them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from dragon_swarm.events import EventBus

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A start-up that cannot go on; the message is one line for the volunteer."""


def check_initial_peers(maddrs: Sequence[str]) -> None:
    """Cheap syntax check of `--initial-peers` before anything slow happens."""
    from hivemind.utils.multiaddr import Multiaddr

    for maddr in maddrs:
        try:
            parsed = Multiaddr(maddr)
        except Exception as e:
            raise StartupError(f"--initial-peers: {maddr!r} is not a multiaddr ({e})") from None
        if "p2p" not in {p.name for p in parsed.protocols()}:
            raise StartupError(f"--initial-peers: {maddr!r} lacks the peer id (/p2p/Qm...); copy the whole line a peer printed")


def join_command() -> str:
    """How to run this program from a shell that has not activated our virtualenv."""
    script = Path(sys.executable).parent / "dragon-peer"
    if script.is_file():
        on_path = shutil.which("dragon-peer")
        return "dragon-peer" if on_path and Path(on_path).resolve() == script.resolve() else str(script)
    return f"{sys.executable} -m dragon_swarm.peer"


def apply_resources(options):
    """Threads, device, memory cap and the measured `--batch-size auto`; returns options with the final values.
    Runs before the DHT starts: the batch-size probe forks this process."""
    from dragon_swarm import resources

    threads = resources.apply_threads(options.threads)
    try:
        device = resources.resolve_device(options.device)
        total = resources.total_memory_bytes(device)
    except (ValueError, RuntimeError, AssertionError) as e:  # torch asserts when built without CUDA
        raise StartupError(f"--device {options.device}: {e}") from None
    cap = None
    if options.max_memory is not None:
        cap = resources.parse_memory_limit(options.max_memory, total)
        resources.apply_memory_cap(device, cap)
    cap_text = f"{resources.format_bytes(cap)} of {resources.format_bytes(total)}" if cap else f"none ({resources.format_bytes(total)} total)"
    logger.info(f"Resources: device {device}, {threads} thread(s), memory cap {cap_text}")
    batch_size = options.batch_size
    if options.batch_size_auto and options.train:
        batch_size = _measure_batch_size(options, resources, cap if cap is not None else resources.parse_memory_limit("50%", total), device)
    return dataclasses.replace(options, device=device, batch_size=batch_size, threads=threads)


def _measure_batch_size(options, resources, budget: int, device: str) -> int:
    fmt = resources.format_bytes
    logger.info(f"Measuring the largest micro-batch that fits {fmt(budget)} (--batch-size auto)...")
    try:
        batch_size, measured = resources.auto_batch_size(options.config, budget, device)
    except ValueError as e:
        raise StartupError(f"--batch-size auto: {e}") from None
    above = [size for size in measured if size > batch_size]
    over = ""
    if above:
        need = measured[min(above)]
        over = f"; {min(above)} needs {fmt(need) if need else 'more than fits'}"
    logger.info(f"Batch size auto: {batch_size} sequences (measured {fmt(measured[batch_size])} per step of the {fmt(budget)} cap{over})")
    return batch_size


def load_training_data(options):
    """(train, validation) token streams: the trainer draws its shards from the first and scores the held-out loss
    on the second (`training.evaluation`)."""
    from dragon_swarm.data.corpus import CorpusError, default_data_dir
    from dragon_swarm.data.dataset import build_token_stream

    config = options.config
    data_dir = options.data_dir or default_data_dir()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its thread pool would be forked with hivemind's processes
    try:
        train_stream, val_stream = build_token_stream(
            config.data.source, data_dir, data_dir / "cache", config.data.tokenizer, config.data.val_fraction
        )
    except (CorpusError, OSError, ValueError) as e:
        raise StartupError(f"data: {e}") from None
    largest_id = int(train_stream.tokens.max())
    if largest_id >= config.model.vocab_size:
        raise StartupError(f"tokenizer {config.data.tokenizer} produces id {largest_id} but model.vocab_size is {config.model.vocab_size}")
    logger.info(f"Data: {config.data.source}, {train_stream.num_tokens:,} training tokens, {val_stream.num_tokens:,} held-out tokens")
    return train_stream, val_stream


def choose_experts(dht, options) -> list[str]:
    """The experts this peer hosts first: `--experts LIST` as given; otherwise (no `--experts`, or `--experts auto`)
    placement's choice (`moe.placement`): the least replicated first, up to the budget (`--max-experts`, or what a
    quarter of the memory cap holds)."""
    from dragon_swarm.moe.expert_uids import all_expert_uids, expand_expert_spec
    from dragon_swarm.moe.placement import choose_experts as place
    from dragon_swarm.moe.registry import find_replicas

    config = options.config
    prefix, m = config.expert_prefix, config.model
    if options.host_spec == "":
        return []
    everything = all_expert_uids(prefix, m.num_moe_layers, m.num_experts)
    if options.host_spec not in (None, "auto"):
        return expand_expert_spec(options.host_spec, prefix, m.num_moe_layers, m.num_experts)
    budget = expert_budget(options)
    found = find_replicas(dht, everything, only_online=False)
    hosts = {uid: {r.record.peer_id: r.record.throughput for r in replicas if r.record.state != "offline"} for uid, replicas in found.items()}
    uids = place(everything, hosts, dht.peer_id.to_base58(), budget)
    served = sum(1 for uid in everything if hosts.get(uid))
    logger.info(f"Placement chose {len(uids)} of {len(everything)} expert(s) (budget {budget}; {served} already served elsewhere), least replicated first")
    return uids


def expert_budget(options) -> int:
    """`--max-experts`, or how many experts a quarter of the memory cap (or of the device's memory) holds."""
    from dragon_swarm import resources
    from dragon_swarm.moe.hosting import memory_budget

    if options.max_experts is not None:
        return options.max_experts
    total = resources.total_memory_bytes(options.device)
    cap = resources.parse_memory_limit(options.max_memory, total) if options.max_memory is not None else total
    return memory_budget(options.config, cap)


def start_host(dht, options, uids: list[str], bus: EventBus, tamper=None, periodic_sync: bool = True):
    """The peer's expert hosting (`moe.hosting`): new experts download the swarm's current state before they go
    online; placement's hosts (no explicit `--experts` list) also take over, rebalance and keep standby copies."""
    from dragon_swarm.moe.backend import measure_throughput
    from dragon_swarm.moe.hosting import ExpertHosting

    config = options.config
    m = config.model
    hosting = ExpertHosting(
        dht,
        config,
        checkpoint_dir=options.state_dir / "experts",
        throughput=measure_throughput(m.d_model, m.expert_hidden),
        device=options.device,
        bus=bus,
        tamper=tamper,
        adaptive=options.host_spec in (None, "auto"),
        budget=expert_budget(options) if options.host_spec in (None, "auto") else None,
        periodic_sync=periodic_sync,
        own_trainer=options.train,
    )
    try:
        hosting.start(uids)
    except BaseException:
        hosting.shutdown()
        raise
    return hosting


def start_dispatcher(dht, options, local_backends, tamper=None, bus=None):
    from dragon_swarm.moe.router import RemoteExpertDispatcher

    config = options.config
    m = config.model
    dispatcher = RemoteExpertDispatcher(
        dht, config.expert_prefix, m.num_moe_layers, m.num_experts, m.d_model, config.experts, seed=config.swarm.seed, local_backends=local_backends,
        tamper=tamper, bus=bus,
    )
    dispatcher.start()
    if not dispatcher.wait_for_experts(timeout=60.0):
        logger.warning(f"Some MoE layers have no live expert yet ({dispatcher.online_experts()} online); training with what is there")
    else:
        logger.info(f"Found experts: {dispatcher.online_experts()} of {m.num_moe_layers * m.num_experts} online")
    return dispatcher
