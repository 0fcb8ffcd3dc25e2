#!/usr/bin/env python
"""The built-in demo: a real Megatron GPT trained on the CPU, resharded offline and on the fly.

1. megatron-core trains a tiny GPT (GQA, SwiGLU, RMSNorm, RoPE) at TP2·PP2·DP1 under
   torchrun/gloo with the DistributedOptimizer, and `ckpt_hooks.megatron.save` writes a
   Megatron-LM legacy checkpoint after 3 steps, with its manifest and param_maps; the same
   run also goes on uninterrupted;
2. `ckpt_hooks.convert` converts the checkpoint (weights and optimizer state) to TP1·PP1 and
   TP4·PP1, each output is certified equal to the source by `ckpt-hooks verify`'s check, and
   megatron-core loads each at its layout: every weight and Adam moment is compared bit for
   bit with the trained run;
3. the run resumes at TP1·PP2·DP2 and TP4·PP1·DP1 straight from the TP2·PP2 checkpoint with
   `ckpt_hooks.megatron.load`, and its losses are printed beside the uninterrupted run's.

    python tools/demo.py [--workdir DIR]     (./run.sh demo)

It runs from a checkout of the repository (it drives the test harness in tests/harness). The
checkpoints go to a temporary directory, removed at the end, or to --workdir, kept.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.harness

from ckpt_hooks.algebra.target import Target  # noqa: E402
from ckpt_hooks.megatron.conversion import convert  # noqa: E402
from ckpt_hooks.verify import verify  # noqa: E402
from tests.harness import resume_job, run_jobs, train_job  # noqa: E402

MODEL = {"vocab_size": 127}  # pads to 128 rows at TP 1, 2 and 4: the same function at every TP
SOURCE = {"tp": 2, "pp": 2}
CONVERTED = [{"tp": 1, "pp": 1}, {"tp": 4, "pp": 1}]
RESUMED = [{"tp": 1, "pp": 2}, {"tp": 4, "pp": 1}]
SAVED_AT, MORE = 3, 3


def name(layout: dict) -> str:
    return f"TP{layout['tp']}·PP{layout['pp']}·DP{4 // (layout['tp'] * layout['pp'])}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to write and keep the checkpoints (default: a temporary "
                                          "directory, removed at the end)")
    options = parser.parse_args()
    work = Path(options.workdir or tempfile.mkdtemp(prefix="ckpt-hooks-demo-"))
    try:
        return demo(work)
    finally:
        if not options.workdir:
            shutil.rmtree(work, ignore_errors=True)


def demo(work: Path) -> int:
    source, truth = work / "tp2pp2", work / "tp2pp2.truth.pt"
    reference = work / "uninterrupted.truth.pt"

    print(f"[1/3] training a GPT at {name(SOURCE)} on the CPU (torchrun, 4 processes): a checkpoint "
          f"at step {SAVED_AT} (ckpt_hooks.megatron.save), and the same run for {SAVED_AT + MORE} steps uninterrupted...")
    started = time.perf_counter()
    run_jobs([train_job(SOURCE, source, truth, model=MODEL, steps=SAVED_AT, saver="ckpt_hooks"),
              train_job(SOURCE, work / "uninterrupted", reference, model=MODEL, steps=SAVED_AT + MORE)],
             work / "logs")
    print(f"      saved {source} ({time.perf_counter() - started:.0f} s)")

    print("[2/3] converting offline with ckpt_hooks (weights and optimizer state), each output certified...")
    jobs, results, failed = [], {}, 0
    for target in CONVERTED:
        out = work / f"tp{target['tp']}pp{target['pp']}"
        print(f"      {convert(source, out, Target(tp=target['tp'], pp=target['pp']), quiet=True)}")
        certificate = verify(source, out)   # what `ckpt-hooks verify SOURCE OUT` prints last
        failed += not certificate.equal
        print(f"      ckpt-hooks verify: {str(certificate).splitlines()[-1]}")
        results[f"convert {name(target)}"] = work / f"{out.name}.json"
        jobs.append(resume_job(target, out, truth, results[f"convert {name(target)}"], model=MODEL, steps=0))
    for target in RESUMED:
        results[f"resume {name(target)}"] = work / f"resume-tp{target['tp']}pp{target['pp']}.json"
        jobs.append(resume_job(target, source, truth, results[f"resume {name(target)}"], model=MODEL, steps=MORE,
                               loader="ckpt_hooks"))
    print("[3/3] loading into megatron-core at the new layouts, comparing, and resuming training...")
    run_jobs(jobs, work / "logs")

    outcome = {key: json.loads(path.read_text()) for key, path in results.items()}
    for key, r in outcome.items():
        exact = r["ok"] and not r["weight_mismatches"] and not r["optim_mismatches"]
        failed += not exact
        print(f"      {key}: weights and Adam state {'bit-exact' if exact else 'MISMATCH'}"
              + ("" if exact else f" ({r['weight_mismatches'][:3]} {r['optim_mismatches'][:3]} "
                                f"{r['args_mismatches']} {r['load_error']})"))
    losses = torch.load(reference, weights_only=False)["train_losses"]
    resumed = [f"resume {name(t)}" for t in RESUMED]
    print("\n      step  uninterrupted " + name(SOURCE) + "".join(f"  resumed at {k[7:]}" for k in resumed))
    for i in range(SAVED_AT, SAVED_AT + MORE):
        row = "".join(f"  {outcome[k]['losses'][i - SAVED_AT]:>21.7f}" for k in resumed if outcome[k]["losses"])
        print(f"      {i + 1:4d}  {losses[i]:>21.7f}{row}")
    drift = max((abs(outcome[k]["losses"][i] - losses[SAVED_AT + i]) for k in resumed for i in range(MORE)
                 if outcome[k]["losses"]), default=float("inf"))
    failed += not drift <= 1e-5
    print(f"\n      max |loss difference| after resuming at a new layout: {drift:.2e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
