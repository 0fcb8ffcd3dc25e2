"""Comparing two Sources tensor by tensor, bitwise, with bounded memory.

Each logical tensor is compared over the box both hold (a padded vocabulary may differ in rows):
for every box of the first source's pieces, that box is built from each source (planner and
executor, as a conversion would) and the two compared bit for bit, so memory stays at about twice
the largest stored piece, whatever the layouts. A difference is reported with its count, the
largest |a - b| and the first differing global index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    import torch

    left, right = torch.as_tensor(left), torch.as_tensor(right)
    outcome.compared += region.numel
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[left.element_size()]
    differ = left.reshape(-1).view(bits) != right.reshape(-1).view(bits)
    count = int(differ.sum())
    if not count:
        return
    outcome.differing += count
    delta = (left.reshape(-1)[differ].double() - right.reshape(-1)[differ].double()).abs()
    outcome.max_abs = max(outcome.max_abs, float(delta.max()) if delta.numel() else 0.0)
    flat = int(differ.nonzero()[0])
    local = []
    for size in reversed(region.lengths):
        local.append(flat % size)
        flat //= size
    first = tuple(o + i for o, i in zip(region.offsets, reversed(local)))
    if outcome.first is None or first < outcome.first:
        outcome.first = first

