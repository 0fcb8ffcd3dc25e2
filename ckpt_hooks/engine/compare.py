"""Comparing two Sources tensor by tensor, bitwise, with bounded memory.

Each logical tensor is compared over the box both hold (a padded vocabulary may differ in rows):
for every box of the first source's pieces, that box is built from each source (planner and
executor, as a conversion would) and the two compared bit for bit, so memory stays at about twice
the largest stored piece, whatever the layouts. A difference is reported with its count, the
largest |a - b| and the first differing global index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ckpt_hooks.algebra.layout import Box, Placement
from ckpt_hooks.engine.execute import build_tensor
from ckpt_hooks.engine.plan import plan_tensor
from ckpt_hooks.engine.source import Tensor


@dataclass
class Outcome:
    """One logical tensor compared: ``differing`` elements of ``compared``."""

    name: str
    compared: int = 0
    differing: int = 0
    max_abs: float = 0.0
    first: tuple[int, ...] | None = None     # the first differing element, global index
    problem: str | None = None               # why it could not be compared element by element
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return self.problem is None and self.differing == 0

    def to_json(self) -> dict:
        return {"name": self.name, "equal": self.equal, "compared": self.compared, "differing": self.differing,
                "max_abs": self.max_abs, "first": None if self.first is None else list(self.first),
                "problem": self.problem, "notes": self.notes}


def common_box(a: Tensor, b: Tensor, rows: int | None = None) -> Box | None:
    """The box both tensors span (rows: at most this many of the first axis), or None when their
    shapes differ beyond the first axis."""
    if len(a.shape) != len(b.shape) or tuple(a.shape[1:]) != tuple(b.shape[1:]):
        return None
    first = min(a.shape[0], b.shape[0]) if a.shape else None
    if first is not None and rows is not None:
        first = min(first, rows)
    shape = (first, *a.shape[1:]) if a.shape else ()
    return Box((0,) * len(shape), tuple(shape))


def compare(name: str, a: Tensor, b: Tensor, box: Box | None) -> Outcome:
    """``a`` and ``b`` over ``box`` (see common_box), bit for bit."""
    outcome = Outcome(name)
    if box is None:
        outcome.problem = f"shapes differ: {list(a.shape)} vs {list(b.shape)}"
        return outcome
    if str(a.dtype) != str(b.dtype):
        outcome.problem = f"dtypes differ: {a.dtype} vs {b.dtype}"
        return outcome
    for part in sorted({p for p in a.replicas if p.intersect(box) is not None} or [box],
                       key=lambda p: p.offsets):
        region = part.intersect(box)
        if region is None or region.numel == 0:
            continue
        placement = Placement(tuple(a.shape), region, tuple(region.lengths))
        left, right = plan_tensor(a, name, placement), plan_tensor(b, name, placement)
        if not left.complete or not right.complete:
            outcome.problem = f"{'first' if not left.complete else 'second'} checkpoint does not hold all of " \
                              f"box {list(region.offsets)}+{list(region.lengths)}"
            return outcome
        _compare_region(outcome, build_tensor(left), build_tensor(right), region)
    return outcome


def _compare_region(outcome: Outcome, left, right, region: Box) -> None:
    left_bits, right_bits = _bits(left), _bits(right)
    outcome.compared += region.numel
    differ = left_bits != right_bits
    count = int(differ.sum())
    if not count:
        return
    outcome.differing += count
    delta = np.abs(_float64(left, differ) - _float64(right, differ))
    outcome.max_abs = max(outcome.max_abs, float(delta.max()) if delta.size else 0.0)
    flat = int(np.flatnonzero(differ)[0])
    first = tuple(o + int(i) for o, i in zip(region.offsets, np.unravel_index(flat, region.lengths)))
    if outcome.first is None or first < outcome.first:
        outcome.first = first


def _bits(values) -> np.ndarray:
    """A torch or NumPy array's elements as flat unsigned integers of their size: what "bitwise"
    compares (NumPy has no bfloat16: the codecs' BF16 is a 2-byte struct)."""
    size = values.dtype.itemsize
    if not isinstance(values, np.ndarray):   # torch
        import torch

        values = values.contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8).view(f"<u{size}")


def _float64(values, where: np.ndarray) -> np.ndarray:
    """The elements ``where`` (a flat mask) as float64, for the size of a difference."""
    if not isinstance(values, np.ndarray):   # torch
        import torch

        return values.reshape(-1)[torch.from_numpy(where)].double().numpy()
    flat = np.ascontiguousarray(values).reshape(-1)[where]
    if flat.dtype.fields is not None:   # BF16: the high half of a float32
        return (flat.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return flat.astype(np.float64)


@dataclass
class Side:
    """One checkpoint as a certificate compares it, whatever its framework: each state it holds
    as a Source under one naming, and its run state."""

    path: str
    layout: str                  # how the report names its layout
    states: dict                 # prefix -> Source: "" the weights; "param:", "exp_avg:", "exp_avg_sq:"
    run_state: dict | None       # what -> value (compared where both hold it); None: it holds none
    names: str                   # the naming of its tensors: "megatron" (logical names) or "mindspore"
    spec: object = None          # its ModelSpec, where it has one (Megatron names)
    args: object = None          # its Megatron args, where it has them (a Hugging Face side's layer spec)


@dataclass
class Integrity:
    """``verify CKPT`` alone: every file's tensor records checked against their CRC-32s."""

    path: str
    files: int = 0
    checked: int = 0      # records whose bytes matched their CRC-32
    unchecked: int = 0    # records with no CRC-32 recorded anywhere

    @property
    def equal(self) -> bool:
        return True   # a mismatch raises, naming the file and the record

    def to_json(self) -> dict:
        return {"path": self.path, "files": self.files, "checked": self.checked, "unchecked": self.unchecked}

    def __str__(self) -> str:
        return (f"{self.path}: {self.checked} tensor records in {self.files} files match their CRC-32"
                + (f"; {self.unchecked} have none recorded (not checked)" if self.unchecked else "")
                + "; sizes and shapes match the manifest where there is one")
