"""``ckpt-hooks inspect``: what a checkpoint is, how it is split, and what each file holds, as
text for people (``describe``) or as one JSON-able dict for scripts (``summary``)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ckpt_hooks.algebra.param_map import dtype_name
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.megatron.checkpoint import MegatronSource, read_source
from ckpt_hooks.megatron.torch_dist import sharding_type


def summary(load_dir, tensors: bool = False) -> dict:
    """{format, iteration, iteration_dir, layout, model, optimizer, files: [{path, rank, tensors,
    bytes, dtypes, chunks[, entries: {chunk: {key: [shape, dtype] or None}}]}]}"""
    return _summary(read_source(load_dir), tensors)


def _summary(src: MegatronSource, tensors: bool) -> dict:
    ckpt = src.ckpt
    files = []
    for f in src.files:
        metas = [m for chunk in f.chunks.values() for m in chunk.values() if m is not None]
        entry = {"path": str(Path(f.path).relative_to(ckpt.iter_dir)), "rank": dataclasses.asdict(f.rank),
                 "tensors": len(metas), "bytes": sum(math.prod(m.shape) * m.dtype.itemsize for m in metas),
                 "dtypes": sorted({dtype_name(m.dtype) for m in metas}), "chunks": list(f.chunks)}
        if tensors:
            entry["entries"] = {chunk: {key: None if m is None else [list(m.shape), dtype_name(m.dtype)]
                                        for key, m in keys.items()} for chunk, keys in f.chunks.items()}
        files.append(entry)
    dist = src.ckpt_format == "torch_dist"
    return {"format": "megatron-torch_dist" if dist else "megatron-legacy", "iteration": ckpt.iteration,
            "iteration_dir": str(ckpt.iter_dir), "layout": dataclasses.asdict(src.layout),
            "model": dataclasses.asdict(src.spec),
            "optimizer": sharding_type(ckpt.dist) if dist else _has_optimizer(ckpt), "files": files}


def describe(load_dir, tensors: bool = False) -> str:
    src = read_source(load_dir)
    about = _summary(src, tensors)
    iteration = "release" if about["iteration"] is None else about["iteration"]
    dist = about["format"] == "megatron-torch_dist"
    optimizer = (f"{about['optimizer']} state" if about["optimizer"] else "no optimizer state") if dist else \
        ("distrib_optim.pt present" if about["optimizer"] else "no distrib_optim.pt")
    lines = [
        f"format     Megatron {'torch_dist' if dist else 'legacy (torch)'}, iteration {iteration}, "
        f"{about['iteration_dir']}",
        f"layout     {src.layout.describe()}",
        f"model      {src.spec.describe()}",
        f"optimizer  {optimizer}",
        "ranks (what each model-parallel rank holds):" if dist else "files:",
    ]
    for f in about["files"]:
        rank = f["rank"]
        where = "" if dist else f"{Path(f['path']).parent}  "
        lines.append(f"  {where}tp {rank['tp']} pp {rank['pp']}  {f['tensors']} tensors, "
                     f"{f['bytes'] / 1e6:.2f} MB, {'/'.join(f['dtypes'])}, chunks {f['chunks']}")
        for chunk, entries in f.get("entries", {}).items():
            for key, meta in entries.items():
                lines.append(f"      {chunk}.{key}  {'—' if meta is None else f'{meta[0]} {meta[1]}'}")
    return "\n".join(lines)


def holds_optimizer(src: MegatronSource) -> bool:
    """Whether the checkpoint saved distributed-optimizer state (every rank's, for legacy files)."""
    return bool(sharding_type(src.ckpt.dist)) if src.ckpt_format == "torch_dist" else _has_optimizer(src.ckpt)


def _has_optimizer(ckpt) -> bool:
    return all((Path(f.path).parent / legacy.OPTIMIZER_FILE).exists() for f in ckpt.files.values())
