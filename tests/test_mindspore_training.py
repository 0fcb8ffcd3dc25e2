"""ckpt_hooks.mindspore against real MindSpore training on the CPU: CheckpointManifest describes
what ModelCheckpoint writes, and load resumes a stand-alone checkpoint in a 2-worker data-parallel
run (msrun, mccl) and a data-parallel checkpoint stand-alone, with weights and Adam state bitwise
as saved and the loss curve of the uninterrupted run; bad input is refused in one line before
any parameter changes."""

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.harness import free_port
from tests.util import cli

ms = pytest.importorskip("mindspore")

from ckpt_hooks.errors import CheckpointError  # noqa: E402
from ckpt_hooks.formats.mindspore_ckpt import CkptFile  # noqa: E402
from ckpt_hooks.mindspore import manifest  # noqa: E402
from ckpt_hooks.mindspore.callback import CheckpointManifest  # noqa: E402
from ckpt_hooks.mindspore.files import open_checkpoint  # noqa: E402
from ckpt_hooks.mindspore import transform  # noqa: E402
from ckpt_hooks.mindspore.load import load  # noqa: E402
from ckpt_hooks.mindspore.verify import check  # noqa: E402
from tests.harness.mindspore_run import STEPS, dataset, network_and_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "harness" / "mindspore_run.py"
SAVED = f"CKP-1_{STEPS}.ckpt"  # what ModelCheckpoint keeps of the first epoch (keep_checkpoint_max=1)
MODEL = {f"fc{i}.{kind}" for i in (1, 2, 3) for kind in ("weight", "bias")}
ADAM_STATE = {f"{m}.{name}" for m in ("moment1", "moment2") for name in MODEL} | \
    {"beta1_power", "beta2_power", "global_step", "learning_rate"}


def _launch(root: Path, name: str, jobs: list, workers: int = 1) -> None:
    """One process (or one msrun of ``workers``) running ``jobs`` one after the other."""
    jobs_file = root / f"{name}.json"
    jobs_file.write_text(json.dumps(jobs))
    command = [sys.executable, str(HARNESS), str(jobs_file)]
    env = {**os.environ, "GLOG_v": "3"}  # MindSpore's errors only
    logs = root / f"{name}_logs"
    if workers > 1:
        bin_dir = Path(sys.executable).parent
        command = [str(bin_dir / "msrun"), f"--worker_num={workers}", f"--local_worker_num={workers}",
                   f"--master_port={free_port()}", "--join=True", f"--log_dir={logs}", *command[1:], "--data-parallel"]
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"  # msrun starts its workers as `python`
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    worker_logs = "".join(p.read_text() for p in sorted(logs.glob("worker_*.log"))) if logs.exists() else ""
    assert result.returncode == 0, (result.stdout + result.stderr + worker_logs)[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Three launches: stand-alone 2 epochs uninterrupted and 1 epoch saved; data-parallel resumed
    from that for epoch 2, and 1 epoch saved; stand-alone resumed from that for epoch 2."""
    root = tmp_path_factory.mktemp("mindspore_training")

    def job(out, epochs, resume=None, save_dir=None):
        return {"epochs": epochs, "resume": resume and str(root / resume),
                "save_dir": save_dir and str(root / save_dir), "out": str(root / out)}

    _launch(root, "first", [job("uninterrupted", 2), job("stand_alone", 1, save_dir="stand_alone_ckpt")])
    _launch(root, "dp", [job("resumed_dp", 2, resume="stand_alone_ckpt"), job("dp", 1, save_dir="dp_ckpt")], workers=2)
    _launch(root, "last", [job("resumed_stand_alone", 2, resume="dp_ckpt")])
    return root


def _result(root: Path, run: str, rank: int = 0) -> dict:
    return json.loads((root / run / f"rank_{rank}.json").read_text())


def _assert_bitwise(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
        assert ours[name].asnumpy().tobytes() == value.asnumpy().tobytes(), name


def _tensor_bytes(checkpoint: dict) -> int:
    return sum(value.asnumpy().nbytes for value in checkpoint.values())


def _assert_continues(resumed: list, uninterrupted: list) -> None:
    assert len(resumed) == STEPS
    assert np.max(np.abs(np.array(resumed) - uninterrupted[STEPS:])) <= 1e-5, (resumed, uninterrupted)


def test_stand_alone_checkpoint_resumes_in_data_parallel(runs):
    saved = ms.load_checkpoint(str(runs / "stand_alone_ckpt" / SAVED))
    uninterrupted = _result(runs, "uninterrupted")["losses"]
    assert _result(runs, "stand_alone")["losses"] == uninterrupted[:STEPS]
    for rank in (0, 1):
        _assert_bitwise(ms.load_checkpoint(str(runs / "resumed_dp" / f"restored_rank_{rank}.ckpt")), saved)
        loaded = _result(runs, "resumed_dp", rank)["loaded"]
        assert loaded == {"step": STEPS, "epoch": 1, "source_layout": {"world_size": 1, "parallel_mode": "stand_alone"},
                          "target_layout": {"rank": rank, "world_size": 2, "parallel_mode": "data_parallel"},
                          "resharded": [], "bytes_read": _tensor_bytes(saved), "loaded": len(saved), "skipped": []}
    # Each rank's loss is the mean over its half of the global batch.
    both = [_result(runs, "resumed_dp", rank)["losses"] for rank in (0, 1)]
    _assert_continues(list(np.mean(both, axis=0)), uninterrupted)


def test_data_parallel_checkpoint_resumes_stand_alone(runs):
    replicas = [ms.load_checkpoint(str(runs / "dp_ckpt" / f"rank_{rank}" / SAVED)) for rank in (0, 1)]
    _assert_bitwise(replicas[1], replicas[0])
    _assert_bitwise(ms.load_checkpoint(str(runs / "resumed_stand_alone" / "restored_rank_0.ckpt")), replicas[0])
    result = _result(runs, "resumed_stand_alone")
    assert result["loaded"]["source_layout"] == {"world_size": 2, "parallel_mode": "data_parallel"}
    assert result["loaded"]["bytes_read"] == _tensor_bytes(replicas[0])  # one replica read, not both
    _assert_continues(result["losses"], _result(runs, "uninterrupted")["losses"])


@pytest.mark.parametrize("saved_dir, rank, world", [("stand_alone_ckpt", 0, 1), ("dp_ckpt/rank_0", 0, 2),
                                                    ("dp_ckpt/rank_1", 1, 2)])
def test_manifest_describes_the_checkpoint(runs, saved_dir, rank, world):
    directory = runs / saved_dir
    # keep_checkpoint_max=1 removed the step-2 checkpoint, and its manifest went with it.
    assert sorted(p.name for p in directory.iterdir()) == sorted(["CKP-graph.meta", SAVED, f"{SAVED}.manifest.json"])
    described = json.loads((directory / f"{SAVED}.manifest.json").read_text())
    mode = "stand_alone" if world == 1 else "data_parallel"
    assert {k: v for k, v in described.items() if k != "files"} == {
        "manifest_version": 2, "framework": "mindspore", "format": "ckpt", "step": STEPS, "epoch": 1,
        "layout": {"rank": rank, "world_size": world, "parallel_mode": mode}}
    assert list(described["files"]) == [SAVED]
    (listed,) = described["files"].values()
    assert listed.keys() == {"bytes", "tensors", "crc32"} and listed["bytes"] == (directory / SAVED).stat().st_size
    saved = ms.load_checkpoint(str(directory / SAVED))
    assert list(listed["tensors"]) == list(saved)
    # every tensor's CRC-32, as zlib computes it from the values MindSpore loads
    assert listed["crc32"] == {name: zlib.crc32(value.asnumpy().tobytes()) for name, value in saved.items()}
    for name, entry in listed["tensors"].items():
        shape, role = list(saved[name].shape), "model" if name in MODEL else "optimizer"
        assert entry == {"logical": name, "shape": shape, "dtype": str(saved[name].dtype), "role": role,
                         "global_shape": shape, "offsets": [0] * len(shape)}
    assert set(listed["tensors"]) == MODEL | ADAM_STATE


def test_manifest_callback_must_follow_model_checkpoint(tmp_path):
    net, opt = network_and_optimizer()
    checkpoint = ms.train.ModelCheckpoint(directory=str(tmp_path))
    model = ms.train.Model(net, loss_fn=ms.nn.MSELoss(), optimizer=opt)
    with pytest.raises(ValueError, match="must follow the ModelCheckpoint"):
        model.train(1, dataset(0, 1), callbacks=[CheckpointManifest(), checkpoint], dataset_sink_mode=False)


def _parameter_bytes(net, opt) -> dict:
    return {p.name: p.asnumpy().tobytes() for cell in (net, opt) for p in cell.get_parameters()}


def test_rank_directories_without_manifests_are_taken_as_replicas(runs, tmp_path):
    copy = shutil.copytree(runs / "dp_ckpt", tmp_path / "dp_ckpt")
    for described in copy.rglob("*.manifest.json"):
        described.unlink()
    net, opt = network_and_optimizer()
    loaded = load(net, copy, optimizer=opt, rank=1)
    saved = ms.load_checkpoint(str(copy / "rank_1" / SAVED))
    assert _parameter_bytes(net, opt) == {name: value.asnumpy().tobytes() for name, value in saved.items()}
    assert (loaded.step, loaded.epoch, loaded.source_layout) == (None, None, {"world_size": 2, "parallel_mode": None})


@pytest.mark.parametrize("file_format", ["ckpt", "safetensors"])
def test_one_file_without_manifest_bfloat16(tmp_path, file_format):
    """A complete file saved by mindspore.save_checkpoint alone; bfloat16 restored bit for bit."""
    values = np.random.default_rng(1).standard_normal((2, 3, 5)).astype(np.float32)

    def cell(w, b):
        holder = ms.nn.Cell()
        holder.w = ms.Parameter(ms.Tensor(w, ms.bfloat16), name="w")
        holder.b = ms.Parameter(ms.Tensor(b), name="b")
        return holder

    saved, path = cell(*values), tmp_path / f"net.{file_format}"
    ms.save_checkpoint(saved, str(path), format=file_format)
    target = cell(*np.zeros_like(values))
    loaded = load(target, path)
    assert (loaded.loaded, loaded.bytes_read, loaded.step) == (2, 15 * 2 + 15 * 4, None)
    assert {p.name: p.asnumpy().tobytes() for p in target.get_parameters()} == \
        {p.name: p.asnumpy().tobytes() for p in saved.get_parameters()}


def test_parallel_layouts_are_recorded_and_saved_slices_refused(runs, tmp_path):
    """Semi-auto parallel cannot run on the CPU: a manifest as the callback writes it there, from
    parameter_layout_dict entries (dev_matrix, tensor_map, slice_shape, field_size, uniform_split,
    opt_shard_group, ...). fc1.weight split in 2 by rows and saved unmerged (the file holds
    [16, 8]: the slice), fc2.weight split but merged by integrated_save (the file holds more)."""
    path = Path(shutil.copy(runs / "stand_alone_ckpt" / SAVED, tmp_path / SAVED))
    layouts = {"fc1.weight": manifest.parallel_layout([[2, 1], [1, -1], [16, 8], 0, True, "", [], [], 7]),
               "fc2.weight": manifest.parallel_layout([[2, 1], [-1, 1], [16, 8], 0, True, "", [], []])}
    described = manifest.build(open_checkpoint(path), layout={"rank": 0, "world_size": 2,
                               "parallel_mode": "semi_auto_parallel"}, step=4, epoch=1, roles={},
                               parallel_layouts=layouts)
    fc1, fc2 = (described["files"][SAVED]["tensors"][name] for name in ("fc1.weight", "fc2.weight"))
    assert fc1["parallel_layout"] == {"dev_matrix": [2, 1], "tensor_map": [1, -1], "slice_shape": [16, 8],
                                      "field_size": 0, "uniform_split": True, "opt_shard_group": "",
                                      "before_reshape_full_shape": [], "after_reshape_slice_shape": [], "more": [7]}
    assert (fc1["offsets"], fc1["global_shape"]) == (None, None)
    assert (fc2["offsets"], fc2["global_shape"]) == ([0, 0], [16, 16])
    manifest.write(described, path)
    net, opt = network_and_optimizer()
    with pytest.raises(CheckpointError, match=f"^{path}: fc1.weight is this rank's slice of a parallel layout"):
        load(net, path, optimizer=opt)


def test_version_1_manifest_still_reads(runs, tmp_path):
    """A manifest as releases before manifest_version 2 wrote it (its one file in the header) is
    read, and its file checked against it."""
    copy = shutil.copytree(runs / "stand_alone_ckpt", tmp_path / "stand_alone_ckpt")
    path = copy / f"{SAVED}.manifest.json"
    described = json.loads(path.read_text())
    (name, listed), = described["files"].items()
    old = {"manifest_version": 1, "framework": "mindspore", "format": "ckpt", "file": name, "bytes": listed["bytes"],
           "step": described["step"], "epoch": described["epoch"], "layout": described["layout"],
           "tensors": {key: {k: v for k, v in t.items() if k != "logical"} for key, t in listed["tensors"].items()}}
    path.write_text(json.dumps(old))
    net, opt = network_and_optimizer()
    loaded = load(net, copy, optimizer=opt)
    assert (loaded.step, loaded.epoch, loaded.source_layout) == (STEPS, 1, {"world_size": 1,
                                                                            "parallel_mode": "stand_alone"})
    assert _parameter_bytes(net, opt) == {n: v.asnumpy().tobytes()
                                          for n, v in ms.load_checkpoint(str(copy / SAVED)).items()}
    _tamper(path, lambda m: m.update(bytes=m["bytes"] + 4))
    with pytest.raises(CheckpointError) as error:
        load(net, copy, optimizer=opt)
    assert str(error.value).startswith(f"{copy / SAVED}: ") and f"bytes, its manifest {SAVED}.manifest.json says" \
        in str(error.value)


def _tamper(path: Path, change) -> None:
    described = json.loads(path.read_text())
    change(described)
    path.write_text(json.dumps(described))


def _missing_rank(copy):
    shutil.rmtree(copy / "dp_ckpt" / "rank_1")
    return copy / "dp_ckpt", copy / "dp_ckpt" / "rank_1"


def _wrong_bytes(copy):
    _tamper(copy / "stand_alone_ckpt" / f"{SAVED}.manifest.json",
            lambda m: m["files"][SAVED].update(bytes=m["files"][SAVED]["bytes"] + 4))
    return copy / "stand_alone_ckpt", copy / "stand_alone_ckpt" / SAVED


def _wrong_shape(copy):
    _tamper(copy / "dp_ckpt" / "rank_1" / f"{SAVED}.manifest.json",
            lambda m: m["files"][SAVED]["tensors"]["fc1.weight"].update(shape=[8, 16]))
    return copy / "dp_ckpt", copy / "dp_ckpt" / "rank_1" / SAVED


def _flipped_byte(copy):
    """One bit inside fc2.weight's bytes, in place: only its CRC-32 can tell."""
    path = copy / "stand_alone_ckpt" / SAVED
    data = bytearray(path.read_bytes())
    data[CkptFile(path).tensors["fc2.weight"].pieces[0][0] + 37] ^= 0x10
    path.write_bytes(bytes(data))
    return copy / "stand_alone_ckpt", path


@pytest.mark.parametrize("damage, network, says", [
    (_missing_rank, {}, "missing, but the manifest of"),
    (_flipped_byte, {}, "fc2.weight: CRC-32"),
    (_wrong_bytes, {}, "bytes, its manifest CKP-1_4.ckpt.manifest.json says"),
    (_wrong_shape, {}, "disagrees with its manifest CKP-1_4.ckpt.manifest.json: fc1.weight is Float32[16, 8], "
                       "the manifest says Float32[8, 16]"),
    (None, {"hidden": 32}, "a checkpoint of a different network: fc1.weight is Float32[16, 8] "
                           "(running Float32[32, 8])"),
    (None, {"depth": 4}, "fc4.weight is not in the checkpoint"),
    (None, {"depth": 2}, "fc3.weight is not in the network"),
])
def test_bad_input_is_refused_before_any_change(runs, tmp_path, damage, network, says):
    if damage:
        for saved in ("stand_alone_ckpt", "dp_ckpt"):
            shutil.copytree(runs / saved, tmp_path / saved)
        ckpt, named = damage(tmp_path)
    else:
        ckpt, named = runs / "stand_alone_ckpt", runs / "stand_alone_ckpt" / SAVED
    net, opt = network_and_optimizer(**network)
    before = _parameter_bytes(net, opt)
    with pytest.raises(CheckpointError) as error:
        load(net, ckpt, optimizer=opt)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{named}: ") and says in message, message
    assert _parameter_bytes(net, opt) == before


def test_a_flipped_byte_is_found_by_verify_and_the_transform(runs, tmp_path):
    """The callback's CRC-32s: `verify CKPT` alone checks the training run's files, and names the
    file and the tensor of a flipped byte, as the transform does (load: above)."""
    integrity = check(runs / "dp_ckpt")
    assert (integrity.files, integrity.checked, integrity.unchecked) == (2, 2 * len(MODEL | ADAM_STATE), 0)
    for saved in ("stand_alone_ckpt", "dp_ckpt"):
        shutil.copytree(runs / saved, tmp_path / saved)
    ckpt, path = _flipped_byte(tmp_path)
    result = cli("verify", ckpt, "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}: fc2.weight: CRC-32"), \
        result.stderr
    with pytest.raises(CheckpointError, match=f"^{path}: fc2.weight: CRC-32 .* its bytes changed"):
        transform.transform_checkpoints(ckpt, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
