"""Save-time overhead of ckpt_hooks' save hook (ckpt_hooks.patches.megatron_core).

A real megatron-core GPT (default ~60M parameters, TP2·PP2·DP1, fp32, DistributedOptimizer)
trains one step on the CPU under torchrun, then saves Megatron-LM legacy checkpoints
`--repeat` times without and with the hook installed, interleaved. Reports the median save
time of each, the overhead, and the bytes the hook adds.

    python bench/bench_save_hook.py [--hidden 512] [--layers 8] [--repeat 5]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.harness

from tests.harness import run_jobs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-hooks-bench-save-") as work:
        work = Path(work)
        model = {"num_layers": options.layers, "hidden": options.hidden, "heads": 8, "query_groups": 4,
                 "ffn": options.hidden * 11 // 4, "vocab_size": 32000, "make_vocab_size_divisible_by": 128}
        run_jobs([{"kind": "save_timing", "model": model, "layout": {"tp": 2, "pp": 2}, "repeat": options.repeat,
                   "save_dir": str(work / "ckpts"), "result": str(work / "result.json")}], work / "logs", timeout=1800)
        result = json.loads((work / "result.json").read_text())
    plain, hooked = statistics.median(result["plain"]), statistics.median(result["hooked"])
    print(f"save without hook {plain:.3f} s, with hook {hooked:.3f} s (medians of {options.repeat}): "
          f"overhead {100 * (hooked - plain) / plain:+.1f} %; hook files {result['hook_bytes'] / 1e3:.1f} kB "
          f"= {100 * result['hook_bytes'] / result['checkpoint_bytes']:.3f} % of the "
          f"{result['checkpoint_bytes'] / 1e6:.0f} MB checkpoint")


if __name__ == "__main__":
    main()
