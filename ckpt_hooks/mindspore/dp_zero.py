"""MindSpeed-Core-MS distributed-optimizer checkpoints: DP-sharded buckets back to per-parameter
tensors (what its ``combine_ckpt_dp_zero.py`` does, reading only the slices each parameter needs).

With ``--use-dist-ckpt`` every DP rank saves its shard of each bucket of each grad buffer as a
flat fp32 ``buffer_{b}_bucket_{k}``, with the Adam moments as ``exp_avg.buffer_{b}_bucket_{k}``
and ``exp_avg_sq.buffer_{b}_bucket_{k}``, and DP rank 0 of each group writes
``opt_shard_info/rank_{r}/dist_opt_shard_info_rank_{r}-0_0.json``::

    {"dp_rank_list": [global ranks of the DP group],
     "param_info": {name: {"range_map": [buffer, bucket, start, end], "shape": [...], "dtype": "float32"}},
     "zero3_params": [names saved as plain per-rank shards, concatenated on axis 0],
     "buffer_info": {buffer: {"buckets": {bucket: [numel, numel_unpadded]}, "buffer_size": n, ...}}}

``start``/``end`` are element offsets in the whole buffer; the buckets lie back to back, each
split evenly over the DP ranks in ``dp_rank_list`` order.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.mindspore_ckpt import PendingArray

STATES = ("", "exp_avg", "exp_avg_sq")  # the fp32 param, then Adam's moments: name prefixes
_BUCKET = re.compile(r"(exp_avg(_sq)?\.)?buffer_\d+_bucket_\d+")


def state_name(state: str, name: str) -> str:
    return f"{state}.{name}" if state else name


def bucket_name(buffer: int, bucket: int) -> str:
    return f"buffer_{buffer}_bucket_{bucket}"


@dataclass(frozen=True)
class ParamRange:
    buffer: int
    start: int        # in the whole buffer
    end: int
    shape: tuple[int, ...]


@dataclass
class ShardInfo:
    """One DP group's ``dist_opt_shard_info`` JSON."""

    path: str
    dp_ranks: list[int]
    params: dict[str, ParamRange]
    zero3: list[str]
    bucket_sizes: dict[int, list[int]]   # buffer -> padded numel of each bucket, in order

    def pieces(self, param: ParamRange):
        """(dp index, bucket, first element, last element + 1 in that rank's bucket shard) of
        every run of ``param``'s elements, in order."""
        offset = 0
        for bucket, size in enumerate(self.bucket_sizes[param.buffer]):
            per_rank = size // len(self.dp_ranks)
            lo, hi = max(param.start, offset), min(param.end, offset + size)
            for dp in range(len(self.dp_ranks)):
                a, b = max(lo, offset + dp * per_rank), min(hi, offset + (dp + 1) * per_rank)
                if a < b:
                    yield dp, bucket, a - offset - dp * per_rank, b - offset - dp * per_rank
            offset += size


def read_shard_info(path) -> ShardInfo:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        buckets = {}
        for buffer, info in data["buffer_info"].items():
            sizes = {int(k): int(v[0]) for k, v in info["buckets"].items()}
            buckets[int(buffer)] = [sizes[k] for k in range(len(sizes))]
        params = {}
        for name, info in data["param_info"].items():
            buffer, _, start, end = (int(x) for x in info["range_map"])
            if start < 0:
                raise ValueError(f"{name}: negative start {start}")
            params[name] = ParamRange(buffer, start, end, tuple(int(d) for d in info["shape"]))
        info = ShardInfo(str(path), [int(r) for r in data["dp_rank_list"]], params,
                         list(data.get("zero3_params", [])), buckets)
    except FileNotFoundError:
        raise CheckpointError(path, "missing distributed-optimizer shard info") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(path, f"unreadable shard info ({type(e).__name__}: {e})") from None
    for name, param in info.params.items():
        if param.buffer not in info.bucket_sizes or param.end - param.start != math.prod(param.shape) \
                or param.end > sum(info.bucket_sizes[param.buffer]):
            raise CheckpointError(path, f"{name}: range {param.start}..{param.end} does not fit shape "
                                        f"{list(param.shape)} in buffer {param.buffer}")
    for buffer, sizes in info.bucket_sizes.items():
        if any(size % len(info.dp_ranks) for size in sizes):
            raise CheckpointError(path, f"buffer {buffer}: bucket sizes {sizes} do not split over "
                                        f"{len(info.dp_ranks)} DP ranks")
    return info


def combined_tensors(info: ShardInfo, shards: list, states=STATES, carry_training_state: bool = True):
    """Yield (name, value) of the combined checkpoint: every parameter's fp32 value and moments
    (``states``) and the zero3 parameters as PendingArrays (merged when written: one in memory),
    then the other entries of DP rank 0's file (step, learning rate, ..., unless
    ``carry_training_state`` is False). ``shards``: the DP ranks' opened files, in
    ``dp_rank_list`` order (CkptFile / SafetensorsFile)."""
    if len(shards) != len(info.dp_ranks):
        raise CheckpointError(info.path, f"{len(shards)} shard files for DP group {info.dp_ranks}")
    for shard in shards:
        for buffer, sizes in info.bucket_sizes.items():
            for bucket, size in enumerate(sizes):
                for state in states:
                    _check_bucket(shard, state_name(state, bucket_name(buffer, bucket)), size // len(shards))
    def merged(state: str, param: ParamRange) -> np.ndarray:
        out = np.empty(param.end - param.start, np.float32)
        at = 0
        for dp, bucket, lo, hi in info.pieces(param):
            out[at:at + hi - lo] = shards[dp].read(state_name(state, bucket_name(param.buffer, bucket)),
                                                   rows=slice(lo, hi))
            at += hi - lo
        return out.reshape(param.shape)

    for state in states:
        for name, param in info.params.items():
            yield state_name(state, name), PendingArray(param.shape, np.dtype(np.float32),
                                                        lambda state=state, param=param: merged(state, param))
    for name in info.zero3:
        parts = [_stored(shard, name) for shard in shards]
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        yield name, PendingArray(shape, parts[0].dtype,
                                 lambda name=name: np.concatenate([shard.read(name) for shard in shards]))
    for name in shards[0].names:  # buckets are all consumed (or unknown to the shard info)
        if name not in info.zero3 and not _BUCKET.fullmatch(name) and (carry_training_state or not _training_state(name)):
            yield name, shards[0].read(name)
    yield from getattr(shards[0], "strings", {}).items()


def _check_bucket(shard, name: str, numel: int) -> None:
    t = shard.tensors.get(name)
    if t is None:
        raise CheckpointError(shard.path, f"no {name!r}: not a shard of this DP group's optimizer")
    if t.shape != (numel,) or t.dtype != np.float32:
        raise CheckpointError(shard.path, f"{name}: shape {list(t.shape)} {t.dtype}, the shard info implies "
                                          f"[{numel}] float32")


def _stored(shard, name: str):
    """A zero3 parameter's stored tensor (shape, dtype) in one DP rank's file."""
    if name not in shard.tensors:
        raise CheckpointError(shard.path, f"no zero3 parameter {name!r}")
    return shard.tensors[name]


def write_checkpoint(path, items) -> dict[str, int]:
    """``items`` (name, value) pairs to a .ckpt (streamed) or MindSpore safetensors file; returns
    each tensor's CRC-32, taken while writing."""
    from ckpt_hooks.formats import mindspore_ckpt, ms_safetensors

    if str(path).endswith(".safetensors"):
        return ms_safetensors.save(path, {name: value for name, value in items if not isinstance(value, str)})
    return mindspore_ckpt.save(path, items)


def combine_dp_zero(strategy_dir, checkpoint_dir, output_dir, *, src_format: str = "ckpt",
                    dst_format: str = "ckpt", copy_to_all_dp_ranks: bool = False, rank_section=(None, None),
                    no_save_optim: bool = False, workers: int = 2, quiet: bool = False) -> list[Path]:
    """Merge every DP group's optimizer shards (``checkpoint_dir/rank_{r}/``, last file) into
    per-parameter tensors: ``output_dir/rank_{r}/{name}_dp_merged.{dst_format}`` for DP rank 0
    of each group (and its DP peers with ``copy_to_all_dp_ranks``), each with its manifest (the
    CRC-32s taken while writing; the tensors unplaced: a rank's slices of a layout the shard info
    does not describe). ``rank_section`` = (start, end) keeps the groups whose first rank is in
    [start, end). Written atomically; returns the files written."""
    import shutil

    from ckpt_hooks.engine.ranks import write_shared
    from ckpt_hooks.mindspore import manifest
    from ckpt_hooks.mindspore.files import latest_checkpoint, open_checkpoint

    infos = [read_shard_info(p) for p in sorted(Path(strategy_dir).rglob("dist_opt_shard_info*.json"))]
    if not infos:
        raise CheckpointError(strategy_dir, "no dist_opt_shard_info*.json (MindSpeed-Core-MS shard info)")
    world = max(r for i in infos for r in i.dp_ranks) + 1
    start, end = rank_section
    infos = [i for i in infos if (start is None or i.dp_ranks[0] >= start) and (end is None or i.dp_ranks[0] < end)]
    sources = {i.path: [latest_checkpoint(Path(checkpoint_dir) / f"rank_{r}", f".{src_format}") for r in i.dp_ranks]
               for i in infos}
    states = STATES[:1] if no_save_optim else STATES
    written = []

    def size(info: ShardInfo) -> int:   # a DP group's work: the bytes of its shards
        return sum(f.stat().st_size for f in sources[info.path])

    def write(root: Path, info: ShardInfo, progress) -> None:
        files = sources[info.path]
        first = f"rank_{info.dp_ranks[0]}"
        target = root / first / f"{files[0].stem}_dp_merged.{dst_format}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shards = [open_checkpoint(f) for f in files]
        crcs = write_checkpoint(target, combined_tensors(info, shards, states, carry_training_state=not no_save_optim))
        progress.update(size(info))
        params = {*info.params, *info.zero3}
        for rank, path in [(info.dp_ranks[0], target)] + [
                (rank, root / f"rank_{rank}" / target.name.replace(first, f"rank_{rank}"))
                for rank in (info.dp_ranks[1:] if copy_to_all_dp_ranks else ())]:
            if path != target:
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(target, path)
            manifest.describe_written(path, crcs, layout={"rank": rank, "world_size": world, "parallel_mode": None},
                                      role=lambda name: "model" if name in params else "optimizer")
            written.append(path.relative_to(root))

    def publish(root: Path, every_ranks: list[list[Path]]) -> None:
        written[:] = [path for part in every_ranks for path in part]   # for rank 0's report

    write_shared(output_dir, infos, write, sum(map(size, infos)), workers=workers, quiet=quiet,
                 label="combine-dp-zero", size=size, result=lambda: written, publish=publish)
    return [Path(output_dir) / path for path in written]


def _training_state(name: str) -> bool:
    """What MindSpeed's --no-save-optim drops besides the moments."""
    return any(word in name for word in ("learning_rate", "weight_decay", "epoch", "step", "default_generator"))
