"""The package's shape holds: the layout algebra is pure, codecs know no engine, the CLI starts light."""

import subprocess
import sys
from pathlib import Path

import ckpt_hooks

ALGEBRA = sorted(f"ckpt_hooks.algebra.{p.stem}" for p in (Path(ckpt_hooks.__file__).parent / "algebra").glob("*.py")
                 if p.stem != "__init__")


def imported_after(*modules: str) -> set[str]:
    """The modules a fresh interpreter holds after importing ``modules``."""
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_algebra_imports_no_framework_and_no_io():
    loaded = imported_after(*ALGEBRA)
    heavy = {"torch", "numpy", "mindspore", "safetensors", "megatron"} & {m.split(".")[0] for m in loaded}
    assert not heavy, heavy
    engine_or_io = sorted(m for m in loaded if m.startswith(("ckpt_hooks.formats", "ckpt_hooks.engine",
                                                              "ckpt_hooks.megatron", "ckpt_hooks.mindspore")))
    assert not engine_or_io, engine_or_io


def test_codecs_import_no_engine_and_no_model_knowledge():
    codecs = sorted(f"ckpt_hooks.formats.{p.stem}" for p in (Path(ckpt_hooks.__file__).parent / "formats").glob("*.py")
                    if p.stem != "__init__")
    loaded = imported_after(*codecs)
    assert not sorted(m for m in loaded if m.startswith(("ckpt_hooks.engine", "ckpt_hooks.megatron",
                                                         "ckpt_hooks.converters", "ckpt_hooks.algebra.names")))


def test_engine_core_imports_no_torch():
    loaded = imported_after("ckpt_hooks.engine.source", "ckpt_hooks.engine.plan", "ckpt_hooks.engine.execute",
                            "ckpt_hooks.engine.run")
    assert "torch" not in loaded
