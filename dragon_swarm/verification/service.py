"""The network side of verification by recomputation, run by every remote-expert trainer.

Per round (model version e), in order:
1. the sender stores its `RoundCommitment` in the DHT (owner-signed subkey, key `<run>_verify_<e>`) before its parts
   go out, and keeps the `RoundRecord` that opens it, served on request (`rpc_round_record`);
2. after the round, every trainer draws who checks whom from the round's commitments (`draw`): the same draw on
   every peer, unknown until the commitments are in;
3. a drawn checker downloads the sender's record, checks it opens the signed commitment, and recomputes it from the
   weights the sender committed to, provided they are within `verification.trunk_tolerance` of the checker's own
   copy of version e (trainers of one version agree only to float precision; a trainer whose round failed stepped
   alone and holds another model: not checked, rather than accused);
4. a mismatch is published as evidence (owner-signed, key `<run>_verify_evidence`) and the checker keeps the record
   and serves it too, so the liar cannot hide it by going silent;
5. every trainer that sees evidence and still holds version e downloads the record (from the accuser or the accused),
   checks it against the accused's signed commitment and recomputes: confirmed, it bans the liar (the averager's ban,
   `verification.ban_seconds`); refuted, it bans the false accuser. Nobody has to trust the accuser's word.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import AsyncIterator, Callable

import hivemind
import torch
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ConfigDict, Field

from dragon_swarm.config import SwarmConfig
from dragon_swarm.rate_limit import RateLimiter
from dragon_swarm.swarm.signed_records import SignedRecordStore
from dragon_swarm.verification.commitment import RoundCommitment, RoundRecord
from dragon_swarm.verification.draw import assign_checks, round_seed
from dragon_swarm.verification.recompute import BatchOf, Verdict, relative_l2, verify_round
from dragon_swarm.verification.strikes import StrikeBook

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
RECORD_TTL_S = 600.0
FETCH_TIMEOUT_S = 30.0
MAX_RECORD_BYTES = 1 << 30
KEEP_RECORDS = 8  # own rounds (and evidence) served this long, in rounds
# at shutdown the check under way may finish this long: a ban it ends in is then among the bans the trainer saves
SHUTDOWN_DRAIN_S = 10.0


class CommitmentRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    peer_id: str
    epoch: int = Field(ge=0)
    commitment: dict


class EvidenceRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    peer_id: str  # the accuser
    accused: str
    epoch: int = Field(ge=0)
    reason: str = Field(max_length=300)


COMMITMENTS = SignedRecordStore(CommitmentRecord, "round commitment", max_ttl_s=RECORD_TTL_S + 60)
EVIDENCE = SignedRecordStore(EvidenceRecord, "verification evidence", max_ttl_s=RECORD_TTL_S + 60)


class RoundRecordServicer(ServicerBase):
    """Serves the round records this trainer keeps: its own, and those it holds as evidence."""

    def __init__(self, records: "OrderedDict[tuple[str, int], bytes]"):
        self.records = records
        self.limiter = RateLimiter(rate=2.0, burst=8)

    async def rpc_round_record(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        if not self.limiter.take(context.remote_id.to_base58(), time.monotonic()):
            yield runtime_pb2.ExpertResponse(metadata=b"error: too many record requests")
            return
        peer, _, epoch = request.uid.partition("@")
        data = self.records.get((peer, int(epoch))) if epoch.isdigit() else None
        if data is None:
            yield runtime_pb2.ExpertResponse(metadata=b"error: no such round record here")
            return
        for start in range(0, len(data), CHUNK_BYTES):
            yield runtime_pb2.ExpertResponse(metadata=data[start : start + CHUNK_BYTES])


def weights_distance(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> float | None:
    """Relative L2 distance of two trunks; None when they are not of one model (other names or shapes)."""
    if set(theirs) != set(ours) or any(theirs[k].shape != v.shape for k, v in ours.items()):
        return None
    distance = relative_l2(theirs, ours)
    return distance if distance == distance else None


def commitment_rounds(epoch: int, reported_epoch: int | None) -> list[int]:
    """The round numbers under which a peer that averaged with us in round `epoch` may have committed: ours and one
    version either side (one all-reduce can join trainers a version apart), and, when the peer's own progress record
    puts it more than one version away (it downloaded state and jumped, or we did), its version and one either side.
    It must still have committed under one of them; a peer naming a version where it has no commitment is struck as
    before. Pure."""
    rounds = [e for e in (epoch - 1, epoch, epoch + 1) if e >= 0]
    if reported_epoch is not None and abs(reported_epoch - epoch) > 1:
        rounds += [e for e in (reported_epoch - 1, reported_epoch, reported_epoch + 1) if e >= 0 and e not in rounds]
    return rounds


class VerificationService:
    """One per trainer: `remember_trunk` at each round's start, `commit` before its all-reduce, `after_round` when
    the version moved on. Checks run on one background thread, never on the training thread."""

    def __init__(
        self, config: SwarmConfig, dht: hivemind.DHT, batch_of_peer: Callable[[str], BatchOf],
        ban: Callable[[str, str], None], report_check: Callable[[Verdict], Verdict] | None = None,
        reported_epoch: Callable[[str], int | None] | None = None,
    ):  # fmt: skip
        """report_check: what this trainer says of a round it was drawn to check (the trainer's contribution
        decides; an honest one passes the verdict on). reported_epoch: a peer's version in its latest progress record
        (None: unknown), for `commitment_rounds`."""
        self.config, self.dht, self.batch_of_peer, self.ban = config, dht, batch_of_peer, ban
        self.reported_epoch = reported_epoch or (lambda peer: None)
        self.report_check = report_check or (lambda verdict: verdict)
        self.settings = config.verification
        self.peer_id = dht.peer_id.to_base58()
        self.prefix = f"{config.run_prefix}_verify"
        self.records: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.trunks: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()  # epoch -> this peer's trunk
        self._trunk_lock = threading.Lock()
        self.servicer = RoundRecordServicer(self.records)
        self._p2p = RemoteExpertWorker.run_coroutine(dht.replicate_p2p())
        RemoteExpertWorker.run_coroutine(self.servicer.add_p2p_handlers(self._p2p, namespace=self.prefix))
        self._checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        self._pending: list[Future] = []
        self.judged: set[tuple[str, str, int]] = set()  # (accuser, accused, round) evidence already judged
        self.verdicts: dict[tuple[str, int], Verdict] = {}  # (sender, round) -> what recomputing it showed
        self.strikes = StrikeBook(self.settings.max_strikes)
        self.stats = {"checks": 0, "caught": 0, "skipped": 0, "confirmed": 0, "refuted": 0, "struck_out": 0, "check_seconds": 0.0}

    # --- sender side ---

    def remember_trunk(self, epoch: int, trunk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep this peer's copy of version `epoch` (to check others' rounds against); returns the copy."""
        copy = {k: v.detach().cpu().clone() for k, v in trunk.items()}
        with self._trunk_lock:
            self.trunks[epoch] = copy
            while len(self.trunks) > self.settings.keep_versions:
                self.trunks.popitem(last=False)
        return copy

    def commit(self, record: RoundRecord) -> None:
        """Publish the commitment and keep the record. A DHT failure costs this round's verifiability only."""
        self._keep(self.peer_id, record.epoch, record.to_bytes())
        value = CommitmentRecord(peer_id=self.peer_id, epoch=record.epoch, commitment=record.commitment().to_dict())
        try:
            COMMITMENTS.store(self.dht, f"{self.prefix}_{record.epoch}", value, get_dht_time() + RECORD_TTL_S)
        except Exception as e:
            logger.warning(f"Could not publish the commitment of round {record.epoch}: {type(e).__name__}: {e}")

    def _keep(self, peer: str, epoch: int, data: bytes) -> None:
        self.records[(peer, epoch)] = data
        while len(self.records) > KEEP_RECORDS:
            self.records.popitem(last=False)

    # --- checker side ---

    def after_round(self, epoch: int, senders: list[str] | None = None) -> None:
        """Round `epoch` is over: check whom the draw gave this peer, and judge any new evidence (in the background).
        senders: the peers whose values this peer's all-reduce used (None: unknown, e.g. the round failed)."""
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._checks.submit(self._run_safely, epoch, senders))

    def _run_safely(self, epoch: int, senders: list[str] | None) -> None:
        try:
            self._check_round(epoch, senders)
            self._judge_evidence()
        except Exception as e:  # a check must never take the trainer down
            logger.warning(f"Verification of round {epoch} failed: {type(e).__name__}: {e}")

    def _commitments(self, epoch: int) -> dict[str, CommitmentRecord]:
        entries = COMMITMENTS.fetch(self.dht, f"{self.prefix}_{epoch}", latest=True)
        found: dict[str, CommitmentRecord] = {}
        for entry in entries:  # hivemind does not bind a peer id to its key: a peer named twice is not checked
            found[entry.record.peer_id] = entry.record if entry.record.peer_id not in found else None
        return {peer: record for peer, record in found.items() if record is not None}

    def _check_round(self, epoch: int, senders: list[str] | None) -> None:
        commitments = self._commitments(epoch)
        others = [peer for peer in senders or () if peer != self.peer_id]
        found: dict[int, set[str]] = {epoch: set(commitments)}
        for peer in others:
            # each peer commits under its own version, which need not be ours (see `commitment_rounds`)
            committed = False
            for round_number in commitment_rounds(epoch, self.reported_epoch(peer)):
                if round_number not in found:
                    found[round_number] = set(self._commitments(round_number))
                if peer in found[round_number]:
                    committed = True
                    break
            if committed:
                self.strikes.clear(peer)
            else:  # an honest trainer commits before its parts go out: this one's round cannot be checked
                self._strike(peer, f"averaged in round {epoch} without committing to it")
        digests = {peer: hashlib.sha256(json.dumps(r.commitment, sort_keys=True).encode()).hexdigest() for peer, r in commitments.items()}
        for checker, sender in assign_checks(round_seed(epoch, digests), list(commitments), self.settings.checks_per_round):
            if checker == self.peer_id:
                self._check(sender, epoch, commitments[sender], accuse=True)

    def _check(self, sender: str, epoch: int, signed: CommitmentRecord, accuse: bool, source: str | None = None) -> Verdict | None:
        """Recompute `sender`'s round `epoch`; None when this peer cannot (never held that version, no record, or
        the sender's weights are farther from this peer's than `verification.trunk_tolerance`)."""
        with self._trunk_lock:
            own = self.trunks.get(epoch)
        if own is None:
            self.stats["skipped"] += 1
            return None
        try:
            commitment = RoundCommitment.from_dict(signed.commitment)
        except ValueError as e:
            return self._verdict(sender, epoch, Verdict(False, float("inf"), str(e)), accuse, None)
        started = time.perf_counter()
        try:
            data = self.fetch_record(source or sender, sender, epoch)
            record = RoundRecord.from_bytes(data)
        except Exception as e:
            self.stats["skipped"] += 1
            logger.warning(f"Round {epoch} of trainer {sender[-8:]} not checked: no record ({type(e).__name__}: {str(e)[:120]})")
            if accuse:  # drawn, it must show its record: withholding it is how a liar would dodge the check
                self._strike(sender, f"did not serve its committed round {epoch} record")
            return None
        problem = record.opens(commitment)
        if problem is not None:
            return self._verdict(sender, epoch, Verdict(False, float("inf"), f"its record does not open its signed commitment: {problem}"), accuse, data)
        drift = weights_distance(record.trunk, own)
        if drift is None:
            return self._verdict(sender, epoch, Verdict(False, float("inf"), "its round started from weights of another model"), accuse, data)
        if drift > self.settings.trunk_tolerance:
            # a trainer whose round failed stepped alone: its weights are not the swarm's version (and neither may ours be)
            self.stats["skipped"] += 1
            logger.info(f"Round {epoch} of trainer {sender[-8:]} not checked: its weights are {drift:.2e} (relative L2) from this peer's")
            return None
        t = self.config.training
        verdict = verify_round(
            self.config.model, record.trunk, record, self.batch_of_peer(sender), t.clip_grad_norm, t.worker_momentum,
            self.settings.tolerance,
        )  # fmt: skip
        if accuse:
            verdict = self.report_check(verdict)
        seconds = time.perf_counter() - started
        self.stats["checks"] += 1
        self.stats["check_seconds"] += seconds
        logger.info(
            f"Verified round {epoch} of trainer {sender[-8:]} by recomputation ({len(record.steps)} micro-batch(es), "
            f"{len(data) / 1e6:.1f} MB record, {seconds:.2f} s, weights {drift:.1e} from ours): {'honest' if verdict.honest else 'LIE'}, error {verdict.relative_error:.2e}"
        )
        return self._verdict(sender, epoch, verdict, accuse, data)

    def _strike(self, peer: str, why: str) -> None:
        """A fault only this peer saw (`strikes`): `verification.max_strikes` in a row ban the peer here, locally."""
        count = self.strikes.strike(peer)
        if count < self.settings.max_strikes:
            logger.info(f"Trainer {peer[-8:]} {why} (strike {count} of {self.settings.max_strikes})")
            return
        self.stats["struck_out"] += 1
        logger.warning(f"Trainer {peer[-8:]} {why}, {count} times in a row: banning it")
        self.ban(peer, f"verification: {why} ({count} times in a row)"[:200])

    def _verdict(self, sender: str, epoch: int, verdict: Verdict, accuse: bool, data: bytes | None) -> Verdict:
        self.verdicts[(sender, epoch)] = verdict  # several accusers of one round: recomputed once
        while len(self.verdicts) > KEEP_RECORDS * 4:
            self.verdicts.pop(next(iter(self.verdicts)))
        if verdict.honest:
            self.strikes.clear(sender)
        if verdict.honest or not accuse:
            return verdict
        self.stats["caught"] += 1
        if data is not None:
            self._keep(sender, epoch, data)
        logger.warning(f"Trainer {sender[-8:]} lied in round {epoch}: {verdict.reason}; publishing the evidence and banning it")
        self.ban(sender, f"verification: {verdict.reason}"[:200])
        evidence = EvidenceRecord(peer_id=self.peer_id, accused=sender, epoch=epoch, reason=verdict.reason[:300])
        try:
            EVIDENCE.store(self.dht, f"{self.prefix}_evidence", evidence, get_dht_time() + RECORD_TTL_S)
        except Exception as e:
            logger.warning(f"Could not publish evidence against {sender[-8:]}: {type(e).__name__}: {e}")
        return verdict

    def _judge_evidence(self) -> None:
        for entry in EVIDENCE.fetch(self.dht, f"{self.prefix}_evidence", latest=True):
            evidence = entry.record
            key = (evidence.peer_id, evidence.accused, evidence.epoch)
            if key in self.judged or evidence.peer_id == self.peer_id:
                continue  # the accused judges too: it recomputes its own round, and bans a false accuser
            round_key = (evidence.accused, evidence.epoch)
            verdict = self.verdicts.get(round_key)
            if verdict is None:
                signed = self._commitments(evidence.epoch).get(evidence.accused)
                if signed is None or evidence.epoch not in self.trunks:
                    continue  # cannot judge (yet): the commitment is gone or this peer never held that version
                verdict = self._check(evidence.accused, evidence.epoch, signed, accuse=False, source=evidence.peer_id)
            self.judged.add(key)
            if verdict is None:
                continue
            if verdict.honest:
                self.stats["refuted"] += 1
                logger.warning(f"Evidence from {evidence.peer_id[-8:]} against {evidence.accused[-8:]} is false; banning the accuser")
                self.ban(evidence.peer_id, "verification: false accusation")
            elif evidence.accused != self.peer_id:  # a liar that recomputes its own round learns nothing new
                self.stats["confirmed"] += 1
                logger.warning(f"Confirmed evidence against trainer {evidence.accused[-8:]} (round {evidence.epoch}): {verdict.reason}; banning it")
                self.ban(evidence.accused, f"verification: {verdict.reason}"[:200])

    def fetch_record(self, source: str, sender: str, epoch: int) -> bytes:
        """The record of `sender`'s round `epoch`, as `source` (the sender, or a peer holding it as evidence) serves it."""

        async def download() -> bytes:
            stub = RoundRecordServicer.get_stub(self._p2p, PeerID.from_base58(source), namespace=self.prefix)
            chunks, size = [], 0
            async for response in await stub.rpc_round_record(runtime_pb2.ExpertUID(uid=f"{sender}@{epoch}")):
                if response.metadata.startswith(b"error: "):
                    raise ValueError(response.metadata[7:200].decode(errors="replace"))
                size += len(response.metadata)
                if size > MAX_RECORD_BYTES:
                    raise ValueError(f"record over {MAX_RECORD_BYTES:,} bytes")
                chunks.append(response.metadata)
            return b"".join(chunks)

        return RemoteExpertWorker.run_coroutine(asyncio.wait_for(download(), timeout=FETCH_TIMEOUT_S))

    def log_summary(self, train_seconds: float) -> None:
        """One line for people (and `benchmarks.verification_swarm`): what checking others cost next to training."""
        st = self.stats
        share = 100.0 * st["check_seconds"] / max(train_seconds, 1e-9)
        logger.info(
            f"Verification summary: {st['checks']} round(s) recomputed in {st['check_seconds']:.2f} s "
            f"= {share:.1f}% of {train_seconds:.1f} s training; {st['caught']} lie(s) caught, {st['skipped']} skipped, "
            f"evidence confirmed {st['confirmed']}, refuted {st['refuted']}; {st['struck_out']} banned for rounds they would not show"
        )

    def shutdown(self, drain_s: float = SHUTDOWN_DRAIN_S) -> None:
        """Cancel the checks not yet started and give the one under way up to `drain_s` to finish."""
        self._checks.shutdown(wait=False, cancel_futures=True)
        running = [f for f in self._pending if not f.done()]
        if running and wait(running, timeout=drain_s).not_done:
            logger.info(f"Stopping with a verification check unfinished after {drain_s:.0f} s")
        try:
            RemoteExpertWorker.run_coroutine(self.servicer.remove_p2p_handlers(self._p2p, namespace=self.prefix))
        except Exception as e:  # the daemon may already be gone
            logger.debug(f"Removing the round record handler failed: {e}")
