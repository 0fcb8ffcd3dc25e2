"""Megatron-LM's legacy-model chunks (``--use-legacy-models``) under megatron-core's names.

A legacy ``model`` / ``model{v}`` entry nests dicts::

    {"language_model": {"embedding": {"word_embeddings": {"weight": T}, ...},
                        "encoder": {"layers.0.input_norm.weight": T, ..., "final_norm.weight": T},
                        "output_layer": {"weight": T}},            # untied
     "word_embeddings_for_head": {"weight": T}}                     # tied, last stage of PP > 1

:func:`flatten` maps it, in its order, onto megatron-core's flat keys (``names.LEGACY_NAMES``),
so the planner, the optimizer path and every converter read it as any other checkpoint;
:func:`nest` turns a converted chunk back into the legacy form the source had.
"""

from __future__ import annotations

import re
from collections import OrderedDict

from ckpt_hooks.algebra import names
from ckpt_hooks.errors import CheckpointError

_SEP = "/"
_FIELDS = {"L": r"(?P<L>\d+)", "P": r"(?P<P>weight|bias)"}
_CHUNK = re.compile(r"model\d*")


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)
    return re.compile("".join(_FIELDS[p] if i % 2 else re.escape(p) for i, p in enumerate(parts)))


# (legacy pattern, megatron-core template, older names?) and the way back
_TO_CORE = [(_pattern(path), core, older) for core, new, old in names.LEGACY_NAMES
            for path, older in ((new, False), (old, True)) if path is not None]
_TO_LEGACY = [(_pattern(core), new, old or new) for core, new, old in names.LEGACY_NAMES
              if new != names.LEGACY_TIED_HEAD]


class LegacyChunk(OrderedDict):
    """A legacy model chunk under megatron-core's keys; ``older``: it used the older norm names."""

    older = False


def is_legacy(chunk) -> bool:
    return isinstance(chunk, dict) and isinstance(chunk.get("language_model"), dict)


def _leaves(obj: dict, prefix: str = ""):
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + _SEP)
        else:
            yield path, value


def flatten(chunk: dict, where) -> LegacyChunk:
    """The chunk under megatron-core's keys. A path no row names keeps its dotted form: the
    planner refuses it as an unsupported tensor, the LoRA reader knows legacy adapter names."""
    out = LegacyChunk()
    for path, value in _leaves(chunk):
        match = next(((m, core, older) for pattern, core, older in _TO_CORE
                      for m in [pattern.fullmatch(path)] if m), None)
        key = path.replace(_SEP, ".") if match is None else match[1].format(**match[0].groupdict())
        if key in out:
            raise CheckpointError(where, f"legacy model holds '{key}' twice (the second as '{path}')")
        out.older |= match is not None and match[2]
        out[key] = value
    return out


def flatten_file(torch_file) -> bool:
    """Replace the legacy model chunks of a ``model_optim_rng.pt`` opened lazily by their flat
    form; whether it held any."""
    obj = torch_file.obj
    if not isinstance(obj, dict):
        return False
    chunks = [k for k in obj if isinstance(k, str) and _CHUNK.fullmatch(k) and is_legacy(obj[k])]
    for k in chunks:
        obj[k] = flatten(obj[k], f"{torch_file.path}: {k}")
    return bool(chunks)


def source_form(obj: dict) -> LegacyChunk | None:
    """The legacy chunk of a (flattened) model file, or None when it holds megatron-core's names."""
    return next((v for v in obj.values() if isinstance(v, LegacyChunk)), None)


def _path(key: str, older: bool, tied: bool) -> str:
    if key == names.OUTPUT and tied:
        return names.LEGACY_TIED_HEAD
    for pattern, new, old in _TO_LEGACY:
        match = pattern.fullmatch(key)
        if match:
            return (old if older else new).format(**match.groupdict())
    raise CheckpointError(key, "has no name in Megatron-LM's legacy model")


def nest(chunk: dict, older: bool, tied: bool) -> OrderedDict:
    """A chunk with megatron-core's keys in the legacy form, its order kept."""
    out: OrderedDict = OrderedDict()
    for key, value in chunk.items():
        *levels, leaf = _path(key, older, tied).split(_SEP)
        node = out
        for level in levels:
            node = node.setdefault(level, OrderedDict())
        node[leaf] = value
    return out


def nest_like(form: LegacyChunk | None, chunks: dict, tied: bool) -> dict:
    """{chunk: entries} in the form of the source: nested when it was a legacy model."""
    if form is None:
        return chunks
    return OrderedDict((chunk, nest(entries, form.older, tied)) for chunk, entries in chunks.items())
