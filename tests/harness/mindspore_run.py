"""Training jobs on a tiny MindSpore network on the CPU, stand-alone or data-parallel (msrun, mccl).

    python tests/harness/mindspore_run.py JOBS.json
    PATH=<this venv's bin>:$PATH msrun --worker_num=2 --local_worker_num=2 --master_port=PORT \\
        --join=True --log_dir=LOGS tests/harness/mindspore_run.py JOBS.json --data-parallel

(msrun starts its workers as ``python SCRIPT``, the first ``python`` on PATH.)

JOBS.json is a list of jobs, run one after the other in one process:

  {"epochs": E, "resume": CKPT or null, "save_dir": DIR or null, "out": DIR}

Each trains a fresh network (seeded: the same initial weights in every job and rank) with Adam
through Model.train, without dataset sink, up to epoch E. An epoch is the same STEPS global
batches of GLOBAL_BATCH samples; a data-parallel rank gets its contiguous share of each global
batch, so both layouts compute the same steps. With "resume", the network and optimizer are first
filled by ckpt_hooks.mindspore.load from CKPT (a file or directory) and training continues from
the epoch it restored. With "save_dir", ModelCheckpoint (prefix CKP, every STEPS // 2 steps,
keeping 1) and CheckpointManifest save into DIR, or DIR/rank_<rank> in data-parallel runs.

Written: OUT/rank_<rank>.json {"losses": [loss of each step on this rank], "loaded": the Loaded
report or null}; with "resume", OUT/restored_rank_<rank>.ckpt, every parameter of the network and
optimizer right after loading (mindspore.save_checkpoint).
"""

import dataclasses
import json
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # so that running by path works

import mindspore as ms  # noqa: E402
import mindspore.dataset as ds  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import nn  # noqa: E402
from mindspore.train import Callback, CheckpointConfig, Model, ModelCheckpoint  # noqa: E402

from ckpt_hooks.mindspore.callback import CheckpointManifest  # noqa: E402
from ckpt_hooks.mindspore.load import load  # noqa: E402

STEPS = 4
GLOBAL_BATCH = 8
FEATURES, OUTPUTS = 8, 4


def network(hidden: int = 16, depth: int = 3) -> nn.SequentialCell:
    """``depth`` Dense layers (parameters fc1.weight, fc1.bias, ...) of width ``hidden``, ReLU between."""
    widths = [FEATURES] + [hidden] * (depth - 1) + [OUTPUTS]
    cells = OrderedDict()
    for i, (a, b) in enumerate(zip(widths, widths[1:]), 1):
        cells[f"fc{i}"] = nn.Dense(a, b)
        if i < depth:
            cells[f"relu{i}"] = nn.ReLU()
    return nn.SequentialCell(cells)


def network_and_optimizer(**net_args):
    ms.set_seed(0)
    net = network(**net_args)
    return net, nn.Adam(net.trainable_params(), learning_rate=1e-2)


def dataset(rank: int, world: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((STEPS * GLOBAL_BATCH, FEATURES)).astype(np.float32)
    y = rng.standard_normal((STEPS * GLOBAL_BATCH, OUTPUTS)).astype(np.float32)
    share = GLOBAL_BATCH // world
    rows = [step * GLOBAL_BATCH + rank * share + i for step in range(STEPS) for i in range(share)]
    return ds.NumpySlicesDataset((x[rows], y[rows]), column_names=["x", "y"], shuffle=False).batch(share)


class LossLog(Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_step_end(self, run_context):
        self.losses.append(float(run_context.original_args().net_outputs.asnumpy()))


def run(job: dict, rank: int, world: int) -> None:
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    net, opt = network_and_optimizer()
    loaded, initial_epoch = None, 0
    if job["resume"]:
        loaded = load(net, job["resume"], optimizer=opt)
        initial_epoch = loaded.epoch
        ms.save_checkpoint({p.name: p for cell in (net, opt) for p in cell.get_parameters()},
                           str(out / f"restored_rank_{rank}.ckpt"))
    log = LossLog()
    callbacks = [log]
    if job["save_dir"]:
        directory = Path(job["save_dir"]) / f"rank_{rank}" if world > 1 else Path(job["save_dir"])
        config = CheckpointConfig(save_checkpoint_steps=STEPS // 2, keep_checkpoint_max=1)
        callbacks += [ModelCheckpoint(prefix="CKP", directory=str(directory), config=config), CheckpointManifest()]
    model = Model(net, loss_fn=nn.MSELoss(), optimizer=opt)
    model.train(job["epochs"], dataset(rank, world), callbacks=callbacks, dataset_sink_mode=False,
                initial_epoch=initial_epoch)
    report = dataclasses.asdict(loaded) if loaded else None
    (out / f"rank_{rank}.json").write_text(json.dumps({"losses": log.losses, "loaded": report}))


def main():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    rank, world = 0, 1
    if "--data-parallel" in sys.argv:
        from mindspore.communication import get_group_size, get_rank, init

        init()
        rank, world = get_rank(), get_group_size()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    for job in json.loads(Path(sys.argv[1]).read_text()):
        run(job, rank, world)


if __name__ == "__main__":
    main()
