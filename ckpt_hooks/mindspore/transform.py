"""Offline resharding of MindSpore checkpoints between strategies: what
``mindspore.transform_checkpoints`` and ``transform_checkpoint_by_rank`` do, planned with boxes.

A target tensor is its box cut out of the boxes the source ranks hold (one rank for each
distinct box: replicas are read once), reading from the mapped source files only the rows
each piece needs. Each worker writes one target file at a time (a ``.ckpt`` one tensor at a
time), into a temporary sibling of the save directory renamed into place when all is written.
Output is laid out as MindSpore's: ``rank_{r}/{prefix}{r}.ckpt`` (or ``.safetensors``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import mindspore_ckpt, ms_safetensors
from ckpt_hooks.formats.mindspore_ckpt import MappedFile
from ckpt_hooks.algebra.layout import Box, LayoutError
from ckpt_hooks.mindspore.files import READERS, RANK_DIR, latest_checkpoint, open_checkpoint, rank_dirs
from ckpt_hooks.mindspore.strategy import ParamLayout, Strategy, box, check_shape, global_shape, rank_boxes, \
    read_strategy
from ckpt_hooks.engine.run import Report, run
from ckpt_hooks.formats.atomic import refuse_non_empty, staged_directory

DEFAULT_PREFIX = "checkpoint_"  # MindFormers' (transform_checkpoints requires one)


@dataclass(frozen=True)
class Piece:
    """A copy: ``box`` (global coordinates) from the tensor of source ``rank``, which holds ``held``."""

    rank: int
    held: Box
    box: Box


@dataclass(frozen=True)
class TargetTensor:
    name: str
    dtype: np.dtype
    box: Box
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return self.box.numel * self.dtype.itemsize


@dataclass(frozen=True)
class TargetFile:
    rank: int
    tensors: tuple[TargetTensor, ...]
    strings: dict  # a .ckpt's string entries (append_dict), carried to every rank


@dataclass(frozen=True)
class _SourceTensor:
    dtype: np.dtype
    shape: tuple[int, ...]
    held: dict[Box, int]  # each distinct box -> the lowest rank holding it
    sharded: bool         # named by the strategies: MindSpore writes these first


# ---- the source checkpoint ------------------------------------------------------------------

def is_mindspore_source(path) -> bool:
    """A ``.ckpt``/``.safetensors`` file, or a directory holding such files or ``rank_N/`` directories."""
    path = Path(path)
    if path.is_file():
        return path.suffix in READERS
    return path.is_dir() and any(p.suffix in READERS or (RANK_DIR.fullmatch(p.name) and p.is_dir())
                                 for p in path.iterdir())


def open_source(load_dir, world: int) -> dict[int, MappedFile]:
    """The file of every rank of a ``rank_N/`` tree, opened lazily; or, for a complete checkpoint
    (``world`` 1), the file given, or the one in ``load_dir`` or its ``rank_0/``."""
    root = Path(load_dir)
    if root.is_file():
        paths = {0: root}
    elif root.is_dir():
        ranks = rank_dirs(root)
        if not ranks and world == 1:
            paths = {0: latest_checkpoint(root)}
        else:
            missing = [rank for rank in range(world) if rank not in ranks]
            if missing:
                raise CheckpointError(root / f"rank_{missing[0]}", f"missing rank directory (the source strategy "
                                                                   f"describes {world} ranks)")
            paths = {rank: latest_checkpoint(ranks[rank]) for rank in range(world)}
    else:
        raise CheckpointError(root, "checkpoint not found")
    if len({p.suffix for p in paths.values()}) > 1:
        raise CheckpointError(root, "mixes .ckpt and .safetensors files")
    return {rank: open_checkpoint(p) for rank, p in paths.items()}


# ---- planning -------------------------------------------------------------------------------

def plan(files: dict[int, MappedFile], src: Strategy | None, dst: Strategy | None,
         ranks: list[int] | None = None) -> list[TargetFile]:
    """What every target rank (or those of ``ranks``) holds, and where each piece comes from.
    Tensors a strategy does not name are held whole, by every rank."""
    sources = _source_tensors(files, src, dst)
    # .ckpt string entries (safetensors have none), from the lowest rank
    strings = {k: v for f in reversed(files.values()) for k, v in getattr(f, "strings", {}).items()}
    world = dst.world if dst else 1
    targets = []
    for rank in range(world) if ranks is None else ranks:
        tensors = []
        for name, source in sources.items():
            layout = dst.params.get(name) if dst else None
            if layout is None:
                wanted = Box((0,) * len(source.shape), source.shape)
            elif rank // layout.stage_devices not in layout.stages:
                continue
            else:
                try:
                    check_shape(layout, source.shape)
                except LayoutError as e:
                    raise CheckpointError(dst.path, f"{name}: {e}") from None
                wanted = box(layout, source.shape, rank % layout.stage_devices)
            pieces = tuple(Piece(r, held, cut) for held, r in source.held.items() if (cut := wanted.intersect(held)))
            tensors.append(TargetTensor(name, source.dtype, wanted, pieces))
        targets.append(TargetFile(rank, tuple(tensors), strings))
    return targets


def _source_tensors(files: dict[int, MappedFile], src: Strategy | None,
                    dst: Strategy | None) -> dict[str, _SourceTensor]:
    # MindSpore's order: the tensors as first seen from the last rank down (pipeline stages hold
    # different ones), those both strategies name first
    names = list(dict.fromkeys(name for f in reversed(files.values()) for name in f.tensors))
    for f in files.values():
        if getattr(f, "map_parameters", None):  # .ckpt only
            raise CheckpointError(f.path, f"{f.map_parameters[0]}: MapParameters cannot be resharded")
    if src and names and not any(name in src.params for name in names):
        raise CheckpointError(src.path, f"names none of the checkpoint's tensors (such as {names[0]!r}): "
                                        "a strategy of another model?")
    out = {}
    for name in names:
        layout = src.params.get(name) if src else None
        found = _locate(files, name, layout)
        if found is not None:
            sharded = (not src or name in src.params) and (not dst or name in dst.params)
            out[name] = _SourceTensor(*found, sharded)
    return dict(sorted(out.items(), key=lambda item: not item[1].sharded))


def _locate(files: dict[int, MappedFile], name: str, layout: ParamLayout | None):
    """(dtype, global shape, {distinct box: lowest rank}) of a source tensor; None when the
    ranks the strategy places it on do not have it (MindSpore skips those too)."""
    if layout is None:  # whole on every rank that has it
        expected = [r for r in files if name in files[r].tensors]
    else:
        n = layout.stage_devices
        expected = [s * n + local for s in layout.stages for local in range(n)]
    present = [r for r in expected if name in files[r].tensors]
    if not present:
        return None
    if len(present) < len(expected):
        lacking = next(r for r in expected if r not in present)
        raise CheckpointError(files[lacking].path, f"no tensor {name!r}, which the strategy places on rank {lacking}")
    first = files[present[0]].tensors[name]
    if layout is None:
        shape, boxes = first.shape, {r: Box((0,) * len(first.shape), first.shape) for r in present}
    else:
        try:
            shape = global_shape(layout, first.shape)
        except LayoutError as e:
            raise CheckpointError(files[present[0]].path, f"{name}: shape {list(first.shape)} does not fit "
                                                          f"the source strategy ({e})") from None
        if layout.shape is not None and layout.shape != shape:
            raise CheckpointError(files[present[0]].path, f"{name}: pieces of shape {list(first.shape)} make "
                                                          f"{list(shape)}, the strategy says {list(layout.shape)}")
        boxes = rank_boxes(layout, shape)
    held = {}
    for r in present:
        t = files[r].tensors[name]
        if t.shape != boxes[r].lengths or t.dtype != first.dtype:
            raise CheckpointError(files[r].path, f"{name}: {t.dtype} {list(t.shape)}, but rank {present[0]} "
                                                 f"has {first.dtype} {list(first.shape)} and the strategy gives "
                                                 f"rank {r} {list(boxes[r].lengths)} of {list(shape)}")
        held.setdefault(boxes[r], r)
    return first.dtype, shape, held


# ---- writing --------------------------------------------------------------------------------

def _read(files: dict[int, MappedFile], name: str, piece: Piece) -> np.ndarray:
    """A piece, reading only its rows of the source (a view of the map where possible)."""
    slices = piece.box.slices_within(piece.held)
    if not slices:
        return files[piece.rank].read(name)
    return files[piece.rank].read(name, rows=slices[0])[(slice(None),) + slices[1:]]


def build(files: dict[int, MappedFile], tensor: TargetTensor) -> np.ndarray:
    """A target tensor; the source's own view when one piece is the whole of it."""
    if len(tensor.pieces) == 1 and tensor.pieces[0].box == tensor.box:
        return _read(files, tensor.name, tensor.pieces[0])
    out = np.empty(tensor.box.lengths, tensor.dtype)
    for piece in tensor.pieces:
        out[piece.box.slices_within(tensor.box)] = _read(files, tensor.name, piece)
    return out


def write_target(files: dict[int, MappedFile], target: TargetFile, path: Path, progress=None,
                 build_tensor=build) -> None:
    """One target file, in the format its suffix names, written atomically; each tensor made by
    ``build_tensor(files, tensor)`` (ckpt_hooks.converters.lora's merges adapters in)."""
    def tensors():
        for tensor in target.tensors:
            yield tensor.name, build_tensor(files, tensor)
            if progress is not None:
                progress.update(tensor.nbytes)

    if path.suffix == ".ckpt":
        mindspore_ckpt.save(path, itertools.chain(tensors(), target.strings.items()))
    else:  # a source view may be strided (a column piece). Not ascontiguousarray: it makes scalars 1-D
        ms_safetensors.save(path, {name: np.require(array, requirements="C") for name, array in tensors()})


def check_format(targets: list[TargetFile], output_format: str, load_dir) -> None:
    if output_format == "safetensors" and targets and targets[0].strings:
        raise CheckpointError(load_dir, f"{next(iter(targets[0].strings))}: a string entry, which safetensors "
                                        "cannot hold")


def _strategies(src_strategy, dst_strategy) -> tuple[Strategy | None, Strategy | None]:
    return (read_strategy(src_strategy) if src_strategy else None,
            read_strategy(dst_strategy) if dst_strategy else None)


def transform_checkpoints(load_dir, save_dir, src_strategy=None, dst_strategy=None, *, prefix: str = DEFAULT_PREFIX,
                          output_format: str | None = None, process_num: int = 1, quiet: bool = False) -> Report:
    """Reshard the checkpoint in ``load_dir`` (a ``rank_N/`` tree, or one complete file) from
    ``src_strategy`` to ``dst_strategy`` (strategy files or directories; None: one complete
    checkpoint) into ``save_dir/rank_{r}/{prefix}{r}.{output_format}`` (default: the source's
    format), ``process_num`` target files at a time (threads: NumPy's copies and the writes run
    without the GIL). ``save_dir`` must not exist or be empty."""
    refuse_non_empty(save_dir)
    if "/" in prefix or prefix in (".", ".."):
        raise CheckpointError(save_dir, f"prefix {prefix!r} must be a file name prefix")
    started = time.perf_counter()
    src, dst = _strategies(src_strategy, dst_strategy)
    files = open_source(load_dir, src.world if src else 1)
    output_format = output_format or Path(files[0].path).suffix[1:]
    if f".{output_format}" not in READERS:
        raise CheckpointError(save_dir, f"output format {output_format!r} is neither ckpt nor safetensors")
    targets = plan(files, src, dst)
    check_format(targets, output_format, load_dir)
    total = sum(t.nbytes for target in targets for t in target.tensors)
    with staged_directory(save_dir) as root:
        def write(target: TargetFile, progress) -> None:
            directory = root / f"rank_{target.rank}"
            directory.mkdir()
            write_target(files, target, directory / f"{prefix}{target.rank}.{output_format}", progress)

        run(targets, write, total, workers=process_num, quiet=quiet, label=f"{len(files)} -> {len(targets)} ranks")
    return Report(f"{len(files)} ranks", f"{len(targets)} ranks", len(targets), total, time.perf_counter() - started)


def transform_checkpoint_by_rank(rank_id: int, load_dir, save_file, src_strategy=None, dst_strategy=None) -> None:
    """Write only target rank ``rank_id``'s file, ``save_file`` (``.ckpt`` or ``.safetensors``)."""
    src, dst = _strategies(src_strategy, dst_strategy)
    world = dst.world if dst else 1
    if not 0 <= rank_id < world:
        raise CheckpointError(dst.path if dst else save_file, f"rank {rank_id} is not among the {world} target ranks")
    if Path(save_file).suffix not in READERS:
        raise CheckpointError(save_file, "the file name must end in .ckpt or .safetensors")
    files = open_source(load_dir, src.world if src else 1)
    targets = plan(files, src, dst, [rank_id])
    check_format(targets, Path(save_file).suffix[1:], load_dir)
    write_target(files, targets[0], Path(save_file))
