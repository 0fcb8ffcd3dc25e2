"""``ckpt-hooks verify`` for MindSpore checkpoints: a ``rank_N/`` tree under its strategy (or one
complete file) as one side of a certificate (``ckpt_hooks.verify``), and any MindSpore files —
MindSpeed-Core-MS's included — checked alone against their manifests' CRC-32s."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ckpt_hooks.engine.compare import Integrity, Side
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats.mindspore_strategy import read_strategy
from ckpt_hooks.formats.paths import check_links
from ckpt_hooks.mindspore import manifest
from ckpt_hooks.mindspore.files import READERS, open_checkpoint
from ckpt_hooks.mindspore.transform import read_source

NAMES = "mindspore"


def side(path, strategy=None) -> Side:
    """Every tensor under its MindSpore name, each rank's file a box of it as ``strategy`` (a
    strategy file or directory; None: one complete checkpoint) says; its run state the step and
    epoch its manifests record and a .ckpt's string entries. Its files are checked against their
    manifests but for the CRC-32s: the certificate compares the bytes themselves, and says where
    they differ."""
    src = read_source(path, read_strategy(strategy) if strategy else None, crcs=False)
    layout = f"MindSpore, {len(src.files)} ranks under {Path(src.strategy.path).name}" if src.strategy \
        else "MindSpore, one complete checkpoint"
    run_state = {what: value for what, value in src.run_state().items() if value is not None}
    return Side(str(path), layout, {"": src.tensors}, {**run_state, "strings": src.strings}, NAMES)


def check(path, quiet: bool = True) -> Integrity:
    """Every MindSpore file under ``path`` (one file, a ``rank_N/`` tree, a MindSpeed-Core-MS
    checkpoint): against its manifest (size, shapes, dtypes, every tensor's CRC-32) and its
    ``crc_num`` where MindSpore wrote one. A mismatch raises CheckpointError naming the file (and
    the tensor)."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(root, "no such checkpoint file or directory")
    check_links(root, [root])
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in READERS and p.is_file())
    if not paths:
        raise CheckpointError(root, f"no {' or '.join(READERS)} files in it")
    out = Integrity(str(path), files=len(paths))
    for p in tqdm(paths, desc="verify", unit="file", disable=quiet, dynamic_ncols=True):
        mapped = open_checkpoint(p, check_crc=True)
        described = manifest.read(p)
        checked, unchecked = (0, len(mapped.tensors)) if described is None else (
            manifest.check(described, mapped) or manifest.check_crcs(described, mapped))
        if getattr(mapped, "has_crc", False) or "crc_num" in getattr(mapped, "metadata", {}):
            checked, unchecked = len(mapped.tensors), 0   # MindSpore's CRC of the whole file matched
        out.checked += checked
        out.unchecked += unchecked
    return out
