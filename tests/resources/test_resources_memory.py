"""Memory limits (pure parsing, sizes read by pydantic.ByteSize), the machine's total, torch threads."""

import os

import pytest
import torch

from dragon_swarm.resources import apply_threads, memory, parse_memory_limit

GiB, MiB = 2**30, 2**20


# --- parse_memory_limit ---


@pytest.mark.parametrize(
    "text, total, expected",
    [
        ("0.5", 8 * GiB, 4 * GiB),
        ("50%", 8 * GiB, 4 * GiB),
        ("100%", 1000, 1000),
        ("1.0", 1000, 1000),
        (".25", 1000, 250),
        ("12.5 %", 800, 100),
        ("6GiB", 1, 6 * GiB),
        ("512MiB", 1, 512 * MiB),
        ("4KiB", 1, 4096),
        ("1TiB", 1, 2**40),
        ("2G", 1, 2 * 10**9),
        ("1.5GB", 1, 1_500_000_000),
        ("800M", 1, 800 * 10**6),
        ("3kb", 1, 3000),
        ("1000000", 1, 1_000_000),
        ("1000000B", 1, 1_000_000),
        (" 6 gib ", 1, 6 * GiB),
    ],
)
def test_parse_memory_limit_valid(text, total, expected):
    assert parse_memory_limit(text, total) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty memory limit"),
        ("lots", "cannot read memory limit"),
        ("6 gigs", "cannot read memory limit"),
        ("1e9", "cannot read memory limit"),
        ("GiB", "cannot read memory limit"),
        ("4Ki", "cannot read memory limit"),  # binary units need their B (pydantic.ByteSize)
        ("6GiB!", "cannot read memory limit"),
        ("abc%", "cannot read memory limit"),
        ("inf%", "cannot read memory limit"),
        ("0", "must be positive"),
        ("0GiB", "must be positive"),
        ("0%", "must be positive"),
        ("0.0", "must be positive"),
        ("-1GiB", "must be positive"),
        ("-50%", "must be positive"),
        ("1.5", "more than all of the memory"),
        ("150%", "more than all of the memory"),
    ],
)
def test_parse_memory_limit_invalid(text, message):
    with pytest.raises(ValueError, match=message):
        parse_memory_limit(text, 8 * GiB)


def test_fraction_needs_a_known_total():
    with pytest.raises(ValueError, match="total memory unknown"):
        parse_memory_limit("50%", 0)
    assert parse_memory_limit("1GiB", 0) == GiB  # absolute sizes do not need it


def test_total_memory_honours_a_smaller_cgroup_limit(tmp_path, monkeypatch):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(memory, "CGROUP_MEMORY_FILES", (limit,))
    limit.write_text("max\n")
    assert memory.total_memory_bytes("cpu") == ram
    limit.write_text(f"{ram // 4}\n")
    assert memory.total_memory_bytes("cpu") == ram // 4
    limit.write_text(f"{ram * 4}\n")  # a limit above RAM changes nothing
    assert memory.total_memory_bytes("cpu") == ram


# --- apply_threads ---


def test_apply_threads(monkeypatch):
    interop = []
    monkeypatch.setattr(torch, "set_num_interop_threads", interop.append)
    before = torch.get_num_threads()
    try:
        assert apply_threads(None) == before
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1 and interop == [1]

        def too_late(n):
            raise RuntimeError("cannot set number of interop threads after parallel work has started")

        monkeypatch.setattr(torch, "set_num_interop_threads", too_late)
        assert apply_threads(2) == 2  # the inter-op failure is not fatal
        for bad in (0, -1, True, 1.5):
            with pytest.raises(ValueError, match="threads must be an integer >= 1"):
                apply_threads(bad)
    finally:
        torch.set_num_threads(before)
