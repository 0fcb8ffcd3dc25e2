"""A Megatron legacy checkpoint at any TP/PP/VPP -> a Hugging Face safetensors directory.

The planner maps the Megatron Source onto one TP1·PP1 model (``tp1_model``); each HF tensor is
then a few row ranges of one of its tensors (plan.restrict), built from just the source rows
they need, and written into its shard as soon as it is built: one HF tensor in memory per
worker. ``read_megatron``, ``tp1_model``, ``external_tensors`` and ``write_hf`` serve the
MindFormers conversions too.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass

import torch

from ckpt_hooks.algebra import names as megatron_names
from ckpt_hooks.algebra.spec import ModelSpec, ParallelConfig
from ckpt_hooks.algebra.target import Target
from ckpt_hooks.converters.hf import config as hf_config, files, names
from ckpt_hooks.engine.execute import build_tensor
from ckpt_hooks.engine.plan import TargetTensor, restrict
from ckpt_hooks.engine.run import Report
from ckpt_hooks.engine.source import Source
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.atomic import refuse_non_empty
from ckpt_hooks.megatron.checkpoint import plan_files, read_source


def _rows(tensor: TargetTensor, start: int, stop: int) -> TargetTensor:
    """Rows [start, stop) of a TP1 tensor (fused axes flattened), as a sub-box of its view."""
    view, stored = tensor.placement.view_shape, tensor.placement.stored_shape
    if len(view) > len(stored):  # fused: rows of (parts x rows, ...) lie in one part
        part = start // view[1]
        return restrict(tensor, (part, start - part * view[1], *[0] * len(view[2:])), (1, stop - start, *view[2:]))
    return restrict(tensor, (start, *[0] * len(view[1:])), (stop - start, *view[1:]))


@dataclass(frozen=True)
class ShardedRows:
    """A tensor of a TP1·PP1 model planned from a Source: rows built on demand."""

    tensor: TargetTensor

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensor.placement.stored_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return build_tensor(_rows(self.tensor, start, stop)).reshape(-1, *self.shape[1:])


def tp1_model(weights: Source, spec: ModelSpec, where) -> dict[str, ShardedRows]:
    """A Source as one TP1·PP1 Megatron model (key -> ShardedRows); ``where`` names it in errors."""
    (tp1,) = plan_files(weights, spec, ParallelConfig(), where=where)
    return {t.key: ShardedRows(t) for t in tp1.tensors if t.placement is not None}


@dataclass
class MegatronModel:
    """A Megatron legacy checkpoint at any TP/PP/VPP read as one TP1·PP1 model (key -> ShardedRows)."""

    ckpt: object
    spec: object
    source: ParallelConfig
    tensors: dict[str, ShardedRows]
    notes: list[str]


def read_megatron(load_dir, target: Target = Target()) -> MegatronModel:
    """Plan a checkpoint's TP1·PP1 form; nothing is read but its args and file headers.
    ``target``'s vocabulary sizes stand in for what the saved args lack."""
    src = read_source(load_dir, target.true_vocab_size, make_vocab_size_divisible_by=target.make_vocab_size_divisible_by)
    if src.spec.true_vocab_size is None:
        raise CheckpointError(src.ckpt.first.path, "the saved args do not give the true vocabulary size (the rows "
                                                   f"past it are padding); pass --true-vocab-size (at most "
                                                   f"{src.spec.padded_vocab_size})")
    return MegatronModel(src.ckpt, src.spec, src.layout, tp1_model(src.weights, src.spec, src.ckpt.first.path),
                         src.notes)


def external_tensors(entries: list[names.Entry], model: dict, params_dtype: torch.dtype | None, what: str,
                     path) -> list[files.PlannedTensor]:
    """The tensors ``entries`` name, each built from rows of a TP1·PP1 Megatron model's tensors
    (key -> an object with shape, dtype and rows(start, stop)) when it is written."""
    unmapped = sorted(set(model) - {e.megatron for e in entries})
    if unmapped:
        raise CheckpointError(path, f"{len(unmapped)} tensors have no {what} name: {', '.join(unmapped)}")
    missing = [e.megatron for e in entries if e.megatron not in model]
    if missing:
        raise CheckpointError(path, f"missing tensors: {', '.join(dict.fromkeys(missing))}")

    def planned(entry: names.Entry) -> files.PlannedTensor:
        tensor = model[entry.megatron]
        shape = (sum(b - a for a, b in entry.rows), *tensor.shape[1:])
        dtype = params_dtype or tensor.dtype

        def produce():
            parts = [tensor.rows(a, b) for a, b in entry.rows]
            return (torch.stack(parts, 1) if entry.interleaved else torch.cat(parts)).reshape(shape).to(dtype)
        return files.PlannedTensor(entry.hf, shape, dtype, produce)
    return [planned(e) for e in entries]


def megatron_to_hf(load_dir, save_dir, target: Target = Target(), *, model_type: str | None = None,
                   max_shard_size: str | int = "5GB", workers: int = 2, quiet: bool = False) -> Report:
    """Write the Megatron checkpoint in ``load_dir`` as a Hugging Face ``model_type`` model
    (default: Qwen2 with q/k/v biases, Mistral with an attention window, else Llama) in
    ``save_dir``, atomically: safetensors shards of at most ``max_shard_size`` (with
    ``model.safetensors.index.json`` when more than one) and ``config.json``, in ``target``'s
    ``params_dtype`` (default: the checkpoint's). The padded vocabulary rows are dropped."""
    refuse_non_empty(save_dir, sources=[load_dir])
    started = time.perf_counter()
    max_bytes = max_shard_bytes(max_shard_size, save_dir)
    params_dtype = hf_config.torch_dtype(target.params_dtype)
    model = read_megatron(load_dir, target)
    args_path = model.ckpt.first.path
    family = model_type or hf_config.family_of(model.ckpt.args, model.spec)
    if family not in names.LAYERS:
        raise CheckpointError(args_path, f"unsupported model type {family!r} "
                                         f"(supported: {', '.join(sorted(names.LAYERS))})")
    dtype = params_dtype or model.tensors[megatron_names.EMBEDDING].dtype
    config = hf_config.from_megatron(model.ckpt.args, model.spec, family, dtype, args_path)
    entries = names.entries(family, model.spec, names.layer_spec_of(model.tensors), names.moe_layers_of(model.tensors, model.spec))
    planned = external_tensors(entries, model.tensors, params_dtype, f"Hugging Face {family}", args_path)
    label = f"{model.source.describe()} -> HF {family}"
    count, total = write_hf(save_dir, planned, config, max_bytes, workers=workers, quiet=quiet, label=label,
                            assets=hf_config.assets(model.ckpt.iter_dir.parent / hf_config.ASSETS_DIR))
    return Report(model.source.describe(), f"HF {family}", count, total, time.perf_counter() - started,
                  notes=model.notes)


def max_shard_bytes(max_shard_size: str | int, save_dir) -> int:
    try:
        return files.parse_size(max_shard_size)
    except ValueError as e:
        raise CheckpointError(save_dir, f"--max-shard-size: {e}") from None


def write_hf(save_dir, planned: list[files.PlannedTensor], config: dict, max_bytes: int, *, workers: int,
             quiet: bool, label: str, assets: list = ()) -> tuple[int, int]:
    """A Hugging Face model directory, atomically, with copies of ``assets`` (tokenizer files):
    (files, bytes) written."""
    shards = files.shard(planned, max_bytes)

    def describe(root) -> None:
        if len(shards) > 1:
            files.write_index(root, shards)
        (root / hf_config.CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for path in assets:
            shutil.copyfile(path, root / path.name)
    return len(shards), files.write_shards(save_dir, shards, workers=workers, quiet=quiet, label=label,
                                           describe=describe)
