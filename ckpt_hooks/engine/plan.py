"""The planner: from the tensors a source layout holds to the copies a target layout needs.

Each source tensor is placed as a box of its logical tensor; each target tensor is a
box too; a plan is the list of box intersections. Pure: works on shapes and names only.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from ckpt_hooks.algebra import layout, names
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.algebra.layout import EXTRA, VOCAB, Box, LayoutError, Placement
from ckpt_hooks.algebra.spec import ModelSpec, ParallelConfig


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: object


@dataclass
class SourceFile:
    """What one source file holds: per model chunk, key -> TensorMeta (None for non-tensors)."""

    path: str
    tp_rank: int
    pp_rank: int
    chunks: dict[str, dict[str, TensorMeta | None]]


@dataclass(frozen=True)
class SourceTensor:
    path: str
    file: tuple[int, int]    # (tp_rank, pp_rank)
    chunk: str
    key: str
    placement: Placement
    dtype: object


@dataclass(frozen=True)
class Copy:
    source: SourceTensor
    source_slices: tuple[slice, ...]   # in the source's view shape (Placement.view_shape)
    target_slices: tuple[slice, ...]   # in the target's view shape


@dataclass
class TargetTensor:
    chunk: str
    key: str
    placement: Placement | None        # None for non-tensor entries (``_extra_state``)
    dtype: object = None
    copies: list[Copy] = field(default_factory=list)
    complete: bool = True               # False: regions no source covers are zero (vocab padding)

    @property
    def nbytes(self) -> int:
        return 0 if self.placement is None else self.placement.box.numel * self.dtype.itemsize


def element_range_boxes(shape, start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Boxes ``(offsets, lengths)`` of a row-major ``shape`` holding exactly its flat elements
    [start, stop), in order: a partial head row, whole rows, a partial tail row, recursively."""
    if start >= stop:
        return []
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return [((first,) + o, (1,) + n) for o, n in
                element_range_boxes(shape[1:], start - first * inner, stop - first * inner)]
    boxes = []
    if start % inner:
        boxes += element_range_boxes(shape, start, (first + 1) * inner)
        first += 1
    whole_end = stop // inner
    if whole_end > first:
        boxes.append(((first,) + (0,) * (len(shape) - 1), (whole_end - first,) + tuple(shape[1:])))
    return boxes + element_range_boxes(shape, whole_end * inner, stop)


def restrict(tensor: TargetTensor, offsets, lengths) -> TargetTensor:
    """The sub-box ``offsets``/``lengths`` (in the tensor's view) of a target tensor, with only
    the copies (clipped) that fill it: planning, and reading, just that part."""
    copies = []
    for copy in tensor.copies:
        lo = [max(t.start, o) for t, o in zip(copy.target_slices, offsets)]
        hi = [min(t.stop, o + n) for t, o, n in zip(copy.target_slices, offsets, lengths)]
        if any(a >= b for a, b in zip(lo, hi)):
            continue
        shift = [s.start - t.start for s, t in zip(copy.source_slices, copy.target_slices)]
        copies.append(Copy(copy.source, tuple(slice(a + d, b + d) for a, b, d in zip(lo, hi, shift)),
                           tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))))
    box = tensor.placement.box
    sub = Box(tuple(b + o for b, o in zip(box.offsets, offsets)), tuple(lengths))
    return TargetTensor(tensor.chunk, tensor.key, Placement(tensor.placement.logical_shape, sub, tuple(lengths)),
                        tensor.dtype, copies, tensor.complete)


@dataclass
class TargetFile:
    tp_rank: int
    pp_rank: int
    tensors: list[TargetTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class _Logical:
    rule: layout.Rule
    name: names.Name
    pieces: list[SourceTensor] = field(default_factory=list)


def _index_sources(spec: ModelSpec, config: ParallelConfig, files: list[SourceFile], chunk_keys: list[str]):
    """Place every source tensor in its logical tensor, checking it against the spec.

    Returns the logical tensors, the keys outside the layers (key -> logical name) in the
    order the source holds them, and where each stored tensor lies:
    (path, chunk, key) -> (logical name, Placement)."""
    index: OrderedDict[str, _Logical] = OrderedDict()
    outer_keys: OrderedDict[str, str] = OrderedDict()
    placed: dict[tuple[str, str, str], tuple[str, Placement]] = {}
    for f in files:
        if sorted(f.chunks) != sorted(chunk_keys):
            raise CheckpointError(f.path, f"holds model chunks {sorted(f.chunks)}, args imply {chunk_keys}")
        for vp, chunk in enumerate(chunk_keys):
            layers = layout.chunk_layers(spec, config, f.pp_rank, vp)
            for key, meta in f.chunks[chunk].items():
                name = names.classify(key)
                if name is None:
                    raise CheckpointError(f.path, f"{chunk}: unsupported tensor '{key}'")
                if name.local_layer is not None and name.local_layer >= len(layers):
                    raise CheckpointError(f.path, f"{chunk}: '{key}' but args give this stage {len(layers)} "
                                                  "layers; the args disagree with the tensors")
                global_layer = layers[name.local_layer] if name.local_layer is not None else None
                logical = names.logical_name(name, global_layer, spec.tied_embeddings)
                entry = index.setdefault(logical, _Logical(name.rule, name))
                if name.local_layer is None:
                    outer_keys.setdefault(key, logical)
                if name.rule.kind == EXTRA:
                    continue
                if meta is None:
                    raise CheckpointError(f.path, f"{chunk}: '{key}' is not a tensor")
                try:
                    where = layout.placement(name.rule, spec, config.tp, f.tp_rank,
                                             spec.padded_vocab_size, meta.shape)
                except LayoutError as e:
                    raise CheckpointError(f.path, f"{chunk}: '{key}': {e}; the args disagree with the tensors") from None
                if tuple(meta.shape) != where.stored_shape:
                    raise CheckpointError(
                        f.path, f"{chunk}: '{key}' has shape {tuple(meta.shape)} but the args "
                                f"({config.describe()}, {spec.describe()}) imply {where.stored_shape}")
                placed[(f.path, chunk, key)] = logical, where
                if any(p.placement.box == where.box for p in entry.pieces):
                    continue  # a replica (replicated tensor, or the tied output layer's copy)
                entry.pieces.append(SourceTensor(f.path, (f.tp_rank, f.pp_rank), chunk, key, where, meta.dtype))
    if spec.tied_embeddings and names.OUTPUT not in outer_keys:
        # A tied model saved on one stage has no output-layer copy; later stages need it.
        keys = list(outer_keys.items())
        at = next((i for i, (k, _) in enumerate(keys) if k.startswith("output_layer.")), len(keys))
        keys.insert(at, (names.OUTPUT, names.EMBEDDING))
        outer_keys = OrderedDict(keys)
    return index, outer_keys, placed


def source_placements(spec: ModelSpec, config: ParallelConfig, files: list[SourceFile],
                      chunk_keys: list[str]) -> dict[tuple[str, str, str], tuple[str, Placement]]:
    """(path, chunk, key) -> (logical name, Placement) of every stored tensor, checked against the spec."""
    return _index_sources(spec, config, files, chunk_keys)[2]


def _target_keys(index, outer_keys, spec: ModelSpec, config: ParallelConfig, pp_rank: int,
                 vp: int) -> list[tuple[str, str]]:
    """(key, logical name) of each entry a target chunk holds, in Megatron's state-dict order."""
    first = layout.is_first_chunk(config, pp_rank, vp)
    last = layout.is_last_chunk(config, pp_rank, vp)
    layer_suffixes = list(OrderedDict.fromkeys(e.name.suffix for e in index.values() if e.name.local_layer is not None))
    keys = [(k, logical) for k, logical in outer_keys.items() if first and k.startswith("embedding.")]
    for local, global_layer in enumerate(layout.chunk_layers(spec, config, pp_rank, vp)):
        keys += [(names.layer_key(local, s), names.layer_key(global_layer, s)) for s in layer_suffixes]
    # A tied output layer exists only on a last stage that does not also hold the embedding.
    keys += [(k, logical) for k, logical in outer_keys.items() if last and k.startswith(("decoder.", "output_layer."))
             and not (k == names.OUTPUT and spec.tied_embeddings and first)]
    return keys


def plan_conversion(spec: ModelSpec, source: ParallelConfig, files: list[SourceFile],
                    target: ParallelConfig, source_chunks: list[str], target_chunks: list[str]) -> list[TargetFile]:
    """The copies that build every target file from the source files."""
    index, outer_keys, _ = _index_sources(spec, source, files, source_chunks)
    target_vocab = spec.padded_vocab_for(target.tp)
    plan = []
    for pp_rank in range(target.pp):
        for tp_rank in range(target.tp):
            tensors = []
            for vp, chunk in enumerate(target_chunks):
                for key, logical in _target_keys(index, outer_keys, spec, target, pp_rank, vp):
                    entry = index.get(logical)
                    if entry is None:
                        raise CheckpointError(files[0].path, f"no source file holds '{logical}'")
                    if entry.rule.kind == EXTRA:
                        tensors.append(TargetTensor(chunk, key, None))
                        continue
                    if not entry.pieces:
                        raise CheckpointError(files[0].path, f"no source tensor for '{logical}'")
                    tensors.append(_plan_tensor(entry, chunk, key, spec, target, tp_rank, target_vocab))
            plan.append(TargetFile(tp_rank, pp_rank, tensors))
    return plan


def _plan_tensor(entry: _Logical, chunk: str, key: str, spec: ModelSpec, target: ParallelConfig,
                 tp_rank: int, target_vocab: int) -> TargetTensor:
    first = entry.pieces[0]
    where = layout.placement(entry.rule, spec, target.tp, tp_rank, target_vocab, first.placement.logical_shape)
    out = TargetTensor(chunk, key, where, first.dtype)
    covered = 0
    for piece in entry.pieces:
        overlap = piece.placement.box.intersect(where.box)
        if overlap is not None:
            out.copies.append(Copy(piece, overlap.slices_within(piece.placement.box), overlap.slices_within(where.box)))
            covered += overlap.numel
    out.complete = covered == where.box.numel
    if not out.complete and entry.rule.kind != VOCAB:
        raise CheckpointError(first.path, f"source tensors cover {covered} of {where.box.numel} elements "
                                         f"of target '{key}' (a rank file is missing tensors)")
    return out
