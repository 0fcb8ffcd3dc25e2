"""Runs a plan: builds each target file from slices of source tensors, with bounded memory.

One target file is in flight per worker; source bytes are read with ``pread`` only for the
rows a copy needs, so peak memory is about ``workers x largest target file``.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from tqdm import tqdm

from ckpt_hooks.formats.torch_pickle import LazyTensor, TorchFile
from ckpt_hooks.plan import Copy, TargetFile, TargetTensor

# (file, chunk, key) -> the lazy tensor holding it
SourceLookup = Callable[[tuple[int, int], str, str], tuple[TorchFile, LazyTensor]]


def read_piece(lookup: SourceLookup, copy: Copy) -> torch.Tensor:
    """The part of a source tensor a copy needs, reading only the rows that hold it."""
    src = copy.source
    torch_file, lazy = lookup(src.file, src.chunk, src.key)
    view = src.placement.view_shape
    rows_per_item = view[1] if len(src.placement.stored_shape) < len(view) else 1  # fused first two axes
    first = copy.source_slices[0]
    rows = slice(first.start * rows_per_item, first.stop * rows_per_item)
    data = torch_file.read(lazy, rows).view((first.stop - first.start,) + tuple(view[1:]))
    return data[(slice(None),) + copy.source_slices[1:]]


def build_tensor(lookup: SourceLookup, tensor: TargetTensor) -> torch.Tensor | None:
    if tensor.placement is None:
        return None
    alloc = torch.empty if tensor.complete else torch.zeros
    out = alloc(tensor.placement.stored_shape, dtype=tensor.dtype)
    view = out.view(tensor.placement.view_shape)
    for copy in tensor.copies:
        view[copy.target_slices].copy_(read_piece(lookup, copy))
    return out


def build_file(lookup: SourceLookup, target: TargetFile, progress=None) -> "OrderedDict[str, OrderedDict]":
    """{chunk: {key: tensor}} for one target file."""
    chunks: OrderedDict[str, OrderedDict] = OrderedDict()
    for tensor in target.tensors:
        chunks.setdefault(tensor.chunk, OrderedDict())[tensor.key] = build_tensor(lookup, tensor)
        if progress is not None:
            progress.update(tensor.nbytes)
    return chunks


def run(plan: list[TargetFile], lookup: SourceLookup, write: Callable[[TargetFile, OrderedDict], None],
        workers: int = 2, quiet: bool = False, label: str = "convert") -> None:
    """Build and write every target file, ``workers`` files at a time."""
    total = sum(f.nbytes for f in plan)
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, disable=quiet, dynamic_ncols=True) as bar:
        def one(target: TargetFile):
            write(target, build_file(lookup, target, bar))

        if workers <= 1 or len(plan) == 1:
            for target in plan:
                one(target)
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for result in [pool.submit(one, target) for target in plan]:
                result.result()
