"""Merging a LoRA checkpoint into its base Megatron checkpoint, written as Megatron at any
TP/PP/VPP (ckpt_hooks.megatron.conversion) or as Hugging Face (ckpt_hooks.converters.hf).

    merged weight piece = base piece + (alpha / r) B A over the piece's box of the logical weight

The merged source is the base's Source with each adapted weight's pieces wrapped: a wrapped
piece reads its base shard whole, adds the update in fp32 and casts the sum to the base dtype
(once per shard and worker). The planner and the executor then cut and write the merged shards
as they do any weights, whatever the three layouts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import torch

from ckpt_hooks.algebra.layout import Box
from ckpt_hooks.algebra.target import Target
from ckpt_hooks.converters.hf.to_hf import megatron_to_hf
from ckpt_hooks.converters.lora.adapter import Adapter, read_adapter
from ckpt_hooks.engine.source import Tensor
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.atomic import refuse_non_empty
from ckpt_hooks.formats.torch_pickle import TensorView
from ckpt_hooks.megatron.checkpoint import MegatronSource, read_source
from ckpt_hooks.megatron.conversion import convert

MEGATRON, HF = "megatron", "hf"


@dataclass(frozen=True, eq=False)
class MergedPiece:
    """The handle of an adapted weight's piece: the base shard with its update."""

    base: TensorView
    adapter: Adapter
    name: str                  # the adapted weight
    box: Box                   # the shard's box of it
    last: threading.local      # each worker's last merged shard, shared by the pieces

    def read_into(self, slices: tuple[slice, ...], out: torch.Tensor, exact: bool = False) -> None:
        out.copy_(self._merged()[slices])

    def _merged(self) -> torch.Tensor:
        """The whole shard, merged once however many pieces of it the converters copy out (the
        HF q/k/v split reads a qkv shard once per part and group)."""
        last = getattr(self.last, "shard", None)
        if last is None or last[0] is not self:
            base = self.base.file.read(self.base.tensor)
            update = self.adapter.update(self.name, self.box).reshape(base.shape)
            last = self.last.shard = (self, (base.float() + update).to(base.dtype).view(self.base.shape))
        return last[1]


def merged_source(load_dir, lora_dir, *, lora_r: int | None = None, lora_alpha: float | None = None,
                  target_modules=None, true_vocab_size: int | None = None) -> MegatronSource:
    """The base checkpoint in ``load_dir`` with the adapters of ``lora_dir`` (any layout each)
    merged into its weights, checked against each other before anything is written."""
    src = read_source(load_dir, true_vocab_size)
    adapter = read_adapter(lora_dir, src.spec, lora_r, lora_alpha, target_modules)[0]
    unplaced = set(adapter.weights) - set(src.weights)
    if unplaced:
        raise CheckpointError(src.ckpt.iter_dir, f"the base has no {min(unplaced)}, which the LoRA checkpoint adapts")
    last = threading.local()
    weights = {name: t if name not in adapter.weights else
               Tensor(t.shape, t.dtype, t.role, {box: [MergedPiece(h, adapter, name, box, last) for h in handles]
                                                 for box, handles in t.replicas.items()})
               for name, t in src.weights.items()}
    return replace(src, weights=weights)


def merge_lora(load_dir, lora_dir, save_dir, *, lora_r: int | None = None, lora_alpha: float | None = None,
               target_modules=None, save_format: str = MEGATRON, target: Target = Target(),
               model_type: str | None = None, max_shard_size: str | int = "5GB", workers: int = 2,
               quiet: bool = False):
    """Merge the LoRA checkpoint in ``lora_dir`` into the base in ``load_dir`` and write the
    merged model to ``save_dir``, atomically: a Megatron checkpoint at the target layout (weights
    only: resume with --finetune), or a Hugging Face model. ``lora_r``, ``lora_alpha`` and
    ``target_modules`` default to what the LoRA run's args record; ``target`` gives the Megatron
    layout (default: the base's) and the true vocabulary size, where the args lack it."""
    refuse_non_empty(save_dir, sources=[load_dir, lora_dir])
    merged = merged_source(load_dir, lora_dir, lora_r=lora_r, lora_alpha=lora_alpha,
                           target_modules=target_modules, true_vocab_size=target.true_vocab_size)
    if save_format == HF:
        return megatron_to_hf(merged, save_dir, target, model_type=model_type, max_shard_size=max_shard_size,
                              workers=workers, quiet=quiet)
    return convert(merged, save_dir, target, convert_param_only=True, workers=workers, quiet=quiet)
