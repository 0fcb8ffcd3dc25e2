"""Megatron-core GPT parameter names and how each is laid out.

Routed experts (``mlp.experts.local_experts.{i}.*``, SequentialMLP) are numbered locally in a
file and globally in the logical names (``local_expert``, ``with_expert``).

One table serves both layer specs: the local spec (``input_layernorm.weight``,
``pre_mlp_layernorm.weight``; what CPU runs produce) and the Transformer Engine spec
(``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``, ``*._extra_state``).
"""

from __future__ import annotations

import functools
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
    (rf"{_LAYER}self_attention\.q_layernorm\.{_WB}", Rule(REPLICATED, ("QN",))),
    (rf"{_LAYER}self_attention\.k_layernorm\.{_WB}", Rule(REPLICATED, ("K",))),
    # Multi-Latent Attention: the up projections split by heads; the local spec's down projections
    # are column-parallel too, Transformer Engine's whole on every rank.
    (rf"{_LAYER}self_attention\.linear_q_proj\.weight", Rule(SPLIT, ("QH", "H"), axis=0)),
    (rf"{_LAYER}self_attention\.linear_q_down_proj\.weight", Rule(SPLIT, ("QD", "H"), axis=0, local_only=True)),
    (rf"{_LAYER}self_attention\.linear_q_up_proj\.weight", Rule(SPLIT, ("QH", "QD"), axis=0)),
    (rf"{_LAYER}self_attention\.linear_q_up_proj\.layer_norm_{_WB}", Rule(REPLICATED, ("QD",))),
    (rf"{_LAYER}self_attention\.linear_kv_down_proj\.weight", Rule(SPLIT, ("KR", "H"), axis=0, local_only=True)),
    (rf"{_LAYER}self_attention\.linear_kv_up_proj\.weight", Rule(SPLIT, ("KV", "KD"), axis=0)),
    (rf"{_LAYER}self_attention\.linear_kv_up_proj\.layer_norm_{_WB}", Rule(REPLICATED, ("KD",))),
    (rf"{_LAYER}self_attention\.kv_layernorm\.{_WB}", Rule(REPLICATED, ("KD",))),
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


@functools.lru_cache(maxsize=1 << 16)   # keys repeat in every file of a layout and in every plan
def expert_of(suffix: str) -> int | None:
    """The expert number a per-layer key suffix names (None: not an expert's tensor)."""
    match = _EXPERT_NUMBER.match(suffix)
    return int(match.group(1)) if match else None


def with_expert(suffix: str, expert: int) -> str:
    """An expert's per-layer key suffix renumbered to ``expert``."""
    return _EXPERT_NUMBER.sub(f"mlp.experts.local_experts.{expert}.", suffix, count=1)


# megatron-core's module registration order, which ``named_parameters()`` and ``state_dict()``
# follow and the optimizer's buffer layout depends on (a torch_dist index or another framework's
# file does not keep it). Both layer specs, dense and MoE layers, standard and latent attention.
_MODULES = ["embedding.word_embeddings.", "embedding.position_embeddings.", "input_layernorm.",
            "self_attention.core_attention.", "self_attention.linear_proj.", "self_attention.linear_qkv.",
            "self_attention.linear_q_proj.", "self_attention.linear_q_down_proj.",
            "self_attention.linear_q_up_proj.", "self_attention.linear_kv_down_proj.",
            "self_attention.linear_kv_up_proj.", "self_attention.q_layernorm.", "self_attention.k_layernorm.",
            "self_attention.kv_layernorm.", "pre_mlp_layernorm.", "mlp.linear_fc1.", "mlp.linear_fc2.",
            "mlp.router.", "mlp.experts.local_experts.", "mlp.shared_experts.gate_weight",
            "mlp.shared_experts.linear_fc1.", "mlp.shared_experts.linear_fc2.", "decoder.final_layernorm.",
            "output_layer."]
_ENTRIES = ["layer_norm_weight", "layer_norm_bias", "weight", "bias", "expert_bias", "_extra_state"]


def module_order(suffix: str) -> tuple:
    """Sort key of a key outside the layers, or of a per-layer suffix, in megatron-core's order."""
    module = next((i for i, prefix in enumerate(_MODULES) if suffix.startswith(prefix)), len(_MODULES))
    base, _, entry = suffix.rpartition(".")
    expert = expert_of(suffix)
    return (module, -1 if expert is None else expert, base if expert is None else with_expert(base, 0),
            _ENTRIES.index(entry) if entry in _ENTRIES else len(_ENTRIES))


def state_dict_order(key: str) -> tuple:
    """Sort key of a TP1·PP1 model's key (global layer numbers) in megatron-core's state-dict
    order: the embedding, the layers, the rest."""
    name = classify(key)
    if name is not None and name.local_layer is not None:
        return 1, name.local_layer, module_order(name.suffix)
    return (0 if key.startswith("embedding.") else 2), 0, module_order(key)


@functools.lru_cache(maxsize=1 << 16)
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
