"""Peer resource profiles: the shipped ones, profiles from a path, one-line errors naming the file."""

from pathlib import Path

import pytest

from dragon_swarm.resources import available_profiles, load_profile, parse_memory_limit

GiB = 2**30


# --- profiles ---


def test_shipped_profiles_load():
    names = available_profiles()
    assert {"cpu-laptop", "gpu-8gb", "gpu-24gb", "expert-host"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.description
    laptop = load_profile("cpu-laptop")
    assert (laptop.device, laptop.max_memory, laptop.threads, laptop.batch_size) == ("cpu", "50%", 2, "auto")
    assert laptop.train and laptop.host_experts
    assert load_profile("gpu-8gb").device == "cuda"
    assert parse_memory_limit(load_profile("gpu-24gb").max_memory, 0) == 22 * GiB
    host = load_profile("expert-host")
    assert not host.train and host.host_experts


def write_profile(tmp_path: Path, body: str) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text("description: test peer\n" + body)
    return str(path)


def test_profile_from_a_path_and_number_spelling(tmp_path):
    profile = load_profile(write_profile(tmp_path, "device: auto\nmax_memory: 0.25\nbatch_size: 12\n"))
    assert (profile.device, profile.max_memory, profile.batch_size) == ("auto", "0.25", 12)


@pytest.mark.parametrize(
    "body, message",
    [
        ("gpus: 2\n", "unknown key(s): gpus"),
        ("batch_size: big\n", "batch_size"),
        ("batch_size: 0\n", "batch_size must be >= 1"),
        ("batch_size: 2.5\n", "batch_size"),
        ("threads: 0\n", "threads"),
        ("device: tpu\n", "device must be"),
        ("max_memory: lots\n", "cannot read memory limit"),
        ("train: 'yes'\n", "train"),
    ],
)
def test_bad_profiles_name_the_file(tmp_path, body, message):
    with pytest.raises(ValueError, match="mine.yaml") as info:
        load_profile(write_profile(tmp_path, body))
    assert message in str(info.value)


def test_unknown_profile_name_lists_known_ones():
    with pytest.raises(ValueError, match="known: .*cpu-laptop"):
        load_profile("supercomputer")
