"""megatron-core's legacy grouped-GEMM experts (``GroupedMLP``: ``--moe-grouped-gemm``, local layer
spec) under SequentialMLP's names.

A GroupedMLP layer keeps its E local experts in two tensors, which it reads as
``weight1.view(E, hidden, -1)`` and ``weight2.view(E, -1, hidden)``::

    mlp.experts.weight1  [hidden, E * rows]   block i = expert i's linear_fc1.weight [rows, hidden], transposed
    mlp.experts.weight2  [E * cols, hidden]   block i = expert i's linear_fc2.weight [hidden, cols], transposed

(rows and cols: the expert-tensor-parallel shard's, [gate; up] rows with SwiGLU as SequentialMLP's).
:func:`ungroup` sees each block, in place, as the SequentialMLP tensor it stands for
(``mlp.experts.local_experts.{i}.linear_fc1.weight``): a strided view, so the planner and the
optimizer path (whose flat buffers hold the same blocks in the same order) need no other case;
:func:`group` packs SequentialMLP tensors back. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import replace

import torch

from ckpt_hooks.algebra.param_map import BufferMap, ParamSlot
from ckpt_hooks.engine.source import TensorMeta
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.torch_pickle import LazyTensor, contiguous_strides

_GROUPED = re.compile(r"(?P<prefix>(?:.*\.)?mlp\.experts\.)weight(?P<n>[12])")
_MEMBER = re.compile(r"(?P<prefix>(?:.*\.)?mlp\.experts\.)local_experts\.(?P<i>\d+)\.linear_fc(?P<n>[12])\.weight")
_MEMBER_EXTRA = re.compile(r"(?:.*\.)?mlp\.experts\.local_experts\.\d+\.linear_fc[12]\._extra_state")


def is_grouped(key: str) -> bool:
    return _GROUPED.fullmatch(key) is not None


def members(key: str, experts: int) -> list[str]:
    """The SequentialMLP keys a grouped tensor's blocks stand for, in expert order."""
    m = _GROUPED.fullmatch(key)
    return [f"{m['prefix']}local_experts.{i}.linear_fc{m['n']}.weight" for i in range(experts)]


def block_shape(key: str, shape: tuple, experts: int) -> tuple[int, int] | None:
    """The SequentialMLP shape of each block of a grouped tensor (None: it does not split into
    ``experts`` blocks)."""
    rows, cols = shape
    if _GROUPED.fullmatch(key)["n"] == "1":
        return (cols // experts, rows) if cols % experts == 0 else None
    return (cols, rows // experts) if rows % experts == 0 else None


def ungroup(key: str, tensor: LazyTensor, experts: int) -> list[tuple[str, LazyTensor]]:
    """A contiguous grouped tensor's blocks as SequentialMLP tensors: (key, strided view) each."""
    shape = block_shape(key, tensor.shape, experts)
    return [(name, view(tensor, i * shape[0] * shape[1], shape, True))
            for i, name in enumerate(members(key, experts))]


def view(flat: LazyTensor, offset: int, shape: tuple, transposed: bool = False) -> LazyTensor:
    """Elements [offset, offset + numel) of a stored tensor seen in ``shape``: row-major, or as the
    transpose of the row-major ``shape[::-1]`` (a 2-D block of a grouped tensor)."""
    strides = contiguous_strides(shape[::-1])[::-1] if transposed else contiguous_strides(shape)
    return LazyTensor(flat.storage, flat.offset + offset, tuple(shape), strides)


def unpacked(buffer_map: BufferMap, experts: int, where=None) -> list[ParamSlot]:
    """A buffer's parameters with each grouped tensor replaced by its ``experts`` blocks, each the
    range of one expert's SequentialMLP tensor, stored transposed. ``where`` names the param_map's
    file in the error for a grouped tensor that does not hold ``experts`` blocks."""
    slots = []
    for slot in buffer_map.params:
        if not is_grouped(slot.name):
            slots.append(slot)
            continue
        shape = block_shape(slot.name, slot.shape, experts)
        if shape is None:
            raise CheckpointError(where, f"param_map: '{slot.name}' of shape {list(slot.shape)} does not hold "
                                         f"{experts} experts")
        size = shape[0] * shape[1]
        slots += [replace(slot, name=name, shape=shape, start=slot.start + i * size,
                          end=slot.start + (i + 1) * size, transposed=True)
                  for i, name in enumerate(members(slot.name, experts))]
    return slots


def packed(slot: ParamSlot, tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's tensor flattened as its buffer range holds it."""
    return tensor.reshape(slot.shape).t().reshape(-1) if slot.transposed else tensor.reshape(-1)


def ungroup_chunk(chunk: dict, experts: int) -> OrderedDict | None:
    """A model chunk with each layer's grouped tensors replaced by what a SequentialMLP chunk holds
    there, in its order (expert by expert: fc1, fc2, each weight with its empty ``_extra_state``);
    None when the chunk holds no grouped tensor. Raises ValueError for a layer that holds one
    grouped tensor without the other, or blocks that do not split into ``experts``."""
    if not any(is_grouped(k) for k in chunk):
        return None
    if experts < 1:
        raise ValueError(f"'{next(k for k in chunk if is_grouped(k))}' but the args give no experts per rank")
    out = OrderedDict()
    for key, value in chunk.items():
        if not is_grouped(key):
            out[key] = value
            continue
        pair = [key[:-1] + "1", key[:-1] + "2"]
        if any(k not in chunk for k in pair):
            raise ValueError(f"'{key}' without '{next(k for k in pair if k not in chunk)}'")
        if key == pair[1]:
            continue   # ungrouped with weight1
        for k in pair:
            if not isinstance(chunk[k], LazyTensor) or len(chunk[k].shape) != 2 or not chunk[k].is_contiguous():
                raise ValueError(f"'{k}' is not a contiguous 2-D tensor")
            if block_shape(k, chunk[k].shape, experts) is None:
                raise ValueError(f"'{k}' of shape {chunk[k].shape} does not hold {experts} experts")
        fc1, fc2 = (ungroup(k, chunk[k], experts) for k in pair)
        for (name1, block1), (name2, block2) in zip(fc1, fc2):
            out.update({name1: block1, _extra_state(name1): None, name2: block2, _extra_state(name2): None})
    return out


def _extra_state(weight_key: str) -> str:
    return weight_key.removesuffix("weight") + "_extra_state"


def grouped_keys(keys) -> OrderedDict[str, list[str]]:
    """SequentialMLP keys of a chunk regrouped as GroupedMLP holds them: {key: [key]} for other
    keys, {grouped key: its experts' keys, in expert order} for the routed experts' weights at
    the place of the layer's first expert (their ``_extra_state`` entries dropped)."""
    out: OrderedDict[str, list[str]] = OrderedDict()
    for key in keys:
        m = _MEMBER.fullmatch(key)
        if m is None and _MEMBER_EXTRA.fullmatch(key):
            continue
        out.setdefault(f"{m['prefix']}weight{m['n']}" if m else key, []).append(key)
    for grouped, names in out.items():
        if is_grouped(grouped):
            names.sort(key=lambda k: int(_MEMBER.fullmatch(k)["i"]))
    return out


def grouped_metas(metas: dict) -> OrderedDict:
    """A SequentialMLP chunk's {key: TensorMeta or None} as GroupedMLP's (``grouped_keys``)."""
    out = OrderedDict()
    for key, names in grouped_keys(metas).items():
        first = metas[names[0]]
        out[key] = TensorMeta(grouped_shape(key, tuple(first.shape), len(names)), first.dtype) \
            if is_grouped(key) else first
    return out


def grouped_entries(entries: dict, produce) -> OrderedDict:
    """A SequentialMLP chunk's entries as GroupedMLP's, each grouped tensor ``produce(key,
    member keys)`` (built when written)."""
    return OrderedDict((key, produce(key, names) if is_grouped(key) else entries[key])
                       for key, names in grouped_keys(entries).items())


def grouped_shape(key: str, block: tuple[int, int], experts: int) -> tuple[int, int]:
    """The shape of a grouped tensor of ``experts`` blocks of SequentialMLP shape ``block``."""
    rows, cols = block
    return (cols, experts * rows) if _GROUPED.fullmatch(key)["n"] == "1" else (experts * cols, rows)


def group(key: str, blocks: list[torch.Tensor]) -> torch.Tensor:
    """The grouped tensor of the experts' SequentialMLP tensors ``blocks``."""
    stacked = torch.stack([b.t() for b in blocks])   # [E, hidden, rows] or [E, cols, hidden]: megatron-core's view
    return stacked.reshape(grouped_shape(key, tuple(blocks[0].shape), len(blocks)))
