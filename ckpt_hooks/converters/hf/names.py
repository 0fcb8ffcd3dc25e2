"""Hugging Face names <-> megatron-core names, per model family: data, plus where HF's separate
tensors sit inside Megatron's fused ones.

An HF tensor is a list of row ranges of one Megatron tensor of a TP1·PP1 model (fused axes
flattened), in order:
* ``linear_qkv`` is group-major, ``[q_g; k_g; v_g]`` per query group g: q_proj is the q rows of
  every group, k_proj and v_proj their one k / v head each (the same for Qwen2's biases);
* ``linear_fc1`` is ``[gate; up]``: gate_proj its first ffn rows, up_proj the rest (a tensor
  may also interleave them, row by row: MindFormers' ``w_gate_hidden``); the same for each routed
  expert's and the shared experts' ``linear_fc1``, with their own ffn sizes;
* a mixture-of-experts layer's names (``Table.moe``, ``{e}`` the expert) replace the dense MLP's,
  and its pre-MLP norm is ``pre_mlp_layernorm`` under either layer spec;
* the vocabulary tensors: the true vocabulary's rows (Megatron pads past them);
* everything else: all rows.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from ckpt_hooks.algebra import layout, names
from ckpt_hooks.algebra.spec import ModelSpec, ParallelConfig, Rank

# The part of linear_fc1 that is gate and up interleaved row by row: g0, u0, g1, u1, ...
GATE_UP_INTERLEAVED = "gate/up interleaved"
LOCAL, TRANSFORMER_ENGINE = "local", "transformer_engine"

# The layer norms' megatron-core names under each layer spec. Latent attention keeps its input
# norm apart in both (Transformer Engine fuses the latents' norms into the up projections).
NORMS = {
    LOCAL: {"attn_norm": "input_layernorm.weight", "mlp_norm": "pre_mlp_layernorm.weight",
            "q_norm": "self_attention.q_layernorm.weight", "kv_norm": "self_attention.kv_layernorm.weight"},
    TRANSFORMER_ENGINE: {"attn_norm": "self_attention.linear_qkv.layer_norm_weight",
                         "mlp_norm": "mlp.linear_fc1.layer_norm_weight",
                         "q_norm": "self_attention.linear_q_up_proj.layer_norm_weight",
                         "kv_norm": "self_attention.linear_kv_up_proj.layer_norm_weight"},
}
_LATENT_NORMS = {"attn_norm": "input_layernorm.weight"}
# The ``_extra_state`` entries (no weights; None without FP8) megatron-core saves per layer:
# its own linears' (optional on load) and Transformer Engine's modules' (required).
_LINEAR_EXTRA_STATES = ("self_attention.linear_proj._extra_state", "self_attention.linear_qkv._extra_state",
                        "mlp.linear_fc1._extra_state", "mlp.linear_fc2._extra_state")
EXTRA_STATES = {LOCAL: _LINEAR_EXTRA_STATES,
                TRANSFORMER_ENGINE: ("self_attention.core_attention._extra_state", *_LINEAR_EXTRA_STATES)}
# Latent attention's linears instead of linear_qkv (q_proj, or q_down_proj and q_up_proj).
_LATENT_LINEARS = ("linear_q_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj",
                   "linear_kv_up_proj")
OUTPUT_EXTRA_STATE = "output_layer._extra_state"
FINAL_NORM = "decoder.final_layernorm.weight"

# HF name -> (megatron-core name, part of it). "{attn_norm}"/"{mlp_norm}": see NORMS.
EMBEDDING = {"model.embed_tokens.weight": (names.EMBEDDING, "vocab")}
HEAD = {"model.norm.weight": (FINAL_NORM, None), "lm_head.weight": (names.OUTPUT, "vocab")}
_LLAMA_LAYER = {
    "input_layernorm.weight": ("{attn_norm}", None),
    "self_attn.q_proj.weight": ("self_attention.linear_qkv.weight", "q"),
    "self_attn.k_proj.weight": ("self_attention.linear_qkv.weight", "k"),
    "self_attn.v_proj.weight": ("self_attention.linear_qkv.weight", "v"),
    "self_attn.o_proj.weight": ("self_attention.linear_proj.weight", None),
    "post_attention_layernorm.weight": ("{mlp_norm}", None),
    "mlp.gate_proj.weight": ("mlp.linear_fc1.weight", "gate"),
    "mlp.up_proj.weight": ("mlp.linear_fc1.weight", "up"),
    "mlp.down_proj.weight": ("mlp.linear_fc2.weight", None),
}
_QKV_BIAS = {
    "self_attn.q_proj.bias": ("self_attention.linear_qkv.bias", "q"),
    "self_attn.k_proj.bias": ("self_attention.linear_qkv.bias", "k"),
    "self_attn.v_proj.bias": ("self_attention.linear_qkv.bias", "v"),
}
_QK_NORM = {
    "self_attn.q_norm.weight": ("self_attention.q_layernorm.weight", None),
    "self_attn.k_norm.weight": ("self_attention.k_layernorm.weight", None),
}
# DeepSeek's Multi-Latent Attention: q_proj without a q latent, else q_a_proj / q_b_proj around it.
_LATENT_LAYER = {
    "input_layernorm.weight": ("{attn_norm}", None),
    "self_attn.q_proj.weight": ("self_attention.linear_q_proj.weight", None),
    "self_attn.q_a_proj.weight": ("self_attention.linear_q_down_proj.weight", None),
    "self_attn.q_a_layernorm.weight": ("{q_norm}", None),
    "self_attn.q_b_proj.weight": ("self_attention.linear_q_up_proj.weight", None),
    "self_attn.kv_a_proj_with_mqa.weight": ("self_attention.linear_kv_down_proj.weight", None),
    "self_attn.kv_a_layernorm.weight": ("{kv_norm}", None),
    "self_attn.kv_b_proj.weight": ("self_attention.linear_kv_up_proj.weight", None),
    "self_attn.o_proj.weight": ("self_attention.linear_proj.weight", None),
    **{k: v for k, v in _LLAMA_LAYER.items() if not k.startswith(("self_attn.", "input_layernorm."))},
}
LAYERS = {"llama": _LLAMA_LAYER, "mistral": _LLAMA_LAYER, "qwen2": {**_LLAMA_LAYER, **_QKV_BIAS},
          "qwen3": {**_LLAMA_LAYER, **_QK_NORM}, "mixtral": _LLAMA_LAYER,
          "qwen2_moe": {**_LLAMA_LAYER, **_QKV_BIAS}, "qwen3_moe": {**_LLAMA_LAYER, **_QK_NORM},
          "deepseek_v2": _LATENT_LAYER}

# A mixture-of-experts layer's MLP: the router, each routed expert {e}, the shared experts.
_EXPERT = "mlp.experts.local_experts.{e}."
_QWEN_EXPERTS = {
    "mlp.gate.weight": ("mlp.router.weight", None),
    "mlp.experts.{e}.gate_proj.weight": (_EXPERT + "linear_fc1.weight", "gate"),
    "mlp.experts.{e}.up_proj.weight": (_EXPERT + "linear_fc1.weight", "up"),
    "mlp.experts.{e}.down_proj.weight": (_EXPERT + "linear_fc2.weight", None),
}
MOE = {
    "mixtral": {
        "block_sparse_moe.gate.weight": ("mlp.router.weight", None),
        "block_sparse_moe.experts.{e}.w1.weight": (_EXPERT + "linear_fc1.weight", "gate"),
        "block_sparse_moe.experts.{e}.w3.weight": (_EXPERT + "linear_fc1.weight", "up"),
        "block_sparse_moe.experts.{e}.w2.weight": (_EXPERT + "linear_fc2.weight", None),
    },
    "qwen2_moe": {
        **_QWEN_EXPERTS,
        "mlp.shared_expert.gate_proj.weight": ("mlp.shared_experts.linear_fc1.weight", "gate"),
        "mlp.shared_expert.up_proj.weight": ("mlp.shared_experts.linear_fc1.weight", "up"),
        "mlp.shared_expert.down_proj.weight": ("mlp.shared_experts.linear_fc2.weight", None),
        "mlp.shared_expert_gate.weight": ("mlp.shared_experts.gate_weight", None),
    },
    "qwen3_moe": _QWEN_EXPERTS,
    "deepseek_v2": {   # shared experts without a gate
        **_QWEN_EXPERTS,
        "mlp.shared_experts.gate_proj.weight": ("mlp.shared_experts.linear_fc1.weight", "gate"),
        "mlp.shared_experts.up_proj.weight": ("mlp.shared_experts.linear_fc1.weight", "up"),
        "mlp.shared_experts.down_proj.weight": ("mlp.shared_experts.linear_fc2.weight", None),
    },
}
_MOE_NORMS = {"attn_norm": "{attn_norm}", "mlp_norm": "pre_mlp_layernorm.weight"}

# HF entries that hold no weights (older checkpoints saved RoPE's buffer).
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclass(frozen=True)
class Entry:
    hf: str                                 # the tensor's name in its framework (HF, MindFormers, ...)
    megatron: str                           # key of a TP1·PP1 model: global layer numbers
    rows: tuple[tuple[int, int], ...]       # [start, stop) rows of it, in this tensor's order
    interleaved: bool = False               # the ranges' rows alternate, one of each in turn

    def runs(self) -> list[tuple[int, slice, int]]:
        """(first Megatron row, the rows of this tensor that hold them, rows) of each range."""
        if self.interleaved:  # range i is every n-th row from row i
            n = len(self.rows)
            return [(start, slice(i, None, n), stop - start) for i, (start, stop) in enumerate(self.rows)]
        firsts = [0, *itertools.accumulate(stop - start for start, stop in self.rows)]
        return [(start, slice(first, first + stop - start), stop - start)
                for (start, stop), first in zip(self.rows, firsts)]


def tp1(key: str, spec: ModelSpec) -> layout.Placement:
    """A Megatron tensor in a TP1·PP1 model with the vocabulary unpadded: its logical shape, and
    its stored shape (whose rows the entries count)."""
    return layout.placement(names.classify(key).rule, spec, ParallelConfig(), Rank(), spec.true_vocab_size)


def part_rows(part: str | None, spec: ModelSpec, key: str) -> tuple[tuple[int, int], ...]:
    """The rows of Megatron tensor ``key`` that hold one HF tensor."""
    if part == "vocab":
        return ((0, spec.true_vocab_size),)
    if part == GATE_UP_INTERLEAVED:
        return ((0, spec.ffn_hidden_size), (spec.ffn_hidden_size, 2 * spec.ffn_hidden_size))
    if part in ("gate", "up"):   # of a dense MLP's, an expert's or the shared experts' ffn
        ffn = tp1(key, spec).logical_shape[1]
        start = ffn * (part == "up")
        return ((start, start + ffn),)
    if part in ("q", "k", "v"):
        kv, per_group = spec.kv_channels, spec.num_attention_heads // spec.num_query_groups
        start, length = {"q": (0, per_group * kv), "k": (per_group * kv, kv), "v": ((per_group + 1) * kv, kv)}[part]
        return tuple((g * spec.rows_per_query_group + start, g * spec.rows_per_query_group + start + length)
                     for g in range(spec.num_query_groups))
    return ((0, tp1(key, spec).stored_shape[0]),)


@dataclass(frozen=True)
class Table:
    """One framework's names for one model family: name -> (megatron-core name, part), for the
    tensors before the layers, in each layer (after ``model.layers.{i}.``) and after them."""

    name: str                   # in messages: "llama", "MindFormers qwen2 (qkv_concat)", ...
    embedding: dict
    layer: dict
    head: dict
    ignored: re.Pattern         # entries that hold no weights of the model, skipped when read
    moe: dict | None = None     # a mixture-of-experts layer's MLP entries ({e}: the expert)

    def entries(self, spec: ModelSpec, layer_spec: str, moe_layers=()) -> list[Entry]:
        """Every tensor of a model, in the table's order; ``moe_layers`` (the table's layer
        numbers) are mixtures of experts. The table's layer i is Megatron's ``spec.real_layers[i]``
        (MindSpeed's noop layers have no weights)."""
        dense_norms = {**NORMS[layer_spec], **(_LATENT_NORMS if spec.latent_attention else {})}

        def entry(name, megatron, part, norms=dense_norms):
            megatron = megatron.format(**norms)
            return Entry(name, megatron, part_rows(part, spec, megatron), part == GATE_UP_INTERLEAVED)

        layer_names = {n: target for n, target in self.layer.items() if _held(n, spec)}

        def layer(i: int, g: int) -> list[Entry]:
            if i not in moe_layers:
                return [entry(f"model.layers.{i}.{n}", names.layer_key(g, megatron), part)
                        for n, (megatron, part) in layer_names.items()]
            norms = {**dense_norms, **{k: v.format(**dense_norms) for k, v in _MOE_NORMS.items()}}
            attention = [entry(f"model.layers.{i}.{n}", names.layer_key(g, megatron), part, norms)
                         for n, (megatron, part) in layer_names.items() if not n.startswith("mlp.")]
            return attention + [entry(f"model.layers.{i}.{n.format(e=e)}", names.layer_key(g, megatron.format(e=e)),
                                      part) for n, (megatron, part) in self.moe.items()
                                for e in (range(spec.num_experts) if "{e}" in n else [None])]

        head = {n: target for n, target in self.head.items()
                if not (spec.tied_embeddings and target[0] == names.OUTPUT)}
        return ([entry(n, *target) for n, target in self.embedding.items()]
                + [e for i, g in enumerate(spec.real_layers) for e in layer(i, g)]
                + [entry(n, *target) for n, target in head.items()])

    def tied_copies(self) -> set[str]:
        """The output layer's names: a tied model may save it too."""
        return {n for n, (megatron, _) in self.head.items() if megatron == names.OUTPUT}


def _held(name: str, spec: ModelSpec) -> bool:
    """Whether a model holds a layer tensor of its table: latent attention has q_proj without a
    q latent, q_a_proj / q_a_layernorm / q_b_proj with one."""
    if not spec.latent_attention:
        return True
    if name.startswith("self_attn.q_proj."):
        return not spec.q_lora_rank
    return bool(spec.q_lora_rank) or not name.startswith(("self_attn.q_a_", "self_attn.q_b_"))


TABLES = {family: Table(family, EMBEDDING, layer, HEAD, IGNORED, MOE.get(family)) for family, layer in LAYERS.items()}


def entries(family: str, spec: ModelSpec, layer_spec: str, moe_layers=()) -> list[Entry]:
    """Every HF tensor of a model, in Hugging Face's order."""
    return TABLES[family].entries(spec, layer_spec, moe_layers)


def extra_states(spec: ModelSpec, layer_spec: str, moe_layers=()) -> list[str]:
    """The non-weight entries of a TP1·PP1 model of this layer spec (a MoE layer's linears are
    its experts' and shared experts')."""
    own = list(EXTRA_STATES[layer_spec])
    if spec.latent_attention:
        linears = [n for n in _LATENT_LINEARS if (n == "linear_q_proj") != bool(spec.q_lora_rank)]
        at = own.index("self_attention.linear_qkv._extra_state")
        own[at:at + 1] = [f"self_attention.{n}._extra_state" for n in linears]

    def layer(i: int) -> list[str]:
        if i not in moe_layers:
            return own
        attention = [s for s in own if not s.startswith("mlp.")]
        experts = [f"mlp.experts.local_experts.{e}.{linear}._extra_state"
                   for e in range(spec.num_experts) for linear in ("linear_fc1", "linear_fc2")]
        shared = ["mlp.shared_experts.linear_fc1._extra_state", "mlp.shared_experts.linear_fc2._extra_state"]
        return attention + experts + (shared if spec.shared_expert_ffn_hidden_size else [])
    return [names.layer_key(g, suffix) for i, g in enumerate(spec.real_layers) for suffix in layer(i)] \
        + [OUTPUT_EXTRA_STATE]


def moe_layers_of(keys, spec: ModelSpec) -> set[int]:
    """The layers of a TP1·PP1 Megatron model (its keys) that are mixtures of experts, numbered as
    an external model's (without noop layers)."""
    moe = {names.classify(k).local_layer for k in keys if k.endswith(".mlp.router.weight")}
    return {i for i, g in enumerate(spec.real_layers) if g in moe}


def layer_spec_of(keys) -> str:
    """The layer spec a set of Megatron keys was saved with (its norms fused into linears)."""
    fused = [NORMS[TRANSFORMER_ENGINE][n] for n in ("attn_norm", "q_norm", "kv_norm")]
    return TRANSFORMER_ENGINE if any(k.endswith(n) for k in keys for n in fused) else LOCAL
