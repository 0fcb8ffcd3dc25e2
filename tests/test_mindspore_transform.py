"""Resharding MindSpore checkpoints between strategies, against MindSpore's own transform_checkpoints.

semi_auto_parallel does not compile on the CPU, so the strategy files are built here with
MindSpore's protobuf classes, and the sharded sources are made by MindSpore's transform from a
complete checkpoint. Our output must then be byte-identical to MindSpore's for the same pair.
"""

import json
import math
import shutil

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from mindspore.parallel._tensor import _load_tensor_shape  # noqa: E402
from mindspore.train import node_strategy_pb2  # noqa: E402

from ckpt_hooks.errors import CheckpointError  # noqa: E402
from ckpt_hooks.formats import ms_safetensors  # noqa: E402
from ckpt_hooks.formats.mindspore_ckpt import CkptFile  # noqa: E402
from ckpt_hooks.formats.protobuf_wire import integers, message  # noqa: E402
from ckpt_hooks.mindspore import transform  # noqa: E402
from ckpt_hooks.verify import verify  # noqa: E402
from ckpt_hooks.mindspore.load import load  # noqa: E402
from ckpt_hooks.mindspore.strategy import ParamLayout, box  # noqa: E402
from tests.util import cli, tree_digest, without_manifests  # noqa: E402

# The tiny model: name -> (shape, dtype). "global_step" is named by no strategy.
MODEL = {"embedding.weight": ((16, 8), np.float32), "dense.weight": ((8, 8), np.float32),
         "dense.bias": ((8,), np.float32), "proj.weight": ((8, 16), "bfloat16"),
         "norm.gamma": ((8,), np.float16), "adam_m.dense.weight": ((8, 8), np.float32),
         "global_step": ((), np.int32)}

# Layouts per strategy: name -> {param: (dev_matrix, tensor_map[, opt_weight_shard_size])}.
LAYOUTS = {
    "col2": {"embedding.weight": ([2], [-1, 0]), "dense.weight": ([2], [0, -1]), "dense.bias": ([2], [0]),
             "proj.weight": ([2], [-1, 0]), "norm.gamma": ([2], [-1]), "adam_m.dense.weight": ([2], [0, -1])},
    "row4": {"embedding.weight": ([4], [0, -1]), "dense.weight": ([4], [-1, 0]), "dense.bias": ([4], [-1]),
             "proj.weight": ([4], [0, -1]), "norm.gamma": ([4], [0]), "adam_m.dense.weight": ([4], [-1, 0])},
    # dev_matrix [2, 2] with a dimension that splits nothing: its ranks hold replicas
    "rep22": {"embedding.weight": ([2, 2], [1, -1]), "dense.weight": ([2, 2], [-1, 0]),
              "dense.bias": ([2, 2], [-1]), "proj.weight": ([2, 2], [0, -1]), "norm.gamma": ([2, 2], [1]),
              "adam_m.dense.weight": ([2, 2], [-1, 1])},
    # both axes split, by device dims in either order
    "both22": {"embedding.weight": ([2, 2], [0, 1]), "dense.weight": ([2, 2], [1, 0]),
               "dense.bias": ([2, 2], [0]), "proj.weight": ([2, 2], [1, 0]), "norm.gamma": ([2, 2], [-1]),
               "adam_m.dense.weight": ([2, 2], [0, 1])},
    # axes split by several device dims (MindSpore's Layout API), the first outermost
    "layout22": {"embedding.weight": ([2, 2], [[1, 0], -1]), "dense.weight": ([2, 2], [-1, [0, 1]]),
                 "dense.bias": ([2, 2], [[0, 1]]), "proj.weight": ([2, 2], [[1], 0]), "norm.gamma": ([2, 2], [-1]),
                 "adam_m.dense.weight": ([2, 2], [[1, 0], -1])},
    # optimizer weight sharding, saved unaggregated: part of the repeated ranks, or all (-1)
    "opt": {"embedding.weight": ([2, 2], [0, -1], 2), "dense.weight": ([2, 2], [-1, 0], 2),
            "dense.bias": ([2, 2], [-1], -1), "proj.weight": ([4], [-1, -1], 2), "norm.gamma": ([2, 2], [-1], 4),
            "adam_m.dense.weight": ([2, 2], [1, -1], 2)},
}
# Pipeline: two stages of two ranks; the embedding is shared by both (tied with the head).
STAGES = {0: {"embedding.weight": ([2], [0, -1]), "dense.weight": ([2], [-1, 0]), "dense.bias": ([2], [0]),
              "adam_m.dense.weight": ([2], [-1, 0])},
          1: {"embedding.weight": ([2], [0, -1]), "proj.weight": ([2], [-1, 0]), "norm.gamma": ([2], [0])}}


def _opt_step(dev, tensor_map) -> int:
    """opt_weight_shard_step as MindSpore saves it: the rank stride of the group sharing a slice."""
    used = {len(dev) - 1 - k for k in tensor_map if k != -1}
    group = [r for r in range(math.prod(dev)) if all(c == 0 for i, c in enumerate(np.unravel_index(r, dev))
                                                     if i in used)]
    return (group[-1] - group[0]) // (len(group) - 1)


def write_strategy(path, layouts: dict, stage: int = 0):
    """A strategy file as MindSpore saves one (protobuf ParallelStrategyMap), or as JSON."""
    if path.suffix == ".json":
        items = {name: {"dev_matrix": spec[0], "tensor_map": spec[1], "field": 0,
                        "opt_weight_shard_size": spec[2] if len(spec) > 2 else 0,
                        "opt_weight_shard_step": _opt_step(*spec[:2]) if len(spec) > 2 else 0}
                 for name, spec in layouts.items()}
        path.write_text(json.dumps({"current_stage": stage, "parallel_strategy_item":
                                    {"MatMul-op0": {"stage": stage, "parallel_strategy": [[1, 1]]}},
                                    "parallel_layout_item": items}))
        return path
    strategy = node_strategy_pb2.ParallelStrategyMap(current_stage=stage)
    item = strategy.parallel_strategy_item.add(node_name="MatMul-op0")
    item.parallel_strategys.stage = stage
    item.parallel_strategys.parallel_strategy.add(dim=[1, 1])
    for name, spec in layouts.items():
        layout = strategy.parallel_layout_item.add(param_name=name).parallel_layouts
        layout.dev_matrix.add(dim=spec[0])
        if any(isinstance(d, list) for d in spec[1]):  # MindSpore's Layout API: a TensorMap per axis,
            axes = [d if isinstance(d, list) else [d] for d in spec[1]]
            for dims in axes + [[]] * (len(axes) == 1):  # and an empty one after a single axis
                layout.tensor_map.add(dim=dims)
        else:
            layout.tensor_map.add(dim=spec[1])
        layout.param_split_shape.add()
        layout.indices_offset.add()
        layout.field = 0
        layout.opt_weight_shard_size, layout.opt_weight_shard_step = \
            (spec[2], _opt_step(*spec[:2])) if len(spec) > 2 else (0, 0)
    path.write_bytes(strategy.SerializeToString())
    return path


def _values(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtype) in MODEL.items():
        if dtype == "bfloat16":  # float32 whose low halves are zero: MindSpore casts them exactly
            bits = rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16 << 16
            out[name] = ms.Tensor(bits.view(np.float32), ms.bfloat16)
        else:
            out[name] = ms.Tensor(rng.standard_normal(shape).astype(dtype) if shape else np.array(7, dtype))
    return out


def ms_transform(src, dst, src_strategy=None, dst_strategy=None, output_format="ckpt"):
    ms.transform_checkpoints(str(src), str(dst), "checkpoint_", src_strategy and str(src_strategy),
                             dst_strategy and str(dst_strategy), output_format=output_format)
    return dst


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Strategy files, the complete checkpoint and sharded sources made from it by MindSpore."""
    root = tmp_path_factory.mktemp("ms_transform")
    strategies = {name: write_strategy(root / f"{name}.ckpt", layouts) for name, layouts in LAYOUTS.items()}
    strategies["row4.json"] = write_strategy(root / "row4.json", LAYOUTS["row4"])
    for suffix in (".ckpt", ".json"):  # per-stage files, and the file merge_pipeline_strategys makes of them
        stages = root / f"stages{suffix}"
        stages.mkdir()
        for stage, layouts in STAGES.items():
            write_strategy(stages / f"ckpt_strategy_rank_{2 * stage}{suffix}", layouts, stage)
        strategies[f"pp{suffix}"] = stages
        ms.parallel.merge_pipeline_strategys(str(stages), str(root / f"pp_merged{suffix}"))
        strategies[f"pp_merged{suffix}"] = root / f"pp_merged{suffix}"
    strategies["pp"], strategies["pp_merged"] = strategies["pp.ckpt"], strategies["pp_merged.ckpt"]
    complete = root / "complete"
    (complete / "rank_0").mkdir(parents=True)
    ms.save_checkpoint([{"name": n, "data": v} for n, v in _values().items()], str(complete / "rank_0" / "full.ckpt"))
    sources = {name: ms_transform(complete, root / f"src_{name}", None, strategies[name])
               for name in ("col2", "row4", "rep22", "both22", "layout22", "opt")}
    sources["pp"] = ms_transform(complete, root / "src_pp", None, strategies["pp_merged"])
    return root, strategies, complete, sources


# (source, source strategy, target strategy (what MindSpore is given), ours if different)
PAIRS = {
    "complete -> column/row split, 2 ranks": ("complete", None, "col2"),
    "complete -> 4 ranks": ("complete", None, "row4"),
    "2 ranks -> 4 ranks, other axes": ("col2", "col2", "row4"),
    "4 ranks -> complete": ("row4", "row4", None),
    "4 ranks, JSON strategy -> complete": ("row4", "row4.json", None),
    "replicated device dim -> 2 ranks": ("rep22", "rep22", "col2"),
    "both axes split -> replicated device dim": ("both22", "both22", "rep22"),
    "complete -> axes split by several device dims": ("complete", None, "layout22"),
    "axes split by several device dims -> 4 ranks": ("layout22", "layout22", "row4"),
    "complete -> optimizer sharded": ("complete", None, "opt"),
    "optimizer sharded -> 4 ranks": ("opt", "opt", "row4"),
    "optimizer sharded -> optimizer sharded": ("opt", "opt", "opt"),
    "2 ranks -> pipeline 2x2": ("col2", "col2", "pp_merged"),
    "pipeline 2x2 (per-stage files) -> 2 ranks": ("pp", "pp_merged", "col2", "pp"),
    "pipeline 2x2 (merged file) -> complete": ("pp", "pp_merged", None),
    "pipeline 2x2 (per-stage JSON files) -> complete": ("pp", "pp_merged.json", None, "pp.json"),
    "pipeline 2x2 (merged JSON file) -> 4 ranks": ("pp", "pp_merged.json", "row4"),
}


@pytest.mark.parametrize("pair", PAIRS)
def test_pair_matches_mindspore(work, tmp_path, pair):
    root, strategies, complete, sources = work
    source, src, dst, *ours_src = PAIRS[pair]
    load = complete if source == "complete" else sources[source]
    theirs = ms_transform(load, tmp_path / "theirs", src and strategies[src], dst and strategies[dst])
    before = tree_digest(load)
    ours_strategy = strategies[ours_src[0]] if ours_src else src and strategies[src]
    transform.transform_checkpoints(load, tmp_path / "ours", ours_strategy, dst and strategies[dst], quiet=True)
    assert without_manifests(tmp_path / "ours") == tree_digest(theirs)
    assert tree_digest(load) == before


@pytest.mark.parametrize("strategy", ["col2", "row4", "rep22", "both22", "layout22", "opt", "pp_merged"])
def test_load_at_a_running_strategy(work, strategy):
    """load(..., strategy=) fills each rank's parameters with its slices of the complete
    checkpoint: bit for bit what MindSpore's transform_checkpoints writes for that rank, shapes
    and dtypes too. semi_auto_parallel does not compile on the CPU: the parameters are a
    stand-alone network's, of other values; those on another pipeline stage stay as they were."""
    root, strategies, complete, sources = work
    made = sources["pp" if strategy == "pp_merged" else strategy]
    for rank in range(len(list(made.glob("rank_*")))):
        theirs = ms.load_checkpoint(str(made / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"))
        network = ms.nn.Cell()
        for i, (name, value) in enumerate(_values(seed=1).items()):
            setattr(network, f"p{i}", ms.Parameter(value, name=name))
        before = {p.name: (p.dtype, p.shape, p.asnumpy().tobytes()) for p in network.get_parameters()}
        loaded = load(network, complete, strategy=strategies[strategy], rank=rank)
        assert loaded.loaded == len(theirs) and loaded.skipped == []
        for p in network.get_parameters():
            value = theirs.get(p.name)
            expected = before[p.name] if value is None else (value.dtype, value.shape, value.asnumpy().tobytes())
            assert (p.dtype, p.shape, p.asnumpy().tobytes()) == expected, (rank, p.name)


def _contents(root) -> dict:
    """{file: {name: (dtype, shape, bytes)}} of a tree, as MindSpore loads it."""
    return {str(p.relative_to(root)): {name: (str(v.dtype), v.shape, v.asnumpy().tobytes())
                                       for name, v in ms.load_checkpoint(str(p), format=p.suffix[1:]).items()}
            for p in sorted(root.rglob("*.*")) if p.suffix in (".ckpt", ".safetensors")}


def test_safetensors_in_and_out_with_contiguous_writes(work, tmp_path, monkeypatch):
    """.ckpt -> safetensors (which MindSpore refuses) -> .ckpt gives MindSpore's .ckpt output;
    safetensors -> safetensors is byte-identical to MindSpore's (a merge: its safetensors path
    gets pieces of any axis but the first wrong); and the safetensors writer is never handed a
    strided array, though a column piece of a source is one."""
    root, strategies, complete, sources = work
    real_save = ms_safetensors.save

    def contiguous_only(path, items):
        assert all(np.asarray(a).flags.c_contiguous for a in items.values()), path
        real_save(path, items)

    monkeypatch.setattr(ms_safetensors, "save", contiguous_only)
    transform.transform_checkpoints(complete, tmp_path / "st", None, strategies["col2"],
                                    output_format="safetensors", quiet=True)
    transform.transform_checkpoints(tmp_path / "st", tmp_path / "back", strategies["col2"], strategies["row4"],
                                    output_format="ckpt", process_num=2, quiet=True)
    theirs = ms_transform(sources["col2"], tmp_path / "theirs_ckpt", strategies["col2"], strategies["row4"])
    assert _contents(tmp_path / "back") == _contents(theirs)  # safetensors keep names sorted: another order
    theirs = ms_transform(tmp_path / "st", tmp_path / "theirs", strategies["col2"], None, "safetensors")
    transform.transform_checkpoints(tmp_path / "st", tmp_path / "ours", strategies["col2"], None, quiet=True)
    assert without_manifests(tmp_path / "ours") == tree_digest(theirs)


def test_by_rank_matches_mindspore(work, tmp_path):
    root, strategies, complete, sources = work
    rank_files = {r: str(next((sources["opt"] / f"rank_{r}").glob("*.ckpt"))) for r in range(4)}
    for rank in range(4):
        theirs, ours = tmp_path / f"theirs{rank}.ckpt", tmp_path / f"ours{rank}.ckpt"
        ms.transform_checkpoint_by_rank(rank, rank_files, str(theirs), str(strategies["opt"]),
                                        str(strategies["row4"]))
        transform.transform_checkpoint_by_rank(rank, sources["opt"], ours, strategies["opt"], strategies["row4"])
        assert ours.read_bytes() == theirs.read_bytes()


def test_cli_with_mindspore_flags(work, tmp_path):
    root, strategies, complete, sources = work
    theirs = ms_transform(sources["rep22"], tmp_path / "theirs", strategies["rep22"], strategies["opt"])
    result = cli("convert", "--load-dir", sources["rep22"], "--save-dir", tmp_path / "ours",
                 "--src-strategy-path-or-dir", strategies["rep22"], "--dst-strategy", strategies["opt"],
                 "--prefix", "checkpoint_", "--process-num", 2, "--format", "ckpt", "--quiet")
    assert result.returncode == 0, result.stderr
    assert without_manifests(tmp_path / "ours") == tree_digest(theirs)
    # one complete file in, no strategies: still MindSpore, by its suffix
    result = cli("convert", "--load-dir", complete / "rank_0" / "full.ckpt", "--save-dir", tmp_path / "one",
                 "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "one" / "rank_0" / "checkpoint_0.ckpt").is_file()


def test_verify_certifies_a_transform_and_finds_one_ulp(work, tmp_path):
    """A checkpoint resharded to another strategy is certified equal to its source; one element
    of one tensor moved by one ulp in place (the same size: only its bytes tell) is reported with
    its global index, found by `verify OUT` alone and refused by the transform, in one line
    naming the file and the tensor (the CRC-32s the transform's manifests recorded)."""
    root, strategies, complete, sources = work
    out = tmp_path / "row4"
    transform.transform_checkpoints(sources["col2"], out, strategies["col2"], strategies["row4"], quiet=True)
    certificate = verify(sources["col2"], out, strategies=(strategies["col2"], strategies["row4"]))
    assert certificate.equal and "EQUAL: 7 of 7 tensors" in str(certificate), certificate
    # row4 splits dense.weight [8, 8] by columns: rank 1 holds columns 2..3; its element [5, 1] is [5, 3]
    path = out / "rank_1" / "checkpoint_1.ckpt"
    offset = CkptFile(path).tensors["dense.weight"].pieces[0][0] + (5 * 2 + 1) * 4
    data = bytearray(path.read_bytes())
    value = np.frombuffer(data[offset:offset + 4], np.float32)
    data[offset:offset + 4] = np.nextafter(value, np.float32(np.inf)).tobytes()
    path.write_bytes(bytes(data))
    result = cli("verify", sources["col2"], out, "--src-strategy-path-or-dir", strategies["col2"], "--dst-strategy",
                 strategies["row4"], "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    wrong = [t for t in report["tensors"] if not t["equal"]]
    assert [t["name"] for t in wrong] == ["dense.weight"] and report["equal"] is False
    assert wrong[0]["differing"] == 1 and wrong[0]["first"] == [5, 3] and 0 < wrong[0]["max_abs"] < 1e-6
    says = f"{path}: dense.weight: CRC-32"
    alone = cli("verify", out, "--quiet")
    assert alone.returncode == 2 and alone.stderr.count("\n") == 1 and says in alone.stderr, alone.stderr
    _refused(out, tmp_path / "again", "--src-strategy-path-or-dir", strategies["row4"], names=path,
             says="dense.weight: CRC-32")


def _slices(b) -> tuple:
    return tuple(slice(o, o + n) for o, n in zip(b.offsets, b.lengths))


@pytest.mark.parametrize("dev_matrix", [(2,), (4,), (2, 2), (4, 2), (2, 1, 2), (2, 2, 2)])
def test_boxes_match_mindspore_slicing(dev_matrix):
    """Our rank -> box, for every tensor map, against MindSpore's own slice computation."""
    shape = (8, 16)
    for tensor_map in np.ndindex(*(len(dev_matrix) + 1,) * 2):
        tensor_map = [k - 1 for k in tensor_map]
        if tensor_map[0] == tensor_map[1] != -1:
            continue
        layout = ParamLayout(tuple(dev_matrix), tuple(() if k == -1 else (k,) for k in tensor_map))
        for rank in range(math.prod(dev_matrix)):
            assert _slices(box(layout, shape, rank)) == \
                _load_tensor_shape(list(dev_matrix), tensor_map, list(shape), rank)


def test_optimizer_sharding_follows_the_runtime_not_transform():
    """With a tensor map that lists device dims out of order, MindSpore's transform_checkpoints
    places optimizer-sharded pieces as if they were in order. Its runtime loader
    (_load_tensor_by_layout), like a training run, takes the model-parallel slice by the real
    device coordinates, then the part of it that the rank's place in its opt group says: so do we."""
    layout = ParamLayout((2, 2, 2), ((0,), (1,)), opt_shard_size=2)
    full = np.arange(64, dtype=np.float32).reshape(8, 8)
    for rank in range(8):
        mp = _load_tensor_shape([2, 2, 2], [0, 1], [8, 8], rank)  # MindSpore's model-parallel slice
        part = np.split(full[mp], 2)[rank // 4]  # the opt group of a slice: ranks r and r + 4
        assert np.array_equal(full[_slices(box(layout, (8, 8), rank))], part)


def test_names_with_dashes_in_pipeline_strategies(work, tmp_path):
    """merge_pipeline_strategys names parameters "{stage}-{name}", and MindSpore reads them back
    with name.split("-"): a name holding "-" breaks it. We split at the first "-" only: the
    result is MindSpore's for the same checkpoint with the dashes renamed."""
    root, strategies, complete, sources = work
    dashed = {stage: {name.replace(".", "-", 1): spec for name, spec in layouts.items()}
              for stage, layouts in STAGES.items()}
    (tmp_path / "stages").mkdir()
    for stage, layouts in dashed.items():
        write_strategy(tmp_path / "stages" / f"s{stage}.ckpt", layouts, stage)
    ms.parallel.merge_pipeline_strategys(str(tmp_path / "stages"), str(tmp_path / "merged.ckpt"))
    (tmp_path / "full" / "rank_0").mkdir(parents=True)
    ms.save_checkpoint([{"name": n.replace(".", "-", 1), "data": v} for n, v in _values().items()],
                       str(tmp_path / "full" / "rank_0" / "full.ckpt"))
    with pytest.raises(ValueError):
        ms_transform(tmp_path / "full", tmp_path / "ms_fails", None, tmp_path / "merged.ckpt")
    for strategy in ("stages", "merged.ckpt"):
        transform.transform_checkpoints(tmp_path / "full", tmp_path / f"ours_{strategy}", None,
                                        tmp_path / strategy, quiet=True)
        theirs = ms_transform(complete, tmp_path / f"theirs_{strategy}", None, strategies["pp_merged"])
        for rank in range(4):
            ours = ms.load_checkpoint(str(tmp_path / f"ours_{strategy}" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"))
            expected = ms.load_checkpoint(str(theirs / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"))
            assert [n.replace(".", "-", 1) for n in expected] == list(ours)
            for name, value in expected.items():
                assert ours[name.replace(".", "-", 1)].asnumpy().tobytes() == value.asnumpy().tobytes()


def test_packed_repeated_fields_are_read():
    """proto2 writes repeated ints one by one, but a parser must take them packed too."""
    signed_minus_one = b"\xff" * 9 + b"\x01"
    packed = b"\x0a" + bytes([2 + len(signed_minus_one)]) + b"\x02\x00" + signed_minus_one
    assert integers(packed, message(packed, 0, len(packed))[1], signed=True) == [2, 0, -1]


def test_strings_are_carried_and_map_parameters_refused(tmp_path):
    """append_dict strings (on which MindSpore's transform fails) go to every target .ckpt;
    safetensors cannot hold them; a MapParameter is refused."""
    (tmp_path / "src" / "rank_0").mkdir(parents=True)
    source = tmp_path / "src" / "rank_0" / "net.ckpt"
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(np.ones((4, 2), np.float32))}], str(source),
                       append_dict={"note": "épochs"})
    two = write_strategy(tmp_path / "two.ckpt", {"w": ([2], [0, -1])})
    transform.transform_checkpoints(tmp_path / "src", tmp_path / "out", None, two, quiet=True)
    for rank in range(2):
        loaded = ms.load_checkpoint(str(tmp_path / "out" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"))
        assert loaded["note"] == "épochs" and loaded["w"].shape == (2, 2)
    with pytest.raises(CheckpointError, match="note: a string entry, which safetensors cannot hold"):
        transform.transform_checkpoints(tmp_path / "src", tmp_path / "st", None, two, output_format="safetensors",
                                        quiet=True)
    assert not (tmp_path / "st").exists()
    # Checkpoint { Value { tag "table", maptensor {} } }, as MindSpore saves an (empty) MapParameter
    value = b"\x0a\x05table\x1a\x00"
    source.write_bytes(source.read_bytes() + b"\x0a" + bytes([len(value)]) + value)
    with pytest.raises(CheckpointError, match="table: MapParameters cannot be resharded"):
        transform.transform_checkpoints(tmp_path / "src", tmp_path / "map", None, two, quiet=True)


def _refused(load, save_dir, *flags, names, says):
    """`convert` fails with one line naming ``names``, writes nothing and leaves the source as it was."""
    before = tree_digest(load) if load.is_dir() else None
    result = cli("convert", "--load-dir", load, "--save-dir", save_dir, "--quiet", *flags)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {names}"), lines[0]
    assert says in lines[0], lines[0]
    assert not save_dir.exists() or [p.name for p in save_dir.iterdir()] == ["keep.txt"]
    assert not any(".partial" in p.name for p in save_dir.parent.iterdir())
    if before is not None:
        assert tree_digest(load) == before


def test_bad_input_is_refused_in_one_line(work, tmp_path):
    root, strategies, complete, sources = work
    src = ["--src-strategy-path-or-dir"]
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(strategies["col2"].read_bytes()[:-7])
    _refused(sources["col2"], tmp_path / "a", *src, corrupt, names=corrupt, says="corrupt")
    # a strategy of another model, and one whose tensor maps have the wrong number of axes
    other = write_strategy(tmp_path / "other.ckpt", {"encoder.w": ([2], [0, -1])})
    _refused(sources["col2"], tmp_path / "b", *src, other, names=other, says="names none of the checkpoint's")
    wrong_axes = write_strategy(tmp_path / "axes.ckpt", {**LAYOUTS["col2"], "dense.bias": ([2], [0, -1])})
    _refused(sources["col2"], tmp_path / "c", *src, wrong_axes, names=sources["col2"] / "rank_0",
             says="dense.bias: shape [4] does not fit")
    # a strategy of 4 ranks for a checkpoint of 2
    _refused(sources["col2"], tmp_path / "d", *src, strategies["row4"], names=sources["col2"] / "rank_2",
             says="missing rank directory")
    # a single stage's file of a pipeline run
    stage1 = strategies["pp.ckpt"] / "ckpt_strategy_rank_2.ckpt"
    _refused(sources["pp"], tmp_path / "e", *src, stage1, names=stage1, says="holds pipeline stage 1 only")
    # a target strategy that cannot split the tensors
    odd = write_strategy(tmp_path / "odd.ckpt", {"dense.bias": ([3], [0])})
    _refused(sources["col2"], tmp_path / "f", *src, strategies["col2"], "--dst-strategy", odd, names=odd,
             says="dense.bias: cannot cut shape [8] into [3] pieces")
    # a save directory that holds something
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    _refused(sources["col2"], tmp_path / "full", *src, strategies["col2"], names=tmp_path / "full",
             says="not empty")
    # a Megatron flag on a MindSpore checkpoint, and a MindSpore one on what is not one
    _refused(sources["col2"], tmp_path / "g", "--target-tensor-parallel-size", 2, names=sources["col2"],
             says="--target-tensor-parallel-size does not apply to a MindSpore checkpoint")
    _refused(tmp_path / "megatron", tmp_path / "h", "--prefix", "x_", names=tmp_path / "megatron",
             says="--prefix does not apply to a Megatron checkpoint")
    with pytest.raises(CheckpointError, match="rank 4 is not among the 4 target ranks"):
        transform.transform_checkpoint_by_rank(4, sources["col2"], tmp_path / "x.ckpt", strategies["col2"],
                                               strategies["row4"])


def test_checkpoints_that_do_not_fit_their_strategy(work, tmp_path):
    """What a reader must not take silently: a rank directory beyond the strategy's ranks, a
    tensor the checkpoint splits but the strategy does not name, a .ckpt whose crc_num trailer
    does not match its bytes."""
    root, strategies, complete, sources = work
    src = ["--src-strategy-path-or-dir"]
    extra = tmp_path / "extra"
    shutil.copytree(sources["col2"], extra)
    shutil.copytree(extra / "rank_1", extra / "rank_2")
    _refused(extra, tmp_path / "a", *src, strategies["col2"], names=extra / "rank_2",
             says="beyond the 2 ranks the source strategy describes")
    lacking = write_strategy(tmp_path / "lacking.ckpt", {k: v for k, v in LAYOUTS["col2"].items() if k != "dense.weight"})
    _refused(sources["col2"], tmp_path / "b", *src, lacking, names=sources["col2"] / "rank_1",
             says="dense.weight: differs from rank 0's: split, but the source strategy does not say how")
    crc = tmp_path / "crc"
    (crc / "rank_0").mkdir(parents=True)
    ms.save_checkpoint([{"name": n, "data": v} for n, v in _values().items()], str(crc / "rank_0" / "full.ckpt"),
                       crc_check=True)
    data = bytearray((crc / "rank_0" / "full.ckpt").read_bytes())
    data[40] ^= 1   # one bit of a tensor's bytes
    (crc / "rank_0" / "full.ckpt").write_bytes(bytes(data))
    _refused(crc, tmp_path / "c", names=crc / "rank_0" / "full.ckpt", says="crc")
