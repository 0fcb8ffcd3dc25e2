"""Resume at a new layout through ckpt_hooks against Megatron's own same-layout loads, both
formats, and the torch_dist save cost the hook spares (dp_reshardable + the param_map hook vs
fully_reshardable).

A real megatron-core GPT (default ~60M parameters, fp32, DistributedOptimizer) trains one step
at TP2·PP2 on the CPU under torchrun (4 processes, gloo) and saves, as Megatron-LM does:

    torch       a legacy checkpoint (model_optim_rng.pt + distrib_optim.pt, param_maps recorded
                by the megatron_core patch)
    torch_dist  `--repeat` saves each, interleaved, of the default dp_reshardable state with the
                ckpt_hooks save hook and of fully_reshardable (--dist-ckpt-optim-fully-reshardable)

Then, each in one launch, `--repeat` loads of:

    torch       same layout: Megatron-LM's load_checkpoint sequence (each rank torch.loads its
                model file; DP rank 0 distrib_optim.pt, scattered) at TP2·PP2 (baseline)
                new layout: ckpt_hooks.megatron.load at TP1·PP2·DP2
    torch_dist  same layout: megatron-core's dist_checkpointing.load of dp_reshardable (baseline)
                new layout: ckpt_hooks.megatron.load of dp_reshardable at TP1·PP2·DP2
                new layout: megatron-core's load of fully_reshardable at TP1·PP2·DP2 (its only way)

Medians of the slowest rank's seconds and the largest rank's peak RSS above its size before
the load, the bytes each rank read, and the ratios the issue asks for. Same machine, same run.

    python bench/bench_load.py [--format torch,torch_dist] [--hidden 512] [--layers 8] [--repeat 3]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.harness

from tests.harness import bench_model, run_jobs, train_job  # noqa: E402

SAVED = {"tp": 2, "pp": 2}
NEW = {"tp": 1, "pp": 2}


def loads_of(ckpt_format: str, ckpts: Path) -> dict:
    """{what: (layout, loader, checkpoint)}, the baseline first, then ckpt_hooks."""
    if ckpt_format == "torch":
        return {"same layout, Megatron-LM's legacy load": (SAVED, "megatron_lm_legacy", ckpts / "legacy"),
                "new layout, ckpt_hooks": (NEW, "ckpt_hooks", ckpts / "legacy")}
    return {"same layout, megatron-core, dp_reshardable": (SAVED, "megatron_core", ckpts / "dpr0"),
            "new layout, ckpt_hooks, dp_reshardable": (NEW, "ckpt_hooks", ckpts / "dpr0"),
            "new layout, megatron-core, fully_reshardable": (NEW, "megatron_core", ckpts / "full0")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="torch,torch_dist", help="torch, torch_dist, or both (comma-separated)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    formats = options.format.split(",")
    with tempfile.TemporaryDirectory(prefix="ckpt-hooks-bench-load-") as work:
        work = Path(work)
        model = bench_model(options.layers, options.hidden)
        ckpts = work / "ckpts"
        jobs = []
        if "torch" in formats:
            jobs.append(train_job(SAVED, ckpts / "legacy", work / "legacy.truth.pt", model, steps=1,
                                  patches=("megatron_core",)))
        if "torch_dist" in formats:
            jobs.append({"kind": "dist_save_timing", "model": model, "layout": SAVED, "repeat": options.repeat,
                         "save_dir": str(ckpts), "result": str(work / "save.json")})
        loads = {(f, name): load for f in formats for name, load in loads_of(f, ckpts).items()}
        for i, (layout, loader, source) in enumerate(loads.values()):
            jobs.append({"kind": "load_timing", "model": model, "layout": layout, "loader": loader,
                         "load_dir": str(source), "repeat": options.repeat, "result": str(work / f"load{i}.json")})
        run_jobs(jobs, work / "logs", timeout=3600)
        results = {key: json.loads((work / f"load{i}.json").read_text()) for i, key in enumerate(loads)}
        sizes = {f: sum(p.stat().st_size for p in (ckpts / ("legacy" if f == "torch" else "dpr0")).rglob("*")
                        if p.is_file()) for f in formats}
        saves = json.loads((work / "save.json").read_text()) if "torch_dist" in formats else None
    print(f"model: {options.layers} layers, hidden {options.hidden}, fp32, DistributedOptimizer; 4 processes; "
          f"medians of {options.repeat}")
    for ckpt_format in formats:
        print(f"{ckpt_format}: checkpoint {sizes[ckpt_format] / 1e6:.0f} MB at TP2·PP2")
        if ckpt_format == "torch_dist":
            save = {kind: statistics.median(t) for kind, t in saves.items()}
            for kind, t in save.items():
                print(f"  save  {kind:<44} {t:7.2f} s")
            print(f"        fully_reshardable / (dp_reshardable + hook) = "
                  f"{save['fully_reshardable'] / save['dp_reshardable+hook']:.2f}x")
        medians = {}
        for (f, name), result in results.items():
            if f != ckpt_format:
                continue
            medians[name] = statistics.median(result["seconds"])
            read = "" if result["bytes_read"][0] is None else \
                "   read per rank " + ", ".join(f"{b / 1e6:.0f}" for b in result["bytes_read"]) + " MB"
            print(f"  load  {name:<44} {medians[name]:7.2f} s   peak RSS "
                  f"+{statistics.median(result['peak_rss']) / 1e6:5.0f} MB{read}")
        baseline, hook, *others = medians.values()
        print(f"        ckpt_hooks at a new layout / the same-layout baseline = {hook / baseline:.2f}x"
              + "".join(f"; / {name} = {hook / medians[name]:.2f}x" for name in list(medians)[2:]))


if __name__ == "__main__":
    main()
