"""ckpt_hooks: make large-model training checkpoints portable across parallel layouts and frameworks."""

from ckpt_hooks.algebra.target import Target
from ckpt_hooks.errors import CheckpointError

__version__ = "0.1.0"
__all__ = ["CheckpointError", "Target", "convert", "describe"]


def __getattr__(name):
    # Keep `import ckpt_hooks` light: torch is imported only when a function is used.
    if name == "convert":
        from ckpt_hooks.megatron.conversion import convert
        return convert
    if name == "describe":
        from ckpt_hooks.megatron.inspection import describe
        return describe
    raise AttributeError(name)
