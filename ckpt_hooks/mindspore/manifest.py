"""The manifest of a MindSpore checkpoint file: one JSON beside it saying what it holds and at
which layout it was saved, so that a loader at another layout needs no strategy file or flags.

    rank_0/CKP-1_4.ckpt
    rank_0/CKP-1_4.ckpt.manifest.json
    {"manifest_version": 1, "framework": "mindspore", "format": "ckpt", "file": "CKP-1_4.ckpt",
     "bytes": 6583, "step": 4, "epoch": 1,
     "layout": {"rank": 0, "world_size": 2, "parallel_mode": "data_parallel"},
     "tensors": {"fc1.weight": {"shape": [16, 8], "dtype": "Float32", "role": "model",
                                "global_shape": [16, 8], "offsets": [0, 0]},
                 "moment1.fc1.weight": {..., "role": "optimizer"}, ...}}

``role`` is "model" for the network's parameters and "optimizer" for the rest of the training
state (moments, ``beta1_power``, ``global_step``, ``learning_rate``, a loss scale). Each tensor
is a box of a global tensor: ``offsets`` into ``global_shape``, its lengths being ``shape``.
Where the running network had a parallel layout for a parameter (semi/auto parallel), the
manifest records it as ``parallel_layout``; a file holding only this rank's slice then has
``offsets`` and ``global_shape`` null: the slice's place follows from that layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.atomic import atomic_write
from ckpt_hooks.formats.mindspore_ckpt import DTYPES, MappedFile, dtype_index

SUFFIX = ".manifest.json"
VERSION = 1
FRAMEWORK = "mindspore"
# The entries of a `parameter_layout_dict` value, as serialization._get_merged_param_data reads them.
LAYOUT_FIELDS = ("dev_matrix", "tensor_map", "slice_shape", "field_size", "uniform_split", "opt_shard_group",
                 "before_reshape_full_shape", "after_reshape_slice_shape")
_ENTRY_KEYS = {"shape", "dtype", "role", "global_shape", "offsets"}


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
        entry = {"shape": shape, "dtype": dtype_name(stored.dtype, ckpt.path, name), "role": roles.get(name, "model")}
        whole = not _holds_slice(shape, parallel_layouts.get(name))
        entry.update(global_shape=shape if whole else None, offsets=[0] * len(shape) if whole else None)
        if name in parallel_layouts:
            entry["parallel_layout"] = parallel_layouts[name]
        tensors[name] = entry
    path = Path(ckpt.path)
    return {"manifest_version": VERSION, "framework": FRAMEWORK, "format": path.suffix[1:], "file": path.name,
            "bytes": path.stat().st_size, "step": step, "epoch": epoch, "layout": layout, "tensors": tensors}


def write(manifest: dict, ckpt_path) -> Path:
    """Atomically: a reader never sees half a manifest."""
    path = manifest_path(ckpt_path)
    with atomic_write(path) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    return path


def read(ckpt_path) -> dict | None:
    """The manifest beside a checkpoint file, None if it was saved without one."""
    path = manifest_path(ckpt_path)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        version, framework = manifest["manifest_version"], manifest["framework"]
        tensors, layout = manifest["tensors"], manifest["layout"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path, f"unreadable manifest ({type(e).__name__}: {e})") from None
    if version != VERSION or framework != FRAMEWORK:
        raise CheckpointError(path, f"unsupported manifest (version {version!r}, framework {framework!r})")
    entries_ok = isinstance(tensors, dict) and all(isinstance(e, dict) and _ENTRY_KEYS <= e.keys()
                                                   for e in tensors.values())
    if not entries_ok or not isinstance(layout, dict) or not {"rank", "world_size"} <= layout.keys():
        raise CheckpointError(path, f"unreadable manifest (tensors need {sorted(_ENTRY_KEYS)}, "
                                    "the layout rank and world_size)")
    return manifest


def check(manifest: dict, ckpt: MappedFile) -> None:
    """Raise CheckpointError, naming the checkpoint file, unless it is the one the manifest describes."""
    path = Path(ckpt.path)
    its = f"its manifest {path.name}{SUFFIX}"
    if manifest.get("file") != path.name:
        raise CheckpointError(path, f"{its} describes {manifest.get('file')!r} (a manifest copied or renamed?)")
    size = path.stat().st_size
    if size != manifest.get("bytes"):
        raise CheckpointError(path, f"{size} bytes, {its} says {manifest.get('bytes')} "
                                    "(a replaced or partially written file?)")
    found = {name: (list(t.shape), dtype_name(t.dtype, path, name)) for name, t in ckpt.tensors.items()}
    saved = {name: (e.get("shape"), e.get("dtype")) for name, e in manifest["tensors"].items()}
    wrong = [f"{name} is {_describe(found.get(name))}, the manifest says {_describe(saved.get(name))}"
             for name in sorted(found.keys() | saved.keys()) if found.get(name) != saved.get(name)]
    if wrong:
        raise CheckpointError(path, f"disagrees with {its}: " + listing(wrong, "; "))


def listing(items: list[str], separator: str = ", ", limit: int = 8) -> str:
    """Items for a one-line error, the first ``limit`` of them."""
    more = f"{separator}... ({len(items) - limit} more)" if len(items) > limit else ""
    return separator.join(items[:limit]) + more


def _describe(shape_dtype) -> str:
    return "absent" if shape_dtype is None else f"{shape_dtype[1]}{shape_dtype[0]}"
