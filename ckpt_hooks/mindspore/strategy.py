"""MindSpore strategy files, mapped onto the layout algebra: the box of each parameter every rank holds.

A strategy file (``strategy_ckpt_save_file``, MindFormers' ``ckpt_strategy_rank_{r}.ckpt``) is
the protobuf ``ParallelStrategyMap`` of ``mindspore/train/node_strategy_pb2.py`` or the same
content as JSON (``*.json``). Per parameter it gives ``dev_matrix``, ``tensor_map`` and the
optimizer sharding ``opt_weight_shard_size`` / ``_step``; the JSON form also ``tensor_shape``.
What they mean, as MindSpore's own slicing (``mindspore/parallel/_tensor.py``) does it:

* a pipeline stage holds ``n = prod(dev_matrix)`` ranks, stage s the ranks ``s*n .. s*n+n-1``;
  a rank's device coordinate is its index in the stage, in row-major order over ``dev_matrix``;
* ``tensor_map[i] = k`` splits axis i ``dev_matrix[-1-k]`` ways, by that coordinate; -1 does not
  split it; a list splits it by several device dimensions, the first outermost;
* optimizer sharding (saved unaggregated: size and step both non-zero): the ranks holding the
  same model-parallel slice, in rank order, form groups of ``size`` (-1: all of them), and the
  i-th rank of a group holds the i-th part of the slice's first axis. ``step`` only repeats this;
* with pipeline stages each stage saves its own file, whose parameters all live on the stage of
  its ``parallel_strategy_item``s; ``merge_pipeline_strategys`` writes them into one file as
  ``"{stage}-{name}"``. A parameter shared by stages (tied embeddings) is on all of them.

Parsing is done by hand (protobuf_wire): neither ``protobuf`` nor MindSpore is needed. The box
computation below the parsers is pure.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.protobuf_wire import field, integers, message, text
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


# ---- the layout algebra: pure -------------------------------------------------------------

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
    for size, dims, pieces in zip(shape, layout.tensor_map, splits(layout)):
        index = 0
        for k in dims:
            index = index * dev[-1 - k] + coords[-1 - k]
        offsets.append(index * (size // pieces))
        lengths.append(size // pieces)
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


# ---- reading strategy files -----------------------------------------------------------------

_MERGED_NAME = re.compile(r"(\d+)-(.+)", re.DOTALL)


@dataclass(frozen=True)
class _Entry:
    """One parallel_layout_item as the file states it."""

    name: str
    dev_matrix: list
    tensor_map: list  # per axis an int, or a list of ints (MindSpore's Layout API: several device dims)
    split_shape: list
    field: int
    opt_step: int
    opt_size: int
    shape: list | None


def read_strategy(path) -> Strategy:
    """A strategy file (protobuf, or JSON when named ``*.json``; per-stage or merged), or a
    directory of the per-stage files of a pipeline-parallel run."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".ckpt", ".json") and p.is_file())
        if not files:
            raise CheckpointError(path, "no strategy files (*.ckpt or *.json) in the directory")
    elif path.is_file():
        files = [path]
    else:
        raise CheckpointError(path, "strategy file not found")
    placed: dict[str, dict[int, ParamLayout]] = {}  # name -> stage -> layout
    for file in files:
        for name, stage, layout in _file_layouts(file, alone=len(files) == 1):
            known = placed.setdefault(name, {})
            if known.get(stage, layout) != layout:
                raise CheckpointError(file, f"{name}: its layout differs from that in another file of stage {stage}")
            known[stage] = layout
    return _strategy(path, placed)


def _file_layouts(path: Path, alone: bool) -> list[tuple[str, int, ParamLayout]]:
    try:
        stages, entries = (_json_entries if path.suffix == ".json" else _protobuf_entries)(path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # UnicodeDecodeError and JSONDecodeError too
        raise CheckpointError(path, f"not a MindSpore strategy file, or corrupt ({type(e).__name__}: {e})") from None
    if not entries:
        raise CheckpointError(path, "the strategy file holds no parameter layouts")
    merged = all(_MERGED_NAME.fullmatch(e.name) for e in entries)
    if not merged and len(set(stages)) > 1:
        raise CheckpointError(path, f"its operators are on several pipeline stages {sorted(set(stages))}")
    stage = stages[0] if stages else 0
    if alone and not merged and stage:
        raise CheckpointError(path, f"holds pipeline stage {stage} only: pass the directory of every stage's "
                                    "strategy files, or a file merged by merge_pipeline_strategys")
    out = []
    for entry in entries:
        name = entry.name
        if merged:  # "{stage}-{name}": split at the first "-" only, names may hold more
            stage, name = int(_MERGED_NAME.fullmatch(name)[1]), _MERGED_NAME.fullmatch(name)[2]
        try:
            out.append((name, stage, _layout(entry)))
        except ValueError as e:
            raise CheckpointError(path, f"{entry.name}: {e}") from None
    return out


def _protobuf_entries(path: Path) -> tuple[list[int], list[_Entry]]:
    """ParallelStrategyMap { 1 current_stage; 2 ParallelStrategyItem*; 3 ParallelLayoutItem* }."""
    buf = path.read_bytes()
    top = message(buf, 0, len(buf))
    stages = []
    for span in top.get(2, []):  # ParallelStrategyItem { 1 node_name; 2 ParallelStrategys { 1 stage; ... } }
        strategys = message(buf, *field(message(buf, *span), 2, tuple, "parallel_strategys"))
        stages.append(field(strategys, 1, int, "a strategy's stage"))
    entries = []
    for span in top.get(3, []):  # ParallelLayoutItem { 1 param_name; 2 ParallelLayouts }
        item = message(buf, *span)
        name = text(buf, field(item, 1, tuple, "param_name"))
        layouts = message(buf, *field(item, 2, tuple, f"{name}: parallel_layouts"))
        # ParallelLayouts { 1 DevMatrix*; 2 TensorMap*; 3 ParamSplitShape*; 4 IndicesOffset*; 5 field;
        #                   6 opt_weight_shard_step; 7 opt_weight_shard_size }
        tensor_maps = _dims(buf, layouts, 2, signed=True)
        nested = len(tensor_maps) > 1  # one TensorMap per axis; MindSpore adds an empty one after a single axis
        entries.append(_Entry(name, (_dims(buf, layouts, 1) or [[]])[0],
                              [m for m in tensor_maps if m] if nested else (tensor_maps or [[]])[0],
                              (_dims(buf, layouts, 3, signed=True) or [[]])[0],
                              *(integers(buf, layouts.get(number, [0])[-1:], signed=True)[0] for number in (5, 6, 7)),
                              None))
    return stages, entries


def _dims(buf, fields: dict, number: int, signed: bool = False) -> list[list[int]]:
    """The ``dim`` lists of a repeated message field whose messages are ``{ repeated dim = 1; }``."""
    return [integers(buf, message(buf, *span).get(1, []), signed) for span in fields.get(number, [])]


def _json_entries(path: Path) -> tuple[list[int], list[_Entry]]:
    content = json.loads(path.read_text())
    stages = [item["stage"] for item in (content.get("parallel_strategy_item") or {}).values()]
    entries = [_Entry(name, item["dev_matrix"], item["tensor_map"], item.get("param_split_shape", []),
                      item.get("field", 0), item.get("opt_weight_shard_step", 0), item.get("opt_weight_shard_size", 0),
                      item.get("tensor_shape"))
               for name, item in (content.get("parallel_layout_item") or {}).items()]
    return stages, entries


def _layout(entry: _Entry) -> ParamLayout:
    dev = tuple(int(d) for d in entry.dev_matrix)
    if not dev or min(dev) < 1:
        raise ValueError(f"bad dev_matrix {list(dev)}")
    tensor_map = tuple(tuple(int(k) for k in (d if isinstance(d, list) else [d]) if k != -1) for d in entry.tensor_map)
    used = [k for dims in tensor_map for k in dims]
    if any(not 0 <= k < len(dev) for k in used) or len(set(used)) != len(used):
        raise ValueError(f"tensor_map {entry.tensor_map} does not fit dev_matrix {list(dev)}")
    if entry.field or entry.split_shape:
        raise ValueError("field-split or manually split (param_split_shape) parameters are not supported")
    opt_size = 1
    if entry.opt_size and entry.opt_step:  # both are 0 when the checkpoint holds whole slices
        repeated = math.prod(dev) // math.prod(dev[-1 - k] for k in used)
        opt_size = repeated if entry.opt_size == -1 else entry.opt_size
        if opt_size < 1 or repeated % opt_size:
            raise ValueError(f"opt_weight_shard_size {entry.opt_size} does not divide the {repeated} ranks "
                             "that share each slice")
    shape = None if entry.shape is None else tuple(int(n) for n in entry.shape)
    return ParamLayout(dev, tensor_map, opt_size, shape=shape)


def _strategy(path: Path, placed: dict[str, dict[int, ParamLayout]]) -> Strategy:
    params = {}
    for name, by_stage in placed.items():
        layouts = set(by_stage.values())
        if len(layouts) > 1:
            raise CheckpointError(path, f"{name}: its layout differs between pipeline stages {sorted(by_stage)}")
        params[name] = replace(layouts.pop(), stages=tuple(sorted(by_stage)))
    per_stage = {layout.stage_devices for layout in params.values()}
    if len(per_stage) > 1:
        raise CheckpointError(path, f"parameters disagree on the ranks per pipeline stage {sorted(per_stage)}")
    stages = sorted({s for layout in params.values() for s in layout.stages})
    if stages != list(range(len(stages))):
        missing = sorted(set(range(stages[-1] + 1)) - set(stages))
        raise CheckpointError(path, f"no layouts for pipeline stage {missing[0]} (stages present: {stages})")
    return Strategy(str(path), params, per_stage.pop(), len(stages))
