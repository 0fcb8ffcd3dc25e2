"""The manifest of a Megatron iteration directory, in the schema of ``engine.manifest``:

    iter_0000100/ckpt_hooks_manifest.json
    {"manifest_version": 2, "framework": "megatron", "format": "megatron-legacy", "iteration": 100,
     "model": {ModelSpec}, "layout": {ParallelConfig},
     "files": {"mp_rank_00_000/model_optim_rng.pt": {"bytes": 123456, "tensors": {
                   "model.decoder.layers.0.self_attention.linear_qkv.weight": {
                       "logical": "decoder.layers.0.self_attention.linear_qkv.weight", "shape": [96, 64],
                       "dtype": "float32", "role": "model", "global_shape": [192, 64], "offsets": [0, 0]},
                   ...}},
               "mp_rank_00_000/distrib_optim.pt": {"bytes": 654321}, ...}}

Every file of the iteration directory is listed; the model files with their tensors (a
torch_dist iteration, ``"format": "megatron-torch_dist"``, lists its files' sizes only: DCP's
``.metadata`` indexes its tensors). A reader
checks, besides the files and tensors, that the saved ``args`` describe the model and layout the
manifest names: a missing, truncated or replaced file, or a manifest left from another run, is
an error instead of a silently wrong resume.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ckpt_hooks.algebra.param_map import dtype_name
from ckpt_hooks.algebra.spec import ModelSpec, ParallelConfig
from ckpt_hooks.engine import manifest
from ckpt_hooks.errors import CheckpointError

MANIFEST = "ckpt_hooks_manifest.json"
_DISAGREE = "the manifest disagrees with the files: "
FRAMEWORK, FORMAT, DIST_FORMAT = "megatron", "megatron-legacy", "megatron-torch_dist"


def read(iter_dir) -> dict | None:
    """The manifest of an iteration directory, None if it was saved without one."""
    return manifest.read(Path(iter_dir) / MANIFEST, FRAMEWORK)


def write(described: dict, iter_dir) -> Path:
    return manifest.write(described, Path(iter_dir) / MANIFEST)


def _plain(value):
    """JSON's view of a value (tuples become lists), for comparing with what was read back."""
    return json.loads(json.dumps(value))


def _found(source_file) -> dict:
    """"<chunk>.<key>" -> (shape, dtype name) of a rank file's tensors, None for a non-tensor."""
    return {f"{chunk}.{key}": None if meta is None else (list(meta.shape), dtype_name(meta.dtype))
            for chunk, entries in source_file.chunks.items() for key, meta in entries.items()}


def _tensors(source_file, placed) -> dict:
    """"<chunk>.<key>" -> the entry of each of a rank file's tensors, None for a non-tensor."""
    return {f"{chunk}.{key}": None if meta is None else _entry(meta, *placed[(source_file.rank, chunk, key)])
            for chunk, entries in source_file.chunks.items() for key, meta in entries.items()}


def _entry(meta, logical: str, where) -> dict:
    global_shape, offsets, more = None, None, {}   # no placement: an _extra_state, the rank's own
    if where is not None:
        global_shape, offsets = where.logical_shape, where.box.offsets
        if tuple(where.box.lengths) != tuple(meta.shape):
            more["box_shape"] = list(where.box.lengths)
    return manifest.tensor_entry(logical, meta.shape, dtype_name(meta.dtype), manifest.MODEL, global_shape, offsets,
                                 **more)


def build(iter_dir, iteration: int | None, spec: ModelSpec, layout: ParallelConfig, files: list,
          placed: dict, checksums: dict | None = None) -> dict:
    """The manifest of a complete iteration directory whose model files are ``files`` (each with
    ``path``, ``rank`` and ``chunks``), their tensors placed as ``placed`` says
    ((rank, chunk, key) -> (logical name, Placement or None))."""
    iter_dir = Path(iter_dir)
    tensors = {str(Path(f.path).relative_to(iter_dir)): _tensors(f, placed) for f in files}
    listed = {}
    for file in sorted(iter_dir.rglob("*")):
        relative = str(file.relative_to(iter_dir))
        if file.is_file() and file.name != MANIFEST and not file.name.startswith("."):
            listed[relative] = manifest.file_entry(file, tensors.get(relative),
                                                   (checksums or {}).get(str(file)) or None)
    return manifest.build(FRAMEWORK, FORMAT, iteration=iteration, model=_plain(dataclasses.asdict(spec)),
                          layout=_plain(dataclasses.asdict(layout)), files=listed)


def build_dist(iter_dir, iteration: int | None, spec: ModelSpec, layout: ParallelConfig,
               checksums: dict | None = None) -> dict:
    """The manifest of a complete torch_dist iteration directory: every file with its size (the
    tensors are indexed, with their byte ranges, by DCP's own ``.metadata``), and a .distcp
    file's records' CRC-32s where the writer computed them (``torch_dist.record_crcs``)."""
    iter_dir = Path(iter_dir)
    listed = {str(f.relative_to(iter_dir)): manifest.file_entry(f, crcs=(checksums or {}).get(str(f)) or None)
              for f in sorted(iter_dir.rglob("*")) if f.is_file() and f.name != MANIFEST}
    return manifest.build(FRAMEWORK, DIST_FORMAT, iteration=iteration, model=_plain(dataclasses.asdict(spec)),
                          layout=_plain(dataclasses.asdict(layout)), files=listed)


def check_sizes(described: dict, iter_dir) -> None:
    """Raise CheckpointError, naming the file, unless every listed file is there with its size."""
    manifest.check_files(described, iter_dir, MANIFEST)


def check_described(described: dict, iter_dir, spec: ModelSpec, layout: ParallelConfig) -> None:
    """Raise CheckpointError unless the manifest names the model and layout the saved args do."""
    for what, saved, found in (("model", described.get("model"), spec), ("layout", described["layout"], layout)):
        try:
            found = _described(found, saved)
        except (TypeError, ValueError) as e:   # a value no checkpoint's args hold (a class, NaN...)
            raise CheckpointError(Path(iter_dir) / MANIFEST, f"the saved args' {what} is not plain data ({e})") from None
        if saved != found:
            diff = ", ".join(f"{k} {saved.get(k) if isinstance(saved, dict) else None!r} vs {v!r}"
                             for k, v in found.items() if not isinstance(saved, dict) or saved.get(k) != v)
            raise CheckpointError(Path(iter_dir) / MANIFEST, f"{_DISAGREE}{what} (manifest vs saved args): {diff}")


def check(described: dict, iter_dir, spec: ModelSpec, layout: ParallelConfig, files: list) -> None:
    """Raise CheckpointError unless the files are the ones the manifest describes."""
    check_described(described, iter_dir, spec, layout)
    manifest.check_files(described, iter_dir, MANIFEST)
    for source_file in files:
        listed = described["files"].get(str(Path(source_file.path).relative_to(iter_dir)))
        if listed is None:
            raise CheckpointError(source_file.path, f"not listed in {MANIFEST}")
        manifest.check_tensors(source_file.path, listed.get("tensors", {}), _found(source_file), _DISAGREE)


def _described(value, saved) -> dict:
    """A spec or layout as JSON, less the fields a manifest written before they existed lacks
    while they hold their defaults (e.g. a layout's ``ep``)."""
    fields = {f.name: f.default for f in dataclasses.fields(value)}
    found = _plain(dataclasses.asdict(value))
    if isinstance(saved, dict):
        found = {k: v for k, v in found.items()
                 if k in saved or fields[k] is dataclasses.MISSING or v != _plain(fields[k])}
    return found
