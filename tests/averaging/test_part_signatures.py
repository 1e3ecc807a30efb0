"""Part seals and accusations as pure functions: who signed a part, and when a published part proves a fault."""

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.p2p.p2p_daemon import P2P
from hivemind.proto import runtime_pb2

from dragon_swarm.averaging.accusations import Accusation, make_accusation, verify_accusation
from dragon_swarm.averaging.part_signatures import CHUNK_BYTES, PartSigner, check_seal, tensor_statement

GROUP = bytes(range(16))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two identity files as p2pd writes them, and their signers."""
    signers = []
    for name in ("alice", "mallory"):
        path = tmp_path_factory.mktemp("ids") / f"{name}.key"
        P2P.generate_identity(str(path))
        signer = PartSigner.from_identity_file(path)
        assert signer.peer_id == PeerID.from_identity(path.read_bytes()).to_base58()  # the id p2pd will announce
        signers.append(signer)
    return signers


def _part(values: torch.Tensor, compression=runtime_pb2.CompressionType.FLOAT16) -> runtime_pb2.Tensor:
    return serialize_torch_tensor(values, compression)


def _accusation(signer: PartSigner, tensor: runtime_pb2.Tensor, accused: str | None = None) -> Accusation | None:
    """What a reducer would publish about `tensor`, sealed by `signer` in the name of `accused`."""
    accused = accused or signer.peer_id
    seal = signer.seal(tensor_statement(GROUP, accused, "QmReducer", 3, 1.0, tensor))
    return make_accusation(accused, "QmReducer", GROUP, 3, 1.0, tensor, seal)


def test_a_seal_binds_a_part_to_its_sender_round_reducer_index_and_weight(keys):
    alice, mallory = keys
    part = _part(torch.randn(5000))  # two chunks in fp16
    statement = tensor_statement(GROUP, alice.peer_id, "QmReducer", 0, 2.0, part)
    seal = alice.seal(statement)
    assert check_seal(seal, statement, alice.peer_id) is None
    changed = runtime_pb2.Tensor()
    changed.CopyFrom(part)
    changed.buffer = part.buffer[:-1] + bytes([part.buffer[-1] ^ 1])
    reshaped = runtime_pb2.Tensor()
    reshaped.CopyFrom(part)
    reshaped.size[:] = [50, 100]
    for other in (
        tensor_statement(GROUP, alice.peer_id, "QmReducer", 0, 2.0, changed),
        tensor_statement(GROUP, alice.peer_id, "QmReducer", 0, 2.0, reshaped),
        tensor_statement(GROUP[::-1], alice.peer_id, "QmReducer", 0, 2.0, part),
        tensor_statement(GROUP, alice.peer_id, "QmOther", 0, 2.0, part),
        tensor_statement(GROUP, alice.peer_id, "QmReducer", 1, 2.0, part),
        tensor_statement(GROUP, alice.peer_id, "QmReducer", 0, 3.0, part),
    ):
        assert check_seal(seal, other, alice.peer_id) == "the signature does not match the part"
    # mallory cannot sign in alice's name: its key hashes to its own peer id
    assert "another peer" in check_seal(mallory.seal(statement), statement, alice.peer_id)


@pytest.mark.parametrize("seal", [b"", b"DSP1", b"junk" * 40, b"DSP1\xff\xff" + b"x" * 64, b"DSP1\x00\x10" + b"x" * 64])
def test_a_malformed_seal_is_a_reason_never_an_exception(keys, seal):
    statement = tensor_statement(GROUP, keys[0].peer_id, "QmReducer", 0, 1.0, _part(torch.ones(2)))
    assert check_seal(seal, statement, keys[0].peer_id) is not None


def test_a_signer_survives_pickling(keys):
    import pickle

    copy = pickle.loads(pickle.dumps(keys[0]))
    statement = tensor_statement(GROUP, copy.peer_id, "QmReducer", 0, 1.0, _part(torch.ones(2)))
    assert check_seal(copy.seal(statement), statement, keys[0].peer_id) is None


def test_a_signed_nan_value_is_proof_in_one_chunk_and_nothing_else_is(keys):
    alice, mallory = keys
    values = torch.randn(20000)
    values[15000] = float("nan")  # in the fourth 8 KiB chunk of an fp16 buffer
    nan_part = _part(values)
    accusation = _accusation(alice, nan_part)
    assert accusation is not None and accusation.chunk_index == 3 and len(accusation.chunk) == CHUNK_BYTES
    assert verify_accusation(accusation) is None
    assert len(accusation.model_dump()["chunk"]) + len(accusation.digests) < 16 * 1024  # fits a DHT value
    inf_part = _part(torch.tensor([1.0, float("inf")]), runtime_pb2.CompressionType.NONE)  # fp16 would clamp Inf
    assert verify_accusation(_accusation(alice, inf_part)) is None
    # an honest part makes no accusation; a chunk without the NaN proves nothing, however it is signed
    assert _accusation(alice, _part(torch.ones(3))) is None
    assert verify_accusation(accusation.model_copy(update={"chunk_index": 0, "chunk": nan_part.buffer[:CHUNK_BYTES]})) == "the chunk holds only finite values"
    # forgeries: mallory seals a NaN part in alice's name; a NaN chunk slipped under alice's honest seal
    assert "seal" in verify_accusation(_accusation(mallory, nan_part, accused=alice.peer_id))
    honest = _part(torch.ones(20000))
    honest_seal = alice.seal(tensor_statement(GROUP, alice.peer_id, "QmReducer", 3, 1.0, honest))
    slipped = accusation.model_copy(update={"seal": honest_seal})
    assert "seal" in verify_accusation(slipped)
    forged_chunk = accusation.model_copy(update={"chunk": accusation.chunk[:-2] + b"\x00\x7e"})
    assert verify_accusation(forged_chunk) == "the chunk is not the one the accused signed"
    assert "seal" in verify_accusation(accusation.model_copy(update={"part_index": 4}))
    assert verify_accusation(accusation.model_copy(update={"chunk_index": 99})) == "the chunk digests do not cover the chunk"
    # quantized codecs: a chunk of codes says nothing on its own, so there is no accusation
    assert _accusation(alice, _part(values, runtime_pb2.CompressionType.UNIFORM_8BIT)) is None


def test_accusation_records_are_strict(keys):
    values = torch.tensor([float("nan")] * 4)
    good = _accusation(keys[0], _part(values))
    with pytest.raises(ValueError):
        Accusation(**{**good.model_dump(), "part_index": -1})
    with pytest.raises(ValueError):
        Accusation(**{**good.model_dump(), "chunk": "not bytes"})
    with pytest.raises(ValueError):
        Accusation(**{**good.model_dump(), "chunk": b"x" * (CHUNK_BYTES + 1)})
    with pytest.raises(ValueError):
        Accusation(**{**good.model_dump(), "extra": 1})
