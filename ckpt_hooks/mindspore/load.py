"""Fill a running MindSpore network, and its optimizer's state, from a checkpoint saved at another
layout: MindSpore's ``auto_trans_ckpt`` without writing a transformed copy.

A checkpoint is one file, a directory of files, or a directory of ``rank_N/`` directories (as
``ModelCheckpoint(directory=f".../rank_{rank}")`` leaves them); in a directory the last file by
the epoch and step in its name is taken, the same name in every rank directory.
Each file's manifest (``callback.CheckpointManifest``) says which box of every global tensor it
holds; a file without one is taken to be complete, the files of ``rank_N/`` to be
data-parallel replicas. This rank works out the box of every parameter it needs at its running
layout, reads only those bytes from the files (the replica ``rank % replicas``, to spread the
reads) and assigns them with ``Parameter.set_data``. Everything is checked before the first
parameter changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.mindspore_ckpt import BF16, MappedFile
from ckpt_hooks.algebra.layout import Box
from ckpt_hooks.mindspore import manifest
from ckpt_hooks.mindspore.files import latest_checkpoint, open_checkpoint, rank_dirs

_WHOLE_TENSOR_MODES = ("stand_alone", "data_parallel")


@dataclass(frozen=True)
class Source:
    """One file of the checkpoint and its manifest (None: saved without one)."""

    file: MappedFile
    manifest: dict | None


@dataclass(frozen=True)
class Piece:
    """A box of a global tensor held by one source file."""

    source: Source
    box: Box


@dataclass
class SavedTensor:
    """A global tensor of the checkpoint and the pieces of it the files hold."""

    shape: tuple[int, ...]
    dtype: str
    role: str | None  # "model" or "optimizer" as the manifest says; None without one
    pieces: list[Piece] = field(default_factory=list)


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


def load(network, ckpt_path_or_dir, *, optimizer=None, rank: int | None = None) -> Loaded:
    """Fill ``network``'s parameters (and ``optimizer``'s: moments, step counters, learning rate)
    from the checkpoint at ``ckpt_path_or_dir``, whatever layout it was saved at. ``rank``
    overrides this process's rank, which chooses the replica read. Bad input raises a one-line
    CheckpointError naming the file, before any parameter is modified."""
    target = manifest.running_layout()
    if rank is not None:
        target["rank"] = rank
    if target["parallel_mode"] not in _WHOLE_TENSOR_MODES:
        raise NotImplementedError(f"loading into a {target['parallel_mode']} network: per-rank boxes from its "
                                  "strategy are not implemented yet (stand_alone and data_parallel are)")
    sources = _sources(Path(ckpt_path_or_dir))
    saved = _saved_tensors(sources)
    params = {p.name: p for cell in (network, optimizer) if cell is not None for p in cell.get_parameters()}
    skipped = _check_same_network(params, saved, sources[0].file.path)
    boxes = {name: _target_box(param) for name, param in params.items()}
    plans = {name: _copies(name, box, saved[name].pieces, target["rank"]) for name, box in boxes.items()}

    bytes_read = 0
    for name, param in params.items():
        array, nbytes = _assemble(name, plans[name], boxes[name])
        param.set_data(_tensor(array))
        bytes_read += nbytes
    described = sources[0].manifest or {}
    layout = described.get("layout", {})
    source_layout = {"world_size": layout.get("world_size", len(sources)), "parallel_mode": layout.get("parallel_mode")}
    resharded = [name for name, copies in plans.items() if any(box != piece.box for piece, box in copies)]
    return Loaded(described.get("step"), described.get("epoch"), source_layout, target, resharded, bytes_read,
                  len(params), skipped)


def _sources(path: Path) -> list[Source]:
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
    sources = [first]
    for rank in range(1, world):
        if rank not in ranks:
            raise CheckpointError(path / f"rank_{rank}", f"missing, but {why} {world}")
        sources.append(_open(ranks[rank] / Path(first.file.path).name))
    for rank, source in enumerate(sources):
        _check_place(source, rank, world, first)
    return sources


def _open(path: Path) -> Source:
    if not path.is_file():
        raise CheckpointError(path, "missing (a partially written checkpoint?)")
    source = Source(open_checkpoint(path), manifest.read(path))
    if source.manifest is not None:
        manifest.check(source.manifest, source.file)
    return source


def _check_place(source: Source, rank: int, world: int, first: Source) -> None:
    """A rank directory's file is that rank's, of the same job and step as rank 0's."""
    if (source.manifest is None) != (first.manifest is None):
        raise CheckpointError(source.file.path, f"{'no' if source.manifest is None else 'a'} manifest beside it, "
                                                f"unlike {first.file.path}")
    if source.manifest is None:
        return
    layout, step = source.manifest["layout"], source.manifest.get("step")
    if (layout["rank"], layout["world_size"], step) != (rank, world, first.manifest.get("step")):
        raise CheckpointError(source.file.path, f"its manifest says rank {layout['rank']} of {layout['world_size']} "
                                                f"at step {step}, but it is in rank_{rank} of a world of {world} at "
                                                f"step {first.manifest.get('step')}")


def _saved_tensors(sources: list[Source]) -> dict[str, SavedTensor]:
    """Every global tensor of the checkpoint with the pieces the files hold of it."""
    saved: dict[str, SavedTensor] = {}
    for source in sources:
        path = source.file.path
        for name, stored in source.file.tensors.items():
            entry = source.manifest["tensors"][name] if source.manifest else {}
            if source.manifest and entry["offsets"] is None:
                raise CheckpointError(path, f"{name} is this rank's slice of a parallel layout (parallel_layout in "
                                            "its manifest): not supported yet")
            shape = tuple(entry.get("global_shape", stored.shape))
            dtype = manifest.dtype_name(stored.dtype, path, name)
            tensor = saved.setdefault(name, SavedTensor(shape, dtype, entry.get("role")))
            if (tensor.shape, tensor.dtype) != (shape, dtype):
                raise CheckpointError(path, f"{name} is part of a {dtype}{list(shape)} tensor, but in the first file of "
                                            f"a {tensor.dtype}{list(tensor.shape)} one (files of different checkpoints?)")
            tensor.pieces.append(Piece(source, Box(tuple(entry.get("offsets", (0,) * len(shape))), stored.shape)))
    return saved


def _check_same_network(params: dict, saved: dict[str, SavedTensor], where) -> list[str]:
    """The names of the checkpoint's tensors to skip (optimizer state without an optimizer, or
    any extra tensor of a checkpoint without manifest); a mismatch is an error."""
    extra = [name for name in saved if name not in params]
    problems = [f"{name} is not in the checkpoint" for name in params if name not in saved]
    problems += [f"{name} is not in the network" for name in extra if saved[name].role == "model"]
    for name, param in params.items():
        tensor = saved.get(name)
        if tensor is not None and (tensor.shape, tensor.dtype) != (tuple(param.shape), str(param.dtype)):
            problems.append(f"{name} is {tensor.dtype}{list(tensor.shape)} (running {param.dtype}{list(param.shape)})")
    if problems:
        raise CheckpointError(where, "a checkpoint of a different network: " + manifest.listing(problems))
    return extra


def _target_box(param) -> Box:
    """The box of ``param``'s global tensor this rank holds: all of it in the stand-alone and
    data-parallel runs supported so far (a semi/auto-parallel strategy would give a slice)."""
    return Box((0,) * len(param.shape), tuple(param.shape))


def _copies(name: str, target: Box, pieces: list[Piece], rank: int) -> list[tuple[Piece, Box]]:
    """(piece, overlap) pairs that fill ``target``: one replica of each distinct box."""
    replicas: dict[Box, list[Piece]] = {}
    for piece in pieces:
        replicas.setdefault(piece.box, []).append(piece)
    copies = [(same[rank % len(same)], overlap) for box, same in replicas.items()
              if (overlap := box.intersect(target)) is not None]
    # A layout's distinct boxes do not overlap, so they fill the target when their sizes add up.
    if sum(overlap.numel for _, overlap in copies) != target.numel:
        boxes = ", ".join(f"{list(box.offsets)}+{list(box.lengths)}" for box in replicas)
        raise CheckpointError(pieces[0].source.file.path, f"{name}: the files' pieces ({boxes}) do not make up "
                                                          "the tensor")
    return copies


def _assemble(name: str, copies: list[tuple[Piece, Box]], target: Box) -> tuple[np.ndarray, int]:
    """The target box of tensor ``name`` and the bytes read for it: for each copy, the rows of
    the piece it needs (a view of the file where they lie in one record), then the box in them."""
    out = np.empty(target.lengths, copies[0][0].source.file.tensors[name].dtype)
    nbytes = 0
    for piece, overlap in copies:
        within = overlap.slices_within(piece.box)
        rows = piece.source.file.read(name, within[0] if within else None)
        out[overlap.slices_within(target)] = rows[(slice(None),) + within[1:]] if within else rows
        nbytes += rows.nbytes
    return out, nbytes


def _tensor(array: np.ndarray):
    """A MindSpore Tensor owning ``array`` (bfloat16 made from its bits, exactly)."""
    import mindspore as ms

    if array.dtype == BF16:
        return ms.Tensor((array.view(np.uint16).astype(np.uint32) << 16).view(np.float32), ms.bfloat16)
    return ms.Tensor.from_numpy(array)
