"""MindFormers' parameter names <-> megatron-core names: ``hf.names.Table`` data.

MindFormers' layers are HF's renamed (their ``convert_name``), with one switch, ``qkv_concat``,
that fuses two pairs of tensors:
* ``attention.w_qkv`` = wq, wk, wv regrouped per KV group ``[q_g; k_g; v_g]``: exactly
  Megatron's ``linear_qkv`` (and its bias);
* ``feed_forward.w_gate_hidden`` = w1 (gate) and w3 (up) interleaved row by row, g0, u0, g1, u1, ...
  (Megatron's ``linear_fc1`` is ``[gate; up]``).
"""

from __future__ import annotations

import re

from ckpt_hooks.algebra import names as megatron_names
from ckpt_hooks.converters.hf.names import FINAL_NORM, GATE_UP_INTERLEAVED, Table

FAMILIES = ("llama", "qwen2")  # qwen2: Llama with q/k/v biases
EMBEDDING_NAME = "model.tok_embeddings.embedding_weight"
# The network's weights are all under ``model.`` and ``lm_head.``: anything else in a training
# checkpoint is training state (optimizer moments ``adam_m.*``, ``global_step``, ...), skipped.
TRAINING_STATE = re.compile(r"(?!model\.|lm_head\.).*")

_FC1 = "mlp.linear_fc1.weight"
# qkv_concat -> the gate and up tensors.
_GATE_UP = {False: {"feed_forward.w1.weight": (_FC1, "gate"), "feed_forward.w3.weight": (_FC1, "up")},
            True: {"feed_forward.w_gate_hidden.weight": (_FC1, GATE_UP_INTERLEAVED)}}
CONCAT_MARK = ".attention.w_qkv.weight"  # a qkv_concat checkpoint's tell

EMBEDDING = {EMBEDDING_NAME: (megatron_names.EMBEDDING, "vocab")}
HEAD = {"model.norm_out.weight": (FINAL_NORM, None), "lm_head.weight": (megatron_names.OUTPUT, "vocab")}


def _qkv(qkv_concat: bool, bias: bool) -> dict:
    kinds = ("weight", "bias") if bias else ("weight",)
    if qkv_concat:
        return {f"attention.w_qkv.{kind}": (f"self_attention.linear_qkv.{kind}", None) for kind in kinds}
    return {f"attention.w{part}.{kind}": (f"self_attention.linear_qkv.{kind}", part)
            for kind in kinds for part in "qkv"}


def table(family: str, qkv_concat: bool) -> Table:
    layer = {"attention_norm.weight": ("{attn_norm}", None), **_qkv(qkv_concat, family == "qwen2"),
             "attention.wo.weight": ("self_attention.linear_proj.weight", None),
             "ffn_norm.weight": ("{mlp_norm}", None), **_GATE_UP[qkv_concat],
             "feed_forward.w2.weight": ("mlp.linear_fc2.weight", None)}
    name = f"MindFormers {family}" + (" (qkv_concat)" if qkv_concat else "")
    return Table(name, EMBEDDING, layer, HEAD, TRAINING_STATE)


def is_concat(names) -> bool:
    """Whether a checkpoint's tensors are in the qkv_concat layout."""
    return any(n.endswith(CONCAT_MARK) for n in names)
