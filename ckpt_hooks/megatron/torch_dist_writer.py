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
from ckpt_hooks.algebra.layout import chunk_layers
from ckpt_hooks.engine.execute import build_tensor
from ckpt_hooks.engine.plan import TargetFile, restrict
from ckpt_hooks.engine.ranks import Ranks
from ckpt_hooks.engine.run import run
from ckpt_hooks.engine.source import STATES
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.formats import torch_dist as dist
from ckpt_hooks.formats.atomic import staged_directory
from ckpt_hooks.megatron.checkpoint import write_manifest
from ckpt_hooks.megatron.optimizer import target_maps
from ckpt_hooks.megatron.torch_dist import (CONTENT_METADATA, LAYERS, bucket_key, dist_suffix, from_logical, mp_rank,
                                            optimizer_object)


def _weight_items(target: TargetFile, spec, config, seen: set) -> list[dist.Item]:
    """The weight chunks of one target rank not already written by a lower rank."""
    items = []
    for tensor in target.tensors:
        if tensor.placement is None:      # _extra_state
            name = names.classify(tensor.key)
            if name.local_layer is None:
                key = dist.object_key(tensor.key)
            else:
                layer = _global_layer(spec, config, target.rank.pp, tensor.chunk, name.local_layer)
                key = dist.object_key(LAYERS + dist_suffix(name.suffix), (layer,), (spec.num_layers,))
            if key not in seen:
                seen.add(key)
                items.append(dist.Item(key, obj=[None]))
            continue
        if tensor.key == names.OUTPUT and spec.tied_embeddings:
            continue   # saved once, as the embedding
        name = names.classify(tensor.key)
        stacked = name.local_layer is not None
        lengths = tensor.placement.box.lengths
        # A fused fc1 is saved as its gate and up halves, each a chunk of its own.
        parts = [restrict(tensor, (half,) + (0,) * (len(lengths) - 1), (1,) + lengths[1:])
                 for half in range(lengths[0])] if name.rule.fused else [tensor]
        for part in parts:
            offsets, sizes = from_logical(name.rule, spec, part.placement.box)
            shape = _saved_shape(name.rule, spec, tensor.placement.logical_shape)
            if stacked:
                layer = _global_layer(spec, config, target.rank.pp, tensor.chunk, name.local_layer)
                key, offsets, sizes, shape = (LAYERS + dist_suffix(name.suffix), (layer, *offsets), (1, *sizes),
                                              (spec.num_layers, *shape))
            else:
                key = tensor.key
            if (key, offsets) in seen:
                continue
            seen.add((key, offsets))
            items.append(dist.Item(key, tuple(offsets), tuple(shape), tuple(sizes), tensor.dtype,
                                   produce=_builder(part, tuple(sizes))))
    return items


def _global_layer(spec, config, pp_rank, chunk, local) -> int:
    return chunk_layers(spec, config, pp_rank, legacy.chunk_keys(config.vpp).index(chunk))[local]


def _saved_shape(rule, spec, logical_shape) -> tuple[int, ...]:
    """The per-layer saved shape: a fused logical (S, F, ...) as (S x F, ...)."""
    if rule.fused:
        return (logical_shape[0] * logical_shape[1], *logical_shape[2:])
    return tuple(logical_shape)


def _builder(tensor, sizes):
    return lambda: build_tensor(tensor).reshape(sizes)


def _optimizer_items(target: TargetFile, plans: dict[str, TargetFile], grad_dtypes, param_groups, spec, config,
                     args, progress) -> list[dist.Item]:
    maps, chunk_keys = target_maps(target, grad_dtypes, spec, config, args)
    indexed = {state: {(t.chunk, t.key): t for t in plans[state].tensors} for state in STATES}
    group = mp_rank(target.rank, config)
    dtypes = [(getattr(torch, m.param_dtype), getattr(torch, m.grad_dtype)) for m in maps]
    items = [dist.Item(optimizer_object(group, "optimizer"), obj=[param_groups["optimizer"]]),
             dist.Item(optimizer_object(group, "per_bucket_numel"),
                       obj=[[{d: [end - start for start, end in m.bucket_indices]} for d, m in zip(dtypes, maps)]]),
             dist.Item(optimizer_object(group, "per_bucket_numel_unpadded"),
                       obj=[[{d: list(m.per_bucket_numel_unpadded)} for d, m in zip(dtypes, maps)]])]
    for index, buffer_map in enumerate(maps):
        for bucket, numel in enumerate(buffer_map.per_bucket_numel_unpadded):
            slots = [s for s in buffer_map.params if s.bucket == bucket]
            begin = buffer_map.bucket_indices[bucket][0]
            for state in STATES:
                def produce(slots=slots, numel=numel, begin=begin, plan=indexed[state], chunk=buffer_map.chunk):
                    flat = torch.zeros(numel, dtype=torch.float32)
                    for slot in slots:
                        tensor = plan[(chunk_keys[chunk], slot.name)]
                        flat[slot.start - begin:slot.end - begin] = build_tensor(tensor).reshape(-1)
                        if progress is not None:
                            progress.update(tensor.nbytes)
                    return flat
                key = bucket_key(group, index, buffer_map.param_dtype, buffer_map.grad_dtype, bucket, state)
                items.append(dist.Item(key, (0,), (numel,), (numel,), torch.float32, produce=produce))
    return items


def write_dist_checkpoint(save_dir, iteration, weights: list[TargetFile], optimizer_plans: dict | None,
                          spec, config, args, common: dict, rng_of, grad_dtypes=None, *, total: int, workers: int,
                          quiet: bool, label: str, finish=None) -> float:
    """Write ``weights`` (and ``optimizer_plans``: {state: {rank: TargetFile}}; ``total`` bytes in
    all) as a torch_dist checkpoint in ``save_dir``; ``common`` goes to common.pt (args and
    content metadata are set here); ``rng_of(rank)`` is the RNG state list for a target rank (or
    None); ``finish(root)`` runs on rank 0 once every record is written, before the index.
    Returns the data phase's seconds."""
    ranks = Ranks.from_env()   # under torchrun, this process writes its share of the files
    seen: set = set()
    by_rank = {}
    for target in weights:   # in rank order: the lowest rank writes a replicated chunk
        by_rank[target.rank] = _weight_items(target, spec, config, seen)
    lock = threading.Lock()
    written: list = []
    mine = ranks.share(weights)
    with staged_directory(save_dir, ranks=ranks) as root:
        iter_dir = root / legacy.iteration_dir_name(iteration)
        iter_dir.mkdir(parents=True, exist_ok=True)

        def write(target: TargetFile, progress) -> None:
            items = [dataclasses.replace(i, produce=_reporting(i.produce, progress)) for i in by_rank[target.rank]]
            if optimizer_plans is not None:
                items += _optimizer_items(target, {s: optimizer_plans[s][target.rank] for s in STATES}, grad_dtypes,
                                          common["optimizer_param_groups"], spec, config, args, progress)
            rng = rng_of(target.rank)
            if rng is not None:
                items.append(dist.Item(dist.object_key("rng_state", (target.rank.pp, target.rank.tp),
                                                       (config.pp, config.tp)), obj=[rng]))
            records = dist.write_records(iter_dir / f"__{mp_rank(target.rank, config)}_0.distcp", items)
            with lock:
                written.extend(records)

        share = total * sum(f.nbytes for f in mine) // max(1, sum(f.nbytes for f in weights))
        seconds = run(mine, write, share, workers=workers, quiet=quiet or not ranks.lead, label=label)
        # What the index needs of each record (not its builder), from every rank.
        described = [(dataclasses.replace(item, produce=item.produce is not None or None, obj=None), record)
                     for item, record in written]
        everything = [entry for part in ranks.gather(described) for entry in part]
        if ranks.lead:   # every record is written: the index, the common state, then publish
            if finish is not None:
                finish(root)
            everything.sort(key=lambda entry: (entry[1].relative_path, entry[1].offset))
            dist.write_metadata(iter_dir, everything)
            saved = {k: v for k, v in common.items() if k != "optimizer_param_groups"}
            dist.write_common(iter_dir, {**saved, "args": args, "content_metadata": dict(CONTENT_METADATA),
                                         **({"optimizer": {"param_state_sharding_type": "dp_reshardable"}}
                                            if optimizer_plans is not None else {})})
            legacy.write_tracker(root, iteration)
            write_manifest(root)
    return seconds


def _reporting(produce, progress):
    """A weight chunk's builder, reporting to the run's progress bar."""
    if produce is None:
        return None

    def build():
        out = produce()
        progress.update(out.numel() * out.element_size())
        return out
    return build
