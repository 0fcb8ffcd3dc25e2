"""Trainer integrations (installed as ``ckpt_hooks.patches``): each module offers install() / uninstall()."""

import sys


def rebind(package: str, replacements: dict) -> None:
    """Replace functions (old -> new) wherever a loaded module of ``package`` holds them under
    their own name: trainers import them by name (``from .checkpointing import save_checkpoint``),
    so patching the defining module alone would miss those copies."""
    for name, module in list(sys.modules.items()):
        if name == package or name.startswith(f"{package}."):
            for old, new in replacements.items():
                if getattr(module, old.__name__, None) is old:
                    setattr(module, old.__name__, new)
