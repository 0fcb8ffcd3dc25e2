"""Offline conversion of a Megatron legacy checkpoint (weights and optimizer state) to another layout:
the Megatron Source (``checkpoint.read_source``), planned onto the target layout's rank files,
written by the Megatron writer sequence (``checkpoint.write_checkpoint``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ckpt_hooks.algebra import layout
from ckpt_hooks.algebra.spec import ParallelConfig, Rank, updated_args
from ckpt_hooks.engine.plan import TargetFile
from ckpt_hooks.engine.run import Report
from ckpt_hooks.engine.source import STATES
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.atomic import refuse_non_empty
from ckpt_hooks.megatron import legacy_names
from ckpt_hooks.megatron.checkpoint import (MegatronSource, pending_file, plan_files, read_source, target_config,
                                            write_checkpoint)
from ckpt_hooks.megatron.optimizer import SourceOptimizer, target_state

# Entries of model_optim_rng.pt that do not depend on the layout and are carried over.
_CARRIED = ("checkpoint_version", "iteration", "opt_param_scheduler", "num_floating_point_operations_so_far")


@dataclass
class Planned:
    """A Megatron checkpoint and the copies that build a target layout from it: the weights'
    plan and, unless converting the weights only, each optimizer state's {rank: file}."""

    src: MegatronSource
    target: ParallelConfig
    weights: list[TargetFile]
    optimizer: SourceOptimizer | None
    optimizer_plans: dict[str, dict[Rank, TargetFile]]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.weights) + \
            sum(f.nbytes for plans in self.optimizer_plans.values() for f in plans.values())

    def carried(self) -> dict:
        """The entries of model_optim_rng.pt that do not depend on the layout."""
        first = self.src.ckpt.first.obj
        carried = {k: first[k] for k in _CARRIED if k in first}
        if self.optimizer is not None and self.optimizer.param_groups is not None:
            carried["optimizer"] = self.optimizer.param_groups  # param groups and step: the same on every rank
        return carried


def plan_megatron(load_dir, *, target_tp: int | None = None, target_pp: int | None = None,
                  target_vpp: int | None = None, target_dp: int | None = None, num_layer_list=None,
                  convert_param_only: bool = False, true_vocab_size: int | None = None) -> Planned:
    """Read a Megatron legacy checkpoint and plan its conversion to the target layout (sizes
    not given are kept as ``target_config`` says)."""
    src = read_source(load_dir, true_vocab_size)
    target = target_config(src.layout, target_tp, target_pp, target_vpp, num_layer_list, target_dp)
    try:
        layout.check_divisible(src.spec, target)
    except layout.LayoutError as e:
        raise CheckpointError(src.ckpt.first.path, f"target {target.describe()}: {e}") from None
    weights = plan_files(src.weights, src.spec, target, where=src.ckpt.first.path)
    optim = None if convert_param_only else SourceOptimizer(src)
    optim_plans = {} if optim is None else optim.plans(src.spec, target)
    return Planned(src, target, weights, optim, optim_plans)


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
    src, target, optim = p.src, p.target, p.optimizer
    args = updated_args(src.ckpt.args, src.spec, target)
    carried = p.carried()
    form = legacy_names.source_form(src.ckpt.first.obj)   # a legacy model is written as one

    def rank_state(target_file: TargetFile, progress) -> dict:
        model = legacy_names.nest_like(form, pending_file(target_file, progress), src.spec.tied_embeddings)
        return {"args": args, **carried, **model}

    def optimizer_state(target_file: TargetFile, progress) -> dict:
        plans = {s: p.optimizer_plans[s][target_file.rank] for s in STATES}
        return target_state(target_file, plans, optim.grad_dtypes, src.spec, target, args, progress)

    write_checkpoint(save_dir, src.ckpt.iteration, p.weights, target.pp, rank_state,
                     optimizer_state if optim is not None else None, p.nbytes, workers=workers, quiet=quiet,
                     label=f"{src.layout.describe()} -> {target.describe()}")
    return Report(src.layout.describe(), target.describe(), len(p.weights) * (1 if optim is None else 2), p.nbytes,
                  time.perf_counter() - started)
