"""The param_map: how megatron-core's DistributedOptimizer packs one model chunk's parameters
into flat grad buffers, which Megatron does not save.

A map can be *recorded* from a live buffer (the truth), *rebuilt* from the parameter list
and megatron-core 0.16.1's rules, and *exported* in MindSpeed-Core-MS's JSON format.
Pure: no I/O, no framework imports (recording only reads attributes of the live objects).

The rules (``_ParamAndGradBuffer.__init__``): parameters enter in *reverse* order of
``named_parameters()``; each start is padded to a multiple of 64 elements; a bucket closes
once it holds ``bucket_size`` elements, and a shared embedding (tied weights with PP > 1)
gets a bucket of its own; a bucket's end is padded to ``lcm(dp, 128)``. The legacy
``distrib_optim.pt`` stores each buffer with the bucket-end padding removed and the
64-element gaps kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

START_ALIGNMENT = 64
BUCKET_ALIGNMENT = 128


@dataclass(frozen=True)
class ParamSlot:
    name: str
    shape: tuple[int, ...]
    start: int
    end: int
    bucket: int
    # The range holds the 2-D tensor transposed: an expert's block of a grouped tensor
    # (``megatron.grouped_experts.unpacked``); never recorded.
    transposed: bool = False


@dataclass(frozen=True)
class ParamInfo:
    """What the rules need to know of a parameter, in ``named_parameters()`` order."""

    name: str
    shape: tuple[int, ...]
    shared_embedding: bool = False


@dataclass(frozen=True)
class BufferMap:
    """One grad buffer of one model chunk: its parameters' places and its buckets."""

    chunk: int
    param_dtype: str
    grad_dtype: str
    dp_size: int
    params: tuple[ParamSlot, ...]                  # ascending start
    bucket_indices: tuple[tuple[int, int], ...]    # [start, end) of each bucket, padded
    per_bucket_numel_unpadded: tuple[int, ...]
    expert: bool = False

    @property
    def numel(self) -> int:
        return self.bucket_indices[-1][1]

    @property
    def numel_unpadded(self) -> int:
        return sum(self.per_bucket_numel_unpadded)

    def legacy_offset(self, slot: ParamSlot) -> int:
        """Where ``slot`` starts in ``distrib_optim.pt``'s flat tensors (bucket padding removed)."""
        return slot.start - self.bucket_indices[slot.bucket][0] + sum(self.per_bucket_numel_unpadded[:slot.bucket])

    def to_json(self) -> dict:
        return {"chunk": self.chunk, "param_dtype": self.param_dtype, "grad_dtype": self.grad_dtype,
                "dp_size": self.dp_size, "expert": self.expert,
                "bucket_indices": [list(b) for b in self.bucket_indices],
                "per_bucket_numel_unpadded": list(self.per_bucket_numel_unpadded),
                "params": [[s.name, list(s.shape), s.start, s.end, s.bucket] for s in self.params]}

    @classmethod
    def from_json(cls, data: dict) -> "BufferMap":
        """A map as ``to_json`` wrote it; ValueError unless it is one (a file read may be damaged)."""
        buffer = cls(chunk=data["chunk"], param_dtype=data["param_dtype"], grad_dtype=data["grad_dtype"],
                     dp_size=data["dp_size"], expert=data.get("expert", False),
                     bucket_indices=tuple(tuple(b) for b in data["bucket_indices"]),
                     per_bucket_numel_unpadded=tuple(data["per_bucket_numel_unpadded"]),
                     params=tuple(ParamSlot(n, tuple(s), a, b, k) for n, s, a, b, k in data["params"]))
        buffer.check()
        return buffer

    def check(self) -> None:
        """ValueError unless every field has its type and every param lies in its bucket's unpadded part."""
        def naturals(*values) -> bool:
            return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)

        buckets = self.bucket_indices
        if not (naturals(self.chunk, self.dp_size, *self.per_bucket_numel_unpadded) and self.dp_size > 0
                and isinstance(self.param_dtype, str) and isinstance(self.grad_dtype, str)
                and isinstance(self.expert, bool) and buckets and len(self.per_bucket_numel_unpadded) == len(buckets)
                and all(len(b) == 2 and naturals(*b) and b[0] + n <= b[1]
                        for b, n in zip(buckets, self.per_bucket_numel_unpadded))):
            raise ValueError("malformed buffer: chunk, dp_size, dtypes or buckets")
        for slot in self.params:
            if not (isinstance(slot.name, str) and naturals(*slot.shape, slot.start, slot.bucket)
                    and slot.bucket < len(buckets) and slot.end == slot.start + math.prod(slot.shape)
                    and buckets[slot.bucket][0] <= slot.start
                    and slot.end <= buckets[slot.bucket][0] + self.per_bucket_numel_unpadded[slot.bucket]):
                raise ValueError(f"param {slot.name!r} does not lie in its bucket")


def _pad(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def rebuild(params: list[ParamInfo], *, chunk: int, param_dtype: str, grad_dtype: str, dp_size: int,
            bucket_size: int | None = None, expert: bool = False) -> BufferMap:
    """The buffer megatron-core 0.16.1 builds for ``params`` with the distributed optimizer."""
    slots, buckets, unpadded = [], [], []
    bucket_start = start = 0
    in_bucket = 0
    end = 0

    def close_bucket(end_index: int) -> int:
        nonlocal bucket_start, in_bucket
        unpadded.append(end_index - bucket_start)
        padded_end = _pad(end_index, math.lcm(dp_size, BUCKET_ALIGNMENT))
        buckets.append((bucket_start, padded_end))
        bucket_start, in_bucket = padded_end, 0
        return padded_end

    for param in reversed(params):
        start = _pad(start, START_ALIGNMENT)
        if param.shared_embedding and in_bucket:
            start = close_bucket(start)
        end = start + math.prod(param.shape)
        slots.append(ParamSlot(param.name, tuple(param.shape), start, end, len(buckets)))
        in_bucket += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or param.shared_embedding:
            start = close_bucket(end)
        else:
            start = end
    if in_bucket:
        close_bucket(end)
    return BufferMap(chunk, param_dtype, grad_dtype, dp_size, tuple(slots), tuple(buckets), tuple(unpadded), expert)


def record(buffer, names: dict, *, chunk: int) -> BufferMap:
    """The map of a live megatron-core ``_ParamAndGradBuffer``; ``names`` maps param -> name.
    An expert buffer holds params megatron-core does not all-reduce over DP (``allreduce`` False)."""
    slots = sorted((ParamSlot(names[p], tuple(p.shape), start, end, bucket)
                    for p, (start, end, bucket) in buffer.param_index_map.items()), key=lambda s: s.start)
    return BufferMap(chunk=chunk, param_dtype=dtype_name(buffer.param_dtype), grad_dtype=dtype_name(buffer.grad_dtype),
                     dp_size=buffer.data_parallel_world_size, params=tuple(slots),
                     bucket_indices=tuple(tuple(b) for b in buffer.bucket_indices),
                     per_bucket_numel_unpadded=tuple(b.numel_unpadded for b in buffer.buckets),
                     expert=not all(getattr(p, "allreduce", True) for p in buffer.param_index_map))


def dtype_name(dtype) -> str:
    """A torch dtype as the param_map and manifest files name it: "float32", "bfloat16"."""
    return str(dtype).replace("torch.", "")


def mindspeed_json(buffer: BufferMap) -> dict:
    """MindSpeed-Core-MS's per-rank param_map: ``{name: [dtype, shape, start, end, bucket_id]}``."""
    return {s.name: [buffer.param_dtype, list(s.shape), s.start, s.end, s.bucket] for s in buffer.params}


def mindspeed_file_name(buffer_index: int, dp_rank: int, tp_rank: int, pp_rank: int, vp_rank: int) -> str:
    return f"param_map_buffer{buffer_index}_dp{dp_rank}tp{tp_rank}pp{pp_rank}vpp{vp_rank}.json"
