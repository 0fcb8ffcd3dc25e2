"""A Megatron legacy checkpoint as the engine sees it: rank files opened by the codec
(``formats.megatron_legacy``), a legacy model's (``--use-legacy-models``) nested chunks read under
megatron-core's names (``legacy_names``)."""

from __future__ import annotations

import os

from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import megatron_legacy as legacy
from ckpt_hooks.megatron import legacy_names


def open_checkpoint(load_dir: str | os.PathLike | legacy.LegacyCheckpoint) -> legacy.LegacyCheckpoint:
    """Open a checkpoint with every model chunk under megatron-core's flat names; one already
    open is used as it is (ckpt_hooks.converters.lora hands the converters a merged checkpoint)."""
    if isinstance(load_dir, legacy.LegacyCheckpoint):
        return load_dir
    ckpt = legacy.open_checkpoint(load_dir)
    if len({legacy_names.flatten_file(f) for f in ckpt.files.values()}) > 1:
        raise CheckpointError(ckpt.iter_dir, "some rank files hold a Megatron-LM legacy model, others megatron-core's")
    return ckpt
