"""The distributed optimizer's state: param_maps, resharding of fp32 params and Adam moments,
and training that resumes at the new layout on the uninterrupted run's loss curve."""

import json
import shutil

import pytest
import torch

from ckpt_hooks.algebra.target import Target
from ckpt_hooks import convert
from ckpt_hooks.megatron.checkpoint import read_source
from ckpt_hooks.algebra.spec import Rank
from ckpt_hooks.megatron.optimizer import source_optimizer
from ckpt_hooks.algebra.param_map import BufferMap
from tests.conftest import DIST, SOURCES, uninterrupted_losses
from tests.harness import resume_job, run_jobs
from tests.test_reshard import PAIRS, pair_id, target_stages
from tests.util import assert_refused

# Layout changes for the loss-continuity runs: (source, the run it was saved from, target layout).
# Every one changes DP too (world of 4): TP2·PP2 is DP1, TP1·PP1 DP4, TP4·PP1 DP1, TP2·PP1 DP2.
CONTINUITY = [
    ("cont_tp2pp2", "cont_tp2pp2", {"tp": 1, "pp": 1}),       # TP, PP and DP at once
    ("cont_tp2pp2", "cont_tp2pp2", {"tp": 4, "pp": 1}),
    ("cont_tp1pp2vpp2", "cont_tp1pp2vpp2", {"tp": 2, "pp": 1}),  # VPP off
    ("cont_tp2pp2", "cont_tp2pp2", {"tp": 2, "pp": 2}),       # same layout: must be exact
]
RESUMED_STEPS = 2


@pytest.mark.parametrize("name", [n for n in SOURCES if not n.endswith("_5steps")
                                  and DIST.get(n, "dp_reshardable") == "dp_reshardable"])
def test_rebuilt_param_map_equals_recorded(sources, name):
    """The param_map rebuilt from the checkpoint alone (checked against its buffer sizes) is the
    one the live optimizer used; torch_dist's dp_reshardable buckets included."""
    source = sources[name]
    src = read_source(source.dir)
    config = src.layout
    rebuilt = source_optimizer(src).maps
    recorded = torch.load(source.truth, weights_only=False)["param_map"]
    assert len(recorded) == len(rebuilt) == len(config.file_ranks())
    for rank in recorded:
        maps = rebuilt[Rank(rank["tp_rank"], rank["pp_rank"], rank["ep_rank"])]
        assert [m.to_json() for m in maps] == [BufferMap.from_json(b).to_json() for b in rank["buffers"]]


@pytest.fixture(scope="module")
def resumed(sources, tmp_path_factory):
    """Every reshard pair converted with its optimizer state and loaded by megatron-core at the
    target layout; the continuity pairs train on. One torchrun launch: {id: result}."""
    root = tmp_path_factory.mktemp("optimizer")
    jobs, results = [], {}
    cases = [(pair_id(p), sources[p[0]], p[1], 0) for p in PAIRS] + \
            [(f"continuity-{s}-to-tp{t['tp']}pp{t['pp']}", sources[s], t, RESUMED_STEPS) for s, _, t in CONTINUITY]
    for key, source, target, steps in cases:
        out = root / key
        convert(source.dir, out, Target(tp=target["tp"], pp=target["pp"], vpp=target.get("vpp"),
                                        num_layer_list=target_stages(target)), quiet=True)
        results[key] = root / f"{key}.json"
        jobs.append(resume_job(target, out, source.truth, results[key], model=source.model, steps=steps))
    run_jobs(jobs, root / "logs")
    return {key: json.loads(path.read_text()) for key, path in results.items()}


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_optimizer_state_bitwise_equal_after_reshard(resumed, pair):
    result = resumed[pair_id(pair)]
    assert result["load_error"] is None, result["load_error"]
    assert result["optim_mismatches"] == [] and result["weight_mismatches"] == [], result
    assert result["missing"] == [], result
    assert result["ok"]


@pytest.mark.parametrize("case", CONTINUITY, ids=lambda c: f"{c[0]}-to-tp{c[2]['tp']}pp{c[2]['pp']}")
def test_resumed_training_continues_the_loss_curve(sources, resumed, case):
    name, reference, target = case
    result = resumed[f"continuity-{name}-to-tp{target['tp']}pp{target['pp']}"]
    assert result["load_error"] is None, result["load_error"]
    assert result["ok"], result
    assert result["iteration"] == sources[name].steps
    got, want = result["losses"], uninterrupted_losses(sources, reference, RESUMED_STEPS)
    assert len(got) == RESUMED_STEPS
    if target == sources[name].layout:
        assert got == want  # same layout: bit for bit
    else:
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5, (got, want)


# Bad optimizer input: one line naming the file, nothing written, source untouched.

@pytest.fixture
def ckpt(sources, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(sources["tp2pp2"].dir, copy)
    return copy


def test_optimizer_file_from_another_model_is_refused(sources, ckpt, tmp_path):
    victim = ckpt / "iter_0000003" / "mp_rank_00_001" / "distrib_optim.pt"
    shutil.copy(sources["tied_bf16_tp2pp2"].dir / "iter_0000003" / "mp_rank_00_001" / "distrib_optim.pt", victim)
    assert_refused(ckpt, tmp_path / "out", "--target-tensor-parallel-size", "1", optimizer=True,
                   names=victim, says="param_map of the model")


def test_bucket_layout_mismatch_is_refused(ckpt, tmp_path):
    """A file whose buffer holds 64 more elements than the param_map (as a different bucket split
    would leave) must not be loaded with the elements shifted."""
    victim = ckpt / "iter_0000003" / "mp_rank_01_000" / "distrib_optim.pt"
    state = torch.load(victim, weights_only=False)
    for buffer in state[0].values():
        for key in ("param", "exp_avg", "exp_avg_sq"):
            buffer[key] = torch.cat([buffer[key], torch.zeros(64)])
        buffer["numel_unpadded"] += 64
    torch.save(state, victim)
    assert_refused(ckpt, tmp_path / "out", "--target-tensor-parallel-size", "1", optimizer=True,
                   names=victim, says="needs")


def test_missing_optimizer_file_is_refused(ckpt, tmp_path):
    victim = ckpt / "iter_0000003" / "mp_rank_01_001" / "distrib_optim.pt"
    victim.unlink()
    assert_refused(ckpt, tmp_path / "out", "--target-tensor-parallel-size", "1", optimizer=True,
                   names=victim, says="--convert-param-only")
