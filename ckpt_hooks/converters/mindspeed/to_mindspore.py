"""Megatron legacy checkpoint -> MindSpeed-Core-MS (MindSpore) checkpoint, at any layout.

The planner reshards the weights — or, with the optimizer, the fp32 main params and Adam
moments the param_map cuts out of ``distrib_optim.pt`` — to the target layout, as for a
Megatron target; each target rank's tensors are then written, in fp32 under their MindSpore
names, to one MindSpore file, and Megatron's own entries to ``pt_meta``.
"""

from __future__ import annotations

import itertools
import shutil
import time
from dataclasses import replace

from ckpt_hooks.algebra import layout
from ckpt_hooks.algebra.spec import updated_args
from ckpt_hooks.algebra.target import Target
from ckpt_hooks.converters.mindspeed import files
from ckpt_hooks.engine.execute import build_tensor
from ckpt_hooks.engine.plan import TargetFile
from ckpt_hooks.engine.ranks import write_shared
from ckpt_hooks.engine.source import STATES, TensorMeta
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.formats.atomic import refuse_non_empty
from ckpt_hooks.megatron.conversion import Planned, plan_megatron
from ckpt_hooks.megatron.export import write_mindspeed_maps
from ckpt_hooks.megatron.optimizer import rebuild_maps
from ckpt_hooks.mindspore import manifest as ms_manifest
from ckpt_hooks.mindspore.dp_zero import write_checkpoint


def chunk_metas(target_file: TargetFile) -> dict[str, dict[str, TensorMeta | None]]:
    """A target rank's model chunks: {chunk: {key: TensorMeta, or None for a non-tensor entry}}."""
    chunks: dict[str, dict] = {}
    for t in target_file.tensors:
        chunks.setdefault(t.chunk, {})[t.key] = \
            None if t.placement is None else TensorMeta(t.placement.stored_shape, t.dtype)
    return chunks


def _tensors(p: Planned, target_file: TargetFile, progress):
    """(MindSpore name, fp32 array) of a target rank, one tensor built at a time."""
    chunk_index = {chunk: vp for vp, chunk in enumerate(legacy.chunk_keys(p.target.vpp))}
    # With the optimizer, the states' plans (the weights' own order) replace the weights'.
    per_state = [(s, p.optimizer_plans[s][target_file.rank].tensors) for s in STATES] if p.optimizer else \
        [("param", target_file.tensors)]
    for row in zip(*(tensors for _, tensors in per_state)):
        if row[0].placement is None:
            continue
        layers = layout.chunk_layers(p.src.spec, p.target, target_file.rank.pp, chunk_index[row[0].chunk])
        name = files.ms_name(row[0].key, layers)
        for (state, _), tensor in zip(per_state, row):
            yield files.STATE_PREFIXES[state] + name, build_tensor(tensor).float().numpy()
            progress.update(tensor.nbytes)


def megatron_to_mindspore(load_dir, ms_path, target: Target = Target(), *, cp: int = 1,
                          num_layers: int | None = None, convert_param_only: bool = False,
                          file_format: str = "ckpt", file_prefix: str = files.FILE_PREFIX,
                          generate_all_dp_cp: bool = False, param_map_path=None, workers: int = 2,
                          quiet: bool = False) -> files.MindSpeedReport:
    """Write the Megatron checkpoint ``load_dir`` as a MindSpeed-Core-MS checkpoint in ``ms_path``
    (atomically) at ``target``'s layout (default: the source's), with ``pt_meta``.
    ``generate_all_dp_cp`` also writes a copy per DP x CP rank (``{prefix}_{rank:03d}``, the
    name MindSpeed-Core-MS's trainer gives each data-parallel rank's file); ``param_map_path``
    names MindSpeed-Core-MS param_map files to check the param_map against."""
    refuse_non_empty(ms_path)
    started = time.perf_counter()
    p = plan_megatron(load_dir, target, convert_param_only=convert_param_only)
    src, target = p.src, p.target
    ckpt, source = src.ckpt, src.layout
    files.check_num_layers(num_layers, src.spec, ckpt.first.path)
    if src.spec.num_experts or src.spec.latent_attention:
        what = "mixtures of experts" if src.spec.num_experts else "latent attention"
        raise CheckpointError(ckpt.first.path, f"{what} cannot be written for MindSpeed-Core-MS yet")
    if param_map_path is not None and p.optimizer is not None:
        files.check_param_maps(param_map_path, p.optimizer.maps)
    iteration = ckpt.iteration or 0
    same_layout = (source.tp, source.pp, source.vpp) == (target.tp, target.pp, target.vpp)
    first = {**ckpt.first.obj, "args": updated_args(ckpt.args, src.spec, target)}
    entries = {k: first.get(k) for k in files.META_ENTRIES}
    scalars = files.training_scalars(iteration, entries["optimizer"], entries["opt_param_scheduler"])
    training_state = {name for name, _ in scalars}

    def role(name: str) -> str:   # a parameter (its fp32 value) or training state
        return "optimizer" if name in training_state or name.startswith(("exp_avg.", "exp_avg_sq.")) else "model"

    grad_dtypes = p.optimizer.grad_dtypes if p.optimizer else {}
    dp_cp = target.dp * cp
    md5 = {}

    iter_name = legacy.iteration_dir_name(ckpt.iteration)

    def write(root, target_file: TargetFile, progress) -> None:
        rank = target_file.rank
        directory = files.rank_dir(root / iter_name, rank)
        directory.mkdir(parents=True)
        paths = [directory / f"{file_prefix}.{file_format}"] + \
            [directory / f"{file_prefix}_{i:03d}.{file_format}" for i in range(dp_cp if generate_all_dp_cp else 0)]
        crcs = write_checkpoint(paths[0], itertools.chain(_tensors(p, target_file, progress), scalars))
        layout = {"rank": rank.pp * target.tp + rank.tp, "world_size": target.tp * target.pp,
                  "parallel_mode": None, "tp": rank.tp, "pp": rank.pp}
        for path in paths:
            if path != paths[0]:
                shutil.copyfile(paths[0], path)
            ms_manifest.describe_written(path, crcs, layout=layout, role=role, step=iteration)
        digest = files.tensor_md5(paths[0])
        md5.update((str(path.relative_to(root)), digest) for path in paths)
        # The RNG state belongs to a rank: kept only where the ranks stay the same.
        rng = None
        if same_layout:
            rank_file = ckpt.files[rank]
            rng = rank_file.materialize(rank_file.obj.get("rng_state"))
        chunks = chunk_metas(target_file)
        meta_dir = root / files.META_DIR
        meta_dir.mkdir(exist_ok=True)
        files.write_meta(meta_dir, rank, {**entries, "rng_state": rng}, chunks, grad_dtypes)
        if p.optimizer is not None:
            maps = rebuild_maps(src.spec, target, entries["args"], rank.pp, chunks, grad_dtypes)
            write_mindspeed_maps(meta_dir, {rank: maps}, replace(target, dp=dp_cp))

    def publish(root, every_ranks: list[dict]) -> None:
        for part in every_ranks:   # the md5 list, for rank 0's report
            md5.update(part)
        legacy.write_tracker(root, ckpt.iteration)

    total = sum(f.nbytes for plans in p.optimizer_plans.values() for f in plans.values()) if p.optimizer \
        else p.nbytes
    data_seconds = write_shared(ms_path, p.weights, write, total, workers=workers, quiet=quiet,
                                label=f"{source.describe()} -> MindSpore {target.describe()}", result=lambda: md5,
                                publish=publish)
    return files.MindSpeedReport(source.describe(), target.describe(), len(md5), total, time.perf_counter() - started,
                                 data_seconds, md5=dict(sorted(md5.items())))
