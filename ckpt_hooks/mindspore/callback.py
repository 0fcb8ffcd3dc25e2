"""A training callback that writes a manifest beside every checkpoint ``ModelCheckpoint`` writes.

    ckpt = ModelCheckpoint(prefix="CKP", directory=f"ckpts/rank_{rank}", config=config)
    model.train(epochs, dataset, callbacks=[ckpt, CheckpointManifest()])

It must come after the ModelCheckpoint callbacks in the list: at the end of each step (and of
training) it looks at what they wrote in that step (``latest_ckpt_file_name``) and describes
that file from the file's own header, the network's parameters and this rank's place in the job.
No collective communication: each rank describes its own file. Importing this module imports
mindspore; the rest of ckpt_hooks does not need it.
"""

from __future__ import annotations

import os
from pathlib import Path

from mindspore.train import Callback, ModelCheckpoint

from ckpt_hooks.mindspore import manifest
from ckpt_hooks.mindspore.files import open_checkpoint


class CheckpointManifest(Callback):
    """Writes ``<checkpoint file>.manifest.json`` beside each new checkpoint file, atomically,
    and removes the manifests of checkpoints ModelCheckpoint has rotated away."""

    def __init__(self):
        super().__init__()
        self._checkpoints: list[ModelCheckpoint] = []
        self._described: dict[ModelCheckpoint, tuple | None] = {}  # (file, mtime) last described

    def on_train_begin(self, run_context):
        callbacks = run_context.original_args().list_callback
        self._checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
        if not self._checkpoints or max(map(callbacks.index, self._checkpoints)) > callbacks.index(self):
            raise ValueError("CheckpointManifest must follow the ModelCheckpoint callbacks in the list: "
                             "it describes the files they wrote in the same step")
        # Private, but nothing public tells: an asynchronous save is still being written when
        # step_end returns, so there would be no complete file to describe.
        if any(c._config.async_save for c in self._checkpoints):
            raise ValueError("CheckpointManifest does not support CheckpointConfig(async_save=...)")
        self._described = {c: self._stamp(c) for c in self._checkpoints}  # files of an earlier train()

    def on_train_step_end(self, run_context):
        self._describe_new(run_context.original_args())

    def on_train_end(self, run_context):
        self._describe_new(run_context.original_args())

    @staticmethod
    def _stamp(checkpoint: ModelCheckpoint) -> tuple | None:
        path = checkpoint.latest_ckpt_file_name
        return (path, os.stat(path).st_mtime_ns) if path and os.path.isfile(path) else None

    def _describe_new(self, cb_params) -> None:
        for checkpoint in self._checkpoints:
            stamp = self._stamp(checkpoint)
            if stamp is not None and stamp != self._described[checkpoint]:
                self._described[checkpoint] = stamp
                _describe(stamp[0], cb_params)


def _describe(path: str, cb_params) -> None:
    """Write the manifest of the checkpoint ``path`` written in the step that just ended."""
    # The epoch and step as ModelCheckpoint names the file (CKP-<epoch>_<step in epoch>):
    # cur_step_num restarts at 1 when training resumes with initial_epoch.
    step_in_epoch = (cb_params.cur_step_num - 1) % cb_params.batch_num + 1
    epoch = cb_params.cur_epoch_num
    model_params = {p.name for p in cb_params.network.get_parameters()}
    saved = open_checkpoint(path)
    layouts = cb_params.train_network.parameter_layout_dict
    # MindSpore wrote these bytes, with no hook to take their CRC-32s on the way out: they are
    # read back once here, from the map the description is made from, just after the save (the
    # page cache still holds them; ~0.03 s per GB). They vouch for the file as it was then.
    crcs = {name: saved.crc32(name) for name in saved.tensors}
    described = manifest.build(
        saved, layout=manifest.running_layout(), step=(epoch - 1) * cb_params.batch_num + step_in_epoch, epoch=epoch,
        roles={name: "model" if name in model_params else "optimizer" for name in saved.tensors},
        parallel_layouts={name: manifest.parallel_layout(layouts[name]) for name in saved.tensors if name in layouts},
        crcs=crcs)
    manifest.write(described, path)
    _remove_orphans(Path(path).parent)


def _remove_orphans(directory: Path) -> None:
    """Manifests whose checkpoint file is gone (``keep_checkpoint_max`` rotation)."""
    for described in directory.glob(f"*{manifest.SUFFIX}"):
        if not described.with_name(described.name[:-len(manifest.SUFFIX)]).exists():
            described.unlink(missing_ok=True)
