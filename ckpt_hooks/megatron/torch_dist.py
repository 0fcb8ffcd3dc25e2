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

LAYERS = "decoder.layers."
# Megatron saves the local spec's norms under Transformer Engine's names.
_TE_NORMS = {"self_attention.linear_qkv.layer_norm_": "input_layernorm.",
             "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm."}
_BUCKET = re.compile(r"optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)\.dtype_\((torch\.\w+), (torch\.\w+)\)"
                     r"\.bucket_idx_(\d+)\.(param|exp_avg|exp_avg_sq)")
SHARDING = "distrib_optim_sharding_type"
HOOK_DIR = "ckpt_hooks"
# What Megatron-LM's _build_sharded_state_dict_metadata says of a dp_reshardable save.
CONTENT_METADATA = {SHARDING: "dp_reshardable", "singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def mp_rank(rank: Rank, config) -> int:
    """A rank's place in the model-parallel group: the ``N`` of ``dp_group_idx_N`` and ``__N_0.distcp``."""
    return rank.pp * config.tp + rank.tp


def optimizer_object(group: int, name: str) -> str:
    """The key of a model-parallel rank's optimizer object (``optimizer``, ``per_bucket_numel...``)."""
    return dist.object_key(f"optimizer.distributed.dp_group_idx_{group}.{name}")


def extra_states(checkpoint: dist.DistCheckpoint) -> list[tuple[str, int | None]]:
    """(saved name, layer) of each ``_extra_state`` object (layer None outside the layers)."""
    out = []
    for key in checkpoint.objects:
        if "._extra_state/" in key and not key.startswith(("optimizer.", "rng_state")):
            name, shard = key.split("/shard_")
            out.append((name, int(shard.split("_")[0]) if name.startswith(LAYERS) else None))
    return out


def local_suffix(suffix: str, transformer_impl: str) -> str:
    """A saved per-layer suffix under the names the running layer spec uses."""
    if transformer_impl == "local":
        for te, local in _TE_NORMS.items():
            if suffix.startswith(te):
                return local + suffix[len(te):]
    return suffix


def dist_suffix(suffix: str) -> str:
    for te, local in _TE_NORMS.items():
        if suffix.startswith(local):
            return te + suffix[len(local):]
    return suffix


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


def _param_groups(checkpoint: dist.DistCheckpoint) -> dict | None:
    """The optimizer's param groups (with the Adam step) as a legacy file's ``optimizer`` entry."""
    saved = checkpoint.common.get("optimizer")
    if isinstance(saved, dict) and "optimizer" in saved:   # fully_reshardable: common to all ranks
        return {"optimizer": saved["optimizer"]}
    key = optimizer_object(0, "optimizer")
    if key in checkpoint.objects:
        return {"optimizer": _unwrap(checkpoint, key)}
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
    return [k for k in checkpoint.tensors if not k.startswith(("optimizer.", "rng_state"))]


def layer_suffixes(checkpoint: dist.DistCheckpoint, transformer_impl: str) -> list[str]:
    """Per-layer key suffixes (under the running spec's names, ``_extra_state`` included) in the
    order the first rank saved them: its modules' order."""
    suffixes = []
    for key in itertools.chain(checkpoint.tensors, checkpoint.objects):
        if key.startswith(LAYERS):
            suffix = local_suffix(key[len(LAYERS):].split("/shard_")[0], transformer_impl)
            if suffix not in suffixes:
                suffixes.append(suffix)
    return suffixes


def _to_logical(rule, spec, key: str, box: tuple[tuple[int, ...], tuple[int, ...]]) -> Box:
    """A saved per-layer box as a box of the logical tensor (fc1's rows split into gate/up)."""
    offsets, sizes = box
    if not rule.fused:
        return Box(tuple(offsets), tuple(sizes))
    rows = spec.ffn_hidden_size
    part, start = divmod(offsets[0], rows)
    if start + sizes[0] > rows:
        raise LayoutError(f"'{key}': a saved chunk crosses the gate/up boundary")
    return Box((part, start, *offsets[1:]), (1, sizes[0], *sizes[1:]))


def from_logical(rule, spec, box: Box) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Inverse of ``_to_logical``: a logical box as saved (offsets, sizes) without the layer axis."""
    if not rule.fused:
        return box.offsets, box.lengths
    rows = spec.ffn_hidden_size
    if box.lengths[0] != 1:
        raise LayoutError("a fused box spans gate and up")
    return (box.offsets[0] * rows + box.offsets[1], *box.offsets[2:]), box.lengths[1:]


def _layer(lazy: LazyTensor, j: int) -> LazyTensor:
    """Layer ``j`` of a chunk stacked on its leading axis."""
    return LazyTensor(lazy.storage, lazy.offset + j * lazy.stride[0], lazy.shape[1:], lazy.stride[1:])


def dist_weights(checkpoint: dist.DistCheckpoint, spec, transformer_impl: str, prefix: str = "",
                 dtype=None) -> Source:
    """The logical tensors stored under ``prefix`` + each model key, every saved chunk (layer by
    layer) a piece. ``_extra_state`` objects become entries without data."""
    tensors: Source = {}
    where = checkpoint.iter_dir / dist.METADATA
    for saved_key in model_keys(checkpoint):
        stored = checkpoint.tensors.get(prefix + saved_key)
        if stored is None:
            raise CheckpointError(where, f"no '{prefix + saved_key}' (the optimizer state of '{saved_key}')")
        stacked = saved_key.startswith(LAYERS)
        suffix = local_suffix(saved_key[len(LAYERS):], transformer_impl) if stacked else saved_key
        name = names.classify(names.layer_key(0, suffix) if stacked else suffix)
        if name is None:
            raise CheckpointError(where, f"unsupported tensor '{saved_key}'")
        try:   # the logical shape: a single rank's placement is the whole tensor
            shape = layout.placement(name.rule, spec, ParallelConfig(), Rank(0, 0), spec.padded_vocab_size,
                                     stored.shape[1:] if stacked else stored.shape).logical_shape
        except LayoutError as e:
            raise CheckpointError(where, f"'{saved_key}': {e}") from None
        for chunk in stored.chunks:
            inner = (chunk.offsets[1:], chunk.sizes[1:]) if stacked else (chunk.offsets, chunk.sizes)
            try:
                box = _to_logical(name.rule, spec, saved_key, inner)
            except LayoutError as e:
                raise CheckpointError(where, f"'{saved_key}': {e}") from None
            layers = range(chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]) if stacked else [None]
            for j, global_layer in enumerate(layers):
                logical = names.layer_key(global_layer, suffix) if stacked else suffix
                tensor = tensors.setdefault(logical, Tensor(shape, dtype or stored.dtype))
                tensor.add(box, ChunkView(checkpoint, stored.key, chunk, j if stacked else None, box.lengths))
    for name, layer in extra_states(checkpoint):
        if layer is not None:
            name = names.layer_key(layer, local_suffix(name[len(LAYERS):], transformer_impl))
        tensors.setdefault(name, Tensor((), None))
    return tensors


def source_files(checkpoint: dist.DistCheckpoint, spec, config, transformer_impl: str, where) -> list:
    """What each rank file of the saved layout would hold (keys in state-dict order, stored
    shapes and dtypes): the legacy view the optimizer's param_map and the planner work on."""
    from ckpt_hooks.megatron.checkpoint import SourceFile

    suffixes = layer_suffixes(checkpoint, transformer_impl)
    dtypes = {k: t.dtype for k, t in checkpoint.tensors.items()}
    outer = [k for k in model_keys(checkpoint) if not k.startswith(LAYERS)]
    outer += [name for name, layer in extra_states(checkpoint) if layer is None]
    if spec.tied_embeddings and config.pp > 1 and names.OUTPUT not in outer:
        outer.append(names.OUTPUT)   # the last stage holds the shared embedding as its output layer
    files = []
    for rank in config.file_ranks():
        chunks = {}
        for vp, chunk in enumerate(legacy.chunk_keys(config.vpp)):
            first = layout.is_first_chunk(config, rank.pp, vp)
            last = layout.is_last_chunk(config, rank.pp, vp)
            keys = [k for k in outer if first and k.startswith("embedding.")]
            keys += [names.layer_key(i, s) for i in range(len(layout.chunk_layers(spec, config, rank.pp, vp)))
                     for s in suffixes]
            keys += [k for k in outer if last and k.startswith(("decoder.", "output_layer."))
                     and not (k == names.OUTPUT and spec.tied_embeddings and first)]
            metas = {}
            for key in keys:
                name = names.classify(key)
                if name is None:
                    raise CheckpointError(where, f"unsupported tensor '{key}'")
                if name.rule.kind == EXTRA:
                    metas[key] = None
                    continue
                saved = names.EMBEDDING if key == names.OUTPUT and spec.tied_embeddings else \
                    (LAYERS + dist_suffix(name.suffix) if name.local_layer is not None else key)
                stored = checkpoint.tensors[saved]
                file_shape = stored.shape[1:] if name.local_layer is not None else stored.shape
                try:
                    where_ = layout.placement(name.rule, spec, config, rank, spec.padded_vocab_size, file_shape)
                except LayoutError as e:
                    raise CheckpointError(where, f"'{saved}': {e}") from None
                metas[key] = TensorMeta(where_.stored_shape, dtypes[saved])
            chunks[chunk] = metas
        files.append(SourceFile(str(where), rank, chunks))
    return files


# ---- the optimizer -------------------------------------------------------------------------

class ChunkView:
    """Layer ``layer`` of a saved chunk (None: the whole chunk) seen in ``shape``: the engine's
    piece handle. Its record is opened on the first read, so that a rank planning its share
    parses only the records it reads."""

    def __init__(self, checkpoint: dist.DistCheckpoint, key: str, chunk: dist.Chunk, layer: int | None, shape):
        self.checkpoint, self.key, self.chunk, self.layer, self.shape = checkpoint, key, chunk, layer, tuple(shape)

    @property
    def path(self) -> Path:
        return self.checkpoint.iter_dir / self.chunk.record.relative_path

    def read_into(self, slices: tuple[slice, ...], out: torch.Tensor, exact: bool = False) -> None:
        torch_file, lazy = self.checkpoint.chunk_tensor(self.key, self.chunk)
        part = lazy if self.layer is None else _layer(lazy, self.layer)
        TensorView(torch_file, part, self.shape).read_into(slices, out, exact)


class FlatView:
    """A parameter's state inside a flat bucket tensor saved in chunks: elements [start,
    start + numel) of the bucket, seen in ``shape`` (the engine's piece handle). ``pieces``:
    (begin, end, key, chunk) of the bucket's chunks, opened on the first read."""

    def __init__(self, checkpoint: dist.DistCheckpoint, pieces: list[tuple[int, int, str, dist.Chunk]], start: int,
                 shape: tuple):
        self.checkpoint, self.pieces, self.start, self.shape = checkpoint, pieces, start, tuple(shape)

    @property
    def path(self) -> Path:
        return self.checkpoint.iter_dir / self.pieces[0][3].record.relative_path

    def read_into(self, slices: tuple[slice, ...], out: torch.Tensor, exact: bool = False) -> None:
        starts, run = contiguous_runs(self.shape, slices)
        dtype = self.checkpoint.tensors[self.pieces[0][2]].dtype
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


def recorded_maps_dir(iter_dir, rank, pp: int) -> Path:
    """Where the save hook records a model-parallel rank's param_map beside a torch_dist checkpoint
    (Megatron's own files unchanged): ``ckpt_hooks/mp_rank_TT[_PPP]/param_map.json``."""
    return Path(iter_dir) / HOOK_DIR / legacy.rank_dir_name(rank, ParallelConfig(pp=pp))


def sharding_type(checkpoint: dist.DistCheckpoint) -> str | None:
    """The saved distributed-optimizer sharding type, None if no optimizer state was saved."""
    saved = checkpoint.common.get("optimizer")
    if saved is None:
        return None
    content = checkpoint.common.get("content_metadata") or {}
    return content.get(SHARDING) or saved.get("param_state_sharding_type")


def bucket_key(group: int, index: int, param_dtype: str, grad_dtype: str, bucket: int, state: str) -> str:
    return (f"optimizer.distributed.dp_group_idx_{group}.gbuf_idx_{index}.dtype_(torch.{param_dtype}, "
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
        from ckpt_hooks.megatron.optimizer import read_recorded_maps, rebuild_maps

        checkpoint, config = self.checkpoint, src.layout
        for key in checkpoint.tensors:
            match = _BUCKET.fullmatch(key)
            if match:
                self.grad_dtypes[match.group(3)[6:]] = match.group(4)[6:]
        if not self.grad_dtypes:
            raise CheckpointError(where, "no dp_reshardable optimizer buckets saved")
        views = {}
        for f in src.files:
            group = mp_rank(f.rank, config)
            maps = read_recorded_maps(recorded_maps_dir(checkpoint.iter_dir, f.rank, config.pp)) or \
                rebuild_maps(src.spec, config, src.ckpt.args, f.rank.pp, f.chunks, self.grad_dtypes)
            self.maps[f.rank] = maps
            saved = _unwrap(checkpoint, optimizer_object(group, "per_bucket_numel_unpadded"))
            mine = [{(getattr(torch, m.param_dtype), getattr(torch, m.grad_dtype)): list(m.per_bucket_numel_unpadded)}
                    for m in maps]
            if saved != mine:
                raise CheckpointError(where, f"model-parallel rank {group} (TP rank {f.rank.tp}, PP rank {f.rank.pp}) "
                                             f"saved buckets {saved}; the model's param_map needs {mine}: its "
                                             "elements would land misplaced")
            chunk_keys = list(f.chunks)
            for index, buffer_map in enumerate(maps):
                for state in STATES:
                    buckets = []
                    for bucket, numel in enumerate(buffer_map.per_bucket_numel_unpadded):
                        key = bucket_key(group, index, buffer_map.param_dtype, buffer_map.grad_dtype, bucket, state)
                        stored = checkpoint.tensors.get(key)
                        if stored is None or stored.shape != (numel,):
                            raise CheckpointError(where, f"no '{key}' of {numel} elements")
                        spans = [(c.offsets[0], c.offsets[0] + c.sizes[0], key, c) for c in stored.chunks]
                        buckets.append(sorted(spans, key=lambda p: p[0]))
                    for slot in buffer_map.params:
                        start = slot.start - buffer_map.bucket_indices[slot.bucket][0]
                        views[(state, f.rank, chunk_keys[buffer_map.chunk], slot.name)] = \
                            FlatView(checkpoint, buckets[slot.bucket], start, slot.shape)
        return {state: source_tensors(src.files, src.placed,
                                      lambda f, chunk, key, where_, state=state: replace_shape(
                                          views[(state, f.rank, chunk, key)], where_.view_shape),
                                      dtype=torch.float32)
                for state in STATES}

    def check_against_weights(self, src, sample: int = 64) -> None:
        """Nothing to cross-check file by file: one index (.metadata) names every chunk."""

    def plans(self, spec, target, ranks=None):
        from ckpt_hooks.megatron.checkpoint import plan_files
        return {state: {t.rank: t for t in plan_files(self.sources[state], spec, target, ranks=ranks)}
                for state in STATES}


def replace_shape(view: FlatView, shape) -> FlatView:
    """The same elements seen in the placement's view shape (fc1 fused rows as (2, F/tp, H))."""
    return FlatView(view.checkpoint, view.pieces, view.start, shape)


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
    files = source_files(ckpt.dist, spec, config, ckpt.transformer_impl, where)
    placed = place(spec, config, files)
    weights = dist_weights(ckpt.dist, spec, ckpt.transformer_impl)
    if spec.tied_embeddings and names.OUTPUT in weights:
        raise CheckpointError(where, "tied embeddings, yet an output layer is saved")
    return MegatronSource(ckpt, spec, config, files, weights, placed, notes)
