"""MindFormers (Llama family) <-> Megatron and <-> Hugging Face against three independent
implementations: a MindSpore network with MindFormers' parameter names (MindFormers itself is not
installable here), real megatron-core GPT models (torchrun, CPU) and transformers."""

import argparse
import json
import math

import numpy as np
import pytest
import torch

ms = pytest.importorskip("mindspore")
transformers = pytest.importorskip("transformers")

from mindspore import Parameter, Tensor, nn, ops  # noqa: E402

from ckpt_hooks.algebra.target import Target  # noqa: E402
from ckpt_hooks.cli import guarded  # noqa: E402
from ckpt_hooks.formats import ms_safetensors  # noqa: E402
from ckpt_hooks.formats.megatron_legacy import open_checkpoint  # noqa: E402
from ckpt_hooks.cli.mindformers import COMMANDS  # noqa: E402
from ckpt_hooks.converters.mindformers.config import Architecture  # noqa: E402
from ckpt_hooks.converters.mindformers.convert import (hf_to_mindformers, megatron_to_mindformers, # noqa: E402
                                            mindformers_to_hf, mindformers_to_megatron)
from tests.harness import VOCAB_KEYS, logits_job, run_jobs, train_job, true_vocab  # noqa: E402
from tests.util import random_hf_model, tree_digest  # noqa: E402

VOCAB, HIDDEN, HEADS, GROUPS, FFN, LAYERS = 250, 64, 4, 2, 128, 4
D = HIDDEN // HEADS
TOKENS = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))
# Distinct RoPE bases and norm eps, so that a value not carried over shows. The Llama is
# described to the converter by flags, the Qwen2-like model (q/k/v biases, tied) by a config.json.
VARIANTS = {
    "llama": {"concat": False, "bias": False, "tied": False, "theta": 500000.0, "eps": 1e-5},
    "qwen2_concat": {"concat": True, "bias": True, "tied": True, "theta": 1e6, "eps": 1e-6},
}
LAYOUT = {"tp": 2, "pp": 2}
# A megatron-core run to take through MindFormers and back: a real TP1·PP2·VPP2 checkpoint.
TRAINED = {"tp": 1, "pp": 2, "vpp": 2}


# ----------------------------------------------------------------------------- the MindSpore network


def dense(rng, d_in, d_out, bias):
    return nn.Dense(d_in, d_out, has_bias=bias, weight_init=Tensor(rng.normal(0, 0.1, (d_out, d_in)), ms.float32),
                    bias_init=Tensor(rng.normal(0, 0.1, d_out), ms.float32) if bias else "zeros")


class RMSNorm(nn.Cell):
    def __init__(self, rng, eps):
        super().__init__()
        self.weight = Parameter(Tensor(rng.uniform(0.5, 1.5, HIDDEN), ms.float32))
        self.eps = eps

    def construct(self, x):
        return x * ops.rsqrt((x * x).mean(-1, keep_dims=True) + self.eps) * self.weight


def rope(x, cos, sin):
    """Rotate-half RoPE, as MindFormers' and HF's Llama."""
    return x * cos + ops.cat((-x[..., D // 2:], x[..., :D // 2]), -1) * sin


class Attention(nn.Cell):
    def __init__(self, rng, v):
        super().__init__()
        self.concat, kv = v["concat"], GROUPS * D
        if self.concat:  # per KV group [q_g; k_g; v_g]
            self.w_qkv = dense(rng, HIDDEN, HIDDEN + 2 * kv, v["bias"])
        else:
            self.wq, self.wk, self.wv = (dense(rng, HIDDEN, n, v["bias"]) for n in (HIDDEN, kv, kv))
        self.wo = dense(rng, HIDDEN, HIDDEN, False)

    def construct(self, x, cos, sin, mask):
        b, s, _ = x.shape
        if self.concat:
            qkv = self.w_qkv(x).reshape(b, s, GROUPS, HEADS // GROUPS + 2, D)
            q, k, v = qkv[:, :, :, :-2].reshape(b, s, HEADS, D), qkv[:, :, :, -2], qkv[:, :, :, -1]
        else:
            q = self.wq(x).reshape(b, s, HEADS, D)
            k, v = self.wk(x).reshape(b, s, GROUPS, D), self.wv(x).reshape(b, s, GROUPS, D)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = (ops.repeat_interleave(t, HEADS // GROUPS, 1) for t in (k, v))  # head h reads group h // 2
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) / math.sqrt(D) + mask
        out = ops.matmul(ops.softmax(scores, -1), v).transpose(0, 2, 1, 3).reshape(b, s, HIDDEN)
        return self.wo(out)


class FeedForward(nn.Cell):
    def __init__(self, rng, v):
        super().__init__()
        self.concat = v["concat"]
        if self.concat:  # gate and up rows interleaved: g0, u0, g1, u1, ...
            self.w_gate_hidden = dense(rng, HIDDEN, 2 * FFN, False)
        else:
            self.w1, self.w3 = dense(rng, HIDDEN, FFN, False), dense(rng, HIDDEN, FFN, False)
        self.w2 = dense(rng, FFN, HIDDEN, False)

    def construct(self, x):
        if self.concat:
            h = self.w_gate_hidden(x).reshape(*x.shape[:-1], FFN, 2)
            gate, up = h[..., 0], h[..., 1]
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(ops.silu(gate) * up)


class Layer(nn.Cell):
    def __init__(self, rng, v):
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(rng, v["eps"]), Attention(rng, v)
        self.ffn_norm, self.feed_forward = RMSNorm(rng, v["eps"]), FeedForward(rng, v)

    def construct(self, x, cos, sin, mask):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Embedding(nn.Cell):
    def __init__(self, rng):
        super().__init__()
        self.embedding_weight = Parameter(Tensor(rng.normal(0, 0.1, (VOCAB, HIDDEN)), ms.float32))

    def construct(self, tokens):
        return ops.gather(self.embedding_weight, tokens, 0)


class Model(nn.Cell):
    def __init__(self, rng, v):
        super().__init__()
        self.tok_embeddings = Embedding(rng)
        self.layers = nn.CellList([Layer(rng, v) for _ in range(LAYERS)])
        self.norm_out = RMSNorm(rng, v["eps"])

    def construct(self, tokens, cos, sin, mask):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm_out(x)


class LlamaForCausalLM(nn.Cell):
    """MindFormers' parameter names: model.tok_embeddings.embedding_weight, model.layers.{i}.
    attention.wq/wk/wv/wo (or w_qkv), feed_forward.w1/w2/w3 (or w_gate_hidden), attention_norm,
    ffn_norm, model.norm_out, lm_head (absent when tied)."""

    def __init__(self, v, seed):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.model, self.tied = Model(rng, v), v["tied"]
        if not self.tied:
            self.lm_head = dense(rng, HIDDEN, VOCAB, False)
        positions = np.arange(TOKENS.shape[1])[:, None] / v["theta"] ** (np.arange(0, D, 2) / D)
        angles = np.concatenate([positions, positions], -1)
        self.cos, self.sin = Tensor(np.cos(angles), ms.float32), Tensor(np.sin(angles), ms.float32)
        self.mask = Tensor(np.triu(np.full((TOKENS.shape[1],) * 2, -1e9), 1), ms.float32)

    def construct(self, tokens):
        h = self.model(tokens, self.cos, self.sin, self.mask)
        return ops.matmul(h, self.model.tok_embeddings.embedding_weight.T) if self.tied else self.lm_head(h)


def mean_loss(logits: np.ndarray) -> float:
    """The LM loss of TOKENS (next-token cross entropy over the true vocabulary)."""
    return torch.nn.functional.cross_entropy(torch.from_numpy(logits[:, :-1]).reshape(-1, VOCAB),
                                             TOKENS[:, 1:].reshape(-1)).item()


def harness_model(v: dict) -> dict:
    return {"vocab_size": VOCAB - 1,  # NullTokenizer's --vocab-size: the true vocabulary is one more
            "make_vocab_size_divisible_by": 128, "rotary_base": v["theta"], "norm_eps": v["eps"],
            "add_qkv_bias": v["bias"], "untie_embeddings": not v["tied"]}


def qwen2_config(v: dict, **changes) -> dict:
    return {"model_type": "qwen2", "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": GROUPS, "vocab_size": VOCAB,
            "rope_theta": v["theta"], "rms_norm_eps": v["eps"], "tie_word_embeddings": v["tied"], **changes}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per variant: the MindSpore network's safetensors, logits and loss, its Megatron TP2·PP2
    conversion and the logits megatron-core computes from that; plus a trained TP1·PP2·VPP2
    megatron-core checkpoint. All megatron-core runs share one torchrun launch."""
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    root = tmp_path_factory.mktemp("mindformers")
    out, jobs = {}, []
    for seed, (name, v) in enumerate(VARIANTS.items()):
        net = LlamaForCausalLM(v, seed)
        logits = net(Tensor(TOKENS.numpy(), ms.int32)).asnumpy()
        loss = ops.cross_entropy(Tensor(logits[:, :-1].reshape(-1, VOCAB)),
                                 Tensor(TOKENS[:, 1:].reshape(-1).numpy(), ms.int32)).asnumpy().item()
        mf = root / name
        mf.mkdir()
        ms.save_checkpoint(net, str(mf / "model.safetensors"), format="safetensors")
        megatron = root / f"{name}-megatron"
        model = {"architecture": Architecture(HEADS, rope_theta=v["theta"], norm_eps=v["eps"])}
        if v["concat"]:
            (root / "qwen2.json").write_text(json.dumps(qwen2_config(v)))
            model = {"config": root / "qwen2.json"}
        mindformers_to_megatron(mf / "model.safetensors", megatron, Target(tp=LAYOUT["tp"], pp=LAYOUT["pp"],
                                                                         layer_spec="local"), **model, quiet=True)
        result = root / f"{name}.logits.pt"
        jobs.append(logits_job(LAYOUT, megatron, TOKENS, result, harness_model(v)))
        out[name] = {"net": net, "mf": mf, "model": model, "logits": logits, "loss": loss, "megatron": megatron,
                     "result": result}
    out["trained"] = root / "trained"
    jobs.append(train_job(TRAINED, out["trained"], root / "trained.truth.pt", steps=1))
    run_jobs(jobs, root / "logs")
    for name in VARIANTS:
        out[name]["megatron_run"] = torch.load(out[name]["result"])
    return out


@pytest.mark.parametrize("name", VARIANTS)
def test_mindspore_network_to_megatron_computes_its_logits_and_loss(runs, name):
    """The MindSpore network's own safetensors, converted to TP2·PP2 and loaded strictly into
    megatron-core's GPTModel, give its logits and loss; Megatron-LM's checked args agree."""
    run, want = runs[name]["megatron_run"], runs[name]["logits"]
    assert run["args_mismatches"] == []
    got = run["logits"]
    assert got.shape == (*want.shape[:2], 256) and not got[..., VOCAB:].any()  # padded to 128 x TP with zeros
    delta = (got[..., :VOCAB] - torch.from_numpy(want)).abs().max().item()
    loss_delta = abs(mean_loss(got[..., :VOCAB].numpy()) - runs[name]["loss"])
    print(f"{name}: max |Δ logits| {delta:.2e} (logits up to {np.abs(want).max():.1f}), "
          f"|Δ loss| {loss_delta:.2e} (loss {runs[name]['loss']:.4f})")
    assert delta <= 1e-4 and loss_delta <= 1e-4


@pytest.mark.parametrize("name", VARIANTS)
def test_mindspore_network_to_transformers(runs, name, tmp_path):
    """The same safetensors as a Hugging Face model (no Megatron on the way) compute the
    network's logits in transformers."""
    mindformers_to_hf(runs[name]["mf"], tmp_path / "hf", **runs[name]["model"], quiet=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = model(TOKENS).logits
    delta = (got - torch.from_numpy(runs[name]["logits"])).abs().max().item()
    print(f"{name} -> {type(model).__name__}: max |Δ logits| {delta:.2e}")
    assert delta <= 1e-4


def rank_files(root) -> dict:
    ckpt = open_checkpoint(root)
    return {p.parent.name: torch.load(p, weights_only=False)
            for p in sorted(ckpt.iter_dir.glob("*/model_optim_rng.pt"))}


def assert_same_weights(a, b, true_vocab: int, dtype=None) -> None:
    """Every rank file's model chunks hold the same entries, in order, bit for bit (``a``'s cast to
    ``dtype``); but the vocabulary padding, which MindFormers does not keep: ``b``'s is zero."""
    a, b = rank_files(a), rank_files(b)
    assert list(a) == list(b)
    for rank, state in a.items():
        chunks = [k for k in state if k.startswith("model")]
        assert chunks == [k for k in b[rank] if k.startswith("model")], rank
        for chunk in chunks:
            assert list(state[chunk]) == list(b[rank][chunk]), (rank, chunk)
            for key, tensor in state[chunk].items():
                other = b[rank][chunk][key]
                if tensor is None:
                    assert other is None, (rank, chunk, key)
                    continue
                tensor = tensor.to(dtype or tensor.dtype)
                assert tensor.dtype == other.dtype and tensor.shape == other.shape, (rank, chunk, key)
                if key in VOCAB_KEYS:  # a TP1 rank holds every row
                    tensor, other, padding = tensor[:true_vocab], other[:true_vocab], other[true_vocab:]
                    assert not padding.any(), (rank, chunk, key)
                assert torch.equal(tensor, other), (rank, chunk, key)


@pytest.mark.parametrize("qkv_concat", [False, True])
def test_megatron_round_trip_is_bitwise(runs, tmp_path, qkv_concat):
    """A TP1·PP2·VPP2 checkpoint megatron-core trained, to MindFormers (qkv_concat or not) and back
    to the same layout: every weight bit for bit, in megatron-core's entries and order."""
    mf, back = tmp_path / "mf", tmp_path / "back"
    megatron_to_mindformers(runs["trained"], mf, qkv_concat=qkv_concat, quiet=True)
    mindformers_to_megatron(mf, back, Target(tp=1, pp=2, vpp=2, make_vocab_size_divisible_by=16, layer_spec="local"),
                            quiet=True)
    assert_same_weights(runs["trained"], back, true_vocab({}))


def test_megatron_to_mindformers_bf16_sharded_and_back(runs, tmp_path):
    """The Qwen2-like TP2·PP2 checkpoint (biases, tied) as bf16 MindFormers files of at most 100 kB
    (with param_name_map.json) that MindSpore loads: each tensor is the original cast to bf16 (the
    fused ones of the MindSpore network unfused); back to Megatron TP2·PP2: the bf16 weights."""
    source = runs["qwen2_concat"]["megatron"]
    mf = tmp_path / "mf"
    megatron_to_mindformers(source, mf, Target(params_dtype="bf16"), max_shard_size="100kB", quiet=True)
    name_map = json.loads((mf / "param_name_map.json").read_text())
    assert len(set(name_map.values())) > 1
    original = ms.load_checkpoint(str(runs["qwen2_concat"]["mf"] / "model.safetensors"), format="safetensors")
    loaded = {}
    for file in set(name_map.values()):
        loaded.update(ms.load_checkpoint(str(mf / file), format="safetensors"))
    assert sorted(loaded) == sorted(name_map) and "model.layers.0.attention.wq.bias" in loaded
    for key, value in loaded.items():
        assert value.dtype == ms.bfloat16, key
    # The fused original, unfused: wq is its q rows of every group, w1 the even rows of w_gate_hidden.
    fused = original["model.layers.0.attention.w_qkv.weight"].asnumpy().reshape(GROUPS, HEADS // GROUPS + 2, D, -1)
    want = torch.from_numpy(fused[:, :-2].reshape(HIDDEN, HIDDEN)).to(torch.bfloat16)
    assert torch.equal(torch.from_numpy(loaded["model.layers.0.attention.wq.weight"].float().asnumpy()), want.float())
    gate = original["model.layers.3.feed_forward.w_gate_hidden.weight"].asnumpy()[0::2]
    assert torch.equal(torch.from_numpy(loaded["model.layers.3.feed_forward.w1.weight"].float().asnumpy()),
                       torch.from_numpy(gate).to(torch.bfloat16).float())
    back = tmp_path / "back"
    mindformers_to_megatron(mf, back, Target(tp=2, pp=2, layer_spec="local"), quiet=True)
    assert_same_weights(source, back, VOCAB, torch.bfloat16)


# ----------------------------------------------------------------------------- Hugging Face


def hf_model(family: str, seed: int):
    config_class = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}[family]
    config = getattr(transformers, config_class)(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=GROUPS, rope_theta=123456.0)
    return random_hf_model(config, seed)


def mindformers_name(hf: str) -> str:
    """MindFormers' own convert_name (LlamaForCausalLM.convert_name), restated."""
    for old, new in (("embed_tokens.", "tok_embeddings."), (".self_attn.q_proj.", ".attention.wq."),
                     (".self_attn.k_proj.", ".attention.wk."), (".self_attn.v_proj.", ".attention.wv."),
                     (".self_attn.o_proj.", ".attention.wo."), (".mlp.gate_proj.", ".feed_forward.w1."),
                     (".mlp.down_proj.", ".feed_forward.w2."), (".mlp.up_proj.", ".feed_forward.w3."),
                     (".input_layernorm.", ".attention_norm."), (".post_attention_layernorm.", ".ffn_norm."),
                     (".norm.", ".norm_out."), ("output.", "lm_head."),
                     (".tok_embeddings.weight", ".tok_embeddings.embedding_weight")):
        hf = hf.replace(old, new)
    return hf


def concat_as_mindformers(tensors: dict) -> dict:
    """MindFormers' qkv_concat of HF-named-as-MindFormers tensors (their qkv_concat_hf2mg and
    ffn_concat_hf2mg, restated with NumPy)."""
    out = dict(tensors)
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (out.pop(f"{prefix}attention.w{p}.{kind}", None) for p in "qkv")
            if q is not None:
                shape = (-1,) if kind == "bias" else (-1, HIDDEN)
                parts = [q.reshape(GROUPS, HIDDEN // GROUPS, -1), k.reshape(GROUPS, D, -1), v.reshape(GROUPS, D, -1)]
                out[f"{prefix}attention.w_qkv.{kind}"] = np.concatenate(parts, 1).reshape(shape)
        gate, up = out.pop(f"{prefix}feed_forward.w1.weight"), out.pop(f"{prefix}feed_forward.w3.weight")
        out[f"{prefix}feed_forward.w_gate_hidden.weight"] = \
            np.concatenate([gate.reshape(FFN, 1, -1), up.reshape(FFN, 1, -1)], 1).reshape(2 * FFN, HIDDEN)
    return out


@pytest.mark.parametrize("family, qkv_concat", [("llama", False), ("qwen2", True)])
def test_hf_to_mindformers_and_back(tmp_path, family, qkv_concat):
    """HF -> MindFormers: MindSpore loads the file, and every tensor equals HF's under MindFormers'
    name map (the fused ones element by element against MindFormers' own concatenation); the file
    is the bytes mindspore.save_checkpoint writes for those tensors. Back to HF: bit for bit."""
    model = hf_model(family, seed=10 + qkv_concat)
    hf, mf, back = tmp_path / "hf", tmp_path / "mf", tmp_path / "back"
    model.save_pretrained(hf)
    hf_to_mindformers(hf, mf, qkv_concat=qkv_concat, quiet=True)
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    want = {mindformers_name(k): v for k, v in original.items()}
    if qkv_concat:
        want = concat_as_mindformers(want)
    loaded = ms.load_checkpoint(str(mf / "model.safetensors"), format="safetensors")
    assert sorted(loaded) == sorted(want)
    for name, value in want.items():
        assert np.array_equal(loaded[name].asnumpy(), value), name
    again = tmp_path / "again.safetensors"
    ms.save_checkpoint(loaded, str(again), format="safetensors")
    assert again.read_bytes() == (mf / "model.safetensors").read_bytes()
    mindformers_to_hf(mf, back, quiet=True)
    converted = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(converted) is type(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name


# ----------------------------------------------------------------------------- bad input


def mf_cli(capsys, command: str, source, save_dir, *flags, names, says):
    """The subcommand as `ckpt-hooks` runs it refuses with one line, exit 2, writing nothing and
    leaving the source as it was."""
    parser = argparse.ArgumentParser(prog="ckpt-hooks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text))
    before = tree_digest(source.parent)
    args = parser.parse_args([command, "--load-dir", str(source), "--save-dir", str(save_dir),
                              *map(str, flags), "--quiet"])
    assert guarded(COMMANDS[command][2], args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {names}"), lines
    assert says in lines[0], lines[0]
    assert not save_dir.exists()
    assert not any(p.name.startswith(f".{save_dir.name}.partial") for p in save_dir.parent.iterdir())
    assert tree_digest(source.parent) == before


@pytest.fixture
def llama_file(runs, tmp_path):
    """A copy of the MindSpore Llama's tensors, to damage (and to pad with training state)."""
    (tmp_path / "src").mkdir()
    tensors = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(runs["llama"]["mf"] / "model.safetensors"),
                                                             format="safetensors").items()}
    return tmp_path / "src" / "net.safetensors", tensors


def test_unmapped_tensors_are_listed_and_training_state_skipped(llama_file, tmp_path, capsys):
    path, tensors = llama_file
    tensors.update({"model.layers.0.attention.q_norm.weight": np.ones(D, np.float32),
                    "model.extra.weight": np.ones(2, np.float32), "global_step": np.array([3], np.int32),
                    "adam_m.model.norm_out.weight": np.zeros(HIDDEN, np.float32)})
    ms_safetensors.save(path, tensors)
    mf_cli(capsys, "mindformers-to-megatron", path, tmp_path / "out", "--num-attention-heads", HEADS,
           names=path, says="2 tensors the MindFormers llama name map does not cover: model.extra.weight, "
                            "model.layers.0.attention.q_norm.weight")
    del tensors["model.extra.weight"], tensors["model.layers.0.attention.q_norm.weight"]
    del tensors["model.layers.2.attention.wv.weight"]
    ms_safetensors.save(path, tensors)
    mf_cli(capsys, "mindformers-to-hf", path, tmp_path / "out", "--num-attention-heads", HEADS,
           names=path, says="missing tensors: model.layers.2.attention.wv.weight")


def test_shapes_that_disagree_with_the_model(runs, llama_file, tmp_path, capsys):
    path, tensors = llama_file
    ms_safetensors.save(path, tensors)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**qwen2_config(VARIANTS["llama"]), "model_type": "llama", "intermediate_size": 96}))
    mf_cli(capsys, "mindformers-to-megatron", path, tmp_path / "out", "--config", config, names=path,
           says="'model.layers.0.feed_forward.w1.weight' has shape [128, 64], but config.json implies [96, 64]")
    tensors["model.layers.1.attention.wk.weight"] = tensors["model.layers.1.attention.wk.weight"][:16]
    ms_safetensors.save(path, tensors)
    mf_cli(capsys, "mindformers-to-megatron", path, tmp_path / "out", "--num-attention-heads", HEADS, names=path,
           says="'model.layers.1.attention.wk.weight' has shape [16, 64], but the model read from layer 0 "
                "and the flags implies [32, 64]")
    mf_cli(capsys, "mindformers-to-megatron", path, tmp_path / "out", names=path,
           says="no model config: pass --config or --num-attention-heads")
