"""Running a conversion: target files written in parallel under one progress bar, and the report
of it all. No torch needed here.

A failure or an interrupt (Ctrl-C, or SIGTERM/SIGHUP turned into one by the CLI) stops every
worker at its next tensor, not at the end of its file, so that the staged output is removed
promptly."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from tqdm import tqdm


class Stopped(Exception):
    """Raised in a worker when another worker failed or the run was interrupted."""


class _Progress(tqdm):
    """The progress bar, which is also where workers notice that the run is being stopped."""

    stop = None

    def update(self, n=1):
        if self.stop.is_set():
            raise Stopped()
        return super().update(n)


def run(targets: list, write: Callable[[object, tqdm], None], total_bytes: int, workers: int = 2,
        quiet: bool = False, label: str = "convert") -> float:
    """``write(target, progress)`` every target, ``workers`` at a time, under one progress bar.
    Returns the seconds it took (the data phase of a conversion)."""
    started = time.perf_counter()
    with _Progress(total=total_bytes, unit="B", unit_scale=True, desc=label, disable=quiet,
                   dynamic_ncols=True) as bar:
        bar.stop = threading.Event()
        if workers <= 1 or len(targets) == 1:
            for target in targets:
                write(target, bar)
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                futures = [pool.submit(write, target, bar) for target in targets]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = next((f for f in futures if f in done and f.exception() is not None), None)
                if failed is not None:
                    raise failed.exception()
            except BaseException:
                bar.stop.set()   # the running workers stop at their next tensor
                raise
            finally:  # on a failure (or Ctrl-C) the queued targets are not started
                pool.shutdown(cancel_futures=True)
    return time.perf_counter() - started


@dataclass
class Report:
    """What a conversion wrote: ``source -> target: N files, X MB in T s (data R MB/s)``; the
    rate is the data phase's (``run``'s seconds), without imports and planning."""

    source: str
    target: str
    files: int
    nbytes: int
    seconds: float
    data_seconds: float | None = None
    notes: list[str] = field(default_factory=list)   # what was assumed or chosen, and how to go on

    def __str__(self) -> str:
        rate = self.nbytes / max(self.data_seconds or self.seconds, 1e-9) / 1e6
        return "\n".join([f"{self.source} -> {self.target}: {self.files} files, "
                          f"{self.nbytes / 1e6:.1f} MB in {self.seconds:.2f} s (data {rate:.0f} MB/s)",
                          *(f"note: {note}" for note in self.notes)])
