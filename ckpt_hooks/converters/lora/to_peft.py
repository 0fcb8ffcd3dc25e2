"""A LoRA checkpoint (Megatron, any TP/PP) as a Hugging Face PEFT adapter, ``adapter_model.safetensors``
and ``adapter_config.json``, for the model megatron-to-hf makes of its base.

Names follow the HF tables (ckpt_hooks.converters.hf.names): a fused module splits as its weight does,
linear_qkv into q/k/v_proj and linear_fc1 into gate/up_proj, each part with a copy of lora_A
(it acts on the input they share) and its own rows of lora_B.
"""

from __future__ import annotations

import json
import time

import torch

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.converters.hf import config as hf_config, files, names
from ckpt_hooks.converters.lora.adapter import read_adapter
from ckpt_hooks.engine.ranks import write_shared
from ckpt_hooks.engine.run import Report
from ckpt_hooks.formats.atomic import refuse_non_empty

ADAPTER = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def lora_to_peft(lora_dir, save_dir, *, lora_r: int | None = None, lora_alpha: float | None = None,
                 target_modules=None, model_type: str | None = None) -> Report:
    """Write the adapters of the LoRA checkpoint in ``lora_dir`` as a PEFT adapter in ``save_dir``,
    atomically. The model is the one the LoRA run's args describe; ``lora_r``, ``lora_alpha`` and
    ``target_modules`` default to what they record."""
    refuse_non_empty(save_dir)
    started = time.perf_counter()
    adapter, ckpt, spec = read_adapter(lora_dir, None, lora_r, lora_alpha, target_modules)
    family = model_type or hf_config.family_of(ckpt.args, spec)
    if family not in names.LAYERS:
        raise CheckpointError(ckpt.first.path, f"unsupported model type {family!r} "
                                               f"(supported: {', '.join(sorted(names.LAYERS))})")
    hf_config.from_megatron(ckpt.args, spec, family, torch.float32, ckpt.first.path)  # refuses what HF cannot be
    tensors = []
    for entry in names.entries(family, spec, names.LOCAL):
        if entry.megatron in adapter.weights:
            a, b = adapter.weights[entry.megatron]
            b = b.reshape(-1, adapter.r)
            b = torch.cat([b[start:stop] for start, stop in entry.rows])
            prefix = "base_model.model." + entry.hf.removesuffix(".weight")
            tensors += [files.PlannedTensor(f"{prefix}.lora_{part}.weight", tuple(t.shape), t.dtype, lambda t=t: t)
                        for part, t in (("A", a), ("B", b))]
    alpha = int(adapter.alpha) if float(adapter.alpha).is_integer() else adapter.alpha
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": adapter.r,
              "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": sorted({t.name.split(".")[-3] for t in tensors}), "inference_mode": True}

    def write_all(root, _) -> None:   # small: rank 0 writes it all (under torchrun too)
        files.write_file(root / ADAPTER, tensors)
        (root / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    write_shared(save_dir, [], None, 0, workers=1, quiet=True, label="lora-to-peft", publish=write_all)
    total = sum(t.nbytes for t in tensors)
    return Report(f"LoRA r={adapter.r}", f"PEFT {family} adapter", 1, total, time.perf_counter() - started)
