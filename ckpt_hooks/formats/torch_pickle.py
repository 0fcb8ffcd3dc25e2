"""Lazy, safe reading of ``torch.save`` zip files.

The pickle is unpickled with an explicit allowlist of globals (nothing else is ever
imported or called), and tensors come back as :class:`LazyTensor` handles that know
where their bytes lie in the file. Bytes are read with ``pread`` only when a plan asks
for them, so a reader holds at most one tensor of a source file in memory. (Writing such
files: ``torch_save``.)
"""

from __future__ import annotations

import argparse
import collections
import enum
import importlib
import io
import itertools
import math
import os
import pickle
import signal
import struct
import sys
import threading
import warnings
import zipfile
from dataclasses import dataclass

import torch

from ckpt_hooks.algebra.layout import innermost_partial, run_length
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.checksum import crc32

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}


@dataclass(frozen=True)
class LazyStorage:
    path: str
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of a ``torch.save`` file, not yet read."""

    storage: LazyStorage
    offset: int
    shape: tuple
    stride: tuple

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in reversed(list(zip(self.shape, self.stride))):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def contiguous_strides(shape) -> tuple[int, ...]:
    """The strides, in elements, of a row-major tensor of ``shape``."""
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    # Checked once the pickle is loaded (TorchFile._check_tensor), with the file's size at hand.
    return LazyTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


# Every global a checkpoint may name, and what it becomes. Tensor rebuilds turn into
# lazy handles; everything else is a plain data type that runs no code of the file's.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("argparse", "Namespace"): argparse.Namespace,
    ("signal", "Signals"): signal.Signals,   # Megatron-LM's --exit-signal
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,             # protocol 2's name (torch.save's): MindSpeed-LLM's noop_layers
    ("__builtin__", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): lambda text, encoding="latin1": text.encode(encoding),
}
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}
# Enums defined by the trainers appear in saved ``args`` (e.g. AttnBackend): those of the modules
# listed, or of a trainer's module already imported. No other module is imported on a pickle's
# word: an import runs code, and a namespace package (megatron) takes modules from the working
# directory, which may be the checkpoint's.
_ENUM_MODULES = ("megatron.core.enums", "megatron.core.transformer.enums")
_ENUM_MODULE_PREFIXES = ("megatron.", "mindspeed.", "mindformers.")


def _allowed_global(module: str, name: str):
    if (module, name) in _ALLOWED:
        return _ALLOWED[(module, name)]
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if (module, name) in _NUMPY_GLOBALS:
        return getattr(importlib.import_module(module), name)
    if module in ("numpy", "numpy.dtypes") and name.endswith("DType"):  # not numpy.dtypes' helpers
        obj = getattr(importlib.import_module(module), name, None)
        return obj if isinstance(obj, type) else None
    if module in _ENUM_MODULES or module.startswith(_ENUM_MODULE_PREFIXES) and module in sys.modules:
        try:
            with warnings.catch_warnings():  # megatron's "Transformer Engine and Apex are not installed" & co.
                warnings.simplefilter("ignore")
                obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            obj = None
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            return obj
    return None


class SafeUnpickler(pickle._Unpickler):
    """pickle's own Python unpickler, with what a hostile pickle could use shut off: globals only
    from ``allowed_global`` (subclasses'), BUILD only on instances of the classes found there
    (on a class, a function or an enum member it would change them for every later load in the
    process), and no bytearray larger than the pickle (``bytearray(n)`` is zeroed before it is
    read into). Its memo is a dict: the C unpickler grows an array to whatever index a PUT names."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, **kwargs):
        super().__init__(io.BytesIO(data), **kwargs)
        self._size = len(data)
        self._classes: tuple[type, ...] = ()

    def allowed_global(self, module: str, name: str):
        raise NotImplementedError

    def find_class(self, module, name):
        obj = self.allowed_global(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"refused to load: the pickle needs '{module}.{name}', "
                                         "which is not on the allowlist")
        if isinstance(obj, type) and not issubclass(obj, enum.Enum) and obj not in self._classes:
            self._classes += (obj,)
        return obj

    def load_build(self):
        target = self.stack[-2] if len(self.stack) > 1 else None
        if isinstance(target, type) or not isinstance(target, self._classes):
            raise pickle.UnpicklingError(f"refused to load: the pickle sets the state of {target!r:.60}, "
                                         "not an object of an allowlisted class")
        super().load_build()

    def load_bytearray8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self._size:
            raise pickle.UnpicklingError(f"a bytearray of {n} bytes in a pickle of {self._size}")
        data = bytearray(n)
        self.readinto(data)
        self.append(data)

    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


class _Unpickler(SafeUnpickler):
    def __init__(self, data: bytes, path: str):
        super().__init__(data, encoding="utf-8")
        self._path = path

    def allowed_global(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:  # named inside persistent ids
            return _STORAGE_DTYPES[name]
        return _allowed_global(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not (isinstance(storage_type, torch.dtype) and isinstance(key, str) and isinstance(numel, int)
                and numel >= 0):
            raise pickle.UnpicklingError(f"persistent id {pid!r:.100} is not a storage")
        return LazyStorage(self._path, key, storage_type, numel)


class _Window(io.RawIOBase):
    """Bytes [base, base + length) of a file as a file of their own (a ``torch.save`` archive
    inside a torch_dist ``.distcp`` file)."""

    def __init__(self, path: str, base: int, length: int):
        self._file, self._base, self._length, self._position = open(path, "rb"), base, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, start + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._length - self._position))
        self._file.seek(self._base + self._position)
        got = self._file.readinto(memoryview(buffer)[:n])
        self._position += got
        return got

    def close(self) -> None:
        self._file.close()
        super().close()


_IOV_MAX = os.sysconf("SC_IOV_MAX")   # buffers one preadv fills
_MAX_DEPTH = 100          # a Megatron rank file nests about 8 deep
_MAX_ITEMS = 10_000_000  # ... and holds some thousands of objects


class TorchFile:
    """A ``torch.save`` zip file opened lazily: ``obj`` holds LazyTensors in place of tensors.
    ``base``/``length``: the archive is that byte range of ``path`` (a torch_dist item)."""

    def __init__(self, path, base: int = 0, length: int | None = None):
        self.path = str(path)
        self._base = base
        self._offsets: dict[str, int] = {}
        self.bytes_read = 0  # by pread: the pickle and the tensor bytes asked for
        self._fd, self._fd_lock = None, threading.Lock()
        try:
            self._end = os.path.getsize(self.path) if length is None else base + length
            with _Window(self.path, base, self._end - base) as window, zipfile.ZipFile(window) as archive:
                self._records = {info.filename: info for info in archive.infolist()}
            # Nothing is extracted, but such a name is no torch.save's: refused rather than trusted.
            escaping = next((n for n in self._records
                             if n.startswith(("/", "\\")) or ".." in n.replace("\\", "/").split("/")), None)
            if escaping is not None:
                raise CheckpointError(self.path, f"record name {escaping!r} leaves the archive (absolute, or '..')")
            pkl = next((n for n in self._records if n.endswith("/data.pkl")), None)
            if pkl is None:
                raise CheckpointError(self.path, "not a torch.save zip file (no data.pkl)")
            self._prefix = pkl[: -len("data.pkl")]
            if self._prefix + "byteorder" in self._records and self._read_record("byteorder") != b"little":
                raise CheckpointError(self.path, "big-endian torch files are not supported")
            self.obj = _Unpickler(self._read_record("data.pkl"), self.path).load()
            self._check_structure(self.obj, 0, set(), {})
        except CheckpointError:
            raise
        except FileNotFoundError:
            raise CheckpointError(self.path, "file not found") from None
        except zipfile.BadZipFile as e:
            raise CheckpointError(self.path, f"not a readable torch.save zip file, truncated or corrupt ({e})") from None
        except pickle.UnpicklingError as e:
            raise CheckpointError(self.path, str(e)) from None
        except OSError as e:
            if e.errno is not None:   # the disk or the filesystem failed, not the bytes
                raise CheckpointError(self.path, e.strerror) from None
            raise CheckpointError(self.path, f"corrupt pickle in torch file (OSError: {e})") from None
        except (EOFError, ValueError, KeyError, TypeError, struct.error, zipfile.LargeZipFile,
                MemoryError, OverflowError, RecursionError, IndexError, AttributeError, NotImplementedError) as e:
            raise CheckpointError(self.path, f"corrupt pickle in torch file ({type(e).__name__}: {e})") from None

    def _check_structure(self, value, depth: int, inside: set, expanded: dict) -> int:
        """Refuse now what would make a later walk of the pickle's objects run away, or a read
        allocate more than the file holds: nesting deeper than _MAX_DEPTH, a container inside
        itself, shared containers that expand to more than _MAX_ITEMS (a "billion laughs"), a
        tensor that does not lie inside its storage, a storage larger than the file. Returns the
        number of items ``value`` expands to."""
        if isinstance(value, LazyTensor):
            self._check_tensor(value)
            return 1
        if isinstance(value, dict):
            items = itertools.chain(value.keys(), value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = value
        elif isinstance(value, argparse.Namespace):
            items = vars(value).values()
        else:
            return 1
        if id(value) in expanded:
            return expanded[id(value)]
        if id(value) in inside:
            raise CheckpointError(self.path, f"the pickle holds a {type(value).__name__} inside itself")
        if depth >= _MAX_DEPTH:
            raise CheckpointError(self.path, f"the pickle nests containers more than {_MAX_DEPTH} deep")
        inside.add(id(value))
        count = 1 + sum(self._check_structure(item, depth + 1, inside, expanded) for item in items)
        inside.discard(id(value))
        if count > _MAX_ITEMS:
            raise CheckpointError(self.path, f"the pickle's shared containers expand to more than {_MAX_ITEMS} items")
        expanded[id(value)] = count
        return count

    def _check_tensor(self, t: LazyTensor) -> None:
        storage, dims = t.storage, (*t.shape, *t.stride, t.offset)
        if not (isinstance(storage, LazyStorage) and len(t.shape) == len(t.stride)
                and all(type(n) is int and n >= 0 for n in dims)):
            raise CheckpointError(self.path, f"a malformed tensor (storage {type(storage).__name__}, shape "
                                             f"{t.shape!r:.60}, strides {t.stride!r:.60}, offset {t.offset!r:.20})")
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) if math.prod(t.shape) else 0
        if t.offset + span > storage.numel:
            raise CheckpointError(self.path, f"a tensor of shape {list(t.shape)} (strides {list(t.stride)}, offset "
                                             f"{t.offset}) reaches beyond its storage of {storage.numel} elements")
        if storage.numel * storage.dtype.itemsize > self._end - self._base:
            raise CheckpointError(self.path, f"storage data/{storage.key} declares {storage.numel} elements "
                                             f"of {storage.dtype}, more than the file's {self._end - self._base} bytes")

    def _record_offset(self, name: str, nbytes: int | None = None) -> int:
        """Byte offset of a record's data, from its local header (records are stored uncompressed).
        Small records are read this way too: torch may write them without CRCs."""
        offset = self._offsets.get(name)
        if offset is not None:
            return offset
        info = self._records.get(self._prefix + name)
        if info is None:
            raise CheckpointError(self.path, f"record {name} is missing (truncated file?)")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(self.path, f"record {name} is compressed")
        if not 0 <= info.header_offset < self._end - self._base:
            raise CheckpointError(self.path, f"record {name} lies beyond the end of the file (truncated?)")
        header = os.pread(self._descriptor(), 30, self._base + info.header_offset)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(self.path, f"record {name} lies beyond the end of the file (truncated?)")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        offset = self._base + info.header_offset + 30 + name_len + extra_len
        if offset + (info.file_size if nbytes is None else nbytes) > self._end:
            raise CheckpointError(self.path, f"record {name} is cut short (truncated file)")
        self._offsets[name] = offset
        return offset

    def _read_record(self, name: str) -> bytes:
        offset = self._record_offset(name)   # first: it checks the declared size against the file
        out = torch.empty(self._records[self._prefix + name].file_size, dtype=torch.uint8)
        self._pread_into(out, offset)
        return out.numpy().tobytes()

    def _data_offset(self, storage: LazyStorage) -> int:
        return self._record_offset(f"data/{storage.key}", storage.numel * storage.dtype.itemsize)

    def check_complete(self, tensors) -> None:
        """Fail now, not mid-conversion, if any tensor's bytes are missing."""
        for t in tensors:
            self._data_offset(t.storage)

    def check_crcs(self, recorded: dict[str, int] | None = None) -> tuple[int, int]:
        """Check every data record's bytes against its CRC-32: ``recorded`` (a manifest's), else
        the zip directory's (0 there: none written). Returns (records checked, without a CRC)."""
        checked = unchecked = 0
        for name, info in self._records.items():
            record = name[len(self._prefix):]
            if not record.startswith("data/"):
                continue
            want = (recorded or {}).get(record, info.CRC or None)
            if want is None:
                unchecked += 1
                continue
            offset, crc = self._record_offset(record, info.file_size), 0
            for start in range(0, info.file_size, 1 << 24):
                size = min(1 << 24, info.file_size - start)
                chunk = torch.empty(size, dtype=torch.uint8)
                self._pread_into(chunk, offset + start)
                crc = crc32(chunk.numpy(), crc)
            if crc != want:
                raise CheckpointError(self.path, f"record {record}: CRC-32 {crc:08x}, "
                                                 f"{'the manifest' if recorded and record in recorded else 'the zip'} "
                                                 f"says {want:08x}: its bytes changed after they were written")
            checked += 1
        return checked, unchecked

    def read(self, t: LazyTensor) -> torch.Tensor:
        """Read all of tensor ``t``."""
        if t.is_contiguous():
            out = torch.empty(t.shape, dtype=t.dtype)
            self.read_runs(t, [0], t.numel, out)
            return out
        # A strided view (a transposed block of a grouped tensor): read the span it covers.
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) if t.numel else 0
        if min(t.stride, default=0) < 0 or t.offset < 0 or t.offset + span > t.storage.numel:
            raise CheckpointError(self.path, f"a tensor of shape {t.shape} and strides {t.stride} at offset "
                                             f"{t.offset} reaches beyond its storage of {t.storage.numel} elements")
        flat = torch.empty(span, dtype=t.dtype)
        self._pread_into(flat, self._data_offset(t.storage) + t.offset * t.dtype.itemsize)
        return flat.as_strided(t.shape, t.stride, 0).clone()

    def materialize(self, obj):
        """``obj`` (nested dicts/lists/tuples) with every LazyTensor read into a tensor."""
        if isinstance(obj, LazyTensor):
            return self.read(obj)
        if isinstance(obj, dict):
            return type(obj)((k, self.materialize(v)) for k, v in obj.items())
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.materialize(v) for v in obj)
        return obj

    def read_runs(self, t: LazyTensor, starts, run_numel: int, out: torch.Tensor) -> None:
        """Read runs of ``run_numel`` elements of contiguous tensor ``t``, at element offsets
        ``starts``, one after the other into contiguous ``out``: exactly the bytes asked for."""
        if not t.is_contiguous() or not out.is_contiguous() or out.dtype != t.dtype:
            raise ValueError("read_runs needs contiguous tensors of the same dtype")
        base = self._data_offset(t.storage) + t.offset * t.dtype.itemsize
        flat = out.view(-1)
        for i, start in enumerate(starts):
            self._pread_into(flat[i * run_numel:(i + 1) * run_numel], base + start * t.dtype.itemsize)

    def read_scattered(self, t: LazyTensor, pieces, out: torch.Tensor) -> None:
        """Read ``(element in t, element of out's storage, elements)`` pieces straight into
        ``out``'s storage: one ``preadv`` for each stretch of ``t`` the pieces read in a row."""
        size = t.dtype.itemsize
        storage = torch.empty(0, dtype=torch.uint8).set_(out.untyped_storage()).numpy()
        base = self._data_offset(t.storage) + t.offset * size
        position, views, next_at = None, [], None
        for at, place, n in pieces:
            if views and (at != next_at or len(views) == _IOV_MAX):
                self._preadv(views, base + position * size)
                views = []
            if not views:
                position = at
            views.append(storage[place * size:(place + n) * size])
            next_at = at + n
        if views:
            self._preadv(views, base + position * size)

    def _preadv(self, views: list, position: int) -> None:
        done = os.preadv(self._descriptor(), views, position)
        self.bytes_read += done
        for view in views:
            if done < view.nbytes:   # a short read (rare for a file): the rest of this view alone
                self._pread_into(torch.from_numpy(view[done:]), position + done)
            position, done = position + view.nbytes, max(0, done - view.nbytes)

    def _pread_into(self, out: torch.Tensor, position: int) -> None:
        view = memoryview(out.view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        done = 0
        while done < len(view):
            n = os.preadv(self._descriptor(), [view[done:]], position + done)
            if n <= 0:
                raise CheckpointError(self.path, "unexpected end of file (truncated)")
            done += n
        self.bytes_read += done

    def _descriptor(self) -> int:
        """One read-only descriptor per file, opened on first use (pread is thread-safe)."""
        if self._fd is None:
            with self._fd_lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self, _close=os.close) -> None:   # (os may be gone when __del__ runs at exit)
        if self._fd is not None:
            _close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()


def iter_lazy_tensors(obj, prefix=""):
    """Yield ``(dotted_path, LazyTensor)`` for every tensor inside nested dicts/lists."""
    if isinstance(obj, LazyTensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_lazy_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_lazy_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def contiguous_runs(shape, slices: tuple[slice, ...]) -> tuple[list[int], int]:
    """The elements ``slices`` of a row-major ``shape`` as runs: (start of each run, elements per
    run), one run per index of the axes before the innermost partial axis."""
    inner = innermost_partial(shape, slices)
    strides = contiguous_strides(shape)
    run = run_length(shape, slices)
    starts = [sum(i * st for i, st in zip(index, strides)) + slices[inner].start * strides[inner]
              for index in itertools.product(*(range(s.start, s.stop) for s in slices[:inner]))]
    return starts, run


def strided_runs(t: torch.Tensor) -> tuple[list[int], int] | None:
    """The elements of a strided tensor as runs of its storage (element offsets, elements per
    run), in its row-major order; None where its innermost axis is not contiguous."""
    shape, stride, inner, run = t.shape, t.stride(), t.dim(), 1
    while inner > 0 and (shape[inner - 1] == 1 or stride[inner - 1] == run):
        inner -= 1
        run *= shape[inner]
    if inner == t.dim() and t.dim() > 0 and shape[-1] > 1:
        return None
    base = t.storage_offset()
    starts = [base + sum(i * st for i, st in zip(index, stride))
              for index in itertools.product(*(range(n) for n in shape[:inner]))]
    return starts, run


# Reads shorter than this (bytes) are not worth a syscall each: they are covered by one read,
# gaps included, and copied from there; a tensor read so is made in memory, then written (a
# short write into a mapped file pays a page fault of the filesystem's each; TP2 -> TP4 of the
# bench's row-parallel weights, rows of 1-3 KiB: 2.4 s mapped against 1.3 s from memory).
SHORT_READ = 1 << 16
_SHORT_PLACE = 1024   # ... and places shorter than this are too many buffers for preadv


def _pieces(a_starts: list[int], a_run: int, b_starts: list[int], b_run: int):
    """(a offset, b offset, elements) where two run lists of one element stream meet."""
    if a_run == b_run:
        return zip(a_starts, b_starts, itertools.repeat(a_run))
    if len(a_starts) == 1 or len(b_starts) == 1:   # one whole run on a side: cut by the other's
        one, runs, run = (a_starts[0], b_starts, b_run) if len(a_starts) == 1 else (b_starts[0], a_starts, a_run)
        cuts = range(one, one + run * len(runs), run)
        return zip(cuts, runs, itertools.repeat(run)) if len(a_starts) == 1 else \
            zip(runs, cuts, itertools.repeat(run))
    return _walk(a_starts, a_run, b_starts, b_run)


def _walk(a_starts: list[int], a_run: int, b_starts: list[int], b_run: int):
    i = j = a_used = b_used = 0
    while i < len(a_starts) and j < len(b_starts):
        n = min(a_run - a_used, b_run - b_used)
        if n:
            yield a_starts[i] + a_used, b_starts[j] + b_used, n
        a_used, b_used = a_used + n, b_used + n
        if a_used == a_run:
            i, a_used = i + 1, 0
        if b_used == b_run:
            j, b_used = j + 1, 0


@dataclass(frozen=True)
class TensorView:
    """A stored tensor seen in ``shape`` (its own, or a fused form with as many elements): reads
    any slices of that shape straight into an output tensor (the engine's piece handle)."""

    file: TorchFile
    tensor: LazyTensor
    shape: tuple

    @property
    def path(self) -> str:
        return self.file.path

    def read_into(self, slices: tuple[slice, ...], out: torch.Tensor, exact: bool = False) -> None:
        """The elements ``slices`` into ``out``. Where the runs of both are long enough (or
        ``exact``: a rank reading just its share), each run is read straight to its place in
        ``out`` (scattered by ``preadv``: one copy, from the page cache); otherwise one read
        covers them all, gaps included, into a buffer, and is copied from there."""
        if not self.tensor.is_contiguous():
            out.copy_(self.file.read(self.tensor).view(self.shape)[slices])
            return
        starts, run_numel = contiguous_runs(self.shape, slices)
        places = strided_runs(out) if out.dtype == self.tensor.dtype else None
        size = out.element_size()
        if places is not None and (exact or run_numel * size >= SHORT_READ and places[1] * size >= _SHORT_PLACE):
            self.file.read_scattered(self.tensor, _pieces(starts, run_numel, *places), out)
            return
        if exact or len(starts) == 1:
            buffer = torch.empty(out.shape, dtype=self.tensor.dtype)
            self.file.read_runs(self.tensor, starts, run_numel, buffer)
        else:
            covering = torch.empty(starts[-1] + run_numel - starts[0], dtype=self.tensor.dtype)
            self.file.read_runs(self.tensor, [starts[0]], covering.numel(), covering)
            inner = innermost_partial(self.shape, slices)
            shape = [s.stop - s.start for s in slices[:inner + 1]] + list(self.shape[inner + 1:])
            buffer = covering.as_strided(shape, contiguous_strides(self.shape), 0)
        out.copy_(buffer.reshape(out.shape))
