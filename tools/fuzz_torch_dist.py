#!/usr/bin/env python
"""Fuzz the torch_dist readers with mutated copies of a real checkpoint's small files.

Each round copies an iteration directory, mutates one of ``.metadata``, ``common.pt``,
``metadata.json`` (bytes replaced, cut out or inserted) and reads it as ``convert`` and the load
hook do (index, common state, weights, optimizer). Anything but the project's one-line
CheckpointError is a bug, reported with its traceback.

    python tools/fuzz_torch_dist.py ITER_DIR [--rounds 1000000] [--seed 0]

(The test suite runs a few hundred rounds.)
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckpt_hooks.errors import CheckpointError  # noqa: E402
from ckpt_hooks.megatron.checkpoint import read_source  # noqa: E402
from ckpt_hooks.megatron.optimizer import source_optimizer  # noqa: E402

TARGETS = (".metadata", "common.pt", "metadata.json")


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(max(1, len(out)))
        kind = rng.random()
        if kind < 0.6 and out:
            out[at] = rng.randrange(256)
        elif kind < 0.8:
            del out[at:at + rng.randint(1, 16)]
        else:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(out)


def fuzz(iter_dir: Path, rounds: int, seed: int = 0) -> dict[str, str]:
    """{kind of failure: traceback} of every exception other than CheckpointError."""
    rng, bugs = random.Random(seed), {}
    with tempfile.TemporaryDirectory(prefix="ckpt-hooks-fuzz-") as scratch:
        copy = Path(scratch) / iter_dir.name
        shutil.copytree(iter_dir, copy)
        originals = {name: (copy / name).read_bytes() for name in TARGETS}
        for _ in range(rounds):
            name = rng.choice(TARGETS)
            (copy / name).write_bytes(mutate(originals[name], rng))
            try:
                source_optimizer(read_source(copy))
            except CheckpointError:
                pass
            except Exception as e:  # noqa: BLE001 — what the fuzzer looks for
                bugs.setdefault(f"{name}: {type(e).__name__}: {str(e)[:120]}", traceback.format_exc())
            (copy / name).write_bytes(originals[name])
    return bugs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("iter_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    bugs = fuzz(options.iter_dir, options.rounds, options.seed)
    for kind, trace in bugs.items():
        print(f"== {kind}\n{trace}")
    print(f"{len(bugs)} kinds of failure other than CheckpointError in {options.rounds} rounds")
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
