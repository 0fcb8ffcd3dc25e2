"""Offline conversion of a Megatron legacy checkpoint (weights and optimizer state) to another layout."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from ckpt_hooks.algebra import layout
from ckpt_hooks.engine import manifest
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.engine.execute import pending_file
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.megatron import legacy_names
from ckpt_hooks.megatron.checkpoint import open_checkpoint
from ckpt_hooks.formats.torch_pickle import LazyTensor, iter_lazy_tensors
from ckpt_hooks.engine.run import Report, run
from ckpt_hooks.formats.atomic import refuse_non_empty, staged_directory
from ckpt_hooks.engine.optimizer import STATES, SourceOptimizer, target_state
from ckpt_hooks.engine.plan import SourceFile, TargetFile, TensorMeta, plan_conversion
from ckpt_hooks.algebra.spec import (ModelSpec, ParallelConfig, even_or_none, model_spec_from_args, parallel_config_from_args, updated_args)

# Entries of model_optim_rng.pt that do not depend on the layout and are carried over.
_CARRIED = ("checkpoint_version", "iteration", "opt_param_scheduler", "num_floating_point_operations_so_far")


def read_source(load_dir, true_vocab_size: int | None = None, check_manifest: bool = True):
    """Open a checkpoint and describe it: (checkpoint, spec, layout, per-file tensor metadata).
    Where a manifest lies beside the files, they are checked against it first."""
    ckpt = open_checkpoint(load_dir)
    args = ckpt.args
    try:
        spec = model_spec_from_args(args)
        source = parallel_config_from_args(args)
    except AttributeError as e:
        raise CheckpointError(ckpt.first.path, f"saved args lack a model setting ({e})") from None
    files = _source_files(ckpt, source)
    saved_manifest = manifest.read(ckpt.iter_dir) if check_manifest else None
    if saved_manifest is not None:
        manifest.check(saved_manifest, ckpt.iter_dir, spec, source, files)
    if true_vocab_size is not None:
        spec = replace(spec, true_vocab_size=true_vocab_size)
    if spec.true_vocab_size is not None and spec.padded_vocab_for(source.tp) != spec.padded_vocab_size:
        raise CheckpointError(ckpt.first.path, f"padded vocabulary {spec.padded_vocab_size} does not follow from "
                                               f"vocabulary {spec.true_vocab_size} at TP{source.tp}; "
                                               "pass --true-vocab-size")
    try:
        layout.check_divisible(spec, source)
    except layout.LayoutError as e:
        raise CheckpointError(ckpt.first.path, f"saved args: {e}") from None
    return ckpt, spec, source, files


def _source_files(ckpt, source: ParallelConfig) -> list[SourceFile]:
    files = []
    for (tp_rank, pp_rank), torch_file in ckpt.files.items():
        chunks = {}
        for chunk in legacy.chunk_keys(source.vpp):
            state = torch_file.obj.get(chunk)
            if not isinstance(state, dict):
                raise CheckpointError(torch_file.path, f"no model chunk '{chunk}' (args say VPP{source.vpp})")
            chunks[chunk] = {key: TensorMeta(v.shape, v.dtype) if isinstance(v, LazyTensor) else None
                             for key, v in state.items()}
            torch_file.check_complete(t for _, t in iter_lazy_tensors(state))
        files.append(SourceFile(torch_file.path, tp_rank, pp_rank, chunks))
    return files


def write_manifest(load_dir) -> Path:
    """Describe a complete checkpoint iteration in its manifest (see ckpt_hooks.engine.manifest)."""
    ckpt, spec, source, files = read_source(load_dir, check_manifest=False)
    built = manifest.build(ckpt.iter_dir, ckpt.iteration, spec, source, files, legacy.chunk_keys(source.vpp))
    return manifest.write(ckpt.iter_dir, built)


def target_config(source: ParallelConfig, tp=None, pp=None, vpp=None, num_layer_list=None, dp=None) -> ParallelConfig:
    """The target layout: given sizes, the rest kept from the source where they still apply
    (by default DP fills the source's world size)."""
    new_pp = pp or source.pp
    new_vpp = vpp or (source.vpp if new_pp == source.pp else 1)
    new_tp = tp or source.tp
    stages = even_or_none(num_layer_list) if num_layer_list else \
        (source.layers_per_stage if new_pp == source.pp else None)
    world = source.tp * source.pp * source.dp
    return ParallelConfig(tp=new_tp, pp=new_pp, vpp=new_vpp, dp=dp or max(world // (new_tp * new_pp), 1),
                          layers_per_stage=stages)


@dataclass
class Planned:
    """A Megatron checkpoint and the copies that build a target layout from it: the weights'
    plan and, unless converting the weights only, each optimizer state's {(tp, pp): file}."""

    ckpt: legacy.LegacyCheckpoint
    spec: ModelSpec
    source: ParallelConfig
    target: ParallelConfig
    files: list[SourceFile]
    weights: list[TargetFile]
    optimizer: SourceOptimizer | None
    optimizer_plans: dict[str, dict[tuple[int, int], TargetFile]]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.weights) + \
            sum(f.nbytes for plans in self.optimizer_plans.values() for f in plans.values())

    def carried(self) -> dict:
        """The entries of model_optim_rng.pt that do not depend on the layout."""
        carried = {k: self.ckpt.first.obj[k] for k in _CARRIED if k in self.ckpt.first.obj}
        if self.optimizer is not None and self.optimizer.param_groups is not None:
            carried["optimizer"] = self.optimizer.param_groups  # param groups and step: the same on every rank
        return carried


def plan_megatron(load_dir, *, target_tp: int | None = None, target_pp: int | None = None,
                  target_vpp: int | None = None, target_dp: int | None = None, num_layer_list=None,
                  convert_param_only: bool = False, true_vocab_size: int | None = None) -> Planned:
    """Read a Megatron legacy checkpoint and plan its conversion to the target layout (sizes
    not given are kept as ``target_config`` says)."""
    ckpt, spec, source, files = read_source(load_dir, true_vocab_size)
    target = target_config(source, target_tp, target_pp, target_vpp, num_layer_list, target_dp)
    try:
        layout.check_divisible(spec, target)
    except layout.LayoutError as e:
        raise CheckpointError(ckpt.first.path, f"target {target.describe()}: {e}") from None
    chunk_keys = legacy.chunk_keys(source.vpp), legacy.chunk_keys(target.vpp)
    weights = plan_conversion(spec, source, files, target, *chunk_keys)
    optim = None if convert_param_only else SourceOptimizer(ckpt, spec, source, files)
    optim_plans = {} if optim is None else \
        {state: {(t.tp_rank, t.pp_rank): t for t in targets}
         for state, targets in optim.plans(spec, source, files, target, chunk_keys).items()}
    return Planned(ckpt, spec, source, target, files, weights, optim, optim_plans)


def convert(load_dir, save_dir, *, target_tp: int | None = None, target_pp: int | None = None,
            target_vpp: int | None = None, target_dp: int | None = None, num_layer_list=None,
            convert_param_only: bool = False, true_vocab_size: int | None = None, workers: int = 2,
            quiet: bool = False) -> Report:
    """Reshard a Megatron legacy checkpoint — weights, and unless ``convert_param_only`` the
    distributed optimizer's fp32 params and Adam moments — and write it to ``save_dir`` atomically."""
    refuse_non_empty(save_dir)
    started = time.perf_counter()
    p = plan_megatron(load_dir, target_tp=target_tp, target_pp=target_pp, target_vpp=target_vpp, target_dp=target_dp,
                      num_layer_list=num_layer_list, convert_param_only=convert_param_only,
                      true_vocab_size=true_vocab_size)
    ckpt, spec, target, optim = p.ckpt, p.spec, p.target, p.optimizer
    args = updated_args(ckpt.args, spec, target)
    carried = p.carried()
    form = legacy_names.source_form(ckpt.first.obj)   # a legacy model is written as one

    with staged_directory(save_dir) as root:
        def write(target_file: TargetFile, progress) -> None:
            rank = target_file.tp_rank, target_file.pp_rank
            model = legacy_names.nest_like(form, pending_file(ckpt.lookup, target_file, progress),
                                           spec.tied_embeddings)
            state = {"args": args, **carried, **model}
            legacy.save_rank_file(root, ckpt.iteration, *rank, target.pp, state)
            if optim is not None:
                optim_state = target_state(target_file, {s: p.optimizer_plans[s][rank] for s in STATES}, optim,
                                           spec, target, args, progress)
                legacy.save_rank_file(root, ckpt.iteration, *rank, target.pp, optim_state, legacy.OPTIMIZER_FILE)

        run(p.weights, write, p.nbytes, workers=workers, quiet=quiet,
            label=f"{p.source.describe()} -> {target.describe()}")
        legacy.write_tracker(root, ckpt.iteration)
        write_manifest(root)
    return Report(p.source.describe(), target.describe(), len(p.weights) * (1 if optim is None else 2), p.nbytes,
                  time.perf_counter() - started)
