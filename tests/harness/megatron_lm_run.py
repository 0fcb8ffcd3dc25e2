"""torchrun entry point: Megatron-LM's own, unmodified ``pretrain_gpt.py`` on the CPU (gloo).

    torchrun --nproc-per-node N tests/harness/megatron_lm_run.py MEGATRON_LM LOSSES.json hooks|plain \\
        pretrain_gpt.py-arguments...

MEGATRON_LM is a Megatron-LM checkout (tag core_v0.16.1 for megatron-core 0.16.1); ``hooks``
launches it through ``ckpt_hooks.patches.megatron_lm`` (as a user would with ``-m``), ``plain``
runs it as is. The last rank writes ``{iteration: lm loss}`` of every step to LOSSES.json.
CKPT_HOOKS_TEST_FAULT=eio:R (or kill:R) makes rank R's first read of a tensor's bytes through
ckpt_hooks fail with EIO (or kill its process): a disk failing, a node lost, during the load.
Test-only: the CPU shims below stand in for CUDA and are never library code.
"""

import contextlib
import errno
import json
import os
import runpy
import signal
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the ckpt_hooks repo
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
os.environ["TORCHDYNAMO_DISABLE"] = "1"  # megatron-core's jit_fuser is torch.compile

import torch  # noqa: E402

from tests.harness import cpu_shim  # noqa: E402


class _Stub:
    """A CUDA object (event, device properties, nvtx) that accepts everything and does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return _Stub()

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __float__(self):
        return 0.0

    def __int__(self):
        return 0


def install_shims() -> None:
    # megatron.training imports megatron-core's batch-invariant Triton kernels (off by default).
    kernels = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    kernels.enable_batch_invariant_mode = kernels.disable_batch_invariant_mode = lambda *a, **k: None
    kernels.set_batch_invariant_mode = lambda *a, **k: contextlib.nullcontext()
    kernels.is_batch_invariant_mode_enabled = lambda: False
    sys.modules[kernels.__name__] = kernels
    cpu_shim.install()
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        name="cpu", major=9, minor=0, total_memory=1 << 34, multi_processor_count=1)
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.Event = _Stub
    torch.cuda.empty_cache = lambda: None
    torch.cuda.nvtx = _Stub()
    torch.cuda.memory_allocated = torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.memory_reserved = torch.cuda.max_memory_reserved = lambda *a, **k: 0
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    torch.cuda.amp = types.SimpleNamespace(autocast=lambda *a, **k: contextlib.nullcontext())

    # pip's megatron.core first: it ships the prebuilt dataset helper that --mock-data needs.
    # megatron-core's torch_dist save starts a spawn-based helper (a multiprocessing Manager),
    # which would re-run pretrain_gpt.py without the shims above: it needs none of __main__.
    import multiprocessing.spawn as spawn

    preparation_data = spawn.get_preparation_data
    spawn.get_preparation_data = lambda name: {k: v for k, v in preparation_data(name).items()
                                               if k not in ("init_main_from_path", "init_main_from_name")}

    import megatron.core.datasets.utils as dataset_utils

    dataset_utils.compile_helpers = lambda: None


def record_losses(path: str) -> None:
    """Wrap Megatron-LM's train_step to keep each step's reduced lm loss (last pipeline stage)."""
    from megatron.training import training

    original, losses = training.train_step, {}

    def train_step(*args, **kwargs):
        result = original(*args, **kwargs)
        iteration = training.get_args().curr_iteration + 1
        if result[0]:
            losses[iteration] = float(result[0]["lm loss"])
            if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
                Path(path).write_text(json.dumps(losses))
        return result

    training.train_step = train_step


def inject_fault(fault: str) -> None:
    """``eio:R`` / ``kill:R``: rank R's reads of tensor bytes fail with EIO / kill the process."""
    how, rank = fault.split(":")
    if os.environ["RANK"] != rank:
        return
    from ckpt_hooks.formats.torch_pickle import TorchFile

    def fail(self, *args, **kwargs):
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.EIO, os.strerror(errno.EIO), self.path)
    TorchFile.read = TorchFile.read_runs = TorchFile.read_scattered = fail   # a tensor's bytes, not the pickle


def main() -> None:
    megatron_lm, losses, mode, *arguments = sys.argv[1:]
    install_shims()
    if os.environ.get("CKPT_HOOKS_TEST_FAULT"):
        inject_fault(os.environ["CKPT_HOOKS_TEST_FAULT"])
    sys.path.append(megatron_lm)  # after site-packages: megatron.training from the checkout
    import megatron.legacy.fused_kernels as fused_kernels

    fused_kernels.load = lambda args: None
    record_losses(losses)
    script = os.path.join(megatron_lm, "pretrain_gpt.py")
    if mode == "hooks":
        from ckpt_hooks.patches import megatron_lm as patch

        patch.main([script, *arguments])
    else:
        sys.argv = [script, *arguments]
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
