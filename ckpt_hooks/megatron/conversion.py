"""Offline conversion of a Megatron legacy checkpoint (weights and optimizer state) to another layout:
the Megatron Source (``checkpoint.read_source``), planned onto the target layout's rank files,
written by the Megatron writer sequence (``checkpoint.write_checkpoint``)."""

from __future__ import annotations

import dataclasses
import json
import time

from ckpt_hooks.algebra.spec import ModelSpec, ParallelConfig, Rank, updated_args
from ckpt_hooks.algebra.target import Target
from ckpt_hooks.engine.plan import TargetFile
from ckpt_hooks.engine.run import Report
from ckpt_hooks.engine.source import STATES
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.formats.atomic import refuse_non_empty
from ckpt_hooks.megatron import legacy_names
from ckpt_hooks.megatron.checkpoint import MegatronSource, pending_file, plan_files, read_source, write_checkpoint
from ckpt_hooks.megatron.optimizer import (SourceOptimizer, chained_param_groups, held_state, source_optimizer,
                                           target_state)
from ckpt_hooks.megatron.torch_dist import distcp_name

# Entries of model_optim_rng.pt that do not depend on the layout and are carried over.
_CARRIED = ("checkpoint_version", "iteration", "opt_param_scheduler", "num_floating_point_operations_so_far")


@dataclasses.dataclass
class Planned:
    """A Megatron checkpoint and the copies that build a target layout from it: the weights'
    plan and, unless converting the weights only, each optimizer state's {rank: file}."""

    src: MegatronSource
    target: ParallelConfig
    spec: ModelSpec                 # the model as the target stores it (grouped experts or not)
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
            # param groups and step: the same on every rank
            carried["optimizer"] = chained_param_groups(self.optimizer.param_groups, self.target)
        return carried


def plan_megatron(load_dir, target: Target = Target(), *, convert_param_only: bool = False) -> Planned:
    """Read a Megatron legacy checkpoint and plan its conversion to ``target`` (sizes not given
    are kept as ``Target.layout`` says)."""
    src = read_source(load_dir, target.true_vocab_size,
                      make_vocab_size_divisible_by=target.make_vocab_size_divisible_by)
    layout = target.layout(src.layout, src.spec, src.notes)
    weights = plan_files(src.weights, src.spec, layout, where=src.ckpt.first.path)
    optim = None if convert_param_only else source_optimizer(src)
    if optim is not None:
        optim.check_against_weights(src)
    optim_plans = {} if optim is None else {state: {rank: held_state(f, layout) for rank, f in files.items()}
                                            for state, files in optim.plans(src.spec, layout).items()}
    return Planned(src, layout, target.model(src.spec), weights, optim, optim_plans)


def dry_run(p: Planned, workers: int, ckpt_format: str | None = None) -> str:
    """What ``convert`` would do, from the plan alone (no tensor data read): bytes per target
    file, bytes read per source file, the largest tensor in flight and an estimate of the peak
    memory (each worker builds a tensor while the previous one is written; an optimizer buffer
    is built whole)."""
    iter_name = legacy.iteration_dir_name(p.src.ckpt.iteration)
    dist = (ckpt_format or p.src.ckpt_format) == "torch_dist"
    states = [(legacy.MODEL_FILE, "weights", p.weights)] + \
        [(f"{legacy.OPTIMIZER_FILE} ({state})", f"optimizer {state}", list(files.values()))
         for state, files in p.optimizer_plans.items()]
    reads: dict[str, int] = {}
    largest = 0
    lines = [f"plan {p.src.layout.describe()} -> {p.target.describe()} (dry run: nothing read or written)"]
    for what, label, files in states:
        for f in files:
            if dist:   # one .distcp file per model-parallel rank holds weights and optimizer state
                name = f"{iter_name}/{distcp_name(f.rank, p.target)} ({label})"
            else:
                name = f"{iter_name}/{legacy.rank_dir_name(f.rank, p.target)}/{what}"
            lines.append(f"  {name}  {f.nbytes / 1e6:.1f} MB")
            # an optimizer state's buffer is built whole
            largest = max(largest, *(t.nbytes for t in f.tensors), f.nbytes if what != legacy.MODEL_FILE else 0)
            for tensor in f.tensors:
                for copy in tensor.copies:
                    path = str(copy.piece.handle.path)
                    reads[path] = reads.get(path, 0) + copy.box.numel * tensor.dtype.itemsize
    lines.append(f"writes {p.nbytes / 1e6:.1f} MB; reads:")
    lines += [f"  {path}  {n / 1e6:.1f} MB" for path, n in sorted(reads.items())]
    lines.append(f"largest tensor in flight {largest / 1e6:.1f} MB; peak memory about "
                 f"{workers * 2 * largest / 1e6:.1f} MB above the interpreter ({workers} workers)")
    return "\n".join(lines)


def resume_hint(save_dir, spec: ModelSpec, layout: ParallelConfig, optimizer: bool, ckpt_format: str = "torch") -> str:
    """How to go on training from a converted checkpoint with Megatron-LM."""
    flags = (f"--load {save_dir} --ckpt-format {ckpt_format} --tensor-model-parallel-size {layout.tp} "
             f"--pipeline-model-parallel-size {layout.pp}")
    if layout.vpp > 1:
        flags += f" --num-layers-per-virtual-pipeline-stage {spec.num_layers // (layout.pp * layout.vpp)}"
    if spec.num_experts:
        flags += f" --expert-model-parallel-size {layout.ep} --expert-tensor-parallel-size {layout.size('etp')}"
    return (f"resume with Megatron-LM: {flags} --no-load-rng (RNG states are per rank)"
            + ("" if optimizer else " --finetune --no-load-optim (weights only)"))


FORMATS = ("torch", "torch_dist")


def convert(load_dir, save_dir, target: Target = Target(), *, convert_param_only: bool = False, workers: int = 2,
            quiet: bool = False, ckpt_format: str | None = None, resume: bool = False) -> Report:
    """Reshard a Megatron checkpoint (legacy ``torch`` or ``torch_dist``) — weights, and unless
    ``convert_param_only`` the distributed optimizer's fp32 params and Adam moments — to
    ``target`` and write it to ``save_dir`` atomically, in ``ckpt_format`` (default: the source's).
    ``resume``: finish what an interrupted (killed) run of the same conversion left staged,
    keeping its complete rank files, checked by their CRC-32s."""
    if ckpt_format not in (None, *FORMATS):
        raise ValueError(f"unknown checkpoint format {ckpt_format!r} (one of {', '.join(FORMATS)})")
    refuse_non_empty(save_dir, sources=[load_dir])
    started = time.perf_counter()
    p = plan_megatron(load_dir, target, convert_param_only=convert_param_only)
    src, layout, optim = p.src, p.target, p.optimizer
    ckpt_format = ckpt_format or src.ckpt_format
    args = updated_args(src.ckpt.args, p.spec, layout)
    args.ckpt_format = ckpt_format
    carried = p.carried()
    label = f"{src.layout.describe()} -> {layout.describe()}"
    before = src.files_state()   # checked again before anything is published
    # What --resume must find staged: this conversion's files, not another's.
    identity = json.dumps([before, layout.describe(), ckpt_format, convert_param_only, dataclasses.asdict(p.spec)],
                          default=str)

    def unchanged(root) -> None:
        src.check_unchanged(before)
    reused: list = []
    if ckpt_format == "torch_dist":   # one .distcp file per rank
        data_seconds, files = _write_dist(p, save_dir, args, carried, workers, quiet, label, unchanged, resume,
                                          identity, reused), len(p.weights)
    else:
        data_seconds = _write_legacy(p, save_dir, args, carried, workers, quiet, label, unchanged, resume, identity,
                                     reused)
        files = len(p.weights) * (1 if optim is None else 2)
    if resume:
        src.notes.append(f"resumed: {len(reused)} of {len(p.weights)} ranks' files reused from the interrupted run")
    return Report(src.layout.describe(), layout.describe(), files, p.nbytes, time.perf_counter() - started,
                  data_seconds, [*src.notes, resume_hint(save_dir, src.spec, layout, optim is not None, ckpt_format)])


def _write_legacy(p: Planned, save_dir, args, carried: dict, workers: int, quiet: bool, label: str,
                  finish, resume: bool, identity: str, reused: list) -> float:
    """The plan written as Megatron-LM's legacy rank files (``model_optim_rng.pt``, and
    ``distrib_optim.pt`` with the optimizer), each model in the source's own form."""
    src, layout, optim = p.src, p.target, p.optimizer
    form = legacy_names.source_form(src.ckpt.first.obj)   # a legacy model is written as one

    def rank_state(target_file: TargetFile, progress) -> dict:
        model = legacy_names.nest_like(form, pending_file(target_file, progress, p.spec.moe_grouped_gemm),
                                       src.spec.tied_embeddings)
        return {"args": args, **carried, **model}

    def optimizer_state(target_file: TargetFile, progress) -> dict:
        plans = {s: p.optimizer_plans[s][target_file.rank] for s in STATES}
        return target_state(target_file, plans, optim.grad_dtypes, p.spec, layout, args, progress)

    return write_checkpoint(save_dir, src.ckpt.iteration, p.weights, layout, rank_state,
                            optimizer_state if optim is not None else None, p.nbytes, workers=workers, quiet=quiet,
                            label=label, resume=resume, identity=identity, reused=reused, finish=finish)


def _write_dist(p: Planned, save_dir, args, carried: dict, workers: int, quiet: bool, label: str,
                finish, resume: bool, identity: str, reused: list) -> float:
    """The plan written as a torch_dist checkpoint. RNG states are per rank: carried rank by rank
    at an unchanged TP·PP without expert parallelism (with it Megatron-LM keeps one per DP rank)
    where the source saved them, else none are written and the args say
    ``no_save_rng`` (so Megatron-LM does not look for them)."""
    from ckpt_hooks.megatron.checkpoint import rank_rng
    from ckpt_hooks.megatron.torch_dist_writer import write_dist_checkpoint

    src, layout = p.src, p.target
    rngs = {}
    if (src.layout.tp, src.layout.pp, src.layout.ep, layout.ep) == (layout.tp, layout.pp, 1, 1):
        rngs = {rank: rank_rng(src, rank) for rank in layout.file_ranks()}
    if not rngs or any(r is None for r in rngs.values()):
        rngs, args.no_save_rng = {}, True
    common = {k: v for k, v in carried.items() if k != "optimizer"}
    if p.optimizer is not None:
        common["optimizer_param_groups"] = carried.get("optimizer")
    return write_dist_checkpoint(save_dir, src.ckpt.iteration, p.weights,
                                 p.optimizer_plans if p.optimizer is not None else None, p.spec, layout, args,
                                 common, rngs.get, p.optimizer.grad_dtypes if p.optimizer is not None else None,
                                 total=p.nbytes, workers=workers, quiet=quiet, label=label, finish=finish,
                                 resume=resume, identity=identity, reused=reused)
