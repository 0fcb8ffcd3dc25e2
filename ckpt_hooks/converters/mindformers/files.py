"""MindFormers safetensors checkpoints: one MindSpore safetensors file, or a directory of them
("unified" weights) with ``param_name_map.json`` ({name: file}, or {"weight_map": {...}}).

Read lazily with hf.files' reader (MindSpore's safetensors are plain safetensors); written one
tensor at a time in ``mindspore.save_checkpoint(..., format="safetensors")``'s layout (tensors by
dtype, then name; ``{"format": "ms"}``), so that each file is the bytes MindSpore writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.mindspore_ckpt import DTYPES
from ckpt_hooks.converters.hf import files
from ckpt_hooks.converters.hf.files import PlannedTensor, StoredTensor
from ckpt_hooks.formats.paths import check_links, file_of

NAME_MAP = "param_name_map.json"
SUFFIX = ".safetensors"
_ORDER = {code: i for i, (_, _, code) in enumerate(DTYPES)}  # MindSpore's file order


def open_checkpoint(path) -> dict[str, StoredTensor]:
    """Every tensor of a MindFormers safetensors file or directory, unread."""
    root = Path(path)
    if root.is_file():
        return files.open_file(root)
    if not root.is_dir():
        raise CheckpointError(root, "no such file or directory")
    check_links(root, [root])
    if (root / NAME_MAP).is_file():
        try:
            listed = json.loads((root / NAME_MAP).read_text())
            listed = sorted(set(listed.get("weight_map", listed).values()))
        except (ValueError, AttributeError, TypeError, RecursionError) as e:
            raise CheckpointError(root / NAME_MAP, f"unreadable ({type(e).__name__}: {e})") from None
        paths = [file_of(root, name, root / NAME_MAP) for name in listed]
    else:
        paths = sorted(p for p in root.iterdir() if p.suffix == SUFFIX)
    if not paths:
        raise CheckpointError(root, f"no {SUFFIX} files in it")
    tensors = {}
    for p in paths:
        for name, tensor in files.open_file(p).items():
            if name in tensors:
                raise CheckpointError(p, f"'{name}' is also in {tensors[name].file.path}")
            tensors[name] = tensor
    return tensors


def write_directory(save_dir, planned: list[PlannedTensor], config: dict, max_bytes: int, *, workers: int,
                    quiet: bool, label: str) -> tuple[int, int]:
    """``save_dir``, atomically: safetensors files of at most ``max_bytes``, ``param_name_map.json``
    and the HF-style ``config.json`` that describes the model. Returns (files, bytes)."""
    shards = {name: sorted(tensors, key=lambda t: (_ORDER[files.CODES[t.dtype]], t.name))
              for name, tensors in files.shard(planned, max_bytes).items()}

    def describe(root) -> None:
        name_map = {t.name: name for name, tensors in shards.items() for t in tensors}
        (root / NAME_MAP).write_text(json.dumps(name_map, indent=2) + "\n")
        (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return len(shards), files.write_shards(save_dir, shards, workers=workers, quiet=quiet, label=label,
                                           metadata={"format": "ms"}, describe=describe)
