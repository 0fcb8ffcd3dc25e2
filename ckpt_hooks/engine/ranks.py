"""Conversion spread over processes: torchrun's, on one node or many, on a shared filesystem.

    torchrun --nnodes N --nproc-per-node M -m ckpt_hooks.cli convert ...

Every process plans the whole conversion (cheap: no tensor data), takes its share of the target
files (balanced by bytes, the same split on every process), and writes them into one staged
directory that rank 0 created; rank 0 then publishes it (tracker, manifest, rename) once every
rank has finished. A failure on any rank is agreed on by all before anything is published, and
every rank stops with the same one-line error. One process (no torchrun) is rank 0 of 1.
torch.distributed (gloo) is imported only under torchrun.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta


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


def _leave(dist) -> None:
    if dist.is_initialized():
        try:   # every rank has written its last line before one exits (torchrun then stops the rest)
            dist.monitored_barrier(timeout=timedelta(seconds=30))
        except RuntimeError:   # a rank that does not come: leave anyway
            pass
        dist.destroy_process_group()
