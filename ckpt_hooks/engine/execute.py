"""Runs a plan: builds each target file from slices of source tensors, with bounded memory.

Each worker writes one target file, one tensor at a time; source bytes are read with
``pread`` only for the rows a copy needs. Peak memory is about ``workers x (largest target
tensor + the source rows it needs)``, whatever the size of the files.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Callable

import torch

from ckpt_hooks.formats.torch_pickle import LazyTensor, PendingTensor, TorchFile, contiguous_strides
from ckpt_hooks.engine.plan import Copy, TargetFile, TargetTensor

# (file, chunk, key) -> the lazy tensor holding it
SourceLookup = Callable[[tuple[int, int], str, str], tuple[TorchFile, LazyTensor]]


def copy_piece(lookup: SourceLookup, copy: Copy, target: torch.Tensor, exact: bool = False) -> None:
    """Copy the part of a source tensor a copy needs into ``target`` (the copy's target slice).

    The part is one run of elements per index of the axes before its innermost partial axis.
    ``exact`` reads just those runs (a rank reading its share); otherwise one read covers them
    all, gaps included, which is much faster when the runs are many and short."""
    src = copy.source
    torch_file, lazy = lookup(src.file, src.chunk, src.key)
    view, slices = src.placement.view_shape, copy.source_slices
    if not lazy.is_contiguous():
        target.copy_(torch_file.read(lazy).view(view)[slices])
        return
    partial = [a for a, (s, n) in enumerate(zip(slices, view)) if (s.start, s.stop) != (0, n)]
    inner = partial[-1] if partial else 0
    strides = contiguous_strides(view)
    run_numel = (slices[inner].stop - slices[inner].start) * strides[inner]
    starts = [sum(i * st for i, st in zip(index, strides)) + slices[inner].start * strides[inner]
              for index in itertools.product(*(range(s.start, s.stop) for s in slices[:inner]))]
    if exact or len(starts) == 1:
        buffer = target if target.is_contiguous() else torch.empty(target.shape, dtype=target.dtype)
        torch_file.read_runs(lazy, starts, run_numel, buffer)
    else:
        covering = torch.empty(starts[-1] + run_numel - starts[0], dtype=target.dtype)
        torch_file.read_runs(lazy, [starts[0]], covering.numel(), covering)
        shape = [s.stop - s.start for s in slices[:inner + 1]] + list(view[inner + 1:])
        buffer = covering.as_strided(shape, strides, 0)
    if buffer is not target:
        target.copy_(buffer.reshape(target.shape))


def build_tensor(lookup: SourceLookup, tensor: TargetTensor, exact: bool = False) -> torch.Tensor | None:
    """A target tensor, built from its copies (``exact``: read no byte it does not need)."""
    if tensor.placement is None:
        return None
    alloc = torch.empty if tensor.complete else torch.zeros
    out = alloc(tensor.placement.stored_shape, dtype=tensor.dtype)
    view = out.view(tensor.placement.view_shape)
    for copy in tensor.copies:
        copy_piece(lookup, copy, view[copy.target_slices], exact)
    return out


def pending_file(lookup: SourceLookup, target: TargetFile, progress=None) -> "OrderedDict[str, OrderedDict]":
    """{chunk: {key: PendingTensor}} for one target file: each tensor is built only when the
    writer asks for it, so one tensor of the file is in memory at a time."""
    def produce(tensor: TargetTensor):
        def build():
            out = build_tensor(lookup, tensor)
            if progress is not None:
                progress.update(tensor.nbytes)
            return out
        return build

    chunks: OrderedDict[str, OrderedDict] = OrderedDict()
    for tensor in target.tensors:
        entry = None if tensor.placement is None else \
            PendingTensor(tensor.placement.stored_shape, tensor.dtype, produce(tensor))
        chunks.setdefault(tensor.chunk, OrderedDict())[tensor.key] = entry
    return chunks
