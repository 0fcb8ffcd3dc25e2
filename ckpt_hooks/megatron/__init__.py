"""Hooks for trainers built on megatron-core: save a self-describing checkpoint, and load one
saved at any layout into the running job's layout."""

from ckpt_hooks.megatron.load import Loaded, load
from ckpt_hooks.megatron.save import save

__all__ = ["Loaded", "load", "save"]
