"""Publishing output: atomic (nothing under the final name until complete) and durable (every
file and directory fsync'ed before the rename that publishes it, the parent after it)."""

import os

import pytest

from ckpt_hooks.formats import atomic


@pytest.fixture
def synced(monkeypatch):
    """The paths fsync'ed, in order, and when the save directory appeared."""
    events = []
    real = os.fsync

    def record(fd):
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", record)
    return events


def test_a_staged_directory_is_on_disk_before_it_is_published(tmp_path, synced):
    target = tmp_path / "out"
    with atomic.staged_directory(target) as root:
        (root / "iter").mkdir()
        (root / "iter" / "a.pt").write_bytes(b"a" * 10)
        (root / "tracker.txt").write_text("1")
        staged = str(root)
    files = [f"{staged}/iter/a.pt", f"{staged}/tracker.txt"]
    assert set(files) <= set(synced[:2]) and synced[2:4] == [f"{staged}/iter", staged]
    assert synced[-1] == str(tmp_path) and target.is_dir()   # the rename itself, on disk


def test_atomic_write_syncs_the_file_then_its_directory(tmp_path, synced):
    with atomic.atomic_write(tmp_path / "manifest.json") as f:
        f.write(b"{}")
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)
    assert (tmp_path / "manifest.json").read_bytes() == b"{}"


def test_a_failed_block_publishes_nothing(tmp_path, synced):
    with pytest.raises(RuntimeError):
        with atomic.staged_directory(tmp_path / "out") as root:
            (root / "half.pt").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == [] and synced == []
