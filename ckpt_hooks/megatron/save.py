"""Save hook: record the distributed optimizer's param_map beside ``distrib_optim.pt``.

Written next to the trainer's own files, which stay byte for byte as they were:

    mp_rank_TT_PPP/param_map.json        recorded BufferMaps of this (tp, pp) rank (DP rank 0)
    mp_rank_TT_PPP/param_map/param_map_buffer{b}_dp{d}tp{t}pp{p}vpp{v}.json   MindSpeed-Core-MS,
                                         one per DP rank, written by that rank

No communication: every rank records its own live buffers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ckpt_hooks.formats.megatron_legacy import MINDSPEED_DIR, RECORDED_MAP
from ckpt_hooks.megatron.load import distributed_optimizers, unwrap
from ckpt_hooks.param_map import BufferMap, mindspeed_file_name, mindspeed_json, record

def record_param_maps(optimizer) -> list[BufferMap]:
    """The live param_maps of a (possibly chained) DistributedOptimizer, in its buffer order."""
    maps = []
    for dopt in distributed_optimizers(optimizer):
        for chunk, buffers in dopt.per_model_buffers.items():
            names = {param: name for name, param in unwrap(dopt.model_chunks[chunk]).named_parameters()}
            maps += [record(buffer, names, chunk=chunk) for buffer in buffers]
    return maps


def _write_json(path: Path, data) -> None:
    """Atomically: a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(data))
    partial.replace(path)


def write_param_maps(optimizer, rank_dir, *, tp_rank: int, pp_rank: int, dp_rank: int) -> None:
    """This rank's share of the param_map files of one checkpoint rank directory."""
    rank_dir = Path(rank_dir)
    maps = record_param_maps(optimizer)
    if dp_rank == 0:
        _write_json(rank_dir / RECORDED_MAP, [m.to_json() for m in maps])
    (rank_dir / MINDSPEED_DIR).mkdir(parents=True, exist_ok=True)
    per_chunk: dict[int, int] = {}
    for buffer in maps:
        index = per_chunk.get(buffer.chunk, 0)
        per_chunk[buffer.chunk] = index + 1
        name = mindspeed_file_name(index, dp_rank, tp_rank, pp_rank, buffer.chunk)
        _write_json(rank_dir / MINDSPEED_DIR / name, mindspeed_json(buffer))
