"""The command line on real checkpoints: inspect, convert with progress, and a lossless round trip."""

import json
import re
import subprocess
import sys

import torch

from ckpt_hooks.megatron.checkpoint import open_checkpoint
from tests.util import tree_digest, cli


def test_inspect_describes_layout_model_and_files(sources):
    result = cli("inspect", sources["tp1pp2vpp2"].dir, "--tensors")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr   # no "Transformer Engine and Apex are not installed" noise
    out = result.stdout
    assert "Megatron legacy (torch), iteration 3" in out
    assert "TP1·PP2·VPP2·DP2" in out
    assert "4 layers, hidden 64, ffn 128 SwiGLU, 4 heads (GQA, 2 groups)" in out
    assert "vocab 100 padded to 112" in out
    assert "distrib_optim.pt present" in out
    assert "mp_rank_00_000" in out and "mp_rank_00_001" in out
    assert "model1.decoder.layers.0.mlp.linear_fc1.weight  [256, 64] float32" in out


def load_models(root):
    ckpt = open_checkpoint(root)
    out = {}
    for rank, f in ckpt.files.items():
        state = torch.load(f.path, weights_only=False)
        out[(rank.tp, rank.pp)] = {k: v for k, v in state.items() if k.startswith("model")}
    return out


def test_round_trip_through_other_layouts_is_lossless(sources, tmp_path):
    """TP2·PP2 -> TP4·PP1 -> TP2·PP4 -> TP2·PP2 gives back the very same tensors, in the same
    order. (Through TP1 it would not: TP1 pads the vocabulary to 112 rows, not 128.)"""
    source = sources["tp2pp2"].dir
    steps = [(4, 1), (2, 4), (2, 2)]
    previous = source
    for i, (tp, pp) in enumerate(steps):
        out = tmp_path / f"step{i}"
        result = cli("convert", "--load-dir", previous, "--save-dir", out, "--convert-param-only",
                     "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp)
        assert result.returncode == 0, result.stderr
        assert f"TP{tp}·PP{pp}" in result.stdout
        assert "100%" in result.stderr  # the progress bar
        previous = out
    original, back = load_models(source), load_models(previous)
    assert original.keys() == back.keys()
    for rank in original:
        for chunk, tensors in original[rank].items():
            assert list(tensors) == list(back[rank][chunk])
            for key, value in tensors.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, back[rank][chunk][key]), (rank, key)
                else:
                    assert value == back[rank][chunk][key] or value is None, (rank, key)


def test_virtual_stages_given_as_layers_per_stage(sources, tmp_path):
    """--num-layers-per-virtual-pipeline-stage 1 at PP2 (4 layers) is VPP2: the same files."""
    outputs = {}
    for name, flag in (("vpp", ["--target-virtual-pipeline-parallel-size", 2]),
                       ("per-stage", ["--num-layers-per-virtual-pipeline-stage", 1])):
        outputs[name] = tmp_path / name
        result = cli("convert", "--load-dir", sources["tp2pp2"].dir, "--save-dir", outputs[name], "--quiet",
                     "--target-tensor-parallel-size", 1, "--target-pipeline-parallel-size", 2, *flag)
        assert result.returncode == 0, result.stderr
    assert tree_digest(outputs["vpp"]) == tree_digest(outputs["per-stage"])
    assert (outputs["vpp"] / "iter_0000003" / "mp_rank_00_001").is_dir()


def test_quiet_prints_nothing(sources, tmp_path):
    result = cli("convert", "--load-dir", sources["tp4pp1"].dir, "--save-dir", tmp_path / "out",
                 "--convert-param-only", "--target-tensor-parallel-size", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


def test_inspect_json_for_scripts(sources):
    result = cli("inspect", sources["tp1pp2vpp2"].dir, "--json", "--tensors")
    assert result.returncode == 0, result.stderr
    about = json.loads(result.stdout)
    assert about["layout"]["pp"] == 2 and about["layout"]["vpp"] == 2 and about["model"]["num_layers"] == 4
    assert [f["rank"] for f in about["files"]] == [{"tp": 0, "pp": 0, "ep": 0}, {"tp": 0, "pp": 1, "ep": 0}]
    entries = about["files"][0]["entries"]
    assert set(entries) == {"model0", "model1"} and entries["model0"]["embedding.word_embeddings.weight"][1] == "float32"
    assert about["files"][0]["tensors"] == sum(e is not None for c in entries.values() for e in c.values())


def test_version_and_a_closed_pipe():
    assert cli("--version").stdout.strip() == "ckpt-hooks 0.1.0"
    shell = subprocess.run(f"{sys.executable} -m ckpt_hooks.cli --help | head -1", shell=True, capture_output=True,
                           text=True, timeout=60)
    assert shell.returncode == 0 and "Broken pipe" not in shell.stderr, shell.stderr


def test_every_command_has_an_example_and_shows_defaults():
    from ckpt_hooks.cli import COMMANDS, EXAMPLES

    assert set(EXAMPLES) == set(COMMANDS)
    text = cli("convert", "--help").stdout
    assert "example: ckpt-hooks convert" in text
    assert re.search(r"target files built in parallel\s+\(default: \d+\)", text), text


def test_dry_run_prints_the_plan_and_writes_nothing(sources, tmp_path):
    """The plan's bytes are what the conversion writes; the reads cover every source tensor once
    (TP2·PP2 -> TP1·PP1 has no replicas to skip); nothing is created."""
    source = sources["tp2pp2"].dir
    plan = cli("convert", "--load-dir", source, "--save-dir", tmp_path / "out", "--target-tensor-parallel-size", 1,
               "--target-pipeline-parallel-size", 1, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert not (tmp_path / "out").exists()
    done = cli("convert", "--load-dir", source, "--save-dir", tmp_path / "out", "--target-tensor-parallel-size", 1,
               "--target-pipeline-parallel-size", 1)
    assert done.returncode == 0, done.stderr
    written = re.search(r"([0-9.]+) MB in", done.stdout).group(1)
    assert f"writes {written} MB; reads:" in plan.stdout, (plan.stdout, done.stdout)
    reads = re.findall(r"/(mp_rank_\d\d_\d\d\d/\w+\.pt)  ([0-9.]+) MB", plan.stdout)
    assert sorted({f for f, _ in reads}) == sorted(f"mp_rank_{t:02d}_{p:03d}/{name}" for t in range(2)
                                                   for p in range(2) for name in ("distrib_optim.pt",
                                                                                  "model_optim_rng.pt"))
    assert "largest tensor in flight" in plan.stdout and "peak memory about" in plan.stdout
