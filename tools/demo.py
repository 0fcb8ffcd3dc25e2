#!/usr/bin/env python
"""The built-in demo: a real Megatron GPT, trained on the CPU, resharded and verified bit-exactly.

1. megatron-core trains a tiny GPT (GQA, SwiGLU, RMSNorm, RoPE) at TP2·PP2 for a few steps
   under torchrun/gloo with the DistributedOptimizer and saves a Megatron-LM legacy checkpoint;
2. ckpt_hooks converts it to TP1·PP1 and TP4·PP1;
3. megatron-core loads each conversion at its layout (strict) and every weight is compared,
   bit for bit, with the trained model; the forward loss on a fixed batch is compared too.

    python tools/demo.py [--workdir DIR]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.harness

from ckpt_hooks.conversion import convert  # noqa: E402
from tests.harness import run_jobs, train_job, verify_job  # noqa: E402

SOURCE = {"tp": 2, "pp": 2}
TARGETS = [{"tp": 1, "pp": 1}, {"tp": 4, "pp": 1}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to keep the checkpoints (default: a temporary directory)")
    parser.add_argument("--steps", type=int, default=5)
    options = parser.parse_args()
    work = Path(options.workdir or tempfile.mkdtemp(prefix="ckpt-hooks-demo-"))
    source, truth = work / "tp2pp2", work / "tp2pp2.truth.pt"

    print(f"[1/3] training a GPT at TP2·PP2 for {options.steps} steps on the CPU (torchrun, 4 processes)...")
    started = time.perf_counter()
    run_jobs([train_job(SOURCE, source, truth, steps=options.steps)], work / "logs")
    print(f"      saved {source} ({time.perf_counter() - started:.0f} s)")

    print("[2/3] converting with ckpt_hooks...")
    jobs, results = [], {}
    for target in TARGETS:
        name = f"tp{target['tp']}pp{target['pp']}"
        report = convert(source, work / name, target_tp=target["tp"], target_pp=target["pp"],
                         convert_param_only=True, quiet=True)
        print(f"      {report}")
        results[name] = work / f"{name}.json"
        jobs.append(verify_job(target, work / name, truth, results[name]))

    print("[3/3] loading each conversion into megatron-core at its layout and comparing...")
    run_jobs(jobs, work / "logs")
    failed = 0
    for name, path in results.items():
        r = json.loads(path.read_text())
        verdict = "bit-exact" if r["ok"] else "MISMATCH"
        failed += not r["ok"]
        print(f"      {name}: {verdict}; forward loss {r['loss']:.6f} (source {r['truth_loss']:.6f})"
              + ("" if r["ok"] else f"; mismatches {r['mismatches']} missing {r['missing']} "
                                    f"load error {r['load_error']}"))
    print(f"checkpoints in {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
