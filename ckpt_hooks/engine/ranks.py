"""Conversion spread over processes: torchrun's, on one node or many, on a shared filesystem.

    torchrun --nnodes N --nproc-per-node M -m ckpt_hooks.cli convert ...

Every process plans the whole conversion (cheap: no tensor data), takes its share of the target
files (balanced by bytes, the same split on every process), and writes them into one staged
directory that rank 0 created; rank 0 then publishes it (tracker, manifest, rename) once every
rank has finished. A failure on any rank is agreed on by all before anything is published, and
every rank stops with the same one-line error. One process (no torchrun) is rank 0 of 1.
torch.distributed (gloo) is imported only under torchrun. ``write_shared`` is that sequence, for
every converter.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Callable

from ckpt_hooks.engine.run import run
from ckpt_hooks.formats.atomic import drop_markers, staged_directory


class Ranks:
    """This process's place among the conversion's processes."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @classmethod
    def from_env(cls) -> "Ranks":
        """torchrun's WORLD_SIZE / RANK (joining its gloo process group), else a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
            # Left to interpreter teardown, gloo's threads can abort the process
            # ("terminate called without an active exception").
            atexit.register(_leave, dist)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def share(self, targets: list, size=lambda target: target.nbytes) -> list:
        """This rank's targets: the largest first, each to the least loaded rank (deterministic)."""
        if self.world == 1:
            return list(targets)
        load, mine = [0] * self.world, set()
        for index in sorted(range(len(targets)), key=lambda i: (-size(targets[i]), i)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            load[rank] += size(targets[index])
            if rank == self.rank:
                mine.add(index)
        return [t for i, t in enumerate(targets) if i in mine]

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def first_error(self, error: str | None) -> str | None:
        """The lowest rank's error, if any rank has one: every rank learns the same."""
        return next((e for e in self.gather(error) if e is not None), None)


def write_shared(save_dir, targets: list, write: Callable, total: int, *, workers: int, quiet: bool, label: str,
                 size: Callable = lambda target: target.nbytes, resume: bool = False, identity: str = "",
                 result: Callable = lambda: None, publish: Callable | None = None) -> float:
    """Write ``targets`` into the one staged directory that becomes ``save_dir`` (formats.atomic):
    each process (the one, or each of torchrun's) writes its share, by ``size``,
    ``write(root, target, progress)`` for each, ``workers`` at a time (``total``: the progress
    bar's bytes for all). Then rank 0 alone drops the staged files' markers (``resume``,
    ``identity``: ``staged_directory``'s) and calls ``publish(root, results)`` — every rank's
    ``result()`` in rank order — for what depends on all the files (an index, a tracker, a
    manifest), and the directory is published. Returns the data phase's seconds."""
    ranks = Ranks.from_env()
    mine = ranks.share(targets, size)
    with staged_directory(save_dir, resume, ranks, identity) as root:
        seconds = failure = None
        try:
            share = total * sum(map(size, mine)) // max(1, sum(map(size, targets)))
            seconds = run(mine, lambda target, progress: write(root, target, progress), share, workers=workers,
                          quiet=quiet or not ranks.lead, label=label)
            done = (result(),)
        except BaseException as e:   # raised after the gather: a rank that skipped it would meet
            failure, done = e, None  # the others' in staged_directory's agreement instead
        results = ranks.gather(done)
        if failure is not None:
            raise failure
        if ranks.lead and None not in results:   # else: a failure, agreed on next
            drop_markers(root)
            if publish is not None:
                publish(root, [r[0] for r in results])
    return seconds


def _leave(dist) -> None:
    if dist.is_initialized():
        try:   # every rank has written its last line before one exits (torchrun then stops the rest)
            dist.monitored_barrier(timeout=timedelta(seconds=30))
        except RuntimeError:   # a rank that does not come: leave anyway
            pass
        dist.destroy_process_group()
