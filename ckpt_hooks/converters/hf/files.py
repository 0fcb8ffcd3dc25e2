"""Hugging Face safetensors directories: a lazy reader and a streaming writer.

    <dir>/model.safetensors                          one file, or
    <dir>/model-00001-of-00003.safetensors ...       shards, with
    <dir>/model.safetensors.index.json               {"metadata": {"total_size"}, "weight_map": {name: file}}

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, data_offsets), then the raw bytes. The header is parsed here so that a tensor's bytes
can be read with ``pread`` only for the rows asked for, and written one tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.safetensors_header import read_header

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    file: "SafetensorsFile"
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int        # of the first byte, in the file

    def read(self, start: int, numel: int) -> torch.Tensor:
        """Flat elements [start, start + numel) of the tensor, reading just their bytes."""
        out = torch.empty(numel, dtype=self.dtype)
        self.file.pread_into(out, self.offset + start * self.dtype.itemsize)
        return out


class SafetensorsFile:
    def __init__(self, path):
        self.path = str(path)
        self._fd, self._lock = None, threading.Lock()
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                def read(start: int, count: int) -> bytes:
                    f.seek(start)
                    return f.read(count)
                entries, _ = read_header(self.path, read, size, {code: dtype.itemsize for code, dtype in DTYPES.items()})
        except FileNotFoundError:
            raise CheckpointError(self.path, "file not found") from None
        self.tensors = {name: StoredTensor(self, name, DTYPES[e.dtype], e.shape, e.offset) for name, e in entries.items()}

    def pread_into(self, out: torch.Tensor, position: int) -> None:
        view = memoryview(out.view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], position + done)
            if n <= 0:
                raise CheckpointError(self.path, "unexpected end of file (truncated)")
            done += n

    def __del__(self):
        if self._fd is not None:
            os.close(self._fd)


def open_directory(directory) -> dict[str, StoredTensor]:
    """Every tensor of a Hugging Face model directory (one file or index + shards), unread."""
    root = Path(directory)
    index = root / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(index, f"unreadable index ({type(e).__name__}: {e})") from None
        opened = {name: SafetensorsFile(root / name) for name in files}
        tensors = {}
        for name, file in weight_map.items():
            if name not in opened[file].tensors:
                raise CheckpointError(opened[file].path, f"holds no '{name}', but {INDEX} says it does")
            tensors[name] = opened[file].tensors[name]
        return tensors
    if (root / SINGLE).is_file():
        return SafetensorsFile(root / SINGLE).tensors
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
