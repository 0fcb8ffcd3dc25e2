"""Writing outputs: a directory staged beside its final name and renamed into place only when
complete, target files written in parallel under one progress bar, and the report of it all.
No torch needed here."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ckpt_hooks.errors import CheckpointError


@contextlib.contextmanager
def atomic_write(path):
    """A binary file object on a hidden temporary name beside ``path``, renamed to ``path`` only
    when the block completes: a reader never sees half a file, and a failed write leaves none."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def refuse_non_empty(save_dir: str | os.PathLike) -> None:
    path = Path(save_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(path, "save directory exists and is not empty; refusing to overwrite")


@contextlib.contextmanager
def staged_directory(save_dir: str | os.PathLike):
    """Yield a temporary sibling of ``save_dir``; it becomes ``save_dir`` only on success."""
    target = Path(save_dir).absolute()
    refuse_non_empty(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def run(targets: list, write: Callable[[object, tqdm], None], total_bytes: int, workers: int = 2,
        quiet: bool = False, label: str = "convert") -> None:
    """``write(target, progress)`` every target, ``workers`` at a time, under one progress bar."""
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label, disable=quiet, dynamic_ncols=True) as bar:
        if workers <= 1 or len(targets) == 1:
            for target in targets:
                write(target, bar)
            return
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            for result in [pool.submit(write, target, bar) for target in targets]:
                result.result()
        finally:  # on a failure (or Ctrl-C) the queued targets are not started
            pool.shutdown(cancel_futures=True)


@dataclass
class Report:
    """What a conversion wrote: ``source -> target: N files, X MB in T s (R MB/s)``."""

    source: str
    target: str
    files: int
    nbytes: int
    seconds: float

    def __str__(self) -> str:
        rate = self.nbytes / max(self.seconds, 1e-9) / 1e6
        return (f"{self.source} -> {self.target}: {self.files} files, "
                f"{self.nbytes / 1e6:.1f} MB in {self.seconds:.2f} s ({rate:.0f} MB/s)")
