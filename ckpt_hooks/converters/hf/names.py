"""Hugging Face names <-> megatron-core names, per model family: data, plus where HF's separate
tensors sit inside Megatron's fused ones.

An HF tensor is a list of row ranges of one Megatron tensor of a TP1·PP1 model (fused axes
flattened), in order:
* ``linear_qkv`` is group-major, ``[q_g; k_g; v_g]`` per query group g: q_proj is the q rows of
  every group, k_proj and v_proj their one k / v head each (the same for Qwen2's biases);
* ``linear_fc1`` is ``[gate; up]``: gate_proj its first ffn rows, up_proj the rest (a tensor
  may also interleave them, row by row: MindFormers' ``w_gate_hidden``);
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

# The layer norms' megatron-core names under each layer spec.
NORMS = {
    LOCAL: {"attn_norm": "input_layernorm.weight", "mlp_norm": "pre_mlp_layernorm.weight"},
    TRANSFORMER_ENGINE: {"attn_norm": "self_attention.linear_qkv.layer_norm_weight",
                         "mlp_norm": "mlp.linear_fc1.layer_norm_weight"},
}
# The ``_extra_state`` entries (no weights; None without FP8) megatron-core saves per layer:
# its own linears' (optional on load) and Transformer Engine's modules' (required).
_LINEAR_EXTRA_STATES = ("self_attention.linear_proj._extra_state", "self_attention.linear_qkv._extra_state",
                        "mlp.linear_fc1._extra_state", "mlp.linear_fc2._extra_state")
EXTRA_STATES = {LOCAL: _LINEAR_EXTRA_STATES,
                TRANSFORMER_ENGINE: ("self_attention.core_attention._extra_state", *_LINEAR_EXTRA_STATES)}
OUTPUT_EXTRA_STATE = "output_layer._extra_state"
FINAL_NORM = "decoder.final_layernorm.weight"

# megatron-core's state-dict order of a layer's entries, both layer specs together.
LAYER_ORDER = ("input_layernorm.weight", "self_attention.core_attention._extra_state",
               "self_attention.linear_proj.weight", "self_attention.linear_proj._extra_state",
               "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
               "self_attention.linear_qkv.bias", "self_attention.linear_qkv._extra_state",
               "pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight",
               "mlp.linear_fc1._extra_state", "mlp.linear_fc2.weight", "mlp.linear_fc2._extra_state")

OUTER_ORDER = (names.EMBEDDING, FINAL_NORM, names.OUTPUT, OUTPUT_EXTRA_STATE)

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
LAYERS = {"llama": _LLAMA_LAYER, "mistral": _LLAMA_LAYER, "qwen2": {**_LLAMA_LAYER, **_QKV_BIAS}}

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
    if part in ("gate", "up"):
        start = spec.ffn_hidden_size * (part == "up")
        return ((start, start + spec.ffn_hidden_size),)
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

    def entries(self, spec: ModelSpec, layer_spec: str) -> list[Entry]:
        """Every tensor of a model, in the table's order."""
        def entry(name, megatron, part):
            megatron = megatron.format(**NORMS[layer_spec])
            return Entry(name, megatron, part_rows(part, spec, megatron), part == GATE_UP_INTERLEAVED)

        head = {n: target for n, target in self.head.items()
                if not (spec.tied_embeddings and target[0] == names.OUTPUT)}
        return ([entry(n, *target) for n, target in self.embedding.items()]
                + [entry(f"model.layers.{i}.{n}", names.layer_key(i, megatron), part)
                   for i in range(spec.num_layers) for n, (megatron, part) in self.layer.items()]
                + [entry(n, *target) for n, target in head.items()])

    def tied_copies(self) -> set[str]:
        """The output layer's names: a tied model may save it too."""
        return {n for n, (megatron, _) in self.head.items() if megatron == names.OUTPUT}


TABLES = {family: Table(family, EMBEDDING, layer, HEAD, IGNORED) for family, layer in LAYERS.items()}


def entries(family: str, spec: ModelSpec, layer_spec: str) -> list[Entry]:
    """Every HF tensor of a model, in Hugging Face's order."""
    return TABLES[family].entries(spec, layer_spec)


def extra_states(spec: ModelSpec, layer_spec: str) -> list[str]:
    """The non-weight entries of a TP1·PP1 model of this layer spec."""
    return [names.layer_key(i, suffix) for i in range(spec.num_layers)
            for suffix in EXTRA_STATES[layer_spec]] + [OUTPUT_EXTRA_STATE]


def layer_spec_of(keys) -> str:
    """The layer spec a set of Megatron keys was saved with."""
    return TRANSFORMER_ENGINE if any(k.endswith(NORMS[TRANSFORMER_ENGINE]["attn_norm"]) for k in keys) else LOCAL
