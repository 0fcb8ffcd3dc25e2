#!/usr/bin/env python
"""Fuzz every checkpoint reader through the entry point the commands use.

Each reader has small real seed files (Megatron legacy and torch_dist checkpoints trained by
megatron-core, MindSpore .ckpt/safetensors/strategy files saved by MindSpore, a Hugging Face
directory saved by transformers) and an entry point (what ``convert``, ``inspect``, ``verify``
and the load paths call). Each round mutates one seed file in memory (bytes replaced, deleted
or inserted; JSON values, protobuf varints, zip header fields, pickle opcodes and arguments,
safetensors header numbers), writes it over the seed's copy on a tmpfs and reads it. A bug is:

* any exception other than ``ckpt_hooks.errors.CheckpointError``;
* an input read for longer than ``--seconds-per-input`` (a per-input alarm);
* a large allocation (address space is capped once the seeds are read: a huge allocation is a
  MemoryError, a bug even where a reader turned it into a CheckpointError).

Distinct bugs (reader, file, exception, where raised) are reported with a traceback; the
first input of each is kept under ``--crashes``. Exit status 1 if any.

    python tools/fuzz_readers.py [--reader NAME[,NAME...]|all] [--rounds 1000000] [--seed 0]
                                 [--seconds-per-input 5] [--from SOURCES] [--crashes DIR]

``--from``: a directory of Megatron checkpoints named as tests/conftest.py names them (a pytest
``sources0`` directory: ``saved_tp2pp2``, ``dist_tp2pp2``); without it they are trained here
first with the test harness (torchrun, a few minutes). MindSpore and transformers make the
other seeds. The test suite runs a thousand rounds per reader (tests/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import json
import pickletools
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckpt_hooks.errors import CheckpointError  # noqa: E402
from ckpt_hooks.formats.mindspore_ckpt import _varint_bytes  # noqa: E402

SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
# Room for the readers' own allocations once the seeds were read: real inputs here need a few MB.
ADDRESS_SPACE_HEADROOM = 2 << 30
INTERESTING = (0, 1, -1, 2, 3, 7, 8, 63, 64, 127, 128, 255, 256, 1023, 4096, 65535, 65536, 2**31 - 1, 2**31,
               -2**31, 2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63, -2**63, 2**64 - 1, 2**64, 10**30)


class Timeout(BaseException):
    """Raised by the per-input alarm; a BaseException, so that no reader's ``except Exception`` hides it."""


# ---- mutations ------------------------------------------------------------------------------

def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Bytes replaced, cut out or inserted; an integer field overwritten with an edge value."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(max(1, len(out)))
        kind = rng.random()
        if kind < 0.45 and out:
            out[at] = rng.randrange(256)
        elif kind < 0.6:
            del out[at:at + rng.randint(1, 16)]
        elif kind < 0.75:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(INTERESTING) % (1 << 8 * width)
            out[at:at + width] = value.to_bytes(width, rng.choice(("little", "big")))
    return bytes(out)


def _json_nodes(value, path=()):
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _json_nodes(v, path + (i,))


def _json_value(rng: random.Random, old):
    choice = rng.randrange(10)
    if choice < 3:
        return rng.choice(INTERESTING)
    if choice == 3 and isinstance(old, (int, float)) and not isinstance(old, bool):
        return old + rng.choice((-1, 1, -64, 64, 2**31, -2**40))
    return rng.choice((None, True, False, "", "x" * rng.randint(1, 64), "../x", [], {}, [[0]], {"a": 1}, 1.5,
                       float("nan"), float("inf"), -0.0, [rng.choice(INTERESTING)] * 3, "é\u0000"))


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    """A value replaced, a key dropped or renamed, an entry duplicated; else bytes."""
    try:
        doc = json.loads(data)
    except ValueError:
        return mutate_bytes(data, rng)
    for _ in range(rng.randint(1, 3)):
        nodes = list(_json_nodes(doc))
        path, value = rng.choice(nodes)
        if not path:
            if rng.random() < 0.1:
                doc = _json_value(rng, doc)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        key, kind = path[-1], rng.random()
        if kind < 0.6:
            parent[key] = _json_value(rng, value)
        elif kind < 0.75:
            del parent[key]
        elif kind < 0.85 and isinstance(parent, dict):
            parent[str(key) + rng.choice(("x", ".0", "/shard"))] = parent.pop(key)
        elif isinstance(parent, list):
            parent.insert(key, value)
        else:
            parent[key] = [value, value]
    try:
        return json.dumps(doc, allow_nan=True).encode()
    except (TypeError, ValueError):
        return mutate_bytes(data, rng)


def _varint(value: int) -> bytes:
    return _varint_bytes(value & (1 << 64) - 1)


def protobuf_varints(buf: bytes, start: int = 0, end: int | None = None, depth: int = 0) -> list[tuple[int, int]]:
    """(start, end) of every varint (keys, values, lengths) of the message in buf[start:end],
    descending into length-delimited fields that parse as messages."""
    from ckpt_hooks.formats.protobuf_wire import varint

    end = len(buf) if end is None else end
    found, pos = [], start
    try:
        while pos < end:
            key_at = pos
            key, pos = varint(buf, pos, end)
            found.append((key_at, pos))
            wire = key & 7
            if wire == 0:
                at = pos
                _, pos = varint(buf, pos, end)
                found.append((at, pos))
            elif wire == 2:
                at = pos
                n, pos = varint(buf, pos, end)
                found.append((at, pos))
                if depth < 6 and n < 4096:
                    found += protobuf_varints(buf, pos, min(pos + n, end), depth + 1)
                pos += n
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            else:
                break
    except ValueError:
        pass
    return found


def mutation_protobuf(data: bytes):
    varints = protobuf_varints(data)

    def mutate(data: bytes, rng: random.Random) -> bytes:
        if not varints or rng.random() < 0.3:
            return mutate_bytes(data, rng)
        start, stop = rng.choice(varints)
        old = int.from_bytes(data[start:start + 1], "little") & 0x7F
        value = rng.choice(INTERESTING + (old + 1, old - 1, old + 8))
        return data[:start] + _varint(value) + data[stop:]
    return mutate


def mutation_safetensors(data: bytes):
    """Header numbers (shapes, offsets, the header length) set to edge values, dtypes and names changed."""
    (length,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + length]), data[8 + length:]

    def mutate(data: bytes, rng: random.Random) -> bytes:
        kind = rng.random()
        if kind < 0.2:
            return mutate_bytes(data, rng)
        if kind < 0.3:
            return struct.pack("<Q", rng.choice(INTERESTING) % 2**64) + data[8:]
        doc = json.loads(json.dumps(header))
        names = [n for n in doc if n != "__metadata__"]
        name = rng.choice(names) if names else None
        if name is None or kind < 0.45:
            text = mutate_json(json.dumps(doc).encode(), rng)
        else:
            entry = doc[name]
            what = rng.choice(("shape", "data_offsets", "dtype", "name"))
            if what == "dtype":
                entry["dtype"] = rng.choice(("F32", "BF16", "U8", "BOOL", "F8_E4M3", "I4", 7, None))
            elif what == "name":
                doc[rng.choice(("__metadata__", "", names[0], "x" * 300))] = doc.pop(name)
            elif entry.get(what):
                values = entry[what]
                values[rng.randrange(len(values))] = rng.choice(INTERESTING)
            text = json.dumps(doc).encode()
        return struct.pack("<Q", len(text)) + text + body
    return mutate


@dataclass
class _Record:
    name: str
    data: bytes


def mutation_torch_zip(data: bytes):
    """A torch.save zip: its pickle mutated opcode by opcode (the archive rebuilt around it), or a
    header field (sizes, offsets, name and extra lengths) of the zip set to an edge value."""
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        records = [_Record(info.filename, _stored(data, info)) for info in archive.infolist()]
    pkl = next(r for r in records if r.name.endswith("/data.pkl"))
    ops = [(op.name, arg, pos) for op, arg, pos in pickletools.genops(pkl.data)]
    ends = [pos for _, _, pos in ops[1:]] + [len(pkl.data)]
    # Header fields: (offset within the signature's record, width) of sizes, offsets and lengths.
    fields = {b"PK\x03\x04": ((18, 4), (22, 4), (26, 2), (28, 2)),
              b"PK\x01\x02": ((20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (42, 4)),
              b"PK\x05\x06": ((8, 2), (10, 2), (12, 4), (16, 4), (20, 2)),
              b"PK\x06\x06": ((24, 8), (32, 8), (40, 8), (48, 8)),
              b"PK\x06\x07": ((8, 8),)}
    spots = [(at + offset, width) for signature, widths in fields.items()
             for at in _find_all(data, signature) for offset, width in widths]

    def rebuild(new_pkl: bytes) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
            for r in records:
                archive.writestr(r.name, new_pkl if r is pkl else r.data)
        return out.getvalue()

    def mutate(data: bytes, rng: random.Random) -> bytes:
        kind = rng.random()
        if kind < 0.25 and spots:
            at, width = rng.choice(spots)
            value = rng.choice(INTERESTING) % (1 << 8 * width)
            return data[:at] + value.to_bytes(width, "little") + data[at + width:]
        if kind < 0.35:
            return mutate_bytes(data, rng)
        return rebuild(mutate_pickle(pkl.data, ops, ends, rng))
    return mutate


def _stored(data: bytes, info: zipfile.ZipInfo) -> bytes:
    """A stored record's bytes, from its local header (torch's writer may leave the CRCs 0)."""
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    return data[start:start + info.file_size]


def _find_all(data: bytes, needle: bytes) -> list[int]:
    found, at = [], data.find(needle)
    while at != -1:
        found.append(at)
        at = data.find(needle, at + 1)
    return found


_INT_OPS = {"BININT1": (1, False), "BININT2": (2, False), "BININT": (4, True), "BINPUT": (1, False),
            "LONG_BINPUT": (4, False), "BINGET": (1, False), "LONG_BINGET": (4, False)}


def mutate_pickle(pkl: bytes, ops: list, ends: list, rng: random.Random) -> bytes:
    """One opcode of a pickle changed: its integer argument set to an edge value, its opcode byte
    replaced, the opcode dropped or repeated, a string argument changed; else bytes."""
    i = rng.randrange(len(ops))
    name, arg, pos = ops[i]
    end, kind = ends[i], rng.random()
    if name in _INT_OPS and kind < 0.5:
        width, signed = _INT_OPS[name]
        value = rng.choice(INTERESTING + (arg + 1, arg - 1, arg * 2))
        value = value % (1 << 8 * width)
        if signed and value >= 1 << (8 * width - 1):
            value -= 1 << 8 * width
        return pkl[:pos + 1] + value.to_bytes(width, "little", signed=signed) + pkl[end:]
    if name == "LONG1" and kind < 0.5:   # big ints: shapes and numels past 2**31
        value = rng.choice(INTERESTING)
        raw = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "little", signed=True)
        return pkl[:pos] + b"\x8a" + bytes([len(raw)]) + raw + pkl[end:]
    if isinstance(arg, str) and kind < 0.6:
        text = rng.choice(("", "x", arg + "x", arg[:-1], "9" * 20, "model", "args", "torch", "FloatStorage",
                           "os system", "builtins eval", "../data/0", "data/999"))
        raw = text.encode()
        if name in ("SHORT_BINUNICODE", "SHORT_BINSTRING", "SHORT_BINBYTES"):
            raw = raw[:255]
            return pkl[:pos + 1] + bytes([len(raw)]) + raw + pkl[end:]
        if name in ("BINUNICODE", "BINSTRING", "BINBYTES"):
            return pkl[:pos + 1] + struct.pack("<I", len(raw)) + raw + pkl[end:]
    if kind < 0.75:
        return pkl[:pos] + bytes([rng.choice(_OPCODES)]) + pkl[pos + 1:]
    if kind < 0.85:
        return pkl[:pos] + pkl[end:]
    if kind < 0.9:
        return pkl[:end] + pkl[pos:end] + pkl[end:]
    return mutate_bytes(pkl, rng)


_OPCODES = [op.code.encode("latin-1")[0] for op in pickletools.opcodes]


def mutate_text(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return mutate_bytes(data, rng)
    return rng.choice((b"", b"release", b"-1", b"0", b"99999999999999999999999", b"3\n", b" 3 ", b"\xff\xfe",
                       b"\x00", b"iter_0000003", "٣".encode(), b"1e3", b"0x3", str(rng.choice(INTERESTING)).encode()))


# ---- readers --------------------------------------------------------------------------------

@dataclass
class Reader:
    """A reader's seed (built once into ``seed_dir``), the files of it to mutate (relative path ->
    mutation factory, given the original bytes) and its entry point (given the seed's path)."""

    name: str
    build: Callable[[Path, dict], Path]
    targets: Callable[[Path], dict[str, Callable]]
    read: Callable[[Path], None]


def _megatron_source(sources: dict, name: str) -> Path:
    found = sources.get(name)
    if found is None:
        raise SystemExit(f"no Megatron checkpoint {name!r}: pass --from (a directory holding {name}/), "
                         "or let the tool train one")
    return Path(found)


def _json_targets(paths) -> dict:
    return {p: lambda data: mutate_json for p in paths}


def build_legacy(scratch: Path, sources: dict) -> Path:
    """A one-rank legacy checkpoint converted from Megatron's TP2·PP2 (its manifest, a recorded
    param_map beside each optimizer file, MindSpeed's param_map files)."""
    from ckpt_hooks.algebra.target import Target
    from ckpt_hooks.megatron.checkpoint import read_source
    from ckpt_hooks.megatron.conversion import convert
    from ckpt_hooks.megatron.export import write_mindspeed_maps
    from ckpt_hooks.megatron.optimizer import source_optimizer

    seed = scratch / "legacy"
    convert(_megatron_source(sources, "saved_tp2pp2"), seed, Target(tp=1, pp=1), workers=1, quiet=True)
    src = read_source(seed)
    optimizer = source_optimizer(src)
    for f in src.files:
        Path(f.path).with_name("param_map.json").write_text(json.dumps([m.to_json() for m in optimizer.maps[f.rank]]))
    (seed / "param_map").mkdir()
    write_mindspeed_maps(seed / "param_map", optimizer.maps, src.layout)
    return seed


def _one(seed: Path, pattern: str) -> str:
    return str(next(seed.glob(pattern)).relative_to(seed))


def legacy_targets(seed: Path) -> dict:
    return {"latest_checkpointed_iteration.txt": lambda data: mutate_text,
            _one(seed, "iter_*/mp_rank_*/model_optim_rng.pt"): mutation_torch_zip,
            _one(seed, "iter_*/mp_rank_*/distrib_optim.pt"): mutation_torch_zip,
            **_json_targets([_one(seed, "iter_*/ckpt_hooks_manifest.json"), _one(seed, "iter_*/mp_rank_*/param_map.json"),
                             _one(seed, "param_map/*.json")])}


def read_megatron(seed: Path) -> None:
    """What ``convert`` reads (its plan: weights and optimizer) and every byte it would copy, then
    ``verify CKPT``; MindSpeed's param_map files as megatron-to-mindspore checks them."""
    from ckpt_hooks.converters.mindspeed.files import check_param_maps
    from ckpt_hooks.engine.execute import build_tensor
    from ckpt_hooks.megatron.conversion import plan_megatron
    from ckpt_hooks.verify import check

    planned = plan_megatron(seed)
    for target in [*planned.weights, *(f for files in planned.optimizer_plans.values() for f in files.values())]:
        for tensor in target.tensors:
            if tensor.placement is not None:
                build_tensor(tensor)
    check(seed)
    if (seed / "param_map").is_dir():
        check_param_maps(seed / "param_map", planned.optimizer.maps)


def build_dist(scratch: Path, sources: dict) -> Path:
    """Megatron's own torch_dist TP2·PP2 save, with the param_maps and manifest ckpt_hooks adds."""
    from ckpt_hooks.megatron.checkpoint import read_source, write_manifest
    from ckpt_hooks.megatron.optimizer import source_optimizer
    from ckpt_hooks.megatron.torch_dist import recorded_maps_dir

    seed = scratch / "torch_dist"
    shutil.copytree(_megatron_source(sources, "dist_tp2pp2"), seed)
    src = read_source(seed)
    for rank, maps in source_optimizer(src).maps.items():
        directory = recorded_maps_dir(src.ckpt.iter_dir, rank, src.layout)
        directory.mkdir(parents=True)
        (directory / "param_map.json").write_text(json.dumps([m.to_json() for m in maps]))
    write_manifest(seed)
    return seed


def dist_targets(seed: Path) -> dict:
    return {_one(seed, "iter_*/.metadata"): lambda data: mutate_bytes,
            _one(seed, "iter_*/common.pt"): mutation_torch_zip,
            **_json_targets([_one(seed, "iter_*/metadata.json"), _one(seed, "iter_*/ckpt_hooks_manifest.json"),
                             _one(seed, "iter_*/ckpt_hooks/mp_rank_00_000/param_map.json")])}


def read_dist(seed: Path) -> None:
    """As ``convert`` plans it and ``inspect`` reads it (the records' bytes are not read: each
    round would read megabytes)."""
    from ckpt_hooks.megatron.conversion import plan_megatron

    plan_megatron(seed)


def _mindspore():
    import mindspore as ms   # noqa: F401 — imported once, before the address space is capped
    from mindspore import nn

    class Tiny(nn.Cell):
        def __init__(self):
            super().__init__()
            self.dense = nn.Dense(8, 16)
            self.proj = nn.Dense(16, 8, has_bias=False)

        def construct(self, x):
            return self.proj(self.dense(x))
    return ms, Tiny()


_NETWORK = {}


def build_mindspore(scratch: Path, suffix: str) -> Path:
    """A tiny network's parameters saved by ``mindspore.save_checkpoint`` (with its CRC), and the
    manifest ckpt_hooks' callback writes beside it."""
    from ckpt_hooks.mindspore import manifest
    from ckpt_hooks.mindspore.files import open_checkpoint

    ms, net = _mindspore()
    _NETWORK[suffix] = net
    seed = scratch / f"ms{suffix}"
    seed.mkdir()
    path = seed / f"CKP-1_4{suffix}"
    params = [{"name": p.name, "data": p.data} for p in net.get_parameters()]
    params.append({"name": "global_step", "data": ms.Tensor([4], ms.int32)})
    ms.save_checkpoint(params, str(path), crc_check=True, format=suffix[1:])
    names = {p.name for p in net.get_parameters()}
    saved = open_checkpoint(path)
    manifest.write(manifest.build(saved, layout={"rank": 0, "world_size": 1, "parallel_mode": "stand_alone"},
                                  step=4, epoch=1, roles={n: "model" if n in names else "optimizer" for n in saved.tensors},
                                  parallel_layouts={}), path)
    return seed


def mindspore_targets(seed: Path) -> dict:
    name = next(p.name for p in seed.iterdir() if p.suffix in (".ckpt", ".safetensors"))
    mutation = mutation_protobuf if name.endswith(".ckpt") else mutation_safetensors
    return {name: mutation, **_json_targets([name + ".manifest.json"])}


def read_mindspore(seed: Path) -> None:
    """As ``convert`` reads a complete checkpoint (with its CRC) and every byte it copies, then as
    ``ckpt_hooks.mindspore.load`` loads it into the network (its manifest checked)."""
    from ckpt_hooks.mindspore.load import load
    from ckpt_hooks.mindspore.transform import read_source

    path = next(p for p in seed.iterdir() if p.suffix in (".ckpt", ".safetensors"))
    for tensor in read_source(path, None).tensors.values():
        for handles in tensor.replicas.values():
            for handle in handles:
                handle.view(tuple(slice(0, n) for n in tensor.shape))
    load(_NETWORK[path.suffix], path)


# A strategy: dev_matrix [2], the weights split on one axis each, as MindSpore saves it.
_LAYOUTS = {"dense.weight": [0, -1], "dense.bias": [0], "proj.weight": [-1, 0]}


def build_strategy(scratch: Path, suffix: str) -> Path:
    """A strategy file as MindSpore writes it (node_strategy_pb2; JSON), and the two ranks'
    checkpoint that ``mindspore.transform_checkpoints`` makes for it from a complete one."""
    from mindspore.train import node_strategy_pb2

    ms, net = _mindspore()
    seed = scratch / f"strategy{suffix}"
    (seed / "complete" / "rank_0").mkdir(parents=True)
    ms.save_checkpoint(net, str(seed / "complete" / "rank_0" / "full.ckpt"))
    proto = node_strategy_pb2.ParallelStrategyMap(current_stage=0)
    item = proto.parallel_strategy_item.add(node_name="MatMul-op0")
    item.parallel_strategys.stage = 0
    item.parallel_strategys.parallel_strategy.add(dim=[2, 1])
    for name, tensor_map in _LAYOUTS.items():
        layout = proto.parallel_layout_item.add(param_name=name).parallel_layouts
        layout.dev_matrix.add(dim=[2])
        layout.tensor_map.add(dim=tensor_map)
        layout.param_split_shape.add()
        layout.indices_offset.add()
        layout.field, layout.opt_weight_shard_size, layout.opt_weight_shard_step = 0, 0, 0
    proto_path = seed / "strategy.ckpt"
    proto_path.write_bytes(proto.SerializeToString())
    ms.transform_checkpoints(str(seed / "complete"), str(seed / "ranks"), "checkpoint_", None, str(proto_path))
    shutil.rmtree(seed / "complete")
    if suffix == ".json":
        (seed / "strategy.json").write_text(json.dumps(
            {"current_stage": 0, "parallel_strategy_item": {"MatMul-op0": {"stage": 0, "parallel_strategy": [[2, 1]]}},
             "parallel_layout_item": {name: {"dev_matrix": [2], "tensor_map": tensor_map, "field": 0,
                                             "opt_weight_shard_size": 0, "opt_weight_shard_step": 0}
                                      for name, tensor_map in _LAYOUTS.items()}}))
        proto_path.unlink()
    return seed


def strategy_targets(seed: Path) -> dict:
    name = _one(seed, "strategy.*")
    return {name: mutation_protobuf if name.endswith(".ckpt") else (lambda data: mutate_json)}


def read_strategy_and_source(seed: Path) -> None:
    """As ``convert --src-strategy-path-or-dir S --dst-strategy S`` reads and plans."""
    from ckpt_hooks.formats.mindspore_strategy import read_strategy
    from ckpt_hooks.mindspore.transform import plan_files, read_source

    strategy = read_strategy(next(seed.glob("strategy.*")))
    plan_files(read_source(seed / "ranks", strategy), strategy)


def build_hf(scratch: Path, sources: dict) -> Path:
    """A tiny Llama saved by transformers' ``save_pretrained`` in shards with an index."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
    seed = scratch / "hf"
    LlamaForCausalLM(config).save_pretrained(seed, max_shard_size="4KB")
    return seed


def hf_targets(seed: Path) -> dict:
    shard = sorted(p.name for p in seed.glob("*.safetensors"))[0]
    return {"model.safetensors.index.json": lambda data: mutate_json, shard: mutation_safetensors}


def read_hf(seed: Path) -> None:
    """As ``hf-to-megatron`` and ``verify MEGATRON HF`` open the directory, and every tensor read."""
    import torch

    from ckpt_hooks.converters.hf.files import open_directory

    for stored in open_directory(seed).values():
        out = torch.empty(stored.shape, dtype=stored.dtype)
        stored.piece(slice(None), stored.shape).read_into(tuple(slice(None) for _ in stored.shape), out)


READERS = {r.name: r for r in (
    Reader("legacy", build_legacy, legacy_targets, read_megatron),
    Reader("torch_dist", build_dist, dist_targets, read_dist),
    Reader("mindspore_ckpt", lambda scratch, sources: build_mindspore(scratch, ".ckpt"), mindspore_targets,
           read_mindspore),
    Reader("mindspore_safetensors", lambda scratch, sources: build_mindspore(scratch, ".safetensors"),
           mindspore_targets, read_mindspore),
    Reader("strategy_protobuf", lambda scratch, sources: build_strategy(scratch, ".ckpt"), strategy_targets,
           read_strategy_and_source),
    Reader("strategy_json", lambda scratch, sources: build_strategy(scratch, ".json"), strategy_targets,
           read_strategy_and_source),
    Reader("hf", build_hf, hf_targets, read_hf),
)}
MEGATRON = {"legacy", "torch_dist"}


# ---- the loop -------------------------------------------------------------------------------

@dataclass
class Bug:
    kind: str
    trace: str
    input: bytes
    count: int = 1


@dataclass
class Result:
    rounds: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    bugs: dict[str, Bug] = field(default_factory=dict)
    interrupted: bool = False


def _alarm(signum, frame):
    raise Timeout()


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    frame = next((f for f in reversed(frames) if str(ROOT) in f.filename), frames[-1] if frames else None)
    return f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?"


def _bug(e: BaseException, seconds: float) -> str | None:
    """The kind of bug an outcome is, None if none."""
    if isinstance(e, Timeout):
        return f"Timeout: over {seconds} s at {_where(e)}"
    memory = next((c for c in _chain(e) if isinstance(c, MemoryError)), None)
    if memory is not None:
        return f"MemoryError{'' if memory is e else ' (reported as ' + type(e).__name__ + ')'} at {_where(memory)}"
    if isinstance(e, CheckpointError):
        return None
    return f"{type(e).__name__} at {_where(e)}"


def _outcome(read, path: Path, seconds: float) -> tuple[str | None, str]:
    """What reading ``path`` came to: (the kind of bug, its trace), kind None if none."""
    began = time.perf_counter()
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            read(path)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        late = time.perf_counter() - began
        return (f"Timeout: {late:.1f} s" if late > seconds else None), "(returned late)"
    except BaseException as e:  # noqa: BLE001 — what the fuzzer looks for
        if isinstance(e, KeyboardInterrupt):
            raise
        return _bug(e, seconds), "".join(traceback.format_exception(e))


def build_seeds(names: list[str], scratch: Path, sources: dict) -> dict[str, Path]:
    return {name: READERS[name].build(scratch, sources) for name in names}


def cap_address_space() -> int:
    """Cap this process's address space a little above what it maps now."""
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = size + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return limit


def fuzz(seeds: dict[str, Path], rounds: int, seed: int = 0, seconds: float = 5.0, cap: bool = True,
         progress: Callable[[str, int, float], None] | None = None) -> Result:
    """``rounds`` mutated inputs for each reader of ``seeds`` ({reader: seed path}); each seed
    file is restored after its round."""
    import torch

    torch.set_num_threads(1)
    result = Result()
    plans = {}
    for name, path in seeds.items():
        reader = READERS[name]
        READERS[name].read(path)   # the seed itself reads cleanly (and every module is imported)
        plans[name] = []
        for relative, factory in reader.targets(path).items():
            data = (path / relative).read_bytes()
            plans[name].append((path / relative, data, factory(data)))
    previous = signal.signal(signal.SIGALRM, _alarm)
    limits = resource.getrlimit(resource.RLIMIT_AS)
    if cap:
        cap_address_space()
    try:
        for name, path in seeds.items():
            rng, read = random.Random(f"{seed}:{name}"), READERS[name].read
            started = time.perf_counter()
            result.rounds[name], result.seconds[name] = 0, 0.0
            for n in range(rounds):
                target, original, mutate = rng.choice(plans[name])
                data = mutate(original, rng)
                target.write_bytes(data)
                try:
                    kind, trace = _outcome(read, path, seconds)
                    if kind is not None and kind.startswith("Timeout"):   # a hang is one twice: not a
                        kind, trace = _outcome(read, path, seconds)      # busy machine or a paused run
                finally:
                    target.write_bytes(original)
                if kind is not None:
                    key = f"{name}: {target.name}: {kind}"
                    if key in result.bugs:
                        result.bugs[key].count += 1
                    else:
                        result.bugs[key] = Bug(key, trace, data)
                result.rounds[name], result.seconds[name] = n + 1, time.perf_counter() - started
                if progress is not None and (n + 1) % 1000 == 0:
                    progress(name, n + 1, result.seconds[name])
    except KeyboardInterrupt:   # Ctrl-C or SIGTERM: the report of the rounds done
        result.interrupted = True
    finally:
        signal.signal(signal.SIGALRM, previous)
        if cap:
            resource.setrlimit(resource.RLIMIT_AS, limits)
    return result


def train_sources(scratch: Path) -> dict:
    """Megatron's TP2·PP2 checkpoints (legacy with ckpt_hooks' save, torch_dist by megatron-core),
    trained by the test harness."""
    from tests.harness import run_jobs, train_job

    dirs = {"saved_tp2pp2": scratch / "saved_tp2pp2", "dist_tp2pp2": scratch / "dist_tp2pp2"}
    run_jobs([train_job({"tp": 2, "pp": 2}, dirs["saved_tp2pp2"], scratch / "a.truth.pt", model={"vocab_size": 127},
                        steps=3, saver="ckpt_hooks"),
              train_job({"tp": 2, "pp": 2}, dirs["dist_tp2pp2"], scratch / "b.truth.pt", model={"vocab_size": 127},
                        steps=3, ckpt_format="torch_dist", optim_format="dp_reshardable")], scratch / "logs")
    return dirs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", default="all", help=f"all, or a comma-separated list of: {', '.join(READERS)}")
    parser.add_argument("--rounds", type=int, default=1_000_000, help="mutated inputs per reader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds-per-input", type=float, default=5.0)
    parser.add_argument("--from", dest="sources", type=Path,
                        help="a directory of Megatron checkpoints named as tests/conftest.py names them")
    parser.add_argument("--crashes", type=Path, help="where to keep the first input of each bug")
    options = parser.parse_args()
    names = list(READERS) if options.reader == "all" else options.reader.split(",")
    if set(names) - set(READERS):
        parser.error(f"unknown reader {sorted(set(names) - set(READERS))[0]!r}")
    with tempfile.TemporaryDirectory(prefix="ckpt-hooks-fuzz-", dir=SCRATCH) as scratch:
        scratch = Path(scratch)
        sources = {}
        if MEGATRON & set(names):
            sources = {p.name: p for p in options.sources.iterdir()} if options.sources else \
                train_sources(scratch / "trained")
        seeds = build_seeds(names, scratch, sources)

        def progress(name, n, elapsed):
            if n % 10000 == 0:
                print(f"{name}: {n} rounds, {n / elapsed:.0f}/s", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)   # stopped: report what was done
        result = fuzz(seeds, options.rounds, options.seed, options.seconds_per_input, progress=progress)
    for bug in result.bugs.values():
        print(f"== {bug.kind} ({bug.count} inputs)\n{bug.trace}")
        if options.crashes:
            options.crashes.mkdir(parents=True, exist_ok=True)
            (options.crashes / "".join(c if c.isalnum() or c in "._-" else "_" for c in bug.kind)[:150]).write_bytes(
                bug.input)
    for name, n in result.rounds.items():
        print(f"{name}: {n} rounds in {result.seconds[name]:.0f} s ({n / max(result.seconds[name], 1e-9):.0f}/s)")
    print(f"{len(result.bugs)} distinct bugs" + (" (interrupted)" if result.interrupted else ""))
    return 1 if result.bugs else 0


if __name__ == "__main__":
    sys.exit(main())
