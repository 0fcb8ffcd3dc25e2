"""Save hook: what ckpt_hooks writes beside a Megatron legacy checkpoint, and ``save`` for
trainers built directly on megatron-core.

Beside the trainer's own files, which stay byte for byte as they were:

    iter_XXXXXXX/ckpt_hooks_manifest.json      what every file holds (ckpt_hooks.engine.manifest), global rank 0
    mp_rank_TT_PPP[_EEE]/param_map.json        recorded BufferMaps of this file rank (its writer's)
    mp_rank_TT_PPP/param_map/param_map_buffer{b}_dp{d}tp{t}pp{p}vpp{v}.json   MindSpeed-Core-MS,
                                               one per DP rank, written by that rank

No communication beyond the save's own: every rank records its own live buffers, and rank 0
writes the manifest once the save's closing barrier says every file is complete.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.megatron.load import distributed_optimizers, running_layout, unwrap
from ckpt_hooks.formats.atomic import atomic_write
from ckpt_hooks.algebra.param_map import BufferMap, mindspeed_file_name, mindspeed_json, record
from ckpt_hooks.algebra.spec import Rank
from ckpt_hooks.megatron.torch_dist import CONTENT_METADATA, recorded_maps_dir


def record_param_maps(optimizer) -> list[BufferMap]:
    """The live param_maps of a (possibly chained) DistributedOptimizer, in its buffer order."""
    maps = []
    for dopt in distributed_optimizers(optimizer):
        for chunk, buffers in dopt.per_model_buffers.items():
            names = {param: name for name, param in unwrap(dopt.model_chunks[chunk]).named_parameters()}
            maps += [record(buffer, names, chunk=chunk) for buffer in buffers]
    return maps


def _write_json(path: Path, data) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(data).encode())


def write_param_maps(optimizer, rank_dir, rank: Rank, dp_rank: int, writer: bool | None = None) -> None:
    """This rank's share of the param_map files of one checkpoint rank directory: the MindSpeed
    files of its DP rank and, if it is the directory's ``writer`` (default: DP rank 0), the
    recorded maps."""
    rank_dir = Path(rank_dir)
    rank_dir.mkdir(parents=True, exist_ok=True)
    maps = record_param_maps(optimizer)
    if dp_rank == 0 if writer is None else writer:
        _write_json(rank_dir / legacy.RECORDED_MAP, [m.to_json() for m in maps])
    (rank_dir / legacy.MINDSPEED_DIR).mkdir(parents=True, exist_ok=True)
    per_chunk: dict[int, int] = {}
    for buffer in maps:
        index = per_chunk.get(buffer.chunk, 0)
        per_chunk[buffer.chunk] = index + 1
        name = mindspeed_file_name(index, dp_rank, rank.tp, rank.pp, buffer.chunk)
        _write_json(rank_dir / legacy.MINDSPEED_DIR / name, mindspeed_json(buffer))


def args_from_model(model_chunks) -> argparse.Namespace:
    """The Megatron-LM ``args`` a legacy checkpoint needs to describe itself, for a trainer that
    has none: read from the running model's TransformerConfig and megatron-core's parallel state."""
    model = unwrap(model_chunks[0])
    config = model.config
    layout, _ = running_layout(model_chunks)
    groups = config.num_query_groups or config.num_attention_heads
    first, last = config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage
    return argparse.Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, group_query_attention=groups != config.num_attention_heads,
        num_query_groups=groups, kv_channels=config.kv_channels, padded_vocab_size=model.vocab_size,
        swiglu=config.gated_linear_unit, add_bias_linear=config.add_bias_linear, add_qkv_bias=config.add_qkv_bias,
        normalization=config.normalization, norm_epsilon=config.layernorm_epsilon,
        apply_layernorm_1p=config.layernorm_zero_centered_gamma, qk_layernorm=config.qk_layernorm,
        position_embedding_type=model.position_embedding_type,
        add_position_embedding=model.position_embedding_type == "learned_absolute",
        rotary_base=getattr(model, "rotary_base", 10000), rotary_percent=getattr(model, "rotary_percent", 1.0),
        rotary_interleaved=config.rotary_interleaved, max_position_embeddings=model.max_sequence_length,
        untie_embeddings_and_output_weights=not model.share_embeddings_and_output_weights,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        decoder_first_pipeline_num_layers=first if layout.pp > 1 else None,
        decoder_last_pipeline_num_layers=last if layout.pp > 1 else None,
        data_parallel_size=layout.dp, params_dtype=config.params_dtype, ckpt_format="torch",
        transformer_impl=_transformer_impl(model),
        use_distributed_optimizer=True, **_moe_args(config, layout), **_latent_args(config))


def _latent_args(config) -> dict:
    """Megatron-LM's Multi-Latent Attention arguments, from the running TransformerConfig."""
    if not getattr(config, "multi_latent_attention", False):
        return {}
    return dict(multi_latent_attention=True, q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank,
                qk_head_dim=config.qk_head_dim, qk_pos_emb_head_dim=config.qk_pos_emb_head_dim,
                v_head_dim=config.v_head_dim, rope_type=config.rope_type)


def _moe_args(config, layout) -> dict:
    """Megatron-LM's mixture-of-experts arguments, from the running TransformerConfig."""
    if not config.num_moe_experts:
        return {}
    return dict(num_experts=config.num_moe_experts, moe_ffn_hidden_size=config.moe_ffn_hidden_size,
                moe_router_topk=config.moe_router_topk, moe_layer_freq=config.moe_layer_freq,
                moe_shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
                moe_shared_expert_gate=config.moe_shared_expert_gate,
                moe_router_pre_softmax=config.moe_router_pre_softmax,
                moe_token_dispatcher_type=config.moe_token_dispatcher_type, moe_grouped_gemm=config.moe_grouped_gemm,
                expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.size("etp"),
                sequence_parallel=config.sequence_parallel)


def _transformer_impl(model) -> str:
    """"local" when the layers have norms of their own (the local spec), else Transformer Engine's
    (the norms fused into linear_qkv / linear_fc1): what torch_dist's shared key names hide."""
    layers = getattr(getattr(model, "decoder", None), "layers", None) or []
    norm = getattr(layers[0], "input_layernorm", None) if len(layers) else None
    return "transformer_engine" if norm is None or type(norm).__name__ == "IdentityOp" else "local"


def rng_state() -> list[dict]:
    """This rank's generators, as Megatron-LM's ``get_rng_state`` saves them (one DP entry)."""
    from megatron.core import tensor_parallel

    return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(),
             "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}]


def save(model_chunks, optimizer, save_dir, iteration: int, *, scheduler=None, args=None,
         num_floating_point_operations_so_far: int = 0, ckpt_format: str = "torch") -> Path:
    """Save a running megatron-core job (model chunks in DDP, the DistributedOptimizer) as
    Megatron-LM's ``save_checkpoint`` does with ``--ckpt-format torch`` (plus the param_maps and
    the manifest) or ``torch_dist`` (megatron-core's ``dist_checkpointing.save``, dp_reshardable
    optimizer state, plus each rank's param_map and the manifest), ``--use-distributed-optimizer``.
    Collective: call it on every rank. ``args`` are Megatron-LM's (saved as they are); without
    them, ``args_from_model`` describes the model. Returns the iteration directory."""
    from megatron.core import parallel_state as ps

    if args is None:
        args = args_from_model(model_chunks)
        args.ckpt_format = ckpt_format
    layout, rank = running_layout(model_chunks)
    root = Path(save_dir)
    iter_dir = root / legacy.iteration_dir_name(iteration)
    # A file rank's writer is its first expert-data-parallel replica (without experts: DP rank 0).
    writer = ps.get_expert_data_parallel_rank() == 0
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    if ckpt_format == "torch_dist":
        _save_torch_dist(model_chunks, optimizer, iter_dir, iteration, scheduler, args,
                         num_floating_point_operations_so_far)
        write_param_maps(optimizer, recorded_maps_dir(iter_dir, rank, layout), rank, dp_rank, writer)
        return _publish(root, iter_dir, iteration)
    if ckpt_format != "torch":
        raise ValueError(f"unknown checkpoint format {ckpt_format!r} (torch or torch_dist)")
    rank_dir = iter_dir / legacy.rank_dir_name(rank, layout)
    rank_dir.mkdir(parents=True, exist_ok=True)
    optimizer.save_parameter_state(str(rank_dir / legacy.OPTIMIZER_FILE))  # collective over DP
    write_param_maps(optimizer, rank_dir, rank, dp_rank, writer)
    if writer:
        state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration}
        for key, chunk in zip(legacy.chunk_keys(layout.vpp), model_chunks):
            state[key] = chunk.state_dict_for_save_checkpoint()
        state["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            state["opt_param_scheduler"] = scheduler.state_dict()
        state["rng_state"] = rng_state()
        state["num_floating_point_operations_so_far"] = num_floating_point_operations_so_far
        with atomic_write(rank_dir / legacy.MODEL_FILE) as f:
            torch.save(state, f)
    return _publish(root, iter_dir, iteration)


def _publish(root: Path, iter_dir: Path, iteration: int) -> Path:
    """Once every rank has written its files: rank 0's manifest, then the tracker naming the
    iteration. Collective."""
    import torch.distributed as dist

    dist.barrier()
    if dist.get_rank() == 0:
        write_manifest_or_warn(iter_dir)      # before the tracker names the iteration
        legacy.write_tracker(root, iteration)
    dist.barrier()
    return iter_dir


def _save_torch_dist(model_chunks, optimizer, iter_dir: Path, iteration: int, scheduler, args, flops: int) -> None:
    """megatron-core's dist_checkpointing.save of the state Megatron-LM's generate_state_dict
    builds for --ckpt-format torch_dist (its default dp_reshardable optimizer state)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    content = dict(CONTENT_METADATA)
    dp_group = ps.get_data_parallel_group(with_context_parallel=True)
    metadata = {**content, "dp_cp_group": dp_group}
    state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration}
    for key, chunk in zip(legacy.chunk_keys(len(model_chunks)), model_chunks):
        state[key] = unwrap(chunk).sharded_state_dict(metadata=metadata)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=metadata)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size())
    at = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    if ps.get_expert_model_parallel_world_size() > 1:   # Megatron-LM then shards the RNG by DP too
        state["rng_state"] = ShardedObject("rng_state", rng_state(), (*shape, dp_group.size()), (*at, dp_rank),
                                           replica_id=0)
    else:
        state["rng_state"] = ShardedObject("rng_state", rng_state(), shape, at, replica_id=dp_rank)
    state["num_floating_point_operations_so_far"] = flops
    if dist.get_rank() == 0:
        iter_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"), dp_group)
    dist_checkpointing.save(state, str(iter_dir), strategy, validate_access_integrity=True, content_metadata=content)


def write_manifest_or_warn(iter_dir) -> None:
    """The iteration's manifest. Failing to write it is a warning, not an error: the checkpoint
    itself is complete, and the other ranks must not be left waiting in the next collective."""
    from ckpt_hooks.megatron.checkpoint import write_manifest

    try:
        write_manifest(iter_dir)
    except Exception as e:  # noqa: BLE001 — a hook must not end a training run
        print(f"ckpt_hooks: warning: no manifest for {iter_dir}: {e}", file=sys.stderr, flush=True)
