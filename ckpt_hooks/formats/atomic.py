"""Atomic, durable file output: a file, or a whole directory, appears under its final name only
when complete and on disk; a failed write leaves nothing behind.

Durable: every file and directory is fsync'ed before the rename that publishes it, and the
parent after it, so that a power loss after the rename cannot publish empty or partial files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from ckpt_hooks.errors import CheckpointError


def fsync(path) -> None:
    """A file's or a directory's contents (a directory's: its entries) on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file under ``root``, then every directory, deepest first, on disk."""
    for directory, _, names in os.walk(root):
        for name in names:
            fsync(Path(directory) / name)
    for directory, _, _ in os.walk(root, topdown=False):
        fsync(directory)


def mark_complete(path: Path, facts) -> None:
    """Say of a file written into a staged directory, once it is on disk, that it is complete: its
    size and ``facts`` (what a resumed run checks it by: its checksums) in a hidden marker beside
    it. ``completed`` reads it back; ``drop_markers`` removes them all."""
    marker = _marker(path)
    marker.write_text(json.dumps({"bytes": path.stat().st_size, "facts": facts}))
    fsync(marker)


def completed(path: Path):
    """The ``facts`` of a file an earlier, interrupted run completed; None when it must be written
    again (absent, unfinished, or not of the size it was written at)."""
    try:
        done = json.loads(_marker(path).read_text())
        return done["facts"] if Path(path).stat().st_size == done["bytes"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def drop_markers(staging: Path) -> None:
    """Once every file of a staged directory is written: nothing is left to resume, and what is
    then written (a manifest listing the files) sees the checkpoint's files alone."""
    for marker in [staging / _IDENTITY, *staging.rglob(f".*{_MARKER}")]:
        marker.unlink(missing_ok=True)


def _marker(path) -> Path:
    return Path(path).with_name(f".{Path(path).name}{_MARKER}")


_MARKER = ".done.json"
_IDENTITY = ".conversion"   # in a staged directory: what it holds (staged_directory's identity)
_HELPER = re.compile(rf"\.(.+)(?:\.[0-9a-f]{{8}}\.tmp|{re.escape(_MARKER)})")   # atomic_write's temporary, a marker


@contextlib.contextmanager
def atomic_write(path):
    """A binary file object on a hidden temporary name beside ``path``, renamed to ``path`` only
    when the block completes: a reader never sees half a file, and a failed write leaves none."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def refuse_non_empty(save_dir: str | os.PathLike, sources=(), overwrite: bool = False) -> None:
    """Fail, naming the save directory and why, unless the output can go there: a file, a
    directory with something in it (unless ``overwrite``), the checkpoint being read
    (``sources``), a place inside one or holding one, or a parent that cannot be written are
    refused before anything is read."""
    path = Path(save_dir)
    if path.exists() and not path.is_dir():
        raise CheckpointError(path, "is a file; the save directory must be a directory that does not exist or is empty")
    where = _resolved(path)
    for source in map(_resolved, sources):
        if where == source or source in where.parents:
            raise CheckpointError(path, f"lies inside the checkpoint being read ({source}); "
                                        "choose a save directory outside it")
        if where in source.parents:
            raise CheckpointError(path, f"holds the checkpoint being read ({source}); choose another save directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(path, "save directory exists and is not empty; refusing to overwrite")
    parent = next(p for p in where.parents if p.exists())
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(path, f"cannot be created: {parent} is not writable")


def _resolved(path) -> Path:
    try:
        return Path(path).resolve()
    except RuntimeError:   # Python 3.11 raises it for a symlink loop
        raise CheckpointError(path, "a symlink that leads nowhere (a loop, or a missing target)") from None


@contextlib.contextmanager
def staged_directory(save_dir: str | os.PathLike, resume: bool = False, ranks=None, identity: str = ""):
    """Yield a temporary sibling of ``save_dir``; it becomes ``save_dir`` only on success.
    ``identity`` names what is written (a conversion: its source's files, target, options);
    ``resume``: the directory an interrupted run (killed, so it could not clean up) of the same
    ``identity`` left, if any (another conversion's is never resumed).
    ``ranks`` (``engine.ranks.Ranks``, several processes): rank 0 makes the directory and hands
    it to all; once every rank's block is done, all agree on any failure, and rank 0 publishes
    (or removes) it before any rank returns."""
    target = Path(save_dir).absolute()
    if ranks is None or ranks.world == 1:
        staging = _staging(target, resume, identity)
        try:
            yield staging
            _publish(staging, target)
        except OSError as e:   # a full disk, mostly: named as the file it was to become
            shutil.rmtree(staging, ignore_errors=True)
            raise _as_published(e, staging, target) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return
    made = error = None
    if ranks.lead:
        try:
            made = str(_staging(target, resume, identity))
        except CheckpointError as e:
            error = (e.path, e.cause)
    made, error = ranks.broadcast((made, error))
    if error is not None:
        raise CheckpointError(*error)
    failure = None
    try:
        yield Path(made)
    except BaseException as e:   # every rank must reach the agreement below
        failure = e
    agreed = ranks.first_error(None if failure is None else
                               (failure.path, failure.cause) if isinstance(failure, CheckpointError) else
                               ("-", f"rank {ranks.rank}: {type(failure).__name__}: {failure}"))
    if ranks.lead:
        if agreed is None:
            _publish(Path(made), target)
        else:
            shutil.rmtree(made, ignore_errors=True)
    ranks.gather(None)   # no rank returns before the output is published or removed
    if failure is not None:
        raise failure
    if agreed is not None:
        raise CheckpointError(*agreed)


def _as_published(error: OSError, staging: Path, target: Path) -> OSError:
    """An I/O error on a staged file, naming the file it was to become (the staged one is gone; the
    save directory where the error names none)."""
    name = Path(error.filename) if error.filename else staging
    if not name.is_relative_to(staging):
        return error
    helper = _HELPER.fullmatch(name.name)   # a temporary name or a marker: the file it stands for
    if helper is not None:
        name = name.with_name(helper.group(1))
    return OSError(error.errno, f"{error.strerror}; nothing was written", str(target / name.relative_to(staging)))


def _staging(target: Path, resume: bool, identity: str) -> Path:
    refuse_non_empty(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    left = sorted((p for p in target.parent.glob(f".{target.name}.partial-*") if _identity_of(p) == identity),
                  key=lambda p: p.stat().st_mtime) if resume else []
    if left:
        return left[-1]
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    if identity:
        (staging / _IDENTITY).write_text(identity)
    return staging


def _identity_of(staging: Path) -> str | None:
    try:
        return (staging / _IDENTITY).read_text()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError):
        return None


def _publish(staging: Path, target: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private
    fsync_tree(staging)
    if target.exists():
        target.rmdir()
    staging.rename(target)
    fsync(target.parent)


@contextlib.contextmanager
def replacing(save_dir: str | os.PathLike):
    """Let a conversion replace a non-empty ``save_dir`` (``--overwrite``): the old contents are
    moved to a hidden sibling for the block, removed when it succeeds and put back when it fails,
    so that a failed run leaves what was there."""
    path = Path(save_dir)
    if not path.is_dir() or not any(path.iterdir()):
        yield
        return
    aside = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex[:8]}")
    path.rename(aside)
    try:
        yield
    except BaseException:
        if path.exists() and not any(path.iterdir()):
            path.rmdir()
        if not path.exists():
            aside.rename(path)
        raise
    shutil.rmtree(aside, ignore_errors=True)
