"""Megatron distributed checkpoints (``--ckpt-format torch_dist``) as the engine's Source.

    weights     key ``decoder.layers.<suffix>`` stacks the layers on a leading axis; each chunk
                (layers x a tensor-parallel box) is, layer by layer, a piece of the logical
                tensor ``decoder.layers.{l}.<suffix>`` (a SwiGLU fc1 half is a piece of axis 0)
    optimizer   ``dp_reshardable`` (the default): per model-parallel rank, flat per-bucket
                buffers (``optimizer.distributed.dp_group_idx_{mp rank}.gbuf_idx_{b}.dtype_(..)
                .bucket_idx_{k}.{param,exp_avg,exp_avg_sq}``) whose parameter layout is not
                saved: the param_map (recorded, or rebuilt from the model and checked against the
                saved ``per_bucket_numel_unpadded``) makes each parameter's range a piece;
                ``fully_reshardable``: ``optimizer.state.{state}.<weight key>``, laid out as the weights

The result is a ``MegatronSource`` like a legacy checkpoint's, with rank files synthesised from
the layout (what each rank of the saved layout held), so planning, conversion and the load hook
work unchanged.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckpt_hooks.algebra import layout, names
from ckpt_hooks.algebra.layout import EXTRA, Box, LayoutError
from ckpt_hooks.algebra.param_map import dtype_name
from ckpt_hooks.algebra.spec import ParallelConfig, Rank
from ckpt_hooks.engine.source import STATES, Source, Tensor, TensorMeta
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.formats import torch_dist as dist
from ckpt_hooks.formats.torch_pickle import LazyTensor, TensorView, contiguous_runs
from ckpt_hooks.megatron import grouped_experts

LAYERS = "decoder.layers."
# Megatron saves the local spec's norms under Transformer Engine's names.
_TE_NORMS = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
             "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}
_ONE_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
# Routed experts (SequentialMLP) in a sharded state dict: one key, a global expert axis.
_EXPERTS_SAVED = "mlp.experts.experts."
_EXPERTS_LOCAL = "mlp.experts.local_experts.0."
_BUCKET = re.compile(r"(?:chained_\d+\.)?optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)"
                     r"\.dtype_\((torch\.\w+), (torch\.\w+)\)\.bucket_idx_(\d+)\.(param|exp_avg|exp_avg_sq)")
SHARDING = "distrib_optim_sharding_type"
HOOK_DIR = "ckpt_hooks"
# What Megatron-LM's _build_sharded_state_dict_metadata says of a dp_reshardable save.
CONTENT_METADATA = {SHARDING: "dp_reshardable", "singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def mp_rank(rank: Rank, config) -> int:
    """A file rank's place in the dense model-parallel group (tensor x pipeline): the ``N`` of
    the dense optimizer's ``dp_group_idx_N``."""
    return rank.pp * config.tp + rank.tp


def expert_mp_rank(rank: Rank, config) -> int:
    """A file rank's place in the expert model-parallel group (expert tensor x expert x pipeline,
    megatron-core's order): the expert optimizer's ``dp_group_idx_N``, and the ``N`` of the
    ``__N_0.distcp`` a target rank is written to (``mp_rank`` without experts)."""
    return (rank.pp * config.ep + rank.ep) * config.size("etp") + config.coordinate(rank, "etp")


def optimizer_group(rank: Rank, config, expert: bool) -> int:
    """The ``dp_group_idx`` of a file rank's dense or expert optimizer state."""
    return expert_mp_rank(rank, config) if expert else mp_rank(rank, config)


def distcp_name(rank: Rank, config) -> str:
    return f"__{expert_mp_rank(rank, config)}_0.distcp"


def optimizers_of(config) -> list[tuple[bool, str]]:
    """(expert, key prefix) of each distributed optimizer: megatron-core chains a dense and an
    expert one with EP > 1, their dp_reshardable keys prefixed ``chained_{i}.``."""
    if config.ep == 1:
        return [(False, "")]
    return [(False, "chained_0."), (True, "chained_1.")]


def optimizer_object(group: int, name: str, prefix: str = "") -> str:
    """The key of a model-parallel rank's optimizer object (``optimizer``, ``per_bucket_numel...``)."""
    return dist.object_key(f"{prefix}optimizer.distributed.dp_group_idx_{group}.{name}")


def local_suffix(suffix: str, transformer_impl: str) -> str:
    """A saved per-layer suffix under the names the running layer spec uses (routed experts as
    SequentialMLP's expert 0)."""
    if suffix.startswith(_EXPERTS_SAVED):
        suffix = _EXPERTS_LOCAL + suffix[len(_EXPERTS_SAVED):]
    if transformer_impl == "local":
        for te, local in _TE_NORMS.items():
            if suffix.startswith(te):
                return local + suffix[len(te):]
    return suffix


def dist_suffix(suffix: str, spec) -> str:
    """Inverse of ``local_suffix``: a per-layer suffix as torch_dist saves it (megatron-core's
    local spec renames its norms for standard attention, not for latent attention's layers)."""
    if names.expert_of(suffix) is not None:
        suffix = _EXPERTS_SAVED + suffix.split(".", 4)[4]
    if spec.latent_attention:
        return suffix
    for te, local in _TE_NORMS.items():
        if suffix.startswith(local):
            return te + suffix[len(local):]
    return suffix


@dataclass(frozen=True)
class SavedForm:
    """How a saved model key holds its logical tensors: ``decoder.layers.<suffix>`` stacks the
    layers on a leading axis, ``decoder.layers.{i}.<suffix>`` is one layer's (megatron-core's
    non-homogeneous layers: mixed dense and MoE ones), a routed experts' key adds an expert
    axis after the layer's; other keys are a tensor each."""

    suffix: str | None      # per-layer suffix, running spec's names (expert 0's); None outside the layers
    layer: int | None       # the global layer of a per-layer key
    expert: bool

    @property
    def leading(self) -> int:
        """Axes ahead of the tensor's own: the layer (stacked) and the expert."""
        return (self.suffix is not None and self.layer is None) + self.expert

    def logical(self, key: str, index: tuple[int, ...]) -> str:
        """The logical tensor at a position of the leading axes."""
        if self.suffix is None:
            return key
        layer = self.layer if self.layer is not None else index[0]
        return names.layer_key(layer, names.with_expert(self.suffix, index[-1]) if self.expert else self.suffix)


def saved_form(key: str, transformer_impl: str) -> SavedForm:
    if not key.startswith(LAYERS):
        return SavedForm(None, None, False)
    one = _ONE_LAYER.match(key)
    rest = key[one.end():] if one else key[len(LAYERS):]
    return SavedForm(local_suffix(rest, transformer_impl), int(one.group(1)) if one else None,
                     rest.startswith(_EXPERTS_SAVED))


def extra_states(checkpoint: dist.DistCheckpoint, transformer_impl: str) -> list[str]:
    """The logical name of each ``_extra_state`` object."""
    out = []
    for key in checkpoint.objects:
        if "._extra_state/" in key and not key.startswith(("optimizer.", "rng_state", "chained_")):
            name, shard = key.split("/shard_")
            form = saved_form(name, transformer_impl)
            index = tuple(int(i) for i in shard.split("_")[0].split("."))
            out.append(form.logical(name, index[:form.leading]))
    return out


@dataclass
class Common:
    """common.pt, standing where a legacy checkpoint's first rank file stands."""

    path: Path
    obj: dict


@dataclass
class DistFiles:
    """A torch_dist checkpoint seen as a legacy one by ``MegatronSource`` (``ckpt``)."""

    dist: dist.DistCheckpoint
    iteration: int | None
    first: Common
    files: dict = field(default_factory=dict)   # no rank files

    @property
    def iter_dir(self) -> Path:
        return self.dist.iter_dir

    @property
    def args(self):
        return self.first.obj.get("args")

    @property
    def transformer_impl(self) -> str:
        """The layer spec it was saved from (torch_dist saves both under Transformer Engine's names)."""
        return getattr(self.args, "transformer_impl", "transformer_engine")


def open_dist(iter_dir, iteration) -> DistFiles:
    checkpoint = dist.DistCheckpoint(iter_dir)
    common = dict(checkpoint.common)
    path = Path(iter_dir) / dist.COMMON
    if common.get("args") is None:
        raise CheckpointError(path, "no 'args' saved in the checkpoint; cannot tell its layout")
    groups = _param_groups(checkpoint)
    if groups is not None:
        common["optimizer"] = groups
    return DistFiles(checkpoint, iteration, Common(path, common))


def _param_groups(checkpoint: dist.DistCheckpoint) -> dict | list | None:
    """The optimizer's param groups (with the Adam step) as a legacy file's ``optimizer`` entry
    (a chained optimizer's: [dense, expert])."""
    saved = checkpoint.common.get("optimizer")
    if isinstance(saved, dict) and "optimizer" in saved:   # fully_reshardable: common to all ranks
        return {"optimizer": saved["optimizer"]}
    for prefixes in ([""], ["chained_0.", "chained_1."]):
        keys = [optimizer_object(0, "optimizer", prefix) for prefix in prefixes]
        if all(key in checkpoint.objects for key in keys):
            entries = [{"optimizer": _unwrap(checkpoint, key)} for key in keys]
            return entries[0] if len(entries) == 1 else entries
    return None


def _unwrap(checkpoint: dist.DistCheckpoint, key: str):
    """A ShardedObject's data (saved as a one-element list)."""
    stored = checkpoint.read_object(key)
    if not isinstance(stored, list) or len(stored) != 1:
        raise CheckpointError(checkpoint.iter_dir / dist.METADATA, f"object '{key}' is not a saved ShardedObject")
    return stored[0]


# ---- the weights ---------------------------------------------------------------------------

def model_keys(checkpoint: dist.DistCheckpoint) -> list[str]:
    """Saved model tensor keys, in saved order."""
    return [k for k in checkpoint.tensors if not k.startswith(("optimizer.", "rng_state", "chained_"))]


def _to_logical(rule, spec, key: str, box: tuple[tuple[int, ...], tuple[int, ...]]) -> Box:
    """A saved per-layer box as a box of the logical tensor (fc1's rows split into gate/up)."""
    offsets, sizes = box
    if not rule.fused:
        return Box(tuple(offsets), tuple(sizes))
    rows = layout.fused_rows(rule, spec)
    part, start = divmod(offsets[0], rows)
    if start + sizes[0] > rows:
        raise LayoutError(f"'{key}': a saved chunk crosses the gate/up boundary")
    return Box((part, start, *offsets[1:]), (1, sizes[0], *sizes[1:]))


def from_logical(rule, spec, box: Box) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Inverse of ``_to_logical``: a logical box as saved (offsets, sizes) without the leading axes."""
    if not rule.fused:
        return box.offsets, box.lengths
    rows = layout.fused_rows(rule, spec)
    if box.lengths[0] != 1:
        raise LayoutError("a fused box spans gate and up")
    return (box.offsets[0] * rows + box.offsets[1], *box.offsets[2:]), box.lengths[1:]


def _select(lazy: LazyTensor, index: tuple[int, ...]) -> LazyTensor:
    """The sub-tensor at ``index`` of a chunk's leading axes."""
    offset = lazy.offset + sum(i * stride for i, stride in zip(index, lazy.stride))
    return LazyTensor(lazy.storage, offset, lazy.shape[len(index):], lazy.stride[len(index):])


def dist_weights(checkpoint: dist.DistCheckpoint, spec, transformer_impl: str, prefix: str = "",
                 dtype=None) -> Source:
    """The logical tensors stored under ``prefix`` + each model key, every saved chunk (layer by
    layer, expert by expert) a piece. ``_extra_state`` objects become entries without data."""
    tensors: Source = {}
    where = checkpoint.iter_dir / dist.METADATA
    for saved_key in model_keys(checkpoint):
        stored = checkpoint.tensors.get(prefix + saved_key)
        if stored is None:
            raise CheckpointError(where, f"no '{prefix + saved_key}' (the optimizer state of '{saved_key}')")
        form = saved_form(saved_key, transformer_impl)
        lead = form.leading
        name = names.classify(form.logical(saved_key, (0,) * lead))
        if name is None or len(stored.shape) <= lead:
            raise CheckpointError(where, f"unsupported tensor '{saved_key}'")
        try:   # the logical shape: a single rank's placement is the whole tensor
            shape = layout.placement(name.rule, spec, ParallelConfig(), Rank(0, 0), spec.padded_vocab_size,
                                     stored.shape[lead:]).logical_shape
        except LayoutError as e:
            raise CheckpointError(where, f"'{saved_key}': {e}") from None
        for chunk in stored.chunks:
            try:
                box = _to_logical(name.rule, spec, saved_key, (chunk.offsets[lead:], chunk.sizes[lead:]))
            except LayoutError as e:
                raise CheckpointError(where, f"'{saved_key}': {e}") from None
            for index in itertools.product(*(range(size) for size in chunk.sizes[:lead])):
                at = tuple(o + i for o, i in zip(chunk.offsets, index))
                tensor = tensors.setdefault(form.logical(saved_key, at), Tensor(shape, dtype or stored.dtype))
                tensor.add(box, ChunkView(checkpoint, stored.key, chunk, index, box.lengths))
    for name in extra_states(checkpoint, transformer_impl):
        tensors.setdefault(name, Tensor((), None))
    # In megatron-core's order, which the optimizer's buffers follow and the index does not keep
    # (it lists what each rank wrote first).
    return dict(sorted(tensors.items(), key=lambda item: names.state_dict_order(item[0])))


def source_files(weights: Source, spec, config, where) -> list:
    """What each rank file of the saved layout would hold (keys in megatron-core's state-dict
    order, stored shapes and dtypes): the legacy view the optimizer's param_map and the planner
    work on."""
    from ckpt_hooks.megatron.checkpoint import SourceFile, key_order, target_keys

    order = key_order(weights, spec)
    files = []
    for rank in config.file_ranks():
        chunks = {}
        for vp, chunk in enumerate(legacy.chunk_keys(config.vpp)):
            metas = {}
            for key, logical in target_keys(order, spec, config, rank, vp):
                rule = names.classify(key).rule
                tensor = weights.get(logical)
                if rule.kind == EXTRA:
                    metas[key] = None
                    continue
                if tensor is None:
                    raise CheckpointError(where, f"no '{logical}' saved")
                try:
                    placed = layout.placement(rule, spec, config, rank, spec.padded_vocab_size, tensor.shape)
                except LayoutError as e:
                    raise CheckpointError(where, f"'{logical}': {e}") from None
                metas[key] = TensorMeta(placed.stored_shape, tensor.dtype)
            chunks[chunk] = metas
        files.append(SourceFile(str(where), rank, chunks))
    return files


# ---- the optimizer -------------------------------------------------------------------------

class ChunkView:
    """The sub-tensor at ``index`` of a saved chunk's leading (layer, expert) axes, seen in
    ``shape``: the engine's piece handle. Its record is opened on the first read, so that a rank
    planning its share parses only the records it reads."""

    def __init__(self, checkpoint: dist.DistCheckpoint, key: str, chunk: dist.Chunk, index: tuple[int, ...], shape):
        self.checkpoint, self.key, self.chunk, self.index, self.shape = checkpoint, key, chunk, index, tuple(shape)

    @property
    def path(self) -> Path:
        return self.checkpoint.iter_dir / self.chunk.record.relative_path

    def read_into(self, slices: tuple[slice, ...], out: torch.Tensor, exact: bool = False) -> None:
        torch_file, lazy = self.checkpoint.chunk_tensor(self.key, self.chunk)
        TensorView(torch_file, _select(lazy, self.index), self.shape).read_into(slices, out, exact)


class FlatView:
    """A parameter's state inside a flat bucket tensor saved in chunks: elements [start,
    start + numel) of the bucket, seen in ``shape`` (the engine's piece handle). ``pieces``:
    (begin, end, key, chunk) of the bucket's chunks, opened on the first read."""

    def __init__(self, checkpoint: dist.DistCheckpoint, pieces: list[tuple[int, int, str, dist.Chunk]], start: int,
                 shape: tuple, transposed: tuple | None = None):
        self.checkpoint, self.pieces, self.start, self.shape = checkpoint, pieces, start, tuple(shape)
        self.transposed = transposed   # the 2-D shape whose transpose the elements hold (a grouped expert's block)

    @property
    def path(self) -> Path:
        return self.checkpoint.iter_dir / self.pieces[0][3].record.relative_path

    def read_into(self, slices: tuple[slice, ...], out: torch.Tensor, exact: bool = False) -> None:
        dtype = self.checkpoint.tensors[self.pieces[0][2]].dtype
        if self.transposed is not None:   # the whole block, transposed
            rows, cols = self.transposed
            block = torch.empty(rows * cols, dtype=dtype)
            self._read(self.start, rows * cols, block)
            out.copy_(block.view(cols, rows).t().reshape(self.shape)[slices])
            return
        starts, run = contiguous_runs(self.shape, slices)
        direct = out.is_contiguous() and out.dtype == dtype   # read into ``out`` itself
        buffer = out.view(-1) if direct else torch.empty(len(starts) * run, dtype=dtype)
        for n, at in enumerate(starts):
            self._read(self.start + at, run, buffer[n * run:(n + 1) * run])
        if not direct:
            out.copy_(buffer.view(out.shape))

    def _read(self, begin: int, count: int, out: torch.Tensor) -> None:
        done = 0
        for lo, hi, key, chunk in self.pieces:
            a, b = max(lo, begin + done), min(hi, begin + count)
            if a >= b or a != begin + done:
                continue
            torch_file, lazy = self.checkpoint.chunk_tensor(key, chunk)
            torch_file.read_runs(lazy, [a - lo], b - a, out[done:done + b - a])
            done += b - a
        if done != count:
            raise CheckpointError(self.path, f"bucket elements [{begin}, {begin + count}) are not all saved")


def recorded_maps_dir(iter_dir, rank, config) -> Path:
    """Where the save hook records a file rank's param_map beside a torch_dist checkpoint
    (Megatron's own files unchanged): ``ckpt_hooks/mp_rank_TT[_PPP][_EEE]/param_map.json``."""
    return Path(iter_dir) / HOOK_DIR / legacy.rank_dir_name(rank, config)


def sharding_type(checkpoint: dist.DistCheckpoint) -> str | None:
    """The saved distributed-optimizer sharding type, None if no optimizer state was saved."""
    saved = checkpoint.common.get("optimizer")
    if saved is None:
        return None
    content = checkpoint.common.get("content_metadata") or {}
    return content.get(SHARDING) or saved.get("param_state_sharding_type")


def bucket_key(group: int, index: int, param_dtype: str, grad_dtype: str, bucket: int, state: str,
               prefix: str = "") -> str:
    return (f"{prefix}optimizer.distributed.dp_group_idx_{group}.gbuf_idx_{index}.dtype_(torch.{param_dtype}, "
            f"torch.{grad_dtype}).bucket_idx_{bucket}.{state}")


class DistOptimizer:
    """The optimizer states of a torch_dist checkpoint, each a Source (``sources[state]``), with
    the interface of ``optimizer.SourceOptimizer``."""

    def __init__(self, src):
        checkpoint: dist.DistCheckpoint = src.ckpt.dist
        self.checkpoint = checkpoint
        self.files = {}
        self.param_groups = src.ckpt.first.obj.get("optimizer")
        sharding = sharding_type(checkpoint)
        where = checkpoint.iter_dir / dist.METADATA
        self.grad_dtypes: dict[str, str] = {}
        self.maps = {}
        if sharding == "fully_reshardable":
            self.sources = {state: dist_weights(checkpoint, src.spec, src.ckpt.transformer_impl,
                                                f"optimizer.state.{state}.", torch.float32)
                            for state in STATES}
            # Not saved in this form: megatron-core's grads are fp32 with --accumulate-allreduce-grads-in-fp32.
            fp32_grads = getattr(src.ckpt.args, "accumulate_allreduce_grads_in_fp32", True)
            for key in model_keys(checkpoint):
                param_dtype = dtype_name(checkpoint.tensors[key].dtype)
                self.grad_dtypes.setdefault(param_dtype, "float32" if fp32_grads else param_dtype)
        elif sharding == "dp_reshardable":
            self.sources = self._dp_reshardable(src, where)
        elif sharding is None:
            raise CheckpointError(where, "no optimizer state saved (pass --convert-param-only for the weights alone)")
        else:
            raise CheckpointError(where, f"distributed-optimizer sharding type '{sharding}' is not supported "
                                         "(dp_reshardable and fully_reshardable are)")

    def _dp_reshardable(self, src, where) -> dict[str, Source]:
        from ckpt_hooks.megatron.checkpoint import source_tensors
        from ckpt_hooks.megatron.optimizer import local_experts, read_recorded_maps, rebuild_maps

        checkpoint, config = self.checkpoint, src.layout
        for key in checkpoint.tensors:
            match = _BUCKET.fullmatch(key)
            if match:
                self.grad_dtypes[match.group(3)[6:]] = match.group(4)[6:]
        if not self.grad_dtypes:
            raise CheckpointError(where, "no dp_reshardable optimizer buckets saved")
        views = {}
        for f in src.files:
            maps = read_recorded_maps(recorded_maps_dir(checkpoint.iter_dir, f.rank, config), len(f.chunks)) or \
                rebuild_maps(src.spec, config, src.ckpt.args, f.rank.pp, f.chunks, self.grad_dtypes)
            self.maps[f.rank] = maps
            for expert, prefix in optimizers_of(config):
                if not expert and not config.holds_dense_optimizer(f.rank):
                    continue   # another file rank holds the dense state of its tensor-parallel rank
                views.update(self._buffer_views(f, [m for m in maps if m.expert == expert],
                                                optimizer_group(f.rank, config, expert), prefix, where,
                                                local_experts(src.spec, config)))
        return {state: source_tensors(src.files, src.placed,
                                      lambda f, chunk, key, where_, state=state: replace_shape(
                                          views.get((state, f.rank, chunk, key)), where_.view_shape),
                                      dtype=torch.float32)
                for state in STATES}

    def _buffer_views(self, f, maps, group: int, prefix: str, where, experts: int) -> dict:
        """(state, rank, chunk, key) -> FlatView of each parameter of one optimizer's buffers of a
        file rank, whose saved bucket sizes are checked against the param_map first."""
        from ckpt_hooks.megatron.optimizer import check_slot

        checkpoint, views = self.checkpoint, {}
        saved = _unwrap(checkpoint, optimizer_object(group, "per_bucket_numel_unpadded", prefix))
        mine = [{(getattr(torch, m.param_dtype), getattr(torch, m.grad_dtype)): list(m.per_bucket_numel_unpadded)}
                for m in maps]
        if saved != mine:
            raise CheckpointError(where, f"{prefix}model-parallel rank {group} (TP rank {f.rank.tp}, PP rank "
                                         f"{f.rank.pp}{f', EP rank {f.rank.ep}' if prefix else ''}) saved buckets "
                                         f"{saved}; the model's param_map needs {mine}: its elements would land "
                                         "misplaced")
        chunk_keys = list(f.chunks)
        for index, buffer_map in enumerate(maps):
            for state in STATES:
                buckets = []
                for bucket, numel in enumerate(buffer_map.per_bucket_numel_unpadded):
                    key = bucket_key(group, index, buffer_map.param_dtype, buffer_map.grad_dtype, bucket, state,
                                     prefix)
                    stored = checkpoint.tensors.get(key)
                    if stored is None or stored.shape != (numel,):
                        raise CheckpointError(where, f"no '{key}' of {numel} elements")
                    spans = [(c.offsets[0], c.offsets[0] + c.sizes[0], key, c) for c in stored.chunks]
                    buckets.append(sorted(spans, key=lambda p: p[0]))
                for slot in grouped_experts.unpacked(buffer_map, experts, where):
                    check_slot(slot, f, chunk_keys[buffer_map.chunk], where)
                    start = slot.start - buffer_map.bucket_indices[slot.bucket][0]
                    views[(state, f.rank, chunk_keys[buffer_map.chunk], slot.name)] = \
                        FlatView(checkpoint, buckets[slot.bucket], start, slot.shape,
                                 slot.shape if slot.transposed else None)
        return views

    def check_against_weights(self, src, sample: int = 64) -> None:
        """Nothing to cross-check file by file: one index (.metadata) names every chunk."""

    def plans(self, spec, target, ranks=None):
        from ckpt_hooks.megatron.checkpoint import plan_files
        return {state: {t.rank: t for t in plan_files(self.sources[state], spec, target, ranks=ranks)}
                for state in STATES}


def replace_shape(view: FlatView | None, shape) -> FlatView | None:
    """The same elements seen in the placement's view shape (fc1 fused rows as (2, F/tp, H));
    None where the file rank holds no state of the parameter (a chained optimizer's dense state
    is another file rank's)."""
    return None if view is None else FlatView(view.checkpoint, view.pieces, view.start, shape, view.transposed)


# ---- the source ----------------------------------------------------------------------------

def read_dist_source(iter_dir, iteration, true_vocab_size=None, make_vocab_size_divisible_by=None,
                     check_manifest: bool = True):
    """A torch_dist iteration directory as a ``MegatronSource`` (nothing read but the index,
    common.pt and the small optimizer objects), checked against its manifest where one lies
    beside it."""
    from ckpt_hooks.megatron import manifest
    from ckpt_hooks.megatron.checkpoint import MegatronSource, _described, place, settled_spec

    saved_manifest = manifest.read(iter_dir) if check_manifest else None
    if saved_manifest is not None:   # first: it names a replaced or truncated file as such
        manifest.check_sizes(saved_manifest, iter_dir)
    ckpt = open_dist(iter_dir, iteration)
    notes: list[str] = []
    spec, config = _described(ckpt.args, ckpt.first.path)
    if saved_manifest is not None:
        manifest.check_described(saved_manifest, iter_dir, spec, config)
    spec = settled_spec(spec, config, ckpt.args, ckpt.first.path, true_vocab_size, make_vocab_size_divisible_by, notes)
    where = ckpt.iter_dir / dist.METADATA
    weights = dist_weights(ckpt.dist, spec, ckpt.transformer_impl)
    if spec.tied_embeddings and names.OUTPUT in weights:
        raise CheckpointError(where, "tied embeddings, yet an output layer is saved")
    files = source_files(weights, spec, config, where)
    placed = place(spec, config, files)
    return MegatronSource(ckpt, spec, config, files, weights, placed, notes)
