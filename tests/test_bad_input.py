"""Bad input: one line naming the file and the cause, a non-zero exit, nothing written, and the
source left exactly as it was."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.megatron.checkpoint import read_source, write_manifest
from tests.util import assert_refused, cli, tree_digest


@pytest.fixture
def ckpt(sources, tmp_path):
    """A private copy of the real TP2·PP2 checkpoint, to damage."""
    copy = tmp_path / "ckpt"
    shutil.copytree(sources["tp2pp2"].dir, copy)
    return copy


def rank_file(ckpt: Path, rank_dir: str) -> Path:
    return ckpt / "iter_0000003" / rank_dir / "model_optim_rng.pt"


def test_missing_rank_directory(ckpt, tmp_path):
    shutil.rmtree(ckpt / "iter_0000003" / "mp_rank_01_001")
    assert_refused(ckpt, tmp_path / "out", "--target-tensor-parallel-size", "1",
                   names=ckpt / "iter_0000003" / "mp_rank_01_001", says="missing rank directory")


@pytest.mark.parametrize("tp", [3, 8])
def test_target_tp_that_does_not_divide(ckpt, tmp_path, tp):
    """The flag is blamed, not the source file."""
    assert_refused(ckpt, tmp_path / "out", "--target-tensor-parallel-size", tp,
                   names=f"--target-tensor-parallel-size {tp}", says="does not divide attention heads (4)")


@pytest.mark.parametrize("flags, names, says", [
    (("--target-tensor-parallel-size", "0"), "", "--target-tensor-parallel-size/--tp-size: must be a positive number"),
    (("--target-pipeline-parallel-size", "-2"), "", "--target-pipeline-parallel-size/--pp-size: must be a positive"),
    (("--target-data-parallel-size", "0"), "", "--target-data-parallel-size/--dp-size: must be a positive number"),
    (("--target-pipeline-parallel-size", "1", "--target-virtual-pipeline-parallel-size", "2"),
     "--target-virtual-pipeline-parallel-size 2", "need a pipeline parallel size above 1"),
    (("--num-layer-list", "1,2"), "--num-layer-list 1,2", "does not split 4 layers"),
    (("--target-pipeline-parallel-size", "4", "--num-layer-list", "1,3"), "--num-layer-list 1,3",
     "lists 2 stages, the pipeline has 4"),
    (("--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"),
     "--num-layers-per-virtual-pipeline-stage 3", "does not split 4 layers over 2 stages"),
    (("--num-layers-per-virtual-pipeline-stage", "1", "--target-virtual-pipeline-parallel-size", "2"),
     "--num-layers-per-virtual-pipeline-stage 1", "both give the virtual stages"),
])
def test_target_sizes_are_validated(ckpt, tmp_path, flags, names, says):
    """Sizes the target framework would refuse are refused before anything is read, naming the flag
    (argparse's own usage error for a size that is not positive)."""
    before = tree_digest(ckpt)
    result = cli("convert", "--load-dir", ckpt, "--save-dir", tmp_path / "out", "--quiet", *flags)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert (last.startswith(f"error: {names}: ") if names else "error: argument" in last) and says in last, last
    assert not (tmp_path / "out").exists() and tree_digest(ckpt) == before


def test_truncated_file(ckpt, tmp_path):
    victim = rank_file(ckpt, "mp_rank_01_000")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    assert_refused(ckpt, tmp_path / "out", "--target-tensor-parallel-size", "1", names=victim, says="truncated")


def test_args_disagree_with_tensors(ckpt, tmp_path):
    # Rewrite the args of every rank as if the model had 4 query groups instead of 2.
    for path in (ckpt / "iter_0000003").glob("*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        state["args"].num_query_groups = 4
        torch.save(state, path)
    assert_refused(ckpt, tmp_path / "out", "--target-tensor-parallel-size", "1",
                   names=rank_file(ckpt, "mp_rank_00_000"), says="the args")


def test_non_empty_save_dir(ckpt, tmp_path):
    save_dir = tmp_path / "out"
    save_dir.mkdir()
    (save_dir / "keep.txt").write_text("precious")
    before = tree_digest(ckpt)
    result = cli("convert", "--load-dir", ckpt, "--save-dir", save_dir, "--convert-param-only",
                 "--target-tensor-parallel-size", "1")
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {save_dir}: save directory exists and is not empty; refusing to overwrite"
    assert [p.name for p in save_dir.iterdir()] == ["keep.txt"]
    assert (save_dir / "keep.txt").read_text() == "precious"
    assert tree_digest(ckpt) == before


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_not_run(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    victim = rank_file(ckpt, "mp_rank_00_001")
    state = torch.load(victim, weights_only=False)
    state["args"].evil = _Payload(marker)
    torch.save(state, victim, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    assert_refused(ckpt, tmp_path / "out", "--target-tensor-parallel-size", "1",
                   names=victim, says="not on the allowlist")
    inspected = cli("inspect", ckpt)
    assert inspected.returncode != 0 and "not on the allowlist" in inspected.stderr
    assert not marker.exists()


def test_manifest_that_disagrees_with_the_files(sources, tmp_path):
    """convert writes a manifest; a reader checks the files against it before trusting them."""
    converted = tmp_path / "converted"
    result = cli("convert", "--load-dir", sources["tp2pp2"].dir, "--save-dir", converted, "--convert-param-only",
                 "--target-tensor-parallel-size", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    manifest_path = converted / "iter_0000003" / "ckpt_hooks_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert cli("inspect", converted).returncode == 0
    tensors = manifest["files"]["mp_rank_00_001/model_optim_rng.pt"]["tensors"]
    tensors["model.decoder.layers.0.mlp.linear_fc2.weight"]["shape"] = [64, 64]
    manifest_path.write_text(json.dumps(manifest))
    assert_refused(converted, tmp_path / "out", "--target-tensor-parallel-size", "2",
                   names=rank_file(converted, "mp_rank_00_001"),
                   says="the manifest disagrees with the files: model.decoder.layers.0.mlp.linear_fc2.weight")


def _as_version_1(described: dict) -> dict:
    """A manifest as releases before manifest_version 2 wrote it: each file's tensors nested chunk -> key."""
    files = {}
    for relative, listed in described["files"].items():
        files[relative] = {"bytes": listed["bytes"]}
        for key, t in listed.get("tensors", {}).items():
            chunk, name = key.split(".", 1)
            files[relative].setdefault("tensors", {}).setdefault(chunk, {})[name] = t and {
                "shape": t["shape"], "dtype": t["dtype"], "logical": t["logical"], "offsets": t["offsets"],
                "logical_shape": t["global_shape"]}
    return {"manifest_version": 1, "format": "megatron-legacy", "iteration": described["iteration"],
            "model": described["model"], "layout": described["layout"], "files": files}


def test_version_1_manifest_still_vouches_for_the_files(ckpt):
    """A manifest an earlier release wrote is read, and the files are checked against it."""
    write_manifest(ckpt)
    path = ckpt / "iter_0000003" / "ckpt_hooks_manifest.json"
    old = _as_version_1(json.loads(path.read_text()))
    path.write_text(json.dumps(old))
    assert read_source(ckpt).layout.tp == 2
    tensors = old["files"]["mp_rank_00_001/model_optim_rng.pt"]["tensors"]["model"]
    tensors["decoder.layers.0.mlp.linear_fc2.weight"]["shape"] = [1, 1]
    path.write_text(json.dumps(old))
    with pytest.raises(CheckpointError) as error:
        read_source(ckpt)
    assert str(error.value).startswith(f"{rank_file(ckpt, 'mp_rank_00_001')}: the manifest disagrees with the files: "
                                       "model.decoder.layers.0.mlp.linear_fc2.weight is float32[")


def refused_untouched(ckpt: Path, load_dir: Path, save_dir: Path, *, names: Path, says: str) -> None:
    """`convert` fails with one line naming ``names`` and leaves ``ckpt`` (which may hold or be the
    save directory) exactly as it was: assert_refused for save directories that already exist."""
    before = tree_digest(ckpt)
    result = cli("convert", "--load-dir", load_dir, "--save-dir", save_dir, "--convert-param-only", "--quiet",
                 "--target-tensor-parallel-size", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {names}: ") and says in lines[0], result.stderr
    assert tree_digest(ckpt) == before
    assert not any(".partial-" in p.name for p in ckpt.rglob("*")) and not any(
        ".partial-" in p.name for p in save_dir.parent.iterdir())


def test_a_file_as_save_dir_is_named_as_such(ckpt, tmp_path):
    target = tmp_path / "out.pt"
    target.write_text("not a directory")
    refused_untouched(ckpt, ckpt, target, names=target, says="is a file; the save directory must be a directory")
    assert target.read_text() == "not a directory"


def test_a_file_as_load_dir_is_named_as_such(ckpt, tmp_path):
    victim = rank_file(ckpt, "mp_rank_00_000")
    refused_untouched(ckpt, victim, tmp_path / "out", names=victim, says="is a file; give the checkpoint's directory")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["inside", "same", "symlink"])
def test_save_dir_inside_or_equal_to_the_source_is_refused(ckpt, tmp_path, where):
    save_dir = {"inside": ckpt / "converted", "same": ckpt, "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        save_dir.symlink_to(ckpt)
    refused_untouched(ckpt, ckpt, save_dir, names=save_dir, says="lies inside the checkpoint being read")
    assert not (ckpt / "converted").exists()


def test_overwrite_replaces_only_on_success(ckpt, tmp_path):
    """--overwrite replaces a non-empty save directory once the new output is complete; a run that
    fails leaves the old contents; the checkpoint being read is never a save directory."""
    save_dir = tmp_path / "out"
    save_dir.mkdir()
    (save_dir / "old.txt").write_text("old")
    failed = cli("convert", "--load-dir", ckpt, "--save-dir", save_dir, "--overwrite", "--convert-param-only",
                 "--target-tensor-parallel-size", "3", "--quiet")
    assert failed.returncode == 2 and [p.name for p in save_dir.iterdir()] == ["old.txt"], failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
    done = cli("convert", "--load-dir", ckpt, "--save-dir", save_dir, "--overwrite", "--convert-param-only",
               "--target-tensor-parallel-size", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    assert not (save_dir / "old.txt").exists() and (save_dir / "latest_checkpointed_iteration.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]
    refused_untouched(ckpt, ckpt, ckpt, names=ckpt, says="lies inside the checkpoint being read")
    again = cli("convert", "--load-dir", ckpt, "--save-dir", ckpt, "--overwrite", "--quiet")
    assert again.returncode == 2 and "lies inside the checkpoint being read" in again.stderr


def test_an_unwritable_parent_is_named_not_a_staging_path(tmp_path, monkeypatch):
    """Permission bits do not bind root (who runs these tests), so the check's verdict is simulated."""
    from ckpt_hooks.errors import CheckpointError
    from ckpt_hooks.formats.atomic import refuse_non_empty

    parent = (tmp_path / "read-only").resolve()
    parent.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != parent)
    with pytest.raises(CheckpointError) as refused:
        refuse_non_empty(parent / "out" / "ckpt")
    assert str(refused.value) == f"{parent / 'out' / 'ckpt'}: cannot be created: {parent} is not writable"


def test_args_that_disagree_between_rank_files(ckpt, tmp_path):
    """One rank file's args describing another model (here: 4 query groups, the others 2)."""
    victim = rank_file(ckpt, "mp_rank_01_001")
    state = torch.load(victim, weights_only=False)
    state["args"].num_query_groups = 4
    torch.save(state, victim)
    assert_refused(ckpt, tmp_path / "out", "--target-tensor-parallel-size", "1", names=victim,
                   says="args disagree with the other rank files: num_query_groups 4 (the first rank file's: 2)")


def test_a_symlink_loop_as_load_dir_is_named_as_such(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop")
    result = cli("convert", "--load-dir", loop, "--save-dir", tmp_path / "out", "--quiet")
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr.strip() == f"error: {loop}: a symlink that leads nowhere (a loop, or a missing target)"


def test_optimizer_files_of_two_ranks_swapped(ckpt, tmp_path):
    """Same sizes, so the buffers fit: the fp32 main params must still be the rank's weights."""
    first, second = (ckpt / "iter_0000003" / d / "distrib_optim.pt" for d in ("mp_rank_00_000", "mp_rank_01_000"))
    data = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(data)
    assert_refused(ckpt, tmp_path / "out", "--target-tensor-parallel-size", "1", names=first,
                   says="its fp32 params are not the weights of", optimizer=True)
