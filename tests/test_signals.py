"""Signals: SIGTERM and SIGHUP (timeout, Slurm's scancel, a closed terminal) and Ctrl-C stop a
conversion promptly, with one line and nothing left behind: no save directory, no staged one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_reshard import make_source_args, write_tp1_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """A ~220 MB TP1 checkpoint: large enough to signal a conversion in the middle of its files."""
    root = tmp_path_factory.mktemp("signals") / "src"
    write_tp1_checkpoint(root, make_source_args(layers=8, hidden=512))
    return root


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_signalled_conversion_stops_promptly_and_leaves_nothing(big_source, tmp_path, signum, code):
    save_dir = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "ckpt_hooks.cli", "convert", "--load-dir", big_source,
                                "--save-dir", save_dir, "--target-tensor-parallel-size", "4", "--workers", "1",
                                "--convert-param-only", "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(p.suffix == ".pt" for p in tmp_path.glob(".out.partial-*/**/*")):   # first file begun
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.005)
    signalled = time.monotonic()
    os.kill(process.pid, signum)
    stderr = process.communicate(timeout=30)[1]
    assert time.monotonic() - signalled < 3
    assert process.returncode == code, stderr
    assert stderr.strip().splitlines() == [stderr.strip()] and stderr.startswith("error: interrupted"), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
