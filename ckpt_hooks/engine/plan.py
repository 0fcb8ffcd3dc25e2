"""The planner: target boxes ∩ source boxes -> copies.

    target tensor  = a box of a logical tensor, which some target file holds under some key
    copy           = (piece, box): the elements ``box`` (global coordinates) of a source piece,
                     put at the same global place in the target
    plan           = target files, each a list of target tensors with their copies

Like PyTorch DCP's ``ReadItem``, a copy names two boxes and nothing else; where the piece's bytes
live is its handle's business (engine.source). Pure: shapes and boxes only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckpt_hooks.algebra.layout import Box, Placement, run_length
from ckpt_hooks.engine.source import Piece, Tensor


@dataclass(frozen=True)
class Copy:
    piece: Piece
    box: Box          # global coordinates, inside piece.box and the target's box

    @property
    def source_slices(self) -> tuple[slice, ...]:
        return self.box.slices_within(self.piece.box)


@dataclass
class TargetTensor:
    key: str
    placement: Placement | None        # None for non-tensor entries (``_extra_state``)
    dtype: object = None
    copies: list[Copy] = field(default_factory=list)
    complete: bool = True               # False: regions no source covers are zero (vocab padding)
    chunk: str = ""                     # a group inside the target file (a Megatron model chunk)

    @property
    def nbytes(self) -> int:
        return 0 if self.placement is None else self.placement.box.numel * self.dtype.itemsize

    def target_slices(self, copy: Copy) -> tuple[slice, ...]:
        """Where a copy lands in this tensor's view (``Placement.view_shape``)."""
        return copy.box.slices_within(self.placement.box)

    @property
    def shortest_read(self) -> int:
        """Elements of the shortest contiguous run a copy reads from its piece (one read each,
        however they land: scattered writes go in one ``preadv``)."""
        return min((run_length(c.piece.box.lengths, c.source_slices) for c in self.copies), default=0)


@dataclass
class TargetFile:
    rank: object                        # the file's coordinate in the target layout (format-defined)
    tensors: list[TargetTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_tensor(tensor: Tensor, key: str, placement: Placement, *, chunk: str = "", dtype=None,
                reader: int = 0) -> TargetTensor:
    """The copies that build ``placement``'s box of ``tensor``, one replica per source box
    (``reader`` chooses which). Regions no piece covers stay zero (``complete`` False)."""
    out = TargetTensor(key, placement, dtype or tensor.dtype, chunk=chunk)
    for box in tensor.replicas:
        overlap = box.intersect(placement.box)
        if overlap is not None:
            out.copies.append(Copy(tensor.piece(box, reader), overlap))
    out.complete = covered(out.copies) == placement.box.numel
    return out


def covered(copies: list[Copy]) -> int:
    """Elements the copies fill; a malformed source whose boxes overlap counts as filling less
    than its sizes add up to, so that no gap is taken for covered."""
    boxes = [c.box for c in copies]
    if any(a.intersect(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
        return -1
    return sum(b.numel for b in boxes)


def restrict(tensor: TargetTensor, offsets, lengths) -> TargetTensor:
    """The sub-box ``offsets``/``lengths`` (in the tensor's view) of a target tensor, with only
    the copies (clipped) that fill it: planning, and reading, just that part."""
    box = tensor.placement.box
    sub = Box(tuple(b + o for b, o in zip(box.offsets, offsets)), tuple(lengths))
    copies = [Copy(c.piece, part) for c in tensor.copies if (part := c.box.intersect(sub)) is not None]
    return TargetTensor(tensor.key, Placement(tensor.placement.logical_shape, sub, tuple(lengths)),
                        tensor.dtype, copies, tensor.complete, tensor.chunk)
