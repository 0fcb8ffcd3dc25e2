"""The safetensors header: an 8-byte little-endian length, a JSON object ``{name: {"dtype",
"shape", "data_offsets"}, "__metadata__": {...}}``, then the tensors' raw bytes. Parsed and
checked here once, for the Hugging Face (torch) and MindSpore (NumPy) readers, which map the
dtype codes to their own dtypes."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ckpt_hooks.errors import CheckpointError


@dataclass(frozen=True)
class Entry:
    dtype: str                # the safetensors code: "F32", "BF16", ...
    shape: tuple[int, ...]
    offset: int               # of the first byte, in the file
    nbytes: int


def read_header(path, read: Callable[[int, int], bytes], size: int,
                itemsizes: dict[str, int]) -> tuple[dict[str, Entry], dict]:
    """(name -> Entry, metadata) of the safetensors file ``path`` of ``size`` bytes, whose bytes
    ``read(start, count)`` returns; ``itemsizes`` maps the dtype codes the caller can read."""
    try:
        (length,) = struct.unpack("<Q", read(0, 8))
        if 8 + length > size:
            raise ValueError(f"header of {length} bytes runs past the end of the file")
        header = json.loads(read(8, length))
        metadata = header.pop("__metadata__", None) or {}
        entries = {name: _entry(path, name, fields, 8 + length, size, itemsizes) for name, fields in header.items()}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(path, f"not a safetensors file, or corrupt or truncated ({type(e).__name__}: {e})") \
            from None
    return entries, metadata


def _entry(path, name: str, fields: dict, base: int, size: int, itemsizes: dict[str, int]) -> Entry:
    if fields["dtype"] not in itemsizes:
        raise CheckpointError(path, f"{name}: unsupported dtype {fields['dtype']}")
    shape = tuple(int(d) for d in fields["shape"])
    if any(d < 0 for d in shape):
        raise CheckpointError(path, f"{name}: negative dimension in shape {list(shape)}")
    start, stop = (int(o) for o in fields["data_offsets"])
    if stop - start != math.prod(shape) * itemsizes[fields["dtype"]] or start < 0:
        raise CheckpointError(path, f"{name}: data_offsets {[start, stop]} do not fit shape {list(shape)}")
    if base + stop > size:
        raise CheckpointError(path, f"{name}: data runs past the end of the file (truncated)")
    return Entry(fields["dtype"], shape, base + start, stop - start)
