"""Real Megatron checkpoints for the tests: trained once per session, in one torchrun launch."""

import pytest
import torch

from tests.harness import run_jobs, train_job

# A vocabulary that pads to 128 rows at TP 1, 2 and 4, so that a TP change keeps the model
# the same function and a resumed run can continue the loss curve exactly.
SAME_PADDING = {"vocab_size": 127}
# A mixture of 4 routed experts (top-2) in every layer.
MOE = {**SAME_PADDING, "experts": 4}
# DeepSeek's shape: a first dense layer, then MoE layers with a shared expert (Qwen2-MoE's gate on it).
MOE_MIXED = {**MOE, "shared_ffn": 64, "shared_gate": True, "moe_layer_freq": [0, 1, 1, 1]}
# The experts as megatron-core's legacy GroupedMLP (--moe-grouped-gemm; in fp32 through the
# harness's grouped_gemm stand-in, bf16 in the Megatron-LM tests).
MOE_GROUPED = {**MOE, "grouped_gemm": True}
# MindSpeed-LLM's noop layers (--noop-layers): the last of the 4 layers has no weights.
MOE_NOOP = {**MOE, "noop_layers": [3]}
# DeepSeek-V2's shape: Multi-Latent Attention (a q latent too), a first dense layer, ungated shared experts.
LATENT_MOE = {**MOE, "query_groups": 4, "shared_ffn": 64, "moe_layer_freq": [0, 1, 1, 1],
              "mla": {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_head_dim": 16, "qk_pos_emb_head_dim": 8,
                      "v_head_dim": 16}}

# name -> (layout, model overrides, steps). Each trains real steps with the DistributedOptimizer
# on a world of 4 processes (DP fills the rest) and saves a Megatron-LM legacy checkpoint; those
# in TRAINED_ON train on after the save, the uninterrupted run a resumed one must follow.
SOURCES = {
    "tp2pp2": ({"tp": 2, "pp": 2}, {}, 3),
    "tp1pp2vpp2": ({"tp": 1, "pp": 2, "vpp": 2}, {}, 3),
    "tp4pp1": ({"tp": 4, "pp": 1}, {}, 3),
    "tp1pp4": ({"tp": 1, "pp": 4}, {}, 3),
    "uneven13": ({"tp": 1, "pp": 2, "first": 1, "last": 3}, {}, 3),
    "tied_bf16_tp2pp2": ({"tp": 2, "pp": 2}, {"untie_embeddings": False, "dtype": "bf16"}, 3),
    # Loss continuity: 3 steps to resume from, then on to step 5 (and that run saved at step 5).
    "cont_tp2pp2": ({"tp": 2, "pp": 2}, SAME_PADDING, 3),
    "cont_tp2pp2_5steps": ({"tp": 2, "pp": 2}, SAME_PADDING, 5),
    "cont_tp1pp2vpp2": ({"tp": 1, "pp": 2, "vpp": 2}, SAME_PADDING, 3),
    # The same run as cont_tp1pp2vpp2, saved with ckpt_hooks.patches.megatron_core installed.
    "hooked_tp1pp2vpp2": ({"tp": 1, "pp": 2, "vpp": 2}, SAME_PADDING, 3),
    # The same run as cont_tp2pp2, saved by ckpt_hooks.megatron.save (manifest, param_maps).
    "saved_tp2pp2": ({"tp": 2, "pp": 2}, SAME_PADDING, 3),
    # The cont_tp2pp2 run saved as torch_dist, Megatron-LM's default format, with its default
    # dp_reshardable optimizer state, and with --dist-ckpt-optim-fully-reshardable.
    "dist_tp2pp2": ({"tp": 2, "pp": 2}, SAME_PADDING, 3),
    "distfull_tp2pp2": ({"tp": 2, "pp": 2}, SAME_PADDING, 3),
    # ... and saved as torch_dist by ckpt_hooks.megatron.save (param_maps recorded).
    "saved_dist_tp2pp2": ({"tp": 2, "pp": 2}, SAME_PADDING, 3),
    # The cont_tp1pp2vpp2 run saved as torch_dist by megatron-core: with DP2 each rank writes half
    # of the records, so the index lists tensors in no model order (no param_map recorded).
    "dist_tp1pp2vpp2": ({"tp": 1, "pp": 2, "vpp": 2}, SAME_PADDING, 3),
    # torch_dist with bf16 params (fp32 main params in the buckets) and tied embeddings.
    "dist_tied_bf16_tp2pp2": ({"tp": 2, "pp": 2}, {"untie_embeddings": False, "dtype": "bf16"}, 3),
    # Mixtures of experts: EP2 over PP2 (dense DP2, expert DP1), and EP2 with ETP1 inside TP2
    # (files mp_rank_00_000 and mp_rank_01_001 only).
    "moe_pp2ep2": ({"tp": 1, "pp": 2, "ep": 2}, MOE, 3),
    "moe_tp2ep2etp1": ({"tp": 2, "pp": 1, "ep": 2, "etp": 1}, MOE, 3),
    "moe_mixed": ({"tp": 2, "pp": 2, "ep": 2, "etp": 1}, MOE_MIXED, 3),
    # Grouped-GEMM experts (weight1/weight2), legacy, and as torch_dist by megatron-core (DP2: no
    # param_map, each dense bucket saved from both DP ranks).
    "moe_grouped": ({"tp": 1, "pp": 2, "ep": 2}, MOE_GROUPED, 3),
    "moe_noop": ({"tp": 1, "pp": 2, "ep": 2}, MOE_NOOP, 3),
    "dist_moe_grouped": ({"tp": 1, "pp": 2, "ep": 2}, MOE_GROUPED, 3),
    # The moe_pp2ep2 run saved as torch_dist by megatron-core (chained optimizers' dp_reshardable
    # buckets, no param_map: dense DP2 saves each bucket from both DP ranks), and the moe_mixed
    # run saved as torch_dist by ckpt_hooks.megatron.save (one key per layer: dense and MoE mixed).
    "dist_moe_pp2ep2": ({"tp": 1, "pp": 2, "ep": 2}, MOE, 3),
    "saved_dist_moe_mixed": ({"tp": 2, "pp": 2, "ep": 2, "etp": 1}, MOE_MIXED, 3),
    # Latent attention with experts, saved as torch_dist.
    "dist_latent_moe": ({"tp": 2, "pp": 2, "ep": 2, "etp": 1}, LATENT_MOE, 3),
}
TRAINED_ON = {"cont_tp1pp2vpp2", "moe_pp2ep2", "moe_tp2ep2etp1", "moe_mixed", "moe_grouped", "moe_noop",
              "dist_latent_moe"}
DIST = {"dist_tp2pp2": "dp_reshardable", "distfull_tp2pp2": "fully_reshardable", "saved_dist_tp2pp2": "dp_reshardable",
        "dist_tied_bf16_tp2pp2": "dp_reshardable", "dist_moe_pp2ep2": "dp_reshardable", "dist_tp1pp2vpp2": "dp_reshardable",
        "saved_dist_moe_mixed": "dp_reshardable", "dist_latent_moe": "dp_reshardable",
        "dist_moe_grouped": "dp_reshardable"}
PATCHED = {"hooked_tp1pp2vpp2": ("megatron_core",)}
SAVED_BY_CKPT_HOOKS = {"saved_tp2pp2", "saved_dist_tp2pp2", "saved_dist_moe_mixed"}
# The uninterrupted run each source continues (a run saved in another format or by another saver).
SAME_RUN = {"dist_tp2pp2": "cont_tp2pp2", "distfull_tp2pp2": "cont_tp2pp2", "saved_dist_tp2pp2": "cont_tp2pp2",
            "dist_tp1pp2vpp2": "cont_tp1pp2vpp2", "dist_moe_pp2ep2": "moe_pp2ep2", "saved_dist_moe_mixed": "moe_mixed",
            "dist_moe_grouped": "moe_grouped"}


class Source:
    def __init__(self, name, root):
        self.name = name
        self.layout, self.model, self.steps = SOURCES[name]
        self.dir = root / name
        self.truth = root / f"{name}.truth.pt"


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    trained = {name: Source(name, root) for name in SOURCES}
    run_jobs([train_job(s.layout, s.dir, s.truth, model=s.model, steps=s.steps, patches=PATCHED.get(s.name, ()),
                      saver="ckpt_hooks" if s.name in SAVED_BY_CKPT_HOOKS else "megatron",
                      ckpt_format="torch_dist" if s.name in DIST else "torch",
                      optim_format=DIST.get(s.name, "dp_reshardable"),
                      train_on_to=5 if s.name in TRAINED_ON else None)
              for s in trained.values()], root / "logs")
    return trained


@pytest.fixture(scope="session")
def big_source(tmp_path_factory):
    """A ~220 MB TP1 legacy checkpoint (bench_reshard's synthetic model): large enough to act on
    a conversion in the middle of its files (signals, faults)."""
    from bench.bench_reshard import make_source_args, write_tp1_checkpoint

    root = tmp_path_factory.mktemp("big") / "src"
    write_tp1_checkpoint(root, make_source_args(layers=8, hidden=512))
    return root


def uninterrupted_losses(sources, run: str, steps: int = 2) -> list:
    """The losses of the ``steps`` steps after step 3 of run ``run`` (a source, or one saved from
    the same run: SAME_RUN), trained on without interruption."""
    run = SAME_RUN.get(run, run)
    reference = sources[run] if run in TRAINED_ON else sources[run + "_5steps"]
    return torch.load(reference.truth, weights_only=False)["train_losses"][3:3 + steps]
