"""Where dragon_swarm's files are: what ships with the package, and where the writable data goes.

Shipped, read-only (package data, found through importlib.resources, so a wheel installed anywhere has them):

* swarm configs: the repository's ``configs/``, packaged as ``dragon_swarm.configs``;
* peer profiles: the repository's ``peers/*.yaml``, packaged as ``dragon_swarm.profiles``;
* the tokenizer: ``dragon_swarm/data/assets/``.

``configs/`` and ``peers/`` stay top-level folders of the repository (they are what people read and edit); the
build maps them into the package (``setup.py``). A source checkout that was never installed still finds them
next to the package.

Writable: the data dir (corpora and token caches), see :func:`default_data_dir`.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

__all__ = [
    "DATA_DIR_ENV",
    "PACKAGE_DIR",
    "config_dir",
    "default_data_dir",
    "profile_dir",
    "resolve_name_or_path",
    "shipped_names",
    "source_root",
    "tokenizer_dir",
    "user_data_dir",
]

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR_ENV = "DRAGON_DATA_DIR"
# package name -> the folder it comes from in the repository (see setup.py)
_SHIPPED = {"dragon_swarm.configs": "configs", "dragon_swarm.profiles": "peers"}


def source_root() -> Path | None:
    """The repository root when dragon_swarm runs from a source checkout (editable install or PYTHONPATH), else
    None (an installed wheel)."""
    root = PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and (root / "configs").is_dir():
        return root
    return None


def _shipped_dir(package: str) -> Path:
    try:
        return Path(str(importlib.resources.files(package)))
    except ModuleNotFoundError:
        root = source_root()
        if root is None:
            raise
        return root / _SHIPPED[package]  # a checkout used without installing it


def config_dir() -> Path:
    """The shipped swarm configs (``configs/*.yaml`` of the repository)."""
    return _shipped_dir("dragon_swarm.configs")


def profile_dir() -> Path:
    """The shipped peer resource profiles (``peers/*.yaml`` of the repository)."""
    return _shipped_dir("dragon_swarm.profiles")


def tokenizer_dir() -> Path:
    """The shipped tokenizer files (``dragon_swarm/data/assets``)."""
    return Path(str(importlib.resources.files("dragon_swarm.data"))) / "assets"


def shipped_names(directory: Path) -> list[str]:
    """Names of the YAML files in `directory` (stems), sorted."""
    return sorted(p.stem for p in directory.glob("*.yaml"))


def resolve_name_or_path(name_or_path: str, directory: Path, what: str) -> Path:
    """A YAML file given by path, or by the name of one shipped in `directory` ('dragon-tiny' ->
    ``<directory>/dragon-tiny.yaml``). Anything ending in .yaml/.yml, or that exists, is a path.

    Raises ValueError, one line: 'no <what> named X (known: a, b) and no such file' or '<what> file not found: P'.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ValueError(f"{what} file not found: {path}")
        return path
    candidate = directory / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(shipped_names(directory))
        raise ValueError(f"no {what} named '{name_or_path}' (known: {known}) and no such file")
    return candidate


def user_data_dir() -> Path:
    """The per-user data dir: ``$XDG_DATA_HOME/dragon_swarm``, by default ``~/.local/share/dragon_swarm``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "dragon_swarm"


def default_data_dir() -> Path:
    """Where corpora and token caches live: ``$DRAGON_DATA_DIR`` if set, else the repository's ``data/`` when
    running from a source checkout (ignored by git), else :func:`user_data_dir`."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override).expanduser()
    root = source_root()
    return root / "data" if root is not None else user_data_dir()
