"""``ckpt-hooks export-param-map``: the distributed optimizer's param_map of every rank, as
MindSpeed-Core-MS reads it (one JSON per rank and buffer). With expert parallelism the file names
(which have no expert rank) go into each file rank's ``mp_rank_TT[_PPP]_EEE`` directory, and an
expert buffer's files are numbered by the expert-data-parallel ranks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ckpt_hooks.megatron.checkpoint import read_source
from ckpt_hooks.engine.ranks import write_shared
from ckpt_hooks.formats.megatron_legacy import rank_dir_name
from ckpt_hooks.megatron.optimizer import source_optimizer
from ckpt_hooks.algebra.param_map import BufferMap, mindspeed_file_name, mindspeed_json
from ckpt_hooks.algebra.spec import ParallelConfig, Rank


def write_mindspeed_maps(directory: Path, maps: dict[Rank, list[BufferMap]], config: ParallelConfig) -> list[Path]:
    """Write each rank's buffers as MindSpeed-Core-MS's JSON files, one per DP rank."""
    written = []
    for rank, rank_maps in sorted(maps.items()):
        under = directory / rank_dir_name(rank, config) if config.ep > 1 else directory
        under.mkdir(exist_ok=True)
        for vp in sorted({m.chunk for m in rank_maps}):
            for index, buffer in enumerate(m for m in rank_maps if m.chunk == vp):
                text = json.dumps(mindspeed_json(buffer), indent=1)
                for dp_rank in range(buffer.dp_size if buffer.expert else config.dp):
                    path = under / mindspeed_file_name(index, dp_rank, rank.tp, rank.pp, vp)
                    path.write_text(text)
                    written.append(path)
    return written


def export_param_maps(load_dir, save_dir, dp: int | None = None) -> list[Path]:
    """Rebuild each rank's param_map, check it against ``distrib_optim.pt``, write the JSON files."""
    src = read_source(load_dir)
    if dp:
        src.layout = replace(src.layout, dp=dp)
    optimizer = source_optimizer(src)
    written = []

    def write_all(root: Path, _) -> None:   # small: rank 0 writes them all (under torchrun too)
        written.extend(p.relative_to(root) for p in write_mindspeed_maps(root, optimizer.maps, src.layout))
    write_shared(save_dir, [], None, 0, workers=1, quiet=True, label="export-param-map", publish=write_all)
    return [Path(save_dir) / p for p in written]
