"""``torchrun -m ckpt_hooks.cli convert``: four processes share the target files and write a
checkpoint (legacy or torch_dist) byte-identical to one process's; a bad source stops every rank
with one line and publishes nothing."""

import os
import shutil
import subprocess
import sys

from tests.harness import free_port
from tests.util import tree_digest


def torchrun_convert(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr", "127.0.0.1",
               f"--master-port={free_port()}", "-m", "ckpt_hooks.cli", "convert", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_four_write_what_one_writes(source, tmp_path, flags):
    one = subprocess.run([sys.executable, "-m", "ckpt_hooks.cli", "convert", "--load-dir", source,
                          "--save-dir", tmp_path / "one", *map(str, flags)], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    four = torchrun_convert("--load-dir", source, "--save-dir", tmp_path / "four", *flags)
    assert four.returncode == 0, four.stdout[-3000:] + four.stderr[-3000:]
    assert tree_digest(tmp_path / "four") == tree_digest(tmp_path / "one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["four", "one"]


def test_four_processes_write_what_one_writes(sources, tmp_path):
    flags = ["--target-tensor-parallel-size", 1, "--target-pipeline-parallel-size", 4, "--quiet"]
    assert_four_write_what_one_writes(sources["cont_tp2pp2"].dir, tmp_path, flags)


def test_four_processes_write_torch_dist_as_one_does(sources, tmp_path):
    flags = ["--target-tensor-parallel-size", 1, "--quiet"]
    assert_four_write_what_one_writes(sources["dist_tp2pp2"].dir, tmp_path, flags)


def test_a_bad_source_stops_every_rank_with_one_line(sources, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sources["cont_tp2pp2"].dir, broken)
    path = next(broken.glob("iter_*/mp_rank_01_001/distrib_optim.pt"))
    path.write_bytes(path.read_bytes()[:-1000])
    result = torchrun_convert("--load-dir", broken, "--save-dir", tmp_path / "out", "--target-tensor-parallel-size", 1)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 4 and len(set(errors)) == 1 and "mp_rank_01_001/distrib_optim.pt" in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
