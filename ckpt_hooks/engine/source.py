"""What a checkpoint holds, whatever its format: the engine's Source side.

    Source  = {logical name: Tensor}
    Tensor  = logical (global) shape, dtype, role, replicas: {box: [handle, ...]}
    handle  = the codec's reader of one stored piece:
              handle.read_into(slices, out, exact)   the elements ``slices`` of the piece's box into ``out``
              handle.view(slices)                    (optional) the same elements without a copy

A box is a piece of the logical tensor (``algebra.layout.Box``); pieces holding equal boxes are
replicas, of which the planner reads one per reading rank. Every format adapter (Megatron legacy
rank files, distributed-optimizer buffers seen through a param_map, Hugging Face or MindSpore
files under a name table or a strategy) fills the same structure, so one planner and one
executor serve them all. Pure: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckpt_hooks.algebra.layout import Box

# What a tensor is: the model's weight, or a distributed-optimizer state of it.
WEIGHT = "weight"
STATES = ("param", "exp_avg", "exp_avg_sq")   # fp32 main param and Adam moments


@dataclass(frozen=True)
class TensorMeta:
    """What a file says of a tensor before reading it."""

    shape: tuple[int, ...]
    dtype: object


@dataclass(frozen=True)
class Piece:
    """A box of a logical tensor and the handle on the bytes that hold it."""

    box: Box
    handle: object


@dataclass
class Tensor:
    """A logical tensor and the pieces of it a checkpoint stores."""

    shape: tuple[int, ...]
    dtype: object                     # torch.dtype or numpy dtype, as the codec reads it
    role: str = WEIGHT
    replicas: dict[Box, list[object]] = field(default_factory=dict)   # box -> handles holding it

    def add(self, box: Box, handle) -> None:
        self.replicas.setdefault(box, []).append(handle)

    def piece(self, box: Box, reader: int = 0) -> Piece:
        """The replica of ``box`` that reading rank ``reader`` reads (spreads reads over replicas)."""
        handles = self.replicas[box]
        return Piece(box, handles[reader % len(handles)])


Source = dict   # {logical name: Tensor}, in the order the checkpoint holds them
