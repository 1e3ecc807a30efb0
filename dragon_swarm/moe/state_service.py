"""Expert state over the network: a host answers "send me expert X" with X's weights, AdamW moments and update count,
streamed as safetensors bytes after a first message with their count (a cut stream is named as such and asked for
again); a peer downloads from one or several hosts and keeps a validated, robust choice.

The servicer runs in the peer's own process (not in the forked connection handlers), so it reads the weights the
runtime is training right now. One servicer per peer, for whatever experts the peer hosts at the moment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Sequence

import hivemind
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from dragon_swarm.moe import expert_state, round_delta
from dragon_swarm.moe.backend import ExpertBackend
from dragon_swarm.moe.expert_state import ExpertState, ExpertStateError, ExpertTemplate
from dragon_swarm.moe.round_delta import RoundSnapshot

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
SIZE_SLACK = 1.5  # allowed bytes over the expected size: safetensors header, optimizer scalars
REQUEST_BURST = 32  # state requests one peer may make at once (a sync round asks for each shared expert)...
REQUESTS_PER_S = 4.0  # ...and per second after that: state downloads are big, this is plenty for sync and standby
KEPT_ROUND_FETCHES = 256  # (expert, round) entries of who fetched a round snapshot, newest kept
SIZE_HEADER = b"bytes: "  # the first message of an answer: how many bytes follow (hivemind ends a reset stream as if
# it had ended cleanly, so without it a cut answer reaches the parser as a shorter one)
DOWNLOAD_RETRIES = 1  # a download cut short, or never answered, is asked for again, once, within its timeout
# a request whose first message (the size header, sent once the answer is encoded: well under a second) has not come
# in this long is taken as lost and sent again; seen once in CI: a holder up and answering others never answered
# four round-snapshot requests of one peer, which waited out its whole 30 s timeout and merged without it
FIRST_ANSWER_TIMEOUT_S = 10.0


class RetryableDownload(ExpertStateError):
    """A download that failed on the way, not by the holder's answer: worth asking again."""


class TruncatedDownload(RetryableDownload):
    """The answer's stream ended before the bytes it announced had arrived (a reset link)."""


class UnansweredRequest(RetryableDownload):
    """No first message within `FIRST_ANSWER_TIMEOUT_S` (a request or its answer lost on the way)."""


class ExpertStateServicer(ServicerBase):
    """Serves the state of the experts `lookup` returns (None: not hosted here)."""

    def __init__(self, lookup: Callable[[str], ExpertBackend | None], snapshot: Callable[[str, str], RoundSnapshot | None] | None = None):
        self.lookup = lookup
        self.snapshot = snapshot  # (uid, round tag) -> a frozen state of that round, if this peer has it
        self._buckets: dict[str, tuple[float, float]] = {}  # requester -> (tokens, when counted)
        self.served = 0
        self.round_fetches: dict[tuple[str, str], set[str]] = {}  # (uid, round tag) -> peers served that snapshot

    async def rpc_download_expert(
        self, request: runtime_pb2.ExpertUID, context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        requester = context.remote_id.to_base58()
        now = time.monotonic()
        tokens, counted = self._buckets.get(requester, (REQUEST_BURST, now))
        tokens = min(REQUEST_BURST, tokens + (now - counted) * REQUESTS_PER_S)
        if tokens < 1.0:
            yield runtime_pb2.ExpertResponse(metadata=b"error: too many state requests, retry in a second")
            return
        # "uid" (the live state) or "uid@tag@digest" (round `tag`'s snapshot, for a holder whose round start has
        # that digest)
        uid, _, rest = request.uid.partition("@")
        tag, _, their_start = rest.partition("@")
        loop = asyncio.get_running_loop()
        if tag:
            frozen = self.snapshot(uid, tag) if self.snapshot is not None else None
            if frozen is None:  # a cheap answer that holders poll for: it costs the requester no token
                self._buckets[requester] = (tokens, now)
                yield runtime_pb2.ExpertResponse(metadata=b"error: no snapshot of that round here (yet)")
                return
            self._buckets[requester] = (tokens - 1.0, now)
            data = await loop.run_in_executor(None, lambda: round_delta.to_bytes(frozen, their_start))
        else:
            self._buckets[requester] = (tokens - 1.0, now)
            backend = self.lookup(uid)
            if backend is None:
                yield runtime_pb2.ExpertResponse(metadata=b"error: expert not hosted here")
                return
            data = await loop.run_in_executor(None, lambda: expert_state.to_bytes(expert_state.capture(backend)))
        self.served += 1
        yield runtime_pb2.ExpertResponse(metadata=SIZE_HEADER + str(len(data)).encode())
        for start in range(0, len(data), CHUNK_BYTES):
            yield runtime_pb2.ExpertResponse(tensors=[], metadata=data[start : start + CHUNK_BYTES])
        if tag:  # sent in full: a holder stopping after its last round may go once its partners have it
            self.round_fetches.setdefault((uid, tag), set()).add(requester)
            while len(self.round_fetches) > KEPT_ROUND_FETCHES:
                del self.round_fetches[next(iter(self.round_fetches))]


class ExpertStateService:
    """Owns the servicer's registration and the client side. `start()`, `download...()`, `shutdown()`."""

    def __init__(
        self,
        dht: hivemind.DHT,
        namespace: str,
        lookup: Callable[[str], ExpertBackend | None],
        snapshot: Callable[[str, str], RoundSnapshot | None] | None = None,
    ):
        self.dht, self.namespace = dht, namespace
        self.servicer = ExpertStateServicer(lookup, snapshot)
        self.own_peer_id = dht.peer_id.to_base58()
        self._p2p = None
        self._serving = False

    def start(self, serve: bool = True, p2p=None) -> None:
        """Connect to the daemon (or use `p2p`); with `serve`, also answer other peers' downloads. A download-only
        client (an exporter) serves nothing: no handler, no listener task outliving it."""
        self._p2p = p2p if p2p is not None else RemoteExpertWorker.run_coroutine(self.dht.replicate_p2p())
        self._serving = serve
        if serve:
            RemoteExpertWorker.run_coroutine(self.servicer.add_p2p_handlers(self._p2p, namespace=self.namespace))

    def fetched_by(self, uid: str, tag: str) -> set[str]:
        """The peers this peer has sent its round `tag` snapshot of `uid` to."""
        return set(self.servicer.round_fetches.get((uid, tag), ()))

    def shutdown(self) -> None:
        if self._p2p is not None and self._serving:
            try:
                RemoteExpertWorker.run_coroutine(self.servicer.remove_p2p_handlers(self._p2p, namespace=self.namespace))
            except Exception as e:  # the daemon may already be gone when the peer stops
                logger.debug(f"Removing the expert state handler failed: {e}")
        self._p2p, self._serving = None, False

    def fetch(
        self,
        peer_id: str,
        uid: str,
        template: ExpertTemplate | ExpertBackend,
        timeout: float,
        tag: str | None = None,
        own_round: RoundSnapshot | None = None,
    ) -> ExpertState:
        """One host's state of `uid`, validated against `template` (this expert's shapes). With a round `tag`: the
        weights its frozen snapshot of that round stands for, without optimizer state, rebuilt against `own_round`
        (this holder's snapshot of the round: its round start) as the sender rebuilds them. Raises ExpertStateError."""
        max_bytes = int(SIZE_SLACK * expected_state_bytes(template)) + 65536
        if tag is not None and own_round is None:
            raise ValueError("a round snapshot is fetched against this holder's own snapshot of the round")
        request_uid = uid if tag is None else f"{uid}@{tag}@{own_round.digest}"
        deadline = time.monotonic() + timeout
        for attempt in range(DOWNLOAD_RETRIES + 1):
            try:
                data = RemoteExpertWorker.run_coroutine(
                    asyncio.wait_for(self._download(peer_id, request_uid, max_bytes), timeout=max(deadline - time.monotonic(), 0.1))
                )
                break
            except RetryableDownload as e:
                if attempt == DOWNLOAD_RETRIES or time.monotonic() >= deadline:
                    raise
                logger.info(f"Expert state download failed on the way ({e}); asking again")
            except ExpertStateError:
                raise
            except Exception as e:  # timeouts, dropped streams, unreachable peers
                raise ExpertStateError(f"{uid} from {peer_id[-8:]}: {type(e).__name__}: {str(e)[:120]}") from None
        source = f"{uid} from {peer_id[-8:]}"
        if tag is not None:  # an outer round's snapshot: an 8-bit delta (`moe.round_delta`)
            state = round_delta.from_bytes(data, source, template.module.state_dict(), own_round.start, own_round.digest)
        else:
            state = expert_state.from_bytes(data, source)
        try:
            expert_state.validate(state, template, uid)
        except ExpertStateError as e:
            raise ExpertStateError(f"{uid} from {peer_id[-8:]}: {e}") from None
        return state

    async def _download(self, peer_id: str, uid: str, max_bytes: int) -> bytes:
        stub = ExpertStateServicer.get_stub(self._p2p, PeerID.from_base58(peer_id), namespace=self.namespace)
        source = f"{uid} from {peer_id[-8:]}"

        async def first_message():
            stream = (await stub.rpc_download_expert(runtime_pb2.ExpertUID(uid=uid))).__aiter__()
            return stream, await stream.__anext__()

        try:
            stream, first = await asyncio.wait_for(first_message(), timeout=FIRST_ANSWER_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise UnansweredRequest(f"{source}: no answer within {FIRST_ANSWER_TIMEOUT_S:.0f} s") from None
        except StopAsyncIteration:
            raise ExpertStateError(f"{source}: empty answer") from None
        if first.metadata.startswith(b"error: "):
            raise ExpertStateError(f"{source}: {first.metadata[7:200].decode(errors='replace')}")
        announced = _announced_size(first.metadata)
        if announced is None:
            raise ExpertStateError(f"{source}: the answer does not start with its size")
        if announced == 0:
            raise ExpertStateError(f"{source}: empty answer")
        if announced > max_bytes:
            raise ExpertStateError(f"{source}: {announced:,} bytes announced, more than {max_bytes:,}: refused")
        chunks, size = [], 0
        async for response in stream:
            if response.metadata.startswith(b"error: "):
                raise ExpertStateError(f"{source}: {response.metadata[7:200].decode(errors='replace')}")
            size += len(response.metadata)
            if size > announced:
                raise ExpertStateError(f"{source}: more bytes than the {announced:,} announced, refused")
            chunks.append(response.metadata)
        if size < announced:
            raise TruncatedDownload(f"{source}: the stream ended after {size:,} of {announced:,} bytes")
        return b"".join(chunks)

    def fetch_robust(
        self, peer_ids: Sequence[str], uid: str, template: ExpertTemplate | ExpertBackend, timeout: float, reference: ExpertState | None = None, limit: int = 3
    ) -> tuple[ExpertState, str, list[str]] | None:
        """Ask up to `limit` hosts; keep the valid answers; return (robust choice, the peer it came from, problems).
        None when no host gave a usable state."""
        asked = [p for p in peer_ids if p != self.own_peer_id][:limit]

        def ask(peer_id: str) -> ExpertState | ExpertStateError:
            try:
                return self.fetch(peer_id, uid, template, timeout)
            except ExpertStateError as e:
                return e

        if not asked:
            return None
        states, sources, problems = [], [], []
        # all hosts at once: each one that trains answers only between two of its micro-batches
        with ThreadPoolExecutor(max_workers=len(asked), thread_name_prefix="expert-fetch") as pool:
            answers = list(pool.map(ask, asked))
        for peer_id, answer in zip(asked, answers):
            if isinstance(answer, ExpertStateError):
                problems.append(str(answer))
                logger.warning(f"Expert state download refused: {answer}")
            else:
                states.append(answer)
                sources.append(peer_id)
        if not states:
            return None
        chosen = expert_state.robust_choice(states, reference)
        return chosen, sources[states.index(chosen)], problems


def _announced_size(header: bytes) -> int | None:
    """The byte count of an answer's first message (`SIZE_HEADER` + decimal digits); None when it is not one."""
    digits = header[len(SIZE_HEADER) :]
    if not header.startswith(SIZE_HEADER) or not digits.isdigit() or len(digits) > 12:
        return None
    return int(digits)


def expected_state_bytes(template: ExpertTemplate | ExpertBackend) -> int:
    """Weights plus two AdamW moments of this expert, in bytes."""
    params = sum(p.numel() * p.element_size() for p in template.module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in template.module.buffers())
    return 3 * params + buffers
