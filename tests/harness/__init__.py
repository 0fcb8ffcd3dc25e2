"""Test harness: real megatron-core 0.16.1 training and verification under torchrun (CPU, gloo).

`run_jobs(jobs, workdir)` runs a list of jobs in ONE `torchrun --nproc-per-node 4` launch
(processes cost ~5 s of imports each here, so batch jobs).  World size is 4; DP = 4 / (tp*pp).

Job schema (JSON-able dicts; omitted model/layout fields take the defaults in spec.py):

  layout = {"tp": int, "pp": int, "vpp": int|None, "first": int|None, "last": int|None, "ep": 1,
            "etp": int|None (None: TP)}
      first/last: layers in the first/last pipeline stage (uneven PP); ep/etp: expert parallel and
      expert tensor parallel sizes (models with experts).
  model  = {"num_layers": 4, "hidden": 64, "heads": 4, "query_groups": 2, "ffn": 128,
            "swiglu": True, "normalization": "RMSNorm", "position_embedding": "rope",
            "add_bias_linear": False, "untie_embeddings": True, "vocab_size": 99,
            "make_vocab_size_divisible_by": 16, "seq_length": 16, "micro_batch": 2,
            "global_batch": 8, "seed": 1234, "dtype": "fp32" | "bf16", "norm_eps": 1e-5,
            "rotary_base": 10000, "add_qkv_bias": None (= add_bias_linear),
            "experts": None | routed experts per layer, "moe_ffn": 32, "topk": 2,
            "shared_ffn": None | shared experts' ffn, "shared_gate": False,
            "moe_layer_freq": None | [0 or 1 per layer], "router_pre_softmax": False, "topk_scaling": None,
            "qk_layernorm": False, "mla": None | {"q_lora_rank", "kv_lora_rank", "qk_head_dim",
            "qk_pos_emb_head_dim", "v_head_dim", YaRN's "rope_type": "yarn", ... (spec.py)},
            "grouped_gemm": False (the legacy GroupedMLP), "noop_layers": None | [global layers]}
      A mixture of experts uses SequentialMLP experts and the allgather token dispatcher (the
      alltoall one needs CUDA events and uneven collectives gloo lacks), aux-loss coefficient 0,
      and with TP > 1 sequence parallelism (megatron-core's MoE layer demands it; the CPU shim
      lets the local spec's torch norms run under it).
      Multi-Latent Attention ("mla") uses megatron-core's MLASelfAttention (local spec: its down
      projections column-parallel) with plain RoPE or YaRN and its latents RMS-normed; its core attention is
      cpu_shim.CpuAttention (megatron-core 0.16.1's local DotProductAttention takes one head size,
      MLA's keys and values differ; Transformer Engine's does it on GPUs).
      vocab_size is Megatron-LM's --vocab-size for NullTokenizer: true vocab = vocab_size + 1.

  {"kind": "train", "model": {...}, "layout": {...}, "steps": int, "save_dir": DIR, "truth": PATH}
      Trains `steps` steps and saves a Megatron-LM legacy (--ckpt-format torch) checkpoint in
      DIR (iter_{steps:07d}/mp_rank_TT[_PPP]/{model_optim_rng.pt,distrib_optim.pt} and
      latest_checkpointed_iteration.txt), as Megatron-LM writes them, or with "saver":
      "ckpt_hooks" through ckpt_hooks.megatron.save (args described from the model).
      With "format": "torch_dist" it saves as Megatron-LM's save_checkpoint does with
      --ckpt-format torch_dist (megatron-core's dist_checkpointing.save, fully parallel over DP,
      iter_{steps:07d}/{.metadata, __*_*.distcp, common.pt, metadata.json}), the optimizer as
      "optim_format" says ("dp_reshardable", Megatron-LM's default, or "fully_reshardable").
      With "train_on_to": N it trains on to step N after the save (the run a resumed one continues).
      PATH gets (torch.save) {"tensors": {sharded key: full global tensor}, "optimizer": {...},
      "param_map": [...], "loss": eval loss, "train_losses": [loss of step 1, 2, ...], "layout",
      "model", "padded_vocab"}.
      "optimizer": {"param" | "exp_avg" | "exp_avg_sq": {sharded key: full global fp32 tensor}}:
          the DistributedOptimizer's fp32 main params and Adam moments after the last step, in
          the same keys and global form as "tensors" (vocab rows padded as the model).  Built
          without the flat buffer layout: per model param, each DP rank's slice (its range in
          the flattened param) from the optimizer's _get_main_param_and_optimizer_states is
          all-gathered over the DP group, reshaped to the param, and placed through megatron's
          own sharded_state_dict for that param (SwiGLU factory included), like the weights.
          (megatron-core 0.16.1's own "fully_sharded_model_space" optimizer.sharded_state_dict
          raises "ShardedTensor.flattened_range is not supported".)
      "param_map": one entry per rank that writes a model file, sorted by (tp_rank, pp_rank,
          ep_rank), read from the live DDP buffers of its expert-DP rank 0 (all ranks of one
          (tp, pp, ep) are checked to agree):
          {"tp_rank", "pp_rank", "ep_rank", "buffers": [buffer, ...]} with buffers in the optimizer's
          gbuf_idx order (DistributedOptimizer.buffers: model chunks, then each chunk's buffers;
          the integer keys of distrib_optim.pt), each
          {"chunk": vp index, "param_dtype": "float32" | "bfloat16", "grad_dtype": ...,
           "dp_size": the buffer's DP size (expert buffers: the expert-DP size),
           "expert": whether it is an expert buffer (params megatron-core does not all-reduce: routed
              experts with EP > 1; their own DistributedOptimizer, the second of the chain),
           "numel": buffer.numel (with padding),
           "numel_unpadded": buffer.numel_unpadded (= the file's "numel_unpadded"),
           "bucket_indices": [[start, end], ...] (buffer positions, bucket-end padding included),
           "per_bucket_numel_unpadded": [...],
           "params": [[name, shape, start, end, bucket_id], ...]}  ascending start, as in
              buffer.param_index_map; name = the key in that chunk's
              state_dict_for_save_checkpoint() (chunk-local layer numbers, no "module.").
          A param's elements in distrib_optim.pt's flat tensors are [start - d, end - d) with
          d = bucket_indices[b][0] - sum(per_bucket_numel_unpadded[:b]) (bucket-end padding is
          removed there; the 64-element gaps between params are kept).
  {"kind": "verify", "model": {...}, "layout": {...}, "load_dir": DIR, "truth": PATH,
   "result": OUT.json}
      Loads DIR's latest iteration strictly at this layout (torch.load + load_state_dict(strict))
      and compares with the truth bitwise.  OUT.json gets {"ok", "mismatches", "missing",
      "extra", "loss", "truth_loss", "load_error", "args_mismatches"}; ok needs all lists empty
      and no load_error.  args_mismatches: saved args (layout, padded vocab, architecture: see
      CHECKED_ARGS in megatron_run.py) that differ from what this layout's run would save.
  {"kind": "resume", "model": {...}, "layout": {...}, "load_dir": DIR, "truth": PATH, "steps": M,
   "result": OUT.json}
      Builds model + DDP + DistributedOptimizer + scheduler exactly as `train`, then loads DIR's
      latest iteration as Megatron-LM's load_checkpoint does (--ckpt-format torch
      --use-distributed-optimizer): strict load_state_dict per chunk, optimizer.load_state_dict(
      state["optimizer"]), optimizer.load_parameter_state(distrib_optim.pt), the scheduler from
      "opt_param_scheduler", the RNG from "rng_state" (if present), the iteration from
      "iteration".  With megatron-core 0.16.1 + torch AdamW that needs (done here): the shared
      `step` tensor that load_state_dict puts into every param's state taken out around
      load_parameter_state (else KeyError 'step'), then one `step` tensor per param restored
      (a shared one is advanced once per param: silent bias-correction drift), and torch.no_grad
      around the copy into the fp32 main params.  Then it compares, bitwise, the weights with
      the truth's "tensors" (as verify; also right after the model file alone, since for fp32
      distrib_optim.pt overwrites the weights) and the loaded optimizer state, gathered as in
      the truth's "optimizer", with it, and trains M more steps: steps iteration+1..iteration+M
      of the same data stream as an uninterrupted run (M = 0: load and check only).
      OUT.json: {"ok", "weight_mismatches": [key], "optim_mismatches": ["exp_avg:<key>", ...,
      "step" when a param's Adam step is not the iteration or is shared], "missing": [key or
      "<state>:<key>" in the truth but not loaded], "extra", "load_error": str | None,
      "losses": [M floats], "iteration": loaded iteration (None on a load error),
      "args_mismatches" (as verify), "weight_mismatches_model_file", "loss": eval loss after the
      load, "truth_loss"}.  ok needs all lists empty and no load_error.  A load failure (any
      rank) is reported in load_error with losses [] and no training, never a hang: distrib_optim.pt
      is read and checked on DP rank 0 (keys, dtypes, numel_unpadded, exact fp32 lengths) before
      the collective load.  Reference curve: a `train` job with N+M steps at the layout of the
      N-step checkpoint; its train_losses[N:N+M] equal the resumed losses bit for bit at the same
      layout.
      With "loader": "ckpt_hooks" the load is instead ckpt_hooks.megatron.load(chunks, optimizer,
      DIR) (reshards on the fly from DIR's layout; no args check, since DIR's args describe its
      own layout), and each rank writes OUT.json.bytes.<rank>.json: {"bytes_read", "tp_rank",
      "pp_rank", "dp_rank"}.
      With "loader": "megatron_core_dist" DIR is a torch_dist checkpoint loaded as Megatron-LM's
      load_checkpoint does (megatron-core's dist_checkpointing.load at this layout; see
      load_torch_dist_like_megatron_lm for the megatron-core 0.16.1 workarounds it needs).
  {"kind": "save_timing", "model", "layout", "repeat": R, "save_dir": DIR, "result": OUT.json}
      One training step, then R legacy saves each without hooks, with
      ckpt_hooks.patches.megatron_core and through ckpt_hooks.megatron.save (interleaved);
      then the hooks' own work timed alone: "param_maps" (the slowest rank's write_param_maps)
      and "manifest" (rank 0's write_manifest). OUT.json: {"plain": [s], "hooked": [s],
      "library": [s], "param_maps": [s], "manifest": [s], "checkpoint_bytes", "hook_bytes"}.
      Used by bench/bench_save_hook.py.
  {"kind": "logits", "model", "layout", "load_dir": DIR, "tokens": [[int]], "result": OUT.pt}
      Loads DIR's latest iteration strictly at this layout (as verify) and runs the rows of
      "tokens" (a multiple of micro_batch rows) forward, no labels; OUT.pt (torch.save) gets
      {"logits": [rows, seq, padded_vocab] float tensor (TP pieces joined), "args_mismatches"
      (as verify)}.  Used to compare with an independent implementation (transformers).
  Any job may carry "patches": ["megatron_core", ...]: the ckpt_hooks.patches modules installed
  around it (install() before, uninstall() after).

Data: step i (1-based) trains on the i-th global batch of `global_batch` random sequences drawn
from one generator seeded with the model seed: a function of (seed, i), identical for every
layout and for a resumed run.  Each DP rank trains on its contiguous slice of the rows, as
Megatron's sampler does.  "loss" is the forward-only mean LM loss on a fixed batch (seed + 1).

Truth keys are megatron-core's sharded_state_dict keys, in global (layout-free) form:
  embedding.word_embeddings.weight        [padded_vocab, hidden]  (rows past true vocab: padding)
  output_layer.weight                     [padded_vocab, hidden]  (absent when tied)
  decoder.final_layernorm.weight          [hidden]
  decoder.layers.<name>                   [num_layers, ...]: leading GLOBAL layer axis, names:
    self_attention.linear_qkv.layer_norm_weight   (= input_layernorm.weight in the local spec)
    self_attention.linear_qkv.weight      [groups * (heads/groups + 2) * kv_channels, hidden]
                                          group-major: [q_0; k_0; v_0; q_1; k_1; v_1; ...]
    self_attention.linear_proj.weight     [hidden, heads * kv_channels]
    mlp.linear_fc1.layer_norm_weight      (= pre_mlp_layernorm.weight in the local spec)
    mlp.linear_fc1.weight                 [2 * ffn, hidden] = [all gate rows; all up rows]
    mlp.linear_fc2.weight                 [hidden, ffn]
    mlp.router.weight                     [experts, hidden]               (mixtures of experts)
    mlp.experts.experts.linear_fc1.weight [experts, 2 * moe_ffn, hidden]  leading GLOBAL expert axis
    mlp.experts.experts.linear_fc2.weight [experts, hidden, moe_ffn]
This global form equals a TP1·PP1 model's state_dict with the layers stacked.  bf16 runs keep
every tensor bf16 (Float16Module casts the norms too).
Vocabulary tensors compare rows [0:min(padded_src, padded_tgt)] bitwise; rows past the source's
padded size must be zero.  Every replica (TP-replicated norms, DP copies, a tied embedding's
last-stage copy) is compared, not just the main one; the same holds for the optimizer states.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from .spec import (  # noqa: F401  (re-exported for the tests)
    LAYOUT_DEFAULTS,
    MODEL_DEFAULTS,
    VOCAB_KEYS,
    layout_spec,
    model_spec,
    padded_vocab,
    true_vocab,
)

NPROC = 4
RUNNER = Path(__file__).resolve().parent / "megatron_run.py"


def bench_model(layers: int, hidden: int) -> dict:
    """The benchmarks' realistic GPT (GQA 8 heads / 4 groups, SwiGLU ffn 11/4 x hidden, 32k vocab)."""
    return {"num_layers": layers, "hidden": hidden, "heads": 8, "query_groups": 4, "ffn": hidden * 11 // 4,
            "vocab_size": 32000, "make_vocab_size_divisible_by": 128}


def train_job(layout: dict, save_dir, truth, model: dict | None = None, steps: int = 3,
              patches: tuple = (), saver: str = "megatron", ckpt_format: str = "torch",
              optim_format: str = "dp_reshardable", train_on_to: int | None = None) -> dict:
    """Train ``steps`` steps and save; with ``train_on_to`` train on after the save (the truth's
    ``train_losses`` then hold the uninterrupted run's losses up to that step)."""
    return {"kind": "train", "model": model or {}, "layout": layout, "steps": steps,
            "save_dir": str(save_dir), "truth": str(truth), "patches": list(patches), "saver": saver,
            "format": ckpt_format, "optim_format": optim_format, "train_on_to": train_on_to}


def verify_job(layout: dict, load_dir, truth, result, model: dict | None = None) -> dict:
    return {"kind": "verify", "model": model or {}, "layout": layout, "load_dir": str(load_dir),
            "truth": str(truth), "result": str(result)}


def resume_job(layout: dict, load_dir, truth, result, model: dict | None = None, steps: int = 2,
               loader: str = "megatron", patches: tuple = ()) -> dict:
    return {"kind": "resume", "model": model or {}, "layout": layout, "load_dir": str(load_dir),
            "truth": str(truth), "steps": steps, "result": str(result), "loader": loader,
            "patches": list(patches)}


def logits_job(layout: dict, load_dir, tokens, result, model: dict | None = None) -> dict:
    return {"kind": "logits", "model": model or {}, "layout": layout, "load_dir": str(load_dir),
            "tokens": [list(map(int, row)) for row in tokens], "result": str(result)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_jobs(jobs: list, workdir, timeout: float = 900) -> None:
    """Runs `jobs` in one torchrun launch; raises RuntimeError with the output tail on failure.

    The job file and the full log are kept in `workdir` (jobs-*.json / .log) for debugging.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fd, job_file = tempfile.mkstemp(prefix="jobs-", suffix=".json", dir=workdir)
    with os.fdopen(fd, "w") as f:
        json.dump(jobs, f, indent=1)
    log_file = Path(job_file).with_suffix(".log")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={NPROC}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(RUNNER), job_file]
    # One thread per process: 4 processes share 2 cores.  CUDA_DEVICE_MAX_CONNECTIONS=1 is
    # what Megatron-LM's launch scripts set; it only silences megatron-core's warning here.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            proc.wait(timeout=timeout)
            why = f"rc={proc.returncode}"
        except subprocess.TimeoutExpired:
            # torchrun starts each worker in its own session: SIGTERM lets it stop them.
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            why = f"timed out after {timeout} s"
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace")[-8000:]
        raise RuntimeError(f"megatron_run failed ({why}, log {log_file}):\n{tail}")


def run_megatron_lm(megatron_lm, mode: str, arguments: list, workdir, name: str, timeout: float = 600,
                    fault: str | None = None):
    """Megatron-LM's pretrain_gpt.py under torchrun on the CPU (megatron_lm_run.py), with the
    ckpt_hooks patch (mode "hooks") or without ("plain"); ``fault``: megatron_lm_run.py's
    CKPT_HOOKS_TEST_FAULT. Returns (exit code, {iteration: lm loss}, log text)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    losses, log_file = workdir / f"{name}.losses.json", workdir / f"{name}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={NPROC}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           str(Path(__file__).resolve().parent / "megatron_lm_run.py"), str(megatron_lm), str(losses), mode,
           *map(str, arguments)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"CKPT_HOOKS_TEST_FAULT": fault} if fault else {})}
    with open(log_file, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
    found = {int(k): v for k, v in json.loads(losses.read_text()).items()} if losses.exists() else {}
    return rc, found, log_file.read_text(errors="replace")
