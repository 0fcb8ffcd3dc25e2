"""The manifest of a MindSpore checkpoint file, in the schema of ``engine.manifest``: one JSON
beside the file saying what it holds and at which layout it was saved, so that a loader at
another layout needs no strategy file or flags.

    rank_0/CKP-1_4.ckpt
    rank_0/CKP-1_4.ckpt.manifest.json
    {"manifest_version": 2, "framework": "mindspore", "format": "ckpt", "step": 4, "epoch": 1,
     "layout": {"rank": 0, "world_size": 2, "parallel_mode": "data_parallel"},
     "files": {"CKP-1_4.ckpt": {"bytes": 6583, "tensors": {
         "fc1.weight": {"logical": "fc1.weight", "shape": [16, 8], "dtype": "Float32", "role": "model",
                        "global_shape": [16, 8], "offsets": [0, 0]},
         "moment1.fc1.weight": {..., "role": "optimizer"}, ...}}}}

The role "optimizer" covers the moments, ``beta1_power``, ``global_step``, ``learning_rate``, a
loss scale. Where the running network had a parallel layout for a parameter (semi/auto parallel), the
manifest records it as ``parallel_layout``; a file holding only this rank's slice then has
``offsets`` and ``global_shape`` null: the slice's place follows from that layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from ckpt_hooks.engine import manifest
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.mindspore_ckpt import DTYPES, MappedFile, dtype_index

SUFFIX = ".manifest.json"
FRAMEWORK = "mindspore"
# The entries of a `parameter_layout_dict` value, as serialization._get_merged_param_data reads them.
LAYOUT_FIELDS = ("dev_matrix", "tensor_map", "slice_shape", "field_size", "uniform_split", "opt_shard_group",
                 "before_reshape_full_shape", "after_reshape_slice_shape")


def manifest_path(ckpt_path) -> Path:
    return Path(f"{ckpt_path}{SUFFIX}")


def running_layout() -> dict:
    """This process's place in its job, as a manifest records it (imports mindspore)."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank

    mode = ms.get_auto_parallel_context("parallel_mode")
    if mode == "stand_alone":
        return {"rank": 0, "world_size": 1, "parallel_mode": mode}
    return {"rank": get_rank(), "world_size": get_group_size(), "parallel_mode": mode}


def parallel_layout(entry) -> dict:
    """A `parameter_layout_dict` value, its known entries named, any others kept as "more"."""
    entry = json.loads(json.dumps(list(entry)))
    named = dict(zip(LAYOUT_FIELDS, entry))
    return {**named, "more": entry[len(LAYOUT_FIELDS):]} if len(entry) > len(LAYOUT_FIELDS) else named


def _holds_slice(shape: list, layout: dict | None) -> bool:
    """Whether the file holds only this rank's slice: the parameter is split (model parallel or
    optimizer shard) and was saved unmerged (``integrated_save=False``)."""
    if layout is None:
        return False
    split = any(d != -1 for d in layout["tensor_map"]) or bool(layout["opt_shard_group"])
    return split and shape == list(layout["slice_shape"])


def dtype_name(array_dtype, path, name: str) -> str:
    """MindSpore's name of a NumPy dtype read from a checkpoint ("Float32", "BFloat16", ...)."""
    return DTYPES[dtype_index(array_dtype, path, name)][0]


def build(ckpt: MappedFile, *, layout: dict, step: int, epoch: int, roles: dict[str, str],
          parallel_layouts: dict[str, dict]) -> dict:
    """The manifest of the complete checkpoint file ``ckpt``: its tensors as the file lists them."""
    tensors = {}
    for name, stored in ckpt.tensors.items():
        shape = list(stored.shape)
        whole = not _holds_slice(shape, parallel_layouts.get(name))
        more = {"parallel_layout": parallel_layouts[name]} if name in parallel_layouts else {}
        tensors[name] = manifest.tensor_entry(name, shape, dtype_name(stored.dtype, ckpt.path, name),
                                              roles.get(name, manifest.MODEL), shape if whole else None,
                                              [0] * len(shape) if whole else None, **more)
    path = Path(ckpt.path)
    return manifest.build(FRAMEWORK, path.suffix[1:], step=step, epoch=epoch, layout=layout,
                          files={path.name: manifest.file_entry(path, tensors)})


def write(described: dict, ckpt_path) -> Path:
    return manifest.write(described, manifest_path(ckpt_path))


def read(ckpt_path) -> dict | None:
    """The manifest beside a checkpoint file, None if it was saved without one."""
    return manifest.read(manifest_path(ckpt_path), FRAMEWORK)


def tensors(described: dict) -> dict:
    """The tensor entries of the one file a checked manifest describes."""
    (entry,) = described["files"].values()
    return entry.get("tensors", {})


def check(described: dict, ckpt: MappedFile) -> None:
    """Raise CheckpointError, naming the checkpoint file, unless it is the one the manifest describes."""
    path = Path(ckpt.path)
    its = f"its manifest {manifest_path(path).name}"
    if list(described["files"]) != [path.name]:
        raise CheckpointError(path, f"{its} describes {', '.join(described['files']) or 'no file'} "
                                    "(a manifest copied or renamed?)")
    manifest.check_files(described, path.parent, its)
    found = {name: (t.shape, dtype_name(t.dtype, path, name)) for name, t in ckpt.tensors.items()}
    manifest.check_tensors(path, tensors(described), found, f"disagrees with {its}: ")
    for name, t in tensors(described).items():
        offsets, whole = t["offsets"], t["global_shape"]
        if (offsets is None) != (whole is None) or offsets is not None and not (
                len(offsets) == len(whole) == len(t["shape"])
                and all(o + n <= w for o, n, w in zip(offsets, t["shape"], whole))):
            raise CheckpointError(path, f"{its}: {name}: offsets {offsets} and global_shape {whole} do not place "
                                        f"its shape {t['shape']}")
