"""Running a conversion: target files written in parallel under one progress bar, and the report
of it all. No torch needed here."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm


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
