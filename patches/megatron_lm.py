"""``ckpt_hooks.patches.megatron_lm``: hooks in Megatron-LM's trainer (``megatron.training``).

``install()`` wraps ``megatron.training.checkpointing.save_checkpoint`` / ``load_checkpoint``
(and the names other ``megatron.*`` modules imported from it) and installs
``ckpt_hooks.patches.megatron_core``; no upstream source is copied.

* save, ``--ckpt-format torch``: Megatron-LM saves as always; the megatron_core patch writes the
  param_maps beside each ``distrib_optim.pt``, and rank 0 then writes the iteration's manifest;
* save, ``--ckpt-format torch_dist``: Megatron-LM saves as always; then each rank records its
  param_map (read from its own optimizer: no communication) under ``iter_N/ckpt_hooks/``, and
  rank 0, after a barrier, the manifest;
* load: a checkpoint saved at another TP / PP / VPP / layer split, in either format, is
  resharded on the fly by ``ckpt_hooks.megatron.load`` (weights, fp32 main params, Adam
  moments, step, scheduler, iteration, consumed samples), each rank reading only its share
  (``--ckpt-step N`` reads iteration N, weights and optimizer alike). Megatron-LM itself refuses
  a TP change and, for a PP change, exits with code 0 having trained nothing (legacy), or
  refuses any TP/PP change of the default ``dp_reshardable`` optimizer state (torch_dist). A
  torch_dist checkpoint is loaded by ckpt_hooks at its own layout too, RNG included, since
  megatron-core 0.16.1's own dp_reshardable load is not exact there (a stale Adam step with
  torch's AdamW); at an unchanged layout of the legacy format (a DP change included)
  Megatron-LM's own load runs, behind the megatron_core checks.
  A bad checkpoint stops every rank with one line ``error: <file>: <cause>`` and exit code 2.

Turn it on for an unmodified ``pretrain_gpt.py`` launch with ``-m``:

    torchrun ... -m ckpt_hooks.patches.megatron_lm pretrain_gpt.py <its usual arguments>

Run against Megatron-LM ``core_v0.16.1`` (with megatron-core 0.16.1).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from ckpt_hooks.formats.megatron_legacy import TRACKER, iteration_dir_name
from ckpt_hooks.patches import rebind

_originals: dict = {}


def install() -> None:
    from megatron.training import checkpointing

    from ckpt_hooks.patches import megatron_core

    if _originals:
        return
    megatron_core.install()
    _originals["save_checkpoint"] = checkpointing.save_checkpoint
    _originals["load_checkpoint"] = checkpointing.load_checkpoint
    rebind("megatron", {_originals["save_checkpoint"]: save_checkpoint, _originals["load_checkpoint"]: load_checkpoint})


def uninstall() -> None:
    from ckpt_hooks.patches import megatron_core

    if not _originals:
        return
    rebind("megatron", {save_checkpoint: _originals.pop("save_checkpoint"), load_checkpoint: _originals.pop("load_checkpoint")})
    megatron_core.uninstall()


def save_checkpoint(iteration, model, optimizer, opt_param_scheduler, *args, **kwargs):
    result = _originals["save_checkpoint"](iteration, model, optimizer, opt_param_scheduler, *args, **kwargs)
    _write_manifest(iteration, kwargs)
    _record_dist_param_maps(iteration, model, optimizer, kwargs)
    return result


def _record_dist_param_maps(iteration, model, optimizer, kwargs) -> None:
    """Beside a torch_dist save, each rank's param_map (what dp_reshardable does not save), then
    rank 0's manifest of the iteration."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.training import get_args

    from ckpt_hooks.megatron.load import running_layout
    from ckpt_hooks.megatron.save import write_manifest_or_warn, write_param_maps
    from ckpt_hooks.megatron.torch_dist import recorded_maps_dir

    args = get_args()
    if args.ckpt_format != "torch_dist" or args.async_save or kwargs.get("non_persistent_ckpt") or \
            not args.use_distributed_optimizer or optimizer is None:
        return
    layout, rank = running_layout(model)
    iter_dir = Path(args.save) / iteration_dir_name(None if kwargs.get("release") else iteration)
    # A file rank's param_map is its first expert-data-parallel replica's (without experts: DP rank 0's).
    write_param_maps(optimizer, recorded_maps_dir(iter_dir, rank, layout), rank,
                     ps.get_data_parallel_rank(with_context_parallel=True), ps.get_expert_data_parallel_rank() == 0)
    torch.distributed.barrier()   # every rank's param_map is written: the manifest lists them
    if torch.distributed.get_rank() == 0:
        write_manifest_or_warn(iter_dir)


def _write_manifest(iteration, kwargs) -> None:
    import torch.distributed as dist
    from megatron.training import get_args

    from ckpt_hooks.megatron.save import write_manifest_or_warn

    args = get_args()
    if args.ckpt_format != "torch" or args.async_save or kwargs.get("non_persistent_ckpt") or dist.get_rank() != 0:
        return
    write_manifest_or_warn(Path(args.save) / iteration_dir_name(None if kwargs.get("release") else iteration))


def load_checkpoint(ddp_model, optimizer, opt_param_scheduler, load_arg="load", strict=True, **kwargs):
    from megatron.training import get_args
    from megatron.training.utils import print_rank_0

    args = get_args()
    load_dir = getattr(args, load_arg, None)
    layouts, error = None, None
    if args.ckpt_format in ("torch", "torch_dist") and load_dir and _has_checkpoint(load_dir):
        if getattr(args, "ckpt_step", None) is not None:
            load_dir = Path(load_dir) / iteration_dir_name(args.ckpt_step)
        layouts, error = _guarded(_layouts, ddp_model, load_dir)
    _stop_if_any_failed(error)
    if layouts is None or (layouts[0] == layouts[1] and not layouts[2]):
        return _originals["load_checkpoint"](ddp_model, optimizer, opt_param_scheduler, load_arg, strict, **kwargs)
    outcome, error = _guarded(_load_resharded, args, load_dir, ddp_model, optimizer, opt_param_scheduler)
    _stop_if_any_failed(error)   # and every rank has loaded: no barrier of its own (a failed rank never meets it)
    iteration, flops, done = outcome
    print_rank_0(done)
    return iteration, flops


def _has_checkpoint(load_dir) -> bool:
    return (Path(load_dir) / TRACKER).is_file()


def _layouts(ddp_model, load_dir):
    """(saved, running) model-parallel sizes (``ParallelConfig.model_parallel``: TP, PP, VPP,
    layer split, EP, ETP; DP being Megatron-LM's business), and whether ckpt_hooks loads it even at the same layout: torch_dist, and experts
    at EP > 1, whose chained optimizers megatron-core 0.16.1 loads without ``torch.no_grad``
    (fp32 params fail). Only the saved args are read."""
    from ckpt_hooks.formats.megatron_legacy import find_iteration_dir, layout_of_args, open_checkpoint
    from ckpt_hooks.formats.torch_dist import is_dist_checkpoint, read_common
    from ckpt_hooks.megatron.load import running_layout

    iter_dir, _ = find_iteration_dir(load_dir)
    dist = is_dist_checkpoint(iter_dir)
    args = read_common(iter_dir).get("args") if dist else open_checkpoint(load_dir).args
    saved = layout_of_args(args, iter_dir)
    running, _ = running_layout(ddp_model)
    return [saved.model_parallel, running.model_parallel, dist or saved.ep > 1]


def _load_resharded(args, load_dir, ddp_model, optimizer, opt_param_scheduler):
    """What Megatron-LM's load_checkpoint does, with ckpt_hooks reading the checkpoint: (iteration,
    floating-point operations so far, the line rank 0 prints once every rank has loaded)."""
    from megatron.core.num_microbatches_calculator import update_num_microbatches
    from megatron.training import checkpointing

    from ckpt_hooks.megatron.load import load

    load_optimizer = not (args.finetune or args.no_load_optim)
    # RNG states are per rank: restored only at the saved layout, as Megatron-LM does.
    loaded = load(ddp_model, optimizer if load_optimizer else None, load_dir,
                  restore_rng=not (args.finetune or args.no_load_rng))
    if not load_optimizer and (args.fp16 or args.bf16) and optimizer is not None:
        optimizer.reload_model_params()  # fp32 main params from the loaded weights
    if load_optimizer and opt_param_scheduler is not None and loaded.scheduler is not None:
        opt_param_scheduler.load_state_dict(loaded.scheduler)
    checkpointing.set_checkpoint_version(3.0)
    iteration = 0 if args.finetune or loaded.iteration is None else loaded.iteration
    if not args.finetune:
        saved = loaded.args
        args.consumed_train_samples = getattr(saved, "consumed_train_samples", 0)
        args.skipped_train_samples = getattr(saved, "skipped_train_samples", 0)
        args.consumed_valid_samples = getattr(saved, "consumed_valid_samples", 0)
        update_num_microbatches(consumed_samples=args.consumed_train_samples, verbose=True)
    done = f"resharded {load_dir} from {loaded.source.describe()} to {loaded.target.describe()}" \
        if loaded.resharded else f"loaded {load_dir} at its own layout {loaded.target.describe()}"
    return iteration, loaded.num_floating_point_operations_so_far, (
        f"ckpt_hooks: {done} at iteration {iteration} (rank 0 read {loaded.bytes_read / 1e6:.1f} MB; "
        f"RNG state {'restored' if loaded.rng_restored else 'not restored: it is per rank'})")


def _guarded(function, *args):
    """(result, None), or (None, the one-line error) for a bad checkpoint or a failed read."""
    from ckpt_hooks.errors import CheckpointError

    try:
        return function(*args), None
    except CheckpointError as e:
        return None, str(e)
    except OSError as e:   # a disk or a network filesystem failing under one rank
        return None, f"{e.filename}: {e.strerror}" if e.filename else f"{type(e).__name__}: {e}"


def _stop_if_any_failed(error: str | None) -> None:
    """Every rank learns whether any rank failed, and then all stop with the lowest failed rank's
    line: none waits in a collective. (A rank killed outright never gets here: torchrun stops the
    others when it sees it die.)"""
    import torch.distributed as dist

    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        # One write of the whole line: the ranks share one stderr, and print's separate write of
        # the newline let two ranks' lines run together.
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), f"error: {first}\n".encode())
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """``python -m ckpt_hooks.patches.megatron_lm SCRIPT [ARGS]``: run a Megatron-LM training
    script (e.g. ``pretrain_gpt.py``) unmodified, with the hooks installed."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit("usage: python -m ckpt_hooks.patches.megatron_lm pretrain_gpt.py [its arguments]")
    script = Path(argv[0]).resolve()
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.parent))  # as `python pretrain_gpt.py` would
    install()
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
