"""MindSpore resharding: our transform_checkpoints against mindspore.transform_checkpoints.

Writes a ~1 GB checkpoint of a few large fp32 tensors at 4 ranks (rows or columns split), then
reshards it to 2 ranks (rows become columns and back, and a 4 -> 2 row merge) with ours and
with MindSpore's, each in a fresh process. Checks the outputs are byte-identical and prints
each one's time (the call, and the whole process with imports), peak RSS (also above the
process's RSS before the call; it counts the pages of mapped source files) and peak anonymous
memory (sampled every 5 ms), and the ratios ours / MindSpore's (below 1: less).
Files lie in /dev/shm by default, so the times are the work's rather than the disk's.

    python bench/bench_ms_transform.py [--workdir DIR] [--mib 1024] [--workers 1]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# name -> (tensor map at 4 ranks, tensor map at 2 ranks)
TENSORS = {"rows_to_columns.weight": ([0, -1], [-1, 0]), "columns_to_rows.weight": ([-1, 0], [0, -1]),
           "rows_to_rows.weight": ([0, -1], [0, -1]), "columns_to_columns.weight": ([-1, 0], [-1, 0])}


def make_source(work: Path, mib: int) -> tuple[Path, Path, Path]:
    """A 4-rank checkpoint (our writer, byte-identical to MindSpore's) and both strategy files."""
    sys.path.insert(0, str(ROOT))
    from ckpt_hooks.formats import mindspore_ckpt
    from ckpt_hooks.mindspore.strategy import ParamLayout, box
    from tests.test_mindspore_transform import write_strategy

    side = int((mib * 2**20 / 4 / len(TENSORS)) ** 0.5) // 8 * 8
    rng = np.random.default_rng(0)
    full = {name: rng.standard_normal((side, side), dtype=np.float32) for name in TENSORS}
    src = write_strategy(work / "src_strategy.ckpt", {n: ([4], maps[0]) for n, maps in TENSORS.items()})
    dst = write_strategy(work / "dst_strategy.ckpt", {n: ([2], maps[1]) for n, maps in TENSORS.items()})
    for rank in range(4):
        (work / "src" / f"rank_{rank}").mkdir(parents=True)
        pieces = {}
        for name, (tensor_map, _) in TENSORS.items():
            b = box(ParamLayout((4,), tuple(() if k == -1 else (k,) for k in tensor_map)), (side, side), rank)
            pieces[name] = full[name][tuple(slice(o, o + n) for o, n in zip(b.offsets, b.lengths))]
        pieces["global_step"] = np.array(1000, np.int32)
        mindspore_ckpt.save(work / "src" / f"rank_{rank}" / f"net_rank_{rank}-1_1000.ckpt", pieces)
    print(f"source: 4 ranks, {len(TENSORS)} tensors of {side}x{side} fp32, "
          f"{sum(a.nbytes for a in full.values()) / 2**20:.0f} MiB")
    return work / "src", src, dst


def child(which: str, src: str, out: str, src_strategy: str, dst_strategy: str, workers: int) -> None:
    """One transform in this fresh process; prints its figures as JSON."""
    sys.path.insert(0, str(ROOT))
    if which == "ours":
        from ckpt_hooks.mindspore.transform import transform_checkpoints

        def call():
            transform_checkpoints(src, out, src_strategy, dst_strategy, process_num=workers, quiet=True)
    else:
        import mindspore as ms

        def call():
            ms.transform_checkpoints(src, out, "checkpoint_", src_strategy, dst_strategy, process_num=workers)
    before = status_kib("VmRSS")
    anon_peak, done = [status_kib("RssAnon")], threading.Event()

    def sample_anonymous():  # RSS counts the mapped source files too; this is the memory allocated
        while not done.wait(0.005):
            anon_peak[0] = max(anon_peak[0], status_kib("RssAnon"))

    sampler = threading.Thread(target=sample_anonymous)
    sampler.start()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({"seconds": seconds, "peak_kib": peak, "before_kib": before, "anon_peak_kib": anon_peak[0]}))


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(which: str, src: Path, out: Path, strategies: tuple[Path, Path], workers: int) -> dict:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--child", which, str(src), str(out), *map(str, strategies),
                             str(workers)], capture_output=True, text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["process_seconds"] = time.perf_counter() - start
    return figures


def same_trees(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and \
        all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    parser.add_argument("--mib", type=int, default=1024, help="size of the checkpoint")
    parser.add_argument("--workers", type=int, default=1, help="target files at a time (both tools' process_num)")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        which, *paths, workers = args.child
        child(which, *paths, int(workers))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench_ms_transform.") as work:
        work = Path(work)
        src, *strategies = make_source(work, args.mib)
        results = {}
        for which in ("mindspore", "ours"):
            results[which] = measure(which, src, work / which, strategies, args.workers)
            r = results[which]
            print(f"{which:9}: call {r['seconds']:.2f} s (process {r['process_seconds']:.2f} s), peak RSS "
                  f"{r['peak_kib'] / 2**10:.0f} MiB ({(r['peak_kib'] - r['before_kib']) / 2**10:.0f} MiB above "
                  f"the {r['before_kib'] / 2**10:.0f} MiB before the call; anonymous memory at most "
                  f"{r['anon_peak_kib'] / 2**10:.0f} MiB, sampled)")
        assert same_trees(work / "ours", work / "mindspore"), "outputs differ"
        shutil.rmtree(work / "mindspore")
        ours, theirs = results["ours"], results["mindspore"]
        print(f"outputs byte-identical; ours / mindspore: call time {ours['seconds'] / theirs['seconds']:.2f}, "
              f"process time {ours['process_seconds'] / theirs['process_seconds']:.2f}, "
              f"peak RSS {ours['peak_kib'] / theirs['peak_kib']:.2f}, above the start "
              f"{(ours['peak_kib'] - ours['before_kib']) / (theirs['peak_kib'] - theirs['before_kib']):.2f}, "
              f"anonymous {ours['anon_peak_kib'] / theirs['anon_peak_kib']:.2f}")


if __name__ == "__main__":
    main()
