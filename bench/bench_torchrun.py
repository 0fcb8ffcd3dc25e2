"""Conversion spread over processes with torchrun: throughput at 1, 2 and 4 processes, one run.

The ~1 GB TP2·PP2 source of bench_reshard.py is resharded to TP4·PP1 by
`ckpt-hooks convert` alone and by `torchrun --nproc-per-node N -m ckpt_hooks.cli convert`
(each process plans, writes its share of the target files, rank 0 publishes), and written as a
Hugging Face model in 100 MB shards by `megatron-to-hf` the same ways; warm page cache, a sync
before each run; `cp -r` of the same files is the yardstick.

    python bench/bench_torchrun.py [--layers 16] [--hidden 1024] [--repeat 3] [--processes 1,2,4]
                                   [--commands convert,megatron-to-hf]

On this project's 2-core VM more processes than cores only add contention; the point of the
bench is the scaling on a machine (or nodes) with the cores and disks to use them.
"""

import argparse
import shutil
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reshard import child, convert_command, du, median, reported_seconds  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMANDS = {   # name -> (source, out, workers) -> the command line
    "convert": lambda source, out, workers: convert_command(source, out, 4, 1, workers),
    "megatron-to-hf": lambda source, out, workers: [
        sys.executable, "-m", "ckpt_hooks.cli", "megatron-to-hf", "--load-dir", str(source), "--save-dir", str(out),
        "--max-shard-size", "100MB", "--workers", str(workers)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--commands", default="convert,megatron-to-hf")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt-hooks-bench-torchrun-"))
    try:
        source = work / "tp2pp2"
        child([sys.executable, str(Path(__file__).resolve().parent / "bench_reshard.py"), "--make-source",
               str(source), "--layers", str(options.layers), "--hidden", str(options.hidden)])
        size = du(source)
        print(f"source: TP2·PP2, {size / 1e9:.2f} GB; convert: -> TP4·PP1 weights; megatron-to-hf: 100 MB shards; "
              f"medians of {options.repeat}")
        copies = []
        for _ in range(options.repeat):
            copies.append(child(["cp", "-r", str(source), str(work / "copy")])[0])
            shutil.rmtree(work / "copy")
        copy = median(copies)
        for name in options.commands.split(","):
            for n in map(int, options.processes.split(",")):
                runs = []
                for _ in range(options.repeat):
                    out = work / "out"
                    command = COMMANDS[name](source, out, 1 if n > 1 else 2)
                    if n > 1:   # the same CLI, under torchrun
                        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
                                   "--master-addr=127.0.0.1", f"--master-port={free_port()}", *command[1:]]
                    wall, _, printed = child(command)
                    runs.append((reported_seconds(printed), wall))
                    shutil.rmtree(out)
                seconds, wall = median([r[0] for r in runs]), median([r[1] for r in runs])
                print(f"{name}, {n} process{'es' if n > 1 else ''}: {seconds:5.2f} s = {size / seconds / 1e6:5.0f} "
                      f"MB/s = {copy / seconds:4.2f}x cp -r ({copy:.2f} s); whole launch {wall:5.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
