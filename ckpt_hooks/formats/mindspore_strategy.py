"""MindSpore strategy files: the layout of every parameter, as a ``Strategy`` (algebra.mindspore_layout).

    protobuf  ParallelStrategyMap  { 1 current_stage; 2 ParallelStrategyItem*; 3 ParallelLayoutItem* }
              ParallelStrategyItem { 1 node_name; 2 ParallelStrategys { 1 stage; ... } }
              ParallelLayoutItem   { 1 param_name; 2 ParallelLayouts }
              ParallelLayouts      { 1 DevMatrix*; 2 TensorMap*; 3 ParamSplitShape*; 4 IndicesOffset*;
                                     5 field; 6 opt_weight_shard_step; 7 opt_weight_shard_size }
    JSON      {"current_stage", "parallel_strategy_item": {op: {"stage", ...}},
               "parallel_layout_item": {name: {"dev_matrix", "tensor_map", "tensor_shape", ...}}}

(``mindspore/train/node_strategy_pb2.py``; ``strategy_ckpt_save_file``, MindFormers'
``ckpt_strategy_rank_{r}.ckpt``; JSON when named ``*.json``.) Optimizer sharding is saved
unaggregated when ``opt_weight_shard_size`` and ``_step`` are both non-zero; ``size`` -1 means
all the ranks that share a slice, and ``step`` only repeats what the layout implies. With
pipeline stages each stage saves its own file, whose parameters all live on the stage of its
``parallel_strategy_item``s; ``merge_pipeline_strategys`` writes them into one file as
``"{stage}-{name}"``. Parsed by hand (protobuf_wire): neither ``protobuf`` nor MindSpore is needed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ckpt_hooks.algebra.mindspore_layout import ParamLayout, Strategy
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.protobuf_wire import field, integers, message, text

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
    """The stages and layout entries of a protobuf strategy file (the grammar above)."""
    buf = path.read_bytes()
    top = message(buf, 0, len(buf))
    stages = []
    for span in top.get(2, []):  # ParallelStrategyItem
        strategys = message(buf, *field(message(buf, *span), 2, tuple, "parallel_strategys"))
        stages.append(field(strategys, 1, int, "a strategy's stage"))
    entries = []
    for span in top.get(3, []):  # ParallelLayoutItem
        item = message(buf, *span)
        name = text(buf, field(item, 1, tuple, "param_name"))
        layouts = message(buf, *field(item, 2, tuple, f"{name}: parallel_layouts"))
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
    stages = [_integer(item["stage"], "a strategy's stage")
              for item in (content.get("parallel_strategy_item") or {}).values()]
    entries = [_Entry(name, _integers(item["dev_matrix"], f"{name}: dev_matrix"),
                      [_integers(d, f"{name}: tensor_map") if isinstance(d, list) else _integer(d, f"{name}: tensor_map")
                       for d in _list(item["tensor_map"], f"{name}: tensor_map")],
                      item.get("param_split_shape", []),
                      *(_integer(item.get(key, 0), f"{name}: {key}")
                        for key in ("field", "opt_weight_shard_step", "opt_weight_shard_size")),
                      None if item.get("tensor_shape") is None else _integers(item["tensor_shape"], f"{name}: tensor_shape"))
               for name, item in (content.get("parallel_layout_item") or {}).items()]
    return stages, entries


# A JSON file's values, checked to be of the types the protobuf grammar gives.
def _integer(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} is not an integer")
    return value


def _list(value, what: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{what} is not a list")
    return value


def _integers(values, what: str) -> list[int]:
    return [_integer(v, what) for v in _list(values, what)]


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
        missing = next(s for s in range(len(stages) + 1) if s not in stages)   # not range(stages[-1]): it may be huge
        raise CheckpointError(path, f"no layouts for pipeline stage {missing} (stages present: {stages})")
    return Strategy(str(path), params, per_stage.pop(), len(stages))
