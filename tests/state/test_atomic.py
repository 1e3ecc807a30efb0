"""The one atomic write helper: a failing writer leaves the old file untouched and no temp file behind."""

import pytest

from dragon_swarm.state.atomic import atomic_write, atomic_write_bytes, atomic_write_text


def test_writes_create_folders_and_replace_the_file(tmp_path):
    path = tmp_path / "a" / "b" / "file.txt"
    atomic_write_text(path, "first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.txt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path, error):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")

    def half_then_fail(tmp):
        tmp.write_text("half of the new")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failing_first_write_leaves_nothing(tmp_path):
    def fail(tmp):
        raise OSError("no")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.bin", fail)
    assert list(tmp_path.iterdir()) == []
