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
         "moment1.fc1.weight": {..., "role": "optimizer"}, ...},
         "crc32": {"fc1.weight": 2821945316, ...}}}}

The role "optimizer" covers the moments, ``beta1_power``, ``global_step``, ``learning_rate``, a
loss scale. Where the running network had a parallel layout for a parameter (semi/auto parallel), the
manifest records it as ``parallel_layout``; a file holding only this rank's slice then has
``offsets`` and ``global_shape`` null: the slice's place follows from that layout.

``crc32`` has the CRC-32 of every tensor's bytes: taken while writing where ckpt_hooks writes the
file (transform, LoRA merge, combine-dp-zero, megatron-to-mindspore: ``describe_written``), read
back once by the callback from the file MindSpore wrote. The transform checks them for every
file it reads (it reads them whole anyway), ``load`` for every tensor it reads whole, ``verify
CKPT`` for all.

The converters' files are described the same way: a transform's rank files with each tensor's
box of the global tensor (``offsets``, ``global_shape``: the target strategy's), layout
``{"rank": r, "world_size": n, "parallel_mode": null}`` (``"stand_alone"`` for one complete
file), and the step, epoch and roles of the source's manifests where it had them;
MindSpeed-Core-MS's files (megatron-to-mindspore, rank = its model-parallel rank among TP x PP,
with ``tp`` and ``pp``) and combine-dp-zero's with their tensors unplaced.
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
          parallel_layouts: dict[str, dict], crcs: dict[str, int] | None = None) -> dict:
    """The manifest of the complete checkpoint file ``ckpt``: its tensors as the file lists them,
    and their CRC-32s where given."""
    tensors = {}
    for name, stored in ckpt.tensors.items():
        shape = list(stored.shape)
        whole = not _holds_slice(shape, parallel_layouts.get(name))
        more = {"parallel_layout": parallel_layouts[name]} if name in parallel_layouts else {}
        tensors[name] = manifest.tensor_entry(name, shape, dtype_name(stored.dtype, ckpt.path, name),
                                              roles.get(name, manifest.MODEL), shape if whole else None,
                                              [0] * len(shape) if whole else None, **more)
    return _build(Path(ckpt.path), tensors, crcs, layout=layout, step=step, epoch=epoch)


def _build(path: Path, tensors: dict, crcs: dict | None, **header) -> dict:
    return manifest.build(FRAMEWORK, path.suffix[1:], **header,
                          files={path.name: manifest.file_entry(path, tensors, crcs)})


def describe_written(path, crcs: dict[str, int], *, layout: dict, role, placements: dict | None = None,
                     step: int | None = None, epoch: int | None = None) -> Path:
    """Write the manifest of the file ckpt_hooks just wrote at ``path``: its tensors as its header
    lists them, each with ``role(name)``, placed in its global tensor where ``placements`` (name
    -> ``Placement``) says, with the CRC-32s its writer took from the bytes as they went out."""
    from ckpt_hooks.mindspore.files import open_checkpoint

    written, tensors = open_checkpoint(path), {}
    for name, stored in written.tensors.items():
        where = (placements or {}).get(name)
        tensors[name] = manifest.tensor_entry(name, stored.shape, dtype_name(stored.dtype, path, name), role(name),
                                              None if where is None else where.logical_shape,
                                              None if where is None else where.box.offsets)
    return write(_build(Path(path), tensors, crcs, layout=layout, step=step, epoch=epoch), path)


def write(described: dict, ckpt_path) -> Path:
    return manifest.write(described, manifest_path(ckpt_path))


def read(ckpt_path) -> dict | None:
    """The manifest beside a checkpoint file, None if it was saved without one."""
    return manifest.read(manifest_path(ckpt_path), FRAMEWORK)


def tensors(described: dict) -> dict:
    """The tensor entries of the one file a checked manifest describes."""
    (entry,) = described["files"].values()
    return entry.get("tensors", {})


def check_crcs(described: dict, ckpt: MappedFile, names=None) -> tuple[int, int]:
    """Check the bytes of the tensors ``names`` (default: all) against the manifest's CRC-32s;
    a mismatch raises CheckpointError naming the file and the tensor. Returns (checked, tensors
    with no CRC-32 recorded)."""
    crcs = next(iter(described["files"].values())).get("crc32", {})
    checked = unchecked = 0
    for name in ckpt.tensors if names is None else names:
        want = crcs.get(name)
        if want is None:
            unchecked += 1
            continue
        crc = ckpt.crc32(name)
        if crc != want:
            raise CheckpointError(ckpt.path, f"{name}: CRC-32 {crc:08x}, its manifest {manifest_path(ckpt.path).name} "
                                             f"says {want:08x}: its bytes changed after they were written")
        checked += 1
    return checked, unchecked


def read_checked(ckpt: MappedFile, crcs: bool = True) -> dict | None:
    """The manifest beside ``ckpt`` (None without one), the file checked against it: sizes,
    shapes, dtypes, and (``crcs``) every tensor's bytes against its CRC-32 — for readers that
    read every tensor anyway."""
    described = read(ckpt.path)
    if described is not None:
        check(described, ckpt)
        if crcs:
            check_crcs(described, ckpt)
    return described


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
