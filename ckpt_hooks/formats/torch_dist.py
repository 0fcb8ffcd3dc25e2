"""Megatron's distributed checkpoint format (``--ckpt-format torch_dist``), read lazily and written.

An iteration directory holds PyTorch distributed-checkpoint (DCP) files plus Megatron's own::

    .metadata            pickled ``torch.distributed.checkpoint.metadata.Metadata``: per key the
                         global shape, dtype and chunks (offsets, sizes), per chunk (or object)
                         the file, byte offset and length of its record
    __{rank}_{i}.distcp  records: each a ``torch.save`` archive of one chunk (a tensor) or of one
                         object (a Megatron ShardedObject: ``key/shard_{offsets}_{global shape}``)
    common.pt            what every rank shares (args, iteration, scheduler, ...)
    metadata.json        {"sharded_backend": "torch_dist", ...}

The ``.metadata`` pickle is read with an allowlist of DCP's own dataclasses; every record is
opened as a lazy ``TorchFile`` over its byte range, so a reader touches only the chunks (and
inside them the bytes) a plan asks for. Writing lays out a file's records and makes each tensor in
its place (``torch_save.save_archives``).
"""

from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.atomic import completed, fsync, mark_complete
from ckpt_hooks.formats.torch_pickle import LazyTensor, SafeUnpickler, TorchFile, _allowed_global
from ckpt_hooks.formats.torch_save import PendingTensor, save_archives

METADATA = ".metadata"
COMMON = "common.pt"
BACKEND = "metadata.json"
BACKEND_CONTENT = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}


def _dcp_classes() -> dict:
    from torch.distributed.checkpoint import filesystem, metadata, planner

    names = {metadata: ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"),
             filesystem: ("_StorageInfo",),
             planner: ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")}
    return {(module.__name__, name): getattr(module, name) for module, items in names.items() for name in items}


def _layout(name: str) -> torch.layout:
    """torch.layout's pickled form: its name, e.g. "torch.strided"."""
    layout = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(layout, torch.layout):
        raise pickle.UnpicklingError(f"unknown tensor layout {name!r}")
    return layout


class _MetadataUnpickler(SafeUnpickler):
    """DCP's metadata classes, torch.Size, dtypes and layouts, and the torch-file allowlist; nothing else."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self._dcp = _dcp_classes()

    def allowed_global(self, module, name):
        obj = self._dcp.get((module, name))
        if obj is None and module == "torch" and name == "Size":
            obj = torch.Size
        if obj is None and (module, name) == ("torch.serialization", "_get_layout"):
            obj = _layout
        return obj if obj is not None else _allowed_global(module, name)


@dataclass(frozen=True)
class Record:
    """Where one chunk or object lies: ``relative_path`` from the iteration directory."""

    relative_path: str
    offset: int
    length: int


@dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    record: Record


@dataclass
class DistTensor:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[Chunk]


class DistCheckpoint:
    """A torch_dist iteration directory opened lazily: ``tensors`` (key -> DistTensor),
    ``objects`` (object key ``name/shard_...`` -> Record), ``common`` (common.pt)."""

    def __init__(self, iter_dir):
        self.iter_dir = Path(iter_dir)
        self._records: dict[Record, TorchFile] = {}
        backend = self.iter_dir / BACKEND
        try:
            content = json.loads(backend.read_text())
        except FileNotFoundError:
            raise CheckpointError(backend, "missing: not a Megatron distributed checkpoint") from None
        except ValueError as e:
            raise CheckpointError(backend, f"not JSON ({e})") from None
        if not isinstance(content, dict) or content.get("sharded_backend") != "torch_dist":
            found = content.get("sharded_backend") if isinstance(content, dict) else content
            raise CheckpointError(backend, f"sharded backend {found!r}, only torch_dist is supported")
        metadata = self._read_metadata()
        try:
            self.tensors, self.objects = self._index(metadata)
        except (AttributeError, TypeError, ValueError, KeyError, OverflowError, RecursionError) as e:
            raise CheckpointError(self.iter_dir / METADATA,
                                  f"malformed DCP metadata ({type(e).__name__}: {e})") from None
        self.common = read_common(self.iter_dir)

    def _read_metadata(self):
        path = self.iter_dir / METADATA
        try:
            # From memory: a declared length is then checked against the bytes there are.
            metadata = _MetadataUnpickler(path.read_bytes()).load()
        except FileNotFoundError:
            raise CheckpointError(path, "missing: the checkpoint's index of chunks (an interrupted save?)") from None
        except pickle.UnpicklingError as e:
            raise CheckpointError(path, str(e)) from None
        except Exception as e:   # noqa: BLE001 — untrusted bytes: the allowed classes' own checks raise anything
            raise CheckpointError(path, f"unreadable DCP metadata ({type(e).__name__}: {e})") from None
        if not hasattr(metadata, "state_dict_metadata") or \
                not isinstance(getattr(metadata, "storage_data", None), dict):
            raise CheckpointError(path, "not DCP metadata (no state_dict_metadata / storage_data)")
        return metadata

    def _index(self, metadata) -> tuple[dict[str, DistTensor], dict[str, Record]]:
        """Every key's chunks with their records, checked against the .distcp files' sizes."""
        path = self.iter_dir / METADATA
        sizes: dict[str, int] = {}
        records: dict[tuple[str, tuple | None], Record] = {}
        for index, info in metadata.storage_data.items():
            name = info.relative_path
            if os.sep in name or name.startswith(".") or "/" in name:
                raise CheckpointError(path, f"record file '{name}' is not a file of the checkpoint directory")
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(path, f"'{index.fqn}' is stored with transforms {info.transform_descriptors}")
            if name not in sizes:
                try:
                    sizes[name] = os.path.getsize(self.iter_dir / name)
                except FileNotFoundError:
                    raise CheckpointError(self.iter_dir / name, "missing (the .metadata lists records in it)") from None
            if info.offset < 0 or info.length <= 0 or info.offset + info.length > sizes[name]:
                raise CheckpointError(self.iter_dir / name, f"'{index.fqn}' lies at bytes [{info.offset}, "
                                                            f"{info.offset + info.length}) beyond its {sizes[name]} "
                                                            "bytes (truncated?)")
            offset = None if index.offset is None else tuple(index.offset)
            records[(index.fqn, offset)] = Record(name, info.offset, info.length)
        tensors, objects = {}, {}
        for key, entry in metadata.state_dict_metadata.items():
            chunks = getattr(entry, "chunks", None)
            if chunks is None:   # BytesStorageMetadata
                record = records.get((key, None))
                if record is None:
                    raise CheckpointError(path, f"object '{key}' has no record")
                objects[key] = record
                continue
            found, shape = [], tuple(entry.size)
            for chunk in chunks:
                record = records.get((key, tuple(chunk.offsets)))
                if record is None:
                    raise CheckpointError(path, f"'{key}' chunk at {tuple(chunk.offsets)} has no record")
                found.append(Chunk(tuple(chunk.offsets), tuple(chunk.sizes), record))
                if len(chunk.offsets) != len(shape) or len(chunk.sizes) != len(shape) or \
                        any(o < 0 or n < 0 or o + n > d for o, n, d in zip(chunk.offsets, chunk.sizes, shape)):
                    raise CheckpointError(path, f"'{key}' chunk at {tuple(chunk.offsets)} of size {tuple(chunk.sizes)} "
                                                f"lies outside its shape {shape}")
            # A declared shape is believed only as far as chunks fill it (each read from a record
            # that fits its file): not a petabyte tensor from a few bytes of .metadata.
            covered = sum(math.prod(c.sizes) for c in found)
            if covered < math.prod(shape):
                raise CheckpointError(path, f"'{key}' declares shape {shape} ({math.prod(shape)} elements), its "
                                            f"chunks hold {covered}")
            tensors[key] = DistTensor(key, shape, entry.properties.dtype, found)
        return tensors, objects

    def record(self, record: Record) -> TorchFile:
        """The torch.save archive of a record, opened once."""
        opened = self._records.get(record)
        if opened is None:
            opened = TorchFile(self.iter_dir / record.relative_path, record.offset, record.length)
            self._records[record] = opened
        return opened

    def chunk_tensor(self, key: str, chunk: Chunk) -> tuple[TorchFile, LazyTensor]:
        """A chunk's file and lazy tensor, checked to be the chunk's dtype and shape."""
        opened = self.record(chunk.record)
        tensor = opened.obj
        expected = self.tensors[key]
        if not isinstance(tensor, LazyTensor) or tensor.shape != chunk.sizes or tensor.dtype != expected.dtype:
            raise CheckpointError(opened.path, f"'{key}' chunk at {chunk.offsets}: the record holds "
                                               f"{getattr(tensor, 'shape', type(tensor).__name__)}, the .metadata "
                                               f"says {chunk.sizes} {expected.dtype}")
        opened.check_complete([tensor])
        return opened, tensor

    def read_object(self, key: str):
        """An object (a Megatron ShardedObject's data), read whole."""
        record = self.objects.get(key)
        if record is None:
            raise CheckpointError(self.iter_dir / METADATA, f"no object '{key}'")
        opened = self.record(record)
        return opened.materialize(opened.obj)

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self._records.values())


def read_common(iter_dir) -> dict:
    """common.pt: what every rank shares (args, iteration, scheduler, ...), read whole."""
    common = TorchFile(Path(iter_dir) / COMMON)
    content = common.materialize(common.obj)
    if not isinstance(content, dict):
        raise CheckpointError(common.path, "not a dict of common state")
    return content


def is_dist_checkpoint(iter_dir) -> bool:
    return (Path(iter_dir) / METADATA).is_file() or (Path(iter_dir) / BACKEND).is_file()


# ---- writing -------------------------------------------------------------------------------

@dataclass
class Item:
    """One record to write: a chunk of tensor ``key`` (``pending``: made when written) or an
    object (``obj``; ``offsets``/``shape``/``dtype`` unused)."""

    key: str
    offsets: tuple[int, ...] | None = None
    shape: tuple[int, ...] | None = None        # the global shape
    sizes: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    pending: PendingTensor | None = None
    obj: object = None


def write_records(path, items: list[Item], checksums: dict | None = None) -> list[tuple[Item, Record]]:
    """Write ``items`` into one .distcp file, each record a ``torch.save`` archive made in place
    (``save_archives``), fsync it (by the worker that wrote it, beside the others' writing) and
    mark it complete (``completed_records``). ``checksums[path]`` gets its records' CRC-32s
    (``record_crcs``)."""
    written = save_archives(path, [item.obj if item.pending is None else item.pending for item in items])
    fsync(path)
    mark_complete(path, [[item.key, offset, length, crcs] for item, (offset, length, crcs) in zip(items, written)])
    if checksums is not None:
        checksums[str(path)] = record_crcs(written)
    return [(item, Record(Path(path).name, offset, length)) for item, (offset, length, _) in zip(items, written)]


def completed_records(path, items: list[Item], checksums: dict | None = None) -> list[tuple[Item, Record]] | None:
    """The records of a .distcp file that an earlier, interrupted run of the same conversion
    completed (the same keys, each record's CRC-32s checked against its bytes); None when the
    file must be written again. ``checksums``: as ``write_records``."""
    facts = completed(path)
    try:
        if [key for key, *_ in facts] != [item.key for item in items]:
            return None
        for _, offset, length, crcs in facts:
            TorchFile(path, offset, length).check_crcs(crcs)
    except (TypeError, ValueError, OSError, CheckpointError):   # no marker, a malformed one, changed bytes
        return None
    if checksums is not None:
        checksums[str(path)] = record_crcs([(offset, length, crcs) for _, offset, length, crcs in facts])
    return [(item, Record(Path(path).name, offset, length)) for item, (_, offset, length, _) in zip(items, facts)]


def record_crcs(written) -> dict[str, int]:
    """A .distcp file's CRC-32s as its manifest lists them: ``"<archive offset>:<zip record>"``."""
    return {f"{offset}:{name}": crc for offset, _, crcs in written for name, crc in crcs.items()}


def crcs_at(listed: dict | None, offset: int) -> dict[str, int] | None:
    """Of a .distcp file's listed CRC-32s (``record_crcs``), those of the archive at ``offset``."""
    prefix = f"{offset}:"
    return None if listed is None else {k[len(prefix):]: v for k, v in listed.items() if k.startswith(prefix)}


def write_metadata(iter_dir, written: list[tuple[Item, Record]]) -> None:
    """The .metadata of the records written (all files), as DCP pickles it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, TensorProperties, TensorStorageMetadata)

    state, storage = {}, {}
    for item, record in written:
        if item.pending is None:
            state[item.key] = BytesStorageMetadata()
            storage[MetadataIndex(item.key)] = _StorageInfo(record.relative_path, record.offset, record.length)
            continue
        entry = state.setdefault(item.key, TensorStorageMetadata(TensorProperties(dtype=item.dtype),
                                                                 torch.Size(item.shape), []))
        entry.chunks.append(ChunkStorageMetadata(torch.Size(item.offsets), torch.Size(item.sizes)))
        storage[MetadataIndex(item.key, torch.Size(item.offsets))] = \
            _StorageInfo(record.relative_path, record.offset, record.length)
    with open(Path(iter_dir) / METADATA, "wb") as f:   # fsync'ed with the staged directory
        pickle.dump(Metadata(state_dict_metadata=state, storage_data=storage), f)


def write_common(iter_dir, common: dict) -> None:
    torch.save(common, Path(iter_dir) / COMMON)   # fsync'ed with the staged directory
    (Path(iter_dir) / BACKEND).write_text(json.dumps(BACKEND_CONTENT))


def object_key(name: str, offsets: tuple[int, ...] = (0,), shape: tuple[int, ...] = (1,)) -> str:
    """Megatron's ShardedObject.unique_key (default: an object held once, shard 0 of 1)."""
    return f"{name}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}"
