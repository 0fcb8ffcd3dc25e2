"""``ckpt_hooks.patches.mindformers``: MindFormers' ``auto_trans_ckpt`` load through ckpt_hooks.

``install()`` wraps ``mindformers.trainer.utils.transform_and_load_checkpoint`` — the one
dispatcher MindFormers' trainers (train, evaluate, predict) call to load a checkpoint — and
rebinds the name wherever a loaded ``mindformers`` module imported it; no MindFormers source is
copied. With ``auto_trans_ckpt: True`` MindFormers would first transform the whole checkpoint
into a copy on disk (``transform_checkpoints``, every rank's file of the new strategy) and
then load it; instead ``ckpt_hooks.mindspore.load`` fills the running network and the
optimizer straight from the saved files, each rank reading only what it needs. Everything else
(no ``auto_trans_ckpt``, ``only_save_strategy``, and networks ``load`` cannot fill yet:
semi-/auto-parallel ones) goes to MindFormers' own path. Resume bookkeeping (epoch, step,
loss scale) stays MindFormers' (``load_resume_context_from_checkpoint``), which reads only
those scalars. Tested against MindFormers 1.9.0; 2.0.0's source has the same function and
call sites.

``uninstall()`` restores the original everywhere.
"""

from __future__ import annotations

from ckpt_hooks.patches import rebind

_originals: dict = {}
_NAME = "transform_and_load_checkpoint"
_FILLABLE_MODES = ("stand_alone", "data_parallel")


def install() -> None:
    from mindformers.trainer import utils

    if _originals:
        return
    _originals[_NAME] = getattr(utils, _NAME)
    rebind("mindformers", {_originals[_NAME]: transform_and_load_checkpoint})


def uninstall() -> None:
    if _originals:
        rebind("mindformers", {transform_and_load_checkpoint: _originals.pop(_NAME)})


def transform_and_load_checkpoint(config, model, network, dataset, optimizer=None, do_eval=False, do_predict=False):
    path = load_path(config)
    if not (config.auto_trans_ckpt and path and not config.only_save_strategy and _fillable()):
        return _originals[_NAME](config, model, network, dataset, optimizer=optimizer, do_eval=do_eval,
                                 do_predict=do_predict)
    from ckpt_hooks.mindspore.load import load

    loaded = load(network, path, optimizer=optimizer)
    print(f"ckpt_hooks: loaded {loaded.loaded} parameters from {path} without a transformed copy "
          f"({loaded.bytes_read / 1e6:.1f} MB read on this rank)", flush=True)
    return None


def load_path(config):
    """The checkpoint to load: ``checkpoint.load_path`` (MindFormers 2.x), else ``load_checkpoint``."""
    checkpoint = config.get("checkpoint") or {}
    return checkpoint.get("load_path") or config.get("load_checkpoint")


def _fillable() -> bool:
    import mindspore as ms

    return ms.get_auto_parallel_context("parallel_mode") in _FILLABLE_MODES
