"""Job-spec defaults and the vocabulary padding rule (pure Python: no torch, no megatron)."""

import math

MODEL_DEFAULTS = {
    "num_layers": 4,
    "hidden": 64,
    "heads": 4,
    "query_groups": 2,  # GQA: 2 heads per KV group
    "ffn": 128,
    "swiglu": True,  # gated_linear_unit + silu
    "normalization": "RMSNorm",
    "position_embedding": "rope",
    "add_bias_linear": False,
    "untie_embeddings": True,  # False: share_embeddings_and_output_weights
    # Megatron-LM's --vocab-size for --tokenizer-type NullTokenizer, which appends one EOD
    # token: the true vocabulary (tokenizer.vocab_size, the size that gets padded) is 100.
    "vocab_size": 99,
    "make_vocab_size_divisible_by": 16,
    "seq_length": 16,
    "micro_batch": 2,
    # Fixed across layouts and split over DP ranks, so every layout trains on the same data.
    "global_batch": 8,
    "seed": 1234,
    "dtype": "fp32",  # or "bf16"
    "norm_eps": 1e-5,
    "rotary_base": 10000,
    "add_qkv_bias": None,  # None: as add_bias_linear (Megatron-LM keeps the two in sync); Qwen2: True
    # Mixture of experts (None: dense): routed experts of moe_ffn rows each, top-k routing,
    # SequentialMLP experts, the allgather token dispatcher (gloo has what it needs).
    "experts": None,
    "moe_ffn": 32,
    "topk": 2,
    "shared_ffn": None,     # shared experts' ffn rows (None: none)
    "shared_gate": False,   # Qwen2-MoE's sigmoid gate on the shared experts
    "moe_layer_freq": None,  # per layer 1 (MoE) or 0 (dense MLP); None: every layer MoE
    "router_pre_softmax": False,  # softmax over every expert, then the top k (not renormalised)
    "topk_scaling": None,
    "noop_layers": None,    # MindSpeed-LLM's noop layers: global layers without weights (a list)
    "grouped_gemm": False,  # the legacy GroupedMLP experts (weight1/weight2; megatron-core wants bf16)   # the top-k weights' scale (DeepSeek's routed_scaling_factor); None: 1
    "qk_layernorm": False,  # per-head RMSNorm of queries and keys (Qwen3)
    # Multi-Latent Attention (DeepSeek-V2/V3), None: standard attention. A dict of
    # q_lora_rank (None: one q projection), kv_lora_rank, qk_head_dim, qk_pos_emb_head_dim, v_head_dim,
    # optionally YaRN's rope_type "yarn", rotary_scaling_factor, original_max_position_embeddings,
    # beta_fast, beta_slow, mscale, mscale_all_dim (default: plain RoPE); the latents RMS-normed
    # (Megatron-LM's --qk-layernorm).
    "mla": None,
}

LAYOUT_DEFAULTS = {"tp": 1, "pp": 1, "vpp": None, "first": None, "last": None, "ep": 1, "etp": None}

# Tensors whose first axis is the padded vocabulary.
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def model_spec(model: dict) -> dict:
    unknown = set(model) - set(MODEL_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown model fields: {sorted(unknown)}")
    return {**MODEL_DEFAULTS, **model}


def layout_spec(layout: dict) -> dict:
    unknown = set(layout) - set(LAYOUT_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown layout fields: {sorted(unknown)}")
    full = {**LAYOUT_DEFAULTS, **layout}
    if full["vpp"] == 1:  # Megatron-LM treats a virtual size of 1 as no VPP
        full["vpp"] = None
    if full["etp"] is None:  # Megatron-LM's default: the expert tensor parallel size is TP
        full["etp"] = full["tp"]
    return full


def true_vocab(model: dict) -> int:
    return model_spec(model)["vocab_size"] + 1


def padded_vocab(model: dict, tp: int) -> int:
    """Megatron-LM's _vocab_size_with_padding: round up to a multiple of divisible_by * TP."""
    multiple = model_spec(model)["make_vocab_size_divisible_by"] * tp
    return int(math.ceil(true_vocab(model) / multiple) * multiple)
