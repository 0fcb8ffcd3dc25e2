"""LoRA adapters in Megatron checkpoints, as MindSpeed-LLM saves them (PEFT's LoRA on megatron-core
modules, ``--lora-ckpt-filter``): a legacy checkpoint at any TP/PP/VPP holding, for each adapted
module, ``<module>.lora_A.default.weight`` [r, in] and ``<module>.lora_B.default.weight`` [out, r].

Each is gathered into the logical form of the weight it adapts (ckpt_hooks.algebra.layout): lora_B has
the weight's output axes, so its TP split (grouped QKV rows, SwiGLU's gate/up halves), and lora_A
its input axis (split for the row-parallel linear_proj / linear_fc2, replicated for the
column-parallel linear_qkv / linear_fc1); the rank axis is whole. The update of any box of the
weight is then ``(alpha / r) B[rows] @ A[:, cols]``. Adapters are small (r x (in + out) per
module): they are read whole, once.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import torch

from ckpt_hooks.algebra import layout, names
from ckpt_hooks.algebra.layout import Box, Placement
from ckpt_hooks.algebra.spec import ModelSpec
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.megatron.checkpoint import read_files

# --lora-target-modules name -> the module in a megatron-core layer
MODULES = {"linear_qkv": "self_attention.linear_qkv", "linear_proj": "self_attention.linear_proj",
           "linear_fc1": "mlp.linear_fc1", "linear_fc2": "mlp.linear_fc2"}
# Megatron-LM's legacy-model names of the same modules, which MindSpeed-LLM accepts too
LEGACY = {"query_key_value": "linear_qkv", "dense": "linear_proj", "dense_h_to_4h": "linear_fc1",
          "dense_4h_to_h": "linear_fc2"}
_PATHS = {**{path: module for module, path in MODULES.items()},
          **{f"{MODULES[module].split('.')[0]}.{old}": module for old, module in LEGACY.items()}}
# lora_A / lora_B are Megatron parallel linears where split, which may save an _extra_state
_KEY = re.compile(r"(?:decoder|language_model\.encoder)\.layers\.(?P<layer>\d+)\.(?P<path>\w+\.\w+)"
                  r"\.lora_(?P<part>[AB])\.default\.(?P<entry>weight|_extra_state)")


@dataclass
class Adapter:
    """The adapters of a LoRA checkpoint: adapted weight (logical name) -> (A [r, in], B [*out, r])."""

    r: int
    alpha: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def update(self, name: str, box: Box) -> torch.Tensor:
        """(alpha / r) B A over ``box`` of weight ``name``'s logical form, in fp32."""
        a, b = self.weights[name]
        rows = tuple(slice(o, o + n) for o, n in zip(box.offsets[:-1], box.lengths[:-1]))
        cols = slice(box.offsets[-1], box.offsets[-1] + box.lengths[-1])
        return (b[rows].float() @ a[:, cols].float()) * self.scaling


def target_modules(targets, path) -> tuple[str, ...]:
    """--lora-target-modules in megatron-core's names."""
    unknown = [t for t in targets if t not in MODULES and t not in LEGACY]
    if unknown:
        raise CheckpointError(path, f"unknown LoRA target module {unknown[0]!r} (known: {' '.join(MODULES)}, "
                                    f"or the legacy {' '.join(LEGACY)})")
    return tuple(dict.fromkeys(LEGACY.get(t, t) for t in targets))


def _settings(ckpt: legacy.LegacyCheckpoint, r, alpha, targets) -> tuple[int, float, tuple[str, ...]]:
    """The flags, or else what the LoRA run's args record (MindSpeed-LLM saves its --lora-* flags)."""
    values = {flag: given if given else getattr(ckpt.args, flag[2:].replace("-", "_"), None)
              for flag, given in (("--lora-r", r), ("--lora-alpha", alpha), ("--lora-target-modules", targets))}
    missing = [flag for flag, value in values.items() if not value]
    if missing:
        raise CheckpointError(ckpt.first.path, f"{missing[0]} not given, and the LoRA run's args do not record it")
    r, alpha, targets = values.values()
    return int(r), alpha, target_modules(targets, ckpt.first.path)


def _lora_box(where: Placement, part: str, r: int) -> tuple[tuple[int, ...], Box]:
    """Logical shape and box of the lora_A or lora_B piece beside a weight's piece ``where``:
    A has the weight's columns, B its rows, both the whole rank axis."""
    shape, box = where.logical_shape, where.box
    if part == "A":
        return (r, shape[-1]), Box((0, box.offsets[-1]), (r, box.lengths[-1]))
    return (*shape[:-1], r), Box((*box.offsets[:-1], 0), (*box.lengths[:-1], r))


def _adapted(key: str, layers: range, targets, path, where: str) -> tuple[str, str] | None:
    """(logical name of the adapted weight, "A" or "B") of a LoRA checkpoint's key; None for an
    ``_extra_state``."""
    match = _KEY.fullmatch(key)
    module = match and _PATHS.get(match["path"])
    if not module:
        raise CheckpointError(path, f"{where} is not a lora_A / lora_B tensor of {' '.join(MODULES)}: "
                                    "a LoRA checkpoint holds only those")
    if module not in targets:
        raise CheckpointError(path, f"{where} adapts {module}, which is not among the target modules "
                                    f"({' '.join(targets)})")
    if match["entry"] == "_extra_state":
        return None
    if int(match["layer"]) >= len(layers):
        raise CheckpointError(path, f"{where}, but the args give this stage {len(layers)} layers")
    return names.layer_key(layers[int(match["layer"])], f"{MODULES[module]}.weight"), match["part"]


def _check_shape(shape: tuple[int, ...], box: Box, part: str, r: int, path, where: str, context: str) -> None:
    rank = shape[0 if part == "A" else 1] if len(shape) == 2 else None
    if rank is not None and rank != r:
        raise CheckpointError(path, f"{where} has rank {rank} (shape {list(shape)}), but the LoRA rank is {r}")
    expected = (r, box.lengths[-1]) if part == "A" else (math.prod(box.lengths[:-1]), r)
    if tuple(shape) != expected:
        raise CheckpointError(path, f"{where} has shape {list(shape)}, but {context} implies {list(expected)}")


def read_adapter(lora_dir, spec: ModelSpec | None = None, r: int | None = None, alpha: float | None = None,
                 targets=None) -> tuple[Adapter, legacy.LegacyCheckpoint, ModelSpec]:
    """The adapters of the LoRA checkpoint in ``lora_dir`` (with the checkpoint and the model),
    checked against the model ``spec`` (default: the one its args describe): names, rank, shapes,
    and every target module of every layer present. ``r``, ``alpha`` and ``targets`` default to
    the LoRA run's saved args."""
    ckpt, own_spec, config, files = read_files(lora_dir)
    spec = spec or own_spec
    r, alpha, targets = _settings(ckpt, r, alpha, targets)
    context = f"the base model ({spec.describe()}) at the LoRA checkpoint's {config.describe()}"
    gathered: dict[tuple[str, str], torch.Tensor] = {}
    held: dict[tuple[str, str], set[Box]] = {}
    for f in files:
        torch_file = ckpt.files[f.rank]
        for vp, chunk in enumerate(legacy.chunk_keys(config.vpp)):
            layers = layout.chunk_layers(spec, config, f.rank.pp, vp)
            for key, meta in f.chunks[chunk].items():
                where = f"{chunk}: '{key}'"
                adapted = _adapted(key, layers, targets, torch_file.path, where)
                if adapted is None:
                    continue
                if meta is None:
                    raise CheckpointError(torch_file.path, f"{where} is not a tensor")
                rule = names.classify(adapted[0]).rule
                shape, box = _lora_box(layout.placement(rule, spec, config, f.rank, spec.padded_vocab_size),
                                       adapted[1], r)
                _check_shape(tuple(meta.shape), box, adapted[1], r, torch_file.path, where, context)
                if box in held.setdefault(adapted, set()):
                    continue  # a replica
                full = gathered.setdefault(adapted, torch.zeros(shape, dtype=meta.dtype))
                full[tuple(slice(o, o + n) for o, n in zip(box.offsets, box.lengths))] = \
                    torch_file.read(torch_file.obj[chunk][key]).view(box.lengths)
                held[adapted].add(box)
    for layer in range(spec.num_layers):
        for module, part in itertools.product(targets, "AB"):
            key = names.layer_key(layer, f"{MODULES[module]}.weight"), part
            if key not in gathered or sum(b.numel for b in held[key]) != gathered[key].numel():
                raise CheckpointError(ckpt.iter_dir, f"no lora_{part} (or not all of its TP pieces) for layer "
                                                     f"{layer}'s {module}, a target module")
    weights = {name: (gathered[(name, "A")], gathered[(name, "B")]) for name, part in gathered if part == "A"}
    return Adapter(r, alpha, weights), ckpt, spec
