"""Hugging Face <-> Megatron against two independent implementations: transformers' Llama, Qwen2,
Qwen3, Mistral and the mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE, and real
megatron-core GPT models loading the converted checkpoints (torchrun, CPU)."""

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt_hooks.algebra.target import Target
from ckpt_hooks.cli import guarded
from ckpt_hooks.megatron.checkpoint import open_checkpoint
from ckpt_hooks.cli.hf import COMMANDS
from ckpt_hooks.converters.hf.to_hf import megatron_to_hf
from ckpt_hooks.converters.hf.to_megatron import hf_to_megatron
from tests.harness import logits_job, run_jobs, true_vocab
from tests.util import cli, random_hf_model, tree_digest

transformers = pytest.importorskip("transformers")

VOCAB = 250
TOKENS = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(7))
_DEEPSEEK = {"rope_theta": 30000.0, "rms_norm_eps": 1e-6, "num_key_value_heads": 4, "n_routed_experts": 4,
             "n_shared_experts": 2, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
             "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
             "topk_method": "greedy", "norm_topk_prob": False}
# DeepSeek-V2-Lite's YaRN RoPE, its original context cut to 8 so that 16 tokens reach past it.
_YARN = {"rope_type": "yarn", "rope_theta": 30000.0, "factor": 40.0, "original_max_position_embeddings": 8,
         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}
# family -> (config class, config overrides, target layout). Distinct RoPE bases and norm eps
# so that a value not carried over shows; Qwen2 has q/k/v biases and tied embeddings.
FAMILIES = {
    "llama": ("LlamaConfig", {"rope_theta": 500000.0, "rms_norm_eps": 1e-5}, {"tp": 2, "pp": 2}),
    "qwen2": ("Qwen2Config", {"rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
              {"tp": 2, "pp": 2}),
    "mistral": ("MistralConfig", {"rope_theta": 20000.0, "rms_norm_eps": 3e-6}, {"tp": 1, "pp": 2, "vpp": 2}),
    "qwen3": ("Qwen3Config", {"rope_theta": 1e6, "rms_norm_eps": 2e-6, "head_dim": 16}, {"tp": 2, "pp": 2}),
    # Mixtures of experts, spread over expert ranks: 4 experts of ffn 32, top 2.
    "mixtral": ("MixtralConfig", {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "num_local_experts": 4,
                                  "num_experts_per_tok": 2, "intermediate_size": 32}, {"tp": 1, "pp": 2, "ep": 2}),
    # a dense first layer, a gated shared expert, top-k weights not renormalised
    "qwen2_moe": ("Qwen2MoeConfig", {"rope_theta": 1e6, "rms_norm_eps": 1e-6, "num_experts": 4,
                                     "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 64, "mlp_only_layers": [0],
                                     "norm_topk_prob": False}, {"tp": 2, "pp": 2, "ep": 2, "etp": 1}),
    "qwen3_moe": ("Qwen3MoeConfig", {"rope_theta": 1e6, "rms_norm_eps": 4e-6, "head_dim": 16, "num_experts": 4,
                                     "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True},
                  {"tp": 2, "pp": 1, "ep": 2}),
    # DeepSeek-V2-Lite's shape: latent attention with one q projection, a first dense layer, two
    # ungated shared experts, top-k weights not renormalised but scaled; the latents' down
    # projections split over TP2 as the local layer spec splits them.
    "deepseek_v2": ("DeepseekV2Config", {**_DEEPSEEK, "q_lora_rank": None, "routed_scaling_factor": 1.5,
                                         "rope_parameters": _YARN}, {"tp": 2, "pp": 2, "ep": 2, "etp": 1}),
    # MindSpeed-LLM's noop layers: 3 layers padded to 4 for the pipeline (NOOP_LAYERS), the last one noop.
    "mixtral-noop": ("MixtralConfig", {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "num_local_experts": 4,
                                       "num_experts_per_tok": 2, "intermediate_size": 32, "num_hidden_layers": 3},
                     {"tp": 1, "pp": 2, "ep": 2}),
    # The experts as megatron-core's legacy GroupedMLP (--moe-grouped-gemm: GROUPED_GEMM).
    "mixtral-grouped": ("MixtralConfig", {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "num_local_experts": 4,
                                          "num_experts_per_tok": 2, "intermediate_size": 32},
                        {"tp": 2, "pp": 1, "ep": 2, "etp": 1}),
    # ... and DeepSeek-V2's: a q latent too.
    "deepseek_v2-q_lora": ("DeepseekV2Config", {**_DEEPSEEK, "q_lora_rank": 32}, {"tp": 2, "pp": 1, "ep": 4, "etp": 1}),
}

NOOP_LAYERS = {"mixtral-noop": [3]}
GROUPED_GEMM = {"mixtral-grouped"}


def hf_model(family: str, seed: int):
    """A tiny random model (no download) whose every weight is non-trivial: biases and norms too."""
    config_class, overrides, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(**{
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, **overrides})
    return random_hf_model(config, seed)


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def harness_model(family: str) -> dict:
    """The megatron-core model of the same architecture, as the harness builds it."""
    _, overrides, _ = FAMILIES[family]
    model = {"vocab_size": VOCAB - 1,  # NullTokenizer's --vocab-size: the true vocabulary is one more
             "make_vocab_size_divisible_by": 128, "rotary_base": overrides["rope_theta"],
             "norm_eps": overrides["rms_norm_eps"], "add_qkv_bias": family in ("qwen2", "qwen2_moe"),
             "untie_embeddings": not overrides.get("tie_word_embeddings", False),
             "qk_layernorm": family in ("qwen3", "qwen3_moe")}
    experts = overrides.get("num_local_experts", overrides.get("num_experts", overrides.get("n_routed_experts")))
    if family.startswith("deepseek_v2"):
        model.update(query_groups=4, shared_gate=False, topk_scaling=overrides.get("routed_scaling_factor", 1.0),
                     shared_ffn=overrides["n_shared_experts"] * overrides["moe_intermediate_size"],
                     mla={k: overrides[h] for k, h in (("q_lora_rank", "q_lora_rank"), ("kv_lora_rank", "kv_lora_rank"),
                                                       ("qk_head_dim", "qk_nope_head_dim"),
                                                       ("qk_pos_emb_head_dim", "qk_rope_head_dim"),
                                                       ("v_head_dim", "v_head_dim"))})
        rope = overrides.get("rope_parameters") or {}
        if rope.get("rope_type") == "yarn":
            model["mla"].update(rope_type="yarn", rotary_scaling_factor=rope["factor"],
                                **{k: rope[k] for k in ("original_max_position_embeddings", "beta_fast", "beta_slow",
                                                        "mscale", "mscale_all_dim")})
            model["rotary_base"] = rope["rope_theta"]
        overrides = {**overrides, "mlp_only_layers": list(range(overrides["first_k_dense_replace"])),
                     "shared_expert_intermediate_size": model["shared_ffn"]}
    if experts:
        dense = overrides.get("mlp_only_layers", [])
        model.update(experts=experts, topk=overrides["num_experts_per_tok"],
                     moe_ffn=overrides.get("moe_intermediate_size", overrides.get("intermediate_size")),
                     shared_ffn=overrides.get("shared_expert_intermediate_size"),
                     shared_gate=model.get("shared_gate", "shared_expert_intermediate_size" in overrides),
                     moe_layer_freq=[int(i not in dense) for i in range(4)] if dense else None,
                     router_pre_softmax=not family.startswith("mixtral") and not overrides["norm_topk_prob"],
                     noop_layers=NOOP_LAYERS.get(family), grouped_gemm=family in GROUPED_GEMM)
        if family.startswith("mixtral"):   # no dense layers: Megatron-LM's --ffn-hidden-size is the experts'
            model["ffn"] = overrides["intermediate_size"]
    return model


def hf_tensors(directory) -> dict:
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    return {k: v for f in files for k, v in load_file(directory / f).items()}


@pytest.fixture(scope="module")
def hf(tmp_path_factory, sources):
    """Per family: the HF model, its directory and logits, its Megatron conversion and the logits
    megatron-core computes from it; plus the harness-trained TP2·PP2 checkpoint's logits.
    All megatron-core runs share one torchrun launch."""
    root = tmp_path_factory.mktemp("hf")
    out, jobs = {}, []
    for seed, (family, (_, _, layout)) in enumerate(FAMILIES.items()):
        model = hf_model(family, seed)
        directory = root / family
        model.save_pretrained(directory, max_shard_size="100KB" if family == "llama" else "1GB")
        megatron = root / f"{family}-megatron"
        noop = NOOP_LAYERS.get(family)
        hf_to_megatron(directory, megatron, Target(tp=layout["tp"], pp=layout["pp"], vpp=layout.get("vpp"),
                                                   ep=layout.get("ep"), etp=layout.get("etp"), layer_spec="local",
                                                   noop_layers=tuple(noop) if noop else None,
                                                   moe_grouped_gemm=family in GROUPED_GEMM or None),
                       quiet=True)
        result = root / f"{family}.logits.pt"
        jobs.append(logits_job(layout, megatron, TOKENS, result, harness_model(family)))
        out[family] = {"dir": directory, "megatron": megatron, "logits": logits_of(model), "result": result}
    trained = sources["tp2pp2"]
    out["trained"] = {"result": root / "trained.logits.pt", "source": trained}
    jobs.append(logits_job(trained.layout, trained.dir, TOKENS % true_vocab(trained.model), out["trained"]["result"],
                           trained.model))
    run_jobs(jobs, root / "logs")
    for entry in out.values():
        entry["megatron_run"] = torch.load(entry["result"])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_megatron_gives_transformers_logits(hf, family):
    """The converted checkpoint, loaded strictly into megatron-core's GPTModel at its family's
    layout (TP2·PP2; Mistral TP1·PP2·VPP2; the mixtures of experts over 2 expert ranks), computes
    transformers' logits; Megatron-LM's checked args agree."""
    run, want = hf[family]["megatron_run"], hf[family]["logits"]
    assert run["args_mismatches"] == []
    got = run["logits"]
    assert got.shape == (*want.shape[:2], 256)  # padded to 128 x TP
    assert not got[..., VOCAB:].any()          # padding rows are zero
    delta = (got[..., :VOCAB] - want).abs().max().item()
    print(f"{family}: max |Δ logits| {delta:.2e} (logits up to {want.abs().max():.1f})")
    assert delta <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bitwise(hf, family, tmp_path):
    """Megatron (sharded) -> HF gives back every original tensor bit for bit, in sharded files with
    an index, and transformers loads the directory and computes the same logits."""
    back = tmp_path / "back"
    megatron_to_hf(hf[family]["megatron"], back, max_shard_size="200KB", quiet=True)
    original, converted = hf_tensors(hf[family]["dir"]), hf_tensors(back)
    assert sorted(converted) == sorted(original)
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name
    assert len(json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]) == len(original)
    model = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(model).__name__ == getattr(transformers, FAMILIES[family][0]).__name__.replace("Config", "ForCausalLM")
    assert torch.equal(logits_of(model), hf[family]["logits"])


def test_trained_megatron_checkpoint_to_transformers(hf, tmp_path):
    """A checkpoint trained by megatron-core at TP2·PP2 (GQA, SwiGLU, RMSNorm, RoPE, untied),
    converted straight to HF, computes megatron-core's logits in transformers' LlamaForCausalLM."""
    trained = hf["trained"]["source"]
    out = tmp_path / "hf"
    megatron_to_hf(trained.dir, out, quiet=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    vocab = true_vocab(trained.model)
    assert model.config.vocab_size == vocab  # the padded rows are dropped
    with torch.no_grad():
        want = model(TOKENS % vocab).logits
    got = hf["trained"]["megatron_run"]["logits"][..., :vocab]
    delta = (got - want).abs().max().item()
    print(f"trained TP2·PP2 -> HF: max |Δ logits| {delta:.2e}")
    assert delta <= 1e-5


def megatron_state(root, rank_dir="mp_rank_00_000") -> dict:
    ckpt = open_checkpoint(root)
    return torch.load(ckpt.iter_dir / rank_dir / "model_optim_rng.pt", weights_only=False)


def test_files_hold_what_megatron_core_saves(hf):
    """The converted Llama's rank files list the entries (the linears' None _extra_state too) of the
    harness-trained checkpoint of the same architecture and layout, in megatron-core's order."""
    trained = hf["trained"]["source"].dir
    for rank_dir in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"):
        assert list(megatron_state(hf["llama"]["megatron"], rank_dir)["model"]) == \
            list(megatron_state(trained, rank_dir)["model"]), rank_dir


def test_transformer_engine_names_bf16_uneven_release(hf, tmp_path):
    """The Transformer Engine spec's names, bf16 weights, an uneven pipeline and a release
    checkpoint; back to HF: the original tensors cast to bf16, bit for bit."""
    megatron, back = tmp_path / "megatron", tmp_path / "back"
    hf_to_megatron(hf["qwen2"]["dir"], megatron, Target(tp=2, pp=2, num_layer_list=(1, 3), params_dtype="bf16"),
                   release=True, quiet=True)
    assert (megatron / "latest_checkpointed_iteration.txt").read_text() == "release"
    state = megatron_state(megatron)
    assert state["args"].transformer_impl == "transformer_engine" and state["args"].bf16
    assert state["args"].decoder_first_pipeline_num_layers == 1
    prefix = "decoder.layers.0."
    layer = {k.removeprefix(prefix): v for k, v in state["model"].items() if k.startswith(prefix)}
    assert list(layer) == ["self_attention.core_attention._extra_state", "self_attention.linear_proj.weight",
                           "self_attention.linear_proj._extra_state", "self_attention.linear_qkv.layer_norm_weight",
                           "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                           "self_attention.linear_qkv._extra_state", "mlp.linear_fc1.layer_norm_weight",
                           "mlp.linear_fc1.weight", "mlp.linear_fc1._extra_state", "mlp.linear_fc2.weight",
                           "mlp.linear_fc2._extra_state"]
    assert all(v is None for k, v in layer.items() if k.endswith("_extra_state"))
    assert all(v.dtype == torch.bfloat16 for v in layer.values() if v is not None)
    megatron_to_hf(megatron, back, quiet=True)
    original, converted = hf_tensors(hf["qwen2"]["dir"]), hf_tensors(back)
    assert sorted(converted) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(converted[name], tensor.to(torch.bfloat16)), name
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"


def test_vocab_padding_flags(hf, tmp_path):
    """--padded-vocab-size pads to exactly that many rows (zeros); --true-vocab-size drops HF rows
    past it, and the way back keeps that many."""
    megatron, back = tmp_path / "megatron", tmp_path / "back"
    hf_to_megatron(hf["llama"]["dir"], megatron, Target(tp=2, padded_vocab_size=300, true_vocab_size=240,
                                                        layer_spec="local"), quiet=True)
    state = megatron_state(megatron, "mp_rank_01")
    assert state["args"].padded_vocab_size == 300 and state["args"].vocab_size == 240
    original = hf_tensors(hf["llama"]["dir"])
    rows = state["model"]["embedding.word_embeddings.weight"]  # rows 150..299 of 300
    assert rows.shape == (150, 64)
    assert torch.equal(rows[:90], original["model.embed_tokens.weight"][150:240]) and not rows[90:].any()
    megatron_to_hf(megatron, back, quiet=True)
    converted = hf_tensors(back)
    assert torch.equal(converted["lm_head.weight"], original["lm_head.weight"][:240])
    assert json.loads((back / "config.json").read_text())["vocab_size"] == 240


# ----------------------------------------------------------------------------- bad input


def hf_cli(command: str, *args) -> int:
    """A subcommand run as `ckpt-hooks` runs it (CheckpointError -> one line, exit 2)."""
    parser = argparse.ArgumentParser(prog="ckpt-hooks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text))
    return guarded(COMMANDS[command][2], parser.parse_args([command, *map(str, args), "--quiet"]))


def assert_refused(capsys, command, source, save_dir, *flags, names, says):
    before = tree_digest(source)
    assert hf_cli(command, "--load-dir", source, "--save-dir", save_dir, *flags) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {names}"), lines
    assert says in lines[0], lines[0]
    assert not save_dir.exists() or not any(save_dir.iterdir())
    assert not any(p.name.startswith(f".{save_dir.name}.partial") for p in save_dir.parent.iterdir())
    assert tree_digest(source) == before


@pytest.fixture
def llama_copy(hf, tmp_path):
    """A one-file copy of the tiny Llama, to damage."""
    copy = tmp_path / "llama"
    copy.mkdir()
    shutil.copy(hf["llama"]["dir"] / "config.json", copy)
    save_file(hf_tensors(hf["llama"]["dir"]), copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_unknown_family(llama_copy, tmp_path, capsys):
    edit_config(llama_copy, model_type="gpt2")
    assert_refused(capsys, "hf-to-megatron", llama_copy, tmp_path / "out", names=llama_copy / "config.json",
                   says="unsupported model_type 'gpt2' (supported: deepseek_v2, llama, mistral, mixtral, qwen2, "
                        "qwen2_moe, qwen3, qwen3_moe)")


def test_unmapped_and_missing_tensors_are_listed(llama_copy, tmp_path, capsys):
    tensors = load_file(llama_copy / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    tensors["model.extra.weight"] = torch.ones(2)
    save_file(tensors, llama_copy / "model.safetensors")
    assert_refused(capsys, "hf-to-megatron", llama_copy, tmp_path / "out", names=llama_copy,
                   says="2 tensors the llama name map does not cover: model.extra.weight, "
                        "model.layers.0.self_attn.q_norm.weight")
    del tensors["model.extra.weight"], tensors["model.layers.0.self_attn.q_norm.weight"]
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, llama_copy / "model.safetensors")
    assert_refused(capsys, "hf-to-megatron", llama_copy, tmp_path / "out", names=llama_copy,
                   says="missing tensors: model.layers.2.self_attn.k_proj.weight")


def test_shape_that_disagrees_with_the_config(llama_copy, tmp_path, capsys):
    edit_config(llama_copy, intermediate_size=96)
    assert_refused(capsys, "hf-to-megatron", llama_copy, tmp_path / "out", names=llama_copy / "model.safetensors",
                   says="'model.layers.0.mlp.gate_proj.weight' has shape [128, 64], but config.json implies [96, 64]")


def test_truncated_safetensors(llama_copy, tmp_path, capsys):
    path = llama_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert_refused(capsys, "hf-to-megatron", llama_copy, tmp_path / "out", names=path, says="truncated")


def test_unsupported_config_and_layout(llama_copy, tmp_path, capsys):
    edit_config(llama_copy, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    assert_refused(capsys, "hf-to-megatron", llama_copy, tmp_path / "out", names=llama_copy / "config.json",
                   says="has no megatron-core equivalent")
    edit_config(llama_copy, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    assert_refused(capsys, "hf-to-megatron", llama_copy, tmp_path / "out", "--target-tensor-parallel-size", 3,
                   names="--target-tensor-parallel-size 3", says="tensor parallel size 3 does not divide attention heads (4)")


def test_megatron_that_does_not_fit_the_family(hf, tmp_path, capsys):
    source = hf["llama"]["megatron"]
    assert_refused(capsys, "megatron-to-hf", source, tmp_path / "out", "--model-type", "qwen2",
                   names=source, says="a model with no q/k/v biases cannot be written as Hugging Face qwen2")


def test_library_saved_checkpoint_to_hf_and_back(sources, tmp_path):
    """The demo's kind of checkpoint (ckpt_hooks.megatron.save without Megatron-LM args: no true
    vocabulary, no make_vocab_size_divisible_by) goes to HF straight from TP2·PP2 and back: the
    divisor is inferred and said, and every model tensor comes back bit for bit."""
    source = sources["saved_tp2pp2"]
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    refused = cli("megatron-to-hf", "--load-dir", source.dir, "--save-dir", hf_dir, "--quiet")
    assert refused.returncode == 2 and "pass --true-vocab-size (at most 128)" in refused.stderr, refused.stderr
    there = cli("megatron-to-hf", "--load-dir", source.dir, "--save-dir", hf_dir, "--true-vocab-size",
                true_vocab(source.model))
    assert there.returncode == 0, there.stderr
    assert "note: the saved args lack make_vocab_size_divisible_by: assumed 64" in there.stdout, there.stdout
    again = cli("hf-to-megatron", "--load-dir", hf_dir, "--save-dir", back, "--target-tensor-parallel-size", 2,
                "--target-pipeline-parallel-size", 2, "--transformer-impl", "local",
                "--make-vocab-size-divisible-by", 16, "--params-dtype", "fp32", "--quiet")
    assert again.returncode == 0, again.stderr
    for rank_dir in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"):
        want = torch.load(next(source.dir.glob(f"iter_*/{rank_dir}/model_optim_rng.pt")), weights_only=False)["model"]
        got = megatron_state(back, rank_dir)["model"]
        tensors = {k for k, v in want.items() if isinstance(v, torch.Tensor)}
        assert tensors == {k for k, v in got.items() if isinstance(v, torch.Tensor)}
        for key in tensors:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (rank_dir, key)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_config_and_tokenizer_files_round_trip(hf, tmp_path, family):
    """HF -> Megatron -> HF keeps every config.json key as it was (token ids, Qwen2's layer_types
    and max_window_layers, ...), generation_config.json and the tokenizer files; the Megatron
    args name the copied tokenizer by its absolute path."""
    source = tmp_path / "hf"
    shutil.copytree(hf[family]["dir"], source)
    edit_config(source, bos_token_id=3, eos_token_id=4, pad_token_id=5, max_window_layers=28)
    (source / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (source / "generation_config.json").write_text('{"do_sample": true, "eos_token_id": 4}')
    megatron, back = tmp_path / "megatron", tmp_path / "back"
    hf_to_megatron(source, megatron, Target(tp=2, pp=2, layer_spec="local"), quiet=True)
    args = megatron_state(megatron)["args"]
    assert args.tokenizer_model == str(megatron.absolute() / "hf_assets")
    assert (megatron / "hf_assets" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    megatron_to_hf(megatron, back, quiet=True)
    original, carried = (json.loads((d / "config.json").read_text()) for d in (source, back))
    assert {k: carried.get(k, "absent") for k in original} == original
    for name in ("tokenizer.json", "generation_config.json"):
        assert (back / name).read_bytes() == (source / name).read_bytes(), name


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "mixtral-noop"])
def test_verify_certifies_megatron_against_hf_experts(hf, family):
    """`ckpt-hooks verify` compares a converted MoE checkpoint with its HF model, expert by expert."""
    result = cli("verify", hf[family]["megatron"], hf[family]["dir"], "--quiet")
    assert result.returncode == 0 and "EQUAL" in result.stdout, result.stdout + result.stderr
