"""Distributed-optimizer buffers as a Source and a Sink (Megatron legacy ``distrib_optim.pt``).

    distrib_optim.pt = {"buckets_coalesced": True,
                        buffer index: {(param dtype, grad dtype): {"param", "exp_avg", "exp_avg_sq":
                                                                   flat fp32, "numel_unpadded": N}}}
    with experts: [dense optimizer's, expert optimizer's] (megatron-core's ChainedOptimizer), each
    such a dict, or None where the rank is not rank 0 of that optimizer's data-parallel group

Through a param_map (``algebra.param_map``: recorded by the save hook, or rebuilt from the model
and megatron-core's rules and checked against the stored sizes) each parameter's slice of a flat
buffer is a piece of the parameter's logical tensor, read in place from the file: every state is
a Source like the weights, resharded by the same planner. On the way out each flat buffer of a
target rank is packed from its parameters' planned tensors when it is written.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch

from ckpt_hooks.algebra import layout, names
from ckpt_hooks.algebra.param_map import BufferMap, ParamInfo, dtype_name, rebuild
from ckpt_hooks.algebra.spec import ModelSpec, ParallelConfig, Rank
from ckpt_hooks.engine.execute import build_tensor
from ckpt_hooks.engine.plan import TargetFile
from ckpt_hooks.engine.source import STATES, Source, TensorMeta
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.megatron_legacy import OPTIMIZER_FILE, RECORDED_MAP
from ckpt_hooks.formats.torch_pickle import LazyTensor, TensorView, TorchFile
from ckpt_hooks.formats.torch_save import PendingTensor
from ckpt_hooks.megatron import grouped_experts
from ckpt_hooks.megatron.checkpoint import plan_files, source_tensors


def bucket_size(args, chunk: int, pp_rank: int, dp: int) -> int | None:
    """The bucket size megatron-core's DDP uses for a chunk (None: one bucket)."""
    if not getattr(args, "overlap_grad_reduce", False) or chunk > 0 or pp_rank > 0:
        return None
    return getattr(args, "ddp_bucket_size", None) or max(40_000_000, 1_000_000 * dp)


def chunk_params(spec: ModelSpec, config: ParallelConfig, pp_rank: int, vp: int,
                 tensors: dict) -> list[tuple[ParamInfo, object]]:
    """(ParamInfo, dtype) of a chunk's parameters in ``named_parameters()`` order.

    ``tensors`` maps the chunk's state-dict keys to objects with ``shape`` and ``dtype``
    (None for non-tensor entries). A tied embedding is a *shared embedding*, with a bucket of
    its own, on the first stage and on the last when PP > 1."""
    first = layout.is_first_chunk(config, pp_rank, vp)
    last = layout.is_last_chunk(config, pp_rank, vp)
    shared = spec.tied_embeddings and config.pp > 1
    out = []
    for key, meta in tensors.items():
        name = names.classify(key)
        if meta is None or (name is not None and name.rule.kind == layout.EXTRA):
            continue  # not a parameter
        is_shared = shared and ((key == names.EMBEDDING and first and not last) or
                                (key == names.OUTPUT and last and not first))
        out.append((ParamInfo(key, tuple(meta.shape), is_shared), meta.dtype))
    return out


def is_expert_param(key: str) -> bool:
    """Whether a chunk key is a routed expert's (SequentialMLP's or GroupedMLP's)."""
    name = names.classify(key)
    return (name is not None and name.local_expert is not None) or grouped_experts.is_grouped(key)


def rebuild_maps(spec, config, args, pp_rank: int, chunks: dict, grad_dtypes: dict) -> list[BufferMap]:
    """The buffers of every chunk of one file rank, in the optimizers' order: the dense ones
    (sharded over DP x CP), then, with EP > 1, the routed experts' (over the expert-data-parallel
    group). megatron-core keeps experts apart only with EP > 1 (their params' ``allreduce``
    flag); at EP 1 they share the dense buffers and optimizer. ``chunks`` hold SequentialMLP's
    keys; a GroupedMLP model's buffers (``spec.moe_grouped_gemm``) hold its grouped tensors."""
    if spec.moe_grouped_gemm:
        chunks = {chunk: grouped_experts.grouped_metas(tensors) for chunk, tensors in chunks.items()}
    maps = []
    for expert, dp in ((False, config.dense_dp), (True, config.expert_dp)):
        for vp, tensors in enumerate(chunks.values()):
            by_dtype: OrderedDict[str, list[ParamInfo]] = OrderedDict()
            for info, dtype in chunk_params(spec, config, pp_rank, vp, tensors):
                if (config.ep > 1 and is_expert_param(info.name)) == expert:
                    by_dtype.setdefault(dtype_name(dtype), []).append(info)
            for param_dtype, params in by_dtype.items():
                maps.append(rebuild(params, chunk=vp, param_dtype=param_dtype, grad_dtype=grad_dtypes[param_dtype],
                                    dp_size=dp, bucket_size=bucket_size(args, vp, pp_rank, config.dense_dp),
                                    expert=expert))
    return maps


def read_recorded_maps(rank_dir, chunks: int) -> list[BufferMap] | None:
    """The param_maps the save hook recorded for a rank directory of ``chunks`` model chunks, if it did."""
    path = Path(rank_dir) / RECORDED_MAP
    if not path.is_file():
        return None
    try:
        maps = [BufferMap.from_json(entry) for entry in json.loads(path.read_text())]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path, f"unreadable recorded param_map ({type(e).__name__}: {e})") from None
    if any(m.chunk >= chunks for m in maps):
        raise CheckpointError(path, f"a buffer of model chunk {max(m.chunk for m in maps)}; the model has {chunks}")
    return maps


def check_slot(slot, f, chunk: str, path) -> None:
    """A param_map's parameter is one of the model chunk's tensors, with as many elements (a
    recorded map is read from a file of its own, which may be another model's)."""
    meta = f.chunks[chunk].get(slot.name)
    if meta is None or math.prod(meta.shape) != math.prod(slot.shape):
        raise CheckpointError(path, f"the param_map places '{slot.name}' {list(slot.shape)}, which model chunk "
                                    f"'{chunk}' of {f.path} does not hold")


def local_experts(spec: ModelSpec, config: ParallelConfig) -> int:
    """Routed experts per expert-parallel rank (0 in a dense model)."""
    return len(layout.expert_range(spec.num_experts, config, 0))


class SourceOptimizer:
    """The optimizer states of every source rank of a Megatron checkpoint (``MegatronSource``),
    each a Source of lazy per-parameter pieces (``sources[state]``)."""

    def __init__(self, src):
        self.files: dict[Rank, TorchFile] = {}
        self.views: dict[tuple, LazyTensor] = {}            # (state, rank, chunk, key) -> view
        self.grad_dtypes: dict[str, str] = {}
        self.maps: dict[Rank, list[BufferMap]] = {}         # checked against the files
        for f in src.files:
            path = Path(f.path).parent / OPTIMIZER_FILE
            if not path.is_file():
                raise CheckpointError(path, "missing: no distributed-optimizer state to convert "
                                            "(pass --convert-param-only for the weights alone)")
            self.files[f.rank] = TorchFile(path)
            self._index(self.files[f.rank], src.spec, src.layout, f, src.ckpt.args)
        self.param_groups = src.ckpt.first.obj.get("optimizer")
        self.sources: dict[str, Source] = {
            state: source_tensors(src.files, src.placed,
                                  lambda f, chunk, key, where, state=state: self._view(state, f, chunk, key, where),
                                  dtype=torch.float32)
            for state in STATES}
        self._check_held(src)

    def _view(self, state: str, f, chunk: str, key: str, where) -> TensorView | None:
        view = self.views.get((state, f.rank, chunk, key))
        return None if view is None else TensorView(self.files[f.rank], view, where.view_shape)

    def _check_held(self, src) -> None:
        """Every parameter's state is held by some file (a chained optimizer's dense state is in
        the dense data-parallel rank 0's files only)."""
        def piece(rank, chunk, key):
            logical, where = src.placed[(rank, chunk, key)]
            return logical, where.box
        held = {piece(rank, chunk, key) for state, rank, chunk, key in self.views if state == "param"}
        for (rank, chunk, key), (logical, where) in src.placed.items():
            if where is not None and (logical, where.box) not in held:
                raise CheckpointError(self.files[rank].path, f"{chunk}: no {OPTIMIZER_FILE} holds the optimizer "
                                                             f"state of '{key}' (its data-parallel rank 0's file lacks it)")

    def _index(self, torch_file: TorchFile, spec, source, f, args) -> None:
        obj = torch_file.obj
        maps = read_recorded_maps(Path(torch_file.path).parent, len(f.chunks))
        entries = obj if isinstance(obj, list) else [obj]
        flat = {}
        for expert, entry in enumerate(entries):
            if entry is None and isinstance(obj, list):
                continue   # another rank of this optimizer's data-parallel group saved it
            if not isinstance(entry, dict) or not entry.get("buckets_coalesced"):
                raise CheckpointError(torch_file.path, "not a legacy distributed-optimizer file "
                                                       "(expected 'buckets_coalesced' flat buffers)")
            buffers = [entry[i] for i in sorted(k for k in entry if isinstance(k, int))]
            flat[bool(expert)] = []
            for index, buffer in enumerate(buffers):
                for (param_dtype, grad_dtype), states in buffer.items():
                    self.grad_dtypes[dtype_name(param_dtype)] = dtype_name(grad_dtype)
                    flat[bool(expert)].append((index, dtype_name(param_dtype), states))
        maps = maps or rebuild_maps(spec, source, args, f.rank.pp, f.chunks, self.grad_dtypes)
        self.maps[f.rank] = maps
        optimizers = 1 + any(m.expert for m in maps)
        if len(entries) != optimizers:
            raise CheckpointError(torch_file.path, f"holds the state of {len(entries)} distributed optimizers; the "
                                                   f"model file {f.path} implies {optimizers} (dense"
                                                   + (" and expert)" if optimizers > 1 else ")"))
        chunk_keys = list(f.chunks)
        for expert, stored in flat.items():
            kind = [m for m in maps if m.expert == expert]
            if len(kind) != len(stored):
                raise CheckpointError(torch_file.path, f"holds {len(stored)} {'expert ' if expert else ''}grad "
                                                       f"buffers; the model file {f.path} implies {len(kind)}")
            self._index_buffers(torch_file, f, chunk_keys, kind, stored, local_experts(spec, source))

    def _index_buffers(self, torch_file: TorchFile, f, chunk_keys: list, maps: list[BufferMap], flat: list,
                       experts: int) -> None:
        for buffer_map, (index, param_dtype, states) in zip(maps, flat):
            stored = states.get("numel_unpadded")
            if buffer_map.param_dtype != param_dtype or stored != buffer_map.numel_unpadded:
                raise CheckpointError(torch_file.path, f"buffer {index} holds {stored} {param_dtype} elements; the "
                                                       f"param_map of the model ({buffer_map.param_dtype}) "
                                                       f"needs {buffer_map.numel_unpadded}")
            for state in STATES:
                tensor = states.get(state)
                if not isinstance(tensor, LazyTensor) or tensor.shape != (stored,):
                    raise CheckpointError(torch_file.path, f"buffer {index} '{state}' is not a flat tensor of {stored}")
                torch_file.check_complete([tensor])
                for slot in grouped_experts.unpacked(buffer_map, experts, torch_file.path):
                    check_slot(slot, f, chunk_keys[buffer_map.chunk], torch_file.path)
                    key = (state, f.rank, chunk_keys[buffer_map.chunk], slot.name)
                    self.views[key] = grouped_experts.view(tensor, buffer_map.legacy_offset(slot), slot.shape,
                                                           slot.transposed)

    def check_against_weights(self, src, sample: int = 64) -> None:
        """Each file's fp32 main params are its model file's weights (bitwise for fp32 weights,
        their rounding for bf16/fp16): checked on the first ``sample`` elements of each buffer's
        first parameter, which catches the optimizer files of two ranks swapped, or of another
        run, at the cost of a few hundred bytes per buffer."""
        for f in src.files:
            model = src.ckpt.files[f.rank]
            chunk_keys = list(f.chunks)
            for buffer_map in self.maps[f.rank]:
                slot = buffer_map.params[0]
                chunk = chunk_keys[buffer_map.chunk]
                if ("param", f.rank, chunk, slot.name) not in self.views:
                    continue   # held by another rank's file
                param, weight = self.views[("param", f.rank, chunk, slot.name)], model.obj[chunk][slot.name]
                if not weight.is_contiguous():
                    continue
                n = min(sample, param.numel)
                main, stored = torch.empty(n, dtype=param.dtype), torch.empty(n, dtype=weight.dtype)
                self.files[f.rank].read_runs(param, [0], n, main)
                model.read_runs(weight, [0], n, stored)
                if not torch.equal(main.to(weight.dtype), stored):
                    raise CheckpointError(self.files[f.rank].path, f"its fp32 params are not the weights of {model.path} "
                                                                   f"('{slot.name}'): the optimizer file of another "
                                                                   "rank or run?")

    def plans(self, spec, target, ranks=None) -> dict[str, dict[Rank, TargetFile]]:
        """For each state, its target files resharded like the weights: {state: {rank: file}}."""
        return {state: {t.rank: t for t in plan_files(self.sources[state], spec, target, ranks=ranks)}
                for state in STATES}


def held_state(planned: TargetFile, config: ParallelConfig) -> TargetFile:
    """A target rank's planned optimizer state as its file holds it: less the dense parameters
    where a chained optimizer's dense state is another rank's to save
    (``ParallelConfig.holds_dense_optimizer``)."""
    if config.holds_dense_optimizer(planned.rank):
        return planned
    return replace(planned, tensors=[t for t in planned.tensors if is_expert_param(t.key)])


def chained_param_groups(saved, config: ParallelConfig):
    """The model file's ``optimizer`` entry (param groups with the step) for a target layout: one
    DistributedOptimizer's state dict, or with EP > 1 megatron-core's chained [dense, expert].
    megatron-core finds a group by its (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)
    and ignores groups it does not have, so each side gets every group of the source."""
    entries = saved if isinstance(saved, list) else [saved]
    if saved is None or not all(isinstance(e, dict) and isinstance(e.get("optimizer"), dict) for e in entries):
        return saved
    if len(entries) == 1 and config.ep == 1:
        return saved

    def side(expert: bool) -> dict:
        groups = {}
        for entry in entries:
            for group in entry["optimizer"].get("param_groups", []):
                group = {**group, "is_expert_parallel": expert}
                groups.setdefault(tuple(str(group.get(k)) for k in _GROUP_KEYS), group)
        return {**entries[0], "optimizer": {**entries[0]["optimizer"], "param_groups": list(groups.values())}}
    return [side(False), side(True)] if config.ep > 1 else side(False)


_GROUP_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")   # megatron-core's identifier


def source_optimizer(src):
    """The optimizer states of a Megatron source, legacy (``distrib_optim.pt``) or torch_dist."""
    if src.ckpt_format == "torch_dist":
        from ckpt_hooks.megatron.torch_dist import DistOptimizer
        return DistOptimizer(src)
    return SourceOptimizer(src)


def target_maps(target_file: TargetFile, grad_dtypes: dict, spec, config, args) -> tuple[list[BufferMap], list[str]]:
    """The buffers megatron-core builds for a target rank's planned file, and its chunk keys."""
    by_chunk: OrderedDict[str, OrderedDict] = OrderedDict()
    for tensor in target_file.tensors:
        by_chunk.setdefault(tensor.chunk, OrderedDict())[tensor.key] = \
            None if tensor.placement is None else TensorMeta(tensor.placement.stored_shape, tensor.dtype)
    return rebuild_maps(spec, config, args, target_file.rank.pp, by_chunk, grad_dtypes), list(by_chunk)


def target_state(target_file: TargetFile, plans: dict[str, TargetFile], grad_dtypes: dict, spec, config, args,
                 progress=None) -> dict:
    """``distrib_optim.pt``'s content for one target rank, given the rank's planned file of each
    state: each flat buffer is produced when it is written."""
    maps, chunk_keys = target_maps(target_file, grad_dtypes, spec, config, args)
    indexed = {name: {(t.chunk, t.key): t for t in plans[name].tensors} for name in STATES}
    experts = local_experts(spec, config)
    optimizers = [_optimizer_state([m for m in maps if not m.expert], chunk_keys, indexed, experts, progress)
                  if config.holds_dense_optimizer(target_file.rank) else None]
    if any(m.expert for m in maps):   # megatron-core's ChainedOptimizer: [dense, expert]
        optimizers.append(_optimizer_state([m for m in maps if m.expert], chunk_keys, indexed, experts, progress))
    return optimizers[0] if len(optimizers) == 1 else optimizers


def _optimizer_state(maps: list[BufferMap], chunk_keys: list, indexed: dict, experts: int, progress) -> dict:
    """One distributed optimizer's ``distrib_optim.pt`` entry: each flat buffer produced when written."""
    state = {"buckets_coalesced": True}
    for index, buffer_map in enumerate(maps):
        flats = {}
        for name in STATES:
            def fill(flat, buffer_map=buffer_map, plan=indexed[name]):   # flat comes zeroed
                for slot in grouped_experts.unpacked(buffer_map, experts):
                    tensor = plan[(chunk_keys[buffer_map.chunk], slot.name)]
                    offset = buffer_map.legacy_offset(slot)
                    place = flat[offset:offset + tensor.placement.box.numel]
                    if slot.transposed:
                        place.copy_(grouped_experts.packed(slot, build_tensor(tensor)))
                    else:   # straight into the file's buffer
                        build_tensor(tensor, out=place.view(tensor.placement.stored_shape))
                    if progress is not None:
                        progress.update(tensor.nbytes)
            flats[name] = PendingTensor((buffer_map.numel_unpadded,), torch.float32, fill=fill)
        flats["numel_unpadded"] = buffer_map.numel_unpadded
        key = (getattr(torch, buffer_map.param_dtype), getattr(torch, buffer_map.grad_dtype))
        state[index] = {key: flats}
    return state
