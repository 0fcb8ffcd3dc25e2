"""Merging the LoRA adapters of a sharded MindSpore checkpoint (MindFormers' LoRA fine-tuning)
into its weights, as MindFormers' ``tools/transform_ckpt_lora.py`` does: ``W + scaling x lora_b @
lora_a``, the adapters and their optimizer states dropped. But not by writing the whole model into
one file first: ckpt_hooks.mindspore.transform assembles every tensor of any target strategy
(default: one complete checkpoint) from the source shards, and the update of its box, computed in
fp32 from the adapters (read whole: they are small), is added before the cast to its dtype.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ckpt_hooks.engine.execute import build_tensor
from ckpt_hooks.engine.plan import TargetTensor
from ckpt_hooks.engine.run import Report
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.atomic import refuse_non_empty
from ckpt_hooks.formats.mindspore_ckpt import BF16
from ckpt_hooks.formats.mindspore_strategy import read_strategy
from ckpt_hooks.mindspore.files import READERS
from ckpt_hooks.mindspore.transform import DEFAULT_PREFIX, MindSporeSource, check_format, plan_files, read_source, \
    write_files

# (lora_a suffix, lora_b suffix) of MindFormers' adapters: its parallel_core LoRA layers,
# mindpet's LoRADense (tk_delta before it), its pynative layers. The adapted weight is the name
# before the suffix + ".weight", [out, in] as lora_b [out, r] @ lora_a [r, in].
SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".mindpet_delta_lora_a", ".mindpet_delta_lora_b"),
            (".tk_delta_lora_a", ".tk_delta_lora_b"), (".lora_a", ".lora_b"))
# The training states of adapters (MindFormers' AdamW, MindSpore's Adam, gradient accumulation):
# dropped with them.
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.")


def _adapter_part(name: str) -> tuple[str, str] | None:
    """(the adapted weight's name, "a" or "b") of an adapter tensor; None for other tensors."""
    for a_suffix, b_suffix in SUFFIXES:
        for part, suffix in (("a", a_suffix), ("b", b_suffix)):
            if name.endswith(suffix):
                return name[:-len(suffix)] + ".weight", part
    return None


def _torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == BF16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))  # a copy: maps are read-only


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(torch.int16).numpy().view(BF16) if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _adapters(source: MindSporeSource, lora_r: int | None) -> dict[str, tuple[torch.Tensor, ...]]:
    """Adapted weight -> (lora_a, lora_b) in fp32, each assembled from its shards, checked."""
    whole = {t.key: t for t in plan_files(source, None)[0].tensors}
    pairs: dict[str, dict[str, str]] = {}
    for name in whole:
        found = _adapter_part(name)
        if found and not name.startswith(OPTIMIZER_PREFIXES):
            pairs.setdefault(found[0], {})[found[1]] = name
    out = {}
    for weight, parts in pairs.items():
        first = next(iter(parts.values()))
        path = whole[first].copies[0].piece.handle.file.path
        if len(parts) < 2:
            raise CheckpointError(path, f"{first!r} has no lora_{'b' if 'a' in parts else 'a'} beside it")
        if weight not in whole:
            raise CheckpointError(path, f"{first!r} adapts {weight!r}, which the checkpoint does not hold")
        a, b = (_torch(build_tensor(whole[parts[p]])).float() for p in "ab")
        shape = whole[weight].placement.box.lengths
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(path, f"{parts['a']!r} {list(a.shape)} and {parts['b']!r} {list(b.shape)} are not "
                                        "lora_a [r, in] and lora_b [out, r]")
        if lora_r is not None and a.shape[0] != lora_r:
            raise CheckpointError(path, f"{parts['a']!r} has rank {a.shape[0]} (shape {list(a.shape)}), "
                                        f"but --lora-r is {lora_r}")
        if tuple(shape) != (b.shape[0], a.shape[1]):
            raise CheckpointError(path, f"{weight!r} has shape {list(shape)}, but its adapters make "
                                        f"[{b.shape[0]}, {a.shape[1]}]")
        out[weight] = a, b
    return out


def merge_lora_mindspore(load_dir, save_dir, src_strategy=None, dst_strategy=None, *, lora_scaling: float | None = None,
                         lora_r: int | None = None, lora_alpha: float | None = None, prefix: str = DEFAULT_PREFIX,
                         output_format: str | None = None, workers: int = 1, quiet: bool = False) -> Report:
    """Merge the adapters of the MindSpore checkpoint in ``load_dir`` (a ``rank_N/`` tree with
    ``src_strategy``, or one complete file) into its weights with ``lora_scaling`` (default:
    ``lora_alpha / lora_r``), writing ``save_dir/rank_{r}/{prefix}{r}.{output_format}`` for
    ``dst_strategy`` (default: one complete checkpoint), atomically."""
    refuse_non_empty(save_dir)
    started = time.perf_counter()
    if lora_scaling is None:
        if lora_alpha is None or not lora_r:
            raise CheckpointError(load_dir, "give --lora-scaling, or --lora-alpha and --lora-r "
                                            "(MindFormers scales by lora_alpha / lora_rank)")
        lora_scaling = lora_alpha / lora_r
    src, dst = (read_strategy(s) if s else None for s in (src_strategy, dst_strategy))
    source = read_source(load_dir, src)
    output_format = output_format or Path(source.files[0].path).suffix[1:]
    if f".{output_format}" not in READERS:
        raise CheckpointError(save_dir, f"output format {output_format!r} is neither ckpt nor safetensors")
    adapters = _adapters(source, lora_r)
    targets = [replace(t, tensors=[x for x in t.tensors if not _adapter_part(x.key)]) for t in plan_files(source, dst)]
    check_format(source, output_format, load_dir)

    def merged(tensor: TargetTensor) -> np.ndarray:
        array = build_tensor(tensor)
        if tensor.key not in adapters:
            return array
        a, b = adapters[tensor.key]
        box = tensor.placement.box
        rows, cols = (slice(o, o + n) for o, n in zip(box.offsets, box.lengths))
        base = _torch(array)
        return _numpy((base.float() + (b[rows] @ a[:, cols]) * lora_scaling).to(base.dtype))

    total = write_files(save_dir, targets, source, dst, prefix, output_format, workers=workers, quiet=quiet,
                        label=f"merge LoRA, {len(source.files)} -> {len(targets)} ranks", build=merged)
    return Report(f"{len(source.files)} ranks", f"{len(targets)} ranks", len(targets), total,
                  time.perf_counter() - started)
