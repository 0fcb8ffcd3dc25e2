"""Megatron-LM's legacy checkpoint layout (``--ckpt-format torch``).

    <root>/latest_checkpointed_iteration.txt          iteration number or "release"
    <root>/iter_0000100/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt   (PPP with PP > 1, EEE with EP > 1)
                                               distrib_optim.pt     (distributed optimizer)

With expert parallelism a stage's files are written by the first expert-data-parallel replica
(``ParallelConfig.file_ranks``); with PP = 1, ``mp_rank_TT_EEE`` is told from a dense
``mp_rank_TT_PPP`` by the saved args.

``model_optim_rng.pt`` holds ``args``, ``iteration``, ``checkpoint_version`` and the
model, as ``model`` or ``model0``, ``model1``, ... with virtual pipeline stages.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ckpt_hooks.algebra.spec import ParallelConfig, Rank, parallel_config_from_args
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import torch_dist, torch_save
from ckpt_hooks.formats.atomic import completed, fsync, mark_complete
from ckpt_hooks.formats.paths import check_links
from ckpt_hooks.formats.torch_pickle import TorchFile

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
OPTIMIZER_FILE = "distrib_optim.pt"
RECORDED_MAP = "param_map.json"   # written by ckpt_hooks' save hook beside distrib_optim.pt
MINDSPEED_DIR = "param_map"       # MindSpeed-Core-MS param_map files, idem
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?")


def iteration_dir_name(iteration: int | None) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def rank_dir_name(rank: Rank, config: ParallelConfig) -> str:
    """Megatron-LM's get_checkpoint_name for a file rank of a layout."""
    name = f"mp_rank_{rank.tp:02d}" if config.pp == 1 else f"mp_rank_{rank.tp:02d}_{rank.pp:03d}"
    return name + (f"_{rank.ep:03d}" if config.ep > 1 else "")


def _rank_of(match: re.Match, config: ParallelConfig) -> Rank | None:
    """The file rank a directory name gives under a layout (None: a name it cannot have)."""
    numbers = [int(g) for g in match.groups() if g is not None]
    wanted = 1 + (config.pp > 1) + (config.ep > 1)
    if len(numbers) != wanted:
        return None
    return Rank(numbers[0], numbers[1] if config.pp > 1 else 0, numbers[-1] if config.ep > 1 else 0)


def layout_of_args(args, path) -> ParallelConfig:
    """The layout saved Megatron args describe; CheckpointError (naming ``path``) where they do
    not (another object, a size missing or of another type)."""
    try:
        config = parallel_config_from_args(args)
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"the saved args do not describe a layout ({type(e).__name__}: {e})") from None
    sizes = [config.tp, config.pp, config.vpp, config.dp, config.cp, config.ep, config.etp or 1]
    if not all(_is_count(n) and n > 0 for n in sizes) or \
            not all(_is_count(n) and n >= 0 for n in config.layers_per_stage or ()):
        raise CheckpointError(path, "the saved args give parallel sizes or layer counts that are not whole numbers")
    return config


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chunk_keys(vpp: int) -> list[str]:
    return ["model"] if vpp == 1 else [f"model{v}" for v in range(vpp)]


def find_iteration_dir(load_dir: str | os.PathLike) -> tuple[Path, int | None]:
    """The iteration directory to read, from the tracker file or given directly."""
    root = Path(load_dir)
    if root.is_file():
        raise CheckpointError(root, "is a file; give the checkpoint's directory (the one holding "
                                    f"{TRACKER}, or an iter_* directory)")
    if root.is_symlink() and not root.exists():
        raise CheckpointError(root, "a symlink that leads nowhere (a loop, or a missing target)")
    if not root.is_dir():
        raise CheckpointError(root, "checkpoint directory not found")
    if any(_RANK_DIR.fullmatch(p.name) or p.name in (torch_dist.METADATA, torch_dist.BACKEND) for p in root.iterdir()):
        check_links(root, [root])
        name = root.name
        return root, (int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None)
    tracker = root / TRACKER
    check_links(root, [tracker])
    if not tracker.is_file():
        raise CheckpointError(tracker, "missing: not a Megatron legacy checkpoint directory")
    with open(tracker, "rb") as f:
        text = f.read(64).strip().decode("ascii", "replace")   # a number or "release", not a file's worth
    if text == "release":
        iteration = None
    elif text.isascii() and text.isdigit() and len(text) <= 18:   # str.isdigit alone takes "²"
        iteration = int(text)
    else:
        raise CheckpointError(tracker, f"expected an iteration number or 'release', found {text[:40]!r}")
    iter_dir = root / iteration_dir_name(iteration)
    if not iter_dir.is_dir():
        raise CheckpointError(iter_dir, "missing iteration directory named by the tracker file")
    check_links(root, [iter_dir])
    return iter_dir, iteration


@dataclass
class LegacyCheckpoint:
    """A Megatron legacy checkpoint opened lazily: pickles parsed, no tensor data read."""

    iter_dir: Path
    iteration: int | None
    files: dict[Rank, TorchFile]   # file rank -> model_optim_rng.pt
    layout: ParallelConfig          # as the saved args describe it

    @property
    def first(self) -> TorchFile:
        return self.files[Rank()]

    @property
    def args(self):
        return self.first.obj.get("args")


def open_checkpoint(load_dir: str | os.PathLike) -> LegacyCheckpoint:
    """Open a checkpoint: every rank file's pickle parsed, no tensor data read."""
    iter_dir, iteration = find_iteration_dir(load_dir)
    found = {entry: match for entry in sorted(iter_dir.iterdir()) if (match := _RANK_DIR.fullmatch(entry.name))}
    if not found:
        raise CheckpointError(iter_dir, "no mp_rank_* directories")
    first_dir = min(found, key=lambda entry: entry.name)   # mp_rank_00[_000][_000]: rank 0's
    first = TorchFile(first_dir / MODEL_FILE)
    args = first.obj.get("args") if isinstance(first.obj, dict) else None
    if args is None:
        raise CheckpointError(first.path, "no 'args' saved in the checkpoint; cannot tell its layout")
    config = layout_of_args(args, first.path)
    said = f"args say TP{config.tp}·PP{config.pp}" + (f"·EP{config.ep}" if config.ep > 1 else "") + \
        (f"·ETP{config.etp}" if config.etp and config.ep > 1 else "")
    ranks = {}
    for entry, match in found.items():
        rank = _rank_of(match, config)
        if rank is None or rank in ranks:
            raise CheckpointError(entry, f"unexpected rank directory ({said})")
        ranks[rank] = entry
    expected = config.file_ranks()
    for rank in expected:
        if rank not in ranks:
            raise CheckpointError(iter_dir / rank_dir_name(rank, config), f"missing rank directory ({said})")
    for rank in sorted(ranks.keys() - set(expected)):
        raise CheckpointError(ranks[rank], f"unexpected rank directory ({said})")
    if ranks[Rank()] != first_dir:
        raise CheckpointError(first_dir, f"unexpected rank directory ({said})")
    files = {rank: first if rank == Rank() else TorchFile(ranks[rank] / MODEL_FILE) for rank in sorted(expected)}
    return LegacyCheckpoint(iter_dir, iteration, files, config)


def completed_rank_file(path: Path) -> dict | None:
    """The CRC-32s of a rank file an earlier, interrupted run completed, checked against its
    bytes; None when it must be written again (absent, unfinished, or not what was written)."""
    crcs = completed(path)
    if not isinstance(crcs, dict):
        return None
    try:
        TorchFile(path).check_crcs(crcs)
    except (OSError, CheckpointError):
        return None
    return crcs


def write_tracker(root: Path, iteration: int | None) -> None:
    (root / TRACKER).write_text("release" if iteration is None else str(iteration))


def save_rank_file(root: Path, iteration: int | None, rank: Rank, config: ParallelConfig,
                   state: dict, name: str = MODEL_FILE, checksums: dict | None = None) -> Path:
    """Write one rank file; ``checksums[path]`` gets its records' CRC-32s (for the manifest)."""
    directory = root / iteration_dir_name(iteration) / rank_dir_name(rank, config)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    crcs = torch_save.save(state, path)
    if checksums is not None:
        checksums[str(path)] = crcs
    fsync(path)   # now, by this worker, beside the others' writing: the publish then finds it on disk
    mark_complete(path, crcs)   # only once on disk: an interrupted conversion resumed later reuses it
    return path
