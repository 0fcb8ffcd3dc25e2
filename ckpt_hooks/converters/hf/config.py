"""Hugging Face ``config.json`` <-> ModelSpec and Megatron-LM ``args``, for the families in names.LAYERS.

What a family's config cannot say in megatron-core (or the reverse) is refused with the reason,
never dropped: RoPE scaling other than Llama 3's, biases other than Qwen2's q/k/v ones, ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.converters.hf.names import LAYERS
from ckpt_hooks.algebra.spec import ModelSpec

CONFIG = "config.json"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
QKV_BIAS = ("qwen2", "qwen2_moe")           # families with q/k/v biases
QK_NORM = ("qwen3", "qwen3_moe")            # families with per-head q/k RMSNorms
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2")  # mixtures of experts
SHARED_EXPERT = ("qwen2_moe",)              # ... with a gated shared expert
UNGATED_SHARED_EXPERTS = ("deepseek_v2",)   # ... with shared experts, no gate
LATENT = ("deepseek_v2",)                   # Multi-Latent Attention
# The key that counts the routed experts, as transformers 5 writes it (either is read).
EXPERT_COUNT = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_local_experts",
                "deepseek_v2": "n_routed_experts"}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# megatron-core's Llama 3 RoPE scaling fixes all but the factor.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# What the Megatron model itself says: on the way back to HF these come from the checkpoint;
# every other key of the original config.json (token ids, Qwen2's layer_types and
# max_window_layers, ...) is carried through as it was.
MODEL_KEYS = {"architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
              "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling", "tie_word_embeddings", "vocab_size",
              "dtype", "torch_dtype", "attention_dropout", "initializer_range", "sliding_window", "use_sliding_window",
              "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
              "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
              "qkv_bias", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "qk_head_dim",
              "v_head_dim", "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "moe_layer_freq",
              "routed_scaling_factor", "topk_method", "n_group", "topk_group"}
# The files beside the weights that travel with a model: tokenizer and generation settings.
ASSETS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
          "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
ASSETS_DIR = "hf_assets"   # where a Megatron checkpoint written from HF keeps them


def read(directory) -> tuple[Path, dict, str]:
    """(path, config, family) of a Hugging Face model directory (or of its config file)."""
    path = Path(directory) if Path(directory).is_file() else Path(directory) / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(path, "missing: not a Hugging Face model directory") from None
    except ValueError as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None
    family = config.get("model_type") if isinstance(config, dict) else None
    if family not in LAYERS:
        raise CheckpointError(path, f"unsupported model_type {family!r} (supported: {', '.join(sorted(LAYERS))})")
    return path, config, family


def _rope(config: dict, path) -> tuple[float, dict]:
    """(rotary base, Megatron-LM's RoPE scaling arguments), from transformers 5's rope_parameters
    or 4's keys: Llama 3's scaling, or YaRN for latent attention (megatron-core's MLA has it)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    base = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return base, {}
    if kind == "llama3" and all(float(params.get(k, -1)) == v for k, v in _LLAMA3_FIXED.items()):
        return base, {"use_rope_scaling": True, "rope_scaling_factor": float(params["factor"])}
    if kind == "yarn" and config.get("model_type") in LATENT and params.get("truncate", True):
        return base, {"rope_type": "yarn", "rotary_scaling_factor": float(params["factor"]),
                      **{k: type(default)(params.get(k, default)) for k, default in _YARN.items()}}
    raise CheckpointError(path, f"RoPE scaling {params} has no megatron-core equivalent")


# YaRN's parameters (and transformers' defaults) under megatron-core's MLA names.
_YARN = {"original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
         "mscale_all_dim": 0.0}


def moe_layers(config: dict, family: str) -> set[int]:
    """The layers that are mixtures of experts: every one (Mixtral), or Qwen-MoE's
    ``decoder_sparse_step`` ones not in ``mlp_only_layers``."""
    layers = range(config.get("num_hidden_layers") or 0)
    if family == "mixtral":
        return set(layers)
    if family == "deepseek_v2":   # transformers: every layer from first_k_dense_replace on
        return set(layers[config.get("first_k_dense_replace") or 0:])
    if family not in MOE or not _expert_count(config):
        return set()
    step, dense = config.get("decoder_sparse_step") or 1, set(config.get("mlp_only_layers") or ())
    return {i for i in layers if i not in dense and (i + 1) % step == 0}


def _expert_count(config: dict):
    return config.get("num_local_experts", config.get("num_experts", config.get("n_routed_experts")))


def _experts(config: dict, family: str, path) -> dict:
    """The ModelSpec fields of a mixture of experts (none for a dense family)."""
    if family not in MOE:
        return {}
    count = _expert_count(config)
    ffn = config.get("intermediate_size" if family == "mixtral" else "moe_intermediate_size")
    if not isinstance(count, int) or not isinstance(ffn, int) or not isinstance(config.get("num_experts_per_tok"), int):
        raise CheckpointError(path, "the experts' count, ffn size or num_experts_per_tok is missing or not an integer")
    shared = config.get("shared_expert_intermediate_size") if family in SHARED_EXPERT else None
    if family in UNGATED_SHARED_EXPERTS:
        shared = (config.get("n_shared_experts") or 0) * ffn
    return {"num_experts": count, "moe_ffn_hidden_size": ffn, "shared_expert_ffn_hidden_size": shared or None}


def _latent(config: dict, family: str, path) -> dict:
    """The ModelSpec fields of Multi-Latent Attention (none for other families)."""
    if family not in LATENT:
        return {}
    dims = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    q_lora_rank = config.get("q_lora_rank")
    if not all(isinstance(config.get(k), int) for k in dims) or not isinstance(q_lora_rank, (int, type(None))):
        raise CheckpointError(path, f"{', '.join(dims)} must be integers (q_lora_rank an integer or null)")
    return {"kv_lora_rank": config["kv_lora_rank"], "q_lora_rank": q_lora_rank,
            "qk_head_dim": config["qk_nope_head_dim"], "qk_pos_emb_head_dim": config["qk_rope_head_dim"],
            "v_head_dim": config["v_head_dim"], "kv_channels": config["v_head_dim"]}


def model_spec(config: dict, path, family: str, true_vocab_size: int | None = None,
               make_vocab_size_divisible_by: int = 128) -> ModelSpec:
    """The model a config describes; its vocabulary unpadded (padded_vocab_size = true vocabulary)."""
    def need(key):
        if not isinstance(config.get(key), int):
            raise CheckpointError(path, f"'{key}' missing or not an integer")
        return config[key]

    refusals = [("hidden_act", config.get("hidden_act", "silu") != "silu", "only SwiGLU (silu) MLPs are supported"),
                ("attention_bias", config.get("attention_bias"), "q/k/v/o biases have no megatron-core form"),
                ("mlp_bias", config.get("mlp_bias"), "MLP biases alone have no megatron-core form"),
                ("use_sliding_window", config.get("use_sliding_window"), "Qwen2's sliding window is not supported"),
                ("topk_method", config.get("topk_method", "greedy") != "greedy",
                 "only greedy top-k routing is supported (not group-limited)"),
                ("moe_layer_freq", (config.get("moe_layer_freq") or 1) != 1, "only every layer past "
                                                                           "first_k_dense_replace as MoE")]
    for key, refused, why in refusals:
        if refused:
            raise CheckpointError(path, f"{key} {config[key]!r}: {why}")
    _rope(config, path)
    heads, hidden, vocab = need("num_attention_heads"), need("hidden_size"), need("vocab_size")
    groups = config.get("num_key_value_heads") or heads
    if family in LATENT and groups != heads:
        raise CheckpointError(path, f"num_key_value_heads {groups}: latent attention has one key per head ({heads})")
    if heads % groups:
        raise CheckpointError(path, f"num_key_value_heads {groups} does not divide num_attention_heads {heads}")
    true_vocab = true_vocab_size or vocab
    if true_vocab > vocab:
        raise CheckpointError(path, f"true vocabulary {true_vocab} is larger than vocab_size {vocab}")
    fields = {"kv_channels": config.get("head_dim") or hidden // heads, **_experts(config, family, path),
              **_latent(config, family, path)}
    return ModelSpec(num_layers=need("num_hidden_layers"), hidden_size=hidden,
                     ffn_hidden_size=need("intermediate_size"),
                     num_attention_heads=heads, num_query_groups=groups, padded_vocab_size=true_vocab,
                     true_vocab_size=true_vocab, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                     swiglu=True, tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                     add_bias_linear=False, add_qkv_bias=bool(config.get("qkv_bias", family in QKV_BIAS)),
                     position_embedding_type="rope", normalization="RMSNorm", **fields)


def megatron_args(config: dict, path, spec: ModelSpec, params_dtype: torch.dtype, layer_spec: str,
                  tokenizer: str | None, iteration: int) -> argparse.Namespace:
    """Megatron-LM's ``args`` for the model (the layout is set by spec.updated_args)."""
    base, scaling = _rope(config, path)
    window = config.get("sliding_window") if config["model_type"] == "mistral" else None
    max_positions = config.get("max_position_embeddings") or 4096
    return argparse.Namespace(
        num_layers=spec.num_layers, encoder_num_layers=spec.num_layers, hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size, num_attention_heads=spec.num_attention_heads,
        group_query_attention=spec.num_query_groups != spec.num_attention_heads,
        num_query_groups=spec.num_query_groups, kv_channels=spec.kv_channels,
        max_position_embeddings=max_positions, seq_length=max_positions,
        vocab_size=spec.true_vocab_size, padded_vocab_size=spec.padded_vocab_size,
        make_vocab_size_divisible_by=spec.make_vocab_size_divisible_by,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer and str(tokenizer),
        swiglu=True, normalization="RMSNorm", norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        apply_layernorm_1p=False, position_embedding_type="rope", add_position_embedding=False,
        use_rotary_position_embeddings=True, rotary_base=base, rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=False, rope_scaling_factor=8.0,
        # HF's sliding_window w attends to the w - 1 previous tokens: flash attention's (w - 1, 0).
        window_size=(window - 1, 0) if window else None,
        add_bias_linear=False, add_qkv_bias=spec.add_qkv_bias,
        untie_embeddings_and_output_weights=not spec.tied_embeddings,
        qk_layernorm=config["model_type"] in QK_NORM or spec.latent_attention,
        **_moe_args(config, spec), **{**_latent_args(spec), **scaling},
        hidden_dropout=0.0, attention_dropout=float(config.get("attention_dropout", 0.0)),
        init_method_std=float(config.get("initializer_range", 0.02)),
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        transformer_impl=layer_spec, ckpt_format="torch", use_dist_ckpt=False, context_parallel_size=1,
        sequence_parallel=False, iteration=iteration, consumed_train_samples=0, consumed_valid_samples=0,
        noop_layers=set(spec.noop_layers) or None,   # MindSpeed-LLM's, parsed
        hf_config=config)   # carried back by from_megatron; Megatron-LM ignores it


def _latent_args(spec: ModelSpec) -> dict:
    """Megatron-LM's Multi-Latent Attention arguments (its latents RMS-normed: --qk-layernorm)."""
    if not spec.latent_attention:
        return {"multi_latent_attention": False}
    return {"multi_latent_attention": True, "q_lora_rank": spec.q_lora_rank, "kv_lora_rank": spec.kv_lora_rank,
            "qk_head_dim": spec.qk_head_dim, "qk_pos_emb_head_dim": spec.qk_pos_emb_head_dim,
            "v_head_dim": spec.v_head_dim, "rope_type": "rope"}


def _moe_args(config: dict, spec: ModelSpec) -> dict:
    """Megatron-LM's MoE arguments (num_experts None for a dense model). Routing as HF's: softmax
    over every expert then the top k, renormalised unless Qwen-MoE's norm_topk_prob is off
    (megatron-core: top k then softmax, or --moe-router-pre-softmax)."""
    family = config["model_type"]
    if family not in MOE:
        return {"num_experts": None}
    layers = {spec.real_layers[i] for i in moe_layers(config, family)}   # as Megatron numbers them
    return {"num_experts": spec.num_experts, "moe_ffn_hidden_size": spec.moe_ffn_hidden_size,
            "moe_router_topk": config["num_experts_per_tok"],
            "moe_router_pre_softmax": family != "mixtral" and not config.get("norm_topk_prob", False),
            "moe_router_score_function": "softmax", "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": float(config.get("router_aux_loss_coef", 0.0)),
            "moe_shared_expert_intermediate_size": spec.shared_expert_ffn_hidden_size,
            "moe_shared_expert_gate": family in SHARED_EXPERT and bool(spec.shared_expert_ffn_hidden_size),
            "moe_router_topk_scaling_factor": float(config.get("routed_scaling_factor") or 1.0),
            "moe_layer_freq": 1 if set(spec.real_layers) <= layers else [int(i in layers) for i in range(spec.num_layers)],
            "moe_grouped_gemm": spec.moe_grouped_gemm, "moe_token_dispatcher_type": "alltoall"}


def family_of(args, spec: ModelSpec) -> str:
    """The HF family a Megatron model reads as by default: Qwen2 has q/k/v biases, Qwen3 q/k norms,
    Mistral a window; with experts Qwen2-MoE has a shared expert, Qwen3-MoE q/k norms, else Mixtral."""
    qk_norm = bool(getattr(args, "qk_layernorm", False))
    if spec.latent_attention:
        return "deepseek_v2"
    if spec.num_experts:
        return "qwen2_moe" if spec.shared_expert_ffn_hidden_size else ("qwen3_moe" if qk_norm else "mixtral")
    if spec.add_qkv_bias:
        return "qwen2"
    if qk_norm:
        return "qwen3"
    return "mistral" if getattr(args, "window_size", None) else "llama"


def from_megatron(args, spec: ModelSpec, family: str, dtype: torch.dtype, path) -> dict:
    """The ``config.json`` of a Megatron model as HF ``family``; refused where it does not fit."""
    window = getattr(args, "window_size", None)
    gated = bool(getattr(args, "moe_shared_expert_gate", False))
    checks = [(spec.normalization == "RMSNorm", f"normalization {spec.normalization}"),
              (spec.swiglu, "a non-SwiGLU MLP"), (spec.position_embedding_type == "rope",
                                                  f"{spec.position_embedding_type} position embeddings"),
              (not spec.add_bias_linear, "linear biases"),
              (spec.add_qkv_bias == (family in QKV_BIAS), "q/k/v biases" if spec.add_qkv_bias else "no q/k/v biases"),
              (spec.latent_attention == (family in LATENT),
               "latent attention" if spec.latent_attention else "no latent attention"),
              (bool(getattr(args, "qk_layernorm", False)) == (family in QK_NORM + LATENT),
               "QK layer norms" if getattr(args, "qk_layernorm", False) else "no QK layer norms"),
              (bool(spec.num_experts) == (family in MOE), "experts" if spec.num_experts else "no experts"),
              (not spec.shared_expert_ffn_hidden_size or family in (SHARED_EXPERT if gated else UNGATED_SHARED_EXPERTS),
               f"{'gated' if gated else 'ungated'} shared experts"),
              (not spec.num_experts or family != "deepseek_v2" or _moe_layer_list(args, spec) == sorted(
                  _moe_layer_list(args, spec)), "dense layers after the first MoE one"),
              (family not in LATENT or getattr(args, "moe_router_pre_softmax", False),
               "top-k weights renormalised (without --moe-router-pre-softmax)"),
              (not spec.num_experts or family != "mixtral" or all(_moe_layer_list(args, spec)),
               "dense layers among the MoE ones"),
              (not spec.num_experts or family != "mixtral" or not getattr(args, "moe_router_pre_softmax", False),
               "top-k weights not renormalised (--moe-router-pre-softmax)"),
              (getattr(args, "moe_router_score_function", "softmax") == "softmax", "a non-softmax router"),
              (getattr(args, "moe_router_enable_expert_bias", False) is False, "router expert bias"),
              (not getattr(args, "apply_layernorm_1p", False), "layernorm_1p"),
              (not getattr(args, "rotary_interleaved", False), "interleaved RoPE"),
              (getattr(args, "rotary_percent", 1.0) == 1.0, "partial RoPE"),
              (not window or (family == "mistral" and window[1] == 0), f"attention window {window}")]
    for fits, what in checks:
        if not fits:
            raise CheckpointError(path, f"a model with {what} cannot be written as Hugging Face {family}")
    base = float(getattr(args, "rotary_base", 10000))
    rope = {"rope_type": "default", "rope_theta": base}
    if getattr(args, "use_rope_scaling", False):
        rope = {"rope_type": "llama3", "rope_theta": base, "factor": float(args.rope_scaling_factor), **_LLAMA3_FIXED}
    if spec.latent_attention and getattr(args, "rope_type", "rope") == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": base, "factor": float(args.rotary_scaling_factor),
                **{k: type(default)(getattr(args, k)) for k, default in _YARN.items()}}
    positions = getattr(args, "max_position_embeddings", None) or getattr(args, "seq_length", None)
    if not positions:
        raise CheckpointError(path, "saved args lack max_position_embeddings and seq_length (the longest sequence)")
    config = {
        "architectures": [ARCHITECTURES[family]], "model_type": family,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": len(spec.real_layers), "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_query_groups,
        "head_dim": spec.qk_pos_emb_head_dim if spec.latent_attention else spec.kv_channels, "hidden_act": "silu",
        "max_position_embeddings": positions,
        "rms_norm_eps": float(getattr(args, "norm_epsilon", 1e-5)), "rope_parameters": rope,
        "tie_word_embeddings": spec.tied_embeddings, "vocab_size": spec.true_vocab_size,
        "attention_dropout": float(getattr(args, "attention_dropout", 0.0)),
        "initializer_range": float(getattr(args, "init_method_std", 0.02)),
        "dtype": DTYPE_NAMES[dtype], "use_cache": True,
        # What transformers 4.x reads instead of rope_parameters and dtype.
        "rope_theta": base,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if len(rope) > 2 else None,
        "torch_dtype": DTYPE_NAMES[dtype],
    }
    if family in MOE:
        config.update(_moe_config(args, spec, family))
    if family == "mistral":
        config["sliding_window"] = window[0] + 1 if window else None
    if family.startswith("qwen"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=len(spec.real_layers))
    if family == "qwen2_moe":
        config["qkv_bias"] = spec.add_qkv_bias
    if family in LATENT:
        config.update(q_lora_rank=spec.q_lora_rank, kv_lora_rank=spec.kv_lora_rank, qk_nope_head_dim=spec.qk_head_dim,
                      qk_rope_head_dim=spec.qk_pos_emb_head_dim, v_head_dim=spec.v_head_dim,
                      qk_head_dim=spec.qk_head_dim + spec.qk_pos_emb_head_dim)
    original = getattr(args, "hf_config", None)
    if isinstance(original, dict) and original.get("model_type") == family:
        config.update({k: v for k, v in original.items() if k not in MODEL_KEYS})
    return config


def _moe_layer_list(args, spec: ModelSpec) -> list[int]:
    """Megatron-LM's --moe-layer-freq as a per-layer 0/1 list."""
    freq = getattr(args, "moe_layer_freq", 1) or 1
    if isinstance(freq, int):
        return [int(i % freq == 0) for i in range(spec.num_layers)]
    return list(freq)


def _moe_config(args, spec: ModelSpec, family: str) -> dict:
    """The ``config.json`` keys of a mixture of experts."""
    config = {"num_experts_per_tok": int(getattr(args, "moe_router_topk", 2)),
              "router_aux_loss_coef": float(getattr(args, "moe_aux_loss_coeff", 0.0) or 0.0)}
    config[EXPERT_COUNT[family]] = spec.num_experts
    if family == "mixtral":
        return {**config, "intermediate_size": spec.moe_ffn_hidden_size}
    per_layer = _moe_layer_list(args, spec)
    dense = [i for i, g in enumerate(spec.real_layers) if not per_layer[g]]
    if family == "deepseek_v2":
        return {**config, "moe_intermediate_size": spec.moe_ffn_hidden_size, "first_k_dense_replace": len(dense),
                "n_shared_experts": (spec.shared_expert_ffn_hidden_size or 0) // spec.moe_ffn_hidden_size,
                "topk_method": "greedy", "norm_topk_prob": False, "n_group": None, "topk_group": None,
                "routed_scaling_factor": float(getattr(args, "moe_router_topk_scaling_factor", None) or 1.0)}
    config.update(moe_intermediate_size=spec.moe_ffn_hidden_size,
                  norm_topk_prob=not getattr(args, "moe_router_pre_softmax", False), decoder_sparse_step=1,
                  mlp_only_layers=dense)
    if family in SHARED_EXPERT:
        config["shared_expert_intermediate_size"] = spec.shared_expert_ffn_hidden_size or 0
    return config


def assets(directory) -> list[Path]:
    """The tokenizer and generation files of a model directory."""
    return [Path(directory) / name for name in ASSETS if (Path(directory) / name).is_file()]


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a ``Target.params_dtype`` name (None: keep the source's)."""
    return DTYPES.get(name)
