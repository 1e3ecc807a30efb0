"""hivemind averagers whose all-reduce aggregates each partition robustly and that refuse banned peers.

The seams, all subclass overrides (no vendored hivemind code beyond one short method):

* :class:`RobustAllReduceRunner` swaps the runner's ``TensorPartReducer`` for
  :class:`~.robust_reducer.RobustTensorPartReducer` right after ``AllReduceRunner.__init__`` built the stock one.
* ``_run_allreduce_inplace_`` of the averagers is hivemind's, except that it builds the robust runner
  (hivemind names ``AllReduceRunner`` inside that method; there is no hook).
* ``identical_results`` (the local-expert trainers' outer rounds): each reducer answers every sender with the
  aggregate itself, compressed once with the part's codec, and takes the same decoded bytes for its own part, so every
  member ends the round with bit-identical values (hivemind answers ``aggregate - part``, each member then holds the
  aggregate plus its own compression errors). The reducer loop for that mode is ours (``_answer_with_aggregates``).
* Matchmaking, leader side: ``rpc_join_group`` answers PROTOCOL_VIOLATION to a banned peer before hivemind's
  matchmaking sees the request. Follower side: before each step, the averager wraps its ``Matchmaking``
  instance's ``_request_join_group`` so that banned leaders (also ones we are redirected to) are skipped as if
  they had rejected us. hivemind builds ``Matchmaking`` inside ``_run_internal`` with no factory, so wrapping the
  instance is the smallest seam. Bans are local: a banned peer can still end up in our group when a leader who
  does not ban it accepts it; then our reducer ignores its parts, but it still reduces its own partition for us.

The averager runs in a forked process, so its :class:`~.reputation.ReputationBook` is a *copy*: the book
given to the constructor seeds it (e.g. bans restored from disk), and :meth:`get_reputation` fetches a
snapshot from the averager process over hivemind's control pipe (the same way as ``get_group_bits``).

With hivemind.Optimizer::

    settings = RobustAveragingSettings.from_config(config.averaging, config.training.target_batch_size)
    opt = hivemind.Optimizer(..., grad_averager_factory=make_grad_averager_factory(settings))
    opt.grad_averager.get_reputation()  # {"now": ..., "banned": {...}, "peers": {...}}
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import multiprocessing as mp
import threading
from typing import AsyncIterator, Callable, Optional, Sequence

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import BannedException
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.optim.grad_averager import GradientAverager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MPFuture, get_dht_time

from dragon_swarm.averaging.accusations import Accusation, make_accusation, verify_accusation
from dragon_swarm.averaging.aggregators import Aggregator
from dragon_swarm.averaging.compression import install_codecs
from dragon_swarm.averaging.part_signatures import PartSigner, check_seal, tensor_statement
from dragon_swarm.averaging.reputation import ReputationBook
from dragon_swarm.averaging.robust_reducer import CAPTURED_RATIO, RobustTensorPartReducer
from dragon_swarm.averaging.settings import RESULT_DISTANCE_LIMIT, RobustAveragingSettings

__all__ = [
    "RobustAllReduceRunner",
    "RobustAveragingSettings",
    "RobustDecentralizedAverager",
    "RobustGradientAverager",
    "make_grad_averager_factory",
    "silent_peer_timeouts",
]

logger = logging.getLogger(__name__)

KEPT_PARTS_PER_SENDER = 8  # received parts kept per sender as evidence (a rejection comes a few parts after receipt)
RECENT_GROUPS = 8  # completed rounds whose senders `recent_groups` reports (verification asks after each round)


class RobustAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce with :class:`RobustTensorPartReducer` in place of the weighted mean.

    If this peer's own part is rejected (NaN/Inf) or it is banned in its own book, it keeps its local values
    for its own partition instead of hanging until the all-reduce timeout; the other peers still get the
    robust aggregate of their parts.

    It also checks what comes *back*: each reducer (itself included) returns ``aggregate - our part``. A returned
    difference that is non-finite, misshaped, or longer than ``result_distance_limit`` times the larger of our
    part's norm and our tensors' norm spread evenly over the part (:func:`refused_result_reason`) is refused, and
    we keep our own values for that part. This covers what the reducer itself cannot: a 2-peer group, where
    one x-1000 attacker moves any aggregate of two parts, and a Byzantine reducer that returns garbage for the
    partition it owns. An honest aggregate stays within a few times our own scale. The aggregates of a reducer
    this peer has banned are ignored whatever they look like (``ignore_banned_reducers``): a leader that has not
    banned it may still put it in our group. With ``avoid_banned_groups``, a group that holds any peer we ban
    brings back nothing at all (``kept_all_local``): the honest reducers that do not ban it mix its part into their
    aggregates, so only our own values are free of it; we still serve the others.
    """

    def __init__(
        self,
        *,
        aggregator: Aggregator,
        reputation: ReputationBook,
        result_distance_limit: float | None = RESULT_DISTANCE_LIMIT,
        weight_claim_limit: float | None = None,
        ignore_banned_reducers: bool = True,
        avoid_banned_groups: bool = True,
        signer: PartSigner | None = None,
        require_signed_parts: bool = False,
        accuse: Callable[[Accusation], None] | None = None,
        identical_results: bool = False,
        silent_member_timeouts: tuple[float, float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # (first part from each sender, first answer from each reducer): see silent_peer_timeouts
        self.silent_member_timeouts = silent_member_timeouts
        self.reputation, self.result_distance_limit = reputation, result_distance_limit
        self.identical_results = identical_results
        self._answers: dict[tuple[int, int], runtime_pb2.Tensor] = {}  # (part, codec) -> the aggregate, serialized once
        self.signer, self.require_signed_parts, self.accuse = signer, require_signed_parts, accuse
        # the last parts received per sender, with their seals: evidence if the reducer rejects one of them
        self._recent_parts: collections.OrderedDict[tuple[int, int], tuple[runtime_pb2.Tensor, float, bytes]] = collections.OrderedDict()
        # judged once, when the round starts: a ban that lands mid-round (our reducer just rejected the peer's
        # part) takes effect from the next round, so that one round is handled by one consistent rule
        banned = {str(peer) for peer in self.ordered_peer_ids if peer != self.peer_id and reputation.is_banned(str(peer))}
        self._banned_reducers = banned if ignore_banned_reducers else set()
        self.kept_all_local = bool(banned) and avoid_banned_groups
        if self.kept_all_local:
            logger.warning(
                f"{self}: the group holds {len(banned)} peer(s) this peer bans ({', '.join(sorted(p[-8:] for p in banned))}): "
                f"keeping local values for this round, still serving our partition to the other {len(self.ordered_peer_ids) - 1 - len(banned)}"
            )
        container = self.tensor_part_container
        container.return_deltas = not identical_results  # a failed reducer then leaves our own values, not zeros
        total_norm = torch.sqrt(sum(t.detach().double().pow(2).sum() for t in container.local_tensors) + 0.0)
        self._norm_per_value = float(total_norm) / max(1, container.total_size) ** 0.5
        self._refused_from: set[int] = set()
        self._iterate_own_outputs = container.iterate_output_tensors
        container.iterate_output_tensors = self._outputs_then_finish_serving
        if result_distance_limit is not None or ignore_banned_reducers or self.kept_all_local:
            self._register_checked_part = container.register_processed_part
            container.register_processed_part = self._check_returned_part
        # retire the stock reducer quietly: nobody will feed it, and its finalize() would warn "received 0.0%"
        self.tensor_part_reducer.finished.set()
        local_parts = self.parts_for_local_averaging
        self.tensor_part_reducer = RobustTensorPartReducer(
            tuple(part.shape for part in local_parts),
            tuple(part.dtype for part in local_parts),
            [str(peer_id) for peer_id in self.sender_peer_ids],
            aggregator=aggregator,
            reputation=reputation,
            round_name=self.group_id.hex()[:8],
            local_sender=str(self.peer_id),
            weight_claim_limit=weight_claim_limit,
            # the unprotected mean baseline (no result check) keeps judging by the result alone
            captured_ratio=None if result_distance_limit is None else CAPTURED_RATIO,
            on_rejected=self._keep_evidence if require_signed_parts and accuse is not None else None,
        )

    async def _generate_input_for_peer(self, peer_index: int):
        """hivemind's part messages, each sealed with this peer's identity key (`averaging.part_signatures`)."""
        parts = super()._generate_input_for_peer(peer_index)
        if self.signer is None:
            async for message in parts:
                yield message
            return
        sender, reducer = str(self.peer_id), str(self.ordered_peer_ids[peer_index])
        part_index = 0
        async for message in parts:
            statement = tensor_statement(self.group_id, sender, reducer, part_index, message.weight, message.tensor_part)
            message.peer_id = self.signer.seal(statement)
            part_index += 1
            yield message

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        if self.require_signed_parts:
            stream = self._sealed_parts(stream, sender_index)
        if self.identical_results:
            answers = self._answer_with_aggregates(stream, sender_index)
        else:
            answers = super()._accumulate_parts_streaming(stream, sender_index)
        async for message in answers:
            yield message

    async def _answer_with_aggregates(self, stream, sender_index: int):
        """The reducer's loop of ``identical_results``: each part aggregated, answered with the aggregate serialized
        once per codec (every sender of the part gets the same bytes). A sender whose stream ends early or carries a
        part that cannot be decoded is excluded from the parts it did not send, as in hivemind."""
        loop = asyncio.get_running_loop()
        part_index = 0
        try:
            async for message in stream:
                tensor_part = await loop.run_in_executor(None, deserialize_torch_tensor, message.tensor_part)
                try:
                    aggregate = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, tensor_part, weight=message.weight)
                except BannedException:
                    break
                answer = await loop.run_in_executor(None, self._serialized_aggregate, part_index, aggregate, message.tensor_part.compression)
                part_index += 1
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=answer)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    def _serialized_aggregate(self, part_index: int, aggregate: torch.Tensor, codec: int) -> runtime_pb2.Tensor:
        key = (part_index, int(codec))
        if key not in self._answers:
            self._answers[key] = serialize_torch_tensor(aggregate.detach(), codec)
        return self._answers[key]

    async def _reduce_own_parts_identically(self) -> None:
        """Our own partition in ``identical_results`` mode: what we keep is what the other members decode."""
        container = self.tensor_part_container
        peer_index, sender_index = self.ordered_peer_ids.index(self.peer_id), self.sender_peer_ids.index(self.peer_id)
        loop = asyncio.get_running_loop()
        for part_index, part in enumerate(self.parts_for_local_averaging):
            aggregate = await self.tensor_part_reducer.accumulate_part(sender_index, part_index, part, weight=self.weight)
            _, info = container._input_parts_by_peer[peer_index][part_index]
            codec = container.compression.compress(part, info).compression  # the codec our own messages use
            answer = await loop.run_in_executor(None, self._serialized_aggregate, part_index, aggregate, codec)
            container.register_processed_part(peer_index, part_index, deserialize_torch_tensor(answer))

    async def _sealed_parts(self, stream, sender_index: int):
        """The sender's part messages while each one's seal is the sender's signature of it; a part without one is
        rejected as malformed (proof of a faulty peer: every honest trainer signs) and ends the stream."""
        sender, reducer = str(self.sender_peer_ids[sender_index]), str(self.peer_id)
        part_index = 0
        async for message in stream:
            statement = tensor_statement(self.group_id, sender, reducer, part_index, message.weight, message.tensor_part)
            problem = check_seal(message.peer_id, statement, sender)
            if problem is not None:
                self.tensor_part_reducer.reject(sender_index, part_index, f"part not signed by its sender: {problem}")
                return
            self._recent_parts[(sender_index, part_index)] = (message.tensor_part, float(message.weight), bytes(message.peer_id))
            while len(self._recent_parts) > KEPT_PARTS_PER_SENDER * len(self.sender_peer_ids):
                self._recent_parts.popitem(last=False)
            part_index += 1
            yield message

    def _keep_evidence(self, sender_index: int, part_index: int, reason: str) -> None:
        """The reducer rejected a part: if it holds a non-finite value, publish it with its seal (an accusation)."""
        kept = self._recent_parts.get((sender_index, part_index))
        if kept is None or self.accuse is None:
            return
        tensor, weight, seal = kept
        accused = str(self.sender_peer_ids[sender_index])
        accusation = make_accusation(accused, str(self.peer_id), bytes(self.group_id), part_index, weight, tensor, seal)
        # only proof goes out: a wrong size is no proof to an outsider, who does not know the group's layout
        if accusation is not None and verify_accusation(accusation) is None:
            self.accuse(accusation)

    async def _outputs_then_finish_serving(self):
        """Our own results, then wait (bounded) until our reducer has answered every sender.

        hivemind finalizes the runner, reducer included, as soon as this peer's own results are in. A peer whose
        parts everybody rejected, or whose own part was invalid, has its results at once and would drop the
        partition it reduces for the others mid-round; they would keep local values for it. Only works if the
        caller drains the runner (our averagers' ``_run_allreduce_inplace_`` does; hivemind's stops early)."""
        async for delta in self._iterate_own_outputs():
            yield delta
        if self.silent_member_timeouts is not None:
            timeout = sum(self.silent_member_timeouts)
        else:
            timeout = (self.sender_timeout or 0.0) + (self.reducer_timeout or 0.0) or 30.0
        try:
            await asyncio.wait_for(self.tensor_part_reducer.finished.wait(), timeout)
        except asyncio.TimeoutError:
            logger.debug(f"{self}: reducer still unfinished after {timeout:.0f} s; finalizing")

    def _check_returned_part(self, peer_index: int, part_index: int, part: torch.Tensor) -> None:
        container = self.tensor_part_container
        own = container._input_parts_by_peer[peer_index][part_index][0]
        reducer = str(self.ordered_peer_ids[peer_index])
        if self.kept_all_local:
            part = self._local_result(own)
        elif reducer in self._banned_reducers:
            # a group led by a peer that has not banned it yet may still contain a peer we ban: we ignore its
            # parts as a sender (our reducer), and must not take its word as a reducer either. We still send it
            # our parts, so that the honest members who wait on its partition are not stalled
            if peer_index not in self._refused_from:
                self._refused_from.add(peer_index)
                logger.info(f"{self}: ignoring the aggregates of banned reducer {reducer}; keeping local values for its partition")
            part = self._local_result(own)
        elif self.result_distance_limit is not None:
            delta = part if container.return_deltas else part - own
            reason = refused_result_reason(delta, own, self._norm_per_value, self.result_distance_limit)
            if reason is not None:
                if peer_index not in self._refused_from:  # one line per (round, reducer)
                    self._refused_from.add(peer_index)
                    self.reputation.record_refused_result(reducer)
                    logger.warning(f"{self}: refused the aggregate of part {part_index} from reducer {reducer} ({reason}); keeping local values")
                part = self._local_result(own)
        self._register_checked_part(peer_index, part_index, part)

    def _local_result(self, own: torch.Tensor) -> torch.Tensor:
        """What to register instead of a reducer's answer: our own values (as a zero delta if deltas are returned)."""
        return torch.zeros_like(own) if self.tensor_part_container.return_deltas else own

    async def _handle_missing_senders(self):
        """hivemind's, with the start deadline of ``silent_member_timeouts`` (hivemind's ``sender_timeout`` would
        also bound every later part, see :func:`silent_peer_timeouts`)."""
        if self.silent_member_timeouts is None:
            return await super()._handle_missing_senders()
        deadline = self.silent_member_timeouts[0]
        try:
            await asyncio.wait_for(self.all_senders_started.wait(), deadline)
        except asyncio.TimeoutError:
            silent = [peer for peer in self.sender_peer_ids if peer not in self.active_senders and peer not in self.banned_senders]
            if silent:
                logger.warning(
                    f"{self}: {len(silent)} group member(s) sent nothing within {deadline:.1f} s "
                    f"({', '.join(str(peer)[-8:] for peer in silent)}): reducing our partition without them"
                )
            for peer in silent:
                await self._ban_sender(peer)  # this round only: hivemind's exclusion, not a reputation ban

    def _get_peer_stub(self, peer: PeerID):
        stub = super()._get_peer_stub(peer)
        if self.silent_member_timeouts is None:
            return stub
        return _FirstAnswerDeadline(stub, self.silent_member_timeouts[1], f"{self}: reducer {str(peer)[-8:]}")

    async def _communicate_with_peer(self, peer_id: PeerID):
        if peer_id != self.peer_id:
            return await super()._communicate_with_peer(peer_id)
        try:
            if self.identical_results:
                await self._reduce_own_parts_identically()
            else:
                await super()._communicate_with_peer(peer_id)
        except AllreduceException as e:  # our own part was rejected or excluded (includes BannedException)
            if self._future.done():
                raise
            logger.warning(f"{self}: keeping local values for this peer's own partition: {e}")
            self.tensor_part_container.register_failed_reducer(self.ordered_peer_ids.index(self.peer_id))


SILENT_SENDER_SHARE = 1 / 3  # of the all-reduce's time: what a group member may take to send its first part


def silent_peer_timeouts(allreduce_timeout: float) -> tuple[float, float]:
    """``silent_member_timeouts`` for an all-reduce allowed ``allreduce_timeout`` seconds: (seconds a sender may take
    to start sending, seconds a reducer may take to send its first answer). Pure.

    Without them a group member that sends nothing stalls every reducer on its first part until the whole
    all-reduce times out, and the round fails for everybody: hivemind's matchmaking can put a peer in a group whose
    own side gave up ("could not find a group"; seen once in 64 rounds of a 50 ms WAN benchmark, all four trainers
    stepped alone). With them each reducer averages without a sender that has not started after the first, and a
    caller keeps its own values for the partition of a reducer that has not answered after the second. A reducer
    answers its first part only once every sender has sent it or been dropped, hence twice the sender's time.

    Only the first message has a deadline: a member that has started is waited for as before (until
    ``allreduce_timeout``), however slow it is between parts on a loaded machine or a congested link. hivemind's
    ``sender_timeout``/``reducer_timeout`` would bound every message and drop such a member mid-round, leaving the
    members of an ``identical_results`` round apart (each then downloads the swarm's state)."""
    if not allreduce_timeout > 0:
        raise ValueError(f"allreduce_timeout must be positive, got {allreduce_timeout}")
    sender = SILENT_SENDER_SHARE * allreduce_timeout
    return sender, 2 * sender


class _FirstAnswerDeadline:
    """A peer's averaging stub whose ``rpc_aggregate_part`` answers fail with TimeoutError if the first one does
    not come within ``timeout`` seconds (hivemind's runner then keeps our own values for that partition)."""

    def __init__(self, stub, timeout: float, who: str):
        self._stub, self._timeout, self._who = stub, timeout, who

    async def rpc_aggregate_part(self, requests):
        return _first_within(await self._stub.rpc_aggregate_part(requests), self._timeout, self._who)


async def _first_within(answers, timeout: float, who: str):
    iterator = answers.__aiter__()
    try:
        first = await asyncio.wait_for(iterator.__anext__(), timeout)
    except StopAsyncIteration:
        return
    except asyncio.TimeoutError:
        logger.warning(f"{who} sent no answer within {timeout:.1f} s: keeping our own values for its partition")
        raise
    yield first
    async for answer in iterator:
        yield answer


def refused_result_reason(
    delta: torch.Tensor, own_part: torch.Tensor, norm_per_value: float, limit: float = RESULT_DISTANCE_LIMIT
) -> str | None:
    """Why a returned ``aggregate - own_part`` must not be applied, or None. Pure.

    :param norm_per_value: our tensors' total norm / sqrt(their total size): the scale of a part if our values
      were spread evenly (a part may legitimately be much larger or smaller than our own part of it, e.g.
      embedding rows of tokens only other peers saw)
    """
    if tuple(delta.shape) != tuple(own_part.shape):
        return f"shape {tuple(delta.shape)}, expected {tuple(own_part.shape)}"
    if not bool(torch.isfinite(delta).all()):
        return "NaN or Inf"
    distance = float(torch.linalg.vector_norm(delta.double()))
    scale = max(float(torch.linalg.vector_norm(own_part.double())), norm_per_value * own_part.numel() ** 0.5)
    if scale > 0 and distance > limit * scale:  # all-zero local tensors give no scale to judge by
        return f"{distance:.3g} from our part, more than {limit:g} x our scale {scale:.3g}"
    return None


class SerialSendPipe:
    """The host side of an averager's control pipe, with sends made one at a time. A trainer calls its averager from
    two threads (an outer round in the background, the training loop reading bans), and a `Connection.send` of a
    large message is more than one write: two threads' messages could interleave on the wire."""

    def __init__(self, pipe):
        self._pipe, self._lock = pipe, threading.Lock()

    def send(self, message) -> None:
        with self._lock:
            self._pipe.send(message)

    def __getattr__(self, name: str):
        if name in ("_pipe", "_lock"):  # not set yet (a copy made without __init__): no recursion
            raise AttributeError(name)
        return getattr(self._pipe, name)


class _RobustAveragerMixin:
    """What both robust averagers add to hivemind's DecentralizedAverager (see the module docstring)."""

    robust_settings: RobustAveragingSettings
    reputation: ReputationBook

    def _init_robust(
        self, settings: RobustAveragingSettings, reputation: Optional[ReputationBook], signer: Optional[PartSigner] = None
    ) -> None:
        if not isinstance(settings, RobustAveragingSettings):
            raise TypeError(f"settings must be RobustAveragingSettings, got {type(settings).__name__}")
        self._signer = signer  # seals the parts this peer sends (`averaging.part_signatures`); None: unsigned
        self._identical_results = False  # RobustDecentralizedAverager(identical_results=True) turns it on
        self._silent_member_timeouts: Optional[tuple[float, float]] = None  # see silent_peer_timeouts
        self._new_accusations: list[Accusation] = []  # averager process: proofs our reducer kept, not yet taken
        self.robust_settings = settings
        self.reputation = reputation if reputation is not None else settings.make_reputation_book()
        self._aggregator: Optional[Aggregator] = None  # built in the averager process, see run()
        # shared with the averager process (made before it forks): what share of the values the last all-reduce
        # brought back averaged; hivemind keeps a peer's own values for any part whose reducer did not answer
        self._received_fraction = mp.Value("d", 1.0)

    @property
    def last_round_received_fraction(self) -> float:
        """Of the last all-reduce's values, the share that came back averaged (1.0: all; the rest kept local)."""
        return float(self._received_fraction.value)

    def __del__(self):
        if "_parent_pid" in self.__dict__:  # hivemind's __del__ fails on an object whose __init__ raised early
            super().__del__()

    # ------------------------------------------------------------------ host process API

    def get_reputation(self, timeout: Optional[float] = 30.0) -> dict:
        """A JSON-able snapshot of the averager process's reputation book (see ``ReputationBook.snapshot``)."""
        future = MPFuture()
        self._outer_pipe.send(("_get_reputation", [], dict(future=future)))
        return future.result(timeout=timeout)

    def ban_peer(self, peer_id: str, reason: str, timeout: Optional[float] = 30.0) -> None:
        """Ban a peer in the averager process's book (e.g. on evidence from outside the all-reduce)."""
        future = MPFuture()
        self._outer_pipe.send(("_ban_peer", [], dict(peer_id=str(peer_id), reason=reason, future=future)))
        future.result(timeout=timeout)

    def take_accusations(self, timeout: Optional[float] = 30.0) -> list[Accusation]:
        """The accusations (signed non-finite parts) this peer's reducer made since the last call."""
        future = MPFuture()
        self._outer_pipe.send(("_take_accusations", [], dict(future=future)))
        return future.result(timeout=timeout)

    def recent_groups(self, timeout: Optional[float] = 30.0) -> list[tuple[float, list[str]]]:
        """(DHT time the all-reduce finished, the peers that sent their values) of the last few completed rounds."""
        future = MPFuture()
        self._outer_pipe.send(("_recent_groups", [], dict(future=future)))
        return future.result(timeout=timeout)

    # ------------------------------------------------------------------ averager process

    def run(self):
        install_codecs()  # decoding happens here, in the averager process
        self._aggregator = self.robust_settings.make_aggregator()
        self._groups: collections.deque = collections.deque(maxlen=RECENT_GROUPS)
        super().run()

    async def _take_accusations(self, future: MPFuture):
        taken, self._new_accusations = self._new_accusations, []
        future.set_result(taken)

    async def _recent_groups(self, future: MPFuture):
        future.set_result(list(self._groups))

    async def _get_reputation(self, future: MPFuture):
        future.set_result(self.reputation.snapshot())

    def set_target_group_size(self, size: Optional[int], timeout: Optional[float] = 30.0) -> None:
        """From the next matchmaking on, a group is assembled as soon as it has `size` members instead of after
        `min_matchmaking_time` (None: always wait that long). For callers that know who will come (a barrier)."""
        future = MPFuture()
        self._outer_pipe.send(("_set_target_group_size", [], dict(size=size, future=future)))
        future.result(timeout=timeout)

    async def _set_target_group_size(self, size: Optional[int], future: MPFuture):
        self.matchmaking_kwargs["target_group_size"] = size
        matchmaking = getattr(self, "_matchmaking", None)  # built by hivemind in the averager process
        if matchmaking is not None:
            matchmaking.target_group_size = size
        future.set_result(None)

    async def _ban_peer(self, peer_id: str, reason: str, future: MPFuture):
        self.reputation.ban(peer_id, reason)
        future.set_result(None)

    async def _step(self, **kwargs):
        self._skip_banned_leaders()
        try:
            return await super()._step(**kwargs)
        except concurrent.futures.InvalidStateError:
            # hivemind.Optimizer may cancel a step (e.g. to download state) while its all-reduce is still
            # serving the group; hivemind then sets the result of the cancelled future and the error escapes as
            # "Task exception was never retrieved". The caller has given up on this step: nothing to report
            step = kwargs.get("step")
            if step is not None and step.cancelled():
                logger.debug("averaging step was cancelled while its all-reduce finished; result dropped")
                return None
            raise

    def _skip_banned_leaders(self) -> None:
        """Wrap this process's Matchmaking so that joining a banned leader fails as if it had rejected us."""
        matchmaking = self._matchmaking
        if not self.robust_settings.refuse_banned_peers or getattr(matchmaking, "_skips_banned_leaders", False):
            return
        request_join_group = matchmaking._request_join_group  # the bound method of hivemind's class

        async def _request_join_unbanned_group(leader: PeerID) -> Optional[GroupInfo]:
            if self.reputation.is_banned(str(leader)):
                logger.debug(f"not joining the group of banned leader {leader}")
                return None
            return await request_join_group(leader)

        matchmaking._request_join_group = _request_join_unbanned_group
        matchmaking._skips_banned_leaders = True

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        """Refuse banned peers, then let hivemind's matchmaking decide."""
        if self.robust_settings.refuse_banned_peers and self.reputation.is_banned(str(context.remote_id)):
            logger.debug(f"refusing join request from banned peer {context.remote_id}")
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: Optional[bytes] = None, **kwargs
    ):
        """hivemind's ``DecentralizedAverager._run_allreduce_inplace_`` with :class:`RobustAllReduceRunner`."""
        group_id = group_info.group_id if group_id is None else group_id
        runner = RobustAllReduceRunner(
            aggregator=self._aggregator,
            reputation=self.reputation,
            result_distance_limit=self.robust_settings.result_distance_limit,
            weight_claim_limit=self.robust_settings.weight_claim_limit,
            ignore_banned_reducers=self.robust_settings.ignore_banned_reducers,
            avoid_banned_groups=self.robust_settings.avoid_banned_groups,
            signer=self._signer,
            require_signed_parts=self.robust_settings.signed_parts,
            accuse=self._new_accusations.append,
            identical_results=self._identical_results,
            silent_member_timeouts=self._silent_member_timeouts,
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            **kwargs,
        )
        assert group_id in self._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        self._running_groups[group_id].set_result(runner)

        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            # drain the runner instead of zipping it with the tensors as hivemind does: azip stops at the last
            # tensor and returns while the runner still serves its partition to the others (see
            # RobustAllReduceRunner._outputs_then_finish_serving); the group would be unregistered and senders
            # still on their way would get BAD_GROUP_ID and keep their own values for our whole partition
            self._received_fraction.value = 1.0
            remaining = iter(tensors)
            async for update in runner:
                if self._identical_results:  # the round's result itself, the same bytes on every member
                    next(remaining).copy_(update)
                else:
                    next(remaining).add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
            parts = runner.tensor_part_container
            self._received_fraction.value = 0.0 if runner.kept_all_local else 1.0 - parts.failed_size / max(1, parts.total_size)
            senders = [str(p) for p, mode in zip(group_info.peer_ids, runner.modes) if mode != AveragingMode.AUX]
            self._groups.append((get_dht_time(), senders))
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")


class RobustDecentralizedAverager(_RobustAveragerMixin, DecentralizedAverager):
    """``hivemind.averaging.DecentralizedAverager`` with robust all-reduce and local bans.

    :param settings: aggregation and ban policy
    :param reputation: seeds the averager process's book (default: an empty book from ``settings``)
    :param signer: seals this peer's parts (needed when ``settings.signed_parts``: the other peers demand seals)
    :param identical_results: every member ends a round with bit-identical averaged tensors (each reducer sends its
      aggregate, not the difference from the sender's part; see the module docstring); ``averaging_alpha`` is ignored
    :param silent_member_timeouts: (a sender's, a reducer's) seconds to send its first message before the others
      average without it (:func:`silent_peer_timeouts`); None: wait for it until ``allreduce_timeout``
    :param kwargs: as for DecentralizedAverager (``start=True`` forks the averager process here)
    """

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],
        dht,
        *,
        settings: RobustAveragingSettings = RobustAveragingSettings(),
        reputation: Optional[ReputationBook] = None,
        signer: Optional[PartSigner] = None,
        identical_results: bool = False,
        silent_member_timeouts: Optional[tuple[float, float]] = None,
        **kwargs,
    ):
        self._init_robust(settings, reputation, signer)  # before super().__init__, which may start the process
        self._identical_results = identical_results
        if silent_member_timeouts is not None and not 0 < silent_member_timeouts[0] < silent_member_timeouts[1]:
            raise ValueError(f"silent_member_timeouts must be (sender, reducer) with 0 < sender < reducer, got {silent_member_timeouts}")
        self._silent_member_timeouts = silent_member_timeouts
        super().__init__(averaged_tensors, dht, **kwargs)
        self._outer_pipe = SerialSendPipe(self._outer_pipe)


class RobustGradientAverager(_RobustAveragerMixin, GradientAverager):
    """``hivemind.optim.GradientAverager`` with robust all-reduce and local bans; for hivemind.Optimizer use
    :func:`make_grad_averager_factory`.

    :param settings: aggregation and ban policy
    :param reputation: seeds the averager process's book (default: an empty book from ``settings``)
    :param signer: seals this peer's parts (needed when ``settings.signed_parts``: the other peers demand seals)
    :param kwargs: as for GradientAverager
    """

    def __init__(
        self,
        parameters,
        *,
        settings: RobustAveragingSettings = RobustAveragingSettings(),
        reputation: Optional[ReputationBook] = None,
        signer: Optional[PartSigner] = None,
        **kwargs,
    ):
        self._init_robust(settings, reputation, signer)
        super().__init__(parameters, **kwargs)
        self._outer_pipe = SerialSendPipe(self._outer_pipe)


def make_grad_averager_factory(
    settings: RobustAveragingSettings,
    reputation: Optional[ReputationBook] = None,
    signer: Optional[PartSigner] = None,
    **averager_kwargs,
) -> Callable[..., RobustGradientAverager]:
    """A ``grad_averager_factory`` for ``hivemind.Optimizer`` that builds a :class:`RobustGradientAverager`.

    :param averager_kwargs: extra DecentralizedAverager arguments that hivemind.Optimizer does not pass to its
      gradient averager, e.g. ``target_group_size``, ``min_group_size``, ``request_timeout``,
      ``part_size_bytes``. Arguments the Optimizer sets itself (``dht``, ``prefix``, ``compression``,
      ``client_mode``, ...) must be given to the Optimizer; repeating them here raises TypeError.
    """

    def factory(**optimizer_kwargs) -> RobustGradientAverager:
        repeated = sorted(set(averager_kwargs) & set(optimizer_kwargs))
        if repeated:
            raise TypeError(f"hivemind.Optimizer already sets {repeated}; remove them from make_grad_averager_factory")
        return RobustGradientAverager(settings=settings, reputation=reputation, signer=signer, **averager_kwargs, **optimizer_kwargs)

    return factory
