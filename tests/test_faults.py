"""Faults of the machine, not of the input: a save directory's filesystem filling up, or turning
read-only, part-way through a conversion. One line naming the file being written, a non-zero
exit, nothing published, the source untouched. Needs a tmpfs (mount privileges): skipped without."""

import ctypes
import errno
import subprocess
import sys
import time

import pytest

from tests.util import cli, tree_digest


def tmpfs(where, size: str):
    """A tmpfs of ``size`` mounted at ``where`` (skips the test where mounting is not allowed)."""
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", str(where)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: less than any of the test checkpoints."""
    yield from tmpfs(tmp_path / "disk", "1m")


@pytest.fixture
def disk(tmp_path):
    """A 512 MiB tmpfs: room for big_source's conversion."""
    yield from tmpfs(tmp_path / "disk", "512m")


def remount(where, read_only: bool) -> int:
    """mount(2) MS_REMOUNT [| MS_RDONLY]: 0, or the errno (EBUSY while a file is open for writing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = 32 | (1 if read_only else 0)
    return 0 if libc.mount(b"tmpfs", str(where).encode(), b"tmpfs", flags, None) == 0 else ctypes.get_errno()


@pytest.mark.parametrize("source, written", [("cont_tp2pp2", ".pt: "), ("dist_tp2pp2", ".distcp: ")])
def test_a_full_disk_is_one_line_and_leaves_nothing(sources, small_disk, source, written):
    """torch's zip writer, told of the error inside its C++ code, would abort the process (legacy
    output) or replace it by a RuntimeError (torch_dist): the error is kept until the file is done."""
    before = tree_digest(sources[source].dir)
    out = small_disk / "out"
    result = cli("convert", "--load-dir", sources[source].dir, "--save-dir", out, "--tp-size", "1", "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {out}/") and written in lines[0], lines[0]
    assert lines[0].endswith("No space left on device; nothing was written"), lines[0]
    assert list(small_disk.iterdir()) == []
    assert tree_digest(sources[source].dir) == before


def test_a_save_directory_turning_read_only_is_one_line_and_publishes_nothing(big_source, disk):
    """The save directory's filesystem remounted read-only between two target files (as the
    kernel does on a disk error, or an admin): one line naming the file, exit 2, nothing at
    --save-dir (the staged files cannot be removed from a read-only filesystem: they stay hidden),
    the source untouched; writable again, --resume finishes it as a fresh run would."""
    before = tree_digest(big_source)
    command = [sys.executable, "-m", "ckpt_hooks.cli", "convert", "--load-dir", big_source,
               "--target-tensor-parallel-size", "4", "--workers", "1", "--convert-param-only", "--quiet"]
    process = subprocess.Popen(command + ["--save-dir", disk / "out"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(disk.glob(".out.partial-*/iter_*/*/.*.done.json")):   # one file complete
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.001)
    while remount(disk, read_only=True) == errno.EBUSY:   # refused while a file is open for writing:
        assert process.poll() is None, process.stderr.read()   # lands between two files
    stderr = process.communicate(timeout=60)[1]
    lines = stderr.strip().splitlines()
    try:
        assert process.returncode == 2 and len(lines) == 1, stderr
        assert lines[0].startswith(f"error: {disk / 'out'}/") and \
            lines[0].endswith("Read-only file system; nothing was written"), lines[0]
        assert not (disk / "out").exists()
        assert tree_digest(big_source) == before
    finally:
        assert remount(disk, read_only=False) == 0
    resumed = subprocess.run(command + ["--save-dir", disk / "out", "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    fresh = subprocess.run(command + ["--save-dir", disk / "fresh"], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    assert tree_digest(disk / "out") == tree_digest(disk / "fresh")
