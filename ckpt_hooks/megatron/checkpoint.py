"""Megatron legacy checkpoints (``--ckpt-format torch``) as the engine's Source and Sink.

    source  rank file (Rank(tp, pp, ep)) -> chunk (``model`` / ``model{v}``) -> key -> tensor
            each tensor = a box of the logical tensor named by its global layer (``algebra.names``)
    sink    a target layout -> rank files, each chunk's keys in megatron-core's state-dict order,
            every tensor planned from the source's pieces (``engine.plan``)

A torch_dist iteration is read by ``megatron.torch_dist`` into the same ``MegatronSource``.
The files are opened by the codec (``formats.megatron_legacy``); a Megatron-LM legacy model's
(``--use-legacy-models``) nested chunks are read under megatron-core's names (``legacy_names``)
and written back in the form they came in. The writer sequence (staged directory -> rank files
-> optimizer files -> tracker -> manifest) is ``write_checkpoint``, shared by every converter
that writes Megatron.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ckpt_hooks.algebra import layout, names
from ckpt_hooks.algebra.layout import EXTRA, VOCAB, Box, LayoutError, Placement
from ckpt_hooks.algebra.spec import (ModelSpec, ParallelConfig, Rank, model_spec_from_args,
                                     vocab_divisor)
from ckpt_hooks.engine.execute import build_tensor
from ckpt_hooks.engine.plan import TargetFile, TargetTensor, covered, plan_tensor
from ckpt_hooks.engine.ranks import write_shared
from ckpt_hooks.engine.source import Source, Tensor, TensorMeta
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.formats.torch_dist import is_dist_checkpoint, object_key
from ckpt_hooks.formats.torch_pickle import SHORT_READ, LazyTensor, TensorView, iter_lazy_tensors
from ckpt_hooks.formats.torch_save import PendingTensor
from ckpt_hooks.megatron import grouped_experts, legacy_names, manifest


@dataclass
class SourceFile:
    """What one rank file holds: per model chunk, key -> TensorMeta (None for non-tensors)."""

    path: str
    rank: Rank
    chunks: dict[str, dict[str, TensorMeta | None]]


# (rank, chunk, key) -> (logical name, Placement) of every stored tensor
Placed = dict[tuple[Rank, str, str], tuple[str, Placement]]


@dataclass
class MegatronSource:
    """A Megatron legacy checkpoint read: the model, its layout, what each file holds, and the
    weights as logical tensors."""

    ckpt: legacy.LegacyCheckpoint
    spec: ModelSpec
    layout: ParallelConfig
    files: list[SourceFile]
    weights: Source
    placed: Placed
    notes: list[str] = field(default_factory=list)   # what was assumed, for the user

    @property
    def ckpt_format(self) -> str:
        """Megatron-LM's name of the format read: ``torch`` (legacy) or ``torch_dist``."""
        return "torch_dist" if hasattr(self.ckpt, "dist") else "torch"

    def files_state(self) -> dict[str, tuple[int, int]]:
        """Size and modification time of every file of the iteration directory."""
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(Path(self.ckpt.iter_dir).rglob("*")) if p.is_file()}

    def check_unchanged(self, before: dict[str, tuple[int, int]]) -> None:
        """Raise CheckpointError, naming the file, if a source file changed since ``before``
        (``files_state``): replaced, rewritten or cut short while it was being converted."""
        now = self.files_state()
        for path, (size, mtime) in before.items():
            if now.get(path) != (size, mtime):
                raise CheckpointError(path, "changed while it was being converted (size or modification "
                                            "time); nothing was written: convert it again")

    def __fspath__(self) -> str:
        """Where it was read from (a converter handed a source names it as it would a path)."""
        return str(self.ckpt.iter_dir)


def open_checkpoint(load_dir: str | os.PathLike) -> legacy.LegacyCheckpoint:
    """Open a checkpoint with every model chunk under megatron-core's flat names."""
    ckpt = legacy.open_checkpoint(load_dir)
    if len({legacy_names.flatten_file(f) for f in ckpt.files.values()}) > 1:
        raise CheckpointError(ckpt.iter_dir, "some rank files hold a Megatron-LM legacy model, others megatron-core's")
    for torch_file in ckpt.files.values():
        _ungroup_experts(torch_file, ckpt.args)
    return ckpt


def _ungroup_experts(torch_file, args) -> None:
    """A GroupedMLP model's chunks seen as SequentialMLP's (``grouped_experts``)."""
    experts, ep = getattr(args, "num_experts", None) or 0, getattr(args, "expert_model_parallel_size", None) or 1
    obj = torch_file.obj if isinstance(torch_file.obj, dict) else {}
    for chunk in [k for k, v in obj.items() if isinstance(k, str) and k.startswith("model") and isinstance(v, dict)]:
        named = next((k for k in obj[chunk] if not isinstance(k, str)), None)
        if named is not None:
            raise CheckpointError(torch_file.path, f"{chunk}: a key that is not a name ({named!r})")
        try:
            ungrouped = grouped_experts.ungroup_chunk(obj[chunk], experts // ep if experts % ep == 0 else 0)
        except ValueError as e:
            raise CheckpointError(torch_file.path, f"{chunk}: {e}") from None
        if ungrouped is not None:
            obj[chunk] = ungrouped


def read_source(load_dir, true_vocab_size: int | None = None, check_manifest: bool = True,
                make_vocab_size_divisible_by: int | None = None) -> MegatronSource:
    """Open a checkpoint and describe it; nothing is read but its pickles. Where a manifest lies
    beside the files, they are checked against it first. ``true_vocab_size`` and
    ``make_vocab_size_divisible_by`` override the saved args; a divisor the args lack is inferred
    from the padded size, and said in ``notes``. A source already read is used as it is
    (ckpt_hooks.converters.lora hands the converters a merged one)."""
    if isinstance(load_dir, MegatronSource):
        return load_dir
    iter_dir, iteration = legacy.find_iteration_dir(load_dir)
    if is_dist_checkpoint(iter_dir):
        from ckpt_hooks.megatron.torch_dist import read_dist_source
        return read_dist_source(iter_dir, iteration, true_vocab_size, make_vocab_size_divisible_by, check_manifest)
    notes = []
    ckpt, spec, config, files = read_files(load_dir, true_vocab_size, check_manifest, make_vocab_size_divisible_by,
                                           notes)
    placed = place(spec, config, files)

    def handle(f: SourceFile, chunk: str, key: str, where: Placement) -> TensorView:
        torch_file = ckpt.files[f.rank]
        return TensorView(torch_file, torch_file.obj[chunk][key], where.view_shape)
    return MegatronSource(ckpt, spec, config, files, source_tensors(files, placed, handle), placed, notes)


def read_files(load_dir, true_vocab_size: int | None = None, check_manifest: bool = True,
               make_vocab_size_divisible_by: int | None = None, notes: list | None = None) \
        -> tuple[legacy.LegacyCheckpoint, ModelSpec, ParallelConfig, list[SourceFile]]:
    """``read_source`` short of placing the tensors: the checkpoint, its model, its layout and
    what each file holds (a LoRA checkpoint's adapters have no place of their own)."""
    ckpt = open_checkpoint(load_dir)
    args = ckpt.args
    spec, config = _described(args, ckpt.first.path)
    files = _source_files(ckpt, config)
    saved_manifest = manifest.read(ckpt.iter_dir) if check_manifest else None
    if saved_manifest is not None:   # first: it names a replaced or truncated file as such
        manifest.check(saved_manifest, ckpt.iter_dir, spec, config, files)
    _check_same_args(ckpt, spec, config)
    spec = settled_spec(spec, config, args, ckpt.first.path, true_vocab_size, make_vocab_size_divisible_by, notes)
    return ckpt, spec, config, files


def settled_spec(spec: ModelSpec, config: ParallelConfig, args, path, true_vocab_size: int | None,
                 make_vocab_size_divisible_by: int | None, notes: list | None) -> ModelSpec:
    """The saved model with the vocabulary overrides applied and its padding divisor settled
    (given, saved, or inferred and noted), checked to fit the saved layout."""
    if true_vocab_size is not None:
        spec = replace(spec, true_vocab_size=true_vocab_size)
    if spec.true_vocab_size is not None:
        spec = _vocab_padding(spec, config, make_vocab_size_divisible_by or
                              getattr(args, "make_vocab_size_divisible_by", None), path, notes)
    try:
        layout.check_divisible(spec, config)
    except LayoutError as e:
        raise CheckpointError(path, f"saved args: {e}") from None
    return spec


def _described(args, path) -> tuple[ModelSpec, ParallelConfig]:
    """The model and layout a rank file's ``args`` describe."""
    try:
        spec = model_spec_from_args(args)
    except AttributeError as e:
        raise CheckpointError(path, f"saved args lack a model setting ({e})") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"saved args: unreadable noop_layers ({e})") from None
    return spec, legacy.layout_of_args(args, path)


def _check_same_args(ckpt: legacy.LegacyCheckpoint, spec: ModelSpec, config: ParallelConfig) -> None:
    """Every rank file's args describe the model and layout the first one's do (a rank file of
    another run, or edited, is an error naming it)."""
    first = {**dataclasses.asdict(spec), **dataclasses.asdict(config)}
    for torch_file in ckpt.files.values():
        args = torch_file.obj.get("args") if isinstance(torch_file.obj, dict) else None
        theirs = {k: v for part in _described(args, torch_file.path) for k, v in dataclasses.asdict(part).items()}
        wrong = [f"{k} {v!r} (the first rank file's: {first[k]!r})" for k, v in theirs.items() if v != first[k]]
        if wrong:
            raise CheckpointError(torch_file.path, "args disagree with the other rank files: " + ", ".join(wrong))


def _vocab_padding(spec: ModelSpec, config: ParallelConfig, divisor: int | None, path, notes) -> ModelSpec:
    """The spec with the ``make_vocab_size_divisible_by`` that pads its vocabulary as saved: the
    one given (flag or args), else inferred (and noted), checked against the padded size."""
    if divisor is None:
        divisor = vocab_divisor(spec.true_vocab_size, spec.padded_vocab_size, config.tp)
        if divisor is not None and divisor != spec.make_vocab_size_divisible_by and notes is not None:
            notes.append(f"the saved args lack make_vocab_size_divisible_by: assumed {divisor} (vocabulary "
                         f"{spec.true_vocab_size} pads to {spec.padded_vocab_size} at TP{config.tp})")
    spec = replace(spec, make_vocab_size_divisible_by=divisor or spec.make_vocab_size_divisible_by)
    if divisor is None or spec.padded_vocab_for(config.tp) != spec.padded_vocab_size:
        raise CheckpointError(path, f"padded vocabulary {spec.padded_vocab_size} does not follow from vocabulary "
                                    f"{spec.true_vocab_size} at TP{config.tp} with "
                                    + (f"make_vocab_size_divisible_by {divisor}" if divisor else
                                       "any make_vocab_size_divisible_by")
                                    + "; check --true-vocab-size and --make-vocab-size-divisible-by")
    return spec


def _source_files(ckpt: legacy.LegacyCheckpoint, config: ParallelConfig) -> list[SourceFile]:
    files = []
    for rank, torch_file in ckpt.files.items():
        chunks = {}
        for chunk in legacy.chunk_keys(config.vpp):
            state = torch_file.obj.get(chunk)
            if not isinstance(state, dict):
                raise CheckpointError(torch_file.path, f"no model chunk '{chunk}' (args say VPP{config.vpp})")
            chunks[chunk] = {key: TensorMeta(v.shape, v.dtype) if isinstance(v, LazyTensor) else None
                             for key, v in state.items()}
            torch_file.check_complete(t for _, t in iter_lazy_tensors(state))
        files.append(SourceFile(torch_file.path, rank, chunks))
    return files


def place(spec: ModelSpec, config: ParallelConfig, files: list[SourceFile]) -> Placed:
    """Where every stored tensor lies in its logical tensor, checked against the spec."""
    chunk_keys = legacy.chunk_keys(config.vpp)
    placed: Placed = {}
    for f in files:
        if sorted(f.chunks) != sorted(chunk_keys):
            raise CheckpointError(f.path, f"holds model chunks {sorted(f.chunks)}, args imply {chunk_keys}")
        for vp, chunk in enumerate(chunk_keys):
            layers = layout.chunk_layers(spec, config, f.rank.pp, vp)
            for key, meta in f.chunks[chunk].items():
                name = names.classify(key)
                if name is None:
                    raise CheckpointError(f.path, f"{chunk}: unsupported tensor '{key}'")
                if name.local_layer is not None and name.local_layer >= len(layers):
                    raise CheckpointError(f.path, f"{chunk}: '{key}' but args give this stage {len(layers)} "
                                                  "layers; the args disagree with the tensors")
                global_layer = layers[name.local_layer] if name.local_layer is not None else None
                if global_layer in spec.noop_layers:
                    raise CheckpointError(f.path, f"{chunk}: '{key}' of layer {global_layer}, which the args "
                                                  "make a noop layer (no weights)")
                logical = names.logical_name(name, global_layer, spec.tied_embeddings,
                                             _global_expert(spec, config, f, chunk, key, name.local_expert))
                if name.rule.kind == EXTRA:
                    placed[(f.rank, chunk, key)] = logical, None
                    continue
                if meta is None:
                    raise CheckpointError(f.path, f"{chunk}: '{key}' is not a tensor")
                try:
                    where = layout.placement(name.rule, spec, config, f.rank, spec.padded_vocab_size, meta.shape)
                except LayoutError as e:
                    raise CheckpointError(f.path, f"{chunk}: '{key}': {e}; the args disagree with the tensors") from None
                if tuple(meta.shape) != where.stored_shape:
                    raise CheckpointError(
                        f.path, f"{chunk}: '{key}' has shape {tuple(meta.shape)} but the args "
                                f"({config.describe()}, {spec.describe()}) imply {where.stored_shape}")
                placed[(f.rank, chunk, key)] = logical, where
    return placed


def _global_expert(spec: ModelSpec, config: ParallelConfig, f: SourceFile, chunk: str, key: str,
                   local: int | None) -> int | None:
    """The global number of a file's local expert (None for other tensors)."""
    if local is None:
        return None
    held = layout.expert_range(spec.num_experts, config, f.rank.ep)
    if local >= len(held):
        raise CheckpointError(f.path, f"{chunk}: '{key}' but args give each expert rank {len(held)} experts; "
                                      "the args disagree with the tensors")
    return held[local]


def source_tensors(files: list[SourceFile], placed: Placed, handle: Callable, dtype=None) -> Source:
    """The logical tensors the files hold, each stored tensor a piece read through
    ``handle(file, chunk, key, placement)`` (weights, an optimizer state's views, or the
    MindSpore arrays that stand for them)."""
    tensors: Source = OrderedDict()
    for f in files:
        for chunk, keys in f.chunks.items():
            for key, meta in keys.items():
                logical, where = placed[(f.rank, chunk, key)]
                if where is None:   # _extra_state: no tensor, but the target writes the entry
                    tensors.setdefault(logical, Tensor((), None))
                    continue
                tensor = tensors.setdefault(logical, Tensor(where.logical_shape, dtype or meta.dtype))
                piece = handle(f, chunk, key, where)
                if piece is not None:   # None: this file does not hold it (another rank's optimizer does)
                    tensor.add(where.box, piece)
    return tensors


def rank_rng(src: MegatronSource, rank: Rank, dp_rank: int = 0) -> list | None:
    """The RNG state list a source rank saved (legacy rank file or torch_dist object), if any;
    torch_dist keeps one per data-parallel rank with experts (EP > 1)."""
    ckpt = src.ckpt
    if src.ckpt_format == "torch_dist":
        checkpoint, config = ckpt.dist, src.layout
        at, shape = (rank.pp, rank.tp), (config.pp, config.tp)
        if config.ep > 1:
            at, shape = (*at, dp_rank), (*shape, config.dense_dp)
        key = object_key("rng_state", at, shape)
        return checkpoint.read_object(key)[0] if key in checkpoint.objects else None
    own = ckpt.files.get(rank)
    if own is None or not isinstance(own.obj, dict) or own.obj.get("rng_state") is None:
        return None
    return own.materialize(own.obj["rng_state"])


# ---- the sink: a target layout's rank files --------------------------------------------------

def key_order(tensors: Source, spec: ModelSpec) -> tuple[list[tuple[str, str]], dict[int, list[str]]]:
    """The source's entries outside the layers as (key, logical name), and each global layer's
    key suffixes (layers may differ: dense and MoE ones), each in the order the source holds them."""
    outer, suffixes = [], {}
    for logical in tensors:
        name = names.classify(logical)
        if name.local_layer is None:
            outer.append((logical, logical))
        elif name.suffix not in suffixes.setdefault(name.local_layer, []):
            suffixes[name.local_layer].append(name.suffix)
    for layer, held in suffixes.items():
        # Routed experts in global order, where the first one is (files add theirs one after another).
        experts = [s for s in held if names.expert_of(s) is not None]
        if experts:
            at = held.index(experts[0])
            others = [s for s in held if names.expert_of(s) is None]
            suffixes[layer] = others[:at] + sorted(experts, key=names.expert_of) + others[at:]
    if spec.tied_embeddings:   # the output layer is the embedding: before its other entries, else last
        at = next((i for i, (k, _) in enumerate(outer) if k.startswith("output_layer.")), len(outer))
        outer.insert(at, (names.OUTPUT, names.EMBEDDING))
    return outer, suffixes


def target_keys(order, spec: ModelSpec, config: ParallelConfig, rank: Rank, vp: int) -> list[tuple[str, str]]:
    """(key, logical name) of each entry a target chunk holds, in megatron-core's state-dict order."""
    outer, suffixes = order
    first = layout.is_first_chunk(config, rank.pp, vp)
    last = layout.is_last_chunk(config, rank.pp, vp)
    keys = [(k, logical) for k, logical in outer if first and k.startswith("embedding.")]
    experts = layout.expert_range(spec.num_experts, config, rank.ep)
    for local, global_layer in enumerate(layout.chunk_layers(spec, config, rank.pp, vp)):
        # A layer no source file holds gets the first one's keys: then named as missing. A noop
        # layer holds none.
        held = [] if global_layer in spec.noop_layers else \
            suffixes.get(global_layer) or next(iter(suffixes.values()), [])
        # the rank's own experts, renumbered from its first
        keys += [(names.layer_key(local, s if e is None else names.with_expert(s, e - experts.start)),
                  names.layer_key(global_layer, s))
                 for s in held if (e := names.expert_of(s)) is None or e in experts]
    # A tied output layer exists only on a last stage that does not also hold the embedding.
    keys += [(k, logical) for k, logical in outer if last and k.startswith(("decoder.", "output_layer."))
             and not (k == names.OUTPUT and spec.tied_embeddings and first)]
    return keys


def plan_files(tensors: Source, spec: ModelSpec, target: ParallelConfig, *, ranks=None, dtype=None,
               where=None) -> list[TargetFile]:
    """The rank files of ``target`` (those of ``ranks`` only, if given), each tensor planned from
    ``tensors``. ``where`` names the source in errors."""
    target_vocab = spec.padded_vocab_for(target.tp)
    chunk_keys = legacy.chunk_keys(target.vpp)
    order = key_order(tensors, spec)
    plan = []
    for rank in target.file_ranks():
        if ranks is not None and rank not in ranks:
            continue
        planned = []
        for vp, chunk in enumerate(chunk_keys):
            for key, logical in target_keys(order, spec, target, rank, vp):
                tensor = tensors.get(logical)
                if tensor is None:
                    raise CheckpointError(where, f"no source file holds '{logical}'")
                rule = names.classify(key).rule
                if rule.kind == EXTRA:
                    planned.append(TargetTensor(key, None, chunk=chunk))
                    continue
                if not tensor.replicas:
                    raise CheckpointError(where, f"no source tensor for '{logical}'")
                placement = layout.placement(rule, spec, target, rank, target_vocab, tensor.shape)
                out = plan_tensor(tensor, key, placement, chunk=chunk, dtype=dtype)
                # Only vocabulary rows past the source's own are left to padding (zeros).
                if not out.complete:
                    held = placement.box.intersect(Box((0,) * len(tensor.shape), tensor.shape)) \
                        if rule.kind == VOCAB else placement.box
                    filled, needed = covered(out.copies), held.numel if held else 0
                    if filled != needed:
                        raise CheckpointError(where, f"source tensors cover {max(filled, 0)} of {needed} "
                                                     f"elements of target '{key}' (a rank file is missing tensors, "
                                                     "or holds overlapping ones)")
                planned.append(out)
        plan.append(TargetFile(rank, planned))
    return plan


def in_place(tensor: TargetTensor) -> bool:
    """Whether a tensor is best read straight into its place in the file: its reads are long."""
    return tensor.shortest_read * tensor.dtype.itemsize >= SHORT_READ


def pending_file(target: TargetFile, progress=None, grouped: bool = False) -> "OrderedDict[str, OrderedDict]":
    """{chunk: {key: PendingTensor}} for one target file: each tensor is built only when the
    writer asks for it, in its place in the file (``in_place``) or in memory, a few at a time.
    ``grouped``: the routed experts as GroupedMLP holds them (``grouped_experts``)."""
    def build(tensor, out=None):
        out = build_tensor(tensor, out=out)
        if progress is not None:
            progress.update(tensor.nbytes)
        return out

    chunks: OrderedDict[str, OrderedDict] = OrderedDict()
    planned = {}
    for tensor in target.tensors:
        entry = None if tensor.placement is None else \
            PendingTensor(tensor.placement.stored_shape, tensor.dtype, fill=lambda out, tensor=tensor: build(tensor, out),
                          in_place=in_place(tensor))
        chunks.setdefault(tensor.chunk, OrderedDict())[tensor.key] = entry
        planned[(tensor.chunk, tensor.key)] = tensor
    if not grouped:
        return chunks

    def group(chunk, entries):
        def pending(key, members):
            tensors = [planned[(chunk, m)] for m in members]
            shape = grouped_experts.grouped_shape(key, tensors[0].placement.stored_shape, len(tensors))
            return PendingTensor(shape, tensors[0].dtype,
                                 lambda: grouped_experts.group(key, [build(t) for t in tensors]))
        return grouped_experts.grouped_entries(entries, pending)
    return OrderedDict((chunk, group(chunk, entries)) for chunk, entries in chunks.items())


def write_manifest(load_dir, checksums: dict | None = None) -> Path:
    """Describe a complete checkpoint iteration in its manifest (see megatron.manifest), with
    the CRC-32 of each record where the writer computed them (``checksums``: path -> record -> crc)."""
    src = read_source(load_dir, check_manifest=False)
    if src.ckpt_format == "torch_dist":
        built = manifest.build_dist(src.ckpt.iter_dir, src.ckpt.iteration, src.spec, src.layout, checksums)
    else:
        built = manifest.build(src.ckpt.iter_dir, src.ckpt.iteration, src.spec, src.layout, src.files, src.placed,
                               checksums)
    return manifest.write(built, src.ckpt.iter_dir)


def _reuse(root: Path, iteration, rank: Rank, config: ParallelConfig, optimizer: bool,
           checksums: dict) -> list[Path] | None:
    """This rank's files, where an interrupted run completed them all (their CRC-32s then kept)."""
    directory = root / legacy.iteration_dir_name(iteration) / legacy.rank_dir_name(rank, config)
    paths = [directory / legacy.MODEL_FILE] + ([directory / legacy.OPTIMIZER_FILE] if optimizer else [])
    found = {str(path): legacy.completed_rank_file(path) for path in paths}
    if any(crcs is None for crcs in found.values()):
        return None
    checksums.update(found)
    return paths


def write_checkpoint(save_dir, iteration: int | None, plan: list[TargetFile], config: ParallelConfig,
                     rank_state: Callable[[TargetFile, object], dict],
                     optimizer_state: Callable[[TargetFile, object], dict | None] | None, total: int, *,
                     workers: int, quiet: bool, label: str, written: Callable | None = None,
                     finish: Callable[[Path], None] | None = None, resume: bool = False, identity: str = "",
                     reused: list | None = None) -> float:
    """Megatron's writer sequence, atomically: a staged directory, every rank's
    ``model_optim_rng.pt`` (``rank_state(file, progress)``) and ``distrib_optim.pt``
    (``optimizer_state``), then the tracker and the manifest, then the rename into place.
    ``written(root, paths)`` is told of each rank's files (MindSpeed's md5 list); ``finish(root)``
    adds files of its own before the tracker (HF's tokenizer). ``resume``: continue the staged
    directory an interrupted run of the same ``identity`` left, keeping its complete rank files
    (CRC-checked; their ranks go to ``reused``). Returns the data phase's seconds."""
    checksums: dict[str, dict[str, int]] = {}   # file -> record -> CRC-32, as written
    kept_ranks: list = []

    def write(root: Path, target: TargetFile, progress) -> None:
        rank = target.rank
        kept = _reuse(root, iteration, rank, config, optimizer_state is not None, checksums) if resume else None
        if kept is not None:
            kept_ranks.append(rank)
            if written is not None:
                written(root, kept)
            progress.update(target.nbytes)
            return
        paths = [legacy.save_rank_file(root, iteration, rank, config, rank_state(target, progress),
                                       checksums=checksums)]
        state = optimizer_state(target, progress) if optimizer_state is not None else None
        if state is not None:
            paths.append(legacy.save_rank_file(root, iteration, rank, config, state,
                                               legacy.OPTIMIZER_FILE, checksums))
        if written is not None:
            written(root, paths)

    def publish(root: Path, every_ranks: list[tuple[dict, list]]) -> None:   # every file is written
        for crcs, _ in every_ranks:
            checksums.update(crcs)
        kept_ranks[:] = [rank for _, kept in every_ranks for rank in kept]   # for the lead's report
        if finish is not None:
            finish(root)
        legacy.write_tracker(root, iteration)
        write_manifest(root, checksums)
    # under torchrun, this process writes its share of the files
    seconds = write_shared(save_dir, plan, write, total, workers=workers, quiet=quiet, label=label, resume=resume,
                           identity=identity, result=lambda: (checksums, kept_ranks), publish=publish)
    if reused is not None:
        reused.extend(kept_ranks)
    return seconds
