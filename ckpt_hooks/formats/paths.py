"""What a checkpoint directory's contents may lead the readers to: only its own files. A file
name read from one of its files is a plain name, and a symlink in it stays inside it (a link to
/etc/shadow or /dev/zero would be read, or copied into the output, as the checkpoint's)."""

from __future__ import annotations

import os
from pathlib import Path

from ckpt_hooks.errors import CheckpointError


def file_of(directory, name, named_by) -> Path:
    """``directory / name`` for a file name a file of the checkpoint (``named_by``) gives: a plain
    name, never a path ('../x.safetensors', '/etc/passwd')."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise CheckpointError(named_by, f"names {name!r:.80}, which is not a file of {directory}")
    return Path(directory) / name


def check_links(root, paths) -> None:
    """Refuse, naming it, a symlink among ``paths`` or under those that are directories (and under
    the directories their links lead to) whose target leaves ``root``, and anything that is neither
    a file nor a directory (a FIFO would block its reader). Links inside ``root`` are fine."""
    top = os.path.realpath(root)
    pending, walked = [Path(p) for p in paths], set()
    while pending:
        path = pending.pop()
        if path.is_symlink():
            target = os.path.realpath(path)
            if target != top and not target.startswith(top.rstrip(os.sep) + os.sep):
                raise CheckpointError(path, f"a symlink to {target}, outside the checkpoint directory {top}")
        if path.is_dir():
            real = os.path.realpath(path)
            if real not in walked:
                walked.add(real)
                pending.extend(Path(entry.path) for entry in os.scandir(path))
        elif path.exists() and not path.is_file():
            raise CheckpointError(path, "neither a file nor a directory (a FIFO, socket or device)")
