"""The python-docs corpus (hrm-smoe-125m's): read from a Debian package without extracting it, pinned by sha256.
A small package with the real layout is built here with dpkg-deb, so no network is needed."""

import shutil
import subprocess
from pathlib import Path

import pytest

from dragon_swarm.data import corpus
from dragon_swarm.data.corpus import CorpusError, fetch_python_docs, read_python_docs

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")


def build_deb(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: python3.11-doc\nVersion: 0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: test\n"
    )
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    out = tmp_path / "docs.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(out)], check=True, capture_output=True)
    return out


def test_pages_are_read_by_path_sorted_and_other_files_ignored(tmp_path):
    sources = "usr/share/doc/python3.11/html/_sources"
    deb = build_deb(tmp_path, {
        f"{sources}/library/os.rst.txt": "os --- Miscellaneous operating system interfaces",
        f"{sources}/tutorial/index.rst.txt": "The Python Tutorial",
        "usr/share/doc/python3.11/html/library/os.html": "<html>not text</html>",
    })  # fmt: skip
    docs = read_python_docs(deb)
    assert [d.name for d in docs] == ["library/os", "tutorial/index"]
    assert docs[1].text == "The Python Tutorial"


def test_a_package_without_pages_or_not_a_package_is_refused(tmp_path):
    with pytest.raises(CorpusError, match="no ./usr/share/doc/python3.11"):
        read_python_docs(build_deb(tmp_path, {"usr/share/doc/other.txt": "x"}))
    junk = tmp_path / "junk.deb"
    junk.write_bytes(b"not a deb")
    with pytest.raises(CorpusError, match="cannot unpack"):
        read_python_docs(junk)


def test_a_package_with_other_bytes_than_the_pin_is_refused(tmp_path):
    (tmp_path / corpus.PYTHON_DOCS_DEB).write_bytes(b"tampered")
    with pytest.raises(CorpusError, match="sha256 mismatch"):
        fetch_python_docs(tmp_path)
