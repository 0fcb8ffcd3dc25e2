"""Mixtures of experts in Megatron's legacy and torch_dist formats: real megatron-core MoE runs (4
routed experts, top-2, SequentialMLP, the allgather token dispatcher on gloo; one also with a dense
first layer and gated shared experts; one with DeepSeek-V2's Multi-Latent Attention) resharded
across EP, ETP, TP, PP and VPP together, weights and both optimizers' state (the dense one and the
experts' own) bitwise against the run's own ground truth, and training resumed at the new layout
on the uninterrupted run's loss curve."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from ckpt_hooks import convert
from ckpt_hooks.algebra.param_map import BufferMap, mindspeed_file_name, mindspeed_json
from ckpt_hooks.algebra.target import Target
from ckpt_hooks.formats.megatron_legacy import open_checkpoint
from ckpt_hooks.formats.torch_dist import DistCheckpoint as open_dist
from tests.conftest import uninterrupted_losses
from tests.harness import resume_job, run_jobs
from tests.util import assert_refused, assert_same, cli

RESUMED_STEPS = 2

# (source, target layout): every pair changes the expert layout, most of them TP or PP too.
PAIRS = [
    ("moe_pp2ep2", {"tp": 1, "pp": 2, "ep": 1}),                 # EP2 -> EP1: experts join the dense optimizer
    ("moe_pp2ep2", {"tp": 1, "pp": 1, "ep": 4}),                 # one expert per rank, PP off
    ("moe_pp2ep2", {"tp": 2, "pp": 1, "ep": 2, "etp": 1}),       # TP2 with whole experts (ETP1)
    ("moe_pp2ep2", {"tp": 2, "pp": 2, "ep": 1}),                 # experts split by TP (ETP2)
    ("moe_pp2ep2", {"tp": 1, "pp": 2, "vpp": 2, "ep": 2}),       # virtual stages
    ("moe_pp2ep2", {"tp": 2, "pp": 1, "ep": 2}),                 # ETP2 x EP2: expert DP1
    ("moe_tp2ep2etp1", {"tp": 1, "pp": 1, "ep": 1}),             # everything gathered
    ("moe_tp2ep2etp1", {"tp": 2, "pp": 1, "ep": 2, "etp": 2}),   # ETP1 -> ETP2
    ("moe_tp2ep2etp1", {"tp": 1, "pp": 2, "ep": 2}),             # TP -> PP
    ("moe_tp2ep2etp1", {"tp": 1, "pp": 1, "ep": 4}),             # EP2 -> EP4
    ("moe_tp2ep2etp1", {"tp": 4, "pp": 1, "ep": 1, "etp": 4}),   # TP4: each expert split 4 ways
    ("moe_tp2ep2etp1", {"tp": 2, "pp": 1, "ep": 2, "etp": 1}),   # the same layout: must be exact
    # a dense first layer, shared experts with their gate
    ("moe_mixed", {"tp": 1, "pp": 1, "ep": 4}),
    ("moe_mixed", {"tp": 2, "pp": 2, "ep": 1}),
    ("moe_mixed", {"tp": 4, "pp": 1, "ep": 1, "etp": 4}),
    # MindSpeed-LLM's noop layers: layer 3 holds no weights wherever it lands
    ("moe_noop", {"tp": 1, "pp": 1, "ep": 4}),
    ("moe_noop", {"tp": 1, "pp": 4, "ep": 1}),                     # a stage of the noop layer alone
    ("moe_noop", {"tp": 2, "pp": 1, "ep": 2, "etp": 1}),
]


# torch_dist (Megatron-LM's default format) in, out or both; a torch_dist output is loaded by
# megatron-core's own dist_checkpointing.load at the target layout.
DIST_PAIRS = [
    ("dist_moe_pp2ep2", {"tp": 1, "pp": 1, "ep": 4}, "torch_dist"),
    ("dist_moe_pp2ep2", {"tp": 2, "pp": 1, "ep": 2, "etp": 1}, "torch"),
    ("dist_moe_pp2ep2", {"tp": 1, "pp": 2, "ep": 2}, "torch_dist"),              # the same layout
    ("saved_dist_moe_mixed", {"tp": 1, "pp": 2, "ep": 1}, "torch_dist"),
    ("saved_dist_moe_mixed", {"tp": 2, "pp": 1, "ep": 4, "etp": 1}, "torch_dist"),
    ("moe_mixed", {"tp": 1, "pp": 1, "ep": 4}, "torch_dist"),                    # legacy -> torch_dist
    # latent attention (DeepSeek-V2)
    ("dist_latent_moe", {"tp": 2, "pp": 1, "ep": 4, "etp": 1}, "torch"),
    ("dist_latent_moe", {"tp": 2, "pp": 2, "ep": 2, "etp": 1}, "torch_dist"),   # the same layout
]

# Latent attention at another TP (the local spec's down projections split 4 ways, or whole):
# the state bitwise, loaded and not trained on. A training step at another TP is not the same
# function here: the same is seen for a dense MLA model at TP1 or TP4 against TP2 (|Δ loss| ~1e-4
# after one step, the resumed step's own loss exact): Adam turns the summation-order noise of
# near-zero gradients into whole-lr updates.
LATENT_TP = [
    ("dist_latent_moe", {"tp": 4, "pp": 1, "ep": 1, "etp": 4}, "torch_dist"),
    ("dist_latent_moe", {"tp": 1, "pp": 1, "ep": 4}, "torch"),
]

# The experts as megatron-core's legacy GroupedMLP (--moe-grouped-gemm, bf16): two tensors a layer
# holding the local experts' weights transposed, to and from SequentialMLP's. (source, the
# conversions [(target layout, grouped?, format)]); the last output is loaded and trained on.
GROUPED = [
    ("moe_grouped", [({"tp": 1, "pp": 1, "ep": 4}, True, "torch")]),
    ("moe_grouped", [({"tp": 2, "pp": 2, "ep": 1}, True, "torch")]),               # EP1: dense buffers, ETP2
    ("moe_grouped", [({"tp": 2, "pp": 1, "ep": 2, "etp": 1}, False, "torch")]),    # to SequentialMLP
    ("moe_grouped", [({"tp": 1, "pp": 1, "ep": 4}, False, "torch"),                # ... and back, elsewhere
                     ({"tp": 2, "pp": 1, "ep": 2, "etp": 1}, True, "torch")]),
    ("moe_grouped", [({"tp": 1, "pp": 2, "ep": 2}, True, "torch_dist")]),          # megatron-core loads it
    ("dist_moe_grouped", [({"tp": 2, "pp": 1, "ep": 2, "etp": 1}, True, "torch")]),
    ("dist_moe_grouped", [({"tp": 1, "pp": 1, "ep": 4}, False, "torch_dist")]),
]

# Resumed on the fly by ckpt_hooks.megatron.load straight from the source checkpoint (each rank
# reading its own experts' slices), no converted copy.
ON_THE_FLY = [
    ("moe_pp2ep2", {"tp": 1, "pp": 1, "ep": 4}),
    ("moe_pp2ep2", {"tp": 2, "pp": 1, "ep": 2, "etp": 1}),
    ("moe_tp2ep2etp1", {"tp": 1, "pp": 2, "ep": 2}),
    ("moe_tp2ep2etp1", {"tp": 2, "pp": 2, "ep": 1}),
    ("moe_mixed", {"tp": 1, "pp": 2, "ep": 2}),
    ("moe_pp2ep2", {"tp": 1, "pp": 2, "ep": 2}),                 # the same layout: RNG restored too
    ("dist_moe_pp2ep2", {"tp": 2, "pp": 1, "ep": 2, "etp": 1}),
    ("saved_dist_moe_mixed", {"tp": 1, "pp": 2, "ep": 2}),
    ("saved_dist_moe_mixed", {"tp": 2, "pp": 2, "ep": 2, "etp": 1}),   # torch_dist, the same layout
    ("dist_latent_moe", {"tp": 2, "pp": 1, "ep": 4, "etp": 1}),
    ("moe_grouped", {"tp": 2, "pp": 1, "ep": 2, "etp": 1}),
    ("dist_moe_grouped", {"tp": 1, "pp": 1, "ep": 4}),
]


def pair_id(pair) -> str:
    source, target, *ckpt_format = pair
    return f"{source}-to-" + "".join(f"{k}{v}" for k, v in target.items()) + "".join(f"-{f}" for f in ckpt_format)


def grouped_id(case) -> str:
    source, conversions = case
    return source + "".join(f"-to-" + "".join(f"{k}{v}" for k, v in layout.items())
                            + ("-grouped" if grouped else "-sequential") + ("-torch_dist" if fmt == "torch_dist" else "")
                            for layout, grouped, fmt in conversions)


def hook_id(pair) -> str:
    return "hook-" + pair_id(pair)


def target_of(layout: dict, grouped: bool | None = None) -> Target:
    return Target(tp=layout["tp"], pp=layout["pp"], vpp=layout.get("vpp"), ep=layout["ep"], etp=layout.get("etp"),
                  moe_grouped_gemm=grouped)


@pytest.fixture(scope="module")
def resumed(sources, tmp_path_factory):
    """Every pair converted with its optimizer state, loaded as Megatron-LM loads a legacy
    checkpoint at the target layout, checked against the source run's truth, and trained on."""
    root = tmp_path_factory.mktemp("moe")
    jobs, results = [], {}
    for pair in PAIRS:
        source, layout = sources[pair[0]], pair[1]
        out = root / pair_id(pair)
        convert(source.dir, out, target_of(layout), quiet=True)
        results[pair_id(pair)] = root / f"{pair_id(pair)}.json"
        jobs.append(resume_job(layout, out, source.truth, results[pair_id(pair)], model=source.model,
                               steps=RESUMED_STEPS))
    for pair in DIST_PAIRS + LATENT_TP:
        source, layout, ckpt_format = sources[pair[0]], pair[1], pair[2]
        out = root / pair_id(pair)
        convert(source.dir, out, target_of(layout), quiet=True, ckpt_format=ckpt_format)
        results[pair_id(pair)] = root / f"{pair_id(pair)}.json"
        jobs.append(resume_job(layout, out, source.truth, results[pair_id(pair)], model=source.model,
                               steps=0 if pair in LATENT_TP else RESUMED_STEPS,
                               loader="megatron_core_dist" if ckpt_format == "torch_dist" else "megatron"))
    for case in GROUPED:
        source, load_dir = sources[case[0]], sources[case[0]].dir
        for n, (layout, grouped, ckpt_format) in enumerate(case[1]):
            out = root / f"{grouped_id(case)}.{n}"
            convert(load_dir, out, target_of(layout, grouped), quiet=True, ckpt_format=ckpt_format)
            load_dir = out
        results[grouped_id(case)] = root / f"{grouped_id(case)}.json"
        jobs.append(resume_job(layout, out, source.truth, results[grouped_id(case)],
                               model={**source.model, "grouped_gemm": grouped}, steps=RESUMED_STEPS,
                               loader="megatron_core_dist" if ckpt_format == "torch_dist" else "megatron"))
    for pair in ON_THE_FLY:
        source, layout = sources[pair[0]], pair[1]
        results[hook_id(pair)] = root / f"{hook_id(pair)}.json"
        jobs.append(resume_job(layout, source.dir, source.truth, results[hook_id(pair)], model=source.model,
                               steps=RESUMED_STEPS, loader="ckpt_hooks"))
    run_jobs(jobs, root / "logs")
    return {key: json.loads(path.read_text()) for key, path in results.items()}


@pytest.mark.parametrize("pair", PAIRS, ids=pair_id)
def test_experts_reshard_bitwise_and_training_continues(sources, resumed, pair):
    """Weights, fp32 main params and both Adam moments of every expert and dense parameter equal
    the source run's, bit for bit (routing flips on the smallest error, so this is the check that
    matters); the next steps' losses are the uninterrupted run's."""
    check_resumed(sources, resumed[pair_id(pair)], pair)


@pytest.mark.parametrize("pair", DIST_PAIRS, ids=pair_id)
def test_torch_dist_experts_reshard_bitwise_and_training_continues(sources, resumed, pair):
    """Megatron-LM's default format: the chained optimizers' dp_reshardable buckets (dense and
    expert, each in its own model-parallel group's numbering) read through the param_map, rebuilt
    or recorded; written so that megatron-core's own loader takes them."""
    check_resumed(sources, resumed[pair_id(pair)], pair)


@pytest.mark.parametrize("pair", LATENT_TP, ids=pair_id)
def test_latent_attention_reshards_across_tp_bitwise(resumed, pair):
    check_state(resumed[pair_id(pair)])


@pytest.mark.parametrize("case", GROUPED, ids=grouped_id)
def test_grouped_experts_reshard_bitwise_and_training_continues(sources, resumed, case):
    """GroupedMLP's transposed blocks, in the weights and in the optimizer's buckets, become
    SequentialMLP's tensors and back: bitwise, and the loss curve goes on."""
    source, conversions = case
    layout, grouped, _ = conversions[-1]
    check_resumed(sources, resumed[grouped_id(case)], (source, layout))


@pytest.mark.parametrize("pair", ON_THE_FLY, ids=hook_id)
def test_experts_reshard_on_the_fly_when_training_resumes(sources, resumed, pair):
    """The load hook, at a new EP/ETP/TP/PP: the same bitwise state and loss curve."""
    check_resumed(sources, resumed[hook_id(pair)], pair)


def check_state(result: dict) -> None:
    """Every weight and both optimizers' state loaded equal the source run's, bit for bit."""
    assert result["load_error"] is None, result["load_error"]
    assert result["weight_mismatches"] == [] and result["optim_mismatches"] == [], result
    assert result["missing"] == [] and result["extra"] == [] and result["args_mismatches"] == [], result
    assert result["ok"]


def check_resumed(sources, result: dict, pair) -> None:
    check_state(result)
    want = uninterrupted_losses(sources, pair[0], RESUMED_STEPS)
    got = result["losses"]
    assert len(got) == RESUMED_STEPS
    if pair[1] == sources[pair[0]].layout:
        assert got == want   # same layout: bit for bit
    else:
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5, (got, want)


def test_the_files_megatron_lm_names(sources, tmp_path):
    """mp_rank_TT_EEE without pipeline stages (told from mp_rank_TT_PPP by the args), the
    three-part name with them; with ETP1 inside TP2 only the first expert-DP replica's files."""
    assert sorted(p.name for p in (sources["moe_tp2ep2etp1"].dir / "iter_0000003").iterdir()) == \
        ["mp_rank_00_000", "mp_rank_01_001"]
    out = tmp_path / "out"
    convert(sources["moe_tp2ep2etp1"].dir, out, Target(tp=1, pp=2, ep=2), quiet=True, convert_param_only=True)
    assert sorted(p.name for p in (out / "iter_0000003").iterdir() if p.is_dir()) == \
        ["mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000", "mp_rank_00_001_001"]


def test_torch_dist_names_and_recorded_param_maps(sources, tmp_path):
    """ckpt_hooks.megatron.save records each file rank's param_map under its legacy name
    (mp_rank_TT_PPP_EEE); a converted torch_dist checkpoint has one .distcp per expert
    model-parallel rank, the dense and expert buffers under megatron-core's chained keys."""
    hooks = sources["saved_dist_moe_mixed"].dir / "iter_0000003" / "ckpt_hooks"
    assert sorted(p.parent.name for p in hooks.glob("*/param_map.json")) == \
        ["mp_rank_00_000_000", "mp_rank_00_001_000", "mp_rank_01_000_001", "mp_rank_01_001_001"]
    out = tmp_path / "out"
    convert(sources["dist_moe_pp2ep2"].dir, out, Target(tp=2, pp=1, ep=4, etp=1), quiet=True)
    iter_dir = out / "iter_0000003"
    assert sorted(p.name for p in iter_dir.glob("*.distcp")) == [f"__{i}_0.distcp" for i in range(4)]
    keys = open_dist(iter_dir).tensors
    assert {k.split(".optimizer.")[0] for k in keys if ".optimizer." in k} == {"chained_0", "chained_1"}
    assert "decoder.layers.mlp.experts.experts.linear_fc1.weight" in keys


def test_round_trip_gives_back_the_same_files(sources, tmp_path):
    """TP1·PP2·EP2 -> TP2·EP2·ETP1 -> back: every model tensor and the optimizer's flat buffers
    are the source's own, in the same order."""
    source = sources["moe_pp2ep2"].dir
    convert(source, tmp_path / "a", Target(tp=2, pp=1, ep=2, etp=1), quiet=True)
    convert(tmp_path / "a", tmp_path / "b", Target(tp=1, pp=2, ep=2, etp=1), quiet=True)
    original, back = open_checkpoint(source), open_checkpoint(tmp_path / "b")
    assert list(original.files) == list(back.files)
    for rank, f in original.files.items():
        mine = torch.load(f.path, weights_only=False)
        theirs = torch.load(back.files[rank].path, weights_only=False)
        assert_same(mine["model"], theirs["model"], str(rank))
        optim = Path(f.path).parent / "distrib_optim.pt"
        assert_same(torch.load(optim, weights_only=False),
                    torch.load(Path(back.files[rank].path).parent / "distrib_optim.pt", weights_only=False), str(rank))


# Bad input: one line naming the file or flag, nothing written, the source untouched.

@pytest.fixture
def ckpt(sources, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(sources["moe_tp2ep2etp1"].dir, copy)
    return copy


def test_a_missing_expert_rank_is_refused(ckpt, tmp_path):
    victim = ckpt / "iter_0000003" / "mp_rank_01_001"
    shutil.rmtree(victim)
    assert_refused(ckpt, tmp_path / "out", "--ep-size", "1", names=victim, says="missing rank directory")


def test_an_expert_rank_megatron_lm_would_not_write_is_refused(ckpt, tmp_path):
    """With ETP1 inside TP2, mp_rank_01_000 is no writer's: a stray copy is named, not read."""
    stray = ckpt / "iter_0000003" / "mp_rank_01_000"
    shutil.copytree(ckpt / "iter_0000003" / "mp_rank_01_001", stray)
    assert_refused(ckpt, tmp_path / "out", "--ep-size", "1", names=stray, says="unexpected rank directory")


def test_expert_dense_optimizer_held_by_no_file_is_refused(ckpt, tmp_path):
    """A chained distrib_optim.pt whose dense entry is None on the dense DP rank 0 leaves the
    dense parameters without state: refused, naming the file."""
    victim = ckpt / "iter_0000003" / "mp_rank_01_001" / "distrib_optim.pt"
    state = torch.load(victim, weights_only=False)
    assert isinstance(state, list) and state[0] is not None
    torch.save([None, state[1]], victim)
    assert_refused(ckpt, tmp_path / "out", "--ep-size", "1", optimizer=True, names=victim,
                   says="holds the optimizer state")


@pytest.mark.parametrize("change, says", [
    (lambda model: model.pop("decoder.layers.0.mlp.experts.weight2"), "without 'decoder.layers.0.mlp.experts.weight2'"),
    (lambda model: model.update({"decoder.layers.0.mlp.experts.weight1": torch.zeros(64, 63)}),
     "does not hold 2 experts"),
])
def test_malformed_grouped_experts_are_refused(sources, tmp_path, change, says):
    """A GroupedMLP layer with one of its two tensors, or a tensor that does not split into the
    args' experts per rank: one line naming the file."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(sources["moe_grouped"].dir, ckpt)
    victim = ckpt / "iter_0000003" / "mp_rank_00_000_001" / "model_optim_rng.pt"
    state = torch.load(victim, weights_only=False)
    change(state["model"])
    torch.save(state, victim)
    assert_refused(ckpt, tmp_path / "out", "--ep-size", "1", names=victim, says=says)


def test_weights_of_a_noop_layer_are_refused(sources, tmp_path):
    """A rank file holding a tensor of a layer its args make a noop layer: one line naming it."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(sources["moe_noop"].dir, ckpt)
    victim = ckpt / "iter_0000003" / "mp_rank_00_001_000" / "model_optim_rng.pt"   # layers 2 and 3 (noop)
    state = torch.load(victim, weights_only=False)
    state["model"]["decoder.layers.1.input_layernorm.weight"] = state["model"]["decoder.layers.0.input_layernorm.weight"]
    torch.save(state, victim)
    assert_refused(ckpt, tmp_path / "out", "--ep-size", "1", names=victim, says="of layer 3, which the args make a noop")


@pytest.mark.parametrize("flags, says", [
    (("--ep-size", "3"), "does not divide the 4 experts"),
    (("--tp-size", "2", "--pp-size", "2", "--ep-size", "1", "--etp-size", "1"), "ETP <= TP <= EP x ETP"),
    (("--tp-size", "1", "--etp-size", "2"), "ETP <= TP <= EP x ETP"),
])
def test_expert_layouts_megatron_lm_cannot_save_are_refused(sources, tmp_path, flags, says):
    result = cli("convert", "--load-dir", sources["moe_tp2ep2etp1"].dir, "--save-dir", tmp_path / "out",
                 "--quiet", *flags)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert says in result.stderr and "--target-e" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_verify_certifies_an_expert_layout_change(sources, tmp_path):
    """`ckpt-hooks verify` compares every expert's weights and optimizer state across layouts."""
    out = tmp_path / "out"
    convert(sources["moe_mixed"].dir, out, Target(tp=1, pp=1, ep=4), quiet=True)
    result = cli("verify", sources["moe_mixed"].dir, out, "--quiet")
    assert result.returncode == 0 and "EQUAL" in result.stdout, result.stdout + result.stderr


def test_verify_certifies_the_same_run_saved_in_both_formats(sources):
    """The moe_mixed run saved as legacy files by megatron-core and as torch_dist by
    ckpt_hooks.megatron.save: two readers agree on every weight and both optimizers' state."""
    result = cli("verify", sources["moe_mixed"].dir, sources["saved_dist_moe_mixed"].dir, "--quiet")
    assert result.returncode == 0 and "EQUAL" in result.stdout, result.stdout + result.stderr


def test_export_param_map_per_expert_rank(sources, tmp_path):
    """MindSpeed-Core-MS's param_map files of every file rank, dense and expert buffers, each the
    live buffer's layout recorded in the run (numbered by the expert-DP ranks for experts)."""
    source = sources["moe_pp2ep2"]
    result = cli("export-param-map", "--load-dir", source.dir, "--save-dir", tmp_path / "maps")
    assert result.returncode == 0, result.stderr
    for rank in torch.load(source.truth, weights_only=False)["param_map"]:
        directory = tmp_path / "maps" / f"mp_rank_{rank['tp_rank']:02d}_{rank['pp_rank']:03d}_{rank['ep_rank']:03d}"
        for index, buffer in enumerate(rank["buffers"]):
            live = mindspeed_json(BufferMap.from_json(buffer))
            for dp_rank in range(buffer["dp_size"]):
                name = mindspeed_file_name(index, dp_rank, rank["tp_rank"], rank["pp_rank"], buffer["chunk"])
                assert json.loads((directory / name).read_text()) == json.loads(json.dumps(live)), name
