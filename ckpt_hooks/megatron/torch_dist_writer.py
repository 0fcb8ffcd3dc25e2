"""The torch_dist Sink: a planned target layout written as Megatron's distributed checkpoint.

Each model-parallel rank of the target layout becomes one ``__{mp rank}_0.distcp`` file:

* its weights, per layer (a SwiGLU fc1 as its gate and up halves), under the saved keys with
  the layer on a leading axis; a tensor replicated over TP is written by the lowest TP rank;
* its ``dp_reshardable`` optimizer buckets (``optimizer.distributed.dp_group_idx_{mp rank}...``),
  each one chunk packed from its parameters' planned states at the places megatron-core's
  buffer rules give them, and the ``optimizer`` / ``per_bucket_numel(_unpadded)`` objects;
* its RNG state object, where the caller has one for it (the source rank's, at an unchanged TP·PP).

Then ``.metadata`` (the index of every record), ``common.pt``, ``metadata.json``, the tracker
and the manifest; all in a staged directory renamed into place, so that megatron-core's
``dist_checkpointing.load`` reads it at the target layout.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from ckpt_hooks.algebra import names
from ckpt_hooks.algebra.layout import chunk_layers, expert_range
from ckpt_hooks.engine.execute import build_tensor
from ckpt_hooks.engine.plan import TargetFile, restrict
from ckpt_hooks.engine.ranks import write_shared
from ckpt_hooks.engine.source import STATES
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.formats import torch_dist as dist
from ckpt_hooks.formats.torch_save import PendingTensor
from ckpt_hooks.megatron.checkpoint import in_place, write_manifest
from ckpt_hooks.megatron import grouped_experts
from ckpt_hooks.megatron.optimizer import local_experts, target_maps
from ckpt_hooks.megatron.torch_dist import (CONTENT_METADATA, LAYERS, bucket_key, dist_suffix, distcp_name,
                                            from_logical, optimizer_group, optimizer_object, optimizers_of)


def per_layer_keys(args) -> bool:
    """Whether megatron-core saves each layer under keys of its own ("non-homogeneous" layers:
    dense and MoE layers mixed by ``--moe-layer-freq``) rather than stacked on a layer axis."""
    freq = getattr(args, "moe_layer_freq", 1) if getattr(args, "num_experts", None) else 1
    return isinstance(freq, list) or freq > 1


def _saved_place(name, spec, config, rank, chunk: str, per_layer: bool) -> tuple[str, tuple, tuple]:
    """The saved key of a target tensor, and the offsets and sizes of its leading axes: the
    global layer (stacked keys) and the global expert (routed experts)."""
    if name.local_layer is None:
        return name.suffix, (), ()
    layer = chunk_layers(spec, config, rank.pp, legacy.chunk_keys(config.vpp).index(chunk))[name.local_layer]
    suffix = dist_suffix(name.suffix, spec)
    key, offsets, shape = (names.layer_key(layer, suffix), (), ()) if per_layer else \
        (LAYERS + suffix, (layer,), (spec.num_layers,))
    if name.local_expert is not None:
        offsets += (expert_range(spec.num_experts, config, rank.ep)[name.local_expert],)
        shape += (spec.num_experts,)
    return key, offsets, shape


def _weight_items(target: TargetFile, spec, config, seen: set, per_layer: bool) -> list[dist.Item]:
    """The weight chunks of one target rank not already written by a lower rank."""
    items = []
    for tensor in target.tensors:
        name = names.classify(tensor.key)
        key, leading, outer = _saved_place(name, spec, config, target.rank, tensor.chunk, per_layer)
        if tensor.placement is None:      # _extra_state
            key = dist.object_key(key, leading or (0,), outer or (1,))
            if key not in seen:
                seen.add(key)
                items.append(dist.Item(key, obj=[None]))
            continue
        if tensor.key == names.OUTPUT and spec.tied_embeddings:
            continue   # saved once, as the embedding
        lengths = tensor.placement.box.lengths
        # A fused fc1 is saved as its gate and up halves, each a chunk of its own.
        parts = [restrict(tensor, (half,) + (0,) * (len(lengths) - 1), (1,) + lengths[1:])
                 for half in range(lengths[0])] if name.rule.fused else [tensor]
        for part in parts:
            offsets, sizes = from_logical(name.rule, spec, part.placement.box)
            offsets, sizes = (*leading, *offsets), (*(1,) * len(leading), *sizes)
            if (key, offsets) in seen:
                continue
            seen.add((key, offsets))
            shape = (*outer, *_saved_shape(name.rule, tensor.placement.logical_shape))
            items.append(dist.Item(key, offsets, shape, sizes, tensor.dtype, pending=_builder(part, sizes)))
    return items


def _saved_shape(rule, logical_shape) -> tuple[int, ...]:
    """The per-layer saved shape: a fused logical (S, F, ...) as (S x F, ...)."""
    if rule.fused:
        return (logical_shape[0] * logical_shape[1], *logical_shape[2:])
    return tuple(logical_shape)


def _builder(tensor, sizes) -> PendingTensor:
    return PendingTensor(sizes, tensor.dtype, fill=lambda out: build_tensor(tensor, out=out.view(
        tensor.placement.stored_shape)), in_place=in_place(tensor))


def _optimizer_items(target: TargetFile, plans: dict[str, TargetFile], grad_dtypes, param_groups, spec, config,
                     args, progress) -> list[dist.Item]:
    """A target rank's dp_reshardable state of each distributed optimizer it saves (a chained
    optimizer's dense state only on dense data-parallel rank 0's file ranks)."""
    maps, chunk_keys = target_maps(target, grad_dtypes, spec, config, args)
    indexed = {state: {(t.chunk, t.key): t for t in plans[state].tensors} for state in STATES}
    groups = param_groups if isinstance(param_groups, list) else [param_groups]
    items = []
    for (expert, prefix), saved_groups in zip(optimizers_of(config), groups):
        if not expert and not config.holds_dense_optimizer(target.rank):
            continue
        group = optimizer_group(target.rank, config, expert)
        kind = [m for m in maps if m.expert == expert]
        dtypes = [(getattr(torch, m.param_dtype), getattr(torch, m.grad_dtype)) for m in kind]
        items += [dist.Item(optimizer_object(group, "optimizer", prefix), obj=[saved_groups["optimizer"]]),
                  dist.Item(optimizer_object(group, "per_bucket_numel", prefix),
                            obj=[[{d: [end - start for start, end in m.bucket_indices]} for d, m in zip(dtypes, kind)]]),
                  dist.Item(optimizer_object(group, "per_bucket_numel_unpadded", prefix),
                            obj=[[{d: list(m.per_bucket_numel_unpadded)} for d, m in zip(dtypes, kind)]])]
        for index, buffer_map in enumerate(kind):
            items += _bucket_items(buffer_map, group, index, prefix, chunk_keys, indexed,
                                   local_experts(spec, config), progress)
    return items


def _bucket_items(buffer_map, group: int, index: int, prefix: str, chunk_keys, indexed, experts: int,
                  progress) -> list[dist.Item]:
    """One buffer's flat buckets, each state packed from its parameters' planned tensors when written."""
    items = []
    for bucket, numel in enumerate(buffer_map.per_bucket_numel_unpadded):
        slots = [s for s in grouped_experts.unpacked(buffer_map, experts) if s.bucket == bucket]
        begin = buffer_map.bucket_indices[bucket][0]
        for state in STATES:
            def fill(flat, slots=slots, begin=begin, plan=indexed[state], chunk=buffer_map.chunk):   # zeroed
                for slot in slots:
                    tensor = plan[(chunk_keys[chunk], slot.name)]
                    place = flat[slot.start - begin:slot.end - begin]
                    if slot.transposed:
                        place.copy_(grouped_experts.packed(slot, build_tensor(tensor)))
                    else:   # straight into the file
                        build_tensor(tensor, out=place.view(tensor.placement.stored_shape))
                    if progress is not None:
                        progress.update(tensor.nbytes)
            key = bucket_key(group, index, buffer_map.param_dtype, buffer_map.grad_dtype, bucket, state, prefix)
            items.append(dist.Item(key, (0,), (numel,), (numel,), torch.float32,
                                   pending=PendingTensor((numel,), torch.float32, fill=fill)))
    return items


def write_dist_checkpoint(save_dir, iteration, weights: list[TargetFile], optimizer_plans: dict | None,
                          spec, config, args, common: dict, rng_of, grad_dtypes=None, *, total: int, workers: int,
                          quiet: bool, label: str, finish=None, resume: bool = False, identity: str = "",
                          reused: list | None = None) -> float:
    """Write ``weights`` (and ``optimizer_plans``: {state: {rank: TargetFile}}; ``total`` bytes in
    all) as a torch_dist checkpoint in ``save_dir``; ``common`` goes to common.pt (args and
    content metadata are set here); ``rng_of(rank)`` is the RNG state list for a target rank (or
    None); ``finish(root)`` runs on rank 0 once every record is written, before the index.
    ``resume``: continue the staged directory an interrupted run of the same ``identity`` left,
    keeping its complete .distcp files (CRC-checked; their ranks go to ``reused``). Returns the
    data phase's seconds."""
    seen: set = set()
    by_rank = {}
    for target in weights:   # in rank order: the lowest rank writes a replicated chunk
        by_rank[target.rank] = _weight_items(target, spec, config, seen, per_layer_keys(args))
    lock = threading.Lock()
    written: list = []
    kept_ranks: list = []
    checksums: dict[str, dict[str, int]] = {}   # .distcp file -> its records' CRC-32s, for the manifest
    iter_name = legacy.iteration_dir_name(iteration)

    def write(root, target: TargetFile, progress) -> None:
        items = [dataclasses.replace(i, pending=_reporting(i.pending, progress)) for i in by_rank[target.rank]]
        if optimizer_plans is not None:
            items += _optimizer_items(target, {s: optimizer_plans[s][target.rank] for s in STATES}, grad_dtypes,
                                      common["optimizer_param_groups"], spec, config, args, progress)
        rng = rng_of(target.rank)
        if rng is not None:
            items.append(dist.Item(dist.object_key("rng_state", (target.rank.pp, target.rank.tp),
                                                   (config.pp, config.tp)), obj=[rng]))
        (root / iter_name).mkdir(exist_ok=True)
        path = root / iter_name / distcp_name(target.rank, config)
        records = dist.completed_records(path, items, checksums) if resume else None
        if records is not None:
            progress.update(target.nbytes)
            kept_ranks.append(target.rank)
        else:
            records = dist.write_records(path, items, checksums)
        with lock:
            written.extend(records)

    def described() -> list:
        """What the index needs of each record this rank wrote (not its builder)."""
        return [(dataclasses.replace(item, obj=None, pending=None if item.pending is None else
                                     PendingTensor(item.sizes, item.dtype)), record)
                for item, record in written]

    def publish(root, every_ranks: list[tuple[list, list, dict]]) -> None:   # every record is written: the index, the common state
        iter_dir = root / iter_name
        iter_dir.mkdir(exist_ok=True)
        if finish is not None:
            finish(root)
        kept_ranks[:] = [rank for _, kept, _ in every_ranks for rank in kept]   # for the lead's report
        for _, _, crcs in every_ranks:
            checksums.update(crcs)
        everything = sorted((entry for part, _, _ in every_ranks for entry in part),
                            key=lambda entry: (entry[1].relative_path, entry[1].offset))
        dist.write_metadata(iter_dir, everything)
        saved = {k: v for k, v in common.items() if k != "optimizer_param_groups"}
        if optimizer_plans is not None:   # as megatron-core's (each of a chain's under its index)
            # One dict per optimizer: the pickle keeps shared objects shared, and megatron-core's
            # load merges each optimizer's state into its own.
            saved["optimizer"] = {i: {"param_state_sharding_type": "dp_reshardable"}
                                  for i in range(len(optimizers_of(config)))}
            if config.ep == 1:
                saved["optimizer"] = saved["optimizer"][0]
        dist.write_common(iter_dir, {**saved, "args": args, "content_metadata": dict(CONTENT_METADATA)})
        legacy.write_tracker(root, iteration)
        write_manifest(root, checksums)
    # under torchrun, this process writes its share of the files
    seconds = write_shared(save_dir, weights, write, total, workers=workers, quiet=quiet, label=label,
                           resume=resume, identity=identity, result=lambda: (described(), kept_ranks, checksums),
                           publish=publish)
    if reused is not None:
        reused.extend(kept_ranks)
    return seconds


def _reporting(pending: PendingTensor | None, progress) -> PendingTensor | None:
    """A weight chunk, reporting to the run's progress bar when made."""
    if pending is None:
        return None

    def fill(out):
        pending.fill(out)
        progress.update(out.numel() * out.element_size())
    return PendingTensor(pending.shape, pending.dtype, fill=fill)
