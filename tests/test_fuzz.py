"""Every reader fed mutated real files (a smoke run of tools/fuzz_readers.py), and the inputs the
fuzzer found that once broke a reader: each must now be a one-line CheckpointError."""

import io
import json
import pickle
import resource
import shutil
import sys
import tempfile
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ckpt_hooks.algebra.param_map import BufferMap
from ckpt_hooks.algebra.spec import Rank
from ckpt_hooks.engine import manifest as engine_manifest
from ckpt_hooks.engine.source import TensorMeta
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import megatron_legacy, mindspore_ckpt
from ckpt_hooks.formats.mindspore_strategy import read_strategy
from ckpt_hooks.formats.safetensors import SafetensorsFile
from ckpt_hooks.formats.torch_pickle import TorchFile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz_readers  # noqa: E402

ROUNDS = 1000
NEEDS = {"mindspore_ckpt": "mindspore", "mindspore_safetensors": "mindspore", "strategy_protobuf": "mindspore",
         "strategy_json": "mindspore", "hf": "transformers"}


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="ckpt-hooks-fuzz-", dir=fuzz_readers.SCRATCH) as directory:
        yield Path(directory)


@pytest.mark.parametrize("reader", fuzz_readers.READERS)
def test_mutated_files_give_only_one_line_errors(reader, scratch, request):
    """A thousand mutated inputs per reader: no exception but CheckpointError, no input over 5 s,
    no allocation of gigabytes (the address space is capped while they are read)."""
    if reader in NEEDS:
        pytest.importorskip(NEEDS[reader])
    sources = {}
    if reader in fuzz_readers.MEGATRON:   # real Megatron checkpoints, trained once per session
        trained = request.getfixturevalue("sources")
        sources = {name: trained[name].dir for name in ("saved_tp2pp2", "dist_tp2pp2")}
    seeds = fuzz_readers.build_seeds([reader], scratch, sources)
    result = fuzz_readers.fuzz(seeds, ROUNDS, seed=1)
    assert not result.bugs, "\n".join(f"{b.kind}\n{b.trace}" for b in result.bugs.values())


# ---- the inputs that broke a reader ---------------------------------------------------------

@contextmanager
def capped_memory():
    """Reads under a capped address space: a huge allocation fails fast as MemoryError."""
    limits = resource.getrlimit(resource.RLIMIT_AS)
    fuzz_readers.cap_address_space()
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, limits)


def refused(read, *args, says: str) -> None:
    with pytest.raises(CheckpointError, match=says) as error:
        read(*args)
    assert "\n" not in str(error.value)
    assert not any(isinstance(e, MemoryError) for e in (error.value.__context__, error.value.__cause__))


@pytest.mark.parametrize("text", [b"\xb4\x03", "²".encode()])
def test_tracker_file_that_is_not_an_ascii_number(tmp_path, text):
    (tmp_path / megatron_legacy.TRACKER).write_bytes(text)
    refused(megatron_legacy.find_iteration_dir, tmp_path, says="expected an iteration number")


def _torch_file(path: Path, pkl: bytes) -> Path:
    """A torch.save zip holding ``pkl`` as its pickle."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", bytes(16))
    return path


def _pickle(storage_type, size=(4,), offset=0) -> bytes:
    """A tensor's pickle as torch.save writes it, with the given storage type, size and offset."""
    class Storage:
        pass

    class Tensor:
        pass

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", storage_type, "0", "cpu", 4) if isinstance(obj, Storage) else None

        def reducer_override(self, obj):
            if isinstance(obj, Storage):
                return NotImplemented
            if isinstance(obj, Tensor):
                return torch._utils._rebuild_tensor_v2, (Storage(), offset, size, (1,) * len(size), False, {})
            return NotImplemented
    out = io.BytesIO()
    Pickler(out, protocol=2).dump({"t": Tensor()})
    return out.getvalue()


@pytest.mark.parametrize("pkl, says", [
    (_pickle("FloatStorage"), "is not a storage"),                         # a name, not a storage class
    (_pickle(torch.FloatStorage, size=(5,)), "reaches beyond its storage"),  # 5 floats of a 4-float storage
    (_pickle(torch.FloatStorage, offset=-1), "a malformed tensor"),
    (b"\x80\x05\x96" + (1 << 40).to_bytes(8, "little") + b".", "a bytearray of 1099511627776 bytes"),   # a 1 TiB bytearray
], ids=["storage name", "beyond storage", "negative offset", "bytearray8"])
def test_torch_file_pickle(tmp_path, pkl, says):
    with capped_memory():
        refused(TorchFile, _torch_file(tmp_path / "model_optim_rng.pt", pkl), says=says)


def test_torch_file_pickle_memoizing_at_a_huge_index(tmp_path):
    """LONG_BINPUT 2**31 - 16: the C unpickler would grow its memo to 32 GiB and write it."""
    with capped_memory():
        assert TorchFile(_torch_file(tmp_path / "model_optim_rng.pt", b"\x80\x02}r\xf0\xff\xff\x7f.")).obj == {}


def _safetensors(path: Path, header) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(16))
    return path


@pytest.mark.parametrize("header, says", [
    ({"w": {"dtype": "F32", "shape": [float("inf")], "data_offsets": [0, 16]}}, "must be lists of integers"),
    ({"w": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, "must be lists of integers"),
    ({"__metadata__": 7, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "__metadata__"),
])
def test_safetensors_header(tmp_path, header, says):
    refused(SafetensorsFile, _safetensors(tmp_path / "model.safetensors", header), says=says)


@pytest.mark.parametrize("shard", [7, "model\u0000.safetensors", "../model.safetensors"])
def test_hf_index_naming_no_file_of_the_directory(tmp_path, shard):
    from ckpt_hooks.converters.hf.files import INDEX, open_directory

    _safetensors(tmp_path / "model.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"w": shard}}))
    refused(open_directory, tmp_path, says="which is not a file of")


def _json_strategy(path: Path, **item) -> Path:
    layout = {"dev_matrix": [2], "tensor_map": [0, -1], "field": 0, "opt_weight_shard_size": 0,
              "opt_weight_shard_step": 0, **item}
    stage = layout.pop("stage", 0)
    path.write_text(json.dumps({"parallel_strategy_item": {"MatMul-op0": {"stage": stage}},
                                "parallel_layout_item": {"w": layout}}))
    return path


@pytest.mark.parametrize("item", [{"dev_matrix": 2}, {"dev_matrix": [float("inf")]}, {"tensor_map": 0},
                                  {"tensor_map": [{"a": 1}, -1]}, {"tensor_map": [None, -1]}, {"stage": [0]},
                                  {"stage": "0"}, {"field": "0"}, {"opt_weight_shard_size": [2]}])
def test_json_strategy_value_of_another_type(tmp_path, item):
    refused(read_strategy, _json_strategy(tmp_path / "strategy.json", **item), says="not an integer|not a list")


def test_strategy_of_a_stage_past_every_other_one(tmp_path):
    """Stages 0 and 2**63: the missing stage 1 is named without counting up to 2**63."""
    directory = tmp_path / "stages"
    directory.mkdir()
    _json_strategy(directory / "a.json")
    _json_strategy(directory / "b.json", stage=2**63)
    refused(read_strategy, directory, says="no layouts for pipeline stage 1")


def _manifest(path: Path, framework: str, **tensor) -> Path:
    entry = {"logical": "w", "shape": [4], "dtype": "Float32", "role": "model", "global_shape": [4],
             "offsets": [0], **tensor}
    layout = {"tp": 1, "pp": 1} if framework == "megatron" else {"rank": 0, "world_size": 1}
    path.write_text(json.dumps({"manifest_version": 2, "framework": framework, "format": "ckpt", "layout": layout,
                                "files": {"w.ckpt": {"bytes": 1, "tensors": {"w": entry}}}}))
    return path


@pytest.mark.parametrize("tensor", [{"shape": 4}, {"shape": [True]}, {"offsets": [[0]]}, {"global_shape": "4"},
                                    {"dtype": None}, {"box_shape": [-1]}])
def test_manifest_value_of_another_type(tmp_path, tensor):
    refused(engine_manifest.read, _manifest(tmp_path / "m.json", "megatron", **tensor), "megatron",
            says="unreadable manifest")


def test_manifest_crc32_of_another_type(tmp_path):
    path = _manifest(tmp_path / "m.json", "megatron")
    described = json.loads(path.read_text())
    described["files"]["w.ckpt"]["crc32"] = [1]
    path.write_text(json.dumps(described))
    refused(engine_manifest.read, path, "megatron", says="unreadable manifest")


@pytest.mark.parametrize("tensor", [{"global_shape": None}, {"offsets": [1]}, {"global_shape": [4, 1]}])
def test_mindspore_manifest_placing_a_tensor_outside_its_global_shape(tmp_path, tensor):
    from ckpt_hooks.mindspore import manifest

    path = tmp_path / "w.ckpt"
    mindspore_ckpt.save(path, {"w": torch.zeros(4).numpy()})
    described = json.loads(_manifest(manifest.manifest_path(path), "mindspore", **tensor).read_text())
    described["files"]["w.ckpt"]["bytes"] = path.stat().st_size
    manifest.write(described, path)
    refused(manifest.check, manifest.read(path), mindspore_ckpt.CkptFile(path), says="do not place")


def _buffer(**changes) -> dict:
    buffer = {"chunk": 0, "param_dtype": "float32", "grad_dtype": "float32", "dp_size": 1, "expert": False,
              "bucket_indices": [[0, 128]], "per_bucket_numel_unpadded": [80],
              "params": [["b.weight", [4, 4], 64, 80, 0], ["a.weight", [4, 4], 0, 16, 0]]}
    return {**buffer, **changes}


@pytest.mark.parametrize("changes", [
    {"params": [["a.weight", [4, 4], 0, 16, 1]]},        # bucket 1 of one bucket
    {"params": [["a.weight", [4, 4], 0, 17, 0]]},        # 17 elements for 16
    {"params": [["a.weight", [4, 4], 100, 116, 0]]},     # past the bucket's unpadded part
    {"params": [[True, [4, 4], 0, 16, 0]]},
    {"bucket_indices": [[0, 64]]}, {"per_bucket_numel_unpadded": [80, 0]}, {"dp_size": 0}, {"chunk": "0"},
])
def test_recorded_param_map_that_is_no_buffer(tmp_path, changes):
    from ckpt_hooks.megatron.optimizer import read_recorded_maps

    (tmp_path / megatron_legacy.RECORDED_MAP).write_text(json.dumps([_buffer(**changes)]))
    refused(read_recorded_maps, tmp_path, 1, says="unreadable recorded param_map")


def test_recorded_param_map_of_another_model(tmp_path):
    from ckpt_hooks.megatron.checkpoint import SourceFile
    from ckpt_hooks.megatron.optimizer import check_slot, read_recorded_maps

    (tmp_path / megatron_legacy.RECORDED_MAP).write_text(json.dumps([_buffer(chunk=1)]))
    refused(read_recorded_maps, tmp_path, 1, says="model chunk 1; the model has 1")
    (buffer,) = [BufferMap.from_json(_buffer())]
    f = SourceFile(str(tmp_path / "model_optim_rng.pt"), Rank(), {"model": {"a.weight": TensorMeta((4, 4), torch.float32),
                                                                          "b.weight": TensorMeta((4, 2), torch.float32)}})
    check_slot(buffer.params[1], f, "model", tmp_path)
    refused(check_slot, buffer.params[0], f, "model", tmp_path, says="does not hold")


@pytest.mark.parametrize("change", ["not_args", "no_num_layers", "first_stage_str", "pp_tuple", "vpp_tuple",
                                    "class_value", "key_bytes", "key_int"])
def test_legacy_args_and_keys_of_another_type(sources, tmp_path, change):
    """Saved args that are no Namespace, lack a size, or hold sizes of another type, and model keys
    that are no names (found by the legacy fuzzer): one-line errors naming the file."""
    from ckpt_hooks.megatron.conversion import plan_megatron

    copy = tmp_path / "ckpt"
    shutil.copytree(sources["cont_tp2pp2"].dir, copy)
    path = sorted(copy.glob("iter_*/mp_rank_*/model_optim_rng.pt"))[0]
    state = torch.load(path, weights_only=False)   # the test's own checkpoint
    args = state["args"]
    if change == "not_args":
        state["args"] = OrderedDict(vars(args))
    elif change == "no_num_layers":
        del args.num_layers
    elif change == "first_stage_str":
        args.decoder_first_pipeline_num_layers = "2"
    elif change in ("pp_tuple", "vpp_tuple"):
        setattr(args, "pipeline_model_parallel_size" if change == "pp_tuple" else
                "virtual_pipeline_model_parallel_size", (2,))
    elif change == "class_value":
        args.hidden_size = int
    else:
        key = next(iter(state["model"]))
        state["model"][key.encode() if change == "key_bytes" else 7] = state["model"].pop(key)
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        plan_megatron(copy)
    assert "\n" not in str(error.value) and str(error.value).startswith(str(copy)), error.value
