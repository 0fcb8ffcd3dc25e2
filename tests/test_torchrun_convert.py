"""``torchrun -m ckpt_hooks.cli convert`` and every other converter under torchrun: four
processes share the target files and write a checkpoint (legacy or torch_dist, MindSpore .ckpt or
safetensors, Hugging Face, MindSpeed-Core-MS, MindFormers, merged DP shards or LoRA) byte-identical
to one process's; a bad source stops every rank with one line and publishes nothing."""

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import free_port
from tests.util import random_hf_model, run_in_process, tree_digest


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


# ---- every other converter ------------------------------------------------------------------

def mindspore_inputs(root: Path) -> dict:
    """A complete MindSpore checkpoint saved by MindSpore, sharded by MindSpore's own transform
    over 2 ranks; the target strategy of 4 ranks; MindSpeed-Core-MS optimizer shards of four
    DP groups (written by MindSpore)."""
    from tests.test_dp_zero import write_group
    from tests.test_mindspore_transform import LAYOUTS, _values, ms, ms_transform, write_strategy

    complete = root / "complete"
    (complete / "rank_0").mkdir(parents=True)
    ms.save_checkpoint([{"name": n, "data": v} for n, v in _values().items()], str(complete / "rank_0" / "full.ckpt"))
    col2, row4 = (write_strategy(root / f"{name}.ckpt", LAYOUTS[name]) for name in ("col2", "row4"))
    for seed, ranks in enumerate([[0, 4], [1, 5], [2, 6], [3, 7]]):
        write_group(root / "dp_zero", ranks, seed)
    return {"complete": complete, "col2_dir": ms_transform(complete, root / "col2", None, col2), "col2": col2,
            "row4": row4, "dp_zero": root / "dp_zero"}


def lora_input(root: Path, base) -> Path:
    """A MindSpeed-LLM LoRA checkpoint at TP2·PP2 for ``base`` (tests.test_lora's)."""
    from tests.test_lora import random_lora, save_lora

    return save_lora(root, random_lora(torch.load(base.truth, weights_only=False), 0), base, 2, 2, extra_state=True)


def hf_input(root: Path) -> Path:
    """A tiny transformers Llama (random weights, no download), saved by transformers."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2)
    random_hf_model(config, 0).save_pretrained(root)
    return root


TP2PP2 = ("--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
# name -> (needs MindSpore, the command line given the inputs and the save directory). Each
# writes several files (4 rank files, 4 DP groups or several safetensors shards), so that every
# process has some; those without --quiet print md5 lists, which rank 0 must give whole.
CONVERTERS = {
    "mindspore-ckpt": (True, lambda i, out: ["convert", "--load-dir", i["col2_dir"], "--save-dir", out,
                                             "--src-strategy-path-or-dir", i["col2"], "--dst-strategy", i["row4"],
                                             "--quiet"]),
    "mindspore-safetensors": (True, lambda i, out: ["convert", "--load-dir", i["complete"], "--save-dir", out,
                                                    "--dst-strategy", i["row4"], "--format", "safetensors",
                                                    "--quiet"]),
    "combine-dp-zero": (True, lambda i, out: ["combine-dp-zero", "--strategy-dir", i["dp_zero"] / "opt_shard_info",
                                              "--checkpoint-dir", i["dp_zero"] / "output", "--output-dir", out,
                                              "--copy-to-all-dp-ranks", "--quiet"]),
    "hf-to-megatron": (False, lambda i, out: ["hf-to-megatron", "--load-dir", i["hf"], "--save-dir", out, *TP2PP2,
                                              "--quiet"]),
    "megatron-to-hf": (False, lambda i, out: ["megatron-to-hf", "--load-dir", i["megatron"], "--save-dir", out,
                                              "--max-shard-size", "100KB", "--quiet"]),
    "megatron-to-mindspore": (False, lambda i, out: ["megatron-to-mindspore", "--megatron-path", i["megatron"],
                                                     "--ms-path", out]),
    # from the one process's output of the case above
    "mindspore-to-megatron": (False, lambda i, out: ["mindspore-to-megatron", "--ms-path",
                                                     i["one"] / "megatron-to-mindspore", "--megatron-path", out,
                                                     "--tp-size", 1, "--pp-size", 4]),
    "megatron-to-mindformers": (False, lambda i, out: ["megatron-to-mindformers", "--load-dir", i["megatron"],
                                                       "--save-dir", out, "--max-shard-size", "100KB", "--quiet"]),
    "mindformers-to-megatron": (False, lambda i, out: ["mindformers-to-megatron", "--load-dir",
                                                       i["one"] / "megatron-to-mindformers", "--save-dir", out,
                                                       *TP2PP2, "--quiet"]),
    "merge-lora": (False, lambda i, out: ["merge-lora", "--load-dir", i["megatron"], "--lora-load", i["lora"],
                                          "--save-dir", out, "--quiet"]),
}


def md5_lines(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if re.fullmatch(r"[0-9a-f]{32}  \S+", line))


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """Every converter's output by one process (run here) and by four (one torchrun launch for
    them all), with what each printed."""
    root = tmp_path_factory.mktemp("torchrun_converters")
    inputs = {"megatron": sources["tp2pp2"].dir, "hf": hf_input(root / "hf"), "lora": lora_input(root / "lora",
                                                                                                 sources["tp2pp2"]),
              "one": root / "one"}
    if importlib.util.find_spec("mindspore"):
        inputs.update(mindspore_inputs(root / "ms"))
    cases = [name for name, (needs_mindspore, _) in CONVERTERS.items() if "complete" in inputs or not needs_mindspore]
    # Both write to out/NAME, then moved aside: hf-to-megatron's args name the save directory.
    out, printed = root / "out", {}
    for ran in ("one", "four"):
        (root / ran).mkdir()
    for name in cases:
        with contextlib.redirect_stdout(io.StringIO()) as text:
            assert run_in_process(*CONVERTERS[name][1](inputs, out / name)) == 0, name
        printed[name] = text.getvalue()
        (out / name).rename(root / "one" / name)
    commands = root / "commands.json"
    commands.write_text(json.dumps([[str(a) for a in CONVERTERS[name][1](inputs, out / name)] for name in cases]))
    four = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr",
                           "127.0.0.1", f"--master-port={free_port()}", Path(__file__).parent / "harness" / "cli_run.py",
                           commands, root / "codes"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert four.returncode == 0, four.stdout[-3000:] + four.stderr[-3000:]
    for rank in range(4):
        assert json.loads((root / f"codes.{rank}.json").read_text()) == [0] * len(cases)
    for name in cases:
        (out / name).rename(root / "four" / name)
    assert not any(out.iterdir())   # nothing staged is left
    return root, cases, printed, four.stdout


@pytest.mark.parametrize("name", CONVERTERS)
def test_four_processes_convert_as_one_does(converted, name):
    """Each converter's output from four torchrun processes, each writing its share of the target
    files, is byte for byte the one process's; only rank 0 reports, with every rank's files."""
    root, cases, printed, stdout = converted
    if name not in cases:
        pytest.skip("needs MindSpore to make the source")
    one, four = tree_digest(root / "one" / name), tree_digest(root / "four" / name)
    assert four == one and len(one) >= 4
    if md5_lines(printed[name]):
        report = f"wrote {root / 'out' / name}:"
        assert stdout.count(report) == 1
        assert md5_lines(stdout.split(report, 1)[1].split("wrote ", 1)[0]) == md5_lines(printed[name])


def test_a_shard_one_rank_reads_stops_every_rank_with_one_line(tmp_path):
    """A damaged optimizer shard of one DP group fails only the rank that merges that group, while
    the others finish theirs: all four agree, print its one line, and publish nothing."""
    pytest.importorskip("mindspore")
    inputs = mindspore_inputs(tmp_path / "ms")
    shard = next((inputs["dp_zero"] / "output" / "rank_6").glob("*.ckpt"))
    shard.write_bytes(shard.read_bytes()[:-100])
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                             "--master-addr", "127.0.0.1", f"--master-port={free_port()}", "-m", "ckpt_hooks.cli",
                             "combine-dp-zero", "--strategy-dir", inputs["dp_zero"] / "opt_shard_info",
                             "--checkpoint-dir", inputs["dp_zero"] / "output", "--output-dir", tmp_path / "out"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 4 and len(set(errors)) == 1 and errors[0].startswith(f"error: {shard}"), errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ms"]
