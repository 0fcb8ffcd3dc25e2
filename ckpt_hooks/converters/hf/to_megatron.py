"""Hugging Face safetensors -> a Megatron legacy checkpoint at any TP/PP/VPP.

The HF tensors are read as a TP1·PP1 Megatron model whose fused tensors (linear_qkv,
linear_fc1) are *concatenations* of row ranges of HF tensors; the planner then cuts that model
into the target's per-rank boxes as for any Megatron source, and the executor reads, for each
target tensor, only the HF bytes it needs. One target file per worker, one tensor at a time.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, replace

import torch

from ckpt_hooks.algebra import layout
from ckpt_hooks.algebra import names as megatron_names
from ckpt_hooks.megatron.conversion import target_config, write_manifest
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.engine.execute import pending_file
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.converters.hf import config as hf_config, names
from ckpt_hooks.converters.hf.files import StoredTensor, open_directory
from ckpt_hooks.engine.run import Report, run
from ckpt_hooks.formats.atomic import refuse_non_empty, staged_directory
from ckpt_hooks.engine.plan import SourceFile, TensorMeta, plan_conversion
from ckpt_hooks.algebra.spec import ParallelConfig, updated_args

CHECKPOINT_VERSION = 3.0  # Megatron-LM's current legacy format


@dataclass(frozen=True)
class Concatenation:
    """A Megatron tensor made of flat element ranges of HF (or other frameworks') tensors, one
    after the other: the executor's lazy source tensor (always contiguous)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[tuple[StoredTensor, int, int], ...]   # (HF tensor, first element, elements)
    starts: tuple[int, ...]                              # each piece's first element in this tensor

    def is_contiguous(self) -> bool:
        return True

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor."""
        row = math.prod(self.shape[1:])
        out = torch.empty((stop - start) * row, dtype=self.dtype)
        self.read_into(start * row, out)
        return out.view(stop - start, *self.shape[1:])

    def read_into(self, start: int, out: torch.Tensor) -> None:
        """Elements [start, start + out.numel()) into flat ``out`` (cast to its dtype)."""
        done, i = 0, bisect.bisect_right(self.starts, start) - 1
        while done < out.numel():
            tensor, first, count = self.pieces[i]
            at = start + done - self.starts[i]
            take = min(count - at, out.numel() - done)
            out[done:done + take].copy_(tensor.read(first + at, take))
            done += take
            i += 1


class _Reader:
    """The executor's source file for Concatenations."""

    @staticmethod
    def read_runs(tensor: Concatenation, starts, run_numel: int, out: torch.Tensor) -> None:
        flat = out.view(-1)
        for i, start in enumerate(starts):
            tensor.read_into(start, flat[i * run_numel:(i + 1) * run_numel])


def _megatron_order(key: str) -> tuple:
    """megatron-core's state-dict order (the embedding, the layers, the rest), so that the files
    list their entries as Megatron's do."""
    name = megatron_names.classify(key)
    if name.local_layer is not None:
        return 1, name.local_layer, names.LAYER_ORDER.index(name.suffix)
    position = names.OUTER_ORDER.index(key)
    return (0 if position == 0 else 2), position


def megatron_view(tensors: dict, table: names.Table, entries: list[names.Entry], spec, vocab_rows: int, path,
                  described_by: str, extra=(),
                  params_dtype: torch.dtype | None = None) -> dict[str, Concatenation | None]:
    """A framework's tensors as a TP1·PP1 Megatron model: key -> Concatenation (None for the
    non-tensor entries ``extra``), after checking them against the name table and the model,
    whose vocabulary tensors have ``vocab_rows`` rows and whose other shapes ``described_by`` gives."""
    wanted = {e.hf for e in entries}
    known = wanted | (table.tied_copies() if spec.tied_embeddings else set())  # a tied copy may be saved
    unmapped = sorted(n for n in tensors if n not in known and not table.ignored.fullmatch(n))
    if unmapped:
        raise CheckpointError(path, f"{len(unmapped)} tensors the {table.name} name map does not "
                                    f"cover: {', '.join(unmapped)}")
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise CheckpointError(path, f"missing tensors: {', '.join(missing)}")
    by_key: dict[str, list] = {}
    for e in entries:
        shape = names.megatron_shape(e.megatron, spec)
        vocab = e.megatron in (megatron_names.EMBEDDING, megatron_names.OUTPUT)
        expected = (vocab_rows if vocab else sum(b - a for a, b in e.rows), *shape[1:])
        stored = tensors[e.hf]
        if stored.shape != expected:
            raise CheckpointError(stored.file.path, f"'{e.hf}' has shape {list(stored.shape)}, but "
                                                    f"{described_by} implies {list(expected)}")
        row = math.prod(shape[1:])
        for megatron_row, own_row, rows in e.runs():
            by_key.setdefault(e.megatron, []).append((megatron_row * row, stored, own_row * row, rows * row))
    source = {}
    for key, pieces in by_key.items():
        pieces.sort(key=lambda p: p[0])
        shape = names.megatron_shape(key, spec)
        dtype = params_dtype or pieces[0][1].dtype
        source[key] = Concatenation(shape, dtype, tuple(p[1:] for p in pieces), tuple(p[0] for p in pieces))
    return {**source, **dict.fromkeys(extra)}


def hf_to_megatron(load_dir, save_dir, *, target_tp: int = 1, target_pp: int = 1, target_vpp: int | None = None,
                   num_layer_list=None, layer_spec: str = names.TRANSFORMER_ENGINE,
                   params_dtype: torch.dtype | None = None, make_vocab_size_divisible_by: int = 128,
                   padded_vocab_size: int | None = None, true_vocab_size: int | None = None,
                   release: bool = False, workers: int = 2, quiet: bool = False) -> Report:
    """Write the HF model in ``load_dir`` as a Megatron legacy checkpoint (``iter_0000001``, or
    ``release``) in ``save_dir``, atomically, with Megatron-LM's ``args`` and the manifest.
    The vocabulary is padded to a multiple of ``make_vocab_size_divisible_by`` x TP, or to
    ``padded_vocab_size`` rows; ``true_vocab_size`` drops HF rows past it."""
    refuse_non_empty(save_dir)
    path, config, family = hf_config.read(load_dir)
    return external_to_megatron(
        open_directory(load_dir), names.TABLES[family], config, path, load_dir, save_dir, label=f"HF {family}",
        tokenizer=load_dir, target_tp=target_tp, target_pp=target_pp, target_vpp=target_vpp,
        num_layer_list=num_layer_list, layer_spec=layer_spec, params_dtype=params_dtype,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by, padded_vocab_size=padded_vocab_size,
        true_vocab_size=true_vocab_size, release=release, workers=workers, quiet=quiet)


def external_to_megatron(tensors: dict, table: names.Table, config: dict, config_path, load_dir, save_dir, *,
                         label: str, described_by: str = hf_config.CONFIG, tokenizer=None, target_tp: int = 1,
                         target_pp: int = 1, target_vpp: int | None = None, num_layer_list=None,
                         layer_spec: str = names.TRANSFORMER_ENGINE, params_dtype: torch.dtype | None = None,
                         make_vocab_size_divisible_by: int = 128, padded_vocab_size: int | None = None,
                         true_vocab_size: int | None = None, release: bool = False, workers: int = 2,
                         quiet: bool = False) -> Report:
    """hf_to_megatron for any framework's ``tensors`` (name -> StoredTensor, from ``load_dir``)
    named as ``table`` says, of the model an HF-style ``config`` (read from ``config_path``)
    describes."""
    started = time.perf_counter()
    spec = hf_config.model_spec(config, config_path, config["model_type"], true_vocab_size,
                                make_vocab_size_divisible_by)
    target = target_config(ParallelConfig(), target_tp, target_pp, target_vpp, num_layer_list)
    if padded_vocab_size:
        if padded_vocab_size % target.tp or padded_vocab_size < spec.true_vocab_size:
            raise CheckpointError(config_path, f"padded vocabulary {padded_vocab_size} must be a multiple of TP "
                                               f"{target.tp} and at least the vocabulary {spec.true_vocab_size}")
        # What Megatron-LM pads to with this divisor is exactly the requested size.
        spec = replace(spec, make_vocab_size_divisible_by=padded_vocab_size // target.tp)
    try:
        layout.check_divisible(spec, target)
    except layout.LayoutError as e:
        raise CheckpointError(config_path, f"target {target.describe()}: {e}") from None
    source = megatron_view(tensors, table, table.entries(spec, layer_spec), spec, config["vocab_size"], load_dir,
                           described_by, names.extra_states(spec, layer_spec), params_dtype)
    keys = sorted(source, key=_megatron_order)
    metas = {k: None if source[k] is None else TensorMeta(source[k].shape, source[k].dtype) for k in keys}
    plan = plan_conversion(spec, ParallelConfig(), [SourceFile(str(load_dir), 0, 0, {"model": metas})], target,
                           ["model"], legacy.chunk_keys(target.vpp))
    iteration = None if release else 1
    dtype = params_dtype or source[megatron_names.EMBEDDING].dtype
    args = updated_args(hf_config.megatron_args(config, config_path, spec, dtype, layer_spec, tokenizer,
                                                iteration or 0), spec, target)

    def lookup(file, chunk, key):
        return _Reader, source[key]

    with staged_directory(save_dir) as root:
        def write(target_file, progress) -> None:
            state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration or 0,
                     **pending_file(lookup, target_file, progress)}
            legacy.save_rank_file(root, iteration, target_file.tp_rank, target_file.pp_rank, target.pp, state)

        total = sum(f.nbytes for f in plan)
        run(plan, write, total, workers=workers, quiet=quiet, label=f"{label} -> {target.describe()}")
        legacy.write_tracker(root, iteration)
        write_manifest(root)
    return Report(label, target.describe(), len(plan), total, time.perf_counter() - started)
