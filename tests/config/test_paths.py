"""Where package files are found (configs, profiles, tokenizer as package data) and the default data dir."""

import importlib.resources
from pathlib import Path

import pytest

from dragon_swarm import paths

REPO = Path(__file__).resolve().parents[2]


def test_shipped_files_are_package_data_found_through_importlib_resources():
    # the editable install maps the repository's configs/ and peers/ into the package (setup.py)
    assert Path(str(importlib.resources.files("dragon_swarm.configs"))).resolve() == REPO / "configs"
    assert Path(str(importlib.resources.files("dragon_swarm.profiles"))).resolve() == REPO / "peers"
    assert paths.config_dir().resolve() == REPO / "configs" and paths.profile_dir().resolve() == REPO / "peers"
    assert {"dragon-tiny", "hrm-smoe-125m"} <= set(paths.shipped_names(paths.config_dir()))
    assert (paths.tokenizer_dir() / "dragon-bpe-8k.json").is_file()


def test_name_or_path(tmp_path):
    assert paths.resolve_name_or_path("dragon-tiny", paths.config_dir(), "config").name == "dragon-tiny.yaml"
    mine = tmp_path / "mine.yml"
    mine.write_text("a: 1\n")
    assert paths.resolve_name_or_path(str(mine), paths.config_dir(), "config") == mine
    with pytest.raises(ValueError, match=r"no peer profile named 'tpu-pod' \(known: cpu-laptop"):
        paths.resolve_name_or_path("tpu-pod", paths.profile_dir(), "peer profile")
    with pytest.raises(ValueError, match="config file not found"):
        paths.resolve_name_or_path(str(tmp_path / "gone.yaml"), paths.config_dir(), "config")


def test_data_dir_env_then_checkout_then_per_user(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.DATA_DIR_ENV, str(tmp_path / "mine"))
    assert paths.default_data_dir() == tmp_path / "mine"
    monkeypatch.delenv(paths.DATA_DIR_ENV)
    assert paths.source_root() == REPO and paths.default_data_dir() == REPO / "data"
    monkeypatch.setattr(paths, "source_root", lambda: None)  # as in an installed wheel
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert paths.default_data_dir() == tmp_path / "xdg" / "dragon_swarm"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.default_data_dir() == tmp_path / "home" / ".local" / "share" / "dragon_swarm"
