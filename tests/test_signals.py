"""Signals: SIGTERM and SIGHUP (timeout, Slurm's scancel, a closed terminal) and Ctrl-C stop a
conversion promptly, with one line and nothing left behind: no save directory, no staged one.
SIGKILL leaves only the hidden staged directory, which --resume finishes."""

import os
import signal
import subprocess
import sys
import time
import zlib

import pytest
import torch

from ckpt_hooks.algebra.spec import ParallelConfig, Rank
from ckpt_hooks.formats.megatron_legacy import completed_rank_file, save_rank_file
from ckpt_hooks.formats.torch_dist import Item, completed_records, object_key, write_records
from ckpt_hooks.formats.torch_save import PendingTensor
from tests.util import tree_digest


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


def killed_after_one_file(command: list, where) -> None:
    """Run a conversion into ``where``/out and SIGKILL it once it has completed a file."""
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 60
    while not list(where.glob(".out.partial-*/iter_*/**/.*.done.json")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    process.kill()
    process.wait()


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_a_killed_conversion_resumes_with_its_complete_files(big_source, tmp_path, ckpt_format):
    """SIGKILL (no chance to clean up) leaves nothing at --save-dir, only the hidden staged
    directory; --resume reuses its complete files (legacy rank files, torch_dist .distcp files)
    and gives what a fresh run gives, byte for byte."""
    command = [sys.executable, "-m", "ckpt_hooks.cli", "convert", "--load-dir", big_source,
               "--target-tensor-parallel-size", "4", "--target-ckpt-format", ckpt_format, "--workers", "1",
               "--convert-param-only", "--quiet"]
    killed_after_one_file(command + ["--save-dir", tmp_path / "out"], tmp_path)
    assert not (tmp_path / "out").exists() and len(list(tmp_path.glob(".out.partial-*"))) == 1
    resumed = subprocess.run([c for c in command if c != "--quiet"] + ["--save-dir", tmp_path / "out", "--resume"],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    reused = int(resumed.stdout.split("note: resumed: ")[1].split(" of 4")[0])
    assert reused >= 1, resumed.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    fresh = subprocess.run(command + ["--save-dir", tmp_path / "fresh"], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "fresh")


def test_a_staged_file_is_reused_only_if_its_bytes_are_what_was_written(tmp_path):
    path = save_rank_file(tmp_path, 1, Rank(), ParallelConfig(), {"model": {"w": torch.arange(1000, dtype=torch.float32)}})
    assert completed_rank_file(path) == {"data/0": zlib.crc32(torch.arange(1000, dtype=torch.float32).numpy().tobytes())}
    blob = bytearray(path.read_bytes())
    at = blob.index(torch.tensor([500.0]).numpy().tobytes())
    blob[at] ^= 1                               # same size, one bit inside the tensor
    path.write_bytes(bytes(blob))
    assert completed_rank_file(path) is None
    path.write_bytes(bytes(blob[:-10]))         # cut short
    assert completed_rank_file(path) is None


def test_a_staged_distcp_file_is_reused_only_if_its_records_are_what_was_written(tmp_path):
    values = torch.arange(1000, dtype=torch.float32)
    items = [Item("w", (0,), (1000,), (1000,), torch.float32, pending=PendingTensor((1000,), torch.float32,
                                                                                   fill=lambda out: out.copy_(values))),
             Item(object_key("rng_state"), obj=[{"seed": 1}])]
    path = tmp_path / "__0_0.distcp"
    written = write_records(path, items)
    assert completed_records(path, items) == written
    assert completed_records(path, items[::-1]) is None   # another conversion's records
    blob = bytearray(path.read_bytes())
    blob[blob.index(torch.tensor([500.0]).numpy().tobytes())] ^= 1   # same size, one bit inside the tensor
    path.write_bytes(bytes(blob))
    assert completed_records(path, items) is None


def test_resume_never_takes_another_conversions_staged_files(big_source, tmp_path):
    """A staged directory left by a killed conversion to another layout is not resumed by this
    one (its files, complete and intact, belong to another plan): nothing reused."""
    command = [sys.executable, "-m", "ckpt_hooks.cli", "convert", "--load-dir", big_source, "--workers", "1",
               "--convert-param-only", "--quiet", "--save-dir", tmp_path / "out"]
    killed_after_one_file(command + ["--target-tensor-parallel-size", "4"], tmp_path)
    resumed = subprocess.run([c for c in command if c != "--quiet"] + ["--target-tensor-parallel-size", "2",
                                                                       "--resume"],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "note: resumed: 0 of 2" in resumed.stdout, resumed.stdout
