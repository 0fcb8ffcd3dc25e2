"""ckpt_hooks.patches.megatron_lm with Megatron-LM's own, unmodified pretrain_gpt.py (CPU, gloo).

Megatron-LM is not on PyPI and none of it is committed: these tests run only when
CKPT_HOOKS_MEGATRON_LM names a checkout (tag core_v0.16.1, matching megatron-core 0.16.1):

    git clone -b core_v0.16.1 https://github.com/NVIDIA/Megatron-LM /path/to/Megatron-LM
    CKPT_HOOKS_MEGATRON_LM=/path/to/Megatron-LM ./run.sh test tests/test_megatron_lm.py

A run trains 3 of 6 iterations at TP2·PP2 and stops (--exit-interval); resumed through the
patch at other layouts it must continue the loss curve of the uninterrupted run.
"""

import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.harness import run_megatron_lm
from tests.util import tree_digest

MEGATRON_LM = os.environ.get("CKPT_HOOKS_MEGATRON_LM")
pytestmark = pytest.mark.skipif(not MEGATRON_LM or not (Path(MEGATRON_LM) / "pretrain_gpt.py").is_file(),
                                reason="set CKPT_HOOKS_MEGATRON_LM to a Megatron-LM checkout (core_v0.16.1)")

# NullTokenizer adds one token: 256 rows, padded to 256 at TP 1, 2 and 4 (the same model at every TP).
COMMON = """--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32
 --micro-batch-size 2 --global-batch-size 8 --train-iters 6 --lr 1e-3 --min-lr 1e-3 --lr-decay-style constant
 --weight-decay 0.01 --clip-grad 1.0 --seed 1234 --hidden-dropout 0 --attention-dropout 0 --log-interval 1
 --eval-iters 0 --eval-interval 1000 --use-distributed-optimizer --ckpt-format torch --distributed-backend gloo
 --transformer-impl local --attention-backend unfused --no-gradient-accumulation-fusion --no-masked-softmax-fusion
 --no-bias-swiglu-fusion --no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm --num-workers 0
 --mock-data --tokenizer-type NullTokenizer --vocab-size 255 --make-vocab-size-divisible-by 64 --split 100,0,0""".split()
STOP = 3
LAYOUTS = {  # 4 processes; DP fills the rest
    "tp2pp2": ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2],
    "tp1pp2dp2": ["--tensor-model-parallel-size", 1, "--pipeline-model-parallel-size", 2],
    "tp4pp1": ["--tensor-model-parallel-size", 4, "--pipeline-model-parallel-size", 1],
    "tp1pp2vpp2dp2": ["--tensor-model-parallel-size", 1, "--pipeline-model-parallel-size", 2,
                      "--num-layers-per-virtual-pipeline-stage", 1],
    "tp1pp1dp4": ["--tensor-model-parallel-size", 1, "--pipeline-model-parallel-size", 1],
    "tp2pp1dp2": ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 1],
    "tp1pp2ep2": ["--tensor-model-parallel-size", 1, "--pipeline-model-parallel-size", 2,
                  "--expert-model-parallel-size", 2],
    "tp1pp1ep4": ["--tensor-model-parallel-size", 1, "--pipeline-model-parallel-size", 1,
                  "--expert-model-parallel-size", 4],
    "tp1pp1ep2dp4": ["--tensor-model-parallel-size", 1, "--pipeline-model-parallel-size", 1,
                     "--expert-model-parallel-size", 2],
}


class Runs(NamedTuple):
    work: Path
    uninterrupted: dict   # {iteration: lm loss}
    common: list          # the arguments every launch of this format shares


def train_and_stop(work: Path, common: list, layout: str = "tp2pp2") -> Runs:
    """The uninterrupted run (also saving a plain, hook-less checkpoint at STOP) and the hooked
    run that stops at STOP."""
    save = ["--save-interval", STOP]
    plain = run_megatron_lm(MEGATRON_LM, "plain", common + LAYOUTS[layout] + save + ["--save", work / "plain"],
                            work, "uninterrupted")
    hooked = run_megatron_lm(MEGATRON_LM, "hooks", common + LAYOUTS[layout] + save +
                             ["--exit-interval", STOP, "--save", work / "hooked"], work, "hooked")
    for rc, losses, log in (plain, hooked):
        assert rc == 0, log[-3000:]
    assert sorted(hooked[1]) == [1, 2, 3] and all(hooked[1][i] == plain[1][i] for i in (1, 2, 3))
    return Runs(work, plain[1], common)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return train_and_stop(tmp_path_factory.mktemp("megatron_lm"), COMMON)


def resume(runs: Runs, layout: str, source: str = "hooked", mode: str = "hooks", extra=(), fault=None):
    return run_megatron_lm(MEGATRON_LM, mode, runs.common + LAYOUTS[layout] + ["--load", runs.work / source, *extra],
                           runs.work, f"resume-{source}-{layout}-{mode}{'-' + fault if fault else ''}", fault=fault)


def assert_continues(runs, rc, losses, log):
    assert rc == 0, log[-3000:]
    uninterrupted = runs.uninterrupted
    assert sorted(losses) == [4, 5, 6], log[-3000:]
    assert max(abs(losses[i] - uninterrupted[i]) for i in losses) <= 1e-5, (losses, uninterrupted)


def test_hooked_save_writes_manifest_and_param_maps(runs):
    iter_dir = runs.work / "hooked" / f"iter_{STOP:07d}"
    assert (iter_dir / "ckpt_hooks_manifest.json").is_file()
    for rank_dir in sorted(iter_dir.glob("mp_rank_*")):
        assert (rank_dir / "param_map.json").is_file() and any((rank_dir / "param_map").iterdir())
    assert not list((runs.work / "plain" / f"iter_{STOP:07d}").glob("*.json"))


@pytest.mark.parametrize("layout", ["tp1pp2dp2", "tp4pp1", "tp1pp2vpp2dp2", "tp1pp1dp4"])
def test_resume_at_another_layout_continues_the_loss_curve(runs, layout):
    rc, losses, log = resume(runs, layout)
    assert "ckpt_hooks: resharded" in log
    assert_continues(runs, rc, losses, log)


def test_same_layout_is_left_to_megatron_lm(runs):
    rc, losses, log = resume(runs, "tp2pp2")
    assert "ckpt_hooks: resharded" not in log
    assert_continues(runs, rc, losses, log)


@pytest.mark.parametrize("saved", ["runs", "dist_runs"])
def test_checkpoint_saved_without_hooks_resumes_at_another_layout(request, saved):
    """Either format. The uninterrupted run saved iterations 3 and 6: --ckpt-step picks 3."""
    runs = request.getfixturevalue(saved)
    rc, losses, log = resume(runs, "tp4pp1", source="plain", extra=["--ckpt-step", STOP])
    assert "ckpt_hooks: resharded" in log
    assert_continues(runs, rc, losses, log)


def test_megatron_lm_alone_trains_nothing_after_a_pp_change(runs):
    """The negative control: what the patch is for."""
    rc, losses, log = resume(runs, "tp2pp1dp2", mode="plain")
    assert rc == 0 and losses == {} and "could not load the checkpoint" in log


def test_missing_rank_stops_every_rank_with_one_error(runs):
    work = runs.work
    broken = work / "broken"
    shutil.copytree(work / "hooked", broken)
    shutil.rmtree(broken / f"iter_{STOP:07d}" / "mp_rank_01_001")
    before = sorted(p.relative_to(broken) for p in broken.rglob("*"))
    rc, losses, log = resume(runs, "tp4pp1", source="broken")
    assert rc != 0 and losses == {}
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4 and all("mp_rank_01_001" in e and "missing" in e for e in errors), errors
    assert sorted(p.relative_to(broken) for p in broken.rglob("*")) == before


def test_a_failed_read_on_one_rank_stops_every_rank_with_its_line(runs):
    """EIO under rank 1 alone (a failing disk, a network filesystem): every rank stops with rank
    1's line, naming the file; the checkpoint is untouched."""
    before = tree_digest(runs.work / "hooked")
    rc, losses, log = resume(runs, "tp4pp1", fault="eio:1")
    assert rc != 0 and losses == {}, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4 and len(set(errors)) == 1, errors
    assert errors[0].startswith(f"error: {runs.work / 'hooked'}/") and errors[0].endswith(": Input/output error"), errors
    assert tree_digest(runs.work / "hooked") == before


def test_a_rank_killed_in_the_load_leaves_no_rank_waiting(runs):
    """SIGKILL of rank 1 while it reads (a lost node, the OOM killer): torchrun stops the other
    ranks (waiting for it in the load's agreement) at once, not after a collective's timeout;
    nothing is trained or saved, the checkpoint is untouched."""
    before = tree_digest(runs.work / "hooked")
    started = time.monotonic()
    rc, losses, log = resume(runs, "tp4pp1", fault="kill:1", extra=["--save", runs.work / "after-kill", "--save-interval", 1000])
    assert rc != 0 and losses == {}, log[-3000:]
    assert time.monotonic() - started < 300, "a rank waited for the killed one"
    assert "Signal 9 (SIGKILL) received by PID" in log or "exitcode  : -9" in log, log[-3000:]
    assert not (runs.work / "after-kill").exists()
    assert tree_digest(runs.work / "hooked") == before


# ---- torch_dist, Megatron-LM's default format (default dp_reshardable optimizer state) -----------

DIST = [("torch_dist" if a == "torch" and COMMON[i - 1] == "--ckpt-format" else a) for i, a in enumerate(COMMON)]


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    return train_and_stop(tmp_path_factory.mktemp("megatron_lm_dist"), DIST)


def test_torch_dist_hooked_save_records_param_maps_and_manifest(dist_runs):
    iter_dir = dist_runs.work / "hooked" / f"iter_{STOP:07d}"
    assert (iter_dir / ".metadata").is_file()
    recorded = sorted(p.parent.name for p in (iter_dir / "ckpt_hooks").glob("mp_rank_*/param_map.json"))
    assert recorded == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert (iter_dir / "ckpt_hooks_manifest.json").is_file()
    assert not (dist_runs.work / "plain" / f"iter_{STOP:07d}" / "ckpt_hooks").exists()


@pytest.mark.parametrize("layout", ["tp1pp2dp2", "tp4pp1", "tp1pp2vpp2dp2", "tp1pp1dp4", "tp2pp2"])
def test_torch_dist_resume_continues_the_loss_curve(dist_runs, layout):
    rc, losses, log = resume(dist_runs, layout)
    assert ("ckpt_hooks: resharded" if layout != "tp2pp2" else "ckpt_hooks: loaded") in log, log[-3000:]
    assert_continues(dist_runs, rc, losses, log)


def test_megatron_lm_alone_refuses_a_torch_dist_tp_change(dist_runs):
    """The negative control: dp_reshardable state cannot change TP/PP in Megatron-LM."""
    rc, losses, log = resume(dist_runs, "tp1pp2dp2", mode="plain")
    assert rc != 0 and losses == {} and "(TP, PP) mismatch after resume" in log


# ---- mixtures of experts (legacy format): EP changes ---------------------------------------------

# 4 experts, top-2, the allgather token dispatcher (gloo); TP1 (MoE with TP > 1 needs
# --sequence-parallel, which the local spec's norms refuse on Megatron-LM's own path); SwiGLU
# without biases (with GELU megatron-core 0.16.1 demands its fused bias kernels for experts, and
# at EP1 an expert's fc2 bias is added in place to a view autograd forbids).
MOE = COMMON + "--swiglu --disable-bias-linear --num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 64 --moe-token-dispatcher-type allgather".split()


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    return train_and_stop(tmp_path_factory.mktemp("megatron_lm_moe"), MOE, layout="tp1pp2ep2")


@pytest.mark.parametrize("layout", ["tp1pp2dp2", "tp1pp1ep4", "tp1pp1ep2dp4"])
def test_moe_resumes_at_another_expert_layout(moe_runs, layout):
    """EP2·PP2 resumed at EP1 (experts back in the dense optimizer), EP4 and EP2·DP4 without PP."""
    rc, losses, log = resume(moe_runs, layout)
    assert "ckpt_hooks: resharded" in log, log[-3000:]
    assert_continues(moe_runs, rc, losses, log)


def test_moe_same_layout_resumes_through_ckpt_hooks(moe_runs):
    """At EP > 1 the patch loads even the saved layout: Megatron-LM's own load of the chained
    optimizers fails with fp32 params (below)."""
    rc, losses, log = resume(moe_runs, "tp1pp2ep2")
    assert "ckpt_hooks: loaded" in log and "RNG state restored" in log, log[-3000:]
    assert_continues(moe_runs, rc, losses, log)


def test_megatron_lm_alone_cannot_resume_moe_at_the_same_layout(moe_runs):
    """The negative control: megatron-core 0.16.1's ChainedOptimizer.load_parameter_state copies
    into fp32 main params (views of the model's leaf params) without torch.no_grad."""
    rc, losses, log = resume(moe_runs, "tp1pp2ep2", mode="plain")
    assert rc != 0 and losses == {} and "a view of a leaf Variable that requires grad" in log


def test_megatron_lm_alone_trains_nothing_after_an_ep_change(moe_runs):
    """The negative control (the issue's symptom): EP2 -> EP1 'could not load', exit 0, no training."""
    rc, losses, log = resume(moe_runs, "tp1pp2dp2", mode="plain")
    assert rc == 0 and losses == {} and "could not load the checkpoint" in log


# ---- mixtures of experts in torch_dist: the chained optimizers' dp_reshardable state ----------

MOE_DIST = [("torch_dist" if a == "torch" and MOE[i - 1] == "--ckpt-format" else a) for i, a in enumerate(MOE)]


@pytest.fixture(scope="module")
def moe_dist_runs(tmp_path_factory):
    return train_and_stop(tmp_path_factory.mktemp("megatron_lm_moe_dist"), MOE_DIST, layout="tp1pp2ep2")


def test_moe_torch_dist_hooked_save_records_each_expert_rank_param_map(moe_dist_runs):
    iter_dir = moe_dist_runs.work / "hooked" / f"iter_{STOP:07d}"
    recorded = sorted(p.parent.name for p in (iter_dir / "ckpt_hooks").glob("mp_rank_*/param_map.json"))
    assert recorded == ["mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000", "mp_rank_00_001_001"]
    assert (iter_dir / "ckpt_hooks_manifest.json").is_file()


@pytest.mark.parametrize("layout", ["tp1pp2dp2", "tp1pp1ep4", "tp1pp2ep2"])
def test_moe_torch_dist_resume_continues_the_loss_curve(moe_dist_runs, layout):
    """EP2·PP2 torch_dist resumed at EP1, EP4 without PP, and the saved layout."""
    rc, losses, log = resume(moe_dist_runs, layout)
    assert ("ckpt_hooks: resharded" if layout != "tp1pp2ep2" else "ckpt_hooks: loaded") in log, log[-3000:]
    assert_continues(moe_dist_runs, rc, losses, log)


@pytest.mark.parametrize("layout", ["tp1pp2dp2", "tp1pp2ep2"])
def test_megatron_lm_alone_cannot_resume_a_torch_dist_moe(moe_dist_runs, layout):
    """The negative control: Megatron-LM's own load of its torch_dist MoE checkpoint, at EP1 and
    at the saved layout, stops in the chained optimizers' sharded_state_dict (megatron-core
    0.16.1's DistributedOptimizer.state_dict asserts one Adam step before any state exists)."""
    rc, losses, log = resume(moe_dist_runs, layout, mode="plain")
    assert rc != 0 and losses == {} and "assert len(steps) == 1" in log, log[-3000:]


# ---- DeepSeek-V2's shape: latent attention and experts, torch_dist ---------------------------

# Multi-Latent Attention with a q latent (its core attention the CPU shim's), a first dense layer,
# shared experts; resumed with TP2 and sequence parallelism (megatron-core's MoE needs it at TP > 1).
LATENT_MOE = MOE_DIST + """--multi-latent-attention --q-lora-rank 32 --kv-lora-rank 16 --qk-head-dim 16
 --qk-pos-emb-head-dim 8 --v-head-dim 16 --qk-layernorm --rope-type rope --position-embedding-type rope
 --moe-layer-freq [0,1,1,1] --moe-shared-expert-intermediate-size 64""".split()
LAYOUTS["tp2pp1ep2etp1sp"] = ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 1,
                              "--expert-model-parallel-size", 2, "--expert-tensor-parallel-size", 1,
                              "--sequence-parallel"]


# ---- grouped-GEMM experts: megatron-core's legacy GroupedMLP (--moe-grouped-gemm) -------------------

# Its weight1/weight2 hold each expert's weights transposed, in the model file and in the optimizer's
# buckets. The grouped_gemm kernels are the harness's plain-torch stand-in, which runs fp32 too.
GROUPED = MOE + ["--moe-grouped-gemm"]
VARIANTS = {"latent_moe": LATENT_MOE, "grouped": GROUPED}


@pytest.fixture(scope="module", params=VARIANTS)
def variant_runs(request, tmp_path_factory):
    """A MoE variant (latent attention; grouped experts) trained at TP1·PP2·EP2 and stopped."""
    return train_and_stop(tmp_path_factory.mktemp(f"megatron_lm_{request.param}"), VARIANTS[request.param],
                          layout="tp1pp2ep2")


@pytest.mark.parametrize("layout", ["tp1pp1ep4", "tp2pp1ep2etp1sp"])
def test_moe_variant_resumes_at_another_layout(variant_runs, layout):
    rc, losses, log = resume(variant_runs, layout)
    assert "ckpt_hooks: resharded" in log, log[-3000:]
    assert_continues(variant_runs, rc, losses, log)
