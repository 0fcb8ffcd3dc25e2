"""MindSpore-style safetensors files, as ``mindspore.save_checkpoint(..., format="safetensors")``.

Plain safetensors (read by formats.safetensors) with ``{"format": "ms"}`` metadata (none when
there are no tensors); with ``crc_check=True`` MindSpore adds ``"crc_num"``, the CRC32 of each
name and its bytes in name order; a dtype safetensors lacks (Int4) is noted in the metadata
under the tensor's name. BF16 arrays read as mindspore_ckpt.BF16. The writer lays the file out
as the safetensors library does (tensors by its dtype order then name, header padded with spaces
to 8 bytes), so its output is byte-identical to MindSpore's.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping

import numpy as np

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import safetensors
from ckpt_hooks.formats.atomic import atomic_write
from ckpt_hooks.formats.checksum import crc32
from ckpt_hooks.formats.mindspore_ckpt import DTYPES, PendingArray, dtype_index, raw_bytes


class SafetensorsFile(safetensors.SafetensorsFile):
    """A MindSpore safetensors file opened lazily: ``tensors`` in name order (MindSpore's),
    ``metadata`` the header's. ``check_crc`` checks ``crc_num`` when present (reads the file)."""

    def __init__(self, path, check_crc: bool = False):
        super().__init__(path)
        for name in self.tensors:
            if name in self.metadata:
                raise CheckpointError(self.path, f"{name}: unsupported MindSpore dtype {self.metadata[name]}")
        if check_crc and "crc_num" in self.metadata:
            crc = 0
            for name, t in self.tensors.items():
                crc = crc32(name.encode(), crc)
                crc = crc32(memoryview(self._map)[t.pieces[0][0]:sum(t.pieces[0])], crc)
            if str(crc) != self.metadata["crc_num"]:
                raise CheckpointError(self.path, "CRC mismatch: the file is damaged")


def save(path, items: Mapping) -> dict[str, int]:
    """Write ``items`` (name -> array, or PendingArray) as ``save_checkpoint(..., format="safetensors")``
    does, to the byte, streamed: the header from the shapes and dtypes, then one array produced and
    written at a time, into a temporary file renamed into place when complete. bfloat16 arrays
    have dtype BF16 (or any NumPy dtype named "bfloat16"). Returns each tensor's CRC-32, taken
    from the bytes as they are written."""
    items = {name: value if isinstance(value, PendingArray) else np.asarray(value) for name, value in items.items()}
    index = {name: dtype_index(np.dtype(value.dtype), path, name) for name, value in items.items()}
    order = sorted(items, key=lambda name: (index[name], name))
    entries, offset = {}, 0
    for name in order:
        shape = tuple(items[name].shape)
        nbytes = math.prod(shape) * np.dtype(items[name].dtype).itemsize
        entries[name] = {"dtype": DTYPES[index[name]][2], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = {"__metadata__": {"format": "ms"}, **entries} if entries else {}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    crcs = {}
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            value = items.pop(name)   # held no longer than its write
            array = value.array(path, name) if isinstance(value, PendingArray) else value
            data = raw_bytes(array)   # a copy only for a non-contiguous view
            f.write(data)
            crcs[name] = crc32(data)
            del array, data           # before the next one is produced
    return crcs
