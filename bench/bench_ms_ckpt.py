"""MindSpore .ckpt: our pure-Python writer and reader against mindspore's own, on a file with a
tensor over 512 MiB (which save_checkpoint splits into several records with one tag).

Checks our files are byte-identical to ``mindspore.save_checkpoint`` (with and without CRC),
that we read its files (also the differently split ones of ``async_save``) bit for bit, and
prints the best of ``--repeat`` times and their ratios (ours / mindspore's; below 1 is
faster). Files lie in /dev/shm by default, so that the times are the formats' own work rather
than the disk's.

    python bench/bench_ms_ckpt.py [--workdir DIR] [--mib 600] [--repeat 3]
"""

from __future__ import annotations

import argparse
import filecmp
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn, repeat: int = 1):
    """fn's result and its best time over ``repeat`` runs."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def content(mib: int) -> dict:
    from ckpt_hooks.formats.mindspore_ckpt import BF16

    rng = np.random.default_rng(0)
    rows = mib * 1024 * 1024 // (4 * 4096)
    return {"big.weight": rng.standard_normal((rows, 4096), dtype=np.float32),
            "bf16.weight": (rng.standard_normal((2048, 4096), dtype=np.float32).view(np.uint32) >> 16)
            .astype(np.uint16).view(BF16),
            "norm.weight": np.ones(4096, np.float16),
            "step": np.array(1000, np.int64),
            "note": "bench"}


def to_mindspore(items: dict) -> dict:
    import mindspore as ms

    from ckpt_hooks.formats.mindspore_ckpt import BF16

    out = {}
    for name, value in items.items():
        if isinstance(value, str):
            out[name] = value
        elif value.dtype == BF16:  # cast by MindSpore, exactly, from float32 whose high halves are the bits
            as_float = (value.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            out[name] = ms.Parameter(ms.Tensor(as_float, ms.bfloat16), name=name)
        else:
            out[name] = ms.Parameter(ms.Tensor(value), name=name)
    return out


def read_all_ours(path: Path) -> dict:
    from ckpt_hooks.formats.mindspore_ckpt import CkptFile

    f = CkptFile(path, check_crc=True)
    arrays = {name: f.read(name) for name in f.names}
    # Private copies, as a loader makes (a split tensor is read as one already).
    return {name: a if a.flags.writeable else a.copy() for name, a in arrays.items()}


def check_equal(ours: dict, theirs: dict, items: dict) -> None:
    assert set(ours) == set(items) - {"note"} and theirs["note"] == "bench"
    for name, array in ours.items():
        assert array.tobytes() == theirs[name].asnumpy().tobytes() == items[name].tobytes(), name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    parser.add_argument("--mib", type=int, default=600, help="size of the big fp32 tensor (over 512 to split)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench_ms_ckpt.") as work:
        run(Path(work), args.mib, args.repeat)


def run(work: Path, mib: int, repeat: int) -> None:
    import mindspore as ms

    from ckpt_hooks.formats import mindspore_ckpt
    from ckpt_hooks.formats.mindspore_ckpt import CkptFile

    items = content(mib)
    params = to_mindspore(items)
    total = sum(v.nbytes for v in items.values() if not isinstance(v, str)) / 2**20
    print(f"content: {total:.0f} MiB in {len(items)} entries")

    for crc in (False, True):
        theirs, ours = work / f"ms_{crc}.ckpt", work / f"ours_{crc}.ckpt"
        _, t_ms = timed(lambda: ms.save_checkpoint(params, str(theirs), crc_check=crc), repeat)
        _, t_us = timed(lambda: mindspore_ckpt.save(ours, items, crc=crc), repeat)
        assert filecmp.cmp(theirs, ours, shallow=False), f"crc={crc}: files differ"
        pieces = len(CkptFile(theirs).tensors["big.weight"].pieces)
        print(f"save crc={crc!s:5}: byte-identical ({pieces} records for big.weight); "
              f"mindspore {t_ms:.2f} s, ours {t_us:.2f} s, ratio {t_us / t_ms:.2f}")

    path = work / "ms_True.ckpt"
    theirs, t_ms = timed(lambda: ms.load_checkpoint(str(path), crc_check=True), repeat)
    ours, t_us = timed(lambda: read_all_ours(path), repeat)
    check_equal(ours, theirs, items)
    print(f"load all, crc checked: bit-identical; mindspore {t_ms:.2f} s, ours {t_us:.2f} s, ratio {t_us / t_ms:.2f}")
    f, t_open = timed(lambda: CkptFile(path))
    rows, t_rows = timed(lambda: f.read("big.weight", slice(1000, 1064)).copy())
    assert rows.tobytes() == items["big.weight"][1000:1064].tobytes()
    print(f"ours, lazily: open and list {t_open * 1e3:.1f} ms; 64 rows of big.weight {t_rows * 1e3:.1f} ms")

    # async_save hands save_checkpoint NumPy arrays, which it splits by rows (np.array_split)
    # instead of every 512 MiB of bytes: a different file our reader must read all the same.
    split = work / "ms_async.ckpt"
    ms.save_checkpoint(params, str(split), async_save="thread")
    while ms.async_ckpt_thread_status():
        time.sleep(0.05)
    check_equal(read_all_ours(split), ms.load_checkpoint(str(split)), items)
    print(f"async_save file ({len(CkptFile(split).tensors['big.weight'].pieces)} records for big.weight): "
          "read bit-identical")


if __name__ == "__main__":
    main()
