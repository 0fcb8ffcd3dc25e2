"""MindFormers safetensors <-> Megatron legacy checkpoints and <-> Hugging Face models.

Every conversion goes through a TP1·PP1 Megatron model, as the HF ones do: a MindFormers (or HF)
checkpoint is read as its Source (hf.to_megatron.external_source: each Megatron tensor's pieces
are row ranges of its tensors), a Megatron checkpoint at any TP/PP/VPP too (hf.to_hf.read_megatron);
each output tensor is then built from just the rows it needs, when its file is written.
"""

from __future__ import annotations

import time

from ckpt_hooks.algebra import names as megatron_names
from ckpt_hooks.algebra.target import Target
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.converters.hf import config as hf_config
from ckpt_hooks.converters.hf import names as hf_names
from ckpt_hooks.converters.hf.files import open_directory
from ckpt_hooks.converters.hf.to_hf import external_tensors, max_shard_bytes, read_megatron, tp1_model, write_hf
from ckpt_hooks.converters.hf.to_megatron import external_source, external_to_megatron
from ckpt_hooks.converters.mindformers import config as mf_config, files, names
from ckpt_hooks.converters.mindformers.config import Architecture
from ckpt_hooks.engine.run import Report
from ckpt_hooks.formats.atomic import refuse_non_empty


def _read(load_dir, config, architecture):
    """(tensors, config path, config, name table) of a MindFormers checkpoint."""
    tensors = files.open_checkpoint(load_dir)
    path, config = mf_config.resolve(load_dir, tensors, config, architecture)
    return tensors, path, config, names.table(config["model_type"], names.is_concat(tensors))


def _described_by(config, architecture) -> str:
    return "the model read from layer 0 and the flags" if config is None and architecture is not None \
        else hf_config.CONFIG


def mindformers_to_megatron(load_dir, save_dir, target: Target = Target(), *, config=None,
                            architecture: Architecture | None = None, release: bool = False, workers: int = 2,
                            quiet: bool = False) -> Report:
    """Write the MindFormers checkpoint ``load_dir`` (a safetensors file or directory, qkv_concat
    or not: read from its names) as a Megatron legacy checkpoint in ``save_dir``; the model is
    described by an HF ``config`` (file or directory), or ``architecture`` and the tensors'
    shapes, or the config.json beside the checkpoint; ``target`` as for hf_to_megatron."""
    refuse_non_empty(save_dir, sources=[load_dir])
    tensors, path, read, table = _read(load_dir, config, architecture)
    return external_to_megatron(tensors, table, read, path, load_dir, save_dir, target, label=table.name,
                                described_by=_described_by(config, architecture), release=release, workers=workers,
                                quiet=quiet)


def megatron_to_mindformers(load_dir, save_dir, target: Target = Target(), *, qkv_concat: bool = False,
                            max_shard_size: str | int = "5GB", workers: int = 2, quiet: bool = False) -> Report:
    """Write the Megatron checkpoint ``load_dir`` (any TP/PP/VPP) as MindFormers safetensors in
    ``save_dir`` (files of at most ``max_shard_size``, ``param_name_map.json``, and a
    ``config.json`` describing the model), fused as ``qkv_concat`` says; padded vocabulary rows
    are dropped; ``target`` gives the dtype and what the saved args lack of the vocabulary."""
    refuse_non_empty(save_dir, sources=[load_dir])
    started = time.perf_counter()
    max_bytes = max_shard_bytes(max_shard_size, save_dir)
    params_dtype = hf_config.torch_dtype(target.params_dtype)
    model = read_megatron(load_dir, target)
    family = "qwen2" if model.spec.add_qkv_bias else "llama"
    dtype = params_dtype or model.tensors[megatron_names.EMBEDDING].dtype
    config = hf_config.from_megatron(model.ckpt.args, model.spec, family, dtype, model.ckpt.first.path)
    table = names.table(family, qkv_concat)
    entries = table.entries(model.spec, hf_names.layer_spec_of(model.tensors))
    planned = external_tensors(entries, model.tensors, params_dtype, table.name, model.ckpt.first.path)
    label = f"{model.source.describe()} -> {table.name}"
    count, total = files.write_directory(save_dir, planned, config, max_bytes, workers=workers, quiet=quiet,
                                         label=label)
    return Report(model.source.describe(), table.name, count, total, time.perf_counter() - started,
                  notes=model.notes)


def _translate(tensors, source: hf_names.Table, table: hf_names.Table, config: dict, path, load_dir,
               described_by: str, target: Target) -> tuple[list, dict]:
    """(planned ``table`` tensors, their model's HF config) from ``source`` ones, through a
    TP1·PP1 model, in ``target``'s dtype and vocabulary size."""
    params_dtype = hf_config.torch_dtype(target.params_dtype)
    spec = hf_config.model_spec(config, path, config["model_type"], target.true_vocab_size)
    weights = external_source(tensors, source, source.entries(spec, hf_names.LOCAL), spec, config["vocab_size"],
                              load_dir, described_by)
    model = tp1_model(weights, spec, load_dir)
    dtype = params_dtype or model[megatron_names.EMBEDDING].dtype
    planned = external_tensors(table.entries(spec, hf_names.LOCAL), model, params_dtype, table.name, load_dir)
    return planned, mf_config.hf_config_of(config, path, spec, dtype)


def hf_to_mindformers(load_dir, save_dir, target: Target = Target(), *, qkv_concat: bool = False,
                      max_shard_size: str | int = "5GB", workers: int = 2, quiet: bool = False) -> Report:
    """Write the Hugging Face Llama or Qwen2 model ``load_dir`` as MindFormers safetensors (as
    megatron_to_mindformers does) in ``save_dir``; ``target``'s true vocabulary size drops rows
    past it."""
    refuse_non_empty(save_dir, sources=[load_dir])
    started = time.perf_counter()
    max_bytes = max_shard_bytes(max_shard_size, save_dir)
    path, config, family = hf_config.read(load_dir)
    if family not in names.FAMILIES:
        raise CheckpointError(path, f"model_type {family!r} has no MindFormers Llama-family form "
                                    f"({' or '.join(names.FAMILIES)})")
    table = names.table(family, qkv_concat)
    planned, written_config = _translate(open_directory(load_dir), hf_names.TABLES[family], table, config, path,
                                         load_dir, hf_config.CONFIG, target)
    count, total = files.write_directory(save_dir, planned, written_config, max_bytes, workers=workers, quiet=quiet,
                                         label=f"HF {family} -> {table.name}")
    return Report(f"HF {family}", table.name, count, total, time.perf_counter() - started)


def mindformers_to_hf(load_dir, save_dir, target: Target = Target(), *, config=None,
                      architecture: Architecture | None = None, max_shard_size: str | int = "5GB", workers: int = 2,
                      quiet: bool = False) -> Report:
    """Write the MindFormers checkpoint ``load_dir`` (model described as for
    mindformers_to_megatron) as a Hugging Face model in ``save_dir``, as megatron_to_hf does."""
    refuse_non_empty(save_dir, sources=[load_dir])
    started = time.perf_counter()
    max_bytes = max_shard_bytes(max_shard_size, save_dir)
    tensors, path, read, source = _read(load_dir, config, architecture)
    family = read["model_type"]
    planned, written_config = _translate(tensors, source, hf_names.TABLES[family], read, path, load_dir,
                                         _described_by(config, architecture), target)
    count, total = write_hf(save_dir, planned, written_config, max_bytes, workers=workers, quiet=quiet,
                            label=f"{source.name} -> HF {family}")
    return Report(source.name, f"HF {family}", count, total, time.perf_counter() - started)
