"""Signed accusations: one reducer's proof that a trainer sent a malformed part bans that trainer everywhere.

Bans are local (`averaging.reputation`): each trainer judges only the parts it reduces itself, so a trainer that
never shared a group with a faulty peer keeps letting it into its groups (as leader, as follower) until it has
seen a bad part of its own. A part with NaN or Inf values is proof, not noise (no honest trainer sends one), and
since every part is signed by its sender's identity key (`averaging.part_signatures`), the reducer holding it can
show it to everyone: it publishes the chunk that holds the value, the part's chunk digests and the seal in the DHT (key `<run>_accusations`, one owner-signed
entry per accuser holding its `KEPT_PER_ACCUSER` latest accusations), and every trainer that reads it checks it
(:func:`verify_accusation`) and bans the accused.

The accuser is not trusted at all: an accusation is valid only if the accused's own key signed the part the chunk
belongs to and the chunk holds a non-finite value. Codecs whose buffer is plain values (none, float16) can be read
chunk by chunk; a NaN sent through a quantized codec is still rejected and banned locally, not accused. A forged accusation (a part signed by another key, a part with finite
values, a seal over other bytes) bans nobody; it costs its reader one RSA verification and one log line.

Only non-finite values are accused this way: a part of the wrong size is also malformed, but whether its size is
wrong depends on the group's layout, which a reader that was not in the group cannot know; distance-based bans
need every sender's part of a whole partition to recheck (hundreds of MB for the 125M model), so they stay local.
"""

from __future__ import annotations

import collections
import hashlib
import logging
from typing import Callable

import hivemind
import numpy as np
from google.protobuf.message import DecodeError
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ConfigDict, Field

from dragon_swarm.averaging.part_signatures import CHUNK_BYTES, check_seal, chunk_digests, part_statement, tensor_header
from dragon_swarm.background import PeriodicThread
from dragon_swarm.swarm.signed_records import SignedRecordStore

__all__ = ["Accusation", "AccusationBoard", "AccusationRecord", "make_accusation", "verify_accusation"]

logger = logging.getLogger(__name__)

KEPT_PER_ACCUSER = 2  # accusations one trainer keeps published (each ~10 KiB: one chunk and the chunk digests)
MAX_CHUNKS = 512  # chunk digests of one part: 4 MiB, hivemind's message limit
RECORD_TTL_S = 600.0  # a ban lasts ban_seconds (300 s by default): a trainer that joins later reads it too
JUDGED_KEPT = 1024  # accusations remembered as judged, so each is verified once


class Accusation(BaseModel):
    """One chunk of a signed part that holds a non-finite value, with what it takes to check the sender's seal."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    accused: str = Field(min_length=1, max_length=128)
    reducer: str = Field(min_length=1, max_length=128)
    group_id: bytes = Field(max_length=64)
    part_index: int = Field(ge=0, lt=2**32)
    weight: float
    header: bytes = Field(max_length=1024)  # the part's serialized tensor without its buffer (`tensor_header`)
    digests: bytes = Field(max_length=32 * MAX_CHUNKS)  # sha256 of each CHUNK_BYTES chunk of the part's buffer
    chunk_index: int = Field(ge=0, lt=MAX_CHUNKS)
    chunk: bytes = Field(max_length=CHUNK_BYTES)  # the chunk that holds the non-finite value
    seal: bytes = Field(max_length=4096)  # the accused's seal from AveragingData.peer_id

    @property
    def key(self) -> tuple[str, bytes, int]:
        return self.accused, self.group_id, self.part_index


class AccusationRecord(BaseModel):
    """What one accuser publishes: its latest accusations."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    peer_id: str = Field(min_length=1, max_length=128)
    accusations: list[Accusation] = Field(max_length=KEPT_PER_ACCUSER)


ACCUSATIONS = SignedRecordStore(AccusationRecord, "accusation record", max_ttl_s=RECORD_TTL_S)


def accusations_key(run_prefix: str) -> str:
    return f"{run_prefix}_accusations"


def readable_dtype(header: runtime_pb2.Tensor) -> np.dtype | None:
    """The dtype a chunk of this tensor's buffer holds, for the codecs whose buffer is plain values; else None."""
    if header.compression == runtime_pb2.CompressionType.FLOAT16:
        return np.dtype(np.float16)
    if header.compression == runtime_pb2.CompressionType.NONE:
        try:
            dtype = np.dtype(header.dtype)
        except TypeError:  # e.g. bfloat16, which numpy does not know
            return None
        return dtype if dtype.kind == "f" else None
    return None  # quantized codecs: a chunk of codes says nothing on its own


def make_accusation(accused: str, reducer: str, group_id: bytes, part_index: int, weight: float, tensor: runtime_pb2.Tensor, seal: bytes) -> Accusation | None:
    """The accusation for a received part, if one of its values is NaN or Inf and its codec lets a chunk show it."""
    dtype = readable_dtype(tensor)
    if dtype is None or len(tensor.buffer) % dtype.itemsize:
        return None
    values = np.frombuffer(tensor.buffer, dtype=dtype)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size == 0:
        return None
    digests = chunk_digests(tensor.buffer)
    if len(digests) > MAX_CHUNKS:
        return None
    chunk_index = int(bad[0]) * dtype.itemsize // CHUNK_BYTES
    return Accusation(
        accused=accused, reducer=reducer, group_id=bytes(group_id), part_index=part_index, weight=float(weight),
        header=tensor_header(tensor), digests=b"".join(digests), chunk_index=chunk_index,
        chunk=tensor.buffer[chunk_index * CHUNK_BYTES : (chunk_index + 1) * CHUNK_BYTES], seal=bytes(seal),
    )  # fmt: skip


def verify_accusation(accusation: Accusation) -> str | None:
    """Why `accusation` proves nothing, or None when it proves that its accused sent a non-finite value. Pure."""
    a = accusation
    if len(a.digests) % 32 or a.chunk_index >= len(a.digests) // 32:
        return "the chunk digests do not cover the chunk"
    digests = [a.digests[start : start + 32] for start in range(0, len(a.digests), 32)]
    problem = check_seal(a.seal, part_statement(a.group_id, a.accused, a.reducer, a.part_index, a.weight, a.header, digests), a.accused)
    if problem is not None:
        return f"seal: {problem}"
    if hashlib.sha256(a.chunk).digest() != digests[a.chunk_index]:
        return "the chunk is not the one the accused signed"
    try:
        header = runtime_pb2.Tensor.FromString(a.header)
    except DecodeError:
        return "the tensor header does not parse"
    dtype = readable_dtype(header)
    if dtype is None or len(a.chunk) % dtype.itemsize:
        return f"a chunk of a {header.dtype or '?'} part with codec {header.compression} cannot be read on its own"
    if bool(np.isfinite(np.frombuffer(a.chunk, dtype=dtype)).all()):
        return "the chunk holds only finite values"
    return None


def describe(accusation: Accusation) -> str:
    return f"round {accusation.group_id.hex()[:8]}, part {accusation.part_index}, reduced by {accusation.reducer}"


class AccusationBoard(PeriodicThread):
    """Publishes this trainer's accusations and judges everyone's, every `period_s` seconds.

    :param take_new: this trainer's new accusations (its averager's reducer made them); called once per tick
    :param ban: bans a peer in this trainer's averager, with a reason
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_prefix: str,
        take_new: Callable[[], list[Accusation]],
        ban: Callable[[str, str], None],
        period_s: float = 5.0,
    ):
        super().__init__("accusation-board", period_s, final_tick=True)
        self.dht, self.key, self.take_new, self.ban = dht, accusations_key(run_prefix), take_new, ban
        self.peer_id = dht.peer_id.to_base58()
        self.published: list[Accusation] = []
        self._judged: collections.OrderedDict[tuple[str, bytes, int], None] = collections.OrderedDict()
        self.banned: dict[str, str] = {}  # accused -> accuser, for the bans these accusations caused
        self.refused = 0  # accusations that proved nothing

    def tick(self) -> None:
        try:
            new = self.take_new()
        except Exception as e:  # the averager may be busy or gone; the next tick asks again
            logger.debug(f"Accusations unavailable: {e}")
            new = []
        if new:
            self.publish(new)
        self.judge_published()

    def publish(self, accusations: list[Accusation]) -> None:
        self.published = (self.published + accusations)[-KEPT_PER_ACCUSER:]
        for accusation in accusations:
            self._judged[accusation.key] = None  # our own: our reducer has banned the sender already
            logger.warning(f"Accusing trainer {accusation.accused} of a NaN/Inf part it signed ({describe(accusation)})")
        record = AccusationRecord(peer_id=self.peer_id, accusations=self.published)
        try:
            ACCUSATIONS.store(self.dht, self.key, record, get_dht_time() + RECORD_TTL_S)
        except Exception as e:
            logger.warning(f"Publishing {len(accusations)} accusation(s) failed, will retry with the next one: {e}")

    def judge_published(self) -> None:
        try:
            entries = ACCUSATIONS.fetch(self.dht, self.key, latest=True)
        except Exception as e:
            logger.debug(f"Reading accusations failed: {e}")
            return
        for entry in entries:
            accuser = entry.record.peer_id
            for accusation in entry.record.accusations:
                if accusation.key in self._judged:
                    continue
                self._judged[accusation.key] = None
                while len(self._judged) > JUDGED_KEPT:
                    self._judged.popitem(last=False)
                self.judge(accusation, accuser)

    def judge(self, accusation: Accusation, accuser: str) -> bool:
        """Ban the accused if the accusation proves its fault; True if it did."""
        if accusation.accused == self.peer_id:
            logger.warning(f"Trainer {accuser} accuses this trainer ({describe(accusation)}); checking it as anyone would")
        problem = verify_accusation(accusation)
        if problem is not None:
            self.refused += 1
            logger.warning(f"Ignoring an accusation of {accusation.accused} published by {accuser}: {problem}")
            return False
        if accusation.accused == self.peer_id:  # true, then: our own averager rejects our NaN parts already
            return False
        reason = f"proof published by {accuser}: it signed a part with NaN/Inf values ({describe(accusation)})"
        try:
            self.ban(accusation.accused, reason)
        except Exception as e:
            logger.warning(f"Banning {accusation.accused} on {accuser}'s proof failed: {e}")
            self._judged.pop(accusation.key, None)  # judge it again at the next tick
            return False
        self.banned[accusation.accused] = accuser
        logger.warning(f"Banned trainer {accusation.accused} on the {reason}")
        return True
