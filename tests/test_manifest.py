"""The manifest schema (ckpt_hooks.engine.manifest): version 1 manifests, as earlier releases
wrote them for each framework, read in the version 2 form; unreadable ones refused in one line."""

import json

import pytest

from ckpt_hooks.engine import manifest
from ckpt_hooks.errors import CheckpointError

MEGATRON_V1 = {
    "manifest_version": 1, "format": "megatron-legacy", "iteration": 3,
    "model": {"num_layers": 4, "hidden_size": 64}, "layout": {"tp": 2, "pp": 1, "vpp": 1, "dp": 1},
    "files": {"latest_checkpointed_iteration.txt": {"bytes": 1},
              "mp_rank_01/model_optim_rng.pt": {"bytes": 9000, "tensors": {"model": {
                  "decoder.layers.0.mlp.linear_fc2.weight": {"shape": [64, 64], "dtype": "float32",
                                                             "logical": "decoder.layers.0.mlp.linear_fc2.weight",
                                                             "offsets": [0, 64], "logical_shape": [64, 128]},
                  "decoder.layers.0.self_attention.core_attention._extra_state": None}}},
              "mp_rank_01/distrib_optim.pt": {"bytes": 7000}}}

MINDSPORE_V1 = {
    "manifest_version": 1, "framework": "mindspore", "format": "ckpt", "file": "CKP-1_4.ckpt", "bytes": 6583,
    "step": 4, "epoch": 1, "layout": {"rank": 1, "world_size": 2, "parallel_mode": "data_parallel"},
    "tensors": {"fc1.weight": {"shape": [16, 8], "dtype": "Float32", "role": "model", "global_shape": [16, 8],
                               "offsets": [0, 0]},
                "beta1_power": {"shape": [1], "dtype": "Float32", "role": "optimizer", "global_shape": [1],
                                "offsets": [0]}}}


def _read(tmp_path, described, framework):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(described))
    return manifest.read(path, framework)


def test_megatron_version_1_reads_as_version_2(tmp_path):
    assert _read(tmp_path, MEGATRON_V1, "megatron") == {
        "manifest_version": 2, "framework": "megatron", "format": "megatron-legacy", "iteration": 3,
        "model": {"num_layers": 4, "hidden_size": 64}, "layout": {"tp": 2, "pp": 1, "vpp": 1, "dp": 1},
        "files": {"latest_checkpointed_iteration.txt": {"bytes": 1},
                  "mp_rank_01/model_optim_rng.pt": {"bytes": 9000, "tensors": {
                      "model.decoder.layers.0.mlp.linear_fc2.weight": {
                          "logical": "decoder.layers.0.mlp.linear_fc2.weight", "shape": [64, 64], "dtype": "float32",
                          "role": "model", "global_shape": [64, 128], "offsets": [0, 64]},
                      "model.decoder.layers.0.self_attention.core_attention._extra_state": None}},
                  "mp_rank_01/distrib_optim.pt": {"bytes": 7000}}}


def test_mindspore_version_1_reads_as_version_2(tmp_path):
    assert _read(tmp_path, MINDSPORE_V1, "mindspore") == {
        "manifest_version": 2, "framework": "mindspore", "format": "ckpt", "step": 4, "epoch": 1,
        "layout": {"rank": 1, "world_size": 2, "parallel_mode": "data_parallel"},
        "files": {"CKP-1_4.ckpt": {"bytes": 6583, "tensors": {
            "fc1.weight": {"logical": "fc1.weight", "shape": [16, 8], "dtype": "Float32", "role": "model",
                           "global_shape": [16, 8], "offsets": [0, 0]},
            "beta1_power": {"logical": "beta1_power", "shape": [1], "dtype": "Float32", "role": "optimizer",
                            "global_shape": [1], "offsets": [0]}}}}}


def test_version_2_reads_as_written(tmp_path):
    described = manifest.build("mindspore", "ckpt", step=4, epoch=1, layout={"rank": 0, "world_size": 1},
                               files={"a.ckpt": {"bytes": 10, "tensors": {"w": manifest.tensor_entry(
                                   "w", [2], "Float32", manifest.MODEL, [4], [2])}}})
    manifest.write(described, tmp_path / "a.ckpt.manifest.json")
    assert manifest.read(tmp_path / "a.ckpt.manifest.json", "mindspore") == described
    assert manifest.read(tmp_path / "absent.json", "mindspore") is None


@pytest.mark.parametrize("described, framework, says", [
    ("{not json", "megatron", "unreadable manifest (JSONDecodeError"),
    ({**MINDSPORE_V1, "manifest_version": 3}, "mindspore", "unsupported manifest (version 3, framework 'mindspore')"),
    (MINDSPORE_V1, "megatron", "unsupported manifest (version 1, framework 'mindspore')"),
    ({**MINDSPORE_V1, "tensors": {"w": {"shape": [1]}}}, "mindspore", "unreadable manifest (each file needs bytes"),
    ({**MINDSPORE_V1, "layout": {"rank": 0}}, "mindspore", "the layout ['rank', 'world_size'])"),
    ({k: v for k, v in MEGATRON_V1.items() if k != "files"}, "megatron", "unreadable manifest (KeyError: 'files')"),
])
def test_unreadable_manifest_is_refused_in_one_line(tmp_path, described, framework, says):
    path = tmp_path / "manifest.json"
    path.write_text(described if isinstance(described, str) else json.dumps(described))
    with pytest.raises(CheckpointError) as error:
        manifest.read(path, framework)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and says in message, message


def test_first_tensor_that_differs_is_named(tmp_path):
    listed = {"a": {"shape": [2], "dtype": "float32"}, "b": {"shape": [3], "dtype": "float32"}, "c": None}
    with pytest.raises(CheckpointError, match=r"^f: disagrees: b is float32\[4\], the manifest says float32\[3\]$"):
        manifest.check_tensors("f", listed, {"a": ((2,), "float32"), "b": ((4,), "float32"), "c": None, "d": None},
                               "disagrees: ")
    with pytest.raises(CheckpointError, match=r"^f: disagrees: d is absent, the manifest says not a tensor$"):
        manifest.check_tensors("f", {**listed, "d": None}, {"a": ((2,), "float32"), "b": ((3,), "float32"),
                                                             "c": None}, "disagrees: ")
