"""Hugging Face safetensors -> a Megatron legacy checkpoint at any TP/PP/VPP.

    HF tensor  = row ranges of one Megatron tensor of a TP1·PP1 model (names.Entry)
    piece      = one range: its box in the logical tensor (algebra.layout), its handle a view of
                 those rows in the mapped file (a strided one for interleaved ranges)
    Source     = the Megatron model's logical tensors, keyed and ordered as megatron-core's

planned onto the target's rank files as any Megatron source is (megatron.checkpoint); each
target tensor reads just the HF rows it needs. ``external_to_megatron`` serves MindFormers too.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from dataclasses import replace

import torch

from ckpt_hooks.algebra import layout
from ckpt_hooks.algebra import names as megatron_names
from ckpt_hooks.algebra.layout import Box
from ckpt_hooks.algebra.spec import ParallelConfig, updated_args
from ckpt_hooks.algebra.target import Target
from ckpt_hooks.converters.hf import config as hf_config, names
from ckpt_hooks.converters.hf.files import StoredTensor, open_directory
from ckpt_hooks.engine.run import Report
from ckpt_hooks.engine.source import Source, Tensor
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.atomic import refuse_non_empty
from ckpt_hooks.megatron.checkpoint import pending_file, plan_files, write_checkpoint
from ckpt_hooks.megatron.conversion import resume_hint

CHECKPOINT_VERSION = 3.0  # Megatron-LM's current legacy format


def _pieces(stored: StoredTensor, run: tuple[int, slice, int], where: layout.Placement) -> list:
    """(box, handle) of each box of the logical tensor that a run of Megatron rows fills (one,
    unless the run crosses a fused axis part-way)."""
    start, rows, count = run
    row = math.prod(where.stored_shape[1:])
    own = range(stored.shape[0])[rows]
    pieces, done = [], 0
    for offsets, lengths in layout.element_range_boxes(where.logical_shape, start * row, (start + count) * row):
        part = own[done:done + math.prod(lengths) // row]
        pieces.append((Box(offsets, lengths), stored.piece(slice(part.start, part.stop, part.step), lengths)))
        done += len(part)
    return pieces


def external_source(tensors: dict[str, StoredTensor], table: names.Table, entries: list[names.Entry], spec,
                    vocab_rows: int, path, described_by: str, extra=(),
                    params_dtype: torch.dtype | None = None) -> Source:
    """A framework's tensors as the Source of a TP1·PP1 Megatron model (``extra``: its
    non-tensor entries), after checking them against the name table and the model, whose
    vocabulary tensors have ``vocab_rows`` rows and whose other shapes ``described_by`` gives."""
    wanted = {e.hf for e in entries}
    known = wanted | (table.tied_copies() if spec.tied_embeddings else set())  # a tied copy may be saved
    unmapped = sorted(n for n in tensors if n not in known and not table.ignored.fullmatch(n))
    if unmapped:
        raise CheckpointError(path, f"{len(unmapped)} tensors the {table.name} name map does not "
                                    f"cover: {', '.join(unmapped)}")
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise CheckpointError(path, f"missing tensors: {', '.join(missing)}")
    source: Source = {key: Tensor((), None) for key in extra}
    for e in entries:
        where = names.tp1(e.megatron, spec)
        vocab = e.megatron in (megatron_names.EMBEDDING, megatron_names.OUTPUT)
        expected = (vocab_rows if vocab else sum(b - a for a, b in e.rows), *where.stored_shape[1:])
        stored = tensors[e.hf]
        if stored.shape != expected:
            raise CheckpointError(stored.file.path, f"'{e.hf}' has shape {list(stored.shape)}, but "
                                                    f"{described_by} implies {list(expected)}")
        tensor = source.setdefault(e.megatron, Tensor(where.logical_shape, params_dtype or stored.dtype))
        for run in e.runs():
            for box, handle in _pieces(stored, run, where):
                tensor.add(box, handle)
    return {key: source[key] for key in sorted(source, key=megatron_names.state_dict_order)}


def model_entries(table: names.Table, config: dict, spec, layer_spec: str) -> tuple[list[names.Entry], list[str]]:
    """The tensors (``table``'s names) and the non-weight entries of the model an HF-style
    ``config`` describes, its mixture-of-experts layers included."""
    moe = hf_config.moe_layers(config, config["model_type"])
    return table.entries(spec, layer_spec, moe), names.extra_states(spec, layer_spec, moe)


def hf_to_megatron(load_dir, save_dir, target: Target = Target(), *, release: bool = False, workers: int = 2,
                   quiet: bool = False) -> Report:
    """Write the HF model in ``load_dir`` as a Megatron legacy checkpoint (``iter_0000001``, or
    ``release``) in ``save_dir``, atomically, with Megatron-LM's ``args`` and the manifest, at
    ``target``'s layout (default TP1·PP1), layer spec (default Transformer Engine's) and dtype.
    The vocabulary is padded to a multiple of its ``make_vocab_size_divisible_by`` (default 128)
    x TP, or to ``padded_vocab_size`` rows; ``true_vocab_size`` drops HF rows past it."""
    refuse_non_empty(save_dir, sources=[load_dir])
    path, config, family = hf_config.read(load_dir)
    return external_to_megatron(open_directory(load_dir), names.TABLES[family], config, path, load_dir, save_dir,
                                target, label=f"HF {family}", tokenizer=load_dir, release=release, workers=workers,
                                quiet=quiet)


def external_to_megatron(tensors: dict, table: names.Table, config: dict, config_path, load_dir, save_dir,
                         target: Target = Target(), *, label: str, described_by: str = hf_config.CONFIG,
                         tokenizer=None, release: bool = False, workers: int = 2, quiet: bool = False) -> Report:
    """hf_to_megatron for any framework's ``tensors`` (name -> StoredTensor, from ``load_dir``)
    named as ``table`` says, of the model an HF-style ``config`` (read from ``config_path``)
    describes. The tokenizer and generation files of the ``tokenizer`` directory are copied into
    ``save_dir/hf_assets``, which the args name (absolute) as the tokenizer."""
    started = time.perf_counter()
    assets = hf_config.assets(tokenizer) if tokenizer else []
    notes = [] if assets or tokenizer is None else \
        [f"{tokenizer} holds no tokenizer files: give Megatron-LM --tokenizer-model yourself"]
    tokenizer_model = str(Path(save_dir).absolute() / hf_config.ASSETS_DIR) if assets else None
    layer_spec = target.layer_spec or names.TRANSFORMER_ENGINE
    params_dtype = hf_config.torch_dtype(target.params_dtype)
    spec = target.model(target.padded(replace(
        hf_config.model_spec(config, config_path, config["model_type"], target.true_vocab_size,
                             target.make_vocab_size_divisible_by or 128), transformer_impl=layer_spec)))
    written = target.layout(ParallelConfig(), spec)
    if target.padded_vocab_size:
        if target.padded_vocab_size % written.tp or target.padded_vocab_size < spec.true_vocab_size:
            raise target.error("padded_vocab_size", f"must be a multiple of TP {written.tp} and at least the "
                                                    f"vocabulary {spec.true_vocab_size}")
        # What Megatron-LM pads to with this divisor is exactly the requested size.
        spec = replace(spec, make_vocab_size_divisible_by=target.padded_vocab_size // written.tp)
    entries, extras = model_entries(table, config, spec, layer_spec)
    source = external_source(tensors, table, entries, spec, config["vocab_size"], load_dir, described_by, extras,
                             params_dtype)
    plan = plan_files(source, spec, written, where=load_dir)
    iteration = None if release else 1
    dtype = params_dtype or source[megatron_names.EMBEDDING].dtype
    args = updated_args(hf_config.megatron_args(config, config_path, spec, dtype, layer_spec, tokenizer_model,
                                                iteration or 0), spec, written)

    def copy_assets(root: Path) -> None:
        (root / hf_config.ASSETS_DIR).mkdir()
        for path in assets:
            shutil.copyfile(path, root / hf_config.ASSETS_DIR / path.name)

    def rank_state(target_file, progress) -> dict:
        return {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration or 0,
                **pending_file(target_file, progress, spec.moe_grouped_gemm)}

    total = sum(f.nbytes for f in plan)
    seconds = write_checkpoint(save_dir, iteration, plan, written, rank_state, None, total, workers=workers,
                               quiet=quiet, label=f"{label} -> {written.describe()}",
                               finish=copy_assets if assets else None)
    return Report(label, written.describe(), len(plan), total, time.perf_counter() - started, seconds,
                  [*notes, resume_hint(save_dir, spec, written, optimizer=False)])
