"""MindSpeed-Core-MS's checkpoint layout (its converters' "V2"), and what is kept beside it::

    <ms_path>/latest_checkpointed_iteration.txt
    <ms_path>/iter_0000100/mp_rank_TT_PPP/model_optim_rng.{ckpt|safetensors}
    <ms_path>/pt_meta/args_tpTT_ppPPP.pt        per rank: Megatron's args, param groups, scheduler, ...
    <ms_path>/pt_meta/param_map_buffer{b}_dp{d}tp{t}pp{p}vpp{v}.json

Tensors carry megatron-core's names with *global* layer numbers (so a file does not depend on
the pipeline split); with the optimizer, ``<name>`` is the fp32 main param and
``exp_avg.<name>`` / ``exp_avg_sq.<name>`` its Adam moments. Also here: what both
directions share (their report, the ``--num-layers`` check).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ckpt_hooks.algebra import names
from ckpt_hooks.algebra.param_map import BufferMap, mindspeed_json
from ckpt_hooks.algebra.spec import Rank
from ckpt_hooks.engine.run import Report
from ckpt_hooks.engine.source import TensorMeta
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import torch_save
from ckpt_hooks.formats.mindspore_ckpt import raw_bytes
from ckpt_hooks.formats.torch_pickle import TorchFile, iter_lazy_tensors
from ckpt_hooks.mindspore.files import open_checkpoint

META_DIR = "pt_meta"
FILE_PREFIX = "model_optim_rng"
STATE_PREFIXES = {"param": "", "exp_avg": "exp_avg.", "exp_avg_sq": "exp_avg_sq."}
# What MindSpeed-Core-MS's converter keeps of model_optim_rng.pt (its save_args).
META_ENTRIES = ("args", "checkpoint_version", "iteration", "optimizer", "opt_param_scheduler", "rng_state",
                "num_floating_point_operations_so_far")
_MAP_FILE = re.compile(r"param_map_buffer(\d+)_dp0tp(\d+)pp(\d+)vpp(\d+)\.json")


@dataclass
class MindSpeedReport(Report):
    """A conversion's report, with the md5 of every file written (``tensor_md5``)."""

    md5: dict[str, str] = field(default_factory=dict)   # written file (relative) -> tensor_md5


def check_num_layers(num_layers: int | None, spec, path, noop=()) -> None:
    """MindSpeed-Core-MS's tools take the layer count (no-op layers included): it must agree."""
    if num_layers is not None and num_layers != spec.num_layers + len(noop):
        raise CheckpointError(path, f"--num-layers {num_layers}, but the model has {spec.num_layers} layers"
                                    + (f" and {len(noop)} no-op layers" if noop else ""))


def rank_dir(iter_dir: Path, rank: Rank) -> Path:
    """A rank's directory; MindSpeed-Core-MS's trainer leaves out the stage when PP is 1."""
    path = iter_dir / f"mp_rank_{rank.tp:02d}_{rank.pp:03d}"
    short = iter_dir / f"mp_rank_{rank.tp:02d}"
    return short if not path.exists() and short.exists() else path


def meta_path(meta_dir: Path, rank: Rank) -> Path:
    return meta_dir / f"args_tp{rank.tp:02}_pp{rank.pp:03}.pt"


def ms_layer(layer: int, noop=()) -> int:
    """The MindSpore layer id of Megatron layer ``layer``: ids in ``noop`` hold no Megatron layer."""
    for skipped in sorted(noop):
        layer += skipped <= layer
    return layer


def ms_name(key: str, layers: range, noop=()) -> str:
    """The MindSpore name of a model chunk's key (``layers``: the chunk's global layers)."""
    name = names.classify(key)
    if name is None or name.local_layer is None:
        return key
    return names.layer_key(ms_layer(layers[name.local_layer], noop), name.suffix)


def write_meta(meta_dir: Path, rank: Rank, entries: dict, chunks: dict, grad_dtypes: dict) -> None:
    """The rank's pt_meta file: MindSpeed-Core-MS's entries (and its ``param_name_list``), plus
    what writing Megatron files back needs: every chunk key with its shape and dtype, in order
    (non-tensor entries such as ``_extra_state`` included), and the grad buffers' dtypes."""
    param_names = [[f"{chunk}.{k}" for k, m in keys.items() if m is not None][::-1] for chunk, keys in chunks.items()]
    described = {chunk: {k: None if m is None else (tuple(m.shape), m.dtype) for k, m in keys.items()}
                 for chunk, keys in chunks.items()}
    torch_save.save({**entries, "param_name_list": param_names,
                       "ckpt_hooks": {"chunks": described, "grad_dtypes": grad_dtypes}},
                      meta_path(meta_dir, rank))


def read_meta(meta_dir: Path, rank: Rank) -> tuple[TorchFile, dict, dict]:
    """(the pt_meta file, its chunks as {chunk: {key: TensorMeta or None}}, grad dtypes)."""
    path = meta_path(meta_dir, rank)
    if not path.is_file():
        raise CheckpointError(path, "missing: the Megatron metadata megatron-to-mindspore writes (pass "
                                    "--param-map-path if it lies elsewhere)")
    meta = TorchFile(path)
    ours = meta.obj.get("ckpt_hooks") if isinstance(meta.obj, dict) else None
    if not isinstance(ours, dict) or "chunks" not in ours or meta.obj.get("args") is None:
        raise CheckpointError(path, "no args or chunk layout: not written by ckpt-hooks megatron-to-mindspore")
    chunks = {chunk: {k: None if m is None else TensorMeta(tuple(m[0]), m[1]) for k, m in keys.items()}
              for chunk, keys in ours["chunks"].items()}
    return meta, chunks, ours.get("grad_dtypes", {})


def check_param_maps(directory, maps: dict[Rank, list[BufferMap]]) -> None:
    """MindSpeed-Core-MS's param_map files (DP rank 0's) must place every parameter where the
    maps in use (recorded or rebuilt, and checked against distrib_optim.pt) do."""
    found = [(p, _MAP_FILE.fullmatch(p.name)) for p in sorted(Path(directory).glob("param_map_buffer*.json"))]
    if not any(m for _, m in found):
        raise CheckpointError(directory, "no param_map_buffer*_dp0*.json files")
    for path, match in found:
        if not match:
            continue
        buffer, tp, pp, vp = map(int, match.groups())
        ours = [m for m in maps.get(Rank(tp, pp), []) if m.chunk == vp]
        expected = {k: v[1:] for k, v in mindspeed_json(ours[buffer]).items()} if buffer < len(ours) else None
        try:
            theirs = {k.removeprefix("module."): list(v)[1:] for k, v in json.loads(path.read_text()).items()}
        except (ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(path, f"unreadable param_map ({e})") from None
        if theirs != expected:
            raise CheckpointError(path, "places parameters differently from distrib_optim.pt's param_map "
                                        "(another model or layout?)")


def tensor_md5(path) -> str:
    """md5 of a file's tensors — names, dtypes, shapes and bytes, in name order: equal for two
    files holding the same tensors, whichever program wrote them (what MindSpeed-Core-MS's
    md5sum.py compares), for torch ``.pt`` and MindSpore ``.ckpt`` / ``.safetensors`` files."""
    digest = hashlib.md5()
    if str(path).endswith(".pt"):
        torch_file = TorchFile(path)
        for name, lazy in sorted(iter_lazy_tensors(torch_file.obj), key=lambda item: item[0]):
            tensor = torch_file.read(lazy).contiguous()
            digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        mapped = open_checkpoint(path)
        for name in sorted(mapped.names):
            array = mapped.read(name)
            digest.update(f"{name} {array.dtype} {array.shape}\n".encode())
            digest.update(raw_bytes(array).tobytes())
    return digest.hexdigest()


# MindSpeed-Core-MS's converter stores the optimizer's and scheduler's numbers beside the tensors
# (its append_dict): these are their names and MindSpore dtypes.
_LR_DECAY_STYLES = ["constant", "WSD", "linear", "cosine", "inverse-square-root"]
_WD_INCR_STYLES = ["constant", "linear", "cosine"]
_SCHEDULER_DTYPES = {"max_lr": np.float64, "min_lr": np.float64, "start_wd": np.float64, "end_wd": np.float64,
                     "lr_warmup_steps": np.int32, "num_steps": np.int32, "lr_decay_style": np.int32,
                     "lr_decay_steps": np.int32, "wd_incr_style": np.int32, "wd_incr_steps": np.int32}


def training_scalars(iteration: int, optimizer, scheduler) -> list[tuple[str, np.ndarray]]:
    """``step_num``, ``epoch_num``, ``state_step``, ``<group field>_group_<i>`` (``lr`` as
    ``learning_rate``) and the scheduler's fields, as MindSpeed-Core-MS's converter writes them."""
    out = {"step_num": np.array(iteration, np.int64), "epoch_num": np.array(0, np.int64)}
    groups = optimizer.get("optimizer", {}).get("param_groups", []) if isinstance(optimizer, dict) else []
    for i, group in enumerate(groups):
        for key, value in group.items():
            if key == "step":
                out["state_step"] = np.array([value], np.float32)
            elif isinstance(value, (int, float, list)):
                out[f"{'learning_rate' if key == 'lr' else key}_group_{i}"] = np.array(value, np.float32)
    styles = {"lr_decay_style": _LR_DECAY_STYLES, "wd_incr_style": _WD_INCR_STYLES}
    for key, value in (scheduler or {}).items():
        if key in styles and value in styles[key]:
            value = styles[key].index(value)
        if isinstance(value, (int, float)):
            out[key] = np.array(value, _SCHEDULER_DTYPES.get(key, np.float32))
    return list(out.items())
