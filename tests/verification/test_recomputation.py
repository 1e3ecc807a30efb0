"""Verification by recomputation as pure functions: a sender's round (recorded through the trainer's own pieces:
RecordingDispatcher, HonestContribution, RoundLedger) is replayed by a checker holding only the model version, the
token stream and the record; honest rounds match, plausible lies do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dragon_swarm.data.dataset import TokenStream
from dragon_swarm.model.config import ModelConfig
from dragon_swarm.model.dispatch import LocalExperts
from dragon_swarm.model.hrm_smoe import HRMSMoE
from dragon_swarm.training.contribution import HonestContribution
from dragon_swarm.verification.commitment import RoundCommitment, RoundRecord
from dragon_swarm.verification.draw import assign_checks, round_seed
from dragon_swarm.verification.ledger import RoundLedger
from dragon_swarm.verification.recompute import DEFAULT_TOLERANCE, compare_sent, recompute_sent, verify_round
from dragon_swarm.verification.service import commitment_rounds, weights_distance
from dragon_swarm.verification.strikes import StrikeBook
from dragon_swarm.verification.transcript import ExpertCall, ExpertTranscript, RecordingDispatcher, ReplayDispatcher, TranscriptMismatch

SEED, SENDER, BATCH, CLIP, BETA = 1234, "12D3KooWSender", 4, 1.0, 0.9


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig(
        vocab_size=512, seq_len=16, d_model=32, n_heads=4, h_layers=1, l_layers=1, h_cycles=2, l_cycles=2,
        num_experts=4, top_k=2, expert_hidden=64, aux_loss_weight=0.01, dropout=0.0, one_step_grad=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stream() -> TokenStream:
    rng = np.random.default_rng(0)
    return TokenStream(rng.integers(0, 512, size=20_000).astype(np.int32), "synthetic")


def batch_of(stream: TokenStream, config: ModelConfig, peer: str = SENDER):
    return lambda step, size: stream.batch(SEED, peer, step, size, config.seq_len)


class Sender:
    """A trainer's round as the Trainer runs it: experts answer remotely (here: in-process, and the checker never
    sees them), the dispatcher records, the contribution clips and adds momentum, the ledger accumulates."""

    def __init__(self, config: ModelConfig):
        torch.manual_seed(0)
        self.experts = LocalExperts.from_config(config)  # stands for the remote experts: only the sender has them
        self.recorder = RecordingDispatcher(self.experts)
        torch.manual_seed(1)
        self.model = HRMSMoE(config, self.recorder)
        self.named = list(self.model.named_trunk_parameters())
        self.contribution = HonestContribution(CLIP, BETA)
        self.ledger = RoundLedger()
        self.trunk_at_start = {k: v.clone() for k, v in self.model.trunk_state_dict().items()}

    def round(self, steps, stream, config, epoch=0, batch_from_step=None) -> RoundRecord:
        self.ledger.begin_round(self.contribution.state_tensors())
        self.trunk_at_start = {k: v.clone() for k, v in self.model.trunk_state_dict().items()}
        for step in steps:
            self.recorder.begin()
            self.model.zero_grad(set_to_none=True)
            inputs, targets = stream.batch(SEED, SENDER, batch_from_step(step) if batch_from_step else step, BATCH, config.seq_len)
            loss, _, _ = self.model.compute_loss(inputs, targets)
            loss.backward()
            transcript = self.recorder.take().to_bytes()
            assert self.contribution.prepare(self.named, loss, BATCH, 2) == BATCH
            self.ledger.add(step, BATCH, self.named, transcript)
        return self.ledger.close(epoch)


def test_replayed_transcript_gives_the_sender_s_trunk_gradient(config, stream):
    sender = Sender(config)
    inputs, targets = stream.batch(SEED, SENDER, 3, BATCH, config.seq_len)
    sender.recorder.begin()
    loss, _, _ = sender.model.compute_loss(inputs, targets)
    loss.backward()
    transcript = ExpertTranscript.from_bytes(sender.recorder.take().to_bytes())
    assert transcript.calls and all(call.input_grads for call in transcript.calls)

    checker = HRMSMoE(config, ReplayDispatcher(transcript, config.num_moe_layers, config.num_experts))
    checker.load_trunk_state_dict(sender.model.trunk_state_dict())
    replay_loss, _, _ = checker.compute_loss(inputs, targets)
    replay_loss.backward()
    assert checker.dispatcher.finished()
    assert torch.allclose(replay_loss, loss, atol=1e-6)
    theirs = dict(checker.named_trunk_parameters())
    for name, p in sender.named:
        assert torch.allclose(theirs[name].grad, p.grad, rtol=1e-5, atol=1e-7), name


def test_an_honest_round_with_momentum_matches_its_recomputation(config, stream):
    sender = Sender(config)
    sender.round([0, 1], stream, config, epoch=0)  # the second round starts with worker momentum
    record = RoundRecord.from_bytes(sender.ledger.close(1).to_bytes())
    record = sender.round([2, 3, 4], stream, config, epoch=1)
    record = RoundRecord.from_bytes(record.to_bytes())
    assert record.momentum_start and record.opens(record.commitment()) is None
    verdict = verify_round(config, sender.trunk_at_start, record, batch_of(stream, config), CLIP, BETA)
    assert verdict.honest, verdict
    assert verdict.relative_error < 1e-5


def test_another_batch_s_gradient_is_caught(config, stream):
    """The lie no distance rule can see: an honest gradient of the model, of a batch the sender did not commit to."""
    sender = Sender(config)
    record = sender.round([5, 6], stream, config, batch_from_step=lambda step: step + 1000)
    verdict = verify_round(config, sender.trunk_at_start, record, batch_of(stream, config), CLIP, BETA)
    assert not verdict.honest
    assert verdict.relative_error > 30 * DEFAULT_TOLERANCE, verdict


def test_a_lie_is_caught_also_under_worker_momentum(config, stream):
    """Worker momentum carries 90% of the last round into this one, so a lie moves the sent vector less: still far
    beyond the tolerance. A momentum start other than the committed one is a lie too."""
    sender = Sender(config)
    sender.round([0, 1], stream, config)
    record = sender.round([2, 3], stream, config, epoch=1, batch_from_step=lambda step: step + 1000)
    verdict = verify_round(config, sender.trunk_at_start, record, batch_of(stream, config), CLIP, BETA)
    assert not verdict.honest and verdict.relative_error > 3 * DEFAULT_TOLERANCE, verdict

    honest = sender.round([4, 5], stream, config, epoch=2)
    zeros = {k: torch.zeros_like(v) for k, v in honest.momentum_start.items()}
    forged = RoundRecord(2, honest.steps, honest.batch_sizes, zeros, honest.transcripts, honest.sent)
    assert not verify_round(config, sender.trunk_at_start, forged, batch_of(stream, config), CLIP, BETA).honest


def test_a_transcript_of_another_routing_cannot_be_replayed(config, stream):
    sender = Sender(config)
    record = sender.round([7], stream, config)
    swapped = RoundRecord(0, record.steps, record.batch_sizes, record.momentum_start, [Sender(config).round([8], stream, config).transcripts[0]], record.sent)
    with pytest.raises(TranscriptMismatch):
        recompute_sent(config, sender.trunk_at_start, swapped, batch_of(stream, config), CLIP, BETA)
    verdict = verify_round(config, sender.trunk_at_start, swapped, batch_of(stream, config), CLIP, BETA)
    assert not verdict.honest and "cannot be replayed" in verdict.reason


def test_a_record_opens_only_its_own_commitment(config, stream):
    record = Sender(config).round([0, 1], stream, config, epoch=3)
    commitment = RoundCommitment.from_dict(record.commitment().to_dict())
    assert record.opens(commitment) is None
    record.sent[next(iter(record.sent))].view(-1)[0] += 1e-3
    assert "sent_digest" in record.opens(commitment)
    for bad in ({}, {"epoch": 1}, {**commitment.to_dict(), "steps": []}, {**commitment.to_dict(), "sent": "x"}, "junk"):
        with pytest.raises(ValueError):
            RoundCommitment.from_dict(bad)
    for junk in (b"", b"\x00" * 7, b"not safetensors at all", record.to_bytes()[:40]):
        with pytest.raises(ValueError):
            RoundRecord.from_bytes(junk)
        with pytest.raises(ValueError):
            ExpertTranscript.from_bytes(junk)


def test_compare_refuses_other_shapes_and_non_finite_values():
    recomputed = {"w": torch.ones(3)}
    assert compare_sent(recomputed, {"w": torch.ones(3) * (1 + 1e-4)}, 1e-2).honest
    assert not compare_sent(recomputed, {"w": torch.ones(4)}, 1e-2).honest
    assert not compare_sent(recomputed, {"v": torch.ones(3)}, 1e-2).honest
    assert not compare_sent(recomputed, {"w": torch.tensor([1.0, float("nan"), 1.0])}, 1e-2).honest


def test_the_draw_is_shared_never_self_and_moves_with_every_commitment():
    peers = [f"peer{i}" for i in range(6)]
    digests = {p: f"{i:064x}" for i, p in enumerate(peers)}
    seed = round_seed(7, digests)
    pairs = assign_checks(seed, list(reversed(peers)), 3)
    assert pairs == assign_checks(seed, peers, 3)  # the same on every peer, whatever order it saw them in
    assert len({sender for _, sender in pairs}) == 3 and all(checker != sender for checker, sender in pairs)
    assert assign_checks(seed, peers[:1], 3) == []
    changed = round_seed(7, {**digests, "peer0": f"{99:064x}"})
    assert changed != seed and round_seed(8, digests) != seed
    # over many rounds every peer is checked about equally often
    checked = {p: 0 for p in peers}
    for epoch in range(600):
        for _, sender in assign_checks(round_seed(epoch, digests), peers, 1):
            checked[sender] += 1
    assert min(checked.values()) > 60, checked


def test_a_record_carries_its_starting_weights_and_commits_to_them(config, stream):
    sender = Sender(config)
    sender.ledger.begin_round({}, sender.model.trunk_state_dict())
    inputs, targets = stream.batch(SEED, SENDER, 0, BATCH, config.seq_len)
    sender.recorder.begin()
    loss, _, _ = sender.model.compute_loss(inputs, targets)
    loss.backward()
    sender.contribution.prepare(sender.named, loss, BATCH, 2)
    sender.ledger.add(0, BATCH, sender.named, sender.recorder.take().to_bytes())
    record = RoundRecord.from_bytes(sender.ledger.close(0).to_bytes())
    assert weights_distance(record.trunk, sender.model.trunk_state_dict()) == 0.0
    commitment = record.commitment()
    record.trunk[next(iter(record.trunk))].view(-1)[0] += 0.01
    assert "trunk_digest" in record.opens(commitment)
    assert 0 < weights_distance(record.trunk, sender.model.trunk_state_dict()) < 1e-2
    assert weights_distance({"w": torch.ones(2)}, {"w": torch.ones(3)}) is None
    assert weights_distance({"w": torch.ones(2)}, {"v": torch.ones(2)}) is None


def test_expert_answers_off_the_float16_wire_are_kept_bit_exact_in_half_the_bytes():
    from hivemind.compression import deserialize_torch_tensor

    from dragon_swarm.moe.handler import FLOAT16, encode_tensor

    wire = []
    for scale in (1e-6, 1.0, 300.0):  # gradients of a mean loss are tiny, activations are not
        message, exponent = encode_tensor(torch.randn(40, 32) * scale, FLOAT16)
        wire.append(deserialize_torch_tensor(message).float() * 2.0**-exponent)
    exact = torch.randn(40, 32)  # not off the wire: stays float32
    transcript = ExpertTranscript([(0, torch.ones(4, dtype=torch.bool))], [ExpertCall(0, {0: wire[0], 1: wire[1], 2: exact}, {0: wire[2]})])
    back = ExpertTranscript.from_bytes(transcript.to_bytes())
    assert torch.equal(back.calls[0].outputs[0], wire[0]) and torch.equal(back.calls[0].outputs[1], wire[1])
    assert torch.equal(back.calls[0].outputs[2], exact) and torch.equal(back.calls[0].input_grads[0], wire[2])
    assert all(t.dtype == torch.float32 for t in (*back.calls[0].outputs.values(), *back.calls[0].input_grads.values()))
    full = ExpertTranscript([], [ExpertCall(0, {0: torch.randn(400, 32)})]).to_bytes()
    halved = ExpertTranscript([], [ExpertCall(0, {0: wire[1].repeat(10, 1)})]).to_bytes()
    assert len(halved) < 0.6 * len(full)


def test_strikes_ban_only_a_run_of_faults():
    book = StrikeBook(3)
    assert [book.strike("a"), book.strike("a")] == [1, 2]
    book.clear("a")  # it committed this time: an honest peer's one-off failure is forgotten
    assert [book.strike("a"), book.strike("a"), book.strike("a")] == [1, 2, 3]  # three in a row: ban
    assert book.strike("a") == 1 and book.strike("b") == 1  # counted afresh after the ban, per peer
    with pytest.raises(ValueError):
        StrikeBook(0)


def test_a_peer_is_looked_for_under_its_own_version_when_it_is_far_from_ours():
    # a CI run: two honest trainers five versions apart (one had downloaded state) averaged together and struck each
    # other out for "averaging without committing" although each had committed under its own version
    assert commitment_rounds(9, reported_epoch=14) == [8, 9, 10, 13, 14, 15]
    assert commitment_rounds(9, reported_epoch=10) == [8, 9, 10]  # one version apart: already searched
    assert commitment_rounds(9, reported_epoch=None) == [8, 9, 10]  # no progress record: ours only
    assert commitment_rounds(0, reported_epoch=1) == [0, 1]
