"""The manifest: one JSON saying what a checkpoint's files hold, one schema for every framework.

    manifest = {"manifest_version": 2, "framework": "megatron" | "mindspore",
                "format": "megatron-legacy" | "ckpt" | "safetensors",
                "iteration": N | null, "model": {ModelSpec},        (Megatron)
                "step": N, "epoch": N,                              (MindSpore)
                "layout": layout, "files": {path: file}}
    layout   = Megatron: {ParallelConfig: "tp", "pp", "vpp", "dp", ...}
               MindSpore: {"rank", "world_size", "parallel_mode"}
    path     = relative to the manifest's directory
    file     = {"bytes": N[, "tensors": {key: tensor | null}][, "crc32": {record: N}]}
               null: an entry holding no tensor; crc32: the CRC-32 of each record's bytes — a
               torch file's data records ("data/0"; a torch_dist .distcp file's: "<offset of
               its archive>:data/0"), a MindSpore file's tensors (by key: its
               bytes in row-major order, whatever records hold them) — computed while they were
               written (``ckpt-hooks verify CKPT`` checks them, readers where they read the bytes)
    key      = the tensor's name in the file: MindSpore's parameter name, Megatron's "<chunk>.<key>"
               (``model.decoder.layers.0.mlp.linear_fc1.weight``; chunk names hold no dot)
    tensor   = {"logical": name, "shape": [N, ...], "dtype": name, "role": "model" | "optimizer" | null,
                "global_shape": [N, ...] | null, "offsets": [N, ...] | null
                [, "box_shape": [N, ...]][, "parallel_layout": {...}]}

    iter_0000100/ckpt_hooks_manifest.json   Megatron: every file of the iteration directory
    rank_0/CKP-1_4.ckpt.manifest.json       MindSpore: beside each checkpoint file, that file alone

A tensor is the box of the logical tensor ``logical`` that starts at ``offsets`` in
``global_shape``; its lengths are ``shape``, or ``box_shape`` where the stored tensor merges
axes (Megatron's SwiGLU fc1: [2F/tp, H] of [2, F, H]). ``offsets`` and ``global_shape`` are null
where the manifest does not place the tensor (a Megatron ``_extra_state``; a MindSpore rank's
slice, whose place follows from its ``parallel_layout``; a MindSpeed-Core-MS or combine-dp-zero
file's tensors, slices of a layout it does not describe). ``role`` is "model" for the network's
parameters, "optimizer" for the rest of the training state, null where the writer did not know
(a MindSpore checkpoint resharded from files saved without a manifest); ``dtype`` is the
framework's name ("bfloat16", "BFloat16").

A manifest is written once its files are complete (save hooks, callbacks, converters), so it can
vouch for them: a reader checks that every listed file is there with its size and that the
stored tensors have the listed shapes and dtypes before trusting any of it. Version 1 manifests
(Megatron's tensors nested chunk -> key, MindSpore's one file in the header) are converted on read.
"""

from __future__ import annotations

import json
from pathlib import Path

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.atomic import atomic_write

VERSION = 2
MODEL, OPTIMIZER = "model", "optimizer"
# framework -> the layout entries a reader relies on
_LAYOUT_KEYS = {"megatron": ("tp", "pp"), "mindspore": ("rank", "world_size")}
_TENSOR_KEYS = ("logical", "shape", "dtype", "role", "global_shape", "offsets")


def tensor_entry(logical: str, shape, dtype: str, role: str, global_shape, offsets, **more) -> dict:
    """A tensor's entry; ``more``: the optional ``box_shape``, ``parallel_layout``."""
    return {"logical": logical, "shape": list(shape), "dtype": dtype, "role": role,
            "global_shape": None if global_shape is None else list(global_shape),
            "offsets": None if offsets is None else list(offsets), **more}


def file_entry(path, tensors: dict | None = None, crcs: dict | None = None) -> dict:
    """A complete file's entry: its size, its tensors where they are described, its records'
    CRC-32s where the writer took them."""
    return {"bytes": Path(path).stat().st_size, **({} if tensors is None else {"tensors": tensors}),
            **({} if crcs is None else {"crc32": crcs})}


def build(framework: str, file_format: str, *, layout: dict, files: dict, **header) -> dict:
    """A manifest; ``header``: the framework's own entries (iteration and model; step and epoch)."""
    return {"manifest_version": VERSION, "framework": framework, "format": file_format, **header,
            "layout": layout, "files": files}


def write(manifest: dict, path) -> Path:
    """Atomically: a reader never sees half a manifest."""
    path = Path(path)
    with atomic_write(path) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    return path


def read(path, framework: str) -> dict | None:
    """The ``framework`` manifest at ``path`` in the version 2 form, None if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        version = manifest["manifest_version"]
        if version == 1:
            manifest = _from_version_1(manifest)
        found = manifest.get("framework")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(path, f"unreadable manifest ({type(e).__name__}: {e})") from None
    if manifest["manifest_version"] != VERSION or found != framework:
        raise CheckpointError(path, f"unsupported manifest (version {version!r}, framework {found!r})")
    if not _readable(manifest, _LAYOUT_KEYS[framework]):
        raise CheckpointError(path, f"unreadable manifest (each file needs bytes, each tensor {list(_TENSOR_KEYS)}, "
                                    f"the layout {list(_LAYOUT_KEYS[framework])})")
    return manifest


def _readable(manifest: dict, layout_keys) -> bool:
    """Whether the manifest has the entries a reader relies on, of the types it relies on."""
    layout, files = manifest.get("layout"), manifest.get("files")
    if not isinstance(layout, dict) or not all(_is_int(layout.get(k)) for k in layout_keys) or \
            not isinstance(files, dict):
        return False
    return all(isinstance(f, dict) and _is_int(f.get("bytes")) and _readable_tensors(f.get("tensors", {}))
               and _readable_crcs(f.get("crc32", {})) for f in files.values())


def _readable_tensors(tensors) -> bool:
    return isinstance(tensors, dict) and all(t is None or _readable_tensor(t) for t in tensors.values())


def _readable_tensor(t) -> bool:
    return isinstance(t, dict) and all(k in t for k in _TENSOR_KEYS) and isinstance(t["dtype"], str) \
        and _is_ints(t["shape"]) and all(t[k] is None or _is_ints(t[k]) for k in ("global_shape", "offsets")) \
        and _is_ints(t.get("box_shape", []))


def _readable_crcs(crcs) -> bool:
    return isinstance(crcs, dict) and all(_is_int(crc) for crc in crcs.values())


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_ints(values) -> bool:
    return isinstance(values, list) and all(_is_int(v) and v >= 0 for v in values)


def _from_version_1(manifest: dict) -> dict:
    """A version 1 manifest in the version 2 form (unchanged if it is of no known framework)."""
    if manifest.get("framework") == "mindspore":
        header = {k: v for k, v in manifest.items() if k not in ("file", "bytes", "tensors")}
        tensors = {name: {"logical": name, **t} for name, t in manifest["tensors"].items()}
        return {**header, "manifest_version": VERSION,
                "files": {manifest["file"]: {"bytes": manifest["bytes"], "tensors": tensors}}}
    if manifest.get("format") == "megatron-legacy":
        files = {relative: dict(entry) for relative, entry in manifest["files"].items()}
        for entry in files.values():
            if "tensors" in entry:
                entry["tensors"] = _megatron_tensors_1(entry["tensors"])
        return {**manifest, "manifest_version": VERSION, "framework": "megatron", "files": files}
    return manifest


def _megatron_tensors_1(chunks: dict) -> dict:
    """Version 1's chunk -> key -> {shape, dtype, logical, offsets, logical_shape} | null."""
    return {f"{chunk}.{key}": None if t is None else tensor_entry(t.get("logical"), t["shape"], t["dtype"], MODEL,
                                                                  t.get("logical_shape"), t.get("offsets"))
            for chunk, keys in chunks.items() for key, t in keys.items()}


def check_files(manifest: dict, root, its: str) -> None:
    """Raise CheckpointError, naming the file, unless every file the manifest lists is under
    ``root`` with its size. ``its`` names the manifest in the message."""
    for relative, entry in manifest["files"].items():
        path = Path(root) / relative
        if not path.is_file():
            raise CheckpointError(path, f"missing, but listed in {its} (a partially written checkpoint?)")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(path, f"{size} bytes, {its} says {entry['bytes']} "
                                        "(a partially written or replaced file?)")


def check_tensors(path, listed: dict, found: dict, disagree: str) -> None:
    """Raise CheckpointError, naming ``path``, at the first tensor whose (shape, dtype) in ``found``
    (key -> (shape, dtype), None for an entry holding no tensor) differs from the ``listed``
    entries; the message opens with ``disagree``."""
    saved = {key: None if t is None else (list(t["shape"]), t["dtype"]) for key, t in listed.items()}
    found = {key: None if t is None else (list(t[0]), t[1]) for key, t in found.items()}
    for key in [*found, *(k for k in saved if k not in found)]:
        stored, listed_as = found.get(key, "absent"), saved.get(key, "absent")
        if stored != listed_as:
            raise CheckpointError(path, f"{disagree}{key} is {_describe(stored)}, "
                                        f"the manifest says {_describe(listed_as)}")


def _describe(shape_dtype) -> str:
    """"Float32[16, 8]"; "absent" stays as it is."""
    if shape_dtype is None:
        return "not a tensor"
    return shape_dtype if isinstance(shape_dtype, str) else f"{shape_dtype[1]}{shape_dtype[0]}"
