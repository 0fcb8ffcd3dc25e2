"""torch_dist: resume at a new layout through ckpt_hooks against megatron-core's own loads, and
the save cost that the hook spares (dp_reshardable + the param_map hook vs fully_reshardable).

A real megatron-core GPT (default ~60M parameters, fp32, DistributedOptimizer) trains one step
at TP2·PP2 on the CPU under torchrun (4 processes, gloo) and saves torch_dist checkpoints as
Megatron-LM does, `--repeat` times each, interleaved: the default dp_reshardable state with the
ckpt_hooks save hook, and fully_reshardable (--dist-ckpt-optim-fully-reshardable). Then, each
in one launch, `--repeat` loads of:

    same layout   megatron-core's dist_checkpointing.load of dp_reshardable at TP2·PP2 (baseline)
    new layout    ckpt_hooks.megatron.load of dp_reshardable at TP1·PP2·DP2
    new layout    megatron-core's load of fully_reshardable at TP1·PP2·DP2 (its only way)

Medians of the slowest rank's seconds and the largest rank's peak RSS above its size before
the load, and the ratios the issue asks for. Same machine, same run.

    python bench/bench_torch_dist.py [--hidden 512] [--layers 8] [--repeat 3]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.harness

from tests.harness import bench_model, run_jobs  # noqa: E402

SAVED = {"tp": 2, "pp": 2}
NEW = {"tp": 1, "pp": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-hooks-bench-dist-") as work:
        work = Path(work)
        model = bench_model(options.layers, options.hidden)
        ckpts = work / "ckpts"
        loads = {"same layout, megatron-core, dp_reshardable": (SAVED, "megatron_core", "dpr0"),
                 "new layout, ckpt_hooks, dp_reshardable": (NEW, "ckpt_hooks", "dpr0"),
                 "new layout, megatron-core, fully_reshardable": (NEW, "megatron_core", "full0")}
        jobs = [{"kind": "dist_save_timing", "model": model, "layout": SAVED, "repeat": options.repeat,
                 "save_dir": str(ckpts), "result": str(work / "save.json")}]
        for i, (layout, loader, source) in enumerate(loads.values()):
            jobs.append({"kind": "dist_load_timing", "model": model, "layout": layout, "loader": loader,
                         "load_dir": str(ckpts / source), "repeat": options.repeat,
                         "result": str(work / f"load{i}.json")})
        run_jobs(jobs, work / "logs", timeout=3600)
        saves = json.loads((work / "save.json").read_text())
        results = {name: json.loads((work / f"load{i}.json").read_text()) for i, name in enumerate(loads)}
        size = sum(p.stat().st_size for p in (ckpts / "dpr0").rglob("*") if p.is_file())
    print(f"model: {options.layers} layers, hidden {options.hidden}, fp32; checkpoint {size / 1e6:.0f} MB "
          f"(dp_reshardable); 4 processes; medians of {options.repeat}")
    save = {kind: statistics.median(t) for kind, t in saves.items()}
    for kind, t in save.items():
        print(f"save  {kind:<40} {t:7.2f} s")
    ratio = save["fully_reshardable"] / save["dp_reshardable+hook"]
    print(f"      fully_reshardable / (dp_reshardable + hook) = {ratio:.2f}x")
    medians = {}
    for name, result in results.items():
        medians[name] = statistics.median(result["seconds"])
        peak = statistics.median(result["peak_rss"])
        print(f"load  {name:<46} {medians[name]:7.2f} s   peak RSS +{peak / 1e6:6.0f} MB")
    names = list(loads)
    hook = medians[names[1]]
    print(f"      ckpt_hooks at a new layout / megatron-core same layout = {hook / medians[names[0]]:.2f}x; "
          f"/ fully_reshardable at the new layout = {hook / medians[names[2]]:.2f}x")


if __name__ == "__main__":
    main()
