"""Megatron-core GPT parameter names and how each is laid out.

Routed experts (``mlp.experts.local_experts.{i}.*``, SequentialMLP) are numbered locally in a
file and globally in the logical names (``local_expert``, ``with_expert``).

One table serves both layer specs: the local spec (``input_layernorm.weight``,
``pre_mlp_layernorm.weight``; what CPU runs produce) and the Transformer Engine spec
(``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``, ``*._extra_state``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ckpt_hooks.algebra.layout import EXTRA, REPLICATED, SPLIT, VOCAB, Rule

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"

_LAYER = r"decoder\.layers\.(?P<layer>\d+)\."
_WB = r"(weight|bias)"
_EXPERT = r"mlp\.experts\.local_experts\.\d+\."

# (pattern of the key inside a model chunk, rule). First match wins.
_TABLE: list[tuple[str, Rule]] = [
    (r".*\._extra_state", Rule(EXTRA)),
    (r"embedding\.word_embeddings\.weight", Rule(VOCAB, ("V", "H"))),
    (r"output_layer\.weight", Rule(VOCAB, ("V", "H"))),
    (r"embedding\.position_embeddings\.weight", Rule(REPLICATED)),
    (rf"decoder\.final_layernorm\.{_WB}", Rule(REPLICATED, ("H",))),
    (rf"{_LAYER}input_layernorm\.{_WB}", Rule(REPLICATED, ("H",))),
    (rf"{_LAYER}self_attention\.linear_qkv\.weight", Rule(SPLIT, ("Q", "H"), axis=0)),
    (rf"{_LAYER}self_attention\.linear_qkv\.bias", Rule(SPLIT, ("Q",), axis=0)),
    (rf"{_LAYER}self_attention\.linear_qkv\.layer_norm_{_WB}", Rule(REPLICATED, ("H",))),
    (rf"{_LAYER}self_attention\.[qk]_layernorm\.{_WB}", Rule(REPLICATED, ("K",))),
    (rf"{_LAYER}self_attention\.linear_proj\.weight", Rule(SPLIT, ("H", "A"), axis=1)),
    (rf"{_LAYER}self_attention\.linear_proj\.bias", Rule(REPLICATED, ("H",))),
    (rf"{_LAYER}pre_mlp_layernorm\.{_WB}", Rule(REPLICATED, ("H",))),
    (rf"{_LAYER}mlp\.linear_fc1\.weight", Rule(SPLIT, ("S", "F", "H"), axis=1, fused=True)),
    (rf"{_LAYER}mlp\.linear_fc1\.bias", Rule(SPLIT, ("S", "F"), axis=1, fused=True)),
    (rf"{_LAYER}mlp\.linear_fc1\.layer_norm_{_WB}", Rule(REPLICATED, ("H",))),
    (rf"{_LAYER}mlp\.linear_fc2\.weight", Rule(SPLIT, ("H", "F"), axis=1)),
    (rf"{_LAYER}mlp\.linear_fc2\.bias", Rule(REPLICATED, ("H",))),
    (rf"{_LAYER}mlp\.router\.weight", Rule(REPLICATED, ("E", "H"))),
    (rf"{_LAYER}mlp\.router\.(bias|expert_bias)", Rule(REPLICATED, ("E",))),
    (rf"{_LAYER}{_EXPERT}linear_fc1\.weight", Rule(SPLIT, ("S", "M", "H"), axis=1, fused=True, dim="etp")),
    (rf"{_LAYER}{_EXPERT}linear_fc1\.bias", Rule(SPLIT, ("S", "M"), axis=1, fused=True, dim="etp")),
    (rf"{_LAYER}{_EXPERT}linear_fc2\.weight", Rule(SPLIT, ("H", "M"), axis=1, dim="etp")),
    (rf"{_LAYER}{_EXPERT}linear_fc2\.bias", Rule(REPLICATED, ("H",))),
    (rf"{_LAYER}mlp\.shared_experts\.linear_fc1\.weight", Rule(SPLIT, ("S", "G", "H"), axis=1, fused=True)),
    (rf"{_LAYER}mlp\.shared_experts\.linear_fc1\.bias", Rule(SPLIT, ("S", "G"), axis=1, fused=True)),
    (rf"{_LAYER}mlp\.shared_experts\.linear_fc2\.weight", Rule(SPLIT, ("H", "G"), axis=1)),
    (rf"{_LAYER}mlp\.shared_experts\.linear_fc2\.bias", Rule(REPLICATED, ("H",))),
    (rf"{_LAYER}mlp\.shared_experts\.gate_weight", Rule(REPLICATED, ("1", "H"))),
]
_COMPILED = [(re.compile(pattern), rule) for pattern, rule in _TABLE]
_LAYER_NUMBER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT_NUMBER = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.")


@dataclass(frozen=True)
class Name:
    """A key of a model chunk, understood."""

    rule: Rule
    local_layer: int | None   # layer number inside the chunk, for per-layer tensors
    suffix: str               # the key after ``decoder.layers.N.`` (or the whole key)

    @property
    def local_expert(self) -> int | None:
        """The routed expert's number inside the file, for an expert's tensors."""
        return expert_of(self.suffix)


def expert_of(suffix: str) -> int | None:
    """The expert number a per-layer key suffix names (None: not an expert's tensor)."""
    match = _EXPERT_NUMBER.match(suffix)
    return int(match.group(1)) if match else None


def with_expert(suffix: str, expert: int) -> str:
    """An expert's per-layer key suffix renumbered to ``expert``."""
    return _EXPERT_NUMBER.sub(f"mlp.experts.local_experts.{expert}.", suffix, count=1)


def classify(key: str) -> Name | None:
    """The rule for a chunk key, or None when the key is not a known GPT tensor."""
    for pattern, rule in _COMPILED:
        if pattern.fullmatch(key):
            layer = _LAYER_NUMBER.match(key)
            if layer:
                return Name(rule, int(layer.group(1)), key[layer.end():])
            return Name(rule, None, key)
    return None


def layer_key(layer: int, suffix: str) -> str:
    return f"decoder.layers.{layer}.{suffix}"


def logical_name(name: Name, global_layer: int | None, tied: bool, global_expert: int | None = None) -> str:
    """The name of the logical tensor: global layer (and expert) numbers; a tied output layer is
    the embedding."""
    if name.local_layer is not None:
        suffix = name.suffix if global_expert is None else with_expert(name.suffix, global_expert)
        return layer_key(global_layer, suffix)
    if name.suffix == OUTPUT and tied:
        return EMBEDDING
    return name.suffix


# Megatron-LM's legacy model (--use-legacy-models: megatron.legacy.model.GPTModel, local layers).
# A chunk nests dicts, written here with "/" between the levels; the transformer's entries are
# the dotted keys of one dict (its plain state_dict). The tensors have megatron-core's layouts
# (grouped QKV rows, [gate; up] halves per TP rank), so only the names differ.
# Rows: (megatron-core key, legacy path, the path before Megatron-LM renamed the norms
# ``*_layernorm`` -> ``*_norm``, or None where it is the same). {L}: layer, {P}: weight or bias.
LEGACY_TIED_HEAD = "word_embeddings_for_head/weight"   # a tied output layer: the last stage's copy (PP > 1)
_ENCODER = "language_model/encoder/"
LEGACY_NAMES: list[tuple[str, str, str | None]] = [
    (EMBEDDING, "language_model/embedding/word_embeddings/weight", None),
    ("embedding.position_embeddings.weight", "language_model/embedding/position_embeddings/weight", None),
    ("decoder.layers.{L}.input_layernorm.{P}", _ENCODER + "layers.{L}.input_norm.{P}",
     _ENCODER + "layers.{L}.input_layernorm.{P}"),
    ("decoder.layers.{L}.self_attention.linear_qkv.{P}", _ENCODER + "layers.{L}.self_attention.query_key_value.{P}",
     None),
    ("decoder.layers.{L}.self_attention.linear_proj.{P}", _ENCODER + "layers.{L}.self_attention.dense.{P}", None),
    ("decoder.layers.{L}.pre_mlp_layernorm.{P}", _ENCODER + "layers.{L}.post_attention_norm.{P}",
     _ENCODER + "layers.{L}.post_attention_layernorm.{P}"),
    ("decoder.layers.{L}.mlp.linear_fc1.{P}", _ENCODER + "layers.{L}.mlp.dense_h_to_4h.{P}", None),
    ("decoder.layers.{L}.mlp.linear_fc2.{P}", _ENCODER + "layers.{L}.mlp.dense_4h_to_h.{P}", None),
    ("decoder.final_layernorm.{P}", _ENCODER + "final_norm.{P}", _ENCODER + "final_layernorm.{P}"),
    (OUTPUT, "language_model/output_layer/weight", None),   # untied
    (OUTPUT, LEGACY_TIED_HEAD, None),                        # tied
]
