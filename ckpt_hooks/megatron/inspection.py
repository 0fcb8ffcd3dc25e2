"""``ckpt-hooks inspect``: what a checkpoint is, how it is split, and what each file holds."""

from __future__ import annotations

import math
from pathlib import Path

from ckpt_hooks.megatron.checkpoint import read_source
from ckpt_hooks.formats import megatron_legacy as legacy


def describe(load_dir, tensors: bool = False) -> str:
    src = read_source(load_dir)
    ckpt, spec, source, files = src.ckpt, src.spec, src.layout, src.files
    iteration = "release" if ckpt.iteration is None else ckpt.iteration
    lines = [
        f"format     Megatron legacy (torch), iteration {iteration}, {ckpt.iter_dir}",
        f"layout     {source.describe()}",
        f"model      {spec.describe()}",
        f"optimizer  {'distrib_optim.pt present' if _has_optimizer(ckpt) else 'no distrib_optim.pt'}",
        "files:",
    ]
    for f in files:
        metas = [m for chunk in f.chunks.values() for m in chunk.values() if m is not None]
        nbytes = sum(math.prod(m.shape) * m.dtype.itemsize for m in metas)
        dtypes = sorted({str(m.dtype).replace("torch.", "") for m in metas})
        lines.append(f"  {legacy.rank_dir_name(f.rank.tp, f.rank.pp, source.pp)}  tp {f.rank.tp} pp {f.rank.pp}  "
                     f"{len(metas)} tensors, {nbytes / 1e6:.2f} MB, {'/'.join(dtypes)}, chunks {list(f.chunks)}")
        if tensors:
            for chunk, entries in f.chunks.items():
                for key, meta in entries.items():
                    shape = "—" if meta is None else f"{list(meta.shape)} {str(meta.dtype).replace('torch.', '')}"
                    lines.append(f"      {chunk}.{key}  {shape}")
    return "\n".join(lines)


def _has_optimizer(ckpt) -> bool:
    return all((Path(f.path).parent / legacy.OPTIMIZER_FILE).exists() for f in ckpt.files.values())
