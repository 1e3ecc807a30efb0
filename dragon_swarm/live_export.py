"""Export from a live swarm: join as a DHT client, download the trunk from trainers and every expert from its hosts,
validate everything, and write the model file of `dragon_swarm.export` (`write_model_file`).

Trunk: every trainer answers hivemind's state download (`rpc_download_state`) in its averager's namespace:
remote-expert trainers through `hivemind.Optimizer`'s state averager (`<run_prefix>_state_averager`; metadata
`{"epoch", ...}`, tensors = the parameters in optimizer param-group order, then optimizer statistics), local-expert
trainers through their outer averager (`<run_prefix>_outer`; `{"epoch"}`, the round's start parameters, then the
outer momentum). hivemind names a handler after the servicer's class, so the stub is made from the trainers' own
averager class (a plain `DecentralizedAverager` client would knock on a door nobody opened). We ask up to `limit`
trainers (those that announce state sharing, best priority first), each answer checked for the epoch, the number,
shapes and finiteness of the tensors and a size cap, and keep the medoid of the valid answers' parameters (the
answer nearest to all the others; ties go to the newer epoch): one real trainer's state, never a blend, and an
honest one as long as honest trainers are the majority of those that answered. Trainers a step apart differ a
little; the medoid is one of them, and its epoch is the file's model version.

Experts: every expert from up to 3 of its online hosts (`moe.state_service.fetch_robust`: validated against the
expert's shapes, the medoid when several answer). An expert no host serves is an error naming it, unless
`allow_missing` (fresh init weights, listed in the file's metadata).

Tokens trained and the held-out loss come from the trainers' signed contribution records (self-reported, display
only: the same numbers the leaderboard and the bootstrap monitor show).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import hivemind
from hivemind.p2p import PeerID
import torch

from dragon_swarm.averaging.robust_optimizer import downloaded_state_problem
from dragon_swarm.config import SwarmConfig
from dragon_swarm.export import ExportError, ExportSummary, write_model_file
from dragon_swarm.model.dispatch import LocalExperts
from dragon_swarm.model.hrm_smoe import HRMSMoE
from dragon_swarm.moe.expert_uids import all_expert_uids

logger = logging.getLogger(__name__)

TRUNK_TIMEOUT_S = 60.0
EXPERT_TIMEOUT_S = 30.0
MAX_TRUNK_ANSWERS = 5
SIZE_FACTOR = 4  # parameters plus at most three tensors of statistics per parameter (Adam's two, or one momentum)


class TrunkStateError(ValueError):
    """A trainer's answer that must not be used; one line saying why."""


@dataclass(frozen=True, eq=False)
class TrunkAnswer:
    peer_id: str
    epoch: int
    trunk: dict[str, torch.Tensor]  # HRMSMoE.trunk_state_dict() names

    def vector(self) -> torch.Tensor:
        return torch.cat([self.trunk[name].detach().reshape(-1).to(torch.float64) for name in sorted(self.trunk)])


def trunk_state_prefix(config: SwarmConfig) -> str:
    """The averager namespace in which this swarm's trainers share their state."""
    if config.training.mode == "local_experts":
        return f"{config.run_prefix}_outer"
    return f"{config.run_prefix}_state_averager"


def trunk_parameter_order(config: SwarmConfig) -> list[tuple[str, torch.Size]]:
    """(name, shape) of the trunk's parameters in the order trainers send them."""
    from dragon_swarm.training.optim import decay_param_groups

    model = HRMSMoE(config.model, LocalExperts.from_config(config.model))
    named = list(model.named_trunk_parameters())
    if config.training.mode == "local_experts":
        return [(name, p.shape) for name, p in named]
    # remote-expert mode: hivemind's state averager sends its optimizer's parameters, group after group
    name_of = {id(p): name for name, p in named}
    groups = decay_param_groups(named, config.training.weight_decay)
    return [(name_of[id(p)], p.shape) for group in groups for p in group["params"]]


def parse_trunk_answer(metadata: Any, tensors: Sequence[torch.Tensor], order: Sequence[tuple[str, torch.Size]], peer_id: str) -> TrunkAnswer:
    """Check one trainer's answer; raises TrunkStateError. Pure: tested without a network."""
    epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise TrunkStateError(f"trainer {peer_id[-8:]} sent no usable epoch ({epoch!r})")
    problem = downloaded_state_problem(tensors, [shape for _, shape in order])
    if problem is not None:
        raise TrunkStateError(f"trainer {peer_id[-8:]} at epoch {epoch}: {problem}")
    return TrunkAnswer(peer_id, epoch, {name: t.detach().clone() for (name, _), t in zip(order, tensors)})


def robust_trunk_choice(answers: Sequence[TrunkAnswer]) -> TrunkAnswer:
    """The medoid of the answers' parameters (smallest total distance to the others; ties: the newer epoch)."""
    if not answers:
        raise ValueError("no answers")
    vectors = [a.vector() for a in answers]
    totals = [sum(float(torch.linalg.vector_norm(v - w)) for w in vectors) for v in vectors]
    return answers[min(range(len(answers)), key=lambda i: (totals[i], -answers[i].epoch))]


def _run(coroutine: Any) -> Any:
    # the event loop hivemind's expert clients (and `moe.state_service`) use in this process
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    return RemoteExpertWorker.run_coroutine(coroutine)


class TrunkDownloader:
    """Downloads the trunk from this swarm's trainers over `dht` (a client is enough: we only dial out). `p2p`: a
    replica of the DHT's daemon connection (`dht.replicate_p2p()`), on `_run`'s loop; the caller shuts it down."""

    def __init__(self, dht: hivemind.DHT, config: SwarmConfig, p2p: Any):
        self.dht, self.config, self._p2p = dht, config, p2p
        self.prefix = trunk_state_prefix(config)
        self.order = trunk_parameter_order(config)
        self.max_bytes = SIZE_FACTOR * sum(4 * shape.numel() for _, shape in self.order) + (1 << 20)
        self.own_peer_id = dht.peer_id.to_base58()

    def _servicer_class(self) -> type:
        # the class whose name the trainers' handler carries (see the module docstring)
        if self.config.training.mode == "local_experts":
            from dragon_swarm.training.local_trainer import _OuterAverager

            return _OuterAverager
        from dragon_swarm.averaging.robust_optimizer import RobustTrainingStateAverager

        return RobustTrainingStateAverager

    def state_peers(self) -> list[str]:
        """Trainers that announce state sharing now, best priority first."""
        found = self.dht.get(f"{self.prefix}.all_averagers", latest=True)
        value = getattr(found, "value", None)
        if not isinstance(value, dict):
            return []
        peers: list[tuple[float, str]] = []
        for subkey, entry in value.items():
            priority = getattr(entry, "value", None)
            if not isinstance(subkey, bytes) or not isinstance(priority, (int, float)) or isinstance(priority, bool):
                continue
            try:
                peer_id = PeerID(subkey).to_base58()
            except Exception:  # a garbled subkey: not a peer to ask
                continue
            if peer_id != self.own_peer_id:
                peers.append((float(priority), peer_id))
        return [peer_id for _, peer_id in sorted(peers, reverse=True)]

    def fetch(self, peer_id: str, timeout: float) -> TrunkAnswer:
        """One trainer's trunk, validated. Raises TrunkStateError."""
        try:
            metadata, tensors = _run(asyncio.wait_for(self._download(peer_id), timeout=timeout))
        except TrunkStateError:
            raise
        except Exception as e:  # timeouts, dropped streams, unreachable peers, garbled messages
            raise TrunkStateError(f"trainer {peer_id[-8:]}: {type(e).__name__}: {str(e)[:120]}") from None
        return parse_trunk_answer(metadata, tensors, self.order, peer_id)

    async def _download(self, peer_id: str) -> tuple[Any, list[torch.Tensor]]:
        from hivemind.compression import deserialize_torch_tensor
        from hivemind.proto import averaging_pb2
        from hivemind.utils.serializer import MSGPackSerializer
        from hivemind.utils.streaming import combine_from_streaming

        stub = self._servicer_class().get_stub(self._p2p, PeerID.from_base58(peer_id), namespace=self.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        metadata, parts, tensors, size = None, [], [], 0
        async for message in stream:
            size += len(message.tensor_part.buffer) + len(message.metadata)
            if size > self.max_bytes:
                raise TrunkStateError(f"trainer {peer_id[-8:]}: more than {self.max_bytes:,} bytes, refused")
            if message.metadata:
                metadata = MSGPackSerializer.loads(message.metadata)
            if message.tensor_part.dtype and parts:  # a dtype starts the next tensor (hivemind's stream layout)
                tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                parts = []
            parts.append(message.tensor_part)
        if parts:
            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
        if metadata is None:
            raise TrunkStateError(f"trainer {peer_id[-8:]} does not share its state")
        return metadata, tensors

    def fetch_robust(self, timeout: float = TRUNK_TIMEOUT_S, limit: int = MAX_TRUNK_ANSWERS) -> tuple[TrunkAnswer | None, list[TrunkAnswer], list[str]]:
        """(the robust choice or None, every valid answer, why the others were refused). Asks again, with a fresh
        list of trainers, until one answers or `timeout` is spent: a trainer's announcement may lag its start."""
        deadline = time.monotonic() + timeout
        problems: list[str] = []
        while True:
            answers = []
            for peer_id in self.state_peers()[:limit]:
                try:
                    answers.append(self.fetch(peer_id, max(1.0, deadline - time.monotonic())))
                except TrunkStateError as e:
                    problems.append(str(e))
                    logger.warning(f"Trunk state refused: {e}")
            if answers:
                return robust_trunk_choice(answers), answers, problems
            if time.monotonic() + 2.0 > deadline:
                return None, [], problems
            time.sleep(2.0)


def download_experts(
    dht: hivemind.DHT, config: SwarmConfig, p2p: Any, timeout: float = EXPERT_TIMEOUT_S
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """(uid -> weights of every expert some host served, uid -> why each of the others is missing)."""
    from dragon_swarm.moe.expert_state import make_template
    from dragon_swarm.moe.registry import find_replicas
    from dragon_swarm.moe.state_service import ExpertStateService

    m = config.model
    uids = all_expert_uids(config.expert_prefix, m.num_moe_layers, m.num_experts)
    template = make_template(m.d_model, m.expert_hidden, config.training)
    service = ExpertStateService(dht, f"{config.run_prefix}.experts", lambda uid: None)
    service.start(serve=False, p2p=p2p)  # download only: no handler for experts we do not serve
    experts: dict[str, dict[str, torch.Tensor]] = {}
    missing: dict[str, str] = {}
    replicas = find_replicas(dht, uids)
    for uid in uids:
        hosts = [r.record.peer_id for r in replicas.get(uid, [])]
        got = service.fetch_robust(hosts, uid, template, timeout) if hosts else None
        if got is None:
            missing[uid] = "no host serves it" if not hosts else f"no host gave a usable state ({len(hosts)} tried)"
            continue
        state, source, _ = got
        experts[uid] = {name: t.detach().clone() for name, t in state.module.items()}
        logger.info(f"{uid}: from {source[-8:]} (version {state.version}, {len(hosts)} host(s))")
    return experts, missing


def swarm_counters(dht: hivemind.DHT, config: SwarmConfig, epoch: int) -> tuple[int, float | None, int | None]:
    """(tokens the trainers report, the median held-out loss of the newest version at or before `epoch` that any
    trainer reported, that version). Self-reported records: display only."""
    from dragon_swarm.swarm.contributions import fetch_contributions

    records = list(fetch_contributions(dht, config.run_prefix).values())
    tokens = sum(r.tokens for r in records)
    scored = [r for r in records if r.val_epoch is not None and r.val_loss is not None and r.val_epoch <= epoch]
    if not scored:
        return tokens, None, None
    newest = max(r.val_epoch for r in scored)
    return tokens, float(statistics.median(r.val_loss for r in scored if r.val_epoch == newest)), newest


def export_from_swarm(
    initial_peers: Sequence[str],
    config: SwarmConfig,
    out: Path,
    allow_missing: bool = False,
    timeout: float = TRUNK_TIMEOUT_S,
    config_name: str = "-c",
    swarm_key: bytes | None = None,
) -> ExportSummary:
    """Join, download, validate, write. Raises ExportError (one line). A private swarm needs its `swarm_key`; a
    swarm with identity work gets it from this client too (its peers challenge every caller)."""
    from dragon_swarm.node.options import default_host_maddrs
    from dragon_swarm.swarm.config_check import mismatch_message, other_config_hashes
    from dragon_swarm.swarm.admission import admission_policy
    from dragon_swarm.swarm.dht_node import join_error, start_dht

    try:
        dht = start_dht(
            initial_peers=initial_peers, host_maddrs=default_host_maddrs(initial_peers), client_mode=True,
            admission=admission_policy(config.swarm.identity_bits, swarm_key, initial_peers),
        )
    except Exception as e:  # p2pd errors: bad multiaddr, unreachable peers
        raise ExportError(join_error(e)) from None
    p2p = None
    try:
        others = other_config_hashes(dht, config)
        if others:
            raise ExportError(mismatch_message(config, others, config_name))
        p2p = _run(dht.replicate_p2p())
        chosen, answers, problems = TrunkDownloader(dht, config, p2p).fetch_robust(timeout)
        if chosen is None:
            why = f" ({problems[-1]})" if problems else ""
            raise ExportError(
                f"no trainer of swarm {config.run_prefix} answered a state download in {timeout:.0f} s{why}; "
                "is a trainer running, and is -c the swarm's config?"
            )
        epochs = sorted(a.epoch for a in answers)
        logger.info(f"Trunk of model version {chosen.epoch} from trainer {chosen.peer_id[-8:]} ({len(answers)} answer(s), epochs {epochs})")
        experts, missing = download_experts(dht, config, p2p)
        if missing and not allow_missing:
            uid, why = next(iter(missing.items()))
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ExportError(f"expert {uid}: {why}{more}; wait for its hosts, or --allow-missing to use fresh init weights")
        tokens, val_loss, val_epoch = swarm_counters(dht, config, chosen.epoch)
        return write_model_file(
            config, chosen.trunk, experts, out, chosen.epoch, tokens, f"trainer {chosen.peer_id}",
            val_loss=val_loss, val_epoch=val_epoch,
        )  # fmt: skip
    finally:
        if p2p is not None:
            _run(p2p.shutdown())  # this replica only: the daemon is the DHT's, stopped next
        dht.shutdown()
