"""Token streams: encoding, the .npy cache, and the batches cut from them (real tokenizer, small corpora)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dragon_swarm.data import dataset
from dragon_swarm.data.corpus import Document, corpus_fingerprint
from dragon_swarm.data.dataset import TokenStream, build_token_stream, encode_documents, stream_fingerprint
from dragon_swarm.data.sharding import batch_offsets, num_sequential_batches
from dragon_swarm.data.tokenizer import EOT_ID, TOKENIZER_NAME, TOKENIZER_SHA256, load_tokenizer

VERSE = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"


def _docs(count: int = 3, repeat: int = 40) -> list[Document]:
    return [Document(f"doc{i}", f"[{i}] " + VERSE * repeat) for i in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture()
def stream(tokenizer, tmp_path: Path) -> TokenStream:
    return TokenStream.from_documents(_docs(), tokenizer, TOKENIZER_SHA256, tmp_path / "cache")


def test_encode_documents_separates_documents_with_eot(tokenizer) -> None:
    # Prepare
    docs = [Document("a", "to be"), Document("b", "or not <|endoftext|> to be")]

    # Execute
    tokens = encode_documents(docs, tokenizer)

    # Assert: exactly one EOT, between the documents; the literal marker in text stays plain text
    assert tokens.dtype == np.int32
    (eot_positions,) = np.nonzero(tokens == EOT_ID)
    assert len(eot_positions) == 1
    before, after = tokens[: eot_positions[0]], tokens[eot_positions[0] + 1 :]
    assert tokenizer.decode(before.tolist()) == "to be"
    assert tokenizer.decode(after.tolist(), skip_special_tokens=False) == "or not <|endoftext|> to be"


def test_batch_shapes_and_targets_are_inputs_shifted_by_one(stream: TokenStream) -> None:
    # Execute
    inputs, targets = stream.batch(swarm_seed=0, peer_id="QmPeer", step=5, batch_size=4, seq_len=32)

    # Assert
    assert inputs.shape == targets.shape == (4, 32)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    offsets = batch_offsets(0, "QmPeer", 5, stream.num_tokens, 32, 4)
    for row, start in enumerate(offsets):
        np.testing.assert_array_equal(inputs[row].numpy(), stream.tokens[start : start + 32])
        assert int(targets[row, -1]) == int(stream.tokens[start + 32])


def test_another_peer_recomputes_the_same_batch(stream: TokenStream, tokenizer, tmp_path: Path) -> None:
    # Prepare: a second peer encodes the same corpus on its own, without sharing the cache
    other = TokenStream.from_documents(_docs(), tokenizer, TOKENIZER_SHA256, tmp_path / "other-cache")

    # Execute
    mine = stream.batch(3, "QmA", 10, batch_size=8, seq_len=16)
    theirs = other.batch(3, "QmA", 10, batch_size=8, seq_len=16)
    next_step = stream.batch(3, "QmA", 11, batch_size=8, seq_len=16)

    # Assert
    assert other.fingerprint == stream.fingerprint
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
    assert not torch.equal(mine[0], next_step[0])


def test_cache_is_reused_without_encoding_again(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    cache = tmp_path / "cache"
    first = TokenStream.from_documents(_docs(), tokenizer, TOKENIZER_SHA256, cache)

    def refuse(*args, **kwargs):
        raise AssertionError("encoded again despite a cache hit")

    monkeypatch.setattr(dataset, "encode_documents", refuse)

    # Execute
    second = TokenStream.from_documents(_docs(), tokenizer, TOKENIZER_SHA256, cache)

    # Assert: one .npy named by the fingerprint, no temp files left, identical ids
    assert [p.name for p in cache.iterdir()] == [f"tokens-{first.fingerprint}.npy"]
    np.testing.assert_array_equal(first.tokens, second.tokens)


def test_changed_text_or_tokenizer_gets_a_new_cache_entry(tokenizer, tmp_path: Path) -> None:
    # Prepare
    cache = tmp_path / "cache"
    docs = _docs()
    edited = docs[:-1] + [Document(docs[-1].name, docs[-1].text + "!")]

    # Execute
    a = TokenStream.from_documents(docs, tokenizer, TOKENIZER_SHA256, cache)
    b = TokenStream.from_documents(edited, tokenizer, TOKENIZER_SHA256, cache)
    c = TokenStream.from_documents(docs, tokenizer, "0" * 64, cache)

    # Assert
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    assert a.fingerprint == stream_fingerprint(corpus_fingerprint(docs), TOKENIZER_SHA256)
    assert b.num_tokens == a.num_tokens + 1
    assert len(list(cache.glob("tokens-*.npy"))) == 3


def test_corrupt_cache_file_is_replaced(tokenizer, tmp_path: Path) -> None:
    # Prepare: a truncated file where the cache entry should be
    cache = tmp_path / "cache"
    good = TokenStream.from_documents(_docs(), tokenizer, TOKENIZER_SHA256, cache)
    path = cache / f"tokens-{good.fingerprint}.npy"
    path.write_bytes(path.read_bytes()[:100])

    # Execute
    again = TokenStream.from_documents(_docs(), tokenizer, TOKENIZER_SHA256, cache)

    # Assert
    np.testing.assert_array_equal(again.tokens, good.tokens)
    assert np.load(path, allow_pickle=False).shape == (good.num_tokens,)


def test_stream_is_read_only(stream: TokenStream) -> None:
    # Execute / Assert
    with pytest.raises(ValueError):
        stream.tokens[0] = 5


def test_validation_batches_walk_the_stream_in_order(stream: TokenStream) -> None:
    # Prepare
    seq_len, batch_size = 16, 4

    # Execute
    first_inputs, first_targets = stream.validation_batch(0, batch_size, seq_len)
    second_inputs, _ = stream.validation_batch(1, batch_size, seq_len)

    # Assert: consecutive, non-overlapping windows from the start of the stream
    flat = torch.cat([first_inputs.flatten(), second_inputs.flatten()]).numpy()
    np.testing.assert_array_equal(flat, stream.tokens[: 2 * batch_size * seq_len])
    assert torch.equal(first_inputs[:, 1:], first_targets[:, :-1])
    assert num_sequential_batches(stream.num_tokens, seq_len, batch_size) >= 2


def test_build_token_stream_splits_local_documents(tmp_path: Path) -> None:
    # Prepare: 10 files of equal size; 20% validation means 2 whole documents
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    for i in range(10):
        (corpus_dir / f"part{i}.txt").write_text(f"part {i}\n" + VERSE * 5)

    # Execute
    train, val = build_token_stream(
        f"file:{corpus_dir}", tmp_path / "data", tmp_path / "cache", TOKENIZER_NAME, val_fraction=0.2
    )
    train_again, val_again = build_token_stream(
        str(corpus_dir), tmp_path / "data", tmp_path / "cache", TOKENIZER_NAME, val_fraction=0.2
    )

    # Assert
    assert int((train.tokens == EOT_ID).sum()) == 7 and int((val.tokens == EOT_ID).sum()) == 1
    assert train.fingerprint != val.fingerprint
    assert (train_again.fingerprint, val_again.fingerprint) == (train.fingerprint, val.fingerprint)
    inputs, targets = val.validation_batch(0, batch_size=2, seq_len=8)
    assert inputs.shape == targets.shape == (2, 8)
