"""The model a MindFormers checkpoint holds, as an HF-style config (what hf.config reads).

MindFormers' safetensors carry no config. It comes from, in this order: an HF ``config.json``
given (``--config``); the architecture flags (``--num-attention-heads`` and the few settings no
tensor shape tells: RoPE base, norm epsilon, ...), the sizes read from the tensors' shapes; or
the ``config.json`` beside the checkpoint (what our conversions to MindFormers write).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.converters.hf import config as hf_config
from ckpt_hooks.converters.hf.names import LOCAL
from ckpt_hooks.converters.mindformers import names
from ckpt_hooks.algebra.spec import ModelSpec

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Architecture:
    """What the tensors' shapes do not tell (MindFormers' defaults)."""

    num_attention_heads: int
    num_query_groups: int | None = None     # default: from the k rows
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position_embeddings: int = 4096


def resolve(load_dir, tensors: dict, config=None, architecture: Architecture | None = None) -> tuple[Path, dict]:
    """(where it came from, HF-style config) of the model in a MindFormers checkpoint."""
    if config is None and architecture is not None:
        return Path(load_dir), from_shapes(tensors, load_dir, architecture)
    source = Path(load_dir)
    default = (source if source.is_dir() else source.parent) / hf_config.CONFIG
    if config is None and not default.is_file():
        raise CheckpointError(load_dir, f"no model config: pass --config or --num-attention-heads "
                                        f"(there is no {hf_config.CONFIG} beside it)")
    path, read, family = hf_config.read(config or default)
    if family not in names.FAMILIES:
        raise CheckpointError(path, f"model_type {family!r}: MindFormers' Llama family is "
                                    f"{' or '.join(names.FAMILIES)}")
    return path, read


def from_shapes(tensors: dict, path, arch: Architecture) -> dict:
    """An HF-style config from the tensors' shapes and ``arch``."""
    def rows(suffix: str) -> int:
        name = "model.layers.0." + suffix
        if name not in tensors:
            raise CheckpointError(path, f"no '{name}' to read the model's size from; pass --config")
        return tensors[name].shape[0]

    if names.EMBEDDING_NAME not in tensors:
        raise CheckpointError(path, f"no '{names.EMBEDDING_NAME}' to read the model's size from; pass --config")
    vocab, hidden = tensors[names.EMBEDDING_NAME].shape
    concat = names.is_concat(tensors)
    heads = arch.num_attention_heads
    if hidden % heads:
        raise CheckpointError(path, f"--num-attention-heads {heads} does not divide hidden size {hidden}")
    kv_rows = (rows("attention.w_qkv.weight") - hidden) // 2 if concat else rows("attention.wk.weight")
    bias = f"model.layers.0.attention.{'w_qkv' if concat else 'wq'}.bias" in tensors
    return {"model_type": "qwen2" if bias else "llama", "vocab_size": vocab, "hidden_size": hidden,
            "num_hidden_layers": 1 + max((int(m[1]) for n in tensors if (m := _LAYER.match(n))), default=-1),
            "intermediate_size": rows("feed_forward.w_gate_hidden.weight") // 2 if concat
            else rows("feed_forward.w1.weight"),
            "num_attention_heads": heads, "num_key_value_heads": arch.num_query_groups or kv_rows // (hidden // heads),
            "head_dim": hidden // heads, "rope_theta": arch.rope_theta, "rms_norm_eps": arch.norm_eps,
            "max_position_embeddings": arch.max_position_embeddings,
            "tie_word_embeddings": "lm_head.weight" not in tensors}


def hf_config_of(config: dict, path, spec: ModelSpec, dtype: torch.dtype) -> dict:
    """The complete ``config.json`` of the model, as megatron-to-hf writes it."""
    args = hf_config.megatron_args(config, path, spec, dtype, LOCAL, None, 0)
    return hf_config.from_megatron(args, spec, config["model_type"], dtype, path)
