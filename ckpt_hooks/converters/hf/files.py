"""Hugging Face safetensors directories: a lazy reader and a streaming writer.

    <dir>/model.safetensors                          one file, or
    <dir>/model-00001-of-00003.safetensors ...       shards, with
    <dir>/model.safetensors.index.json               {"metadata": {"total_size"}, "weight_map": {name: file}}

Files are read through formats.safetensors (mapped: a tensor's rows are read only when asked
for, straight into their torch output) and written here one tensor at a time, in the layout
the safetensors library writes; a directory of them by ``write_shards``, atomically, its files
shared out among torchrun's processes (engine.ranks).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ckpt_hooks.engine.ranks import write_shared
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.paths import check_links, file_of
from ckpt_hooks.formats.safetensors import ArrayPiece, SafetensorsFile

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
          "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}
CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a safetensors file, unread."""

    file: SafetensorsFile
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.file.tensors[self.name].shape

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.file.codes[self.name]]

    def piece(self, rows: slice, shape: tuple[int, ...]) -> ArrayPiece:
        """The engine's handle on rows ``rows`` (any step) of the tensor, seen in ``shape``."""
        return ArrayPiece(self.file.read(self.name)[rows].reshape(shape))


def open_file(path) -> dict[str, StoredTensor]:
    """Every tensor of one safetensors file, unread."""
    file = SafetensorsFile(path)
    return {name: StoredTensor(file, name) for name in file.tensors}


def open_directory(directory) -> dict[str, StoredTensor]:
    """Every tensor of a Hugging Face model directory (one file or index + shards), unread."""
    root = Path(directory)
    if root.is_dir():
        check_links(root, [root])
    index = root / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise CheckpointError(index, f"unreadable index ({type(e).__name__}: {e})") from None
        opened = {name: open_file(file_of(root, name, index)) for name in files}
        tensors = {}
        for name, file in weight_map.items():
            if name not in opened[file]:
                raise CheckpointError(root / file, f"holds no '{name}', but {INDEX} says it does")
            tensors[name] = opened[file][name]
        return tensors
    if (root / SINGLE).is_file():
        return open_file(root / SINGLE)
    raise CheckpointError(root, f"no {SINGLE} or {INDEX} (only safetensors checkpoints are read)")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' (10^9 bytes), '500MiB' (2^20) or a byte count, as transformers' max_shard_size."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Z]*)", str(text).strip().upper())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: object    # () -> tensor of that shape and dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard(tensors: list[PlannedTensor], max_bytes: int) -> dict[str, list[PlannedTensor]]:
    """File name -> its tensors, in order, each file under ``max_bytes`` (a larger tensor alone)."""
    groups, size = [[]], 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return {SINGLE: groups[0]}
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}


def write_index(root: Path, shards: dict[str, list[PlannedTensor]]) -> None:
    total = sum(t.nbytes for tensors in shards.values() for t in tensors)
    weight_map = {t.name: file for file, tensors in shards.items() for t in tensors}
    (root / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_file(path: Path, tensors: list[PlannedTensor], progress=None, metadata: dict | None = None) -> None:
    """A safetensors file whose tensors are produced, written and freed one at a time, in order;
    ``metadata`` default: transformers' ``{"format": "pt"}``."""
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # as the safetensors library aligns the data
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for t in tensors:
            data = t.produce().contiguous()
            if tuple(data.shape) != t.shape or data.dtype != t.dtype:
                raise ValueError(f"{t.name}: produced {tuple(data.shape)} {data.dtype}, planned {t.shape} {t.dtype}")
            f.write(memoryview(data.view(torch.uint8).numpy()) if data.numel() else b"")
            if progress is not None:
                progress.update(t.nbytes)


def write_shards(save_dir, shards: dict[str, list[PlannedTensor]], *, workers: int, quiet: bool, label: str,
                 metadata: dict | None = None, describe=None) -> int:
    """``save_dir``, atomically: each shard (file name -> its tensors) a safetensors file
    (``write_file``), then ``describe(root)`` adds the files that describe them all (an index, a
    config), once. Returns the bytes written."""
    def size(shard) -> int:
        return sum(t.nbytes for t in shard[1])

    items = list(shards.items())
    total = sum(map(size, items))
    write_shared(save_dir, items, lambda root, shard, progress: write_file(root / shard[0], shard[1], progress, metadata),
                 total, workers=workers, quiet=quiet, label=label, size=size,
                 publish=None if describe is None else lambda root, _: describe(root))
    return total
