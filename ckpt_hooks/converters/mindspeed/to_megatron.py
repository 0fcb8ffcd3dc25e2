"""MindSpeed-Core-MS (MindSpore) checkpoint -> Megatron legacy checkpoint, at any layout.

``pt_meta`` says which Megatron model chunks (keys, shapes, dtypes) each MindSpore rank file
stands for; the planner reads the files as that Megatron layout, by name, and reshards them to
the target as any Megatron source: weights cast back to the model's dtype and, with the
optimizer, the fp32 params and Adam moments packed into ``distrib_optim.pt`` by the param_map.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckpt_hooks.algebra import layout
from ckpt_hooks.megatron.conversion import target_config, write_manifest
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.engine.execute import pending_file
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.formats.mindspore_ckpt import BF16, MappedFile
from ckpt_hooks.converters.mindspeed import files
from ckpt_hooks.mindspore.files import latest_checkpoint, open_checkpoint
from ckpt_hooks.engine.optimizer import STATES, target_state
from ckpt_hooks.formats.atomic import refuse_non_empty, staged_directory
from ckpt_hooks.engine.run import run
from ckpt_hooks.engine.plan import SourceFile, TargetFile, TensorMeta, plan_conversion
from ckpt_hooks.algebra.spec import model_spec_from_args, parallel_config_from_args, updated_args


@dataclass(frozen=True)
class Stored:
    """A tensor of a MindSpore file, as the executor's lazy source tensor."""

    file: MappedFile
    name: str

    def is_contiguous(self) -> bool:
        return True


class _Reader:
    """The executor's source file for Stored tensors: element runs, cast to the target's dtype."""

    @staticmethod
    def read_runs(stored: Stored, starts, run_numel: int, out: torch.Tensor) -> None:
        # Only the rows the runs span: a tensor split over several 512 MiB records is copied
        # (not mapped) when read, so reading it whole for every copy would cost its size each time.
        shape = stored.file.tensors[stored.name].shape
        row = math.prod(shape[1:])
        first = min(starts) // row if shape else 0
        rows = slice(first, -(-(max(starts) + run_numel) // row)) if shape else None
        flat, target = stored.file.read(stored.name, rows).reshape(-1), out.view(-1)
        for i, start in enumerate(starts):
            run = flat[start - first * row:start - first * row + run_numel].copy()  # off the read-only map, for torch
            source = torch.from_numpy(run.view(np.int16)).view(torch.bfloat16) if run.dtype == BF16 \
                else torch.from_numpy(run)
            target[i * run_numel:(i + 1) * run_numel].copy_(source)


class MindSporeSource:
    """A MindSpeed-Core-MS checkpoint read as the Megatron layout its ``pt_meta`` describes:
    ``files`` (one SourceFile per rank) for the planner, ``lookup(state)`` for the executor.
    A Megatron layer is read from MindSpore layer ``files.ms_layer(layer, noop)``, in whichever
    of the rank's pipeline files holds it."""

    def __init__(self, ms_path, meta_dir=None, src_format: str | None = None, noop=(), with_optimizer=True):
        iter_dir, _ = legacy.find_iteration_dir(ms_path)
        self.release = iter_dir.name == "release"
        meta_dir = Path(meta_dir) if meta_dir else iter_dir.parent / files.META_DIR
        self.meta, _, self.grad_dtypes = files.read_meta(meta_dir, 0, 0)
        try:
            self.spec = model_spec_from_args(self.meta.obj["args"])
            self.layout = parallel_config_from_args(self.meta.obj["args"])
        except AttributeError as e:
            raise CheckpointError(self.meta.path, f"saved args lack a model setting ({e})") from None
        if with_optimizer and not self.grad_dtypes:
            raise CheckpointError(self.meta.path, "no optimizer layout (converted with --convert-param-only?)")
        self.noop, self.states = tuple(noop), STATES if with_optimizer else ("param",)
        self.chunk_keys = legacy.chunk_keys(self.layout.vpp)
        self.by_name: dict[int, dict[str, Stored]] = {}      # tp rank -> MindSpore name -> tensor
        self.files: list[SourceFile] = []
        self.metas, opened = {}, {}
        for pp_rank in range(self.layout.pp):
            for tp_rank in range(self.layout.tp):
                self.metas[(tp_rank, pp_rank)], chunks, _ = files.read_meta(meta_dir, tp_rank, pp_rank)
                mapped = opened[(tp_rank, pp_rank)] = open_checkpoint(
                    latest_checkpoint(files.rank_dir(iter_dir, tp_rank, pp_rank), src_format and f".{src_format}"))
                self.by_name.setdefault(tp_rank, {}).update((n, Stored(mapped, n)) for n in mapped.names)
                self.files.append(SourceFile(mapped.path, tp_rank, pp_rank, chunks))
        for f in self.files:
            self._check(f)
        # MindSpore's own count, as MindSpeed-Core-MS reads it: it moves on if training went on there.
        first = opened[(0, 0)]
        self.iteration = int(first.read("step_num")) if "step_num" in first.tensors \
            else self.meta.obj.get("iteration") or 0

    def _name(self, state: str, f: SourceFile, chunk: str, key: str) -> str:
        layers = layout.chunk_layers(self.spec, self.layout, f.pp_rank, self.chunk_keys.index(chunk))
        return files.STATE_PREFIXES[state] + files.ms_name(key, layers, self.noop)

    def _check(self, f: SourceFile) -> None:
        """Every tensor the rank's Megatron chunks hold is in the MindSpore files, shaped alike."""
        for chunk, keys in f.chunks.items():
            for key, meta in keys.items():
                for state in self.states if meta is not None else ():
                    name = self._name(state, f, chunk, key)
                    stored = self.by_name[f.tp_rank].get(name)
                    if stored is None:
                        raise CheckpointError(f.path, f"no '{name}', which the model holds (see pt_meta)")
                    t = stored.file.tensors[name]
                    if t.shape != tuple(meta.shape):
                        raise CheckpointError(stored.file.path, f"'{name}' has shape {list(t.shape)}; the model "
                                                                f"(pt_meta) needs {list(meta.shape)}")
                    if t.dtype != BF16 and not np.issubdtype(t.dtype, np.floating):
                        raise CheckpointError(stored.file.path, f"'{name}' has dtype {t.dtype}, not a float")

    def lookup(self, state: str = "param"):
        """The executor's SourceLookup for one state ("param": the weights, or the fp32 params)."""
        by_rank = {(f.tp_rank, f.pp_rank): f for f in self.files}

        def find(rank, chunk, key):
            return _Reader, self.by_name[rank[0]][self._name(state, by_rank[rank], chunk, key)]
        return find

    def state_plans(self, target, target_chunks) -> dict[str, dict[tuple[int, int], TargetFile]]:
        """For each optimizer state, the plan that reshards it (fp32) like the weights: one plan,
        as the states lie alike (``lookup(state)`` tells them apart)."""
        fp32 = [SourceFile(f.path, f.tp_rank, f.pp_rank,
                           {c: {k: m and TensorMeta(m.shape, torch.float32) for k, m in keys.items()}
                            for c, keys in f.chunks.items()}) for f in self.files]
        plan = plan_conversion(self.spec, self.layout, fp32, target, self.chunk_keys, target_chunks)
        return dict.fromkeys(STATES, {(t.tp_rank, t.pp_rank): t for t in plan})

    def carried(self, with_optimizer: bool) -> dict:
        """model_optim_rng.pt's other entries, from pt_meta. After training on in MindSpore
        (``step_num`` past pt_meta's iteration) the Adam step and the scheduler's step count
        follow it, as MindSpeed-Core-MS's converter does."""
        meta = self.meta.obj
        carried = {k: copy.deepcopy(meta.get(k)) for k in files.META_ENTRIES[1:] if meta.get(k) is not None}
        carried.pop("rng_state", None)
        if not with_optimizer:
            carried.pop("optimizer", None)
        if self.iteration != meta.get("iteration"):
            for group in carried.get("optimizer", {}).get("optimizer", {}).get("param_groups", []):
                group["step"] = type(group.get("step", 0.0))(self.iteration)
            if "opt_param_scheduler" in carried:
                carried["opt_param_scheduler"]["num_steps"] = self.iteration * meta["args"].global_batch_size
        return {**carried, "iteration": self.iteration}

    def rng_state(self, rank: tuple[int, int]):
        """The rank's RNG state, where pt_meta kept one and no training happened since."""
        meta = self.metas[rank]
        state = meta.obj.get("rng_state")
        return meta.materialize(state) if state is not None and self.iteration == self.meta.obj.get("iteration") \
            else None


def mindspore_to_megatron(ms_path, megatron_path, *, param_map_path=None, tp: int | None = None,
                          pp: int | None = None, vpp: int | None = None, dp: int | None = None, stage_list=None,
                          num_layers: int | None = None, noop=(), src_format: str | None = None,
                          convert_param_only: bool = False, workers: int = 2,
                          quiet: bool = False) -> files.MindSpeedReport:
    """Write the MindSpeed-Core-MS checkpoint ``ms_path`` (its root, or an ``iter_*`` directory),
    described by ``param_map_path`` (default ``<root>/pt_meta``), as a Megatron legacy checkpoint
    in ``megatron_path`` (atomically) at TP ``tp``·PP ``pp``·VPP ``vpp`` (default: pt_meta's).
    ``noop``: MindSpore layer ids that are not Megatron layers (dropped; the others renumbered)."""
    refuse_non_empty(megatron_path)
    started = time.perf_counter()
    src = MindSporeSource(ms_path, param_map_path, src_format, noop, not convert_param_only)
    spec, source = src.spec, src.layout
    files.check_num_layers(num_layers, spec, src.meta.path, noop)
    target = target_config(source, tp, pp, vpp, stage_list, dp)
    try:
        layout.check_divisible(spec, target)
    except layout.LayoutError as e:
        raise CheckpointError(src.meta.path, f"target {target.describe()}: {e}") from None
    target_chunks = legacy.chunk_keys(target.vpp)
    plan = plan_conversion(spec, source, src.files, target, src.chunk_keys, target_chunks)
    state_plans = {} if convert_param_only else src.state_plans(target, target_chunks)
    args = updated_args(src.meta.obj["args"], spec, target)
    carried = src.carried(not convert_param_only)
    same_layout = (source.tp, source.pp, source.vpp) == (target.tp, target.pp, target.vpp)
    iteration = None if src.release else src.iteration
    md5 = {}

    with staged_directory(megatron_path) as root:
        def write(target_file: TargetFile, progress) -> None:
            rank = target_file.tp_rank, target_file.pp_rank
            rng = src.rng_state(rank) if same_layout else None
            state = {"args": args, **carried, **pending_file(src.lookup(), target_file, progress),
                     **({"rng_state": rng} if rng is not None else {})}
            written = [legacy.save_rank_file(root, iteration, *rank, target.pp, state)]
            if state_plans:
                optim_state = target_state(target_file, {s: state_plans[s][rank] for s in STATES}, src, spec,
                                           target, args, progress)
                written.append(legacy.save_rank_file(root, iteration, *rank, target.pp, optim_state,
                                                     legacy.OPTIMIZER_FILE))
            md5.update((str(p.relative_to(root)), files.tensor_md5(p)) for p in written)

        total = sum(f.nbytes for f in plan) + sum(f.nbytes for plans in state_plans.values() for f in plans.values())
        run(plan, write, total, workers=workers, quiet=quiet, label=f"MindSpore {source.describe()} -> "
                                                                     f"{target.describe()}")
        legacy.write_tracker(root, iteration)
        write_manifest(root)
    return files.MindSpeedReport(source.describe(), target.describe(), len(md5), total, time.perf_counter() - started,
                           dict(sorted(md5.items())))
