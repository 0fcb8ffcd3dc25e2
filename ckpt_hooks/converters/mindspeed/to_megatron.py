"""MindSpeed-Core-MS (MindSpore) checkpoint -> Megatron legacy checkpoint, at any layout.

    pt_meta of rank (tp, pp)         -> the Megatron rank file it stands for: chunks, keys, shapes, dtypes
    (rank, chunk, key) of a state    -> MindSpore array STATE_PREFIXES[state] + ms_name(key), global layer
    each array                       =  a piece of the key's logical tensor, placed as in that rank file

Each state is thus a Source like a Megatron checkpoint's, planned and written as any: the
weights (the fp32 params, cast back to the model's dtype) and, with the optimizer, the fp32
params and Adam moments packed into ``distrib_optim.pt`` by the param_map.
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
from ckpt_hooks.algebra.layout import Placement
from ckpt_hooks.algebra.spec import Rank, model_spec_from_args, updated_args
from ckpt_hooks.algebra.target import Target
from ckpt_hooks.converters.mindspeed import files
from ckpt_hooks.engine.ranks import Ranks
from ckpt_hooks.engine.source import STATES, Source
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.formats.atomic import refuse_non_empty
from ckpt_hooks.formats.mindspore_ckpt import BF16, MappedFile, copy_into
from ckpt_hooks.formats.torch_pickle import contiguous_strides
from ckpt_hooks.megatron.checkpoint import (SourceFile, pending_file, place, plan_files, source_tensors,
                                            write_checkpoint)
from ckpt_hooks.megatron.optimizer import target_state
from ckpt_hooks.mindspore import manifest as ms_manifest
from ckpt_hooks.mindspore.files import latest_checkpoint, open_checkpoint


@dataclass(frozen=True)
class ArrayView:
    """A MindSpore file's array seen in ``shape`` (a Megatron tensor's view): the piece handle
    that reads slices of it into torch outputs, cast to their dtype."""

    file: MappedFile
    name: str
    shape: tuple[int, ...]

    def read_into(self, slices: tuple[slice, ...], out: torch.Tensor, exact: bool = False) -> None:
        """The elements ``slices`` into ``out``; only they are copied off the map, ``exact`` or not."""
        # Only the rows the slices span: a tensor split over several 512 MiB records is copied
        # (not mapped) when read, so reading it whole for every copy would cost its size each time.
        strides = contiguous_strides(self.shape)
        lengths = [s.stop - s.start for s in slices]
        first = sum(s.start * st for s, st in zip(slices, strides))
        last = first + sum((n - 1) * st for n, st in zip(lengths, strides)) + 1
        stored = self.file.tensors[self.name].shape
        row = math.prod(stored[1:])
        start = first // row if stored else 0
        array = self.file.read(self.name, slice(start, -(-last // row)) if stored else None)
        flat = array.reshape(-1)[first - start * row:]
        copy_into(out, np.lib.stride_tricks.as_strided(flat, lengths, [st * flat.itemsize for st in strides],
                                                       writeable=False))


class MindSpeedSource:
    """A MindSpeed-Core-MS checkpoint read as the Megatron layout its ``pt_meta`` describes: for
    each state it holds ("param": the fp32 main params, which are the weights too, and with the
    optimizer the Adam moments) a Source of the MindSpore arrays (``sources[state]``). A Megatron
    layer is read from MindSpore layer ``files.ms_layer(layer, noop)``, in whichever of the
    rank's pipeline files holds it."""

    def __init__(self, ms_path, meta_dir=None, src_format: str | None = None, noop=(), with_optimizer=True):
        iter_dir, _ = legacy.find_iteration_dir(ms_path)
        self.release = iter_dir.name == "release"
        meta_dir = Path(meta_dir) if meta_dir else iter_dir.parent / files.META_DIR
        self.meta, _, self.grad_dtypes = files.read_meta(meta_dir, Rank())
        try:
            self.spec = model_spec_from_args(self.meta.obj["args"])
        except AttributeError as e:
            raise CheckpointError(self.meta.path, f"saved args lack a model setting ({e})") from None
        self.layout = legacy.layout_of_args(self.meta.obj["args"], self.meta.path)
        self.noop, states = tuple(noop), STATES if with_optimizer else ("param",)
        self.chunk_keys = legacy.chunk_keys(self.layout.vpp)
        self.by_name: dict[int, dict[str, MappedFile]] = {}   # tp rank -> MindSpore name -> its file
        self.metas, rank_files, opened = {}, [], {}
        for rank in self.layout.file_ranks():
            self.metas[rank], chunks, _ = files.read_meta(meta_dir, rank)
            mapped = opened[rank] = open_checkpoint(
                latest_checkpoint(files.rank_dir(iter_dir, rank), src_format and f".{src_format}"))
            ms_manifest.read_checked(mapped)   # every tensor is read whole anyway
            self.by_name.setdefault(rank.tp, {}).update(dict.fromkeys(mapped.names, mapped))
            rank_files.append(SourceFile(mapped.path, rank, chunks))
        for f in rank_files:
            self._check(f, states)
        placed = place(self.spec, self.layout, rank_files)
        self.sources: dict[str, Source] = {
            state: source_tensors(rank_files, placed, lambda f, chunk, key, where, state=state:
                              self._handle(state, f, chunk, key, where)) for state in states}
        # MindSpore's own count, as MindSpeed-Core-MS reads it: it moves on if training went on there.
        first = opened[Rank()]
        self.iteration = int(first.read("step_num")) if "step_num" in first.tensors \
            else self.meta.obj.get("iteration") or 0

    def _name(self, state: str, f: SourceFile, chunk: str, key: str) -> str:
        layers = layout.chunk_layers(self.spec, self.layout, f.rank.pp, self.chunk_keys.index(chunk))
        return files.STATE_PREFIXES[state] + files.ms_name(key, layers, self.noop)

    def _handle(self, state: str, f: SourceFile, chunk: str, key: str, where: Placement) -> ArrayView:
        name = self._name(state, f, chunk, key)
        return ArrayView(self.by_name[f.rank.tp][name], name, where.view_shape)

    def _check(self, f: SourceFile, states) -> None:
        """Every tensor the rank's Megatron chunks hold is in the MindSpore files, shaped alike."""
        for chunk, keys in f.chunks.items():
            for key, meta in keys.items():
                for state in states if meta is not None else ():
                    name = self._name(state, f, chunk, key)
                    mapped = self.by_name[f.rank.tp].get(name)
                    if mapped is None:
                        raise CheckpointError(f.path, f"no '{name}', which the model holds (see pt_meta)")
                    t = mapped.tensors[name]
                    if t.shape != tuple(meta.shape):
                        raise CheckpointError(mapped.path, f"'{name}' has shape {list(t.shape)}; the model "
                                                           f"(pt_meta) needs {list(meta.shape)}")
                    if t.dtype != BF16 and not np.issubdtype(t.dtype, np.floating):
                        raise CheckpointError(mapped.path, f"'{name}' has dtype {t.dtype}, not a float")

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

    def rng_state(self, rank: Rank):
        """The rank's RNG state, where pt_meta kept one and no training happened since."""
        meta = self.metas[rank]
        state = meta.obj.get("rng_state")
        return meta.materialize(state) if state is not None and self.iteration == self.meta.obj.get("iteration") \
            else None


def mindspore_to_megatron(ms_path, megatron_path, target: Target = Target(), *, param_map_path=None,
                          num_layers: int | None = None, noop=(), src_format: str | None = None,
                          convert_param_only: bool = False, workers: int = 2,
                          quiet: bool = False) -> files.MindSpeedReport:
    """Write the MindSpeed-Core-MS checkpoint ``ms_path`` (its root, or an ``iter_*`` directory),
    described by ``param_map_path`` (default ``<root>/pt_meta``), as a Megatron legacy checkpoint
    in ``megatron_path`` (atomically) at ``target``'s layout (default: pt_meta's).
    ``noop``: MindSpore layer ids that are not Megatron layers (dropped; the others renumbered)."""
    refuse_non_empty(megatron_path)
    started = time.perf_counter()
    src = MindSpeedSource(ms_path, param_map_path, src_format, noop, not convert_param_only)
    spec, source = src.spec, src.layout
    files.check_num_layers(num_layers, spec, src.meta.path, noop)
    target = target.layout(source, spec)
    where = src.meta.path
    weights = plan_files(src.sources["param"], spec, target, where=where)
    state_plans = {} if convert_param_only else \
        {s: {t.rank: t for t in plan_files(src.sources[s], spec, target, dtype=torch.float32, where=where)}
         for s in STATES}
    args = updated_args(src.meta.obj["args"], spec, target)
    carried = src.carried(not convert_param_only)
    same_layout = (source.tp, source.pp, source.vpp) == (target.tp, target.pp, target.vpp)
    md5 = {}

    def rank_state(target_file, progress) -> dict:
        rng = src.rng_state(target_file.rank) if same_layout else None
        return {"args": args, **carried, **pending_file(target_file, progress),
                **({"rng_state": rng} if rng is not None else {})}

    def optimizer_state(target_file, progress) -> dict:
        return target_state(target_file, {s: state_plans[s][target_file.rank] for s in STATES}, src.grad_dtypes,
                            spec, target, args, progress)

    def written(root, paths) -> None:
        md5.update((str(p.relative_to(root)), files.tensor_md5(p)) for p in paths)

    total = sum(f.nbytes for f in weights) + sum(f.nbytes for plans in state_plans.values() for f in plans.values())
    data_seconds = write_checkpoint(megatron_path, None if src.release else src.iteration, weights, target,
                                    rank_state, optimizer_state if state_plans else None, total, workers=workers,
                                    quiet=quiet, label=f"MindSpore {source.describe()} -> {target.describe()}",
                                    written=written)
    for part in Ranks.from_env().gather(md5):   # under torchrun, every rank's files, for the report
        md5.update(part)
    return files.MindSpeedReport(source.describe(), target.describe(), len(md5), total, time.perf_counter() - started,
                                 data_seconds, md5=dict(sorted(md5.items())))
