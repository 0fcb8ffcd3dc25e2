"""A Megatron legacy checkpoint at any TP/PP/VPP -> a Hugging Face safetensors directory.

The planner maps the sharded source onto one TP1·PP1 model; each HF tensor is then a few row
ranges of one of its tensors (plan.restrict), built from just the source rows they need, and
written into its shard as soon as it is built: one HF tensor in memory per worker.
"""

from __future__ import annotations

import json
import time

import torch

from ckpt_hooks.conversion import read_source
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.executor import build_tensor
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.hf import Report, config as hf_config, files, names
from ckpt_hooks.output import refuse_non_empty, run, staged_directory
from ckpt_hooks.plan import TargetTensor, plan_conversion, restrict
from ckpt_hooks.spec import ParallelConfig


def _rows(tensor: TargetTensor, start: int, stop: int) -> TargetTensor:
    """Rows [start, stop) of a TP1 tensor (fused axes flattened), as a sub-box of its view."""
    view, stored = tensor.placement.view_shape, tensor.placement.stored_shape
    if len(view) > len(stored):  # fused: rows of (parts x rows, ...) lie in one part
        part = start // view[1]
        return restrict(tensor, (part, start - part * view[1], *[0] * len(view[2:])), (1, stop - start, *view[2:]))
    return restrict(tensor, (start, *[0] * len(view[1:])), (stop - start, *view[1:]))


def megatron_to_hf(load_dir, save_dir, *, model_type: str | None = None, params_dtype: torch.dtype | None = None,
                   max_shard_size: str | int = "5GB", true_vocab_size: int | None = None, workers: int = 2,
                   quiet: bool = False) -> Report:
    """Write the Megatron checkpoint in ``load_dir`` as a Hugging Face ``model_type`` model
    (default: Qwen2 with q/k/v biases, Mistral with an attention window, else Llama) in
    ``save_dir``, atomically: safetensors shards of at most ``max_shard_size`` (with
    ``model.safetensors.index.json`` when more than one) and ``config.json``. The padded
    vocabulary rows are dropped."""
    refuse_non_empty(save_dir)
    started = time.perf_counter()
    try:
        max_bytes = files.parse_size(max_shard_size)
    except ValueError as e:
        raise CheckpointError(save_dir, f"--max-shard-size: {e}") from None
    ckpt, spec, source, source_files = read_source(load_dir, true_vocab_size)
    args_path = ckpt.first.path
    if spec.true_vocab_size is None:
        raise CheckpointError(args_path, "the saved args do not give the true vocabulary size; pass --true-vocab-size")
    family = model_type or hf_config.family_of(ckpt.args, spec)
    if family not in names.LAYERS:
        raise CheckpointError(args_path, f"unsupported model type {family!r} "
                                         f"(supported: {', '.join(sorted(names.LAYERS))})")
    plan = plan_conversion(spec, source, source_files, ParallelConfig(), legacy.chunk_keys(source.vpp), ["model"])
    by_key = {t.key: t for t in plan[0].tensors if t.placement is not None}
    dtype = params_dtype or next(iter(by_key.values())).dtype  # the embedding's
    config = hf_config.from_megatron(ckpt.args, spec, family, dtype, args_path)
    entries = names.entries(family, spec, names.layer_spec_of(by_key))
    unmapped = sorted(set(by_key) - {e.megatron for e in entries})
    if unmapped:
        raise CheckpointError(args_path, f"{len(unmapped)} tensors have no Hugging Face {family} name: "
                                         f"{', '.join(unmapped)}")
    missing = [e.megatron for e in entries if e.megatron not in by_key]
    if missing:
        raise CheckpointError(args_path, f"missing tensors: {', '.join(dict.fromkeys(missing))}")

    def planned(entry: names.Entry) -> files.PlannedTensor:
        tensor = by_key[entry.megatron]
        trailing = tensor.placement.stored_shape[1:]
        shape = (sum(b - a for a, b in entry.rows), *trailing)

        def produce():
            parts = [build_tensor(ckpt.lookup, _rows(tensor, a, b)).reshape(-1, *trailing) for a, b in entry.rows]
            return torch.cat(parts).to(params_dtype or tensor.dtype)
        return files.PlannedTensor(entry.hf, shape, params_dtype or tensor.dtype, produce)

    shards = files.shard([planned(e) for e in entries], max_bytes)
    total = sum(t.nbytes for tensors in shards.values() for t in tensors)
    with staged_directory(save_dir) as root:
        run(list(shards.items()), lambda shard, bar: files.write_file(root / shard[0], shard[1], bar), total,
            workers=workers, quiet=quiet, label=f"{source.describe()} -> HF {family}")
        if len(shards) > 1:
            files.write_index(root, shards)
        (root / hf_config.CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Report(source.describe(), f"HF {family}", len(shards), total, time.perf_counter() - started)
