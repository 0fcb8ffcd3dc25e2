"""``ckpt-hooks verify A B``: an equivalence certificate between two Megatron checkpoints, at any
layouts and in either format (legacy ``torch`` or ``torch_dist``), or between a Megatron
checkpoint and the Hugging Face model written from it (weights).

Every logical tensor both hold — weights, fp32 main params, both Adam moments — is compared bit
for bit through the box algebra (``engine.compare``), reading both checkpoints lazily; then the
run state: iteration, the optimizer's param groups (with the Adam step), the scheduler, the
floating-point operations so far. Vocabulary tensors are compared on the real vocabulary rows;
the padding rows both hold are compared apart and reported, not counted against equality (a
layout with fewer padded rows drops some; megatron-core initialises them randomly).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from tqdm import tqdm

from ckpt_hooks.algebra import names
from ckpt_hooks.algebra.layout import VOCAB, Box
from ckpt_hooks.algebra.spec import ParallelConfig
from ckpt_hooks.engine.compare import Outcome, common_box, compare
from ckpt_hooks.engine.source import STATES
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.megatron.checkpoint import MegatronSource, read_source
from ckpt_hooks.megatron.inspection import holds_optimizer
from ckpt_hooks.megatron.optimizer import chained_param_groups, source_optimizer

# The run state compared besides the tensors: (what, how to read it from the source).
_RUN_STATE = {
    "iteration": lambda src: src.ckpt.iteration,
    # MoE's chained [dense, expert] groups merged as at EP 1: equal across expert layouts
    "param_groups": lambda src: (chained_param_groups(src.ckpt.first.obj.get("optimizer"), ParallelConfig())
                                 or {}).get("optimizer"),
    "scheduler": lambda src: src.ckpt.first.obj.get("opt_param_scheduler"),
    "num_floating_point_operations_so_far": lambda src: src.ckpt.first.obj.get("num_floating_point_operations_so_far"),
}
# Spec fields two checkpoints of one model may differ in: the vocabulary padding (it depends on
# TP), the layer spec (names, splits) and the experts' form (grouped or not).
_LAYOUT_DEPENDENT = {"padded_vocab_size", "make_vocab_size_divisible_by", "transformer_impl", "moe_grouped_gemm"}


@dataclass
class Certificate:
    """What ``verify`` found: every compared tensor, what only one side holds, the run state."""

    first: str
    second: str
    layouts: tuple[str, str]
    tensors: list[Outcome] = field(default_factory=list)
    padding: list[Outcome] = field(default_factory=list)       # vocabulary padding rows, apart
    only_first: list[str] = field(default_factory=list)
    only_second: list[str] = field(default_factory=list)
    run_state: dict = field(default_factory=dict)               # what -> (equal, first, second)

    @property
    def equal(self) -> bool:
        return all(t.equal for t in self.tensors) and all(same for same, _, _ in self.run_state.values())

    def to_json(self) -> dict:
        return {"equal": self.equal, "first": self.first, "second": self.second, "layouts": list(self.layouts),
                "tensors": [t.to_json() for t in self.tensors], "padding_rows": [t.to_json() for t in self.padding],
                "only_first": self.only_first, "only_second": self.only_second,
                "run_state": {k: {"equal": same, "first": repr(a), "second": repr(b)}
                              for k, (same, a, b) in self.run_state.items()}}

    def __str__(self) -> str:
        compared = sum(t.compared for t in self.tensors)
        lines = [f"{self.first} ({self.layouts[0]}) vs {self.second} ({self.layouts[1]})"]
        for t in self.tensors:
            if not t.equal:
                found = t.problem or f"{t.differing} of {t.compared} elements, max |d| {t.max_abs:.3g}, " \
                                     f"first at {list(t.first)}"
                lines.append(f"  DIFFERS {t.name}: {found}")
        for what, (same, a, b) in self.run_state.items():
            if not same:
                lines.append(f"  DIFFERS {what}: {a!r} vs {b!r}")
        differing_padding = [t for t in self.padding if not t.equal]
        if differing_padding:
            lines.append(f"  note: vocabulary padding rows differ in {len(differing_padding)} tensors "
                         "(not counted: megatron-core initialises them randomly)")
        for side, only in (("first", self.only_first), ("second", self.only_second)):
            if only:
                lines.append(f"  note: only the {side} holds {len(only)} tensors, e.g. {only[0]}")
        verdict = "EQUAL" if self.equal else "NOT EQUAL"
        state = "not compared (one side holds none)" if not self.run_state else \
            "equal" if all(s for s, _, _ in self.run_state.values()) else "differs"
        lines.append(f"{verdict}: {sum(t.equal for t in self.tensors)} of {len(self.tensors)} tensors "
                     f"({compared:,} elements) bitwise equal; run state {state}")
        return "\n".join(lines)


def _states(src: MegatronSource, weights_only: bool) -> dict:
    """{prefix: Source}: the weights, and each optimizer state the checkpoint holds."""
    out = {"": src.weights}
    if not weights_only and holds_optimizer(src):
        optimizer = source_optimizer(src)
        out.update({f"{state}:": optimizer.sources[state] for state in STATES})
    return out


def _check_same_model(a: MegatronSource, b: MegatronSource) -> None:
    first, second = dataclasses.asdict(a.spec), dataclasses.asdict(b.spec)
    # A true vocabulary one side does not know (args without vocab_size) contradicts none.
    unknown = {"true_vocab_size"} if None in (first["true_vocab_size"], second["true_vocab_size"]) else set()
    wrong = [f"{k} {first[k]!r} vs {second[k]!r}" for k in first
             if k not in _LAYOUT_DEPENDENT | unknown and first[k] != second.get(k)]
    if wrong:
        raise CheckpointError(b.ckpt.first.path, "a checkpoint of another model than "
                                                 f"{a.ckpt.first.path}: " + ", ".join(wrong))


@dataclass
class Integrity:
    """``verify CKPT`` alone: every file's records checked against their CRC-32s."""

    path: str
    files: int = 0
    checked: int = 0      # records whose bytes matched their CRC-32
    unchecked: int = 0    # records with no CRC-32 recorded anywhere

    @property
    def equal(self) -> bool:
        return True   # a mismatch raises, naming the file and the record

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"{self.path}: {self.checked} tensor records in {self.files} files match their CRC-32"
                + (f"; {self.unchecked} have none recorded (not checked)" if self.unchecked else "")
                + "; sizes and shapes match the manifest where there is one")


def check(load_dir, quiet: bool = True) -> Integrity:
    """Check one checkpoint: its manifest (sizes, shapes) and every tensor record's bytes against
    its CRC-32 — the manifest's (written by ckpt_hooks' converters) or the zip directory's
    (``torch.save``: Megatron-LM's own files, torch_dist records). Raises CheckpointError,
    naming the file and record, on the first mismatch."""
    from pathlib import Path

    from ckpt_hooks.formats.megatron_legacy import OPTIMIZER_FILE
    from ckpt_hooks.formats.torch_pickle import TorchFile
    from ckpt_hooks.megatron import manifest

    src = read_source(load_dir)
    out = Integrity(str(load_dir))
    if src.ckpt_format == "torch_dist":
        checkpoint = src.ckpt.dist
        records = {c.record for t in checkpoint.tensors.values() for c in t.chunks} | set(checkpoint.objects.values())
        opened = [checkpoint.record(r) for r in sorted(records, key=lambda r: (r.relative_path, r.offset))]
        out.files = len({r.relative_path for r in records})
    else:
        opened = list(src.ckpt.files.values())
        opened += [TorchFile(Path(f.path).parent / OPTIMIZER_FILE) for f in src.ckpt.files.values()
                   if (Path(f.path).parent / OPTIMIZER_FILE).is_file()]
        out.files = len(opened)
    listed = (manifest.read(src.ckpt.iter_dir) or {"files": {}})["files"]
    for torch_file in tqdm(opened, desc="verify", unit="file", disable=quiet, dynamic_ncols=True):
        relative = str(Path(torch_file.path).relative_to(src.ckpt.iter_dir))
        checked, unchecked = torch_file.check_crcs(listed.get(relative, {}).get("crc32"))
        out.checked += checked
        out.unchecked += unchecked
    return out


@dataclass
class _HuggingFace:
    """A Hugging Face model directory seen as a Megatron source of weights alone, under the
    names of the other side's layer spec."""

    weights: dict
    layout_name: str = "Hugging Face"


def _is_huggingface(path) -> bool:
    from pathlib import Path

    from ckpt_hooks.converters.hf.config import CONFIG
    from ckpt_hooks.formats.megatron_legacy import TRACKER
    from ckpt_hooks.formats.torch_dist import METADATA

    return (Path(path) / CONFIG).is_file() and not any((Path(path) / n).exists() for n in (TRACKER, METADATA))


def _huggingface(path, megatron: MegatronSource) -> _HuggingFace:
    from ckpt_hooks.converters.hf import config as hf_config
    from ckpt_hooks.converters.hf import names as hf_names
    from ckpt_hooks.converters.hf.files import open_directory
    from ckpt_hooks.converters.hf.to_megatron import external_source, model_entries

    config_path, config, family = hf_config.read(path)
    spec = hf_config.model_spec(config, config_path, family)
    layer_spec = hf_names.LOCAL if getattr(megatron.ckpt.args, "transformer_impl", None) == "local" \
        else hf_names.TRANSFORMER_ENGINE
    table = hf_names.TABLES[family]
    entries, extras = model_entries(table, config, spec, layer_spec)
    return _HuggingFace(external_source(open_directory(path), table, entries, spec, config["vocab_size"], path,
                                        hf_config.CONFIG, extras))


def verify(first, second, *, weights_only: bool = False, quiet: bool = True) -> Certificate:
    """Compare two Megatron checkpoints (see the module's docstring), or a Megatron checkpoint and
    a Hugging Face model directory (its weights: HF holds no training state)."""
    if _is_huggingface(first):
        raise CheckpointError(first, "give the Megatron checkpoint first and the Hugging Face directory second")
    a = read_source(first)
    if _is_huggingface(second):
        b, weights_only = _huggingface(second, a), True
    else:
        b = read_source(second)
        _check_same_model(a, b)
    certificate = Certificate(str(first), str(second),
                              (a.layout.describe(), getattr(b, "layout_name", None) or b.layout.describe()))
    real_rows = a.spec.true_vocab_size
    states_a = _states(a, weights_only)
    states_b = {"": b.weights} if isinstance(b, _HuggingFace) else _states(b, weights_only)
    for prefix in states_a.keys() | states_b.keys():
        if prefix not in states_a or prefix not in states_b:
            side = certificate.only_first if prefix in states_a else certificate.only_second
            side.append(f"{prefix.rstrip(':') or 'weights'} (all tensors)")
    total = sum(math.prod(t.shape) * t.dtype.itemsize for prefix, source in states_a.items() if prefix in states_b
                for t in source.values() if t.dtype is not None)
    bar = tqdm(total=total, desc="verify", unit="B", unit_scale=True, disable=quiet, dynamic_ncols=True)
    for prefix, source_a in states_a.items():
        source_b = states_b.get(prefix)
        if source_b is None:
            continue
        for name, tensor_a in source_a.items():
            if tensor_a.dtype is not None:
                bar.update(math.prod(tensor_a.shape) * tensor_a.dtype.itemsize)
            if tensor_a.dtype is None:   # _extra_state: no data to compare
                continue
            tensor_b = source_b.get(name)
            if tensor_b is None:
                certificate.only_first.append(prefix + name)
                continue
            rule = names.classify(name)
            vocab = rule is not None and rule.rule.kind == VOCAB and real_rows is not None
            box = common_box(tensor_a, tensor_b, real_rows if vocab else None)
            certificate.tensors.append(compare(prefix + name, tensor_a, tensor_b, box))
            if vocab:
                padding = common_box(tensor_a, tensor_b)
                if padding is not None and padding.lengths[0] > real_rows:
                    rows = Box((real_rows, *padding.offsets[1:]),
                               (padding.lengths[0] - real_rows, *padding.lengths[1:]))
                    outcome = compare(prefix + name + " [padding rows]", tensor_a, tensor_b, rows)
                    if "does not hold" not in (outcome.problem or ""):   # both hold padding rows
                        certificate.padding.append(outcome)
        certificate.only_second += [prefix + n for n, t in source_b.items()
                                    if n not in source_a and t.dtype is not None]
    bar.close()
    for what, read in _RUN_STATE.items():
        if isinstance(b, _HuggingFace) or (what == "param_groups" and weights_only):
            continue
        left, right = read(a), read(b)
        certificate.run_state[what] = (left == right, left, right)
    return certificate
