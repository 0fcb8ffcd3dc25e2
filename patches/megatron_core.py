"""``ckpt_hooks.patches.megatron_core``: hooks in megatron-core's DistributedOptimizer.

``install()`` wraps the parameter-state save/load path (no upstream source is copied):

* ``save_parameter_state(filename)`` also writes the recorded param_map beside the file
  (``param_map.json`` and MindSpeed-Core-MS's ``param_map/*.json``); the file itself is unchanged;
* ``load_parameter_state(filename)`` first checks, on every rank, that the file's buffers fit
  the running optimizer's: buffer sizes always, and bucket boundaries and parameter places
  when a recorded param_map lies beside it. megatron-core checks only the total size, so a
  changed bucket split would otherwise load silently misplaced. It also works around
  megatron-core 0.16.1's load with torch's AdamW (no Apex / Transformer Engine): the shared
  ``step`` tensor ``load_state_dict`` leaves in every parameter's state is taken out during
  the load (else ``KeyError: 'step'``) and put back as one tensor per parameter (a shared one
  is advanced once per parameter: wrong bias correction), and the copy into the fp32 main
  params runs under ``torch.no_grad()``.

``uninstall()`` restores the originals.
"""

from __future__ import annotations

from pathlib import Path

_originals: dict = {}


def install() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if _originals:
        return
    _originals["save"] = DistributedOptimizer.save_parameter_state
    _originals["load"] = DistributedOptimizer.load_parameter_state

    def save_parameter_state(self, filename: str):
        _originals["save"](self, filename)
        _save_param_maps(self, filename)

    def load_parameter_state(self, filename: str, *, update_legacy_format=False):
        import torch

        check_fits(self, filename)
        steps = {param: state.pop("step") for param, state in self.optimizer.state.items() if "step" in state}
        try:
            with torch.no_grad():
                return _originals["load"](self, filename, update_legacy_format=update_legacy_format)
        finally:
            for param, step in steps.items():
                self.optimizer.state[param]["step"] = step.clone() if torch.is_tensor(step) else step

    DistributedOptimizer.save_parameter_state = save_parameter_state
    DistributedOptimizer.load_parameter_state = load_parameter_state


def uninstall() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not _originals:
        return
    DistributedOptimizer.save_parameter_state = _originals.pop("save")
    DistributedOptimizer.load_parameter_state = _originals.pop("load")


def _save_param_maps(optimizer, filename: str) -> None:
    from megatron.core import parallel_state as ps

    from ckpt_hooks.algebra.spec import Rank
    from ckpt_hooks.megatron.save import write_param_maps

    rank = Rank(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
    write_param_maps(optimizer, Path(filename).parent, rank, optimizer.data_parallel_group.rank())


def check_fits(optimizer, filename: str) -> None:
    """Raise CheckpointError (naming the file) unless its buffers fit ``optimizer``'s."""
    from ckpt_hooks.errors import CheckpointError
    from ckpt_hooks.megatron.optimizer import read_recorded_maps
    from ckpt_hooks.formats.torch_pickle import TorchFile
    from ckpt_hooks.megatron.save import record_param_maps

    state = TorchFile(filename).obj  # the pickle only: no tensor bytes are read
    if isinstance(state, dict) and state.get("buckets_coalesced"):
        saved = [next(iter(state[i].values()))["numel_unpadded"] for i in sorted(k for k in state if isinstance(k, int))]
        running = [buffer.numel_unpadded for buffer in optimizer.buffers]
        if saved != running:
            raise CheckpointError(filename, f"buffer sizes {saved} do not fit the running optimizer's {running} "
                                            "(a different model or layout: convert it with ckpt-hooks)")
    live = record_param_maps(optimizer)
    recorded = read_recorded_maps(Path(filename).parent, 1 + max((m.chunk for m in live), default=0))
    if recorded is not None:
        for saved_map, live_map in zip(recorded, live):
            if saved_map.per_bucket_numel_unpadded != live_map.per_bucket_numel_unpadded or \
                    [(s.name, s.start, s.end) for s in saved_map.params] != \
                    [(s.name, s.start, s.end) for s in live_map.params]:
                raise CheckpointError(filename, f"saved with buckets {list(saved_map.per_bucket_numel_unpadded)}, "
                                                f"the running optimizer has {list(live_map.per_bucket_numel_unpadded)} "
                                                f"(chunk {live_map.chunk}): its elements would land misplaced")
