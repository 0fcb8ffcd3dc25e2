"""Megatron's torch_dist format (Megatron-LM's default ``--ckpt-format``), saved by megatron-core's
own ``dist_checkpointing.save`` as Megatron-LM calls it, with the default ``dp_reshardable``
optimizer state (which megatron-core cannot load at another TP/PP) and ``fully_reshardable``:

* resumed on the fly at new layouts by ``ckpt_hooks.megatron.load``;
* converted offline to torch_dist at new layouts and loaded by megatron-core's own loader;
* converted between the torch and torch_dist formats;
every weight and optimizer element bitwise equal to the source run's, the loss curve continued."""

import importlib
import io
import json
import math
import os
import pickle
import shutil
import zipfile

import pytest
import torch

from ckpt_hooks import convert
from ckpt_hooks.algebra.target import Target
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.torch_dist import DistCheckpoint
from ckpt_hooks.formats.torch_pickle import TorchFile, iter_lazy_tensors
from ckpt_hooks.converters.hf.to_hf import megatron_to_hf
from tests.conftest import uninterrupted_losses
from tests.harness import resume_job, run_jobs
from tests.util import cli, tree_digest

STEPS = 2

# (case id, source, running layout, how): "hook" = ckpt_hooks.megatron.load from the torch_dist
# source; "dist" = ckpt-hooks convert to torch_dist at the layout, then megatron-core's loader;
# "legacy" = convert to the torch format, then Megatron-LM's legacy loader.
CASES = [
    ("hook-tp1pp2", "dist_tp2pp2", {"tp": 1, "pp": 2}, "hook"),
    ("hook-tp4pp1", "dist_tp2pp2", {"tp": 4, "pp": 1}, "hook"),
    ("hook-tp1pp2vpp2", "dist_tp2pp2", {"tp": 1, "pp": 2, "vpp": 2}, "hook"),
    ("hook-tp1pp1", "dist_tp2pp2", {"tp": 1, "pp": 1}, "hook"),
    ("hook-same", "dist_tp2pp2", {"tp": 2, "pp": 2}, "hook"),
    ("hook-full-tp1pp2", "distfull_tp2pp2", {"tp": 1, "pp": 2}, "hook"),
    ("dist-tp1pp2", "dist_tp2pp2", {"tp": 1, "pp": 2}, "dist"),
    ("dist-tp4pp1", "dist_tp2pp2", {"tp": 4, "pp": 1}, "dist"),
    ("dist-tp1pp2vpp2", "dist_tp2pp2", {"tp": 1, "pp": 2, "vpp": 2}, "dist"),
    ("dist-full-tp1pp1", "distfull_tp2pp2", {"tp": 1, "pp": 1}, "dist"),
    ("legacy-to-dist-tp1pp2", "cont_tp2pp2", {"tp": 1, "pp": 2}, "dist"),
    ("dist-to-legacy-tp4pp1", "dist_tp2pp2", {"tp": 4, "pp": 1}, "legacy"),
    # megatron-core's own same-layout load of the saved files: the oracle the "dist" cases use
    ("megatron-core-same", "dist_tp2pp2", {"tp": 2, "pp": 2}, "as saved"),
    # saved by ckpt_hooks.megatron.save(ckpt_format="torch_dist"): its recorded param_maps used
    ("library-save-hook-tp1pp2", "saved_dist_tp2pp2", {"tp": 1, "pp": 2}, "hook"),
    ("library-save-megatron-core-same", "saved_dist_tp2pp2", {"tp": 2, "pp": 2}, "as saved"),
    # saved with DP2 by megatron-core: the index in no model order, the param_map rebuilt
    ("dp2-hook-tp2pp2", "dist_tp1pp2vpp2", {"tp": 2, "pp": 2}, "hook"),
    ("dp2-dist-tp1pp1", "dist_tp1pp2vpp2", {"tp": 1, "pp": 1}, "dist"),
    # bf16 params (fp32 main params in bf16 buckets), tied embeddings
    ("bf16-tied-hook-tp1pp2", "dist_tied_bf16_tp2pp2", {"tp": 1, "pp": 2}, "hook"),
    ("bf16-tied-dist-tp4pp1", "dist_tied_bf16_tp2pp2", {"tp": 4, "pp": 1}, "dist"),
    ("bf16-tied-megatron-core-same", "dist_tied_bf16_tp2pp2", {"tp": 2, "pp": 2}, "as saved"),
]
LOADERS = {"hook": "ckpt_hooks", "dist": "megatron_core_dist", "legacy": "megatron", "as saved": "megatron_core_dist"}


@pytest.fixture(scope="module")
def resumed(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_dist")
    jobs, results = [], {}
    for case, name, layout, how in CASES:
        source = sources[name]
        load_dir = source.dir
        if how in ("dist", "legacy"):
            load_dir = root / case
            convert(source.dir, load_dir, Target(tp=layout["tp"], pp=layout["pp"], vpp=layout.get("vpp")), quiet=True,
                    ckpt_format="torch" if how == "legacy" else "torch_dist")
        results[case] = root / f"{case}.json"
        jobs.append(resume_job(layout, load_dir, source.truth, results[case], model=source.model, steps=STEPS,
                               loader=LOADERS[how]))
    # Bad input on the fly: a .distcp file missing, every rank must say so and stop.
    missing = root / "missing"
    shutil.copytree(sources["dist_tp2pp2"].dir, missing)
    next(missing.glob("iter_*/__1_0.distcp")).unlink()
    results["missing"] = root / "missing.json"
    jobs.append(resume_job({"tp": 1, "pp": 2}, missing, sources["dist_tp2pp2"].truth, results["missing"],
                           model=sources["dist_tp2pp2"].model, steps=STEPS, loader="ckpt_hooks"))
    run_jobs(jobs, root / "logs")
    return {key: (json.loads(path.read_text()),
                  [json.loads(p.read_text()) for p in sorted(root.glob(f"{path.name}.bytes.*.json"))])
            for key, path in results.items()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_resume_is_bitwise_and_continues_the_loss(sources, resumed, case):
    key, name, layout, _ = case
    result, _ = resumed[key]
    assert result["load_error"] is None, result["load_error"]
    assert result["weight_mismatches"] == [] and result["optim_mismatches"] == [], result
    assert result["missing"] == [] and result["extra"] == [], result
    assert result["iteration"] == sources[name].steps
    if name == "dist_tied_bf16_tp2pp2":   # no uninterrupted bf16 run to compare with: trained on
        assert len(result["losses"]) == STEPS
        return
    want = uninterrupted_losses(sources, name, STEPS)
    assert max(abs(a - b) for a, b in zip(result["losses"], want)) <= 1e-5, (result["losses"], want)
    if layout == sources[name].layout:
        assert result["losses"] == want


def test_missing_distcp_is_refused_on_every_rank(resumed):
    result, _ = resumed["missing"]
    lines = result["load_error"].splitlines()
    assert len(lines) == 4 and all("__1_0.distcp: missing" in line for line in lines), result["load_error"]
    assert result["losses"] == []


@pytest.mark.parametrize("key", [c[0] for c in CASES if c[3] == "hook"])
def test_each_rank_reads_only_its_share(sources, resumed, key):
    """Bytes read by each rank <= 1.1 x (its model share + its DP shard of the optimizer state)
    + what every rank reads to find its way: common.pt, the small objects and the records' pickles."""
    name, layout = next((c[1], c[2]) for c in CASES if c[0] == key)
    _, ranks = resumed[key]
    assert len(ranks) == 4
    truth = torch.load(sources[name].truth, weights_only=False)
    model_bytes = sum(t.numel() * t.element_size() for t in truth["tensors"].values())
    optim_bytes = sum(t.numel() * 4 for state in truth["optimizer"].values() for t in state.values())
    mp = layout["tp"] * layout["pp"]
    share = model_bytes / mp + optim_bytes / (mp * (4 // mp))
    checkpoint = DistCheckpoint(next(sources[name].dir.glob("iter_*")))
    data = sum(math.prod(c.sizes) * t.dtype.itemsize for t in checkpoint.tensors.values() for c in t.chunks)
    overhead = sum(path.stat().st_size for path in checkpoint.iter_dir.iterdir() if path.is_file()) - data
    for rank in ranks:
        assert rank["bytes_read"] <= 1.1 * share + overhead, (rank, share, overhead)


def _tensors(path):
    """Every tensor of a torch file, by its path in the pickle."""
    torch_file = TorchFile(path)
    return {key: torch_file.read(t) for key, t in iter_lazy_tensors(torch_file.obj)}


def test_torch_and_torch_dist_round_trip_bitwise(sources, tmp_path):
    """torch -> torch_dist -> torch at the same layout gives back every tensor of every file."""
    source = sources["cont_tp2pp2"]
    convert(source.dir, tmp_path / "dist", quiet=True, ckpt_format="torch_dist")
    convert(tmp_path / "dist", tmp_path / "back", quiet=True, ckpt_format="torch")
    originals = sorted(source.dir.rglob("*.pt"))
    assert originals
    for path in originals:
        back = tmp_path / "back" / path.relative_to(source.dir)
        want, got = _tensors(path), _tensors(back)
        want = {k: v for k, v in want.items() if not k.startswith("rng_state")}  # per rank: not carried
        assert sorted(got) == sorted(want), path
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (path, key)


def test_torch_dist_output_carries_the_run_state(sources, tmp_path):
    source = sources["dist_tp2pp2"]
    convert(source.dir, tmp_path / "same", quiet=True)    # same layout: RNG carried rank by rank
    convert(source.dir, tmp_path / "tp1", Target(tp=1, pp=2), quiet=True)
    saved = DistCheckpoint(next(source.dir.glob("iter_*")))
    same = DistCheckpoint(next((tmp_path / "same").glob("iter_*")))
    tp1 = DistCheckpoint(next((tmp_path / "tp1").glob("iter_*")))
    for out in (same, tp1):
        for key in ("iteration", "opt_param_scheduler", "num_floating_point_operations_so_far", "content_metadata"):
            assert out.common[key] == saved.common[key], key
    rng = [k for k in saved.objects if k.startswith("rng_state")]
    assert rng and all(_same(same.read_object(k), saved.read_object(k)) for k in rng)
    assert not any(k.startswith("rng_state") for k in tp1.objects) and tp1.common["args"].no_save_rng
    assert tp1.common["args"].tensor_model_parallel_size == 1 and tp1.common["args"].ckpt_format == "torch_dist"
    listed = json.loads((tp1.iter_dir / "ckpt_hooks_manifest.json").read_text())
    assert listed["format"] == "megatron-torch_dist"
    assert sorted(listed["files"]) == sorted(p.name for p in tp1.iter_dir.iterdir() if p.name != "ckpt_hooks_manifest.json")
    # A file cut short after the save is named by the manifest before anything else reads it.
    path = tp1.iter_dir / "__1_0.distcp"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"__1_0.distcp: \d+ bytes, ckpt_hooks_manifest.json says"):
        convert(tmp_path / "tp1", tmp_path / "again", quiet=True)


def _same(a, b) -> bool:
    """Equal nested objects, tensors bitwise."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a).__module__ == "numpy":
        return type(a) is type(b) and (a == b).all()
    return a == b


class _Hostile:
    def __reduce__(self):
        return os.system, ("touch /tmp/ckpt-hooks-pwned",)


def _copy_iteration(source, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(source.dir, copy)
    return copy, next(copy.glob("iter_*"))


@pytest.mark.parametrize("damage, says", [
    ("truncate", "__0_0.distcp: '"),
    ("no-metadata", ".metadata: missing"),
    ("foreign-metadata", ".metadata: refused to load"),
    ("buckets", "saved buckets"),
    ("code-in-metadata", ".metadata: refused to load: the pickle needs 'posix.system'"),
    ("path-traversal", "record file '../escape.distcp' is not a file of the checkpoint directory"),
    ("absolute-path", "record file '/etc/passwd' is not a file of the checkpoint directory"),
])
def test_bad_torch_dist_is_refused(sources, tmp_path, damage, says):
    """One-line error naming the file; the source untouched, nothing written."""
    copy, iter_dir = _copy_iteration(sources["dist_tp2pp2"], tmp_path)
    if damage == "truncate":   # the .metadata disagrees with the .distcp file
        path = iter_dir / "__0_0.distcp"
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "no-metadata":
        (iter_dir / ".metadata").unlink()
    elif damage == "foreign-metadata":
        (iter_dir / ".metadata").write_bytes(pickle.dumps(zipfile.ZipInfo("x")))
    elif damage == "code-in-metadata":   # a pickle that would run a command when loaded
        (iter_dir / ".metadata").write_bytes(pickle.dumps(_Hostile()))
    elif damage in ("path-traversal", "absolute-path"):   # a record said to lie outside the directory
        metadata = pickle.loads((iter_dir / ".metadata").read_bytes())
        info = next(iter(metadata.storage_data.values()))
        info.relative_path = "../escape.distcp" if damage == "path-traversal" else "/etc/passwd"
        (iter_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    elif damage == "buckets":   # bucket sizes the model's param_map does not give
        checkpoint = DistCheckpoint(iter_dir)
        key = "optimizer.distributed.dp_group_idx_1.per_bucket_numel_unpadded/shard_0_1"
        record = checkpoint.objects[key]
        value = checkpoint.read_object(key)
        dtype_key = next(iter(value[0][0]))
        value[0][0][dtype_key] = [value[0][0][dtype_key][0] - 64, 64]
        buffer = io.BytesIO()
        torch.save(value, buffer)
        with open(iter_dir / record.relative_path, "ab") as f:
            offset = f.tell()
            f.write(buffer.getvalue())
        metadata = pickle.loads((iter_dir / ".metadata").read_bytes())
        for index, info in metadata.storage_data.items():
            if index.fqn == key:
                info.offset, info.length = offset, len(buffer.getvalue())
        (iter_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    before = sorted((p.name, p.stat().st_size) for p in iter_dir.iterdir())
    with pytest.raises(CheckpointError) as error:
        convert(copy, tmp_path / "out", Target(tp=1, pp=2), quiet=True)
    assert says in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "out").exists()
    assert sorted((p.name, p.stat().st_size) for p in iter_dir.iterdir()) == before


def test_cli_reads_and_writes_torch_dist(sources, tmp_path):
    source = sources["dist_tp2pp2"]
    shown = cli("inspect", source.dir)
    assert shown.returncode == 0, shown.stderr
    assert "Megatron torch_dist, iteration 3" in shown.stdout and "dp_reshardable state" in shown.stdout
    planned = cli("convert", "--load-dir", source.dir, "--save-dir", tmp_path / "plan", "--dry-run",
                  "--target-tensor-parallel-size", 1)
    assert planned.returncode == 0 and "__1_0.distcp (optimizer exp_avg)" in planned.stdout, planned.stderr
    assert not (tmp_path / "plan").exists()
    done = cli("convert", "--load-dir", source.dir, "--save-dir", tmp_path / "legacy", "--quiet",
               "--target-tensor-parallel-size", 1, "--target-ckpt-format", "torch")
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in (tmp_path / "legacy").glob("iter_*/mp_rank_*"))
    assert written == ["mp_rank_00_000", "mp_rank_00_001"]


def test_megatron_to_hf_reads_torch_dist(sources, tmp_path):
    """The same run saved in both formats gives the same Hugging Face files, byte for byte."""
    megatron_to_hf(sources["dist_tp2pp2"].dir, tmp_path / "from_dist", quiet=True)
    megatron_to_hf(sources["cont_tp2pp2"].dir, tmp_path / "from_torch", quiet=True)
    assert tree_digest(tmp_path / "from_dist") == tree_digest(tmp_path / "from_torch")


def test_export_param_map_reads_torch_dist(sources, tmp_path):
    """The param_maps rebuilt for the torch_dist save (checked against its saved bucket sizes)
    are those of the same run's legacy save."""
    for name in ("dist_tp2pp2", "cont_tp2pp2"):
        result = cli("export-param-map", "--load-dir", sources[name].dir, "--save-dir", tmp_path / name)
        assert result.returncode == 0, result.stderr
    assert tree_digest(tmp_path / "dist_tp2pp2") == tree_digest(tmp_path / "cont_tp2pp2") != {}


@pytest.mark.parametrize("name, writer", [("cont_tp2pp2", "ckpt_hooks.formats.megatron_legacy.save_rank_file"),
                                          ("dist_tp2pp2", "ckpt_hooks.formats.torch_dist.write_records")])
def test_a_source_changed_during_the_conversion_is_refused(sources, tmp_path, monkeypatch, name, writer):
    """A source file rewritten while the target files are being written (another job saving over
    it): refused before anything is published, naming the file."""
    copy = tmp_path / "src"
    shutil.copytree(sources[name].dir, copy)
    victim = sorted(p for p in copy.rglob("*") if p.is_file() and p.suffix in (".pt", ".distcp"))[-1]
    module, function = writer.rsplit(".", 1)
    original = getattr(importlib.import_module(module), function)

    def write_then_touch(*args, **kwargs):
        result = original(*args, **kwargs)
        victim.write_bytes(victim.read_bytes())   # same bytes, rewritten: a new modification time
        os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 1_000_000))
        return result

    monkeypatch.setattr(writer, write_then_touch)
    with pytest.raises(CheckpointError, match="changed while it was being converted") as error:
        convert(copy, tmp_path / "out", Target(tp=1, pp=2), quiet=True, workers=1)
    assert str(victim) in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
