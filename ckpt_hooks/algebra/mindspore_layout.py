"""MindSpore's parallel layouts as boxes: which box of each parameter every rank holds.

A strategy gives per parameter ``dev_matrix``, ``tensor_map`` and the optimizer sharding
(``opt_weight_shard_size``). What they mean, as MindSpore's own slicing
(``mindspore/parallel/_tensor.py``) does it:

* a pipeline stage holds ``n = prod(dev_matrix)`` ranks, stage s the ranks ``s*n .. s*n+n-1``;
  a rank's device coordinate is its index in the stage, in row-major order over ``dev_matrix``;
* ``tensor_map[i] = k`` splits axis i ``dev_matrix[-1-k]`` ways, by that coordinate; -1 does not
  split it; a list splits it by several device dimensions, the first outermost;
* optimizer sharding (saved unaggregated): the ranks holding the same model-parallel slice, in
  rank order, form groups of ``size``, and the i-th rank of a group holds the i-th part of the
  slice's first axis;
* a parameter lives on the pipeline stages listed for it (several: shared, as tied embeddings);
  a parameter the strategy does not name is held whole by every rank.

Pure: no I/O, no framework imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ckpt_hooks.algebra.layout import Box, LayoutError


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is spread over the ranks."""

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[tuple[int, ...], ...]  # per axis: the device dims (from the right) splitting it, outer first
    opt_shard_size: int = 1                  # ranks sharing a model-parallel slice's first axis
    stages: tuple[int, ...] = (0,)
    shape: tuple[int, ...] | None = None     # the global shape, where the file states it

    @property
    def stage_devices(self) -> int:
        return math.prod(self.dev_matrix)


@dataclass(frozen=True)
class Strategy:
    path: str
    params: dict[str, ParamLayout]
    stage_devices: int
    stages: int

    @property
    def world(self) -> int:
        return self.stage_devices * self.stages

    def box_of(self, name: str, shape: tuple[int, ...], rank: int) -> Box | None:
        """The box of parameter ``name`` (of global ``shape``) that ``rank`` holds: all of it when
        the strategy does not name it, None when the rank's pipeline stage does not hold it.
        LayoutError when the layout cannot cut ``shape``."""
        layout = self.params.get(name)
        if layout is None:
            return whole(shape)
        if rank // layout.stage_devices not in layout.stages:
            return None
        check_shape(layout, shape)
        return box(layout, shape, rank % layout.stage_devices)


def whole(shape: tuple[int, ...]) -> Box:
    return Box((0,) * len(shape), tuple(shape))


def splits(layout: ParamLayout) -> tuple[int, ...]:
    """How many model-parallel pieces each axis is cut into."""
    dev = layout.dev_matrix
    return tuple(math.prod(dev[-1 - k] for k in dims) for dims in layout.tensor_map)


def pieces(layout: ParamLayout, ndim: int) -> tuple[int, ...]:
    """How many pieces each axis of a tensor with ``ndim`` axes is cut into, optimizer sharding included."""
    if len(layout.tensor_map) != ndim:
        raise LayoutError(f"its tensor_map has {len(layout.tensor_map)} axes, the tensor {ndim}")
    out = list(splits(layout))
    if out:
        out[0] *= layout.opt_shard_size
    return tuple(out)


def global_shape(layout: ParamLayout, local_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The whole tensor's shape, from the shape of one rank's piece."""
    return tuple(n * p for n, p in zip(local_shape, pieces(layout, len(local_shape))))


def check_shape(layout: ParamLayout, shape: tuple[int, ...]) -> None:
    """Fail, saying why, when the layout cannot split a tensor of ``shape`` evenly."""
    cuts = pieces(layout, len(shape))
    if any(n % p for n, p in zip(shape, cuts)):
        raise LayoutError(f"cannot cut shape {list(shape)} into {list(cuts)} pieces")


def box(layout: ParamLayout, shape: tuple[int, ...], local_rank: int) -> Box:
    """The part of a tensor of ``shape`` held by rank ``local_rank`` of a stage."""
    dev = layout.dev_matrix
    coords, rest = [0] * len(dev), local_rank
    for i in reversed(range(len(dev))):  # row-major: the last device dim varies fastest
        rest, coords[i] = divmod(rest, dev[i])
    offsets, lengths = [], []
    for size, dims, ways in zip(shape, layout.tensor_map, splits(layout)):
        index = 0
        for k in dims:
            index = index * dev[-1 - k] + coords[-1 - k]
        offsets.append(index * (size // ways))
        lengths.append(size // ways)
    if layout.opt_shard_size > 1:
        used = {len(dev) - 1 - k for dims in layout.tensor_map for k in dims}
        position = 0  # among the ranks that hold the same model-parallel slice, in rank order
        for i, d in enumerate(dev):
            if i not in used:
                position = position * d + coords[i]
        lengths[0] //= layout.opt_shard_size
        offsets[0] += position % layout.opt_shard_size * lengths[0]
    return Box(tuple(offsets), tuple(lengths))


def rank_boxes(layout: ParamLayout, shape: tuple[int, ...]) -> dict[int, Box]:
    """Every rank that holds the parameter (on any of its stages) -> its box."""
    n = layout.stage_devices
    return {stage * n + local: box(layout, shape, local) for stage in layout.stages for local in range(n)}
