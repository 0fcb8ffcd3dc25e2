"""Save-time overhead of ckpt_hooks' save hooks.

A real megatron-core GPT (default ~60M parameters, TP2·PP2·DP1, fp32, DistributedOptimizer)
trains one step on the CPU under torchrun, then saves Megatron-LM legacy checkpoints
`--repeat` times each: without hooks, with ckpt_hooks.patches.megatron_core installed
(param_maps), and with ckpt_hooks.megatron.save (param_maps and manifest), interleaved.
Reports the median save time of each and the overheads (end to end, which the disk's noise
dominates, and the hooks' own work timed alone), and the bytes the hooks add.

    python bench/bench_save_hook.py [--hidden 512] [--layers 8] [--repeat 5]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.harness

from tests.harness import bench_model, run_jobs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-hooks-bench-save-") as work:
        work = Path(work)
        model = bench_model(options.layers, options.hidden)
        run_jobs([{"kind": "save_timing", "model": model, "layout": {"tp": 2, "pp": 2}, "repeat": options.repeat,
                   "save_dir": str(work / "ckpts"), "result": str(work / "result.json")}], work / "logs", timeout=1800)
        result = json.loads((work / "result.json").read_text())
    plain = statistics.median(result["plain"])
    for kind, what in (("hooked", "megatron_core patch"), ("library", "ckpt_hooks.megatron.save")):
        median = statistics.median(result[kind])
        print(f"{what}: {median:.3f} s against {plain:.3f} s without hooks (medians of {options.repeat}; "
              f"ranges {min(result[kind]):.3f}-{max(result[kind]):.3f} and "
              f"{min(result['plain']):.3f}-{max(result['plain']):.3f}): overhead {100 * (median - plain) / plain:+.1f} %")
    maps, manifest = statistics.median(result["param_maps"]), statistics.median(result["manifest"])
    print(f"the hooks' own work, timed alone: param_maps {1e3 * maps:.1f} ms + manifest {1e3 * manifest:.1f} ms "
          f"= {100 * (maps + manifest) / plain:.2f} % of a save without hooks")
    print(f"hook files (param_maps, manifest) {result['hook_bytes'] / 1e3:.1f} kB = "
          f"{100 * result['hook_bytes'] / result['checkpoint_bytes']:.3f} % of the "
          f"{result['checkpoint_bytes'] / 1e6:.0f} MB checkpoint")

if __name__ == "__main__":
    main()
