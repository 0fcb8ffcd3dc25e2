"""Fill a running MindSpore network, and its optimizer's state, from a checkpoint saved at another
layout: MindSpore's ``auto_trans_ckpt`` without writing a transformed copy.

    source  one file, a directory of files, or a directory of ``rank_N/`` directories (as
            ``ModelCheckpoint(directory=f".../rank_{rank}")`` leaves them) -> {name: Tensor}:
            each file's manifest (``callback.CheckpointManifest``) says which box of every global
            tensor it holds; a file without one is complete, the files of ``rank_N/`` replicas
    target  each parameter of the running network -> the box of it this rank holds: all of it
            (stand-alone, data-parallel), or what the running strategy gives it (semi-/auto-parallel)

In a directory the last file by the epoch and step in its name is taken, the same name in every
rank directory. Each parameter's box is planned (``engine.plan``) from the replica ``rank %
replicas`` of each piece (to spread the reads), read from the files, only those bytes, and
built (``engine.execute``), then assigned with ``Parameter.set_data``. Everything is checked
before the first parameter changes: the files against their manifests, and every stored tensor
read whole against its CRC-32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_hooks.algebra.layout import Box, LayoutError, Placement
from ckpt_hooks.algebra.mindspore_layout import Strategy, whole
from ckpt_hooks.engine.execute import build_tensor
from ckpt_hooks.engine.plan import TargetTensor, plan_tensor
from ckpt_hooks.engine.source import WEIGHT, Source, Tensor
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.mindspore_ckpt import BF16, MappedFile
from ckpt_hooks.formats.mindspore_strategy import read_strategy
from ckpt_hooks.mindspore import manifest
from ckpt_hooks.mindspore.files import MappedTensor, latest_checkpoint, open_checkpoint, rank_dirs

_WHOLE_TENSOR_MODES = ("stand_alone", "data_parallel")


@dataclass(frozen=True)
class SavedFile:
    """One file of the checkpoint and its manifest (None: saved without one)."""

    file: MappedFile
    manifest: dict | None


@dataclass
class Loaded:
    """What ``load`` did."""

    step: int | None         # as the manifest says; None without one
    epoch: int | None        # pass as Model.train(..., initial_epoch=epoch) to continue
    source_layout: dict      # world_size, parallel_mode (None where inferred, without manifests)
    target_layout: dict      # this process: rank, world_size, parallel_mode
    resharded: list[str]     # tensors cut from, or assembled out of, differently placed pieces
    bytes_read: int          # tensor bytes this rank read from the files
    loaded: int              # parameters filled
    skipped: list[str]       # checkpoint tensors the network and optimizer do not have


def load(network, ckpt_path_or_dir, *, optimizer=None, rank: int | None = None, strategy=None) -> Loaded:
    """Fill ``network``'s parameters (and ``optimizer``'s: moments, step counters, learning rate)
    from the checkpoint at ``ckpt_path_or_dir``, whatever layout it was saved at. ``strategy``:
    the running layout of a semi-/auto-parallel network (a Strategy, or the strategy file or
    directory its ``strategy_ckpt_save_file`` wrote), which gives each parameter this rank's box;
    its parameters may hold the whole tensor yet (not compiled) or their slice. A parameter on
    another pipeline stage is left as it is. ``rank`` overrides this process's rank, which
    chooses the box and the replica read. Bad input raises a one-line CheckpointError naming the
    file, before any parameter is modified."""
    target = manifest.running_layout()
    if rank is not None:
        target["rank"] = rank
    if strategy is None and target["parallel_mode"] not in _WHOLE_TENSOR_MODES:
        raise NotImplementedError(f"loading into a {target['parallel_mode']} network needs its strategy "
                                  "(strategy=the file strategy_ckpt_save_file names)")
    if strategy is not None and not isinstance(strategy, Strategy):
        strategy = read_strategy(strategy)
    if strategy is not None and not 0 <= target["rank"] < strategy.world:
        raise CheckpointError(strategy.path, f"rank {target['rank']} is not among its {strategy.world} ranks")
    files = _files(Path(ckpt_path_or_dir))
    saved = _saved_tensors(files)
    params = {p.name: p for cell in (network, optimizer) if cell is not None for p in cell.get_parameters()}
    boxes = _running_boxes(params, saved, strategy, target["rank"])
    skipped = _check_same_network(params, saved, boxes, files[0].file.path)
    plans = {name: _plan(name, saved[name], box, target["rank"]) for name, box in boxes.items() if box is not None}
    _check_whole_reads(plans, files)

    bytes_read = 0
    for name, plan in plans.items():
        param = params[name]
        # a slice stays marked as one: MindSpore's compile would cut it again
        param.set_data(_tensor(build_tensor(plan, exact=True)),
                       param.sliced or plan.placement.box.lengths != saved[name].shape)
        bytes_read += sum(copy.piece.handle.nbytes_read(copy.source_slices) for copy in plan.copies)
    described = files[0].manifest or {}
    layout = described.get("layout", {})
    source_layout = {"world_size": layout.get("world_size", len(files)), "parallel_mode": layout.get("parallel_mode")}
    resharded = [name for name, plan in plans.items() if any(c.box != c.piece.box for c in plan.copies)]
    return Loaded(described.get("step"), described.get("epoch"), source_layout, target, resharded, bytes_read,
                  len(plans), skipped)


def _files(path: Path) -> list[SavedFile]:
    """The files of the checkpoint at ``path``, in rank order, with their manifests checked."""
    if path.is_file():
        return [_open(path)]
    if not path.is_dir():
        raise CheckpointError(path, "no such checkpoint file or directory")
    ranks = rank_dirs(path)
    if not ranks:
        return [_open(latest_checkpoint(path))]
    if 0 not in ranks:
        raise CheckpointError(path / "rank_0", f"missing, but {path} has rank_{min(ranks)}")
    first = _open(latest_checkpoint(ranks[0]))
    if first.manifest:
        world, why = first.manifest["layout"]["world_size"], f"the manifest of {first.file.path} says world size"
    else:
        world, why = max(ranks) + 1, f"{path} has ranks up to {max(ranks)}, a world size"
    files = [first]
    for rank in range(1, world):
        if rank not in ranks:
            raise CheckpointError(path / f"rank_{rank}", f"missing, but {why} {world}")
        files.append(_open(ranks[rank] / Path(first.file.path).name))
    for rank, saved in enumerate(files):
        _check_place(saved, rank, world, first)
    return files


def _open(path: Path) -> SavedFile:
    if not path.is_file():
        raise CheckpointError(path, "missing (a partially written checkpoint?)")
    saved = SavedFile(open_checkpoint(path), manifest.read(path))
    if saved.manifest is not None:
        manifest.check(saved.manifest, saved.file)
    return saved


def _check_place(saved: SavedFile, rank: int, world: int, first: SavedFile) -> None:
    """A rank directory's file is that rank's, of the same job and step as rank 0's."""
    if (saved.manifest is None) != (first.manifest is None):
        raise CheckpointError(saved.file.path, f"{'no' if saved.manifest is None else 'a'} manifest beside it, "
                                               f"unlike {first.file.path}")
    if saved.manifest is None:
        return
    layout, step = saved.manifest["layout"], saved.manifest.get("step")
    if (layout["rank"], layout["world_size"], step) != (rank, world, first.manifest.get("step")):
        raise CheckpointError(saved.file.path, f"its manifest says rank {layout['rank']} of {layout['world_size']} "
                                               f"at step {step}, but it is in rank_{rank} of a world of {world} at "
                                               f"step {first.manifest.get('step')}")


def _saved_tensors(files: list[SavedFile]) -> Source:
    """Every global tensor of the checkpoint with the pieces the files hold of it, in rank order."""
    saved: Source = {}
    for f in files:
        path, entries = f.file.path, manifest.tensors(f.manifest) if f.manifest else {}
        for name, stored in f.file.tensors.items():
            entry = entries.get(name, {})
            if f.manifest and entry["offsets"] is None:
                raise CheckpointError(path, f"{name} is this rank's slice of a parallel layout (parallel_layout in "
                                            "its manifest): not supported yet")
            shape = tuple(entry.get("global_shape", stored.shape))
            role = WEIGHT if entry.get("role") == "model" else entry.get("role")  # None without a manifest
            tensor = saved.setdefault(name, Tensor(shape, stored.dtype, role))
            if (tensor.shape, tensor.dtype) != (shape, stored.dtype):
                raise CheckpointError(path, f"{name} is part of a {_describe(stored.dtype, shape, path, name)} tensor, "
                                            f"but in the first file of a "
                                            f"{_describe(tensor.dtype, tensor.shape, path, name)} one (files of "
                                            "different checkpoints?)")
            tensor.add(Box(tuple(entry.get("offsets", (0,) * len(shape))), stored.shape), MappedTensor(f.file, name))
    return saved


def _describe(dtype, shape, path, name: str) -> str:
    return f"{manifest.dtype_name(dtype, path, name)}{list(shape)}"


def _running_boxes(params: dict, saved: Source, strategy: Strategy | None, rank: int) -> dict[str, Box | None]:
    """The box of each parameter's global tensor this rank holds: all of it without a strategy;
    None where its pipeline stage holds none."""
    boxes = {}
    for name in (name for name in params if name in saved):
        shape = saved[name].shape
        try:
            boxes[name] = strategy.box_of(name, shape, rank) if strategy else whole(shape)
        except LayoutError as e:
            raise CheckpointError(strategy.path, f"{name}: {e}") from None
    return boxes


def _check_same_network(params: dict, saved: Source, boxes: dict[str, Box | None], where) -> list[str]:
    """The names of the checkpoint's tensors to skip (optimizer state without an optimizer, or
    any extra tensor of a checkpoint without manifest); a mismatch is an error. A parameter holds
    the global tensor, or its box of it (a sliced semi-/auto-parallel one)."""
    extra = [name for name in saved if name not in params]
    problems = [f"{name} is not in the checkpoint" for name in params if name not in saved]
    problems += [f"{name} is not in the network" for name in extra if saved[name].role == WEIGHT]
    for name, box in boxes.items():
        tensor, param = saved[name], params[name]
        shapes = (tensor.shape,) if box is None else (tensor.shape, box.lengths)
        if manifest.dtype_name(tensor.dtype, where, name) != str(param.dtype) or tuple(param.shape) not in shapes:
            problems.append(f"{name} is {_describe(tensor.dtype, tensor.shape, where, name)} "
                            f"(running {param.dtype}{list(param.shape)})")
    if problems:
        raise CheckpointError(where, "a checkpoint of a different network: " + _listing(problems))
    return extra


def _listing(items: list[str], limit: int = 8) -> str:
    """Items for a one-line error, the first ``limit`` of them."""
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _check_whole_reads(plans: dict[str, TargetTensor], files: list[SavedFile]) -> None:
    """Each stored tensor a plan reads whole, against its manifest's CRC-32: those bytes are read
    anyway (a part of one is not checked: that would read bytes this rank does not need)."""
    described = {f.file.path: f.manifest for f in files if f.manifest}
    for plan in plans.values():
        for copy in plan.copies:
            handle = copy.piece.handle
            if copy.box == copy.piece.box and handle.file.path in described:
                manifest.check_crcs(described[handle.file.path], handle.file, [handle.name])


def _plan(name: str, tensor: Tensor, box: Box, rank: int) -> TargetTensor:
    """The copies that fill ``box`` of ``tensor``: one replica of each distinct box, the ``rank``-th."""
    plan = plan_tensor(tensor, name, Placement(tensor.shape, box, box.lengths), reader=rank)
    # complete: the distinct boxes fill the target without overlapping (engine.plan.covered)
    if not plan.complete:
        boxes = ", ".join(f"{list(b.offsets)}+{list(b.lengths)}" for b in tensor.replicas)
        path = next(iter(tensor.replicas.values()))[0].file.path
        raise CheckpointError(path, f"{name}: the files' pieces ({boxes}) do not make up the tensor")
    return plan


def _tensor(array: np.ndarray):
    """A MindSpore Tensor owning ``array``'s values (bfloat16 made from its bits, exactly); never
    a view of a file: the network writes its parameters."""
    import mindspore as ms

    array = np.require(array, requirements=["C", "O"])
    if array.dtype == BF16:
        return ms.Tensor((array.view(np.uint16).astype(np.uint32) << 16).view(np.float32), ms.bfloat16)
    return ms.Tensor.from_numpy(array)
