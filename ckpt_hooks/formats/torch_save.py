"""Writing ``torch.save`` files (any ``torch.load`` reads them) whose tensors are made only as
they are written, each in its place in the file: the zip laid out ahead (``torch_zip``), the
space allocated, the records filled by a few threads, headers last."""

from __future__ import annotations

import collections
import errno
import io
import itertools
import json
import math
import mmap
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy
import torch

from ckpt_hooks.formats import torch_zip
from ckpt_hooks.formats.checksum import crc32
from ckpt_hooks.formats.torch_pickle import _STORAGE_DTYPES, contiguous_strides


class PendingTensor:
    """A tensor of a file being written, made only when its bytes are written: ``fill(out)``
    builds it into ``out`` (contiguous, zeroed, of its shape and dtype: its place in the file),
    or ``produce()`` returns it made."""

    def __init__(self, shape, dtype: torch.dtype, produce=None, *, fill=None, in_place: bool = True):
        self.shape, self.dtype, self.produce, self.fill = tuple(shape), dtype, produce, fill
        self.in_place = in_place   # False: fill a buffer in memory, then write it (many short reads)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _PendingStorage:
    def __init__(self, key: str, tensor: PendingTensor):
        self.key, self.tensor = key, tensor


_STORAGE_TYPE_NAMES = {dtype: name for name, dtype in _STORAGE_DTYPES.items() if name != "UntypedStorage"}


class _StreamingPickler(pickle.Pickler):
    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages: list[_PendingStorage] = []

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            tensor = obj.detach()
            obj = PendingTensor(tensor.shape, tensor.dtype, lambda: tensor)
        if not isinstance(obj, PendingTensor):
            return NotImplemented
        storage = _PendingStorage(str(len(self.storages)), obj)
        self.storages.append(storage)
        return torch._utils._rebuild_tensor_v2, (storage, 0, torch.Size(obj.shape), contiguous_strides(obj.shape), False,
                                                 collections.OrderedDict())

    def persistent_id(self, obj):
        if isinstance(obj, _PendingStorage):
            storage_type = getattr(torch, _STORAGE_TYPE_NAMES[obj.tensor.dtype])
            return "storage", storage_type, obj.key, "cpu", math.prod(obj.tensor.shape)
        return None


def _made(pending: PendingTensor) -> torch.Tensor:
    """The tensor made in memory."""
    if pending.fill is not None:
        tensor = torch.zeros(pending.shape, dtype=pending.dtype)
        pending.fill(tensor)
        return tensor
    tensor = pending.produce().contiguous()
    if tuple(tensor.shape) != pending.shape or tensor.dtype != pending.dtype:
        raise ValueError(f"produced {tuple(tensor.shape)} {tensor.dtype}, promised {pending.shape} {pending.dtype}")
    return tensor


def _pwrite(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


_PAGE = mmap.ALLOCATIONGRANULARITY


def _write_tensor(fd: int, base: int, record: torch_zip.Record, pending: PendingTensor) -> None:
    """Make one tensor (of an archive at ``base``) in its place in the file where it can
    (``_fill_mapped``), else in memory, then written."""
    if record.size == 0:
        return
    at = base + record.data_offset
    if pending.fill is not None and pending.in_place and _fill_mapped(fd, at, record, pending):
        return
    data = _made(pending).reshape(-1).view(torch.uint8).numpy()
    record.crc = crc32(data)
    _pwrite(fd, data, at)


def _fill_mapped(fd: int, at: int, record: torch_zip.Record, pending: PendingTensor) -> bool:
    """Fill the record's place in the file, mapped (its pages only, while it is made): the reads
    land in the file's page cache, with no buffer between, and its CRC-32 is taken there. False
    where the file cannot be mapped (some network filesystems)."""
    start = at - at % _PAGE
    try:
        mapped = mmap.mmap(fd, at + record.size - start, offset=start)
    except OSError as e:
        if e.errno in _UNMAPPABLE:
            return False
        raise
    with mapped:
        place = numpy.frombuffer(mapped, numpy.uint8, record.size, at - start)
        pending.fill(torch.from_numpy(place).view(pending.dtype).view(pending.shape))
        record.crc = crc32(place)
        del place   # (the map closes only once nothing points into it)
    return True


_UNMAPPABLE = {errno.ENODEV, errno.EINVAL, errno.EACCES, errno.EOPNOTSUPP}


class _Archive:
    """One ``torch.save`` zip of ``obj``, laid out (``torch_zip``): its pickle and small records,
    and the PendingTensors whose records are to be made."""

    def __init__(self, obj):
        pickled = io.BytesIO()
        pickler = _StreamingPickler(pickled)
        pickler.dump(obj)
        self.small = {"data.pkl": pickled.getvalue(), ".format_version": b"1", ".storage_alignment": b"64",
                      "byteorder": b"little"}
        self.pending = [s.tensor for s in pickler.storages]
        self.records, self.directory = torch_zip.layout(
            [(name, len(data)) for name, data in self.small.items()]
            + [(f"data/{s.key}", s.tensor.nbytes) for s in pickler.storages]
            + [("version", 2), (".data/serialization_id", 40)])
        self.tensors = self.records[len(self.small):len(self.small) + len(self.pending)]
        # The central directory's size does not depend on the CRCs it will hold.
        self.size = self.directory + len(torch_zip.central_directory(self.records, self.directory))

    def finish(self, fd: int, base: int) -> dict[str, int]:
        """Once its tensors are in: the small records, the headers and the central directory.
        Returns the data records' CRC-32s."""
        crcs = {r.name: r.crc for r in self.tensors}
        # An id of the content (torch's is random): the same content, the same bytes.
        identity = crc32(json.dumps(crcs).encode())
        small = {**self.small, "version": b"3\n",
                 ".data/serialization_id": f"{identity:020d}{self.directory:020d}".encode()}
        for record in self.records:
            if record.name in small:
                record.crc = crc32(small[record.name])
                _pwrite(fd, small[record.name], base + record.data_offset)
            _pwrite(fd, torch_zip.local_header(record), base + record.header_offset)
        _pwrite(fd, torch_zip.central_directory(self.records, self.directory), base + self.directory)
        return crcs


def save_archives(path, objs: list, threads: int = 2) -> list[tuple[int, int, dict[str, int]]]:
    """Write ``objs`` one after another into ``path``, each as ``torch.save`` writes it (any
    ``torch.load`` reads it; a .distcp file is such a sequence), making their tensors only as they
    are written: the archives are laid out first and the file's space allocated (a full disk fails
    here, before any byte), then ``threads`` threads each make one PendingTensor leaf at a time
    into its place (``_write_tensor``); headers last. Memory: ``threads`` tensors' pages. Returns
    each archive's (offset, length, CRC-32 of each data record), the CRC-32s for the manifest;
    the zips hold them too. A write error (a full disk) is raised as an OSError naming ``path``."""
    archives = [_Archive(obj) for obj in objs]
    bases = list(itertools.accumulate((a.size for a in archives), initial=0))
    path = str(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if bases[-1]:
                os.posix_fallocate(fd, 0, bases[-1])
            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                futures = [pool.submit(_write_tensor, fd, base, record, pending)
                           for archive, base in zip(archives, bases)
                           for record, pending in zip(archive.tensors, archive.pending)]
                try:
                    for future in futures:
                        future.result()
                finally:   # on a failure the queued tensors are not started
                    pool.shutdown(cancel_futures=True)
            return [(base, archive.size, archive.finish(fd, base)) for archive, base in zip(archives, bases)]
        finally:
            os.close(fd)
    except OSError as e:   # a full disk: named as the file it would have been
        raise OSError(e.errno, e.strerror, path) from None


def save(obj, path, threads: int = 2) -> dict[str, int]:
    """Write ``obj`` as ``torch.save`` does (``save_archives``); returns each data record's
    CRC-32 ({"data/0": crc, ...})."""
    return save_archives(path, [obj], threads)[0][2]
