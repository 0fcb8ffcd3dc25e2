"""Shared helpers of the tests: run the CLI, fingerprint a tree, check a refusal."""

import hashlib
import subprocess
import sys
from pathlib import Path


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ckpt_hooks.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(ckpt: Path, save_dir: Path, *flags, names: Path, says: str, optimizer: bool = False):
    """`convert` fails with one line naming ``names``, writes nothing and leaves ``ckpt`` as it was."""
    before = tree_digest(ckpt)
    mode = [] if optimizer else ["--convert-param-only"]
    result = cli("convert", "--load-dir", ckpt, "--save-dir", save_dir, *mode, "--quiet", *flags)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {names}"), lines[0]
    assert says in lines[0], lines[0]
    assert not save_dir.exists() or not any(save_dir.iterdir())
    assert not any(p.name.startswith(f".{save_dir.name}.partial") for p in save_dir.parent.iterdir())
    assert tree_digest(ckpt) == before
