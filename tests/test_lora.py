"""LoRA merging and export against independent computations: W + (alpha / r) B A in plain torch on
the whole tensors of real megatron-core checkpoints (the harness's truth files), transformers with
peft applying the exported adapter, and MindSpore's own checkpoint functions.

The LoRA checkpoints are written here, sharded as MindSpeed-LLM (PEFT on megatron-core) saves
them: for the column-parallel linear_qkv / linear_fc1, lora_A whole on every TP rank and lora_B
split like the weight's rows (each rank's [gate; up] halves for fc1); for the row-parallel
linear_proj / linear_fc2, lora_A split like the weight's columns and lora_B whole.
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from ckpt_hooks.algebra.target import Target
from ckpt_hooks.converters.hf.to_hf import megatron_to_hf
from ckpt_hooks.converters.lora.merge import merge_lora
from ckpt_hooks.converters.lora.to_peft import lora_to_peft
from tests.harness import padded_vocab
from tests.util import run_in_process, tree_digest

R, ALPHA = 4, 8.0
MODULES = {"linear_qkv": "self_attention.linear_qkv", "linear_proj": "self_attention.linear_proj",
           "linear_fc1": "mlp.linear_fc1", "linear_fc2": "mlp.linear_fc2"}
LEGACY = {"linear_qkv": "self_attention.query_key_value", "linear_proj": "self_attention.dense",
          "linear_fc1": "mlp.dense_h_to_4h", "linear_fc2": "mlp.dense_4h_to_h"}
LEGACY_TARGETS = [path.split(".")[1] for path in LEGACY.values()]
# local-spec layer keys -> the truth file's names (the TE spec's) for the norms
TRUTH_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
               **{f"{path}.weight": f"{path}.weight" for path in MODULES.values()}}
EMBEDDING, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"
TOKENS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))


# ---- Megatron's layout, written out here -----------------------------------------------------

def split_of(key: str) -> str | None:
    """How TP splits a weight (or a LoRA tensor, named "<module>.A" / "<module>.B"); None: it does not."""
    if key.endswith(("linear_qkv.weight", "linear_qkv.B", EMBEDDING, OUTPUT)):
        return "rows"
    if key.endswith(("linear_fc1.weight", "linear_fc1.B")):
        return "gate/up"
    if key.endswith(("linear_proj.weight", "linear_fc2.weight", "linear_proj.A", "linear_fc2.A")):
        return "columns"
    return None


def piece(tensor: torch.Tensor, split: str | None, tp: int, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s piece of a whole tensor, as Megatron holds it."""
    if split == "rows":
        return tensor.chunk(tp)[rank]
    if split == "columns":
        return tensor.chunk(tp, dim=1)[rank]
    if split == "gate/up":  # each rank holds [gate_rank; up_rank]
        return torch.cat([half.chunk(tp)[rank] for half in tensor.chunk(2)])
    return tensor


def rank_file(root, iteration: int, tp_rank: int, pp_rank: int, pp: int):
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    return root / f"iter_{iteration:07d}" / name / "model_optim_rng.pt"


def random_lora(truth: dict, seed: int) -> dict:
    """(layer, module) -> (A [r, in], B [out, r]), whole: the TP-split one in the weights' dtype,
    the other fp32 (PEFT's LoRA on Megatron's parallel linears makes it a plain fp32 Linear)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for module, path in MODULES.items():
        weights = truth["tensors"][f"decoder.layers.{path}.weight"]
        for layer, weight in enumerate(weights):
            out[(layer, module)] = tuple(
                (torch.randn(shape, generator=generator) * 0.1).to(weight.dtype if split_of(f"{module}.{part}")
                                                                   else torch.float32)
                for part, shape in (("A", (R, weight.shape[1])), ("B", (weight.shape[0], R))))
    return out


def save_lora(root, lora: dict, base, tp: int, pp: int, legacy: bool = False, extra_state: bool = False):
    """A MindSpeed-LLM LoRA checkpoint of ``lora`` at TP``tp``·PP``pp``; its args are the base
    run's at that layout, with the --lora-* flags."""
    args = copy.copy(torch.load(rank_file(base.dir, base.steps, 0, 0, 2), weights_only=False)["args"])
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp
    args.padded_vocab_size = padded_vocab(base.model, tp)
    args.lora_r, args.lora_alpha = R, ALPHA
    args.lora_target_modules = LEGACY_TARGETS if legacy else list(MODULES)
    layers = max(layer for layer, _ in lora) + 1
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            model = {}
            for local in range(layers // pp):
                for module in MODULES:
                    a, b = lora[(pp_rank * layers // pp + local, module)]
                    prefix = f"language_model.encoder.layers.{local}.{LEGACY[module]}" if legacy else \
                        f"decoder.layers.{local}.{MODULES[module]}"
                    for part, tensor in (("A", a), ("B", b)):
                        split = split_of(f"{module}.{part}")
                        model[f"{prefix}.lora_{part}.default.weight"] = piece(tensor, split, tp, tp_rank).clone()
                        if extra_state and split:  # Megatron's parallel linears save one
                            model[f"{prefix}.lora_{part}.default._extra_state"] = None
            path = rank_file(root, 5, tp_rank, pp_rank, pp)
            path.parent.mkdir(parents=True)
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 5, "model": model}, path)
    (root / "latest_checkpointed_iteration.txt").write_text("5")
    return root


def merged_model(truth: dict, lora: dict, tied: bool) -> dict:
    """The merged model computed independently, as whole tensors of a TP1·PP1 model (local spec)."""
    tensors = truth["tensors"]
    out = {k: v for k, v in tensors.items() if not k.startswith("decoder.layers.")}
    if tied:
        out[OUTPUT] = out[EMBEDDING]
    for layer in range(tensors["decoder.layers.self_attention.linear_qkv.weight"].shape[0]):
        for name, truth_name in TRUTH_NAMES.items():
            out[f"decoder.layers.{layer}.{name}"] = tensors[f"decoder.layers.{truth_name}"][layer]
    for (layer, module), (a, b) in lora.items():
        key = f"decoder.layers.{layer}.{MODULES[module]}.weight"
        out[key] = (out[key].float() + (b.float() @ a.float()) * (ALPHA / R)).to(out[key].dtype)
    return out


def check_megatron(out_dir, expected: dict, tp: int, pp: int, vocab_rows: int) -> None:
    """Every tensor of every rank file equals its piece of the expected model, bit for bit."""
    layers = max(int(k.split(".")[2]) for k in expected if k.startswith("decoder.layers.")) + 1
    for tp_rank in range(tp):
        for pp_rank in range(pp):
            model = torch.load(rank_file(out_dir, 3, tp_rank, pp_rank, pp), weights_only=False)["model"]
            for key, value in model.items():
                if value is None:
                    assert key.endswith("._extra_state"), key
                    continue
                name = key
                if key.startswith("decoder.layers."):
                    local = int(key.split(".")[2])
                    name = key.replace(f".{local}.", f".{pp_rank * layers // pp + local}.", 1)
                whole = expected[name][:vocab_rows] if name in (EMBEDDING, OUTPUT) else expected[name]
                want = piece(whole, split_of(name), tp, tp_rank)
                assert value.dtype == want.dtype and torch.equal(value, want), (tp_rank, pp_rank, key)
            assert sum(k.startswith("decoder.layers.") and v is not None for k, v in model.items()) == \
                layers // pp * len(TRUTH_NAMES)


@pytest.fixture(scope="module")
def work(sources, tmp_path_factory):
    """The same random fp32 LoRA for the TP2·PP2 GQA/SwiGLU checkpoint saved at TP2·PP2 (megatron-core
    names) and at TP1·PP4 (legacy names), and a bf16 one for the tied bf16 checkpoint at TP1·PP4."""
    root = tmp_path_factory.mktemp("lora")
    base, tied = sources["tp2pp2"], sources["tied_bf16_tp2pp2"]
    truth, tied_truth = (torch.load(s.truth, weights_only=False) for s in (base, tied))
    lora, tied_lora = random_lora(truth, 0), random_lora(tied_truth, 1)
    return {"base": base, "tied": tied, "root": root,
            "expected": merged_model(truth, lora, tied=False),
            "tied_expected": merged_model(tied_truth, tied_lora, tied=True),
            "lora": lora, "tp2pp2": save_lora(root / "tp2pp2", lora, base, 2, 2, extra_state=True),
            "tp1pp4": save_lora(root / "tp1pp4", lora, base, 1, 4, legacy=True),
            "tied_tp1pp4": save_lora(root / "tied_tp1pp4", tied_lora, tied, 1, 4, legacy=True)}


def test_merge_sharded_lora_into_sharded_base(work, tmp_path):
    """A TP2·PP2 LoRA into the TP2·PP2 base, written at TP1·PP1 (command line), and the same LoRA
    saved at TP1·PP4 with legacy names, written at the base's TP2·PP2: every merged weight equals
    W + (alpha / r) B A computed here on whole tensors, bit for bit (each element is the same fp32
    dot product over r in both, then the same rounding); every other tensor is the base's, bitwise."""
    assert run_in_process("merge-lora", "--load-dir", work["base"].dir, "--lora-load", work["tp2pp2"],
                   "--save-dir", tmp_path / "tp1", "--lora-r", R, "--lora-alpha", ALPHA, "--lora-target-modules",
                   *MODULES, "--target-tensor-parallel-size", 1, "--target-pipeline-parallel-size", 1, "--quiet") == 0
    check_megatron(tmp_path / "tp1", work["expected"], 1, 1, padded_vocab(work["base"].model, 1))
    merge_lora(work["base"].dir, work["tp1pp4"], tmp_path / "tp2pp2", target_modules=LEGACY_TARGETS,
               quiet=True)
    check_megatron(tmp_path / "tp2pp2", work["expected"], 2, 2, padded_vocab(work["base"].model, 2))


def test_merge_bf16_tied_with_saved_flags(work, tmp_path):
    """bf16 weights and adapters, r / alpha / target modules from the LoRA run's args, LoRA at
    TP1·PP4 into the TP2·PP2 base, written at TP2·PP4: the update is added in fp32 and the sum cast
    to bf16, as computed here; the tied output layer is the embedding."""
    merge_lora(work["tied"].dir, work["tied_tp1pp4"], tmp_path / "out", target=Target(pp=4), quiet=True)
    check_megatron(tmp_path / "out", work["tied_expected"], 2, 4, padded_vocab(work["tied"].model, 2))


def split_like_hf(key: str, b: torch.Tensor) -> dict:
    """lora_B's rows per HF module, cut here from Megatron's grouped QKV / [gate; up] rows."""
    if "linear_qkv" in key:  # 2 groups of [2 q heads; k; v], 16 channels each
        groups = b.view(2, 64, -1)
        return {"q_proj": groups[:, :32], "k_proj": groups[:, 32:48], "v_proj": groups[:, 48:]}
    if "linear_fc1" in key:
        return dict(zip(("gate_proj", "up_proj"), b.chunk(2)))
    return {"o_proj" if "linear_proj" in key else "down_proj": b}


def test_peft_export_splits_fused_modules(work, tmp_path):
    """lora-to-peft: q/k/v_proj and gate/up_proj get a copy of the fused module's lora_A and their
    rows of its lora_B, named as PEFT saves a Llama adapter."""
    assert run_in_process("lora-to-peft", "--lora-load", work["tp1pp4"], "--save-dir", tmp_path / "peft", "--quiet") == 0
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (R, ALPHA, "LORA")
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    expected = {}
    for (layer, module), (a, b) in work["lora"].items():
        for name, rows in split_like_hf(module, b).items():
            attn = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{attn}.{name}"
            expected[f"{prefix}.lora_A.weight"], expected[f"{prefix}.lora_B.weight"] = a, rows.reshape(-1, R)
    assert sorted(tensors) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name


def test_hf_merge_gives_peft_logits(work, tmp_path):
    """The HF output of a merge loads in transformers and computes the logits that peft, applying
    the exported adapter to the unmerged base converted to HF, computes (<= 1e-5)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    merge_lora(work["base"].dir, work["tp2pp2"], tmp_path / "merged", save_format="hf", quiet=True)
    megatron_to_hf(work["base"].dir, tmp_path / "base", quiet=True)
    lora_to_peft(work["tp1pp4"], tmp_path / "peft")
    with torch.no_grad():
        merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()(TOKENS).logits
        base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
        unmerged = base(TOKENS).logits
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()(TOKENS).logits
    delta = (merged - adapted).abs().max().item()
    print(f"max |merged - peft| {delta:.2e}, |merged - base| {(merged - unmerged).abs().max():.2e}")
    assert delta <= 1e-5 and (merged - unmerged).abs().max() > 1e-2


@pytest.mark.parametrize("flags, says", [
    (("--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1"),
     "adapts linear_fc2, which is not among the target modules"),
    (("--lora-r", 8), "has rank 4"),
    ((), "has shape [60, 4]"),
])
def test_bad_lora_is_refused(work, tmp_path, capsys, flags, says):
    """A LoRA tensor of a module not targeted, a rank other than --lora-r, a shape the base does not
    imply: one line naming the file, exit 2, nothing written, the inputs untouched."""
    lora = work["tp2pp2"]
    if not flags:  # a LoRA checkpoint whose linear_qkv lora_B of one rank has the wrong rows
        lora = save_lora(tmp_path / "bad", work["lora"], work["base"], 2, 2)
        path = rank_file(lora, 5, 1, 0, 2)
        state = torch.load(path, weights_only=False)
        state["model"]["decoder.layers.1.self_attention.linear_qkv.lora_B.default.weight"] = torch.zeros(60, R)
        torch.save(state, path)
    before = {d: tree_digest(d) for d in (work["base"].dir, lora)}
    assert run_in_process("merge-lora", "--load-dir", work["base"].dir, "--lora-load", lora, "--save-dir",
                   tmp_path / "out", *flags, "--quiet") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {lora}") and says in lines[0], lines
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())
    assert {d: tree_digest(d) for d in before} == before


# ---- MindSpore ------------------------------------------------------------------------------

# MindFormers' three adapter namings, on bf16 / fp16 / fp32 weights [out, in]
MS_ADAPTED = {
    "model.layers.0.attention.wq.weight": ("model.layers.0.attention.wq.mindpet_delta_lora_a",
                                           "model.layers.0.attention.wq.mindpet_delta_lora_b"),
    "model.layers.0.attention.wo.weight": ("model.layers.0.attention.wo.lora_a", "model.layers.0.attention.wo.lora_b"),
    "model.layers.0.feed_forward.w1.weight": ("model.layers.0.feed_forward.w1.lora_A.weight",
                                              "model.layers.0.feed_forward.w1.lora_B.weight"),
}
MS_MODEL = {  # name -> (shape, dtype)
    "model.layers.0.attention.wq.weight": ((32, 16), "bfloat16"),
    "model.layers.0.attention.wq.mindpet_delta_lora_a": ((R, 16), "float32"),
    "model.layers.0.attention.wq.mindpet_delta_lora_b": ((32, R), "float32"),
    "model.layers.0.attention.wo.weight": ((16, 32), "float16"),
    "model.layers.0.attention.wo.lora_a": ((R, 32), "float32"),
    "model.layers.0.attention.wo.lora_b": ((16, R), "float32"),
    "model.layers.0.feed_forward.w1.weight": ((64, 16), "float32"),
    "model.layers.0.feed_forward.w1.lora_A.weight": ((R, 16), "float32"),
    "model.layers.0.feed_forward.w1.lora_B.weight": ((64, R), "float32"),
    "model.layers.0.attention_norm.weight": ((16,), "float32"),
    "adam_m.model.layers.0.attention.wq.mindpet_delta_lora_a": ((R, 16), "float32"),
    "global_step": ((), "int32"),
}
# dev_matrix [2, 2]: tensor_map 0 splits over the last (model-parallel) dimension; lora_a's
# optimizer-sharded where it is replicated
_COLUMN, _ROW, _WHOLE, _OPT = ([2, 2], [0, -1]), ([2, 2], [-1, 0]), ([2, 2], [-1, -1]), ([2, 2], [-1, -1], 2)
MS_SOURCE = {"model.layers.0.attention.wq.weight": _COLUMN, "model.layers.0.attention.wq.mindpet_delta_lora_a": _OPT,
             "model.layers.0.attention.wq.mindpet_delta_lora_b": _COLUMN,
             "model.layers.0.attention.wo.weight": _ROW, "model.layers.0.attention.wo.lora_a": _ROW,
             "model.layers.0.attention.wo.lora_b": _WHOLE,
             "model.layers.0.feed_forward.w1.weight": _COLUMN, "model.layers.0.feed_forward.w1.lora_A.weight": _WHOLE,
             "model.layers.0.feed_forward.w1.lora_B.weight": _COLUMN,
             "model.layers.0.attention_norm.weight": ([2, 2], [-1]),
             "adam_m.model.layers.0.attention.wq.mindpet_delta_lora_a": _OPT}
MS_TARGET = {"model.layers.0.attention.wq.weight": ([4], [-1, 0]), "model.layers.0.attention.wo.weight": ([4], [0, -1]),
             "model.layers.0.feed_forward.w1.weight": ([4], [0, -1]),
             "model.layers.0.attention_norm.weight": ([4], [0])}


def test_mindspore_sharded_merge(tmp_path, capsys):
    """A MindFormers-style checkpoint sharded by MindSpore over 4 ranks: merged into one complete
    file (alpha / r) and into another strategy (--lora-scaling), every merged weight is W +
    scaling lora_b @ lora_a computed here in fp32 and cast to its dtype, as MindSpore's own
    load_checkpoint and transform_checkpoints read our files; the adapters and their optimizer
    states are gone, the rest unchanged."""
    ms = pytest.importorskip("mindspore")
    from tests.test_mindspore_transform import write_strategy

    generator = torch.Generator().manual_seed(5)
    values = {name: torch.randn(shape, generator=generator).to(getattr(torch, dtype)) if shape else
              torch.tensor(7, dtype=torch.int32) for name, (shape, dtype) in MS_MODEL.items()}
    complete = tmp_path / "complete" / "rank_0"
    complete.mkdir(parents=True)
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy(),
                                                      ms.bfloat16 if v.dtype == torch.bfloat16 else None)}
                        for n, v in values.items()], str(complete / "full.ckpt"))
    source_strategy = write_strategy(tmp_path / "src.ckpt", MS_SOURCE)
    target_strategy = write_strategy(tmp_path / "dst.ckpt", MS_TARGET)
    ms.transform_checkpoints(str(tmp_path / "complete"), str(tmp_path / "src"), "checkpoint_", None,
                             str(source_strategy))
    assert run_in_process("merge-lora-mindspore", "--load-dir", tmp_path / "src", "--save-dir", tmp_path / "one",
                   "--src-strategy-path-or-dir", source_strategy, "--lora-alpha", ALPHA, "--lora-r", R, "--quiet") == 0
    assert run_in_process("merge-lora-mindspore", "--load-dir", tmp_path / "src", "--save-dir", tmp_path / "four",
                   "--src-strategy-path-or-dir", source_strategy, "--dst-strategy", target_strategy,
                   "--lora-scaling", 0.5, "--quiet") == 0
    ms.transform_checkpoints(str(tmp_path / "four"), str(tmp_path / "four_whole"), "checkpoint_",
                             str(target_strategy), None)
    for directory, scaling in (("one", ALPHA / R), ("four_whole", 0.5)):
        merged = ms.load_checkpoint(str(tmp_path / directory / "rank_0" / "checkpoint_0.ckpt"))
        kept = {n for n in MS_MODEL if "lora" not in n}
        assert set(merged) == kept
        for name in kept:
            want = values[name]
            if name in MS_ADAPTED:
                a, b = (values[n] for n in MS_ADAPTED[name])
                want = (want.float() + (b @ a) * scaling).to(want.dtype)
            got = merged[name].astype(ms.float32).asnumpy()
            assert torch.equal(torch.from_numpy(got), want.float()), (directory, name)
    assert run_in_process("merge-lora-mindspore", "--load-dir", tmp_path / "src", "--save-dir", tmp_path / "bad",
                   "--src-strategy-path-or-dir", source_strategy, "--lora-scaling", 1, "--lora-r", 8) == 2
    assert "has rank 4" in capsys.readouterr().err and not (tmp_path / "bad").exists()
