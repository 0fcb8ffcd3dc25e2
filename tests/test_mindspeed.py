"""Megatron <-> MindSpeed-Core-MS (MindSpore): real megatron-core checkpoints, with their
distributed-optimizer state, written as MindSpore files (read back by MindSpore itself and
compared with the training run's truth) and written back to Megatron, bit for bit."""

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

ms = pytest.importorskip("mindspore")

from ckpt_hooks.algebra.target import Target  # noqa: E402
from ckpt_hooks.cli import guarded  # noqa: E402
from ckpt_hooks.megatron.export import export_param_maps  # noqa: E402
from ckpt_hooks.formats import mindspore_ckpt, ms_safetensors  # noqa: E402
from ckpt_hooks.converters.mindspeed import megatron_to_mindspore, mindspore_to_megatron, tensor_md5  # noqa: E402
from ckpt_hooks.cli.mindspeed import COMMANDS  # noqa: E402
from ckpt_hooks.verify import check, verify  # noqa: E402
from ckpt_hooks.mindspore.files import open_checkpoint  # noqa: E402
from ckpt_hooks.mindspore.manifest import manifest_path  # noqa: E402
from tests.util import assert_same, tree_digest, without_manifests  # noqa: E402

# (source, MindSpore layout, Megatron layout back, format). cont_tp2pp2's vocabulary pads to the
# same rows at TP 1 and 2, so even its padding rows survive the trip through TP1.
ROUND_TRIPS = [
    ("cont_tp2pp2", {"tp": 1, "pp": 1}, {"tp": 2, "pp": 2}, "ckpt"),
    ("tp1pp2vpp2", {}, {}, "safetensors"),             # unchanged layout: the RNG state comes back too
    ("tp4pp1", {"tp": 2, "pp": 2}, {"tp": 4, "pp": 1}, "ckpt"),
]
# The truth's layer names (Transformer Engine spec) for the local spec's norms.
TRUTH_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
STATES = {"": "param", "exp_avg.": "exp_avg", "exp_avg_sq.": "exp_avg_sq"}


@pytest.fixture(scope="module")
def trips(sources, tmp_path_factory):
    """{source: (MindSpore dir, Megatron dir, report there, report back)}."""
    root = tmp_path_factory.mktemp("mindspeed")
    out = {}
    for name, ms_layout, back, fmt in ROUND_TRIPS:
        there = megatron_to_mindspore(sources[name].dir, root / f"{name}-ms", Target(**ms_layout), file_format=fmt,
                                      quiet=True)
        again = mindspore_to_megatron(root / f"{name}-ms", root / f"{name}-back", Target(**back), quiet=True)
        out[name] = root / f"{name}-ms", root / f"{name}-back", there, again
    return out


@pytest.mark.parametrize("case", ROUND_TRIPS, ids=lambda c: f"{c[0]}-via-ms{c[1].get('tp', '')}{c[1].get('pp', '')}")
def test_round_trip_is_bitwise(sources, trips, case):
    """Weights, fp32 params, both Adam moments, param groups (step), scheduler, iteration and
    args come back as they were; the md5 the tool reports is the original file's."""
    name, ms_layout, _, _ = case
    _, back, _, report = trips[name]
    originals = sorted(p.relative_to(sources[name].dir) for p in sources[name].dir.rglob("*.pt"))
    assert sorted(report.md5) == [str(p) for p in originals]
    for rel in originals:
        a = torch.load(sources[name].dir / rel, weights_only=False)
        b = torch.load(back / rel, weights_only=False)
        if ms_layout and rel.name == "model_optim_rng.pt":
            a.pop("rng_state")  # a rank's RNG state is not carried across a layout change
        else:
            assert report.md5[str(rel)] == tensor_md5(sources[name].dir / rel)
        if "args" in a:  # one rank's args for every rank, as ckpt-hooks convert writes them
            args, expected = vars(b.pop("args")), vars(a.pop("args"))
            assert {k: args[k] for k in expected if k != "rank"} == {k: v for k, v in expected.items() if k != "rank"}
        assert_same(dict(sorted(a.items(), key=str)), dict(sorted(b.items(), key=str)), str(rel))


def mindspore_files(ms_dir):
    return sorted(p for p in ms_dir.rglob("*") if p.suffix in (".ckpt", ".safetensors"))


def truth_of(name: str, truth: dict):
    """The truth tensor a MindSpore name stands for (global layer ids, as the truth's)."""
    prefix = next(p for p in sorted(STATES, key=len, reverse=True) if name.startswith(p))
    tensors = truth["optimizer"][STATES[prefix]] if prefix else truth["tensors"]
    key = name[len(prefix):]
    if key.startswith("decoder.layers."):
        layer, suffix = key[len("decoder.layers."):].split(".", 1)
        return tensors[f"decoder.layers.{TRUTH_NAMES.get(suffix, suffix)}"][int(layer)]
    return tensors[key]


@pytest.mark.parametrize("name", ["cont_tp2pp2", "tp1pp2vpp2"])
def test_mindspore_reads_every_file_as_the_training_run_left_it(sources, trips, name):
    """At TP1 each MindSpore tensor is a whole Megatron tensor: MindSpore's own loader gives the
    truth's weights, fp32 params and moments, and the step and learning rate."""
    truth = torch.load(sources[name].truth, weights_only=False)
    ms_dir, _, report, _ = trips[name]
    seen = set()
    for path in mindspore_files(ms_dir):
        loaded = ms.load_checkpoint(str(path), format=path.suffix[1:])
        assert int(loaded.pop("step_num").asnumpy()) == 3 and loaded.pop("state_step").asnumpy().tolist() == [3.0]
        assert loaded.pop("learning_rate_group_0").asnumpy() == np.float32(0.01)
        for key, value in loaded.items():
            if value.ndim == 0:
                continue  # the other optimizer and scheduler numbers
            expected = truth_of(key, truth)
            assert value.dtype == ms.float32
            assert np.array_equal(value.asnumpy(), expected.float().numpy()), key
            seen.add(key)
        assert report.md5[str(path.relative_to(ms_dir))] == tensor_md5(path)
    layers = {k for k in truth["tensors"] if k.startswith("decoder.layers.")}
    expected = len(truth["tensors"]) - len(layers) + 4 * len(layers)
    assert len(seen) == 3 * expected



def test_mindspore_loads_every_file_we_write(trips):
    """MindSpore's loader reads each file (any layout, .ckpt or safetensors) to the bytes our
    reader gives, the reader whose output the round trips above prove."""
    for ms_dir, *_ in trips.values():
        for path in mindspore_files(ms_dir):
            ours = open_checkpoint(path)
            loaded = ms.load_checkpoint(str(path), format=path.suffix[1:])
            assert sorted(loaded) == sorted(ours.names)
            for name, value in loaded.items():
                assert np.array_equal(value.asnumpy(), ours.read(name)), (path, name)

@pytest.mark.parametrize("name", ["cont_tp2pp2", "tp1pp2vpp2"])
def test_verify_certifies_the_mindspore_checkpoint_against_its_megatron_source(sources, trips, name):
    """MindSpeed-Core-MS's files, read by mindspore-to-megatron's reader as the Megatron layout
    pt_meta describes, hold the source's weights, fp32 params and both Adam moments bit for bit,
    and its run state; alone, every tensor matches the CRC-32 its manifest recorded while writing."""
    ms_dir = trips[name][0]
    certificate = verify(sources[name].dir, ms_dir)
    assert certificate.equal, certificate
    assert {t.name.split(":")[0] for t in certificate.tensors if ":" in t.name} == {"param", "exp_avg", "exp_avg_sq"}
    assert set(certificate.run_state) == {"iteration", "param_groups", "scheduler",
                                          "num_floating_point_operations_so_far"}
    assert not certificate.only_first and not certificate.only_second
    integrity = check(ms_dir)
    assert integrity.files == len(mindspore_files(ms_dir)) and integrity.checked and not integrity.unchecked


def test_verify_finds_a_changed_moment_in_a_mindspeed_checkpoint(sources, ms_copy):
    """One Adam moment element changed in a MindSpore file: named, at its global index."""
    victim = next(ms_copy.rglob("*.ckpt"))
    name = "exp_avg_sq.decoder.layers.3.mlp.linear_fc2.weight"

    def bump(key, array):
        if key == name:
            array[2, 9] = np.nextafter(array[2, 9], np.float32(np.inf))
        return [(key, array)]
    rewrite(victim, bump)
    certificate = verify(sources["cont_tp2pp2"].dir, ms_copy)
    wrong = [t for t in certificate.tensors if not t.equal]
    assert not certificate.equal and "NOT EQUAL" in str(certificate)
    assert [(t.name, t.differing, t.first) for t in wrong] == [("exp_avg_sq:decoder.layers.3.mlp.linear_fc2.weight", 1,
                                                                (2, 9))] and 0 < wrong[0].max_abs < 1e-6


def test_bf16_weights_only(sources, tmp_path):
    """bf16 weights go to MindSpore in fp32 (MindSpeed-Core-MS's converter does the same, exactly),
    and come back bf16, bit for bit."""
    source = sources["tied_bf16_tp2pp2"]
    megatron_to_mindspore(source.dir, tmp_path / "ms1", Target(tp=1, pp=1), convert_param_only=True, quiet=True)
    truth = torch.load(source.truth, weights_only=False)
    (path,) = mindspore_files(tmp_path / "ms1")
    loaded = ms.load_checkpoint(str(path))
    assert not any(k.startswith("exp_avg") for k in loaded)
    rows = loaded["embedding.word_embeddings.weight"].shape[0]  # 112 at TP1, 128 at TP2
    for key, value in loaded.items():
        if key.startswith(("decoder.", "embedding.")):
            expected = truth_of(key, truth)[:rows if key.startswith("embedding.") else None]
            assert np.array_equal(value.asnumpy(), expected.float().numpy()), key
    megatron_to_mindspore(source.dir, tmp_path / "ms2", convert_param_only=True, file_format="safetensors", quiet=True)
    report = mindspore_to_megatron(tmp_path / "ms2", tmp_path / "back", convert_param_only=True, quiet=True)
    for rel, md5 in report.md5.items():
        assert md5 == tensor_md5(source.dir / rel), rel


def run_command(command: str, *argv) -> int:
    _, add_arguments, run = COMMANDS[command]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return guarded(run, parser.parse_args([*map(str, argv), "--quiet"]))


def test_command_line_all_dp_cp_copies_and_param_map_check(sources, tmp_path):
    source = sources["tp1pp2vpp2"]
    maps = export_param_maps(source.dir, tmp_path / "maps")
    assert run_command("megatron-to-mindspore", "--megatron-path", source.dir / "iter_0000003", "--ms-path",
                       tmp_path / "ms", "--param-map-path", maps[0].parent, "--dp-size", 2, "--cp-size", 2,
                       "--generate-all-dp-cp", "--num-layers", 4, "--process-limit", 2) == 0
    for stage in ("mp_rank_00_000", "mp_rank_00_001"):
        found = sorted(without_manifests(tmp_path / "ms" / "iter_0000003" / stage))
        assert found == ["model_optim_rng.ckpt"] + [f"model_optim_rng_00{i}.ckpt" for i in range(4)]
        assert len({tensor_md5(tmp_path / "ms" / "iter_0000003" / stage / f) for f in found}) == 1
    meta = sorted(p.name for p in (tmp_path / "ms" / "pt_meta").iterdir())
    assert meta[:2] == ["args_tp00_pp000.pt", "args_tp00_pp001.pt"] and len(meta) == 2 + 2 * 2 * 4  # buffers x dp·cp
    assert run_command("mindspore-to-megatron", "--ms-path", tmp_path / "ms" / "iter_0000003", "--megatron-path",
                       tmp_path / "back", "--tp-size", 1, "--pp-size", 2, "--vpp-size", 2, "--dp-size", 2,
                       "--cp-size", 1, "--num-layers", 4, "--src-model-format", "ckpt", "--multiprocess-off") == 0
    for path in (tmp_path / "back").rglob("*.pt"):
        assert tensor_md5(path) == tensor_md5(source.dir / path.relative_to(tmp_path / "back"))


def rewrite(path, change) -> None:
    """A MindSpore .ckpt with ``change(name, array)`` -> [(name, array), ...] applied to each
    tensor, as another program would save it: without our manifest beside it."""
    f = mindspore_ckpt.CkptFile(path)
    items = [item for name in f.names for item in change(name, np.array(f.read(name)))]
    mindspore_ckpt.save(path, items)
    manifest_path(path).unlink()


def rewrite_safetensors(path, changed: dict) -> None:
    f = ms_safetensors.SafetensorsFile(path)
    ms_safetensors.save(path, {name: changed.get(name, np.array(f.read(name))) for name in f.names})
    manifest_path(path).unlink()


def test_noop_layers_are_skipped(trips, tmp_path):
    """MindSpore layer 2 is a no-op layer: Megatron's layers 2 and 3 are MindSpore's 3 and 4."""
    ms_dir = tmp_path / "ms"
    shutil.copytree(trips["cont_tp2pp2"][0], ms_dir)

    def shift(name, array):
        parts = name.split(".")
        if "layers" not in parts:
            return [(name, array)]
        at = parts.index("layers") + 1
        layer = int(parts[at])
        moved = [(".".join(parts[:at] + [str(layer + (layer >= 2))] + parts[at + 1:]), array)]
        return moved + ([(".".join(parts[:at] + ["2"] + parts[at + 1:]), array * 0)] if layer == 1 else [])
    rewrite(next(ms_dir.rglob("*.ckpt")), shift)
    report = mindspore_to_megatron(ms_dir, tmp_path / "back", Target(tp=2, pp=2), noop=[2], num_layers=5, quiet=True)
    assert report.md5 == trips["cont_tp2pp2"][3].md5



def test_training_on_in_mindspore_moves_step_and_scheduler(sources, trips, tmp_path):
    """step_num past pt_meta's iteration (MindSpore trained on): the Megatron files follow it."""
    ms_dir = tmp_path / "ms"
    shutil.copytree(trips["tp1pp2vpp2"][0], ms_dir)
    for path in mindspore_files(ms_dir):
        rewrite_safetensors(path, {"step_num": np.array(5, np.int64)})
    mindspore_to_megatron(ms_dir, tmp_path / "back", quiet=True)
    state = torch.load(tmp_path / "back" / "iter_0000005" / "mp_rank_00_001" / "model_optim_rng.pt", weights_only=False)
    assert state["iteration"] == 5 and "rng_state" not in state
    assert [g["step"] for g in state["optimizer"]["optimizer"]["param_groups"]] == [5.0, 5.0]
    assert state["opt_param_scheduler"]["num_steps"] == 5 * 8  # x global batch

@pytest.fixture
def ms_copy(trips, tmp_path):
    shutil.copytree(trips["cont_tp2pp2"][0], tmp_path / "ms")
    return tmp_path / "ms"


def check_refusal(capsys, before, source_dir, out, names, says):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {names}") and says in lines[0], lines
    assert not out.exists() and not any(p.name.startswith(f".{out.name}.partial") for p in out.parent.iterdir())
    assert tree_digest(source_dir) == before


BAD_MINDSPORE = {
    "missing parameter": (lambda name, a: [] if name == "decoder.layers.2.mlp.linear_fc2.weight" else [(name, a)],
                          "no 'decoder.layers.2.mlp.linear_fc2.weight'"),
    "wrong shape": (lambda name, a: [(name, a[:, :-1] if name == "exp_avg.decoder.layers.1.mlp.linear_fc2.weight"
                                      else a)], "has shape [64, 127]"),
}


@pytest.mark.parametrize("case", BAD_MINDSPORE)
def test_bad_mindspore_checkpoint_is_refused(ms_copy, tmp_path, capsys, case):
    change, says = BAD_MINDSPORE[case]
    victim = next(ms_copy.rglob("*.ckpt"))
    rewrite(victim, change)
    before = tree_digest(ms_copy)
    assert run_command("mindspore-to-megatron", "--ms-path", ms_copy, "--megatron-path", tmp_path / "out") == 2
    check_refusal(capsys, before, ms_copy, tmp_path / "out", victim, says)


def test_missing_pt_meta_is_refused(ms_copy, tmp_path, capsys):
    victim = ms_copy / "pt_meta" / "args_tp00_pp000.pt"
    victim.unlink()
    before = tree_digest(ms_copy)
    assert run_command("mindspore-to-megatron", "--ms-path", ms_copy, "--megatron-path", tmp_path / "out") == 2
    check_refusal(capsys, before, ms_copy, tmp_path / "out", victim, "missing")


def test_disagreeing_param_map_is_refused(sources, tmp_path, capsys):
    source = sources["tp4pp1"]
    maps = export_param_maps(source.dir, tmp_path / "maps")
    victim = maps[0]
    entries = json.loads(victim.read_text())
    first = next(iter(entries))
    entries[first][2] += 64
    victim.write_text(json.dumps(entries))
    before = tree_digest(source.dir)
    assert run_command("megatron-to-mindspore", "--megatron-path", source.dir, "--ms-path", tmp_path / "out",
                       "--param-map-path", victim.parent) == 2
    check_refusal(capsys, before, source.dir, tmp_path / "out", victim, "places parameters differently")
