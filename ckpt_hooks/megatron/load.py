"""Load a Megatron legacy checkpoint into a running megatron-core job at *its* layout.

Each rank plans only its own rank file of the target layout, and reads
only the source slices its model chunks and its DP shard of the optimizer need: no converted
copy on disk. Works the same when the layout did not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ckpt_hooks.algebra.layout import element_range_boxes
from ckpt_hooks.algebra.spec import ModelSpec, ParallelConfig, Rank, uneven_layers
from ckpt_hooks.engine.execute import build_tensor
from ckpt_hooks.engine.plan import restrict
from ckpt_hooks.engine.source import STATES
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.megatron_legacy import chunk_keys
from ckpt_hooks.megatron import grouped_experts
from ckpt_hooks.megatron.checkpoint import MegatronSource, plan_files, rank_rng, read_source
from ckpt_hooks.megatron.optimizer import chained_param_groups, local_experts, source_optimizer


@dataclass
class Loaded:
    """What a trainer needs besides the filled model and optimizer."""

    iteration: int | None
    scheduler: dict | None
    source: ParallelConfig
    target: ParallelConfig
    bytes_read: int      # by this rank, checkpoint metadata included
    args: object = None  # the saved Megatron-LM args
    num_floating_point_operations_so_far: int = 0
    rng_restored: bool = False  # only at an unchanged layout: RNG state is per rank

    @property
    def resharded(self) -> bool:
        return self.source.model_parallel != self.target.model_parallel


def running_layout(model_chunks) -> tuple[ParallelConfig, Rank]:
    """(layout, rank) of the calling rank, from megatron-core's parallel state."""
    from megatron.core import parallel_state as ps

    config = unwrap(model_chunks[0]).config
    pp = ps.get_pipeline_model_parallel_world_size()
    stages = uneven_layers(config.num_layers, pp, config.num_layers_in_first_pipeline_stage,
                           config.num_layers_in_last_pipeline_stage) if pp > 1 else None
    tp, ep, etp = (ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size(),
                   ps.get_expert_tensor_parallel_world_size())
    layout = ParallelConfig(tp=tp, pp=pp, vpp=len(model_chunks), layers_per_stage=stages,
                            dp=ps.get_data_parallel_world_size(), cp=ps.get_context_parallel_world_size(),
                            ep=ep, etp=None if etp == tp else etp)
    return layout, Rank(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                        ps.get_expert_model_parallel_rank())


def unwrap(module):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def check_same_model(spec: ModelSpec, model, path) -> None:
    config = model.config
    checks = {"num_layers": (spec.num_layers, config.num_layers), "hidden_size": (spec.hidden_size, config.hidden_size),
              "ffn_hidden_size": (spec.ffn_hidden_size, config.ffn_hidden_size),
              "num_attention_heads": (spec.num_attention_heads, config.num_attention_heads),
              "num_query_groups": (spec.num_query_groups, config.num_query_groups or config.num_attention_heads),
              "num_experts": (spec.num_experts, config.num_moe_experts or None)}
    wrong = [f"{k} {saved} (running {running})" for k, (saved, running) in checks.items() if saved != running]
    if wrong:
        raise CheckpointError(path, "checkpoint of a different model: " + ", ".join(wrong))


def load(model_chunks, optimizer, load_dir, *, restore_rng: bool = True) -> Loaded:
    """Fill ``model_chunks`` (and megatron-core's distributed ``optimizer``, if given) from the
    checkpoint in ``load_dir``, resharding from whatever layout it was saved at. At an unchanged
    layout the saved RNG state of this rank is restored too (unless ``restore_rng`` is False)."""
    from megatron.core import parallel_state as ps

    src = read_source(load_dir)
    ckpt = src.ckpt
    target, rank = running_layout(model_chunks)
    check_same_model(src.spec, unwrap(model_chunks[0]), ckpt.first.path)
    [mine] = plan_files(src.weights, src.spec, target, ranks={rank}, where=ckpt.first.path)
    for chunk, module in zip(chunk_keys(target.vpp), model_chunks):
        _load_weights(unwrap(module), [t for t in mine.tensors if t.chunk == chunk])
    opened = list(ckpt.files.values())
    if optimizer is not None:
        opened += _load_optimizer(optimizer, model_chunks, src, target, rank)
    loaded = Loaded(ckpt.iteration, ckpt.first.obj.get("opt_param_scheduler"), src.layout, target, 0, ckpt.args,
                    ckpt.first.obj.get("num_floating_point_operations_so_far", 0))
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    rng = rank_rng(src, rank, dp_rank) if restore_rng and not loaded.resharded else None
    if rng:
        _restore_rng(rng[0])
        loaded.rng_restored = True
    if src.ckpt_format == "torch_dist":
        opened.append(ckpt.dist)   # one reader for every record
    loaded.bytes_read = sum(f.bytes_read for f in opened)
    return loaded


def _load_weights(model, planned: list) -> None:
    """Each planned tensor read straight into the model's own parameter or buffer when the keys,
    shapes and dtypes all match (the usual case: no copy); otherwise built and handed to
    ``load_state_dict(strict=True)``, which says what does not fit."""
    own = model.state_dict(keep_vars=True)
    if any(grouped_experts.is_grouped(k) for k in own):   # GroupedMLP experts: built from their experts'
        by_key = {t.key: t for t in planned}
        state = grouped_experts.grouped_entries(by_key, lambda key, members: grouped_experts.group(
            key, [build_tensor(by_key[m], exact=True) for m in members]))
        model.load_state_dict({k: v if grouped_experts.is_grouped(k) else build_tensor(v, exact=True)
                               for k, v in state.items()}, strict=True)
        return
    fits = {t.key for t in planned} == set(own) and all(
        t.placement is None or (isinstance(own[t.key], torch.Tensor) and own[t.key].dtype == t.dtype and
                                tuple(own[t.key].shape) == t.placement.stored_shape and own[t.key].is_contiguous())
        for t in planned)
    if not fits:
        model.load_state_dict({t.key: build_tensor(t, exact=True) for t in planned}, strict=True)
        return
    with torch.no_grad():
        for t in planned:
            if t.placement is not None:   # _extra_state entries carry nothing to load
                build_tensor(t, exact=True, out=own[t.key].detach())


def _restore_rng(state: dict) -> None:
    """As Megatron-LM's load_checkpoint does (without --data-parallel-random-init)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _allocate_state(dopt) -> None:
    """Allocate the inner optimizer's state, to be overwritten by the load: torch's Adam/AdamW
    state directly (megatron-core's own way, a dummy step over every parameter, costs an
    optimizer step); any other optimizer through megatron-core's."""
    inner = dopt.optimizer
    if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
        dopt._init_optimizer_states_with_dummy_values()
        return
    for group in inner.param_groups:
        for param in group["params"]:
            # Every element is overwritten by the load: no need to zero (touch) the memory now.
            state = {"step": torch.tensor(0.0), "exp_avg": torch.empty_like(param),
                     "exp_avg_sq": torch.empty_like(param)}
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(param)   # not in the checkpoint
            inner.state[param] = state


def distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizers of a (possibly chained) megatron-core optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _load_optimizer(optimizer, model_chunks, src: MegatronSource, target: ParallelConfig, rank: Rank) -> list:
    """Each model param's fp32 main param and Adam moments, reading only this DP rank's range."""
    ckpt = src.ckpt
    optimizer_source = source_optimizer(src)
    plans = {state: {(t.chunk, t.key): t for t in files[rank].tensors}
             for state, files in optimizer_source.plans(src.spec, target, ranks={rank}).items()}
    saved = optimizer_source.param_groups
    if saved is None:
        raise CheckpointError(ckpt.first.path, "no 'optimizer' entry (param groups, step) to resume from")
    groups = chained_param_groups(saved, target)
    groups = groups if isinstance(groups, list) else [groups]
    step = groups[0]["optimizer"]["param_groups"][0]["step"]
    optimizers = distributed_optimizers(optimizer)
    if len(optimizers) != len(groups):
        raise CheckpointError(ckpt.first.path, f"the running job chains {len(optimizers)} distributed optimizers, "
                                               f"its layout ({target.describe()}) {len(groups)}")
    for dopt, entry in zip(optimizers, groups):
        _load_into(dopt, entry, step, plans, model_chunks, target, local_experts(src.spec, target))
    return list(optimizer_source.files.values())


def _load_into(dopt, groups: dict, step: float, plans: dict, model_chunks, target: ParallelConfig,
               experts: int) -> None:
    """One distributed optimizer's param groups and its DP shard of every parameter it holds (a
    GroupedMLP tensor's built whole from its ``experts`` experts' tensors, then cut)."""
    if len(dopt.optimizer.state) == 0:
        _allocate_state(dopt)   # load_state_dict needs allocated state
    dopt.load_state_dict(groups)
    for main_state in dopt.optimizer.state.values():
        main_state.pop("step", None)  # not a tensor of the file: set per parameter below
    with torch.no_grad():
        for chunk, module in zip(chunk_keys(target.vpp), model_chunks):
            for name, model_param in unwrap(module).named_parameters():
                if model_param not in dopt.model_param_gbuf_map:
                    continue  # no element of it in this DP rank's shard
                piece = dopt._get_model_param_range_map(model_param)["param"]
                # Read straight into the optimizer's own fp32 state where it can (no copies).
                own = dopt._get_main_param_and_optimizer_states(model_param)
                direct = all(own[s].dtype == torch.float32 and own[s].is_contiguous() and
                             own[s].numel() == piece.size for s in STATES)
                tensors = {}
                for state in STATES:
                    flat = own[state].view(-1) if direct else torch.empty(piece.size, dtype=torch.float32)
                    if grouped_experts.is_grouped(name):
                        blocks = [build_tensor(plans[state][(chunk, m)]) for m in grouped_experts.members(name, experts)]
                        flat.copy_(grouped_experts.group(name, blocks).reshape(-1)[piece.start:piece.end])
                    else:
                        tensor, at = plans[state][(chunk, name)], 0
                        for box in element_range_boxes(tensor.placement.view_shape, piece.start, piece.end):
                            part = restrict(tensor, *box)
                            build_tensor(part, exact=True, out=flat[at:at + part.placement.box.numel])
                            at += part.placement.box.numel
                    tensors[state] = flat
                if not direct:
                    dopt._set_main_param_and_optimizer_states(model_param, tensors)
        # One step tensor per parameter: load_state_dict leaves one shared tensor, which AdamW
        # would advance once per parameter.
        for main_state in dopt.optimizer.state.values():
            main_state["step"] = torch.tensor(float(step))
