"""The layout algebra: where each rank's piece of a tensor sits in the logical tensor.

Every tensor has a *logical* global form, chosen so that a tensor-parallel shard is a
plain box (offsets + lengths) of it:

* GQA ``linear_qkv`` rows are ``[q_g | k_g | v_g]`` per query group g, and TP splits the
  rows evenly: whole groups per rank, or, when TP exceeds the groups (megatron-core allows a
  multiple), part of one group per rank. The logical shape is ``(groups x rows_per_group,
  hidden)`` split on rows;
* ``linear_fc1`` holds ``[gate_r; up_r]`` on each TP rank with SwiGLU: logical
  ``(2, ffn, hidden)`` (``(1, ffn, hidden)`` without), TP splits axis 1;
* column-parallel weights split rows, row-parallel weights split columns, norms are replicated;
* the vocabulary is split by rows; its padded size depends on TP (see ModelSpec.padded_vocab_for);
* each routed expert is a tensor of its own, named by its global index (``expert_range`` maps
  an expert rank's local experts); expert tensor parallelism (``etp``) splits it like an MLP.

Pipeline stages and virtual chunks map local layer numbers to global ones.
Pure: no I/O, no framework imports.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ckpt_hooks.algebra.spec import ModelSpec, ParallelConfig, Rank


class LayoutError(ValueError):
    """A layout that cannot hold the model (e.g. a TP size that does not divide the heads)."""


@dataclass(frozen=True)
class Box:
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)

    def intersect(self, other: "Box") -> "Box | None":
        starts = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        stops = tuple(min(a + la, b + lb) for a, la, b, lb in
                      zip(self.offsets, self.lengths, other.offsets, other.lengths))
        if any(stop <= start for start, stop in zip(starts, stops)):
            return None
        return Box(starts, tuple(stop - start for start, stop in zip(starts, stops)))

    def slices_within(self, outer: "Box") -> tuple[slice, ...]:
        """This box as slices of a tensor that holds ``outer``."""
        return tuple(slice(o - oo, o - oo + n) for o, oo, n in zip(self.offsets, outer.offsets, self.lengths))


# How a tensor is split across tensor-parallel ranks.
REPLICATED = "replicated"
SPLIT = "split"       # split along Rule.axis of the logical shape
VOCAB = "vocab"       # split along rows; the padded row count depends on TP
EXTRA = "extra"       # Transformer Engine ``_extra_state``: not a weight, written as None


@dataclass(frozen=True)
class Rule:
    """How one kind of tensor is laid out: a split kind and a symbolic logical shape.

    Shape symbols: H hidden, F ffn, S fc1 parts (2 with SwiGLU, else 1), Q rows of
    linear_qkv (query groups x rows per group), A attention heads x kv channels,
    K kv channels, V vocab rows, E routed experts, M ffn of one expert, G ffn of the shared
    experts, 1 one.
    Latent attention: QD q latent (QN: q_layernorm's, K without MLA), KD kv latent, KR kv latent
    and rotary key, QH heads x query head (with its rotary part), KV heads x (key head without
    RoPE + value head); A is then heads x value head.
    ``fused``: the stored tensor merges the first two logical axes (fc1's gate and up).
    ``dim``: which named dimension of the layout splits ``axis`` (``tp``); ``also``: splits inside
    each piece of the first, e.g. experts: whole experts over ``ep``, then ``etp`` inside one.
    """

    kind: str
    shape: tuple[str, ...] | None = None   # None: take the shape from the file
    axis: int | None = None
    fused: bool = False
    dim: str = "tp"                        # the parallel dimension that splits ``axis``
    also: tuple[tuple[int, str], ...] = ()  # further (axis, dimension) splits, inside the first's pieces
    local_only: bool = False               # split only in the local layer spec (Transformer Engine: whole)


@dataclass(frozen=True)
class Placement:
    """One rank's tensor inside its logical tensor."""

    logical_shape: tuple[int, ...]
    box: Box
    stored_shape: tuple[int, ...]

    @property
    def view_shape(self) -> tuple[int, ...]:
        return self.box.lengths


def _symbol_sizes(spec: ModelSpec, vocab_rows: int) -> dict[str, int]:
    heads, latent = spec.num_attention_heads, spec.latent_attention
    sizes = {"H": spec.hidden_size, "F": spec.ffn_hidden_size, "S": 2 if spec.swiglu else 1,
             "Q": spec.num_query_groups * spec.rows_per_query_group,
             "A": heads * (spec.v_head_dim if latent else spec.kv_channels), "K": spec.kv_channels,
             "V": vocab_rows, "E": spec.num_experts or 0, "M": spec.moe_ffn_hidden_size or 0,
             "G": spec.shared_expert_ffn_hidden_size or 0, "1": 1,
             "QN": (spec.q_lora_rank or 0) if latent else spec.kv_channels}
    if latent:
        sizes.update(QD=spec.q_lora_rank or 0, KD=spec.kv_lora_rank, KR=spec.kv_lora_rank + spec.qk_pos_emb_head_dim,
                     QH=heads * (spec.qk_head_dim + spec.qk_pos_emb_head_dim),
                     KV=heads * (spec.qk_head_dim + spec.v_head_dim))
    return sizes


def fused_rows(rule: Rule, spec: ModelSpec) -> int:
    """The rows of one part of a fused tensor (fc1's gate or up): the size of its second axis."""
    return _symbol_sizes(spec, 0)[rule.shape[1]]


def placement(rule: Rule, spec: ModelSpec, config: ParallelConfig, rank: Rank, vocab_rows: int,
              file_shape: tuple[int, ...] | None = None) -> Placement:
    """Where ``rank`` of layout ``config`` holds a tensor following ``rule``.

    ``vocab_rows`` is the padded vocabulary of this layout; ``file_shape`` is used for
    tensors whose shape the spec does not determine (e.g. learned position embeddings).
    """
    shape = tuple(file_shape) if rule.shape is None and file_shape is not None else None   # else unused
    return _placement(rule, spec, config, rank, vocab_rows, shape)


@functools.lru_cache(maxsize=1 << 14)   # the same rule and rank for every layer (and expert)
def _placement(rule: Rule, spec: ModelSpec, config: ParallelConfig, rank: Rank, vocab_rows: int,
               file_shape: tuple[int, ...] | None) -> Placement:
    if rule.shape is None:
        logical = tuple(file_shape)
    else:
        sizes = _symbol_sizes(spec, vocab_rows)
        logical = tuple(sizes[s] for s in rule.shape)
    axis = 0 if rule.kind == VOCAB else rule.axis
    whole = rule.local_only and spec.transformer_impl != "local"
    if rule.kind in (REPLICATED, EXTRA) or axis is None or whole:
        return Placement(logical, Box((0,) * len(logical), logical), logical)
    view, offsets = list(logical), [0] * len(logical)
    for axis, dim in ((axis, rule.dim), *rule.also):
        ways, index = config.size(dim), config.coordinate(rank, dim)
        if view[axis] % ways:
            what = _AXIS_NAMES.get(rule.shape[axis], "size") if rule.shape else "size"
            raise LayoutError(f"{_DIM_NAMES[dim]} size {ways} does not divide {what} {view[axis]}")
        view[axis] //= ways
        offsets[axis] += index * view[axis]
    stored = (view[0] * view[1], *view[2:]) if rule.fused else tuple(view)
    return Placement(logical, Box(tuple(offsets), tuple(view)), stored)


_DIM_NAMES = {"tp": "tensor parallel", "ep": "expert parallel", "etp": "expert tensor parallel"}
_AXIS_NAMES = {"H": "hidden size", "F": "ffn hidden size", "M": "expert ffn hidden size",
               "G": "shared expert ffn hidden size", "Q": "linear_qkv rows",
               "A": "attention heads x kv channels", "V": "padded vocabulary", "QD": "q_lora_rank",
               "KR": "kv_lora_rank + qk_pos_emb_head_dim"}


def check_divisible(spec: ModelSpec, config: ParallelConfig) -> None:
    """Fail early, with the reason, when a layout cannot hold the model."""
    check_tensor_parallel(spec, config.tp)
    check_layers(spec, config)
    check_experts(spec, config)


def check_experts(spec: ModelSpec, config: ParallelConfig) -> None:
    """Fail unless the expert sizes split the experts and every legacy file has one writer:
    Megatron-LM names a file by tensor and expert rank, so ETP > TP saves two expert tensor
    ranks under one name, and TP > EP x ETP leaves tensor ranks without a file."""
    etp = config.size("etp")
    if not spec.num_experts:
        if config.ep > 1 or etp != config.tp:
            raise LayoutError("expert parallel sizes need a model with experts")
        return
    if spec.num_experts % config.ep:
        raise LayoutError(f"expert parallel size {config.ep} does not divide the {spec.num_experts} experts")
    if (spec.shared_expert_ffn_hidden_size or 0) % config.tp:
        raise LayoutError(f"tensor parallel size {config.tp} does not divide shared expert ffn hidden size "
                          f"{spec.shared_expert_ffn_hidden_size}")
    if spec.moe_ffn_hidden_size % etp:
        raise LayoutError(f"expert tensor parallel size {etp} does not divide expert ffn hidden size "
                          f"{spec.moe_ffn_hidden_size}")
    if (config.tp * config.dp * config.cp) % (etp * config.ep):
        raise LayoutError(f"expert parallel {config.ep} x expert tensor parallel {etp} does not divide the "
                          f"{config.tp * config.dp * config.cp} ranks of a pipeline stage")
    if etp > config.tp or etp * config.ep < config.tp or (etp * config.ep) % config.tp:
        raise LayoutError(f"expert tensor parallel size {etp} with tensor parallel {config.tp} and expert "
                          f"parallel {config.ep}: Megatron-LM's legacy files would lose ranks (it needs "
                          "ETP <= TP <= EP x ETP, EP x ETP a multiple of TP)")


def check_tensor_parallel(spec: ModelSpec, tp: int) -> None:
    """Fail unless tensor-parallel size ``tp`` splits the heads, the ffn and the query groups."""
    for what, value in (("attention heads", spec.num_attention_heads), ("ffn hidden size", spec.ffn_hidden_size)):
        if value % tp:
            raise LayoutError(f"tensor parallel size {tp} does not divide {what} ({value})")
    groups = spec.num_query_groups
    if groups % tp and tp % groups:
        raise LayoutError(f"tensor parallel size {tp} neither divides nor is a multiple of query groups ({groups})")


def check_layers(spec: ModelSpec, config: ParallelConfig) -> None:
    """Fail unless the pipeline stages and virtual chunks split the layers."""
    if config.layers_per_stage is not None:
        if len(config.layers_per_stage) != config.pp:
            raise LayoutError(f"layer list {list(config.layers_per_stage)} has {len(config.layers_per_stage)} "
                              f"stages, pipeline parallel size is {config.pp}")
        if sum(config.layers_per_stage) != spec.num_layers or min(config.layers_per_stage) < 1:
            raise LayoutError(f"layer list {list(config.layers_per_stage)} does not split {spec.num_layers} layers")
        if config.vpp > 1:
            raise LayoutError("uneven pipeline stages with virtual pipeline stages are not supported")
    elif spec.num_layers % (config.pp * config.vpp):
        raise LayoutError(f"{spec.num_layers} layers do not split evenly into pipeline {config.pp} "
                          f"x virtual {config.vpp} chunks (use --num-layer-list)")


def chunk_layers(spec: ModelSpec, config: ParallelConfig, pp_rank: int, vp_rank: int) -> range:
    """Global layer indices held by virtual chunk ``vp_rank`` of pipeline stage ``pp_rank``."""
    if config.layers_per_stage is not None:
        start = sum(config.layers_per_stage[:pp_rank])
        return range(start, start + config.layers_per_stage[pp_rank])
    per_chunk = spec.num_layers // (config.pp * config.vpp)
    start = vp_rank * (spec.num_layers // config.vpp) + pp_rank * per_chunk
    return range(start, start + per_chunk)


def expert_range(num_experts: int | None, config: ParallelConfig, ep_rank: int) -> range:
    """Global indices of the experts expert-parallel rank ``ep_rank`` holds: its local expert i is
    global expert ``ep_rank * num_experts / ep + i`` (none in a dense model)."""
    if not num_experts:
        return range(0)
    if num_experts % config.ep:
        raise LayoutError(f"expert parallel size {config.ep} does not divide the {num_experts} experts")
    local = num_experts // config.ep
    return range(ep_rank * local, (ep_rank + 1) * local)


def is_first_chunk(config: ParallelConfig, pp_rank: int, vp_rank: int) -> bool:
    return pp_rank == 0 and vp_rank == 0


def is_last_chunk(config: ParallelConfig, pp_rank: int, vp_rank: int) -> bool:
    return pp_rank == config.pp - 1 and vp_rank == config.vpp - 1


def innermost_partial(shape, slices) -> int:
    """The last axis ``slices`` does not take whole (0 if it takes them all): the elements of
    ``slices`` of a row-major ``shape`` lie in one run per index of the axes before it."""
    partial = [a for a, (s, n) in enumerate(zip(slices, shape)) if (s.start, s.stop) != (0, n)]
    return partial[-1] if partial else 0


def run_length(shape, slices) -> int:
    """Elements in each of those runs."""
    inner = innermost_partial(shape, slices)
    return (slices[inner].stop - slices[inner].start) * math.prod(shape[inner + 1:]) if len(shape) else 1


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
