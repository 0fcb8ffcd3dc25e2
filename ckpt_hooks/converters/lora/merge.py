"""Merging a LoRA checkpoint into its base Megatron checkpoint, written as Megatron at any
TP/PP/VPP (ckpt_hooks.megatron.conversion) or as Hugging Face (ckpt_hooks.converters.hf).

The converters read the base through a checkpoint whose adapted weights come out merged: each
base shard is read whole and its update, (alpha / r) B A over the shard's box of the logical
weight, is added in fp32 and the sum cast to the base dtype (once per shard and worker). The planner and the executor then
cut and write the merged shards as they do any weights, whatever the three layouts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import partial

import torch

from ckpt_hooks.megatron.conversion import convert, read_source
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.formats.torch_pickle import LazyTensor, TorchFile
from ckpt_hooks.converters.hf.to_hf import megatron_to_hf
from ckpt_hooks.converters.lora.adapter import Adapter, read_adapter
from ckpt_hooks.formats.atomic import refuse_non_empty
from ckpt_hooks.engine.plan import source_placements

MEGATRON, HF = "megatron", "hf"


@dataclass(frozen=True)
class _Merged:
    """A base weight's shard with its update: the executor's source tensor (contiguous)."""

    values: partial   # () -> the merged shard, flat

    def is_contiguous(self) -> bool:
        return True


class _Reader:
    """The executor's source file for _Merged shards: the runs asked for, cut from the merged shard."""

    @staticmethod
    def read_runs(merged: _Merged, starts, run_numel: int, out: torch.Tensor) -> None:
        values, flat = merged.values(), out.view(-1)
        for i, start in enumerate(starts):
            flat[i * run_numel:(i + 1) * run_numel] = values[start:start + run_numel]


class MergedCheckpoint(legacy.LegacyCheckpoint):
    """A base checkpoint whose adapted weights read merged."""

    def __init__(self, base: legacy.LegacyCheckpoint, adapter: Adapter, places: dict):
        super().__init__(base.iter_dir, base.iteration, base.files, base.tp, base.pp)
        self.adapter = adapter
        self.places = places  # (file, chunk, key) -> (adapted weight, the shard's box)
        self._last = threading.local()  # each worker's last merged shard

    def lookup(self, file, chunk, key):
        torch_file, tensor = super().lookup(file, chunk, key)
        if (file, chunk, key) not in self.places:
            return torch_file, tensor
        return _Reader, _Merged(partial(self._merged, (file, chunk, key), torch_file, tensor))

    def _merged(self, where, torch_file: TorchFile, tensor: LazyTensor) -> torch.Tensor:
        """The whole shard, merged once however many pieces of it the converters copy out (the
        HF q/k/v split reads a qkv shard once per part and group)."""
        last = getattr(self._last, "shard", None)
        if last is None or last[0] != where:
            base = torch_file.read(tensor)
            update = self.adapter.update(*self.places[where]).reshape(base.shape)
            last = self._last.shard = (where, (base.float() + update).to(base.dtype).view(-1))
        return last[1]


def merged_checkpoint(load_dir, lora_dir, *, lora_r: int | None = None, lora_alpha: float | None = None,
                      target_modules=None, true_vocab_size: int | None = None) -> MergedCheckpoint:
    """The base checkpoint in ``load_dir`` with the adapters of ``lora_dir`` (any layout each),
    checked against each other before anything is written."""
    ckpt, spec, source, files = read_source(load_dir, true_vocab_size)
    adapter = read_adapter(lora_dir, spec, lora_r, lora_alpha, target_modules)[0]
    rank_of = {torch_file.path: rank for rank, torch_file in ckpt.files.items()}
    places = {(rank_of[path], chunk, key): (name, where.box)
              for (path, chunk, key), (name, where) in
              source_placements(spec, source, files, legacy.chunk_keys(source.vpp)).items()
              if name in adapter.weights}
    unplaced = set(adapter.weights) - {name for name, _ in places.values()}
    if unplaced:
        raise CheckpointError(ckpt.iter_dir, f"the base has no {min(unplaced)}, which the LoRA checkpoint adapts")
    return MergedCheckpoint(ckpt, adapter, places)


def merge_lora(load_dir, lora_dir, save_dir, *, lora_r: int | None = None, lora_alpha: float | None = None,
               target_modules=None, save_format: str = MEGATRON, target_tp: int | None = None,
               target_pp: int | None = None, target_vpp: int | None = None, num_layer_list=None,
               model_type: str | None = None, max_shard_size: str | int = "5GB",
               true_vocab_size: int | None = None, workers: int = 2, quiet: bool = False):
    """Merge the LoRA checkpoint in ``lora_dir`` into the base in ``load_dir`` and write the
    merged model to ``save_dir``, atomically: a Megatron checkpoint at the target layout (weights
    only: resume with --finetune), or a Hugging Face model. ``lora_r``, ``lora_alpha`` and
    ``target_modules`` default to what the LoRA run's args record."""
    refuse_non_empty(save_dir)
    merged = merged_checkpoint(load_dir, lora_dir, lora_r=lora_r, lora_alpha=lora_alpha,
                               target_modules=target_modules, true_vocab_size=true_vocab_size)
    if save_format == HF:
        return megatron_to_hf(merged, save_dir, model_type=model_type, max_shard_size=max_shard_size,
                              true_vocab_size=true_vocab_size, workers=workers, quiet=quiet)
    return convert(merged, save_dir, target_tp=target_tp, target_pp=target_pp, target_vpp=target_vpp,
                   num_layer_list=num_layer_list, convert_param_only=True, true_vocab_size=true_vocab_size,
                   workers=workers, quiet=quiet)
