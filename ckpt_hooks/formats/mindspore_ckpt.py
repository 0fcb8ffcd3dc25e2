"""MindSpore ``.ckpt`` files, read lazily and written byte for byte as ``mindspore.save_checkpoint``.

A ``.ckpt`` is the protobuf ``Checkpoint`` of ``mindspore/train/checkpoint_pb2.py``::

    Checkpoint     { repeated Value value = 1; }
    Value          { required string tag = 1; oneof { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
    TensorProto    { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }
    MapTensorProto { repeated TensorProto tensor = 1; }

written as one single-value ``Checkpoint`` per record, back to back. ``save_checkpoint`` cuts a
tensor's bytes every 512 MiB into consecutive records with the same tag, each repeating the full
dims; it writes nothing at all for an empty tensor. A string (from ``append_dict``) has
tensor_type ``"str"``, dims ``[0]`` and the UTF-32 bytes of a NumPy ``U`` array. With
``crc_check=True`` the file ends with ``b"crc_num"`` and the CRC32 of everything before it as
10 big-endian bytes.

The wire format is parsed by hand (protobuf_wire) over an ``mmap``: listing a file reads only the record
headers, and a tensor held in one record is read as a zero-copy view of the map.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.atomic import atomic_write
from ckpt_hooks.formats.checksum import crc32
from ckpt_hooks.formats.protobuf_wire import field, message, text

# NumPy has no bfloat16 without ml_dtypes. Our bfloat16 arrays have this 2-byte structured dtype
# holding the raw bits: unlike plain uint16 it stays bfloat16 through slicing and saving, and it
# refuses arithmetic. ``a.view(np.uint16)`` gives the bits, and
# ``torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)`` a torch tensor. The writers also
# accept any NumPy dtype named "bfloat16" (ml_dtypes', MindSpore's ``Tensor.asnumpy()``).
BF16 = np.dtype([("bf16", "<u2")])

# MindSpore name, NumPy dtype, safetensors code; in the order the safetensors library lays
# tensors out (by its dtype enum, largest first), which ms_safetensors follows.
DTYPES = (
    ("UInt64", np.uint64, "U64"), ("Int64", np.int64, "I64"), ("Float64", np.float64, "F64"),
    ("Float32", np.float32, "F32"), ("UInt32", np.uint32, "U32"), ("Int32", np.int32, "I32"),
    ("BFloat16", BF16, "BF16"), ("Float16", np.float16, "F16"), ("UInt16", np.uint16, "U16"),
    ("Int16", np.int16, "I16"), ("Int8", np.int8, "I8"), ("UInt8", np.uint8, "U8"), ("Bool", np.bool_, "BOOL"),
)
_INDEX = {np.dtype(dtype): i for i, (_, dtype, _) in enumerate(DTYPES)}
_MS_DTYPES = {name: np.dtype(dtype) for name, dtype, _ in DTYPES}

SLICE_BYTES = 512 * 1024 * 1024  # save_checkpoint's record size: 1024 * SLICE_SIZE (in KiB)
_CRC_TRAILER = 17  # b"crc_num" + 10 bytes


def dtype_index(dtype: np.dtype, path, name: str) -> int:
    """The row of DTYPES for an array's dtype."""
    index = _INDEX.get(BF16 if dtype.name == "bfloat16" else dtype)
    if index is None:
        raise CheckpointError(path, f"{name}: dtype {dtype} has no MindSpore equivalent")
    return index


def copy_into(out, array: np.ndarray) -> None:
    """``array`` (BF16 for bfloat16) into ``out``: a NumPy array, or a torch tensor of any dtype
    (cast after the copy). Copied as same-sized integers: the bits are all that matter, and NumPy
    has no bfloat16."""
    if isinstance(out, np.ndarray):
        np.copyto(out, array)
        return
    import torch

    dtype = torch.bfloat16 if array.dtype == BF16 else torch.from_numpy(np.empty(0, array.dtype)).dtype
    buffer = out if out.dtype == dtype else torch.empty(out.shape, dtype=dtype)
    bits = getattr(torch, f"int{8 * array.dtype.itemsize}")
    np.copyto(buffer.view(bits).numpy(), array.view(f"<i{array.dtype.itemsize}"))
    if buffer is not out:
        out.copy_(buffer)


def raw_bytes(array: np.ndarray) -> np.ndarray:
    """An array's bytes in row-major order, as flat uint8 (a view when it is contiguous)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a mapped file: its bytes are ``pieces`` of (file offset, nbytes), in order."""

    dtype: np.dtype
    shape: tuple[int, ...]
    pieces: tuple[tuple[int, int], ...]


class MappedFile:
    """A checkpoint file mapped read-only; ``tensors`` (filled by subclasses) says where each
    tensor's bytes lie."""

    def __init__(self, path):
        self.path = str(path)
        self.tensors: dict[str, StoredTensor] = {}
        try:
            with open(self.path, "rb") as f:
                empty = os.fstat(f.fileno()).st_size == 0  # mmap refuses empty files
                self._map = b"" if empty else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CheckpointError(self.path, "file not found") from None
        except OSError as e:
            raise CheckpointError(self.path, f"cannot read the file ({e.strerror})") from None

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def crc32(self, name: str) -> int:
        """The CRC-32 of tensor ``name``'s bytes in row-major order, whatever records hold them
        (what the writers record in a manifest)."""
        crc = 0
        for offset, n in self.tensors[name].pieces:
            crc = crc32(memoryview(self._map)[offset:offset + n], crc)
        return crc

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Tensor ``name``, or the rows ``rows`` (step 1) of its first axis. A read-only view of
        the map when those bytes are in one record, else a copy of just those bytes; index the
        result further for a box."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(self.path, f"no tensor {name!r}")
        shape, start = t.shape, 0
        if rows is not None:
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("read: rows must be a slice with step 1")
            shape = (max(stop - start, 0),) + shape[1:]
        lo = start * t.dtype.itemsize * math.prod(shape[1:])
        hi = lo + t.dtype.itemsize * math.prod(shape)
        parts, pos = [], 0
        for offset, n in t.pieces:
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                parts.append(memoryview(self._map)[offset + a - pos:offset + b - pos])
            pos += n
        if len(parts) == 1:
            return np.frombuffer(parts[0], t.dtype).reshape(shape)
        out = np.empty(shape, t.dtype)
        flat, at = out.reshape(-1).view(np.uint8), 0
        for part in parts:
            flat[at:at + len(part)] = np.frombuffer(part, np.uint8)
            at += len(part)
        return out


class CkptFile(MappedFile):
    """A MindSpore ``.ckpt`` opened lazily. ``tensors`` in file order; ``strings`` holds the
    string values; ``map_parameters`` names the MapParameters (hash-table embeddings), which
    are listed, not read. With ``check_crc`` the CRC trailer, when there is one, is checked
    as ``load_checkpoint(crc_check=True)`` does: that reads the whole file."""

    def __init__(self, path, check_crc: bool = False):
        super().__init__(path)
        self.strings: dict[str, str] = {}
        self.map_parameters: list[str] = []
        buf, end = self._map, len(self._map)
        # MindSpore's own test for the trailer: its bytes at the very end.
        self.has_crc = end >= _CRC_TRAILER and buf[end - _CRC_TRAILER:end - 10] == b"crc_num"
        if self.has_crc:
            end -= _CRC_TRAILER
            if check_crc and crc32(memoryview(buf)[:end]) != int.from_bytes(buf[end + 7:], "big"):
                raise CheckpointError(self.path, "CRC mismatch: the file is damaged")
        try:
            for tag, tensor_type, dims, pieces in self._records(end):
                self._add(tag, tensor_type, dims, pieces)
        except ValueError as e:  # UnicodeDecodeError included
            raise CheckpointError(self.path, f"corrupt or truncated .ckpt ({e})") from None

    def _records(self, end: int) -> list:
        """[tag, tensor_type, dims, pieces] per tensor, its consecutive records merged."""
        buf, merged, seen = self._map, [], set()
        top = message(buf, 0, end)
        if set(top) - {1}:
            raise ValueError(f"unexpected field {min(set(top) - {1})} in Checkpoint")
        for span in top.get(1, []):
            if not isinstance(span, tuple):
                raise ValueError("a record is not a message")
            value = message(buf, *span)
            tag = text(buf, field(value, 1, tuple, "a record's tag"))
            if 3 in value:
                if tag not in self.map_parameters:
                    self.map_parameters.append(tag)
                continue
            tensor = message(buf, *field(value, 2, tuple, f"{tag}: the tensor"))
            tensor_type = text(buf, field(tensor, 2, tuple, f"{tag}: tensor_type"))
            dims = tensor.get(1, [])
            start, stop = field(tensor, 3, tuple, f"{tag}: tensor_content")
            if merged and merged[-1][0] == tag:  # the next 512 MiB of the same tensor
                if merged[-1][1:3] != [tensor_type, dims]:
                    raise ValueError(f"{tag}: its records disagree on dtype or shape")
                merged[-1][3].append((start, stop - start))
            elif tag in seen:
                raise ValueError(f"{tag} appears twice")
            else:
                seen.add(tag)
                merged.append([tag, tensor_type, dims, [(start, stop - start)]])
        return merged

    def _add(self, tag: str, tensor_type: str, dims: list, pieces: list) -> None:
        nbytes = sum(n for _, n in pieces)
        if tensor_type == "str":  # NumPy pads its U arrays with NULs
            content = b"".join(bytes(self._map[o:o + n]) for o, n in pieces)
            self.strings[tag] = content.decode("utf-32-le").rstrip("\0")
            return
        dtype = _MS_DTYPES.get(tensor_type)
        if dtype is None:
            raise CheckpointError(self.path, f"{tag}: unknown or unsupported dtype {tensor_type!r}")
        if not all(isinstance(d, int) and d < 1 << 63 for d in dims):
            raise ValueError(f"{tag}: bad dims {dims}")
        shape = () if dims == [0] else tuple(dims)  # load_checkpoint reads dims [0] as a scalar
        expected = math.prod(shape) * dtype.itemsize
        if nbytes != expected:
            raise CheckpointError(self.path, f"{tag}: {nbytes} bytes of data for shape {list(shape)} "
                                             f"{tensor_type} ({expected} expected)")
        self.tensors[tag] = StoredTensor(dtype, shape, tuple(pieces))


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(number: int, data: bytes) -> bytes:
    return bytes([number << 3 | 2]) + _varint_bytes(len(data)) + data


@dataclass(frozen=True)
class PendingArray:
    """An array of a file being written, produced (``produce()``) only when its bytes are written:
    a writer that needs every shape first (safetensors' header) keeps one array in memory."""

    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    def array(self, path, name: str) -> np.ndarray:
        array = np.asarray(self.produce())
        if tuple(array.shape) != tuple(self.shape) or array.dtype != self.dtype:
            raise ValueError(f"{path}: {name}: produced {array.dtype} {list(array.shape)}, planned "
                             f"{self.dtype} {list(self.shape)}")
        return array


def _encode(path, name: str, value) -> Iterable:
    """The records of one tensor or string, as save_checkpoint writes them: (header, content) pairs."""
    if isinstance(value, PendingArray):
        value = value.array(path, name)
    if isinstance(value, str):
        array, tensor_type, dims = np.array(value), "str", [0]
    else:
        array = np.asarray(value)
        tensor_type, dims = DTYPES[dtype_index(array.dtype, path, name)][0], array.shape
        if array.size == 0:
            raise CheckpointError(path, f"{name}: a .ckpt cannot hold an empty tensor "
                                        "(mindspore.save_checkpoint drops it silently)")
    content = raw_bytes(array)
    tag = _length_delimited(1, name.encode())
    # Fields in number order, as protobuf serializes them; dims unpacked (proto2).
    dims_and_type = b"".join(b"\x08" + _varint_bytes(d) for d in dims) + _length_delimited(2, tensor_type.encode())
    for i in range(0, content.size, SLICE_BYTES):
        piece = content[i:i + SLICE_BYTES]
        tensor = dims_and_type + b"\x1a" + _varint_bytes(piece.size)
        value_head = tag + b"\x12" + _varint_bytes(len(tensor) + piece.size) + tensor
        yield b"\x0a" + _varint_bytes(len(value_head) + piece.size) + value_head, piece


def save(path, items: Mapping | Iterable, crc: bool = False) -> dict[str, int]:
    """Write ``items`` (name -> array, PendingArray or str, as a mapping or (name, value) pairs) the way
    ``mindspore.save_checkpoint(..., crc_check=crc)`` does, to the byte. Values are taken one at
    a time (pairs may come from a generator), written to a temporary file renamed into place
    when complete. bfloat16 arrays have dtype BF16 (or any NumPy dtype named "bfloat16").
    Returns each tensor's CRC-32 (``MappedFile.crc32``), taken from the bytes as they are written."""
    crcs = {}
    with atomic_write(path) as f:
        crc_num = 0
        for name, value in items.items() if isinstance(items, Mapping) else items:
            tensor_crc = 0
            for header, piece in _encode(path, name, value):
                f.write(header)
                f.write(piece)
                tensor_crc = crc32(piece, tensor_crc)
                if crc:
                    crc_num = crc32(piece, crc32(header, crc_num))
            piece = None   # a view of the array: released before the next one is made
            if not isinstance(value, str):
                crcs[name] = tensor_crc
        if crc:
            f.write(b"crc_num" + crc_num.to_bytes(10, "big"))
    return crcs
