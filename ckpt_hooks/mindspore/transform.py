"""Offline resharding of MindSpore checkpoints between strategies: what
``mindspore.transform_checkpoints`` and ``transform_checkpoint_by_rank`` do, on the engine.

    source  rank files (``rank_N/``) under the source strategy -> {name: Tensor}, each rank's
            tensor a box of the global one; ranks holding equal boxes are replicas, in rank order
            (the lowest is read)
    sink    each rank of the target strategy -> one file, ``rank_{r}/{prefix}{r}.ckpt`` (or
            ``.safetensors``): its box of every tensor, in MindSpore's order (the tensors as first
            seen from the last source rank down, those both strategies name first), and the
            source's string entries; beside it its manifest (``mindspore.manifest``: the boxes,
            each tensor's CRC-32 taken while writing)

Tensors a strategy does not name are held whole, by every rank. A source file with a manifest
is checked against it, its tensors' bytes against their CRC-32s included. Each target tensor is planned
(``engine.plan``) and built (``engine.execute``) from the mapped source files, reading only the
rows each piece needs. Each worker writes one target file at a time (a ``.ckpt`` one tensor at
a time), into a temporary sibling of the save directory renamed into place when all is written;
under torchrun each process writes its share of the files (engine.ranks).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_hooks.algebra.layout import LayoutError, Placement
from ckpt_hooks.algebra.mindspore_layout import Strategy, global_shape, rank_boxes, whole
from ckpt_hooks.engine.execute import build_tensor
from ckpt_hooks.engine.plan import TargetFile, plan_tensor
from ckpt_hooks.engine.ranks import write_shared
from ckpt_hooks.engine.run import Report
from ckpt_hooks.engine.source import Source, Tensor
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import mindspore_ckpt, ms_safetensors
from ckpt_hooks.formats.atomic import refuse_non_empty
from ckpt_hooks.formats.mindspore_ckpt import MappedFile, PendingArray
from ckpt_hooks.formats.mindspore_strategy import read_strategy
from ckpt_hooks.formats.paths import check_links
from ckpt_hooks.mindspore import manifest
from ckpt_hooks.mindspore.files import READERS, RANK_DIR, MappedTensor, latest_checkpoint, open_checkpoint, rank_dirs

DEFAULT_PREFIX = "checkpoint_"  # MindFormers' (transform_checkpoints requires one)


@dataclass
class MindSporeSource:
    """A checkpoint's rank files, read under its strategy (None: one complete checkpoint)."""

    files: dict[int, MappedFile]
    strategy: Strategy | None
    tensors: Source
    strings: dict[str, str]   # a .ckpt's string entries (append_dict), carried to every rank
    manifests: dict[int, dict]   # rank -> its file's manifest, where it has one (checked)

    def roles(self) -> dict[str, str]:
        """Each tensor's role as the manifests say (none without them)."""
        return {name: t["role"] for m in self.manifests.values() for name, t in manifest.tensors(m).items()}

    def run_state(self) -> dict:
        """The step and epoch the lowest rank's manifest records (none without one)."""
        first = self.manifests.get(min(self.files))
        return {} if first is None else {"step": first.get("step"), "epoch": first.get("epoch")}


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
        check_links(root, [root])
        ranks = rank_dirs(root)
        if not ranks and world == 1:
            paths = {0: latest_checkpoint(root)}
        else:
            missing = [rank for rank in range(world) if rank not in ranks]
            if missing:
                raise CheckpointError(root / f"rank_{missing[0]}", f"missing rank directory (the source strategy "
                                                                   f"describes {world} ranks)")
            extra = sorted(rank for rank in ranks if rank >= world)
            if extra:
                raise CheckpointError(ranks[extra[0]], f"a rank directory beyond the {world} ranks the source "
                                                       "strategy describes (another strategy's checkpoint?)")
            paths = {rank: latest_checkpoint(ranks[rank]) for rank in range(world)}
    else:
        raise CheckpointError(root, "checkpoint not found")
    if len({p.suffix for p in paths.values()}) > 1:
        raise CheckpointError(root, "mixes .ckpt and .safetensors files")
    # A file read whole anyway: its crc_num trailer, where it has one, is checked too.
    return {rank: open_checkpoint(p, check_crc=True) for rank, p in paths.items()}


def read_source(load_dir, strategy: Strategy | None, crcs: bool = True) -> MindSporeSource:
    """The checkpoint in ``load_dir`` (a ``rank_N/`` tree, or one complete file) as global
    tensors, each file checked against its manifest where it has one (with ``crcs``, its
    tensors' bytes too)."""
    files = open_source(load_dir, strategy.world if strategy else 1)
    # MindSpore's order: the tensors as first seen from the last rank down (pipeline stages hold
    # different ones); .ckpt string entries (safetensors have none) from the lowest rank
    names = list(dict.fromkeys(name for f in reversed(files.values()) for name in f.tensors))
    strings = {k: v for f in reversed(files.values()) for k, v in getattr(f, "strings", {}).items()}
    for f in files.values():
        if getattr(f, "map_parameters", None):  # .ckpt only
            raise CheckpointError(f.path, f"{f.map_parameters[0]}: MapParameters cannot be resharded")
    if strategy and names and not any(name in strategy.params for name in names):
        raise CheckpointError(strategy.path, f"names none of the checkpoint's tensors (such as {names[0]!r}): "
                                             "a strategy of another model?")
    tensors = {name: tensor for name in names if (tensor := _locate(files, name, strategy)) is not None}
    # read whole anyway: every file is checked against its manifest, CRC-32s included
    manifests = {rank: described for rank, f in files.items() if (described := manifest.read_checked(f, crcs))}
    return MindSporeSource(files, strategy, tensors, strings, manifests)


def _check_replicas(files: dict[int, MappedFile], name: str, ranks: list[int]) -> None:
    """A tensor no strategy names must be a replica on every rank: the same shape and (sampled:
    its first, middle and last 1 KiB) the same bytes. A split tensor the strategy forgot would
    otherwise be read as whole from one rank."""
    first = files[ranks[0]]
    for r in ranks[1:]:
        if files[r].tensors[name].shape != first.tensors[name].shape or \
                any(not np.array_equal(a, b) for a, b in zip(_samples(first, name), _samples(files[r], name))):
            raise CheckpointError(files[r].path, f"{name}: differs from rank {ranks[0]}'s: split, but the source "
                                                 "strategy does not say how (a strategy of another run, or none?)")


def _samples(file: MappedFile, name: str) -> list[np.ndarray]:
    flat = file.read(name).reshape(-1).view(np.uint8)
    n = min(1024, flat.size)
    return [flat[:n], flat[(flat.size - n) // 2:][:n], flat[flat.size - n:]]


def _locate(files: dict[int, MappedFile], name: str, strategy: Strategy | None) -> Tensor | None:
    """A source tensor with the box each rank holds; None when the ranks the strategy places it
    on do not have it (MindSpore skips those too)."""
    layout = strategy.params.get(name) if strategy else None
    if layout is None:  # whole on every rank that has it
        expected = [r for r in files if name in files[r].tensors]
        _check_replicas(files, name, expected)
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
        shape, boxes = first.shape, {r: whole(first.shape) for r in present}
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
    tensor = Tensor(shape, first.dtype)
    for r in present:  # in rank order: the lowest rank holding a box is read
        t = files[r].tensors[name]
        if t.shape != boxes[r].lengths or t.dtype != first.dtype:
            raise CheckpointError(files[r].path, f"{name}: {t.dtype} {list(t.shape)}, but rank {present[0]} "
                                                 f"has {first.dtype} {list(first.shape)} and the strategy gives "
                                                 f"rank {r} {list(boxes[r].lengths)} of {list(shape)}")
        tensor.add(boxes[r], MappedTensor(files[r], name))
    return tensor


# ---- the target strategy --------------------------------------------------------------------

def plan_files(source: MindSporeSource, dst: Strategy | None, ranks: list[int] | None = None) -> list[TargetFile]:
    """What every rank of ``dst`` (or those of ``ranks``) holds, and where each piece comes from."""
    def named(strategy: Strategy | None, name: str) -> bool:
        return strategy is None or name in strategy.params

    # MindSpore writes the tensors both strategies name first
    names = sorted(source.tensors, key=lambda name: not (named(source.strategy, name) and named(dst, name)))
    targets = []
    for rank in range(dst.world if dst else 1) if ranks is None else ranks:
        tensors = []
        for name in names:
            tensor = source.tensors[name]
            try:
                box = dst.box_of(name, tensor.shape, rank) if dst else whole(tensor.shape)
            except LayoutError as e:
                raise CheckpointError(dst.path, f"{name}: {e}") from None
            if box is not None:
                tensors.append(plan_tensor(tensor, name, Placement(tensor.shape, box, box.lengths)))
        targets.append(TargetFile(rank, tensors))
    return targets


# ---- writing --------------------------------------------------------------------------------

def write_target(target: TargetFile, source: MindSporeSource, dst: Strategy | None, path: Path, progress=None,
                 build=build_tensor) -> None:
    """One target file of ``dst``, in the format its suffix names, written atomically; each tensor
    made by ``build(tensor)`` (ckpt_hooks.converters.lora's merges adapters in), then the source's
    strings; and its manifest (each tensor's box, the CRC-32s taken while writing, the source's
    roles, step and epoch)."""
    def made(tensor):
        def make():
            # A source view may be strided (a column piece). Not ascontiguousarray: it makes scalars 1-D.
            array = np.require(build(tensor), requirements="C")
            if progress is not None:
                progress.update(tensor.nbytes)
            return array
        return PendingArray(tensor.placement.stored_shape, tensor.dtype, make)

    pending = {tensor.key: made(tensor) for tensor in target.tensors}
    if path.suffix == ".ckpt":
        crcs = mindspore_ckpt.save(path, itertools.chain(pending.items(), source.strings.items()))
    else:
        crcs = ms_safetensors.save(path, pending)
    layout = {"rank": target.rank, "world_size": dst.world if dst else 1,
              "parallel_mode": None if dst else "stand_alone"}
    manifest.describe_written(path, crcs, layout=layout, role=source.roles().get,
                              placements={t.key: t.placement for t in target.tensors}, **source.run_state())


def check_format(source: MindSporeSource, output_format: str, load_dir) -> None:
    if output_format == "safetensors" and source.strings:
        raise CheckpointError(load_dir, f"{next(iter(source.strings))}: a string entry, which safetensors cannot hold")


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
    source = read_source(load_dir, src)
    output_format = output_format or Path(source.files[0].path).suffix[1:]
    if f".{output_format}" not in READERS:
        raise CheckpointError(save_dir, f"output format {output_format!r} is neither ckpt nor safetensors")
    targets = plan_files(source, dst)
    check_format(source, output_format, load_dir)
    total = write_files(save_dir, targets, source, dst, prefix, output_format, workers=process_num, quiet=quiet,
                        label=f"{len(source.files)} -> {len(targets)} ranks")
    return Report(f"{len(source.files)} ranks", f"{len(targets)} ranks", len(targets), total,
                  time.perf_counter() - started)


def write_files(save_dir, targets: list[TargetFile], source: MindSporeSource, dst: Strategy | None, prefix: str,
                output_format: str, *, workers: int, quiet: bool, label: str, build=build_tensor) -> int:
    """Every target file as ``save_dir/rank_{r}/{prefix}{r}.{output_format}`` (``write_target``),
    atomically, shared out among torchrun's processes (engine.ranks); returns the bytes written."""
    def write(root: Path, target: TargetFile, progress) -> None:
        directory = root / f"rank_{target.rank}"
        directory.mkdir()
        write_target(target, source, dst, directory / f"{prefix}{target.rank}.{output_format}", progress, build)

    total = sum(target.nbytes for target in targets)
    write_shared(save_dir, targets, write, total, workers=workers, quiet=quiet, label=label)
    return total


def transform_checkpoint_by_rank(rank_id: int, load_dir, save_file, src_strategy=None, dst_strategy=None) -> None:
    """Write only target rank ``rank_id``'s file, ``save_file`` (``.ckpt`` or ``.safetensors``)."""
    src, dst = _strategies(src_strategy, dst_strategy)
    world = dst.world if dst else 1
    if not 0 <= rank_id < world:
        raise CheckpointError(dst.path if dst else save_file, f"rank {rank_id} is not among the {world} target ranks")
    if Path(save_file).suffix not in READERS:
        raise CheckpointError(save_file, "the file name must end in .ckpt or .safetensors")
    source = read_source(load_dir, src)
    target = plan_files(source, dst, [rank_id])[0]
    check_format(source, Path(save_file).suffix[1:], load_dir)
    write_target(target, source, dst, Path(save_file))
