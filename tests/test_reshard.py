"""Weights resharded between real Megatron layouts are bitwise equal to the source run's.

Each pair converts a real checkpoint (trained by megatron-core with the DistributedOptimizer)
with `ckpt_hooks.convert()`, then megatron-core itself builds the target layout, loads the
converted files with `load_state_dict(strict=True)`, and compares every tensor (gathered
through its own `sharded_state_dict`) with the source run's, bit for bit.
"""

import json
import math
import shutil

import pytest
import torch

from ckpt_hooks.algebra.target import Target
from ckpt_hooks import convert
from ckpt_hooks.algebra.spec import uneven_layers
from tests.harness import padded_vocab, run_jobs, verify_job

# (source name, target layout). Together: TP 1<->2<->4, PP 1<->2<->4, VPP on and off,
# uneven PP in and out, GQA (2 groups < 4 heads), tied (bf16) and untied (fp32) embeddings.
PAIRS = [
    ("tp2pp2", {"tp": 1, "pp": 1}),
    ("tp2pp2", {"tp": 4, "pp": 1}),
    ("tp2pp2", {"tp": 2, "pp": 1}),
    ("tp2pp2", {"tp": 1, "pp": 4}),
    ("tp2pp2", {"tp": 2, "pp": 2, "vpp": 2}),
    ("tp1pp2vpp2", {"tp": 2, "pp": 1}),
    ("tp1pp2vpp2", {"tp": 4, "pp": 1}),
    ("tp4pp1", {"tp": 2, "pp": 2}),
    ("tp4pp1", {"tp": 1, "pp": 2, "first": 3, "last": 1}),
    ("tp1pp4", {"tp": 1, "pp": 2, "vpp": 2}),
    ("uneven13", {"tp": 2, "pp": 2}),
    ("uneven13", {"tp": 4, "pp": 1}),
    ("tied_bf16_tp2pp2", {"tp": 1, "pp": 1}),
    ("tied_bf16_tp2pp2", {"tp": 1, "pp": 4}),
    ("tied_bf16_tp2pp2", {"tp": 4, "pp": 1}),
]
NUM_LAYERS = 4


def pair_id(pair):
    name, t = pair
    extra = (f"vpp{t['vpp']}" if t.get("vpp") else "") + (f"-{t['first']}-{t['last']}" if t.get("first") else "")
    return f"{name}-to-tp{t['tp']}pp{t['pp']}{extra}"


def target_stages(target):
    """The layer list of a target layout, "even" said explicitly (uneven13 would keep its split)."""
    return uneven_layers(NUM_LAYERS, target["pp"], target.get("first"), target.get("last")) \
        or [NUM_LAYERS // target["pp"]] * target["pp"]


@pytest.fixture(scope="module")
def verified(sources, tmp_path_factory):
    """Convert every pair, then verify them all in one torchrun launch: {pair id: result}."""
    root = tmp_path_factory.mktemp("reshard")
    jobs, results = [], {}
    for pair in PAIRS:
        name, target = pair
        source = sources[name]
        out = root / pair_id(pair)
        convert(source.dir, out, Target(tp=target["tp"], pp=target["pp"], vpp=target.get("vpp"),
                                        num_layer_list=target_stages(target)), convert_param_only=True, quiet=True)
        results[pair_id(pair)] = root / f"{pair_id(pair)}.json"
        jobs.append(verify_job(target, out, source.truth, results[pair_id(pair)], model=source.model))
    jobs.append(corrupted_control(root, sources[PAIRS[0][0]], results))
    run_jobs(jobs, root / "logs")
    return {key: json.loads(path.read_text()) for key, path in results.items()}


def corrupted_control(root, source, results):
    """A verify job that must fail: the first pair's output with one fc1 element moved by one ulp."""
    bad = root / "corrupted"
    shutil.copytree(root / pair_id(PAIRS[0]), bad)
    path = next(bad.rglob("model_optim_rng.pt"))
    state = torch.load(path, weights_only=False)
    weight = state["model"]["decoder.layers.2.mlp.linear_fc1.weight"]
    weight[5, 7] = torch.nextafter(weight[5, 7], torch.tensor(float("inf")))
    torch.save(state, path)
    results["corrupted"] = root / "corrupted.json"
    return verify_job(PAIRS[0][1], bad, source.truth, results["corrupted"], model=source.model)


def test_verification_catches_a_one_ulp_error(verified):
    result = verified["corrupted"]
    assert not result["ok"]
    assert result["mismatches"] == ["decoder.layers.mlp.linear_fc1.weight"]


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_weights_bitwise_equal_after_reshard(verified, pair):
    result = verified[pair_id(pair)]
    assert result["load_error"] is None, result["load_error"]
    assert result["missing"] == [] and result["extra"] == [], result
    assert result["mismatches"] == [], result
    assert result["args_mismatches"] == [], result
    assert result["ok"]


@pytest.mark.parametrize("pair", [p for p in PAIRS if p[1]["tp"] == 2 and p[0] == "tp2pp2"], ids=pair_id)
def test_same_tp_keeps_forward_loss_exactly(verified, pair):
    """A pipeline-only change does not change the arithmetic: the loss is the source's, exactly."""
    result = verified[pair_id(pair)]
    assert result["loss"] == result["truth_loss"]


@pytest.mark.parametrize("pair", [p for p in PAIRS if p[0] in ("tp2pp2", "tp4pp1") and p[1]["tp"] in (2, 4)],
                         ids=pair_id)
def test_tp_change_with_equal_padding_keeps_forward_loss(verified, pair):
    """TP 2 and 4 pad the vocabulary alike, so the model is the same function; only the
    order of floating-point reductions differs."""
    name, target = pair
    assert padded_vocab({}, target["tp"]) == padded_vocab({}, 2)
    result = verified[pair_id(pair)]
    assert math.isclose(result["loss"], result["truth_loss"], rel_tol=1e-5), result
