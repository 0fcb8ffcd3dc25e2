"""``ckpt-hooks verify A B``: an equivalence certificate between two checkpoints of one model, at
any layouts: Megatron (legacy ``torch`` or ``torch_dist``), MindSpeed-Core-MS (MindSpore files
with Megatron's names), a Hugging Face model written from either (weights), or two MindSpore
checkpoints, each under its strategy.

Each side is a set of Sources under one naming (``engine.compare.Side``): Megatron's logical
names for Megatron, MindSpeed-Core-MS (the converters' own reader, ``MindSpeedSource``) and
Hugging Face (the converters' name tables); MindSpore's parameter names for MindSpore. Every
logical tensor both hold — weights, fp32 main params, both Adam moments — is compared bit for
bit through the box algebra (``engine.compare``), reading both checkpoints lazily; then the run
state both hold: iteration, the optimizer's param groups (with the Adam step), the scheduler,
the floating-point operations so far (MindSpore: step, epoch, string entries). Vocabulary
tensors are compared on the real vocabulary rows; the padding rows both hold are compared apart
and reported, not counted against equality (a layout with fewer padded rows drops some;
megatron-core initialises them randomly). Each side's readers are imported when that side is
read: a MindSpore certificate does not load torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ckpt_hooks.algebra import names
from ckpt_hooks.algebra.layout import VOCAB, Box
from ckpt_hooks.algebra.spec import ParallelConfig
from ckpt_hooks.engine.compare import Integrity, Outcome, Side, common_box, compare
from ckpt_hooks.engine.source import STATES
from ckpt_hooks.errors import CheckpointError

MEGATRON = "megatron"   # a Side's naming: Megatron's logical names
# Spec fields two checkpoints of one model may differ in: the vocabulary padding (it depends on
# TP), the layer spec (names, splits) and the experts' form (grouped or not).
_LAYOUT_DEPENDENT = {"padded_vocab_size", "make_vocab_size_divisible_by", "transformer_impl", "moe_grouped_gemm"}


def _run_state(iteration, saved: dict) -> dict:
    """The run state compared besides the tensors, from a model file's entries (or pt_meta's)."""
    from ckpt_hooks.megatron.optimizer import chained_param_groups

    # MoE's chained [dense, expert] groups merged as at EP 1: equal across expert layouts
    groups = (chained_param_groups(saved.get("optimizer"), ParallelConfig()) or {}).get("optimizer")
    return {"iteration": iteration, "param_groups": groups, "scheduler": saved.get("opt_param_scheduler"),
            "num_floating_point_operations_so_far": saved.get("num_floating_point_operations_so_far")}


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


def _megatron(path, weights_only: bool) -> Side:
    """A Megatron checkpoint: its weights, and each optimizer state it holds."""
    from ckpt_hooks.megatron.checkpoint import read_source
    from ckpt_hooks.megatron.inspection import holds_optimizer
    from ckpt_hooks.megatron.optimizer import source_optimizer

    src = read_source(path)
    states = {"": src.weights}
    if not weights_only and holds_optimizer(src):
        optimizer = source_optimizer(src)
        states.update({f"{state}:": optimizer.sources[state] for state in STATES})
    return Side(str(path), src.layout.describe(), states, _run_state(src.ckpt.iteration, src.ckpt.first.obj), MEGATRON,
                src.spec, src.ckpt.args)


def _is_mindspeed(path) -> bool:
    """A MindSpeed-Core-MS checkpoint: its root or iteration directory, ``pt_meta`` beside."""
    from ckpt_hooks.converters.mindspeed.files import META_DIR

    path = Path(path)
    return path.is_dir() and any((p / META_DIR).is_dir() for p in (path, path.parent))


def _mindspeed(path, weights_only: bool) -> Side:
    """A MindSpeed-Core-MS checkpoint through the converters' reader, as the Megatron layout its
    pt_meta describes: its fp32 params are the weights (cast to the model's dtype, as
    mindspore-to-megatron writes them) and, with its Adam moments, the optimizer's states."""
    import torch

    from ckpt_hooks.converters.mindspeed.to_megatron import MindSpeedSource

    src = MindSpeedSource(path, with_optimizer=not weights_only and _holds_moments(path))
    states = {"": src.sources["param"]}
    if len(src.sources) > 1:   # the optimizer's states are fp32 whatever the model's dtype
        states.update({f"{state}:": {name: dataclasses.replace(t, dtype=torch.float32) for name, t in source.items()}
                       for state, source in src.sources.items()})
    carried = src.carried(len(src.sources) > 1)
    return Side(str(path), f"MindSpeed-Core-MS {src.layout.describe()}", states,
                _run_state(carried["iteration"], carried), MEGATRON, src.spec, src.meta.obj["args"])


def _holds_moments(path) -> bool:
    """Whether a MindSpeed-Core-MS checkpoint holds Adam moments (``--convert-param-only`` has none)."""
    from ckpt_hooks.formats.megatron_legacy import find_iteration_dir
    from ckpt_hooks.mindspore.files import READERS, open_checkpoint

    iter_dir, _ = find_iteration_dir(path)
    first = next((p for p in sorted(iter_dir.rglob("*")) if p.suffix in READERS), None)
    return first is not None and any(name.startswith("exp_avg.") for name in open_checkpoint(first).tensors)


def _check_same_model(a: Side, b: Side) -> None:
    first, second = dataclasses.asdict(a.spec), dataclasses.asdict(b.spec)
    # A true vocabulary one side does not know (args without vocab_size) contradicts none.
    unknown = {"true_vocab_size"} if None in (first["true_vocab_size"], second["true_vocab_size"]) else set()
    wrong = [f"{k} {first[k]!r} vs {second[k]!r}" for k in first
             if k not in _LAYOUT_DEPENDENT | unknown and first[k] != second.get(k)]
    if wrong:
        raise CheckpointError(b.path, f"a checkpoint of another model than {a.path}: " + ", ".join(wrong))


def check(load_dir, quiet: bool = True) -> Integrity:
    """Check one checkpoint: its manifest (sizes, shapes) and every tensor record's bytes against
    its CRC-32 — the manifest's (written by ckpt_hooks' converters) or the zip directory's
    (``torch.save``: Megatron-LM's own files, torch_dist records); for MindSpore files (and
    MindSpeed-Core-MS's) ``mindspore.verify.check``. Raises CheckpointError, naming the file and
    record, on the first mismatch."""
    from ckpt_hooks.formats.megatron_legacy import OPTIMIZER_FILE
    from ckpt_hooks.formats.torch_dist import crcs_at
    from ckpt_hooks.formats.torch_pickle import TorchFile
    from ckpt_hooks.megatron import manifest
    from ckpt_hooks.megatron.checkpoint import read_source
    from ckpt_hooks.mindspore import verify as ms_verify
    from ckpt_hooks.mindspore.transform import is_mindspore_source

    if is_mindspore_source(load_dir) or _is_mindspeed(load_dir):
        return ms_verify.check(load_dir, quiet)
    src = read_source(load_dir)
    out = Integrity(str(load_dir))
    listed = (manifest.read(src.ckpt.iter_dir) or {"files": {}})["files"]

    def recorded(path) -> dict | None:
        return listed.get(str(Path(path).relative_to(src.ckpt.iter_dir)), {}).get("crc32")
    if src.ckpt_format == "torch_dist":   # each record an archive of its own, listed by its offset
        checkpoint = src.ckpt.dist
        records = {c.record for t in checkpoint.tensors.values() for c in t.chunks} | set(checkpoint.objects.values())
        opened = [(checkpoint.record(r), crcs_at(recorded(checkpoint.iter_dir / r.relative_path), r.offset))
                  for r in sorted(records, key=lambda r: (r.relative_path, r.offset))]
        out.files = len({r.relative_path for r in records})
    else:
        files = list(src.ckpt.files.values())
        files += [TorchFile(Path(f.path).parent / OPTIMIZER_FILE) for f in src.ckpt.files.values()
                  if (Path(f.path).parent / OPTIMIZER_FILE).is_file()]
        opened = [(f, recorded(f.path)) for f in files]
        out.files = len(opened)
    for torch_file, crcs in tqdm(opened, desc="verify", unit="file", disable=quiet, dynamic_ncols=True):
        checked, unchecked = torch_file.check_crcs(crcs)
        out.checked += checked
        out.unchecked += unchecked
    return out


def _is_huggingface(path) -> bool:
    from ckpt_hooks.converters.hf.config import CONFIG
    from ckpt_hooks.formats.megatron_legacy import TRACKER
    from ckpt_hooks.formats.torch_dist import METADATA

    return (Path(path) / CONFIG).is_file() and not any((Path(path) / n).exists() for n in (TRACKER, METADATA))


def _huggingface(path, other: Side) -> Side:
    """A Hugging Face model directory as weights alone, under Megatron's names in the layer spec
    of the other side's args."""
    from ckpt_hooks.converters.hf import config as hf_config
    from ckpt_hooks.converters.hf import names as hf_names
    from ckpt_hooks.converters.hf.files import open_directory
    from ckpt_hooks.converters.hf.to_megatron import external_source, model_entries

    config_path, config, family = hf_config.read(path)
    spec = hf_config.model_spec(config, config_path, family)
    layer_spec = hf_names.LOCAL if getattr(other.args, "transformer_impl", None) == "local" \
        else hf_names.TRANSFORMER_ENGINE
    table = hf_names.TABLES[family]
    entries, extras = model_entries(table, config, spec, layer_spec)
    weights = external_source(open_directory(path), table, entries, spec, config["vocab_size"], path, hf_config.CONFIG,
                              extras)
    return Side(str(path), "Hugging Face", {"": weights}, None, MEGATRON)


def _side(path, strategy, weights_only: bool) -> Side:
    """What ``path`` is, read as a side of a certificate (``strategy``: a MindSpore checkpoint's)."""
    from ckpt_hooks.mindspore import verify as ms_verify
    from ckpt_hooks.mindspore.transform import is_mindspore_source

    if strategy is not None or is_mindspore_source(path):
        return ms_verify.side(path, strategy)
    if _is_mindspeed(path):
        return _mindspeed(path, weights_only)
    return _megatron(path, weights_only)


def verify(first, second, *, weights_only: bool = False, strategies=(None, None), quiet: bool = True) -> Certificate:
    """Compare two checkpoints (see the module's docstring): Megatron or MindSpeed-Core-MS ones, or
    one of those and a Hugging Face model directory (its weights: HF holds no training state), or
    two MindSpore checkpoints, each under its strategy (``strategies``: the first's and the
    second's strategy file or directory; None: one complete checkpoint)."""
    if _is_huggingface(first):
        raise CheckpointError(first, "give the Megatron checkpoint first and the Hugging Face directory second")
    a = _side(first, strategies[0], weights_only)
    if _is_huggingface(second):
        if a.names != MEGATRON:
            raise CheckpointError(second, "a Hugging Face model is compared with a Megatron or MindSpeed-Core-MS "
                                          "checkpoint only")
        b = _huggingface(second, a)
    else:
        b = _side(second, strategies[1], weights_only)
    if a.names != b.names:
        mindspore = a if a.names != MEGATRON else b
        raise CheckpointError(mindspore.path, "a MindSpore checkpoint is compared with another MindSpore checkpoint "
                                              "only (with Megatron's names: MindSpeed-Core-MS's directory, pt_meta "
                                              "beside it)")
    if a.spec is not None and b.spec is not None:
        _check_same_model(a, b)
    return compare_sides(a, b, weights_only, quiet)


def compare_sides(a: Side, b: Side, weights_only: bool = False, quiet: bool = True) -> Certificate:
    """The certificate of two sides of one naming: every tensor both hold, the run state both hold."""
    certificate = Certificate(a.path, b.path, (a.layout, b.layout))
    real_rows = a.spec.true_vocab_size if a.names == MEGATRON and a.spec is not None else None
    for prefix in a.states.keys() | b.states.keys():
        if prefix not in a.states or prefix not in b.states:
            side = certificate.only_first if prefix in a.states else certificate.only_second
            side.append(f"{prefix.rstrip(':') or 'weights'} (all tensors)")
    total = sum(math.prod(t.shape) * t.dtype.itemsize for prefix, source in a.states.items() if prefix in b.states
                for t in source.values() if t.dtype is not None)
    bar = tqdm(total=total, desc="verify", unit="B", unit_scale=True, disable=quiet, dynamic_ncols=True)
    for prefix, source_a in a.states.items():
        source_b = b.states.get(prefix)
        if source_b is None:
            continue
        for name, tensor_a in source_a.items():
            if tensor_a.dtype is None:   # _extra_state: no data to compare
                continue
            bar.update(math.prod(tensor_a.shape) * tensor_a.dtype.itemsize)
            tensor_b = source_b.get(name)
            if tensor_b is None:
                certificate.only_first.append(prefix + name)
                continue
            rule = names.classify(name) if real_rows is not None else None
            vocab = rule is not None and rule.rule.kind == VOCAB
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
    if not certificate.tensors:
        raise CheckpointError(b.path, f"holds no tensor that {a.path} holds (a checkpoint of another model?)")
    for what in [what for what in a.run_state or {} if what in (b.run_state or {})]:
        if what == "param_groups" and weights_only:
            continue
        left, right = a.run_state[what], b.run_state[what]
        certificate.run_state[what] = (left == right, left, right)
    return certificate
