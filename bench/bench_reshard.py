"""Resharding benchmark on a ~1 GB checkpoint in Megatron-LM's real legacy layout.

Builds a GQA/SwiGLU GPT checkpoint (local-spec names) at TP2·PP2, then reshards it to
TP4·PP1, TP1·PP1 and TP1·PP2·VPP2 with `ckpt-hooks convert --convert-param-only`, each in its own
process (the command users run). Reports throughput, the ratio to `cp -r` of the same source files measured in
the same run (both warm: source in the page cache), and to `cp -r && sync` (the conversion
fsyncs what it publishes, so that is the like-for-like copy), and each process's peak RSS
against the largest target file, also net of the interpreter's own (Python + torch).

    python bench/bench_reshard.py [--workdir DIR] [--layers 16] [--hidden 1024] [--baseline TREE]
    python bench/bench_reshard.py --optimizer [--layers 8] [--hidden 512]

``--optimizer``: the source is a real megatron-core GPT (the benchmarks' GQA/SwiGLU model, fp32)
trained one step at TP2·PP2 with the DistributedOptimizer under torchrun (gloo, 4 processes)
and saved as Megatron-LM saves it, param_maps recorded by the megatron_core patch; the
conversions carry the fp32 main params and both Adam moments (no ``--convert-param-only``).

``--baseline TREE`` also times another checkout of this project (e.g. the commit before a
change, from ``git worktree`` or ``git archive``) on the same source, interleaved run by run:
before/after in one run. The source is then written by the baseline (whose manifest this tree
reads; a newer one the baseline might not).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path



def make_source_args(layers: int, hidden: int) -> argparse.Namespace:
    import torch

    heads, groups = 16, 4
    return argparse.Namespace(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=hidden * 11 // 4, num_attention_heads=heads,
        num_query_groups=groups, group_query_attention=True, kv_channels=hidden // heads,
        vocab_size=32000, tokenizer_type="HuggingFaceTokenizer", make_vocab_size_divisible_by=128,
        padded_vocab_size=32000, swiglu=True, untie_embeddings_and_output_weights=True, add_bias_linear=False,
        add_qkv_bias=False, position_embedding_type="rope", normalization="RMSNorm",
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        data_parallel_size=4, world_size=4, params_dtype=torch.float32, ckpt_format="torch", seq_length=4096,
        max_position_embeddings=4096)


def write_tp1_checkpoint(root: Path, args) -> None:
    """A TP1·PP1 file with Megatron's local-spec names; random fp32 weights."""
    import torch

    from ckpt_hooks.algebra.spec import ParallelConfig, Rank
    from ckpt_hooks.formats import megatron_legacy as legacy

    h, f, v = args.hidden_size, args.ffn_hidden_size, args.padded_vocab_size
    qkv_rows = (args.num_attention_heads + 2 * args.num_query_groups) * args.kv_channels
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    model = OrderedDict(**{"embedding.word_embeddings.weight": rand(v, h)})
    for i in range(args.num_layers):
        p = f"decoder.layers.{i}."
        model[p + "input_layernorm.weight"] = rand(h)
        model[p + "self_attention.linear_qkv.weight"] = rand(qkv_rows, h)
        model[p + "self_attention.linear_proj.weight"] = rand(h, args.num_attention_heads * args.kv_channels)
        model[p + "pre_mlp_layernorm.weight"] = rand(h)
        model[p + "mlp.linear_fc1.weight"] = rand(2 * f, h)
        model[p + "mlp.linear_fc2.weight"] = rand(h, f)
    model["decoder.final_layernorm.weight"] = rand(h)
    model["output_layer.weight"] = rand(v, h)
    state = {"args": args, "checkpoint_version": 3.0, "iteration": 100, "model": model}
    legacy.save_rank_file(root, 100, Rank(), ParallelConfig(), state)
    legacy.write_tracker(root, 100)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def largest_file(path: Path) -> int:
    return max(p.stat().st_size for p in path.rglob("*.pt"))


def child(command: list[str], tree: str | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and stdout of one child process, started after a sync so
    that every run begins with no dirty pages of an earlier one."""
    subprocess.run(["sync"], check=True)
    started = time.perf_counter()
    # Another tree: first on the path, and the working directory (python -m looks there first).
    env = None if tree is None else {**os.environ, "PYTHONPATH": tree}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                               cwd=tree)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return seconds, usage.ru_maxrss * 1024, out


def convert_command(source: Path, out: Path, tp: int, pp: int, vpp: int, workers: int,
                    optimizer: bool = False) -> list[str]:
    return [sys.executable, "-m", "ckpt_hooks.cli", "convert", "--load-dir", str(source), "--save-dir", str(out),
            "--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp),
            "--workers", str(workers)] + ([] if optimizer else ["--convert-param-only"]) + \
        (["--vpp-size", str(vpp)] if vpp > 1 else [])


def reported_seconds(printed: str) -> float:
    """The conversion's own time, from the CLI's summary line (``... in 1.23 s ...``)."""
    return float(re.search(r" in ([0-9.]+) s ", printed).group(1))


def median(values):
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one, removed afterwards)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; medians are reported")
    parser.add_argument("--baseline", metavar="TREE", help="another checkout of ckpt_hooks to time on the same source")
    parser.add_argument("--optimizer", action="store_true",
                        help="a trained source with the distributed optimizer's state, converted with it")
    parser.add_argument("--make-source", metavar="DIR", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.make_source:  # in a child, so that this process stays small (fork copies its RSS)
        return (make_trained_source if options.optimizer else make_source)(Path(options.make_source), options.layers,
                                                                           options.hidden)
    work = Path(options.workdir or tempfile.mkdtemp(prefix="ckpt-hooks-bench-"))
    try:
        source = work / "tp2pp2"
        baseline_tree = str(Path(options.baseline).resolve()) if options.baseline else None
        # A trained source comes from this tree's test harness; a synthetic one from the baseline's
        # writer (whose manifest this tree reads; a newer one the baseline might not).
        child([sys.executable, str(Path(__file__).resolve()), "--make-source", str(source.resolve()),
               "--layers", str(options.layers), "--hidden", str(options.hidden)]
              + (["--optimizer"] if options.optimizer else []), None if options.optimizer else baseline_tree)
        size = du(source)
        baseline = child([sys.executable, "-c", "import ckpt_hooks.megatron.conversion"])[1]
        print(f"source: TP2·PP2{' with the optimizer state' if options.optimizer else ''}, {size / 1e9:.2f} GB in "
              f"{len(list(source.rglob('*.pt')))} files; median of {options.repeat} runs, warm page cache, "
              "sync before each")
        trees = {"this tree": None}
        if options.baseline:
            trees[f"baseline {options.baseline}"] = baseline_tree
        for tp, pp, vpp in ((4, 1, 1), (1, 1, 1), (1, 2, 2)):
            copies, durable, runs = [], [], {name: [] for name in trees}
            for _ in range(options.repeat):
                copies.append(child(["cp", "-r", str(source), str(work / "copy")])[0])
                shutil.rmtree(work / "copy")
                # The durable yardstick: a conversion fsyncs what it publishes; cp -r alone does not.
                durable.append(child(["sh", "-c", f"cp -r '{source}' '{work / 'copy'}' && sync"])[0])
                shutil.rmtree(work / "copy")
                for name, env in trees.items():
                    out = work / f"tp{tp}pp{pp}vpp{vpp}"
                    wall, rss, printed = child(convert_command(source, out, tp, pp, vpp, options.workers,
                                                               options.optimizer), env)
                    runs[name].append((reported_seconds(printed), wall, rss, largest_file(out)))
                    shutil.rmtree(out)
            copy, synced = median(copies), median(durable)
            for name, measured in runs.items():
                work_s = median([r[0] for r in measured])
                wall = median([r[1] for r in measured])
                rss, biggest = max(r[2] for r in measured), measured[0][3]
                layout = f"TP{tp}·PP{pp}" + (f"·VPP{vpp}" if vpp > 1 else "")
                print(f"-> {layout} ({name}): convert {work_s:5.2f} s = {size / work_s / 1e6:5.0f} MB/s = "
                      f"{copy / work_s:4.2f}x cp -r ({copy:4.2f} s), {synced / work_s:4.2f}x cp -r + sync "
                      f"({synced:4.2f} s); whole process {wall:5.2f} s = "
                      f"{copy / wall:4.2f}x cp; peak RSS {rss / 1e6:5.0f} MB = {rss / biggest:4.2f}x largest target "
                      f"file ({biggest / 1e6:.0f} MB); {(rss - baseline) / 1e6:5.0f} MB above the interpreter with "
                      f"torch ({baseline / 1e6:.0f} MB) = {(rss - baseline) / biggest:4.2f}x")
    finally:
        if not options.workdir:
            shutil.rmtree(work, ignore_errors=True)


def make_source(source: Path, layers: int, hidden: int) -> None:
    tp1 = source.with_name(source.name + "-tp1")
    write_tp1_checkpoint(tp1, make_source_args(layers, hidden))
    # Through the CLI, whose flags do not change between trees (the Python API did).
    subprocess.run([sys.executable, "-m", "ckpt_hooks.cli", "convert", "--load-dir", str(tp1), "--save-dir", str(source),
                    "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                    "--convert-param-only", "--quiet"], check=True)
    shutil.rmtree(tp1)


def make_trained_source(source: Path, layers: int, hidden: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.harness
    from tests.harness import bench_model, run_jobs, train_job

    run_jobs([train_job({"tp": 2, "pp": 2}, source, source.with_name("truth.pt"), bench_model(layers, hidden),
                        steps=1, patches=("megatron_core",))], source.with_name("logs"), timeout=3600)
    source.with_name("truth.pt").unlink()


if __name__ == "__main__":
    main()
