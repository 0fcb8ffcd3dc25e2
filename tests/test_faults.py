"""Faults of the machine, not of the input: a save directory's filesystem filling up part-way
through a conversion. One line naming the file being written, a non-zero exit, nothing left on the
full filesystem, the source untouched. Needs a small tmpfs (mount privileges): skipped without."""

import subprocess

import pytest

from tests.util import cli, tree_digest


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: less than any of the test checkpoints."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


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
