"""torchrun entry point: `train` and `verify` jobs on a tiny megatron-core GPT (CPU, gloo).

    torchrun --nproc-per-node 4 -m tests.harness.megatron_run JOBS.json   (from the repo root)
    torchrun --nproc-per-node 4 tests/harness/megatron_run.py JOBS.json   (by path)

JOBS.json is a list of jobs, run one after the other in one process group; model parallel
state is destroyed and re-initialised between jobs.  The schema is in tests/harness/__init__.py.
"""

import argparse
import json
import os
import random
import sys
import traceback
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # so that running by path works

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.harness import cpu_shim  # noqa: E402
from tests.harness.spec import VOCAB_KEYS, layout_spec, model_spec, padded_vocab, true_vocab  # noqa: E402

# Patch before megatron-core modules are imported and look anything up in torch.cuda.
cpu_shim.install()

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.dist_checkpointing.dict_utils import nested_values  # noqa: E402
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
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402
from megatron.core.utils import unwrap_model  # noqa: E402

LR = 1e-2
WEIGHT_DECAY = 0.01  # Megatron-LM's default --weight-decay
NORM_EPS = 1e-5
ROTARY_BASE = 10000


# ----------------------------------------------------------------------------- setup


def init_parallel(m: dict, layout: dict) -> int:
    """(Re)initialise model parallel state and seeds as Megatron-LM's initialize does."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout["tp"],
        pipeline_model_parallel_size=layout["pp"],
        virtual_pipeline_model_parallel_size=layout["vpp"],
    )
    # Megatron-LM's _set_random_seed: the seed is offset by 100 per pipeline rank.
    seed = m["seed"] + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ps.get_data_parallel_world_size()


def transformer_config(m: dict, layout: dict) -> TransformerConfig:
    bf16 = m["dtype"] == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=m["num_layers"],
        hidden_size=m["hidden"],
        ffn_hidden_size=m["ffn"],
        num_attention_heads=m["heads"],
        num_query_groups=m["query_groups"],
        gated_linear_unit=m["swiglu"],
        activation_func=F.silu if m["swiglu"] else F.gelu,
        normalization=m["normalization"],
        layernorm_epsilon=NORM_EPS,
        add_bias_linear=m["add_bias_linear"],
        add_qkv_bias=m["add_bias_linear"],  # Megatron-LM keeps the two in sync
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
    )


def build_model(m: dict, layout: dict, config: TransformerConfig) -> list:
    """Model chunks (one per virtual stage), wrapped as Megatron-LM's get_model wraps them."""
    chunks = []
    for vp_stage in range(layout["vpp"]) if layout["vpp"] else [None]:
        model = GPTModel(
            config=config,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization=m["normalization"]),
            vocab_size=padded_vocab(m, layout["tp"]),
            max_sequence_length=m["seq_length"],
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=not m["untie_embeddings"],
            position_embedding_type=m["position_embedding"],
            rotary_base=ROTARY_BASE,
            vp_stage=vp_stage,
        )
        model.model_type = ModelType.encoder_or_decoder
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        if config.bf16:
            model = Float16Module(config, model)
        chunks.append(model)
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True, overlap_grad_reduce=False, grad_reduce_in_fp32=True
    )
    return [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def megatron_args(m: dict, layout: dict, dp: int, iteration: int) -> argparse.Namespace:
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
        expert_model_parallel_size=1,
        expert_tensor_parallel_size=tp,
        sequence_parallel=False,
        num_experts=None,
        num_layers=m["num_layers"],
        encoder_num_layers=m["num_layers"],
        hidden_size=m["hidden"],
        ffn_hidden_size=m["ffn"],
        num_attention_heads=m["heads"],
        group_query_attention=m["query_groups"] != m["heads"],
        num_query_groups=m["query_groups"],
        kv_channels=m["hidden"] // m["heads"],
        multi_latent_attention=False,
        qk_layernorm=False,
        seq_length=m["seq_length"],
        max_position_embeddings=m["seq_length"],
        vocab_size=m["vocab_size"],
        padded_vocab_size=padded_vocab(m, tp),
        make_vocab_size_divisible_by=m["make_vocab_size_divisible_by"],
        tokenizer_type="NullTokenizer",
        vocab_file=None,
        swiglu=m["swiglu"],
        normalization=m["normalization"],
        norm_epsilon=NORM_EPS,
        apply_layernorm_1p=False,
        position_embedding_type=m["position_embedding"],
        add_position_embedding=m["position_embedding"] == "learned_absolute",
        use_rotary_position_embeddings=m["position_embedding"] == "rope",
        rotary_base=ROTARY_BASE,
        rotary_percent=1.0,
        rotary_interleaved=False,
        add_bias_linear=m["add_bias_linear"],
        add_qkv_bias=m["add_bias_linear"],
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
        ckpt_format="torch",
        use_dist_ckpt=False,
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


def local_shards(chunks: list) -> list:
    """This rank's pieces of every global tensor, from megatron-core's own sharded_state_dict.

    Each piece is (key, global_shape, global_offset, data, is_main_replica); data is reshaped
    to include the prepended (layer) axes so that offsets and shape line up.
    """
    shards = []
    for chunk in unwrap_model(chunks):
        for item in nested_values(chunk.sharded_state_dict()):
            if isinstance(item, ShardedTensorFactory):  # SwiGLU fc1: gate and up halves
                pieces = item.build()
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


def gather_global(chunks: list):
    """On rank 0: ({key: full tensor}, {keys whose replicas disagree or that have holes}).

    Every replica is gathered (the models are tiny) so that, e.g., a norm weight that differs
    between two TP ranks' files is caught, not just the main copy.
    """
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local_shards(chunks))
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


# ----------------------------------------------------------------------------- checkpoint files


def mp_rank_dir(iteration_dir: str, layout: dict) -> str:
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{tp_rank:02d}" if layout["pp"] == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(iteration_dir, name)


def model_keys(n_chunks: int) -> list:
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


def save_legacy_checkpoint(save_dir, iteration, layout, chunks, optimizer, scheduler, args):
    """Writes what Megatron-LM's save_checkpoint writes with --ckpt-format torch."""
    ckpt_dir = mp_rank_dir(os.path.join(save_dir, f"iter_{iteration:07d}"), layout)
    os.makedirs(ckpt_dir, exist_ok=True)
    # Collective over the DP group; the DP-rank-0 process writes the file.
    optimizer.save_parameter_state(os.path.join(ckpt_dir, "distrib_optim.pt"))
    if ps.get_data_parallel_rank() == 0:
        state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration}
        for key, chunk in zip(model_keys(len(chunks)), unwrap_model(chunks)):
            state[key] = chunk.state_dict_for_save_checkpoint()
        state["optimizer"] = optimizer.state_dict()
        state["opt_param_scheduler"] = scheduler.state_dict()
        # Megatron-LM's get_rng_state (one entry: no --data-parallel-random-init); the shim
        # makes the "cuda" states the CPU generator's.
        state["rng_state"] = [
            {
                "random_rng_state": random.getstate(),
                "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(),
                "cuda_rng_state": torch.cuda.get_rng_state(),
                "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
            }
        ]
        state["num_floating_point_operations_so_far"] = 0
        torch.save(state, os.path.join(ckpt_dir, "model_optim_rng.pt"))
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    dist.barrier()


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


def load_legacy_model(load_dir, layout, chunks, expected_args) -> list:
    """Loads this rank's model_optim_rng.pt strictly into every chunk.

    Returns the names in CHECKED_ARGS whose saved value differs from `expected_args`.
    """
    with open(os.path.join(load_dir, "latest_checkpointed_iteration.txt")) as f:
        iteration = int(f.read().strip())
    ckpt_dir = mp_rank_dir(os.path.join(load_dir, f"iter_{iteration:07d}"), layout)
    # weights_only=False: the file holds an argparse.Namespace; it is our own test output.
    state = torch.load(os.path.join(ckpt_dir, "model_optim_rng.pt"), weights_only=False)
    keys = model_keys(len(chunks))
    found = sorted(k for k in state if k.startswith("model"))
    if found != sorted(keys):
        raise KeyError(f"{ckpt_dir}: model entries {found}, expected {keys}")
    for key, chunk in zip(keys, unwrap_model(chunks)):
        chunk.load_state_dict(state[key], strict=True)
    saved = vars(state["args"])
    return [n for n in CHECKED_ARGS if saved.get(n, "<absent>") != getattr(expected_args, n)]


# ----------------------------------------------------------------------------- jobs


def train_job(job: dict) -> None:
    m, layout = model_spec(job.get("model", {})), layout_spec(job["layout"])
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
    samples = job["steps"] * m["global_batch"]
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

    generator = torch.Generator().manual_seed(m["seed"])
    train_losses = []
    for _ in range(job["steps"]):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        train_losses.append(run_schedule(chunks, microbatches(token_batches(generator, m), m), m, False))
        update_successful, _, _ = optimizer.step()
        assert update_successful, "optimizer step skipped"
        scheduler.step(increment=m["global_batch"])

    args = megatron_args(m, layout, dp, job["steps"])
    save_legacy_checkpoint(job["save_dir"], job["steps"], layout, chunks, optimizer, scheduler, args)
    loss = eval_loss(chunks, m)
    tensors, bad = gather_global(chunks)
    if dist.get_rank() == 0:
        if bad:
            raise RuntimeError(f"megatron's own shards are inconsistent for {sorted(bad)}")
        truth = {
            "tensors": tensors,
            "loss": loss,
            "train_losses": train_losses,
            "layout": layout,
            "model": m,
            "padded_vocab": padded_vocab(m, layout["tp"]),
        }
        torch.save(truth, job["truth"])


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


JOBS = {"train": train_job, "verify": verify_job}


def main() -> None:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    dist.init_process_group("gloo")
    try:
        for i, job in enumerate(jobs):
            if dist.get_rank() == 0:
                print(f"[megatron_run] job {i}: {job['kind']} {job.get('layout')}", flush=True)
            JOBS[job["kind"]](job)
    except Exception:
        # torchrun then stops the other ranks; the traceback lands in run_jobs' error.
        traceback.print_exc()
        sys.exit(1)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
