"""An expert's part of a local-expert outer round on the wire (`moe.round_delta`): the 8-bit blockwise codec, the two
answer forms, the same rebuilt bits on every holder, and refusal of anything malformed. Pure: real expert
backends, no network."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from dragon_swarm.config import load_config
from dragon_swarm.moe import expert_state, round_delta
from dragon_swarm.moe.backend import build_expert_backends
from dragon_swarm.moe.expert_state import ExpertStateError
from tests.swarm.paths import TEST_CONFIG

CONFIG = load_config(str(TEST_CONFIG))
UID = "dragon-test_ffn.1.2"


def backend():
    m = CONFIG.model
    return build_expert_backends([UID], m.d_model, m.expert_hidden, CONFIG.training, 1024, CONFIG.swarm.seed)[UID]


def trained_from(start: dict[str, torch.Tensor], steps: int, seed: int):
    b = backend()
    b.module.load_state_dict(start)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, CONFIG.model.d_model, generator=g)
        b.forward(x)
        b.backward(x, torch.randn(16, CONFIG.model.d_model, generator=g))
    return expert_state.capture(b)


START = expert_state.capture(backend()).module
EXPECTED = backend().module.state_dict()


def test_blockwise_codes_keep_each_value_within_half_a_step_of_its_block_and_zero_exact():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * torch.linspace(1e-4, 10.0, 1000)
    values[128:192] = 0.0  # block 2, all zeros (an expert row nobody trained)
    codes, scales = round_delta.quantize_blockwise(values)
    assert codes.dtype == torch.int8 and codes.shape == (16, 64) and scales.shape == (16,)
    back = round_delta.dequantize_blockwise(codes, scales, values.shape)
    step = (scales / round_delta.LEVELS).repeat_interleave(64)[:1000]
    assert bool(((back - values).abs() <= step / 2 + 1e-7).all())
    assert bool((back[128:192] == 0).all()) and float(scales[2]) == 0.0
    with pytest.raises(ValueError):
        round_delta.quantize_blockwise(torch.tensor([1.0, float("nan")]))


def test_a_holder_with_the_same_start_gets_the_delta_alone_and_rebuilds_the_sender_s_bits():
    snap = round_delta.snapshot(trained_from(START, 3, seed=1), START)
    wire = round_delta.to_bytes(snap, snap.digest)
    weights = sum(t.numel() for t in START.values())
    assert len(wire) < 1.1 * weights + 2048  # about a byte per weight, half of float16
    got = round_delta.from_bytes(wire, "peer X", EXPECTED, START, round_delta.start_digest(START))
    expert_state.validate(got, backend(), UID)
    mine = snap.weights()
    for name in START:
        assert torch.equal(got.module[name], mine[name])  # what the sender merges for itself, bit for bit
    true = trained_from(START, 3, seed=1).module
    for name in START:  # the rebuilt weights are the trained ones up to the 8-bit steps of the round's change
        assert (got.module[name] - true[name]).abs().max() <= (START[name] - true[name]).abs().max() / 127 + 1e-7


def test_a_holder_that_started_elsewhere_gets_the_start_too_and_rebuilds_the_same_bits():
    snap = round_delta.snapshot(trained_from(START, 3, seed=1), START)
    elsewhere = trained_from(START, 2, seed=7).module  # e.g. a replica downloaded mid-round
    other_digest = round_delta.start_digest(elsewhere)
    assert other_digest != snap.digest
    wire = round_delta.to_bytes(snap, other_digest)
    assert len(wire) > 4 * sum(t.numel() for t in START.values())
    got = round_delta.from_bytes(wire, "peer X", EXPECTED, elsewhere, other_digest)
    for name, value in snap.weights().items():
        assert torch.equal(got.module[name], value)


def test_malformed_answers_are_refused_with_a_reason():
    snap = round_delta.snapshot(trained_from(START, 3, seed=1), START)
    digest = snap.digest
    other = trained_from(START, 1, seed=9).module

    def refused(data: bytes, match: str, own=START, own_digest=digest) -> None:
        with pytest.raises(ExpertStateError, match=match):
            round_delta.from_bytes(data, "peer X", EXPECTED, own, own_digest)

    refused(b"not safetensors", "unreadable")
    # a delta against a start this holder does not hold
    refused(round_delta.to_bytes(snap, digest), "round start", own=other, own_digest=round_delta.start_digest(other))
    full = round_delta.to_bytes(snap, "someone else")
    tensors = dict(safetensors_load(full))
    meta = {"uid": UID, "version": "3", "tokens_processed": "48", "digest": digest, "form": round_delta.FORM_FULL}
    name = sorted(START)[0]

    def variant(**changes) -> bytes:
        return safetensors_save({**tensors, **changes}, metadata=meta)

    refused(variant(**{f"scales.{name}": torch.full_like(tensors[f"scales.{name}"], float("inf"))}), "scales")
    refused(variant(**{f"scales.{name}": -tensors[f"scales.{name}"] - 1.0}), "scales")
    refused(variant(**{f"codes.{name}": tensors[f"codes.{name}"].to(torch.int16)}), "codes")
    refused(variant(**{f"start.{name}": tensors[f"start.{name}"][:1]}), "round start")
    refused(variant(**{f"start.{name}": torch.full_like(tensors[f"start.{name}"], float("nan"))}), "non-finite")
    refused(variant(extra=torch.zeros(1)), "not this expert")
    refused(safetensors_save(tensors, metadata={**meta, "form": "weights"}), "not a round snapshot")
    refused(safetensors_save(tensors, metadata={**meta, "version": "three"}), "integers")


def test_holders_that_exchange_their_snapshots_merge_the_same_bits_and_start_the_next_round_alike():
    peers = ["peer-c", "peer-a", "peer-b"]
    snaps = {peer: round_delta.snapshot(trained_from(START, 3, seed=i), START) for i, peer in enumerate(peers)}
    digest = round_delta.start_digest(START)
    merges = []
    for me in peers:  # what each holder merges: its own rebuilt weights and the others' answers, in peer-id order
        entries = {me: snaps[me].state()}
        for other in peers:
            if other != me:
                entries[other] = round_delta.from_bytes(round_delta.to_bytes(snaps[other], digest), other, EXPECTED, START, digest)
        merges.append(expert_state.merge_weights([entries[p] for p in sorted(entries)]).state.module)
    for other in merges[1:]:
        for name in START:
            assert torch.equal(merges[0][name], other[name])
    # the merge's result is every holder's next round start: the same digest, so the next round sends deltas alone
    assert len({round_delta.start_digest(m) for m in merges}) == 1
