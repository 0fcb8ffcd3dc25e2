"""torchrun entry point: `train`, `verify`, `resume` and `logits` jobs on a tiny megatron-core GPT (CPU, gloo).

    torchrun --nproc-per-node 4 -m tests.harness.megatron_run JOBS.json   (from the repo root)
    torchrun --nproc-per-node 4 tests/harness/megatron_run.py JOBS.json   (by path)

JOBS.json is a list of jobs, run one after the other in one process group; model parallel
state is destroyed and re-initialised between jobs.  The schema is in tests/harness/__init__.py.
"""

import argparse
import dataclasses
import gc
import importlib
import json
import os
import random
import sys
import time
import traceback
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # so that running by path works

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.harness import cpu_shim  # noqa: E402
from ckpt_hooks.algebra.spec import ParallelConfig, Rank  # noqa: E402
from tests.harness.spec import VOCAB_KEYS, layout_spec, model_spec, padded_vocab, true_vocab  # noqa: E402

# Patch before megatron-core modules are imported and look anything up in torch.cuda.
cpu_shim.install()

from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.dist_checkpointing.dict_utils import nested_values  # noqa: E402
from megatron.core.dist_checkpointing.serialization import (  # noqa: E402
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (  # noqa: E402
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.mapping import (  # noqa: E402
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    is_main_replica,
)
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import (  # noqa: E402
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer import MLATransformerConfig, TransformerConfig  # noqa: E402
from megatron.core.transformer.module import Float16Module, MegatronModule  # noqa: E402
from megatron.core.utils import unwrap_model  # noqa: E402

LR = 1e-2
WEIGHT_DECAY = 0.01  # Megatron-LM's default --weight-decay


# ----------------------------------------------------------------------------- setup


def init_parallel(m: dict, layout: dict) -> int:
    """(Re)initialise model parallel state and seeds as Megatron-LM's initialize does."""
    destroy_groups()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout["tp"],
        pipeline_model_parallel_size=layout["pp"],
        virtual_pipeline_model_parallel_size=layout["vpp"],
        expert_model_parallel_size=layout["ep"],
        expert_tensor_parallel_size=layout["etp"],
    )
    # Megatron-LM's _set_random_seed: the seed is offset by 100 per pipeline rank.
    seed = m["seed"] + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ps.get_data_parallel_world_size()


def destroy_groups() -> None:
    """Destroy the previous job's process groups (megatron-core's destroy_model_parallel only
    forgets them) and free its model (see _BUILT)."""
    from torch.distributed import distributed_c10d as c10d

    default = c10d._get_default_group()
    for group in [g for g in list(c10d._world.pg_map) if g is not default]:
        dist.destroy_process_group(group)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    for chunk in _BUILT:
        chunk.config.grad_scale_func = chunk.config.finalize_model_grads_func = None
        for module in chunk.modules():   # tensors kept from the last forward, with their graph
            holders = [module] + [v for v in vars(module).values() if type(v).__name__.endswith("TokenDispatcher")]
            for holder in holders:
                for name, value in list(vars(holder).items()):
                    if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                        setattr(holder, name, None)
    _BUILT.clear()
    get_moe_layer_wise_logging_tracker().clear()   # it keeps the last job's groups
    gc.collect()   # the groups' threads end with their last reference (the previous job's model, optimizer)


def qkv_bias(m: dict) -> bool:
    """Megatron-LM keeps add_qkv_bias with add_bias_linear unless told (Qwen2: --add-qkv-bias)."""
    return m["add_bias_linear"] if m["add_qkv_bias"] is None else m["add_qkv_bias"]


def transformer_config(m: dict, layout: dict) -> TransformerConfig:
    bf16 = m["dtype"] == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    latent = {"multi_latent_attention": True, "rotary_base": m["rotary_base"], "rope_type": "rope", **m["mla"]} \
        if m["mla"] else {}
    return (MLATransformerConfig if m["mla"] else TransformerConfig)(
        num_layers=m["num_layers"],
        hidden_size=m["hidden"],
        ffn_hidden_size=m["ffn"],
        num_attention_heads=m["heads"],
        num_query_groups=m["query_groups"],
        gated_linear_unit=m["swiglu"],
        activation_func=F.silu if m["swiglu"] else F.gelu,
        normalization=m["normalization"],
        layernorm_epsilon=m["norm_eps"],
        add_bias_linear=m["add_bias_linear"],
        add_qkv_bias=qkv_bias(m),
        qk_layernorm=m["qk_layernorm"] or bool(m["mla"]),
        # No dropout: training must be a deterministic function of data and layout.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout["tp"],
        pipeline_model_parallel_size=layout["pp"],
        virtual_pipeline_model_parallel_size=layout["vpp"],
        num_layers_in_first_pipeline_stage=layout["first"],
        num_layers_in_last_pipeline_stage=layout["last"],
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        use_cpu_initialization=True,
        # gloo mixes up activations and gradients with batched p2p under VPP.
        batch_p2p_comm=False,
        deallocate_pipeline_outputs=True,  # as Megatron-LM sets it
        # One sharded key per layer (no stacked layer axis with holes at noop layers).
        hetereogenous_dist_checkpoint=bool(m["noop_layers"]),
        **moe_config(m, layout),
        **latent,
    )


def moe_config(m: dict, layout: dict) -> dict:
    """The TransformerConfig fields of a mixture of experts (none for a dense model)."""
    if not m["experts"]:
        return {}
    return dict(
        num_moe_experts=m["experts"],
        moe_ffn_hidden_size=m["moe_ffn"],
        moe_router_topk=m["topk"],
        # alltoall needs CUDA events and uneven collectives gloo lacks; allgather runs as it is.
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="aux_loss",  # Megatron-LM's defaults
        moe_aux_loss_coeff=0.0,
        expert_model_parallel_size=layout["ep"],
        expert_tensor_parallel_size=layout["etp"],
        sequence_parallel=layout["tp"] > 1,  # megatron-core's MoE layer demands it with TP > 1
        moe_shared_expert_intermediate_size=m["shared_ffn"],
        moe_shared_expert_gate=m["shared_gate"],
        moe_layer_freq=m["moe_layer_freq"] or 1,
        moe_router_pre_softmax=m["router_pre_softmax"],
        moe_router_topk_scaling_factor=m["topk_scaling"],
        moe_grouped_gemm=m["grouped_gemm"],
    )


def build_model(m: dict, layout: dict, config: TransformerConfig) -> list:
    """Model chunks (one per virtual stage), wrapped as Megatron-LM's get_model wraps them."""
    chunks = []
    for vp_stage in range(layout["vpp"]) if layout["vpp"] else [None]:
        if m["moe_layer_freq"]:  # dense and MoE layers: one spec per layer
            spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=m["normalization"],
                                              vp_stage=vp_stage)
        else:
            spec = get_gpt_layer_local_spec(num_experts=m["experts"], normalization=m["normalization"],
                                            qk_layernorm=config.qk_layernorm,
                                            multi_latent_attention=bool(m["mla"]), moe_grouped_gemm=m["grouped_gemm"])
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab(m, layout["tp"]),
            max_sequence_length=m["seq_length"],
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=not m["untie_embeddings"],
            position_embedding_type=m["position_embedding"],
            rotary_base=m["rotary_base"],
            vp_stage=vp_stage,
        )
        model.model_type = ModelType.encoder_or_decoder
        if m["noop_layers"]:
            with_noop_layers(model, m["noop_layers"])
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        if config.bf16:
            model = Float16Module(config, model)
        chunks.append(model)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True, overlap_grad_reduce=False, grad_reduce_in_fp32=True
    )
    wrapped = [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
               for i, chunk in enumerate(chunks)]
    _BUILT.extend(wrapped)
    return wrapped


class NoopLayer(MegatronModule):
    """MindSpeed's NoopTransformerLayer (MindSpeed does not install here): a layer without weights
    that passes its input on."""

    def __init__(self, layer_number: int):
        super().__init__(config=None)
        self.layer_number = layer_number

    def forward(self, hidden_states, context=None, **kwargs):
        return hidden_states, context


def with_noop_layers(model, noop: list) -> None:
    """As MindSpeed builds a model with --noop-layers: those global layers are NoopLayers, every
    layer keeping its number (and its place in the chunk's layer list)."""
    layers = model.decoder.layers
    for i, layer in enumerate(layers):
        if layer.layer_number - 1 in noop:
            layers[i] = NoopLayer(layer.layer_number)


# Every job's DDP chunks, whose references out of gc's sight destroy_groups cuts: their
# TransformerConfig outlives the job (torch.compile's guards on megatron-core's fused functions
# hold it) and holds the optimizer (scale_loss, set by build_training); MoE token dispatchers keep
# their last training forward's routing tensors, whose autograd graph reaches the params' grad
# accumulators and DDP's hooks on them. Otherwise each job's model stays alive with its ~18 gloo
# process groups, whose threads poll: a launch of 35 MoE jobs spent more CPU in the kernel than
# in training.
_BUILT: list = []


def megatron_args(m: dict, layout: dict, dp: int, iteration: int, ckpt_format: str = "torch") -> argparse.Namespace:
    """The Megatron-LM arguments a legacy checkpoint carries (the ones a converter needs)."""
    tp, pp, vpp = layout["tp"], layout["pp"], layout["vpp"]
    uneven = layout["first"] is not None or layout["last"] is not None
    bf16 = m["dtype"] == "bf16"
    return argparse.Namespace(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        transformer_pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        # Megatron-LM demands --num-virtual-stages-per-pipeline-rank with uneven PP and
        # accepts --num-layers-per-virtual-pipeline-stage otherwise; a user sets one of them.
        num_layers_per_virtual_pipeline_stage=(
            m["num_layers"] // (pp * vpp) if vpp and not uneven else None
        ),
        num_virtual_stages_per_pipeline_rank=vpp if vpp and uneven else None,
        decoder_first_pipeline_num_layers=layout["first"],
        decoder_last_pipeline_num_layers=layout["last"],
        pipeline_model_parallel_layout=None,
        account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False,
        data_parallel_size=dp,
        context_parallel_size=1,
        expert_model_parallel_size=layout["ep"],
        expert_tensor_parallel_size=layout["etp"],
        sequence_parallel=bool(m["experts"]) and tp > 1,
        num_experts=m["experts"],
        moe_ffn_hidden_size=m["moe_ffn"] if m["experts"] else None,
        moe_router_topk=m["topk"],
        moe_grouped_gemm=m["grouped_gemm"],
        noop_layers=set(m["noop_layers"]) if m["noop_layers"] else None,   # MindSpeed-LLM's, parsed
        moe_token_dispatcher_type="allgather",
        moe_shared_expert_intermediate_size=m["shared_ffn"],
        moe_shared_expert_gate=m["shared_gate"],
        moe_layer_freq=m["moe_layer_freq"] or 1,
        moe_router_pre_softmax=m["router_pre_softmax"],
        moe_router_topk_scaling_factor=m["topk_scaling"],
        moe_router_enable_expert_bias=False,
        num_layers=m["num_layers"],
        encoder_num_layers=m["num_layers"],
        hidden_size=m["hidden"],
        ffn_hidden_size=m["ffn"],
        num_attention_heads=m["heads"],
        group_query_attention=m["query_groups"] != m["heads"],
        num_query_groups=m["query_groups"],
        kv_channels=m["hidden"] // m["heads"],
        multi_latent_attention=bool(m["mla"]),
        **({"rope_type": "rope", **m["mla"]} if m["mla"] else {}),
        qk_layernorm=m["qk_layernorm"] or bool(m["mla"]),
        seq_length=m["seq_length"],
        max_position_embeddings=m["seq_length"],
        vocab_size=m["vocab_size"],
        padded_vocab_size=padded_vocab(m, tp),
        make_vocab_size_divisible_by=m["make_vocab_size_divisible_by"],
        tokenizer_type="NullTokenizer",
        vocab_file=None,
        swiglu=m["swiglu"],
        normalization=m["normalization"],
        norm_epsilon=m["norm_eps"],
        apply_layernorm_1p=False,
        position_embedding_type=m["position_embedding"],
        add_position_embedding=m["position_embedding"] == "learned_absolute",
        use_rotary_position_embeddings=m["position_embedding"] == "rope",
        rotary_base=m["rotary_base"],
        rotary_percent=1.0,
        rotary_interleaved=False,
        add_bias_linear=m["add_bias_linear"],
        add_qkv_bias=qkv_bias(m),
        untie_embeddings_and_output_weights=m["untie_embeddings"],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        bf16=bf16,
        fp16=False,
        accumulate_allreduce_grads_in_fp32=True,
        use_distributed_optimizer=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        transformer_impl="local",
        use_legacy_models=False,
        use_cpu_initialization=True,
        ckpt_format=ckpt_format,
        use_dist_ckpt=ckpt_format != "torch",
        no_save_optim=None,
        no_save_rng=None,
        iteration=iteration,
        train_iters=iteration,
        consumed_train_samples=iteration * m["global_batch"],
        consumed_valid_samples=0,
        micro_batch_size=m["micro_batch"],
        global_batch_size=m["global_batch"],
        optimizer="adam",
        lr=LR,
        min_lr=0.0,
        lr_decay_style="constant",
        weight_decay=WEIGHT_DECAY,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_eps=1e-8,
        clip_grad=1.0,
        seed=m["seed"],
        data_parallel_random_init=False,
        distributed_backend="gloo",
    )


# ----------------------------------------------------------------------------- data, schedule


def token_batches(generator: torch.Generator, m: dict) -> torch.Tensor:
    """One global batch of random tokens, identical on every rank and every layout."""
    shape = (m["global_batch"], m["seq_length"] + 1)
    return torch.randint(0, true_vocab(m), shape, generator=generator)


def train_tokens(m: dict, step: int) -> torch.Tensor:
    """The global batch of training step `step` (1-based): a function of (seed, step) alone.

    It is the step-th draw of one generator seeded with the model seed, so a resumed run sees
    exactly the batches an uninterrupted run sees at the same steps (as Megatron's sampler
    resumes at consumed_train_samples).  Re-drawing the earlier batches costs nothing here.
    """
    generator = torch.Generator().manual_seed(m["seed"])
    for _ in range(step - 1):
        token_batches(generator, m)
    return token_batches(generator, m)


def microbatches(tokens: torch.Tensor, m: dict) -> list:
    """This DP rank's rows of the global batch, split into micro batches (as Megatron's sampler)."""
    rows = tokens.chunk(ps.get_data_parallel_world_size())[ps.get_data_parallel_rank()]
    out = []
    for mb in rows.split(m["micro_batch"]):
        out.append(
            {
                "tokens": mb[:, :-1].contiguous(),
                "labels": mb[:, 1:].contiguous(),
                "loss_mask": torch.ones(mb.shape[0], m["seq_length"]),
                "position_ids": torch.arange(m["seq_length"]).expand(mb.shape[0], -1),
            }
        )
    return out


def loss_func(loss_mask, output_tensor):
    # pretrain_gpt.loss_func: summed loss and token count; the schedule divides.
    loss = torch.sum(output_tensor.view(-1).float() * loss_mask.view(-1))
    num_tokens = loss_mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.float()])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    # attention_mask None: the local core attention builds the causal mask itself.
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def run_schedule(chunks: list, batches: list, m: dict, forward_only: bool) -> float:
    """Runs the pipeline schedule; returns the global mean LM loss (the same on every rank)."""
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(batches) for _ in chunks],
        model=chunks,
        num_microbatches=len(batches),
        seq_length=m["seq_length"],
        micro_batch_size=m["micro_batch"],
        forward_only=forward_only,
    )
    # Reports exist on the last stage only; count one TP rank per DP rank.
    total = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        for report in reports:
            total += report["lm loss"].double()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def eval_loss(chunks: list, m: dict) -> float:
    """Forward-only loss on a fixed batch that depends on the seed alone."""
    generator = torch.Generator().manual_seed(m["seed"] + 1)
    with torch.no_grad():
        return run_schedule(chunks, microbatches(token_batches(generator, m), m), m, True)


# ----------------------------------------------------------------------------- global tensors


def local_shards(chunks: list, data_of: dict | None = None) -> list:
    """This rank's pieces of every global tensor, from megatron-core's own sharded_state_dict.

    Each piece is (key, global_shape, global_offset, data, is_main_replica); data is reshaped
    to include the prepended (layer) axes so that offsets and shape line up.

    data_of ({id(model param): tensor of the param's shape}) replaces each parameter's data
    before the sharded tensors (and the SwiGLU factories) are built: the same global mapping
    then places, e.g., the optimizer's exp_avg of every parameter.
    """
    shards = []
    for chunk in unwrap_model(chunks):
        for item in nested_values(chunk.sharded_state_dict()):
            if isinstance(item, (ShardedTensor, ShardedTensorFactory)) and data_of is not None:
                if id(item.data) not in data_of:
                    raise KeyError(f"{item.key}: no optimizer state for this model tensor")
                new = data_of[id(item.data)]
                assert new.shape == item.data.shape, (item.key, new.shape, item.data.shape)
                if isinstance(item, ShardedTensor):
                    item = dataclasses.replace(item, data=new, dtype=new.dtype)
                else:
                    item = dataclasses.replace(item, data=new)
            if isinstance(item, ShardedTensorFactory):  # SwiGLU fc1: gate and up halves; grouped experts
                built = item.build()
                pieces = built if isinstance(built, list) else [built]
            elif isinstance(item, ShardedTensor):
                pieces = [item]
            elif isinstance(item, ShardedObject) and item.data is None:
                continue  # the local linears' empty `_extra_state`
            else:
                raise TypeError(f"unexpected sharded item {type(item).__name__}: {item}")
            for sh in pieces:
                assert sh.flattened_range is None, sh.key
                data = sh.data.detach().clone()
                data = data.reshape((1,) * sh.prepend_axis_num + tuple(data.shape))
                main = is_main_replica(sh.replica_id)
                shards.append((sh.key, tuple(sh.global_shape), tuple(sh.global_offset), data, main))
    return shards


def gather_global(chunks: list, data_of: dict | None = None):
    """On rank 0: ({key: full tensor}, {keys whose replicas disagree or that have holes}).

    Every replica is gathered (the models are tiny) so that, e.g., a norm weight that differs
    between two TP ranks' files is caught, not just the main copy.  data_of: see local_shards.
    """
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local_shards(chunks, data_of))
    if dist.get_rank() != 0:
        return None, None
    shards = [s for rank_shards in gathered for s in rank_shards]
    shards.sort(key=lambda s: not s[4])  # main replicas first, replicas are checked against them
    full, filled, bad = {}, {}, set()
    for key, shape, offset, data, main in shards:
        if key not in full:
            full[key] = torch.zeros(shape, dtype=data.dtype)
            filled[key] = torch.zeros(shape, dtype=torch.bool)
        box = tuple(slice(o, o + n) for o, n in zip(offset, data.shape))
        if full[key].shape != shape or full[key].dtype != data.dtype:
            bad.add(key)
        elif main:
            full[key][box] = data
            filled[key][box] = True
        elif not (filled[key][box].all() and torch.equal(full[key][box], data)):
            bad.add(key)
    bad.update(key for key, mask in filled.items() if not mask.all())
    return full, bad


def compare(truth: dict, got: dict, bad: set) -> dict:
    """Bitwise comparison; vocab-padded tensors compare their common rows and need zero extras."""
    mismatches = sorted(bad & set(got))
    for key in sorted(set(truth) & set(got) - bad):
        want, have = truth[key], got[key]
        if key in VOCAB_KEYS:
            rows = min(want.shape[0], have.shape[0])
            same = (
                want.dtype == have.dtype
                and want.shape[1:] == have.shape[1:]
                and torch.equal(want[:rows], have[:rows])
                and not have[want.shape[0]:].any()
            )
        else:
            same = want.dtype == have.dtype and torch.equal(want, have)
        if not same:
            mismatches.append(key)
    return {
        "mismatches": mismatches,
        "missing": sorted(set(truth) - set(got)),
        "extra": sorted(set(got) - set(truth)),
    }


# ----------------------------------------------------------------------------- optimizer state

OPTIM_STATES = ("param", "exp_avg", "exp_avg_sq")  # what distrib_optim.pt holds per element


def distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizers inside what get_megatron_optimizer returned.

    megatron-core 0.16.1 always returns a ChainedOptimizer: one DistributedOptimizer for the
    dense params, and with experts a second one for the expert params (over the expert-data-
    parallel group).
    """
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(inner) not in (1, 2) or not all(isinstance(o, DistributedOptimizer) for o in inner):
        raise NotImplementedError(f"expected DistributedOptimizers, got {inner}")
    return inner


def param_names(chunks: list) -> list:
    """Per model chunk: {id(param): its key in that chunk's state_dict_for_save_checkpoint()}."""
    names = []
    for chunk in unwrap_model(chunks):
        state = chunk.state_dict_for_save_checkpoint(keep_vars=True)
        names.append({id(v): k for k, v in state.items() if isinstance(v, torch.nn.Parameter)})
    return names


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def local_param_map(chunks: list, optimizer) -> list:
    """This rank's grad buffers in the optimizer's gbuf_idx order, read from the live DDP buffers."""
    names = param_names(chunks)
    chunk_of = {}
    for i, ddp in enumerate(chunks):
        for buffer in list(ddp.buffers) + list(ddp.expert_parallel_buffers):
            chunk_of[id(buffer)] = i
    buffers = []
    for dopt in distributed_optimizers(optimizer):
        for buffer in dopt.buffers:
            chunk = chunk_of[id(buffer)]
            params = [
                [names[chunk][id(param)], list(param.shape), start, end, bucket_id]
                for param, (start, end, bucket_id) in buffer.param_index_map.items()
            ]
            params.sort(key=lambda p: p[2])  # buffer order
            buffers.append(
                {
                    "chunk": chunk,
                    "param_dtype": _dtype_name(buffer.param_dtype),
                    "grad_dtype": _dtype_name(buffer.grad_dtype),
                    "dp_size": buffer.data_parallel_world_size,
                    # megatron-core's expert buffers hold the params it does not all-reduce over DP
                    "expert": not all(getattr(p, "allreduce", True) for p in buffer.param_index_map),
                    "numel": buffer.numel,
                    "numel_unpadded": buffer.numel_unpadded,
                    "bucket_indices": [list(b) for b in buffer.bucket_indices],
                    "per_bucket_numel_unpadded": [b.numel_unpadded for b in buffer.buckets],
                    "params": params,
                }
            )
    return buffers


def gather_param_map(chunks: list, optimizer) -> list | None:
    """On rank 0: [{"tp_rank", "pp_rank", "ep_rank", "buffers"}] for every rank that writes a
    model file (expert-DP rank 0; DP rank 0 without experts), sorted by (tp_rank, pp_rank,
    ep_rank).  Raises if two ranks of one (tp, pp, ep) disagree."""
    mine = (
        (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
         ps.get_expert_model_parallel_rank()),
        ps.get_expert_data_parallel_rank(),
        local_param_map(chunks, optimizer),
    )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() != 0:
        return None
    by_rank = {}
    for rank, edp_rank, buffers in sorted(gathered, key=lambda g: g[1]):
        if rank not in by_rank:
            by_rank[rank] = buffers
        elif by_rank[rank] != buffers:
            raise RuntimeError(f"expert-DP rank {edp_rank} of (tp, pp, ep) {rank} has another param_map")
    return [{"tp_rank": t, "pp_rank": p, "ep_rank": e, "buffers": b} for (t, p, e), b in sorted(by_rank.items())]


def optimizer_states(chunks: list, optimizer) -> dict:
    """{state: {id(model param): full fp32 tensor of the param's (TP-local) shape}}.

    Each DP rank holds, per model param, the slice param_range (a range in the flattened param,
    not in the flat buffer) of the fp32 main param and of Adam's moments; they come from the
    optimizer's own `_get_main_param_and_optimizer_states(model_param)`, are all-gathered over
    the optimizer's DP group and assembled in parameter space.  Every element must be covered
    exactly once.
    """
    names = param_names(chunks)
    name_of = {pid: (i, name) for i, chunk_names in enumerate(names) for pid, name in chunk_names.items()}
    param_of = {name_of[id(p)]: p for chunk in unwrap_model(chunks) for p in chunk.parameters()}
    out = {key: {} for key in OPTIM_STATES}
    for dopt in distributed_optimizers(optimizer):
        pieces = []
        for gbuf_range_maps in dopt.gbuf_ranges:
            for bucket_maps in gbuf_range_maps.values():
                for bucket_map in bucket_maps:
                    for model_param, range_map in bucket_map["param_map"].items():
                        tensors = dopt._get_main_param_and_optimizer_states(model_param)
                        rng = range_map["param"]
                        pieces.append(
                            (
                                name_of[id(model_param)],
                                rng.start,
                                rng.end,
                                {k: tensors[k].detach().clone().view(-1) for k in OPTIM_STATES},
                            )
                        )
        gathered = [None] * dopt.data_parallel_group.size()
        dist.all_gather_object(gathered, pieces, group=dopt.data_parallel_group)
        full, count = {}, {}
        for rank_pieces in gathered:
            for ident, start, end, tensors in rank_pieces:
                param = param_of[ident]
                if ident not in count:
                    full[ident] = {k: torch.zeros(param.numel(), dtype=torch.float32) for k in OPTIM_STATES}
                    count[ident] = torch.zeros(param.numel(), dtype=torch.int32)
                for k in OPTIM_STATES:
                    assert tensors[k].dtype == torch.float32 and tensors[k].numel() == end - start, ident
                    full[ident][k][start:end] = tensors[k]
                count[ident][start:end] += 1
        for ident, c in count.items():
            if not (c == 1).all():
                raise RuntimeError(f"optimizer shards of {ident} do not tile the parameter")
            for k in OPTIM_STATES:
                out[k][id(param_of[ident])] = full[ident][k].view(param_of[ident].shape)
    return out


def gather_optimizer(chunks: list, optimizer):
    """On rank 0: ({state: {global key: full fp32 tensor}}, {state: bad keys}); see gather_global."""
    states = optimizer_states(chunks, optimizer)
    full, bad = {}, {}
    for key in OPTIM_STATES:
        full[key], bad[key] = gather_global(chunks, states[key])
    return (full, bad) if dist.get_rank() == 0 else (None, None)


def optimizer_steps(optimizer) -> list:
    """Every per-parameter Adam `step` tensor (torch AdamW keeps one per parameter)."""
    return [
        state["step"]
        for dopt in distributed_optimizers(optimizer)
        for state in dopt.optimizer.state.values()
        if "step" in state
    ]


# ----------------------------------------------------------------------------- checkpoint files


def mp_rank_dir(iteration_dir: str, layout: dict) -> str:
    """Megatron-LM's get_checkpoint_name: mp_rank_TT[_PPP][_EEE] (PPP with PP > 1, EEE with EP > 1)."""
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{tp_rank:02d}" if layout["pp"] == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    if layout["ep"] > 1:
        name += f"_{ps.get_expert_model_parallel_rank():03d}"
    return os.path.join(iteration_dir, name)


def model_keys(n_chunks: int) -> list:
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


def save_legacy_checkpoint(save_dir, iteration, layout, chunks, optimizer, scheduler, args):
    """Writes what Megatron-LM's save_checkpoint writes with --ckpt-format torch."""
    ckpt_dir = mp_rank_dir(os.path.join(save_dir, f"iter_{iteration:07d}"), layout)
    os.makedirs(ckpt_dir, exist_ok=True)
    # Collective over the DP group; the DP-rank-0 process writes the file.
    optimizer.save_parameter_state(os.path.join(ckpt_dir, "distrib_optim.pt"))
    if ps.get_expert_data_parallel_rank() == 0:  # as Megatron-LM: one file per expert-DP group
        state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration}
        for key, chunk in zip(model_keys(len(chunks)), unwrap_model(chunks)):
            state[key] = chunk.state_dict_for_save_checkpoint()
        state["optimizer"] = optimizer.state_dict()
        state["opt_param_scheduler"] = scheduler.state_dict()
        # Megatron-LM's get_rng_state (one entry: no --data-parallel-random-init); the shim
        # makes the "cuda" states the CPU generator's.
        state["rng_state"] = [rng_state()]
        state["num_floating_point_operations_so_far"] = 0
        torch.save(state, os.path.join(ckpt_dir, "model_optim_rng.pt"))
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    dist.barrier()


def rng_state() -> dict:
    """Megatron-LM's get_rng_state entry (no --data-parallel-random-init); the shim makes the
    "cuda" states the CPU generator's."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def dist_content_metadata(sharding: str) -> dict:
    """Megatron-LM's _build_sharded_state_dict_metadata (--use-distributed-optimizer)."""
    content = {"distrib_optim_sharding_type": sharding}
    if sharding == "fully_reshardable":
        content["distrib_optim_fully_reshardable_mem_efficient"] = False
    return {**content, "singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def torch_dist_state(chunks, optimizer, metadata: dict, is_loading: bool) -> dict:
    """Megatron-LM's generate_state_dict for --ckpt-format torch_dist (model chunks, optimizer)."""
    metadata = {**metadata, "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    state = {}
    for key, chunk in zip(model_keys(len(chunks)), unwrap_model(chunks)):
        state[key] = chunk.sharded_state_dict(metadata=metadata)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    return state


def rng_sharded_object(state: list) -> ShardedObject:
    """Megatron-LM's RNG ShardedObject (get_rng_state): sharded by PP and TP, with expert
    parallelism by PP, TP and DP."""
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size())
    at = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    if ps.get_expert_model_parallel_world_size() > 1:
        return ShardedObject("rng_state", state, (*shape, ps.get_data_parallel_world_size(with_context_parallel=True)),
                             (*at, dp_rank), replica_id=0)
    return ShardedObject("rng_state", state, shape, at, replica_id=dp_rank)


def save_torch_dist_checkpoint(save_dir, iteration, chunks, optimizer, scheduler, args, sharding: str):
    """What Megatron-LM's save_checkpoint writes with --ckpt-format torch_dist (its defaults:
    fully parallel save over DP, sharding integrity validated), distrib_optim_sharding_type
    ``sharding`` ("dp_reshardable" is the default, "fully_reshardable" with
    --dist-ckpt-optim-fully-reshardable)."""
    ckpt_dir = os.path.join(save_dir, f"iter_{iteration:07d}")
    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    content = dist_content_metadata(sharding)
    state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration,
             **torch_dist_state(chunks, optimizer, content, is_loading=False),
             "opt_param_scheduler": scheduler.state_dict(), "rng_state": rng_sharded_object([rng_state()]),
             "num_floating_point_operations_so_far": 0}
    strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"),
                                                ps.get_data_parallel_group(with_context_parallel=True))
    dist_checkpointing.save(state, ckpt_dir, strategy, validate_access_integrity=True, content_metadata=content)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    dist.barrier()


def load_torch_dist_like_megatron_lm(job, layout, chunks, optimizer, scheduler):
    """Megatron-LM's load_checkpoint for --ckpt-format torch_dist (megatron_core_dist_load), then
    the loaded weights gathered for comparison."""
    iteration = weights = bad = error = None
    try:
        iteration = megatron_core_dist_load(job["load_dir"], layout, chunks, optimizer, scheduler)
    except Exception as exc:  # reported, not raised: every rank must reach the collectives
        error = describe(exc)
    errors = gather_errors(error)
    if not errors:
        weights, bad = gather_global(chunks)
    return iteration, errors, weights, bad, []


def megatron_core_dist_load(load_dir, layout, chunks, optimizer, scheduler) -> int:
    """megatron-core's own dist_checkpointing.load at this layout, as Megatron-LM calls it
    (sharding type from the checkpoint's content metadata, RNG only at the saved TP/PP unless
    the args say no_save_rng). megatron-core 0.16.1's optimizer load needs, as for the legacy
    format, torch.no_grad around the copy into fp32 main params, one `step` tensor per
    parameter afterwards, and allocated optimizer states before (done here). Returns the
    iteration."""
    with open(os.path.join(load_dir, "latest_checkpointed_iteration.txt")) as f:
        ckpt_dir = os.path.join(load_dir, f"iter_{int(f.read().strip()):07d}")
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    saved = common["args"]
    same_layout = (saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size) == \
        (layout["tp"], layout["pp"]) and not getattr(saved, "no_save_rng", False)
    for dopt in distributed_optimizers(optimizer):
        if len(dopt.optimizer.state) == 0:
            dopt._init_optimizer_states_with_dummy_values()  # state_dict() needs a step
    sharded = {**torch_dist_state(chunks, optimizer, content, is_loading=True),
               "opt_param_scheduler": scheduler.state_dict()}
    if same_layout:
        sharded["rng_state"] = rng_sharded_object([rng_state()])
    for dopt in distributed_optimizers(optimizer):
        # The model-space loaders hand over no 'step' (it is in the param groups), which
        # _set_main_param_and_optimizer_states then looks up: KeyError with torch's AdamW.
        original = dopt._set_main_param_and_optimizer_states
        dopt._set_main_param_and_optimizer_states = lambda param, tensors, original=original: \
            original(param, {**tensors, "step": tensors.get("step", torch.zeros(()))})
    try:
        with torch.no_grad():
            state = dist_checkpointing.load(sharded, ckpt_dir, get_default_load_sharded_strategy(ckpt_dir))
            for key, chunk in zip(model_keys(len(chunks)), unwrap_model(chunks)):
                chunk.load_state_dict(state[key], strict=True)
            optimizer.load_state_dict(state["optimizer"])
    finally:
        for dopt in distributed_optimizers(optimizer):
            del dopt._set_main_param_and_optimizer_states
    chain = state["optimizer"]   # a ChainedOptimizer's (experts with EP > 1): {index: one optimizer's}
    entries = [chain] if "optimizer" in chain else list(chain.values())
    step = {g["step"] for entry in entries for g in entry["optimizer"]["param_groups"]}.pop()
    for dopt in distributed_optimizers(optimizer):
        for param_state in dopt.optimizer.state.values():
            param_state["step"] = torch.tensor(float(step))
    scheduler.load_state_dict(state["opt_param_scheduler"])
    if same_layout:
        restore_rng(state)
    return state["iteration"]


# Saved arguments a reader needs to be right: the layout (what Megatron-LM's
# check_checkpoint_args compares, plus VPP and uneven PP) and the architecture.
CHECKED_ARGS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers",
    "padded_vocab_size",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "add_position_embedding",
    "untie_embeddings_and_output_weights",
)


def read_model_file(load_dir, layout):
    """(tracker iteration, this rank's mp_rank dir, its model_optim_rng.pt) of DIR's latest iteration."""
    with open(os.path.join(load_dir, "latest_checkpointed_iteration.txt")) as f:
        iteration = int(f.read().strip())
    ckpt_dir = mp_rank_dir(os.path.join(load_dir, f"iter_{iteration:07d}"), layout)
    # weights_only=False: the file holds an argparse.Namespace; it is our own test output.
    state = torch.load(os.path.join(ckpt_dir, "model_optim_rng.pt"), weights_only=False)
    return iteration, ckpt_dir, state


def load_model_state(state: dict, ckpt_dir, chunks: list) -> None:
    """Strict load_state_dict of every chunk's entry ("model" or "model0", "model1", ...)."""
    keys = model_keys(len(chunks))
    found = sorted(k for k in state if k.startswith("model"))
    if found != sorted(keys):
        raise KeyError(f"{ckpt_dir}: model entries {found}, expected {keys}")
    for key, chunk in zip(keys, unwrap_model(chunks)):
        chunk.load_state_dict(state[key], strict=True)


def args_mismatches(state: dict, expected_args) -> list:
    """The names in CHECKED_ARGS whose saved value differs from `expected_args`."""
    saved = vars(state["args"])
    return [n for n in CHECKED_ARGS if saved.get(n, "<absent>") != getattr(expected_args, n)]


def load_legacy_model(load_dir, layout, chunks, expected_args) -> list:
    """Loads this rank's model_optim_rng.pt strictly into every chunk.

    Returns the names in CHECKED_ARGS whose saved value differs from `expected_args`.
    """
    _, ckpt_dir, state = read_model_file(load_dir, layout)
    load_model_state(state, ckpt_dir, chunks)
    return args_mismatches(state, expected_args)


def check_param_state_file(state, optimizer, path) -> None:
    """Raises unless `state` (a loaded distrib_optim.pt) fits this optimizer's buffers.

    It covers every condition under which DistributedOptimizer.load_parameter_state_from_dp_zero
    would fail on DP rank 0 between its collectives (so a bad file is a load error, not a hang),
    and is stricter where Megatron's own saver is exact: each buffer entry holds exactly
    numel_unpadded fp32 elements per state and nothing else is in the file.  (Like Megatron, it
    checks the buffer's total only; a different bucket split shows in the state comparison.)
    """
    dopts = distributed_optimizers(optimizer)
    states = [state] if len(dopts) == 1 else state
    if not isinstance(states, list) or len(states) != len(dopts):
        raise ValueError(f"{path}: expected {len(dopts)} optimizer state(s)")
    for dopt, st in zip(dopts, states):
        if dopt.data_parallel_group.rank() != 0:
            continue  # a chained optimizer's entry is read by its own DP rank 0 only
        if not isinstance(st, dict):
            raise ValueError(f"{path}: not a dict but {type(st).__name__}")
        expected = {"buckets_coalesced"} | set(range(len(dopt.gbuf_ranges)))
        if set(st) != expected:
            raise ValueError(
                f"{path}: top-level keys {sorted(map(str, st))}, expected {sorted(map(str, expected))}"
            )
        if st["buckets_coalesced"] is not True:
            raise ValueError(f"{path}: buckets_coalesced is {st['buckets_coalesced']!r}")
        for gbuf_idx, gbuf_range_maps in enumerate(dopt.gbuf_ranges):
            if set(st[gbuf_idx]) != set(gbuf_range_maps):
                raise ValueError(f"{path}: buffer {gbuf_idx} has dtype keys {list(st[gbuf_idx])}, "
                                 f"expected {list(gbuf_range_maps)}")
            numel = dopt.buffers[gbuf_idx].numel_unpadded
            for dtype in gbuf_range_maps:
                entry = st[gbuf_idx][dtype]
                if set(entry) != set(OPTIM_STATES) | {"numel_unpadded"}:
                    raise ValueError(f"{path}: buffer {gbuf_idx} has keys {sorted(entry)}")
                if entry["numel_unpadded"] != numel:
                    raise ValueError(f"{path}: buffer {gbuf_idx} numel_unpadded {entry['numel_unpadded']}, "
                                     f"this layout's buffer has {numel}")
                for key in OPTIM_STATES:
                    t = entry[key]
                    if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (numel,)):
                        raise ValueError(f"{path}: buffer {gbuf_idx} {key} is not fp32 [{numel}]: "
                                         f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")


def load_optimizer_state(state: dict, optimizer, scheduler, ckpt_dir, check_file: bool) -> float:
    """The local part of Megatron-LM's load_checkpoint for the optimizer (no collectives).

    optimizer.load_state_dict(state["optimizer"]) and the scheduler from "opt_param_scheduler";
    on DP rank 0 (check_file) the distrib_optim.pt is read as load_parameter_state reads it and
    checked.  Returns the saved Adam step.
    """
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["opt_param_scheduler"])
    chained = state["optimizer"] if isinstance(state["optimizer"], list) else [state["optimizer"]]
    steps = {g["step"] for entry in chained for g in entry["optimizer"]["param_groups"]}
    if len(steps) != 1:
        raise ValueError(f"{ckpt_dir}: param groups have different steps {sorted(steps)}")
    if check_file:
        path = os.path.join(ckpt_dir, "distrib_optim.pt")
        check_param_state_file(torch.load(path), optimizer, path)  # torch.load as Megatron calls it
    return steps.pop()


def load_parameter_state(optimizer, ckpt_dir, step: float) -> None:
    """optimizer.load_parameter_state(distrib_optim.pt) with the fixes megatron-core 0.16.1 needs
    with plain torch AdamW (collective over each DP group).

    * load_state_dict has put one shared `step` tensor into every parameter's state, and
      _set_main_param_and_optimizer_states copies every state key from the file, which has no
      `step`: KeyError 'step'.  The steps are taken out during the load...
    * ...and put back as one tensor per parameter: a shared one would be advanced once per
      parameter by AdamW's in-place `step += 1` (wrong bias correction).
    * The copy into fp32 main params (views of the model's leaf params) needs torch.no_grad().
    """
    for dopt in distributed_optimizers(optimizer):
        for param_state in dopt.optimizer.state.values():
            param_state.pop("step", None)
    with torch.no_grad():
        optimizer.load_parameter_state(os.path.join(ckpt_dir, "distrib_optim.pt"))
    for dopt in distributed_optimizers(optimizer):
        for group in dopt.optimizer.param_groups:
            for param in group["params"]:
                dopt.optimizer.state[param]["step"] = torch.tensor(float(step), dtype=torch.float32)


def restore_rng(state: dict) -> None:
    """Megatron-LM's RNG restore (entry 0: no --data-parallel-random-init); absent = --no-load-rng."""
    if "rng_state" not in state:
        return
    rng = state["rng_state"][0]
    random.setstate(rng["random_rng_state"])
    np.random.set_state(rng["np_rng_state"])
    torch.set_rng_state(rng["torch_rng_state"])
    torch.cuda.set_rng_state(rng["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["rng_tracker_states"])


def gather_errors(error) -> list:
    """All ranks' errors (None where none): every rank must reach the next collective."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return [e for e in errors if e]


def describe(exc: Exception) -> str:
    if os.environ.get("HARNESS_TRACEBACK"):
        traceback.print_exc()
    return f"rank {dist.get_rank()}: {type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- jobs


def build_training(m: dict, layout: dict, steps: int):
    """(dp, config, chunks, optimizer, scheduler) as Megatron-LM's setup_model_and_optimizer."""
    dp = init_parallel(m, layout)
    config = transformer_config(m, layout)
    chunks = build_model(m, layout, config)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=True,
        ),
        chunks,
    )
    # Megatron-LM: lr_decay_iters defaults to train_iters.  On load the checkpoint's values win
    # (use_checkpoint_opt_param_scheduler defaults to True in megatron-core's class).
    samples = steps * m["global_batch"]
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=LR,
        min_lr=0.0,
        lr_warmup_steps=0,
        lr_decay_steps=samples,
        lr_decay_style="constant",
        start_wd=WEIGHT_DECAY,
        end_wd=WEIGHT_DECAY,
        wd_incr_steps=samples,
        wd_incr_style="constant",
    )
    # What Megatron-LM's train() wires into the config before the first step.
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    return dp, config, chunks, optimizer, scheduler


def train_steps(chunks, optimizer, scheduler, m: dict, first: int, count: int) -> list:
    """Trains steps first..first+count-1 (1-based); returns their losses."""
    losses = []
    for step in range(first, first + count):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses.append(run_schedule(chunks, microbatches(train_tokens(m, step), m), m, False))
        update_successful, _, _ = optimizer.step()
        assert update_successful, "optimizer step skipped"
        scheduler.step(increment=m["global_batch"])
    return losses


def train_job(job: dict) -> None:
    m, layout = model_spec(job.get("model", {})), layout_spec(job["layout"])
    total, steps = job.get("train_on_to") or job["steps"], job["steps"]   # saved at `steps`, trained on to `total`
    dp, config, chunks, optimizer, scheduler = build_training(m, layout, steps)   # the scheduler a `steps` run saves
    train_losses = train_steps(chunks, optimizer, scheduler, m, 1, steps)

    if job.get("saver") == "ckpt_hooks":  # the library's save, describing the model itself
        from ckpt_hooks.megatron import save

        save(chunks, optimizer, job["save_dir"], steps, scheduler=scheduler,
             ckpt_format=job.get("format", "torch"))
    elif job.get("format") == "torch_dist":
        args = megatron_args(m, layout, dp, steps, ckpt_format="torch_dist")
        save_torch_dist_checkpoint(job["save_dir"], steps, chunks, optimizer, scheduler, args,
                                   job.get("optim_format", "dp_reshardable"))
    else:
        args = megatron_args(m, layout, dp, steps)
        save_legacy_checkpoint(job["save_dir"], steps, layout, chunks, optimizer, scheduler, args)
    loss = eval_loss(chunks, m)
    tensors, bad = gather_global(chunks)
    optim, optim_bad = gather_optimizer(chunks, optimizer)
    param_map = gather_param_map(chunks, optimizer)
    # The uninterrupted run's next losses, which a run resumed from the checkpoint must repeat.
    train_losses += train_steps(chunks, optimizer, scheduler, m, steps + 1, total - steps)
    if dist.get_rank() == 0:
        if bad:
            raise RuntimeError(f"megatron's own shards are inconsistent for {sorted(bad)}")
        if any(optim_bad.values()):
            raise RuntimeError(f"the optimizer's own states are inconsistent: {optim_bad}")
        if set(optim["param"]) != set(tensors):
            raise RuntimeError("optimizer state keys differ from the weights'")
        truth = {
            "tensors": tensors,
            "optimizer": optim,
            "param_map": param_map,
            "loss": loss,
            "train_losses": train_losses,
            "layout": layout,
            "model": m,
            "padded_vocab": padded_vocab(m, layout["tp"]),
        }
        torch.save(truth, job["truth"])


def load_with_ckpt_hooks(job, chunks, optimizer, scheduler):
    """ckpt_hooks.megatron.load straight from the saved checkpoint, at this job's layout;
    the bytes each rank read go to job["result"] + ".bytes.<rank>.json"."""
    from ckpt_hooks.megatron import load

    iteration = None
    try:
        loaded = load(chunks, optimizer, job["load_dir"])
        scheduler.load_state_dict(loaded.scheduler)
        iteration = loaded.iteration
        with open(f"{job['result']}.bytes.{dist.get_rank()}.json", "w") as f:
            json.dump({"bytes_read": loaded.bytes_read, "tp_rank": ps.get_tensor_model_parallel_rank(),
                       "pp_rank": ps.get_pipeline_model_parallel_rank(),
                       "dp_rank": ps.get_data_parallel_rank(with_context_parallel=True)}, f)
        error = None
    except Exception as exc:  # reported, not raised: every rank must reach the collectives
        error = describe(exc)
    errors = gather_errors(error)
    weights, bad = gather_global(chunks) if not errors else (None, None)
    return iteration, errors, weights, bad


def load_like_megatron_lm(job, layout, chunks, optimizer, scheduler, expected_args):
    """Megatron-LM's own load_checkpoint sequence."""
    # 1. Everything local: model weights, optimizer.load_state_dict, scheduler, RNG, and (DP
    #    rank 0) reading + checking distrib_optim.pt.
    iteration = step = ckpt_dir = weights_from_file = bad_from_file = None
    mismatched_args = []
    try:
        tracker_iteration, ckpt_dir, state = read_model_file(job["load_dir"], layout)
        load_model_state(state, ckpt_dir, chunks)
        mismatched_args = args_mismatches(state, expected_args)
        iteration = state["iteration"]
        if iteration != tracker_iteration:
            raise ValueError(f"{ckpt_dir}: iteration {iteration}, tracker says {tracker_iteration}")
        step = load_optimizer_state(state, optimizer, scheduler, ckpt_dir,
                                    check_file=any(o.data_parallel_group.rank() == 0
                                                   for o in distributed_optimizers(optimizer)))
        restore_rng(state)
        error = None
    except Exception as exc:  # reported, not raised: every rank must reach the collectives
        error = describe(exc)
    errors = gather_errors(error)

    # 2. The collective part: load_parameter_state (scatter over each DP group).
    if not errors:
        weights_from_file, bad_from_file = gather_global(chunks)  # before distrib_optim.pt
        try:
            load_parameter_state(optimizer, ckpt_dir, step)
            error = None
        except Exception as exc:
            error = describe(exc)
        errors = gather_errors(error)
    return iteration, errors, weights_from_file, bad_from_file, mismatched_args


def resume_job(job: dict) -> None:
    """Megatron-LM's load_checkpoint (--ckpt-format torch --use-distributed-optimizer), a bitwise
    check of the loaded weights and optimizer state, then `steps` more training steps."""
    m, layout = model_spec(job.get("model", {})), layout_spec(job["layout"])
    # The scheduler's decay steps are the checkpoint's once loaded; megatron-core only needs > 0.
    dp, config, chunks, optimizer, scheduler = build_training(m, layout, max(job["steps"], 1))
    expected_args = megatron_args(m, layout, dp, iteration=0)  # iteration is not checked
    result = {"ok": False, "weight_mismatches": [], "optim_mismatches": [], "missing": [],
              "extra": [], "load_error": None, "losses": [], "iteration": None,
              "args_mismatches": [], "loss": None, "truth_loss": None}

    if job.get("loader") == "ckpt_hooks":
        iteration, errors, weights_from_file, bad_from_file = load_with_ckpt_hooks(job, chunks, optimizer, scheduler)
        mismatched_args = []
    elif job.get("loader") == "megatron_core_dist":
        iteration, errors, weights_from_file, bad_from_file, mismatched_args = \
            load_torch_dist_like_megatron_lm(job, layout, chunks, optimizer, scheduler)
    else:
        iteration, errors, weights_from_file, bad_from_file, mismatched_args = \
            load_like_megatron_lm(job, layout, chunks, optimizer, scheduler, expected_args)
    all_args = [None] * dist.get_world_size()
    dist.all_gather_object(all_args, mismatched_args)

    if not errors:
        result["loss"] = eval_loss(chunks, m)
        weights, bad = gather_global(chunks)
        optim, optim_bad = gather_optimizer(chunks, optimizer)
        steps = optimizer_steps(optimizer)
        steps_ok = len({id(t) for t in steps}) == len(steps) and all(t.item() == iteration for t in steps)
        steps_ok = gather_errors(None if steps_ok else "step") == []
    if dist.get_rank() == 0:
        result["load_error"] = "\n".join(errors) or None
        result["args_mismatches"] = sorted({name for names in all_args for name in names})
        truth = torch.load(job["truth"], weights_only=False)
        result["truth_loss"] = truth["loss"]
        if not errors:
            result["iteration"] = iteration
            cmp_file = compare(truth["tensors"], weights_from_file, bad_from_file)
            cmp = compare(truth["tensors"], weights, bad)
            result["weight_mismatches"] = sorted(set(cmp["mismatches"]) | set(cmp_file["mismatches"]))
            result["weight_mismatches_model_file"] = cmp_file["mismatches"]
            result["missing"], result["extra"] = cmp["missing"], cmp["extra"]
            if "optimizer" not in truth:
                raise KeyError(f"{job['truth']} has no optimizer ground truth (an old truth file)")
            for key in OPTIM_STATES:
                c = compare(truth["optimizer"][key], optim[key], optim_bad[key])
                result["optim_mismatches"] += [f"{key}:{k}" for k in c["mismatches"]]
                result["missing"] += [f"{key}:{k}" for k in c["missing"]]
                result["extra"] += [f"{key}:{k}" for k in c["extra"]]
            if not steps_ok:
                result["optim_mismatches"].append("step")

    # 3. Train on: steps iteration+1 .. iteration+M of the same data stream.
    if not errors:
        result["losses"] = train_steps(chunks, optimizer, scheduler, m, iteration + 1, job["steps"])
    if dist.get_rank() == 0:
        result["ok"] = not (
            result["load_error"] or result["weight_mismatches"] or result["optim_mismatches"]
            or result["missing"] or result["extra"] or result["args_mismatches"]
        )
        with open(job["result"], "w") as f:
            json.dump(result, f, indent=1)


def verify_job(job: dict) -> None:
    m, layout = model_spec(job.get("model", {})), layout_spec(job["layout"])
    dp = init_parallel(m, layout)
    chunks = build_model(m, layout, transformer_config(m, layout))
    expected_args = megatron_args(m, layout, dp, iteration=0)  # iteration is not checked
    try:
        outcome = (None, load_legacy_model(job["load_dir"], layout, chunks, expected_args))
    except Exception as exc:  # reported, not raised: every rank must reach the collectives
        outcome = (f"rank {dist.get_rank()}: {type(exc).__name__}: {exc}", [])
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    errors = [error for error, _ in outcomes if error]

    result = {"ok": False, "mismatches": [], "missing": [], "extra": [], "loss": None}
    if not errors:
        result["loss"] = eval_loss(chunks, m)
        got, bad = gather_global(chunks)
    if dist.get_rank() != 0:
        return
    truth = torch.load(job["truth"], weights_only=False)
    result["truth_loss"] = truth["loss"]
    result["load_error"] = "\n".join(errors) or None
    result["args_mismatches"] = sorted({name for _, names in outcomes for name in names})
    if not errors:
        result.update(compare(truth["tensors"], got, bad))
        result["ok"] = not (
            result["mismatches"] or result["missing"] or result["extra"] or result["args_mismatches"]
        )
    with open(job["result"], "w") as f:
        json.dump(result, f, indent=1)


def logits_job(job: dict) -> None:
    """Strict load of DIR at this layout (as verify); rank 0 writes the full-vocabulary logits of
    job["tokens"], run through the pipeline schedule in micro batches (each DP rank runs it all)."""
    m, layout = model_spec(job.get("model", {})), layout_spec(job["layout"])
    dp = init_parallel(m, layout)
    chunks = build_model(m, layout, transformer_config(m, layout))
    mismatched = load_legacy_model(job["load_dir"], layout, chunks, megatron_args(m, layout, dp, iteration=0))
    tokens = torch.tensor(job["tokens"])
    positions = torch.arange(tokens.shape[1]).expand(m["micro_batch"], -1)
    batches = [{"tokens": mb, "position_ids": positions} for mb in tokens.split(m["micro_batch"])]

    def forward(data_iterator, model):
        batch = next(data_iterator)
        logits = model(batch["tokens"], batch["position_ids"], None)  # no labels: [b, s, vocab / tp]
        return logits, lambda out: (out.sum() * 0, {"logits": out.detach()})

    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=forward, data_iterator=[iter(batches) for _ in chunks], model=chunks,
            num_microbatches=len(batches), seq_length=tokens.shape[1], micro_batch_size=m["micro_batch"],
            forward_only=True)
    mine = None
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_data_parallel_rank() == 0:
        mine = (ps.get_tensor_model_parallel_rank(), torch.cat([r["logits"] for r in reports]))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, mismatched))
    if dist.get_rank() == 0:
        pieces = sorted((piece for piece, _ in gathered if piece is not None), key=lambda p: p[0])
        torch.save({"logits": torch.cat([logits for _, logits in pieces], dim=-1),
                    "args_mismatches": sorted({name for _, names in gathered for name in names})}, job["result"])


def save_timing_job(job: dict) -> None:
    """Time Megatron-LM's legacy save after one training step, `repeat` times each without
    hooks ("plain"), with ckpt_hooks.patches.megatron_core installed ("hooked": param_maps) and
    through ckpt_hooks.megatron.save ("library": param_maps and manifest), interleaved in a
    rotating order; rank 0 writes job["result"]:
    {"plain": [s], "hooked": [s], "library": [s], "checkpoint_bytes": int, "hook_bytes": int}
    (hook_bytes: what the library save adds)."""
    from ckpt_hooks.megatron import save
    from ckpt_hooks.patches import megatron_core as patch

    m, layout = model_spec(job.get("model", {})), layout_spec(job["layout"])
    dp, config, chunks, optimizer, scheduler = build_training(m, layout, 1)
    train_steps(chunks, optimizer, scheduler, m, 1, 1)
    args = megatron_args(m, layout, dp, 1)
    kinds = ["plain", "hooked", "library"]
    times = {kind: [] for kind in kinds}
    for i in range(job["repeat"]):
        for kind in kinds[i % 3:] + kinds[:i % 3]:  # no order advantage
            save_dir = os.path.join(job["save_dir"], f"{kind}{i}")
            dist.barrier()
            started = time.perf_counter()
            if kind == "library":
                save(chunks, optimizer, save_dir, 1, scheduler=scheduler, args=args)
            else:
                if kind == "hooked":
                    patch.install()
                save_legacy_checkpoint(save_dir, 1, layout, chunks, optimizer, scheduler, args)
                patch.uninstall()
            times[kind].append(time.perf_counter() - started)
    # The hooks' own work, timed alone (the end-to-end saves above vary by more than it costs).
    from ckpt_hooks.megatron.checkpoint import write_manifest
    from ckpt_hooks.megatron.save import write_param_maps

    saved = os.path.join(job["save_dir"], "library0")
    scratch = os.path.join(job["save_dir"], f"maps{dist.get_rank()}")
    os.makedirs(scratch, exist_ok=True)
    maps, manifest = [], []
    for _ in range(job["repeat"]):
        started = time.perf_counter()
        write_param_maps(optimizer, scratch, Rank(ps.get_tensor_model_parallel_rank(),
                                                  ps.get_pipeline_model_parallel_rank()), ps.get_data_parallel_rank())
        maps.append(time.perf_counter() - started)
        if dist.get_rank() == 0:
            started = time.perf_counter()
            write_manifest(os.path.join(saved, "iter_0000001"))
            manifest.append(time.perf_counter() - started)
    all_maps = [None] * dist.get_world_size()
    dist.all_gather_object(all_maps, maps)
    if dist.get_rank() == 0:
        def size(path, hook_files):
            return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
                       if f.endswith(".json") == hook_files)
        with open(job["result"], "w") as f:
            json.dump({**times, "param_maps": [max(t) for t in zip(*all_maps)], "manifest": manifest,
                       "checkpoint_bytes": size(saved, False), "hook_bytes": size(saved, True)}, f)


class PeakRss:
    """The peak resident set size of this process while in the block, above its size on entry
    (sampled every 2 ms from /proc/self/statm)."""

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import threading

        self.base = self.peak = self._rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.PAGE

    def _sample(self):
        while not self._done.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.above = self.peak - self.base


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def dist_save_timing_job(job: dict) -> None:
    """One training step, then `repeat` torch_dist saves each (interleaved) of the default
    dp_reshardable state with the ckpt_hooks save hook (the param_map recorded per rank) and of
    fully_reshardable state (--dist-ckpt-optim-fully-reshardable). Rank 0 writes job["result"]:
    {"dp_reshardable+hook": [s], "fully_reshardable": [s]} (slowest rank). The first of each
    stays in save_dir/{dpr,full}0 for dist_load_timing."""
    from ckpt_hooks.megatron.save import write_param_maps
    from ckpt_hooks.megatron.torch_dist import recorded_maps_dir

    m, layout = model_spec(job.get("model", {})), layout_spec(job["layout"])
    dp, config, chunks, optimizer, scheduler = build_training(m, layout, 1)
    train_steps(chunks, optimizer, scheduler, m, 1, 1)
    args = megatron_args(m, layout, dp, 1, ckpt_format="torch_dist")
    rank = Rank(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
    times = {"dp_reshardable+hook": [], "fully_reshardable": []}
    for i in range(job["repeat"]):
        for kind in (list(times) if i % 2 == 0 else list(times)[::-1]):
            save_dir = os.path.join(job["save_dir"], f"{'dpr' if kind.startswith('dp') else 'full'}{i}")
            dist.barrier()
            started = time.perf_counter()
            save_torch_dist_checkpoint(save_dir, 1, chunks, optimizer, scheduler, args, kind.split("+")[0])
            if kind.startswith("dp"):
                dopt = distributed_optimizers(optimizer)[0]
                write_param_maps(dopt, recorded_maps_dir(os.path.join(save_dir, "iter_0000001"), rank,
                                                                ParallelConfig(pp=layout["pp"])),
                                 rank, dopt.data_parallel_group.rank())
            times[kind].append(_max_over_ranks(time.perf_counter() - started))
    if dist.get_rank() == 0:
        with open(job["result"], "w") as f:
            json.dump(times, f)


def megatron_lm_legacy_load(load_dir, layout, chunks, optimizer, scheduler) -> int:
    """Megatron-LM's load_checkpoint of a legacy checkpoint at its own layout and nothing more
    (a benchmark's baseline): the rank's model file, the optimizer's and scheduler's state, then
    load_parameter_state (DP rank 0 reads distrib_optim.pt and scatters it over its DP group).
    Returns the bytes this rank read (torch.load reads whole files)."""
    _, ckpt_dir, state = read_model_file(load_dir, layout)
    load_model_state(state, ckpt_dir, chunks)
    load_parameter_state(optimizer, ckpt_dir,
                         load_optimizer_state(state, optimizer, scheduler, ckpt_dir, check_file=False))
    reads_optimizer = any(o.data_parallel_group.rank() == 0 for o in distributed_optimizers(optimizer))
    return sum(os.path.getsize(os.path.join(ckpt_dir, name)) for name in
               ["model_optim_rng.pt", *(["distrib_optim.pt"] if reads_optimizer else [])])


def load_timing_job(job: dict) -> None:
    """`repeat` loads at this layout by "loader" ("ckpt_hooks": ckpt_hooks.megatron.load;
    "megatron_core": megatron-core's own dist_checkpointing.load of torch_dist;
    "megatron_lm_legacy": Megatron-LM's load of the legacy format) of job["load_dir"]. Rank 0
    writes job["result"]: {"seconds": [s] (slowest rank), "peak_rss": [bytes] (largest rank's
    peak RSS above its size before the load), "bytes_read": [bytes] per rank (ckpt_hooks and
    the legacy load; the last load's)}."""
    from ckpt_hooks.megatron import load

    m, layout = model_spec(job.get("model", {})), layout_spec(job["layout"])
    _, _, chunks, optimizer, scheduler = build_training(m, layout, 1)
    seconds, peaks = [], []
    for _ in range(job["repeat"]):
        dist.barrier()
        started = time.perf_counter()
        with PeakRss() as rss:
            read = None
            if job["loader"] == "ckpt_hooks":
                loaded = load(chunks, optimizer, job["load_dir"])
                scheduler.load_state_dict(loaded.scheduler)
                read = loaded.bytes_read
            elif job["loader"] == "megatron_lm_legacy":
                read = megatron_lm_legacy_load(job["load_dir"], layout, chunks, optimizer, scheduler)
            else:
                megatron_core_dist_load(job["load_dir"], layout, chunks, optimizer, scheduler)
        seconds.append(_max_over_ranks(time.perf_counter() - started))
        peaks.append(_max_over_ranks(rss.above))
    reads = [None] * dist.get_world_size()
    dist.all_gather_object(reads, read)
    if dist.get_rank() == 0:
        with open(job["result"], "w") as f:
            json.dump({"seconds": seconds, "peak_rss": peaks, "bytes_read": reads}, f)


JOBS = {"train": train_job, "verify": verify_job, "resume": resume_job, "save_timing": save_timing_job,
        "logits": logits_job, "dist_save_timing": dist_save_timing_job, "load_timing": load_timing_job}


def main() -> None:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    dist.init_process_group("gloo")
    try:
        started = time.perf_counter()
        for i, job in enumerate(jobs):
            if dist.get_rank() == 0:
                threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else "?"
                print(f"[megatron_run] {time.perf_counter() - started:7.1f} s  {threads} threads  job {i}: "
                      f"{job['kind']} {job.get('layout')}", flush=True)
            patches = [importlib.import_module(f"ckpt_hooks.patches.{name}") for name in job.get("patches", [])]
            for patch in patches:
                patch.install()
            try:
                JOBS[job["kind"]](job)
            finally:
                for patch in patches:
                    patch.uninstall()
    except Exception:
        # torchrun then stops the other ranks; the traceback lands in run_jobs' error.
        traceback.print_exc()
        sys.exit(1)
    destroy_groups()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
