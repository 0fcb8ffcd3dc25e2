"""``ckpt-hooks export-param-map``: the distributed optimizer's param_map of every rank, as
MindSpeed-Core-MS reads it (one JSON per rank and buffer)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ckpt_hooks.conversion import read_source
from ckpt_hooks.formats.megatron_legacy import chunk_keys
from ckpt_hooks.output import staged_directory
from ckpt_hooks.optimizer import SourceOptimizer
from ckpt_hooks.param_map import mindspeed_file_name, mindspeed_json


def export_param_maps(load_dir, save_dir, dp: int | None = None) -> list[Path]:
    """Rebuild each rank's param_map, check it against ``distrib_optim.pt``, write the JSON files."""
    ckpt, spec, source, files = read_source(load_dir)
    if dp:
        source = replace(source, dp=dp)
    optimizer = SourceOptimizer(ckpt, spec, source, files)
    written = []
    with staged_directory(save_dir) as root:
        for (tp_rank, pp_rank), maps in sorted(optimizer.maps.items()):
            for vp in range(len(chunk_keys(source.vpp))):
                for index, buffer in enumerate(m for m in maps if m.chunk == vp):
                    text = json.dumps(mindspeed_json(buffer), indent=1)
                    for dp_rank in range(source.dp):
                        name = mindspeed_file_name(index, dp_rank, tp_rank, pp_rank, vp)
                        (root / name).write_text(text)
                        written.append(Path(save_dir) / name)
    return written
