"""Safetensors files, read: the header checked once, the data mapped, any rows of a tensor a
zero-copy NumPy view of the map.

    file    = N (8 bytes, little-endian) | header (N bytes of JSON) | data
    header  = {name: {"dtype": code, "shape": [d, ...], "data_offsets": [start, stop]}, ...,
               "__metadata__": {key: value}}   (optional)
    tensor  = data[start:stop], row-major, little-endian; no two tensors' bytes overlap

One reader for both sides: MindSpore's (NumPy arrays, bfloat16 as mindspore_ckpt.BF16) and
Hugging Face's (``ArrayPiece`` fills torch outputs straight from the map). The header is parsed
here rather than by ``safetensors.safe_open`` because the library tells no byte offsets, copies
every slice it returns (``get_slice``) and has no NumPy bfloat16: it could give neither views
nor a one-copy read. The checks are the library's (sizes, bounds, overlaps), raised as
CheckpointError naming the file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.mindspore_ckpt import DTYPES as _MS_DTYPES, MappedFile, StoredTensor, copy_into

DTYPES = {code: np.dtype(dtype) for _, dtype, code in _MS_DTYPES}   # code -> NumPy dtype (BF16: 2-byte struct)
_HEADER = 8


class SafetensorsFile(MappedFile):
    """A safetensors file mapped: ``tensors`` in name order (as the library and MindSpore list
    them), ``codes`` their dtype codes, ``metadata`` the header's; ``read(name, rows)`` a view."""

    def __init__(self, path):
        super().__init__(path)
        self.codes: dict[str, str] = {}
        buf, size = self._map, len(self._map)
        try:
            (length,) = struct.unpack("<Q", bytes(buf[:_HEADER]))
            if _HEADER + length > size:
                raise ValueError(f"header of {length} bytes runs past the end of the file")
            header = json.loads(bytes(buf[_HEADER:_HEADER + length]))
            self.metadata = header.pop("__metadata__", None) or {}
            if not isinstance(self.metadata, dict):
                raise ValueError("__metadata__ is not a map")
            for name in sorted(header):
                self._add(name, header[name], _HEADER + length, size)
        except (struct.error, ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as e:
            raise CheckpointError(self.path, f"not a safetensors file, or corrupt or truncated "
                                             f"({type(e).__name__}: {e})") from None
        spans = sorted((t.pieces[0], name) for name, t in self.tensors.items())
        for ((start, _), name), ((before, n), other) in zip(spans[1:], spans):
            if start < before + n:
                raise CheckpointError(self.path, f"{name}: its data overlaps that of {other}")

    def _add(self, name: str, fields: dict, base: int, size: int) -> None:
        code = fields["dtype"]
        if code not in DTYPES:
            raise CheckpointError(self.path, f"{name}: unsupported dtype {code}")
        shape, offsets = fields["shape"], fields["data_offsets"]
        if not _integers(shape) or not _integers(offsets) or len(offsets) != 2:
            raise CheckpointError(self.path, f"{name}: shape {shape} and data_offsets {offsets} must be lists of "
                                             "integers")
        shape = tuple(shape)
        if any(d < 0 for d in shape):
            raise CheckpointError(self.path, f"{name}: negative dimension in shape {list(shape)}")
        start, stop = offsets
        if stop - start != math.prod(shape) * DTYPES[code].itemsize or start < 0:
            raise CheckpointError(self.path, f"{name}: data_offsets {[start, stop]} do not fit shape {list(shape)}")
        if base + stop > size:
            raise CheckpointError(self.path, f"{name}: data runs past the end of the file (truncated)")
        self.tensors[name] = StoredTensor(DTYPES[code], shape, ((base + start, stop - start),))
        self.codes[name] = code


def _integers(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


@dataclass(frozen=True)
class ArrayPiece:
    """A stored piece as a NumPy view of the map, in its box's shape: the engine's handle
    (``engine.source``)."""

    array: np.ndarray

    def read_into(self, slices: tuple[slice, ...], out, exact: bool = False) -> None:
        """The elements ``slices`` into ``out`` (NumPy, or torch: cast to its dtype). ``exact``
        is moot: the map reads only the pages those elements lie on."""
        copy_into(out, self.array[slices])
