"""Hooks for trainers built on megatron-core: load a checkpoint at the running job's layout."""

from ckpt_hooks.megatron.load import Loaded, load

__all__ = ["Loaded", "load"]
