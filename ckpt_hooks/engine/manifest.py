"""The manifest: one small JSON in an iteration directory saying what the checkpoint holds.

    iter_0000100/ckpt_hooks_manifest.json
    {"manifest_version": 1, "format": "megatron-legacy", "iteration": 100,
     "model": {ModelSpec}, "layout": {ParallelConfig},
     "files": {"mp_rank_00_000/model_optim_rng.pt": {"bytes": 123456,
                   "tensors": {"model0": {key: {"shape", "dtype", "logical", "offsets", "logical_shape"}}}},
               "mp_rank_00_000/distrib_optim.pt": {"bytes": 654321}, ...}}

It is written once every rank's files are complete (by the save hooks and the converter), so
it can vouch for them: a reader checks that every listed file is there with its size, that
the saved ``args`` describe the same model and layout, and that each model file holds the
listed tensors, before trusting any of it. A missing, truncated or replaced file, or a
manifest left from another run, is an error instead of a silently wrong resume.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ckpt_hooks.algebra.param_map import dtype_name
from ckpt_hooks.algebra.spec import ModelSpec, ParallelConfig
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.atomic import atomic_write

MANIFEST = "ckpt_hooks_manifest.json"
VERSION = 1
FORMAT = "megatron-legacy"


def _plain(value):
    """JSON's view of a value (tuples become lists), for comparing with what was read back."""
    return json.loads(json.dumps(value))


def _file_tensors(source_file, placements) -> dict:
    chunks = {}
    for chunk, entries in source_file.chunks.items():
        chunks[chunk] = {}
        for key, meta in entries.items():
            entry = None
            if meta is not None:
                entry = {"shape": list(meta.shape), "dtype": dtype_name(meta.dtype)}
                if (source_file.rank, chunk, key) in placements:
                    logical, where = placements[(source_file.rank, chunk, key)]
                    entry.update(logical=logical, offsets=list(where.box.offsets),
                                 logical_shape=list(where.logical_shape))
            chunks[chunk][key] = entry
    return chunks


def build(iter_dir, iteration: int | None, spec: ModelSpec, layout: ParallelConfig, files: list,
          placements: dict) -> dict:
    """The manifest of a complete iteration directory whose model files are ``files`` (each with
    ``path``, ``rank`` and ``chunks``), their tensors placed as ``placements`` says
    ((rank, chunk, key) -> (logical name, Placement))."""
    iter_dir = Path(iter_dir)
    tensors = {str(Path(f.path).relative_to(iter_dir)): _file_tensors(f, placements) for f in files}
    listed = {}
    for path in sorted(iter_dir.rglob("*")):
        relative = str(path.relative_to(iter_dir))
        if path.is_file() and path.name != MANIFEST and not path.name.startswith("."):
            listed[relative] = {"bytes": path.stat().st_size}
            if relative in tensors:
                listed[relative]["tensors"] = tensors[relative]
    return {"manifest_version": VERSION, "format": FORMAT, "iteration": iteration,
            "model": _plain(dataclasses.asdict(spec)), "layout": _plain(dataclasses.asdict(layout)),
            "files": listed}


def write(iter_dir, manifest: dict) -> Path:
    """Atomically: a reader never sees half a manifest."""
    path = Path(iter_dir) / MANIFEST
    with atomic_write(path) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    return path


def read(iter_dir) -> dict | None:
    """The manifest of an iteration directory, None if it was saved without one."""
    path = Path(iter_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        version, files = manifest["manifest_version"], manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path, f"unreadable manifest ({type(e).__name__}: {e})") from None
    if version != VERSION or manifest.get("format") != FORMAT or not isinstance(files, dict):
        raise CheckpointError(path, f"unsupported manifest (version {version!r}, format {manifest.get('format')!r})")
    return manifest


def check(manifest: dict, iter_dir, spec: ModelSpec, layout: ParallelConfig, files: list) -> None:
    """Raise CheckpointError unless the files are the ones the manifest describes."""
    iter_dir = Path(iter_dir)
    where = iter_dir / MANIFEST
    disagree = "the manifest disagrees with the files: "
    for what, saved, found in (("model", manifest.get("model"), spec), ("layout", manifest.get("layout"), layout)):
        found = _described(found, saved)
        if saved != found:
            diff = ", ".join(f"{k} {saved.get(k) if isinstance(saved, dict) else None!r} vs {v!r}"
                             for k, v in found.items() if not isinstance(saved, dict) or saved.get(k) != v)
            raise CheckpointError(where, f"{disagree}{what} (manifest vs saved args): {diff}")
    for relative, entry in manifest["files"].items():
        path = iter_dir / relative
        if not path.is_file():
            raise CheckpointError(path, f"missing, but listed in {MANIFEST} (a partially written iteration?)")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(path, f"{size} bytes, {MANIFEST} says {entry.get('bytes')} "
                                        "(a partially written or replaced file)")
    for source_file in files:
        relative = str(Path(source_file.path).relative_to(iter_dir))
        listed = manifest["files"].get(relative)
        if listed is None:
            raise CheckpointError(source_file.path, f"not listed in {MANIFEST}")
        saved, found = _shapes(listed.get("tensors", {})), _shapes(_file_tensors(source_file, {}))
        if saved != found:
            keys = sorted({(c, k) for side in (saved, found) for c, entries in side.items() for k in entries})
            chunk, key = next((c, k) for c, k in keys if saved.get(c, {}).get(k, "absent") != found.get(c, {}).get(k, "absent"))
            raise CheckpointError(source_file.path, f"{disagree}{chunk}.{key} is {found.get(chunk, {}).get(key, 'absent')}, "
                                                    f"{MANIFEST} says {saved.get(chunk, {}).get(key, 'absent')}")


def _described(value, saved) -> dict:
    """A spec or layout as JSON, less the fields a manifest written before they existed lacks
    while they hold their defaults (e.g. a layout's ``ep``)."""
    fields = {f.name: f.default for f in dataclasses.fields(value)}
    found = _plain(dataclasses.asdict(value))
    if isinstance(saved, dict):
        found = {k: v for k, v in found.items()
                 if k in saved or fields[k] is dataclasses.MISSING or v != _plain(fields[k])}
    return found


def _shapes(tensors: dict) -> dict:
    """chunk -> key -> (shape, dtype), or None for a non-tensor entry."""
    return {chunk: {key: None if e is None else (tuple(e["shape"]), e["dtype"]) for key, e in entries.items()}
            for chunk, entries in tensors.items()}
