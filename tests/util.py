"""Shared helpers of the tests: run the CLI, fingerprint a tree, check a refusal, compare
loaded checkpoint contents."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ckpt_hooks.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def run_in_process(*argv) -> int:
    """A ``ckpt-hooks`` command line in this process (one process, as without torchrun): its exit code."""
    import argparse

    from ckpt_hooks.cli import COMMANDS, guarded

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name))
    args = parser.parse_args([str(a) for a in argv])
    return guarded(COMMANDS[args.command][2], args)


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def without_manifests(root: Path) -> dict:
    """tree_digest of a MindSpore output less the manifests ckpt_hooks writes beside its files,
    each of which must have one (MindSpore's own output has none)."""
    digest = tree_digest(root)
    manifests = {name for name in digest if name.endswith(".manifest.json")}
    files = {name: value for name, value in digest.items() if name not in manifests}
    assert {name[:-len(".manifest.json")] for name in manifests} == set(files), sorted(digest)
    return files


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


def assert_same(a, b, where="") -> None:
    """Nested checkpoint contents equal: tensors and arrays bitwise (dtype and shape too), dicts
    with the same keys in the same order, Namespaces by their attributes."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


def random_hf_model(config, seed: int):
    """A transformers causal LM from ``config`` (no download) whose every weight is non-trivial:
    norms around 1, the rest small random values, biases included."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.rand_like(param) + 0.5 if "norm" in name else torch.randn_like(param) * 0.1)
    return model
