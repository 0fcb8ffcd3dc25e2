"""Where a MindSpore checkpoint's files are: one file, a directory of them, or ``rank_N/``
directories; of several files in a directory, the last saved. ``MappedTensor`` reads a tensor
of one of them as a piece of the engine's Source.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.mindspore_ckpt import CkptFile, MappedFile
from ckpt_hooks.formats.ms_safetensors import SafetensorsFile

READERS = {".ckpt": CkptFile, ".safetensors": SafetensorsFile}
RANK_DIR = re.compile(r"rank_(\d+)")


def open_checkpoint(path, check_crc: bool = False) -> MappedFile:
    """A .ckpt or MindSpore safetensors file, opened lazily; ``check_crc``: its ``crc_num``
    checked, where it has one (which reads the whole file)."""
    reader = READERS.get(Path(path).suffix)
    if reader is None:
        raise CheckpointError(path, f"not a MindSpore checkpoint (expected {' or '.join(READERS)})")
    return reader(path, check_crc=check_crc)


def rank_dirs(root: Path) -> dict[int, Path]:
    """rank -> its ``rank_N`` directory under ``root``."""
    return {int(m[1]): p for p in root.iterdir() if (m := RANK_DIR.fullmatch(p.name)) and p.is_dir()}


def latest_checkpoint(directory: Path, suffix: str | None = None) -> Path:
    """The checkpoint file of a directory (``.ckpt`` or ``.safetensors``, or only ``suffix``);
    of several, the highest (epoch, step) as ModelCheckpoint names them
    (``{prefix}-{epoch}_{step}``), as MindSpore's safetensors transform picks it."""
    if not directory.is_dir():
        raise CheckpointError(directory, "missing rank directory")
    found = [p for p in directory.iterdir() if p.is_file() and p.suffix in READERS and suffix in (None, p.suffix)]
    if not found:
        raise CheckpointError(directory, f"no {suffix or ' or '.join(READERS)} checkpoint file in it")
    if len({p.suffix for p in found}) > 1:
        raise CheckpointError(directory, "holds both .ckpt and .safetensors files")
    return max(found, key=lambda p: ([int(n) for n in re.findall(r"\d+", p.stem)][-2:], p.name))


@dataclass(frozen=True)
class MappedTensor:
    """Tensor ``name`` of a mapped file, as the engine's piece handle: a box of it is read as the
    rows of the first axis it spans (a view of the map where they lie in one record), sliced."""

    file: MappedFile
    name: str

    def view(self, slices: tuple[slice, ...]) -> np.ndarray:
        if not slices:  # a scalar
            return self.file.read(self.name)
        return self.file.read(self.name, rows=slices[0])[(slice(None),) + slices[1:]]

    def read_into(self, slices: tuple[slice, ...], out: np.ndarray, exact: bool = False) -> None:
        out[...] = self.view(slices)

    def nbytes_read(self, slices: tuple[slice, ...]) -> int:
        """The bytes ``view(slices)`` reads: whole rows."""
        t = self.file.tensors[self.name]
        rows = (slices[0].stop - slices[0].start,) if slices else ()
        return math.prod(rows + t.shape[1:]) * t.dtype.itemsize
