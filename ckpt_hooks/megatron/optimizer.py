"""Distributed-optimizer buffers as a Source and a Sink (Megatron legacy ``distrib_optim.pt``).

    distrib_optim.pt = {"buckets_coalesced": True,
                        buffer index: {(param dtype, grad dtype): {"param", "exp_avg", "exp_avg_sq":
                                                                   flat fp32, "numel_unpadded": N}}}

Through a param_map (``algebra.param_map``: recorded by the save hook, or rebuilt from the model
and megatron-core's rules and checked against the stored sizes) each parameter's slice of a flat
buffer is a piece of the parameter's logical tensor, read in place from the file: every state is
a Source like the weights, resharded by the same planner. On the way out each flat buffer of a
target rank is packed from its parameters' planned tensors when it is written.
"""

from __future__ import annotations

import json
from collections import OrderedDict
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
from ckpt_hooks.formats.torch_pickle import LazyTensor, PendingTensor, TensorView, TorchFile, contiguous_strides
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


def rebuild_maps(spec, config, args, pp_rank: int, chunks: dict, grad_dtypes: dict) -> list[BufferMap]:
    """The buffers of every chunk of one (tp, pp) rank, in the optimizer's order."""
    maps = []
    for vp, tensors in enumerate(chunks.values()):
        by_dtype: OrderedDict[str, list[ParamInfo]] = OrderedDict()
        for info, dtype in chunk_params(spec, config, pp_rank, vp, tensors):
            by_dtype.setdefault(dtype_name(dtype), []).append(info)
        for param_dtype, params in by_dtype.items():
            # The dense optimizer shards over DP x CP (megatron-core's data-parallel group with context).
            maps.append(rebuild(params, chunk=vp, param_dtype=param_dtype, grad_dtype=grad_dtypes[param_dtype],
                                dp_size=config.dense_dp, bucket_size=bucket_size(args, vp, pp_rank, config.dense_dp)))
    return maps


def read_recorded_maps(rank_dir) -> list[BufferMap] | None:
    """The param_maps the save hook recorded for a rank directory, if it did."""
    path = Path(rank_dir) / RECORDED_MAP
    if not path.is_file():
        return None
    try:
        return [BufferMap.from_json(entry) for entry in json.loads(path.read_text())]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path, f"unreadable recorded param_map ({type(e).__name__}: {e})") from None


def _contiguous_view(flat: LazyTensor, offset: int, shape) -> LazyTensor:
    return LazyTensor(flat.storage, flat.offset + offset, tuple(shape), contiguous_strides(shape))


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
                                  lambda f, chunk, key, where, state=state: TensorView(
                                      self.files[f.rank], self.views[(state, f.rank, chunk, key)], where.view_shape),
                                  dtype=torch.float32)
            for state in STATES}

    def _index(self, torch_file: TorchFile, spec, source, f, args) -> None:
        obj = torch_file.obj
        if isinstance(obj, list):
            raise CheckpointError(torch_file.path, "several chained optimizers (MoE) are not supported yet")
        if not isinstance(obj, dict) or not obj.get("buckets_coalesced"):
            raise CheckpointError(torch_file.path, "not a legacy distributed-optimizer file "
                                                   "(expected 'buckets_coalesced' flat buffers)")
        buffers = [obj[i] for i in sorted(k for k in obj if isinstance(k, int))]
        flat = []
        for index, buffer in enumerate(buffers):
            for (param_dtype, grad_dtype), states in buffer.items():
                self.grad_dtypes[dtype_name(param_dtype)] = dtype_name(grad_dtype)
                flat.append((index, dtype_name(param_dtype), states))
        maps = read_recorded_maps(Path(torch_file.path).parent) or \
            rebuild_maps(spec, source, args, f.rank.pp, f.chunks, self.grad_dtypes)
        self.maps[f.rank] = maps
        if len(maps) != len(flat):
            raise CheckpointError(torch_file.path, f"holds {len(flat)} grad buffers; the model file "
                                                   f"{f.path} implies {len(maps)}")
        chunk_keys = list(f.chunks)
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
                for slot in buffer_map.params:
                    key = (state, f.rank, chunk_keys[buffer_map.chunk], slot.name)
                    self.views[key] = _contiguous_view(tensor, buffer_map.legacy_offset(slot), slot.shape)

    def check_against_weights(self, src, sample: int = 64) -> None:
        """Each file's fp32 main params are its model file's weights (bitwise for fp32 weights,
        their rounding for bf16/fp16): checked on the first ``sample`` elements of each buffer's
        first parameter, which catches the optimizer files of two ranks swapped, or of another
        run, at the cost of a few hundred bytes per buffer."""
        for f in src.files:
            model = src.ckpt.files[(f.rank.tp, f.rank.pp)]
            chunk_keys = list(f.chunks)
            for buffer_map in self.maps[f.rank]:
                slot = buffer_map.params[0]
                chunk = chunk_keys[buffer_map.chunk]
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
    state = {"buckets_coalesced": True}
    for index, buffer_map in enumerate(maps):
        flats = {}
        for name in STATES:
            def produce(buffer_map=buffer_map, plan=indexed[name]):
                flat = torch.zeros(buffer_map.numel_unpadded, dtype=torch.float32)
                for slot in buffer_map.params:
                    tensor = plan[(chunk_keys[buffer_map.chunk], slot.name)]
                    offset = buffer_map.legacy_offset(slot)
                    flat[offset:offset + tensor.placement.box.numel] = build_tensor(tensor).reshape(-1)
                    if progress is not None:
                        progress.update(tensor.nbytes)
                return flat
            flats[name] = PendingTensor((buffer_map.numel_unpadded,), torch.float32, produce)
        flats["numel_unpadded"] = buffer_map.numel_unpadded
        key = (getattr(torch, buffer_map.param_dtype), getattr(torch, buffer_map.grad_dtype))
        state[index] = {key: flats}
    return state
