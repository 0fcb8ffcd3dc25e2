"""Megatron-LM's legacy models (``--use-legacy-models``, megatron.legacy.model.GPTModel) as sources
and targets of the conversions.

megatron-core's wheel has no ``megatron.legacy``, so CI cannot build a real legacy model: the legacy
checkpoints here are real megatron-core checkpoints (the ``sources`` fixture) renamed and nested as
Megatron-LM core_v0.16.1's legacy GPTModel saves them (``legacy_model`` below, written out from
megatron/legacy/model/{gpt_model,language_model,transformer}.py, independently of ckpt_hooks' table):
``model`` -> {"language_model": {"embedding": {"word_embeddings": {"weight"}}, "encoder": {flat
"layers.N.input_norm.weight", ... "final_norm.weight"}, "output_layer": {"weight"}}} or, tied on a
last stage of PP > 1, a top-level "word_embeddings_for_head": {"weight"}; each layer's entries in
the legacy modules' order (query_key_value before dense: the named_parameters() order, which
decides the distributed optimizer's buffer layout), and distrib_optim.pt repacked in that order.
The tensors themselves need no change: the legacy QKV rows are grouped per query group
[q heads | k | v] and each TP rank's dense_h_to_4h holds [gate_r; up_r], as megatron-core's.
"""

import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ckpt_hooks.algebra.target import Target
from ckpt_hooks.megatron.checkpoint import read_source
from ckpt_hooks.megatron.conversion import convert
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.converters.hf.to_hf import megatron_to_hf
from ckpt_hooks.converters.lora.merge import merge_lora
from ckpt_hooks.megatron.optimizer import STATES, SourceOptimizer, rebuild_maps
from tests.test_lora import LEGACY_TARGETS, random_lora, save_lora
from tests.util import assert_same, tree_digest

# megatron-core layer module -> legacy module, in the legacy ParallelTransformerLayer's order
LAYER_MODULES = OrderedDict([("input_layernorm", "input_norm"),
                             ("self_attention.linear_qkv", "self_attention.query_key_value"),
                             ("self_attention.linear_proj", "self_attention.dense"),
                             ("pre_mlp_layernorm", "post_attention_norm"),
                             ("mlp.linear_fc1", "mlp.dense_h_to_4h"),
                             ("mlp.linear_fc2", "mlp.dense_4h_to_h")])
# Megatron-LM before the norms' rename (checkpoints of 2023 and earlier)
OLDER = {"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
         "final_norm": "final_layernorm"}


def _legacy_layer_order(core_key: str):
    _, _, layer, rest = core_key.split(".", 3)
    module, param = rest.rsplit(".", 1)
    return int(layer), list(LAYER_MODULES).index(module), param != "weight"


def legacy_model(core: dict, tied: bool, older: bool = False) -> tuple[OrderedDict, list[str]]:
    """A megatron-core chunk (local spec) as the legacy GPTModel saves it, and the megatron-core
    keys in the legacy named_parameters() order."""
    norm = (lambda name: OLDER[name]) if older else (lambda name: name)
    keys = [k for k, v in core.items() if v is not None]   # the linears' _extra_state: not in legacy
    layers = sorted((k for k in keys if k.startswith("decoder.layers.")), key=_legacy_layer_order)
    order = [k for k in keys if k.startswith("embedding.")] + layers + \
        [k for k in keys if k.startswith("decoder.final_layernorm.")] + [k for k in keys if k == "output_layer.weight"]
    assert sorted(order) == sorted(keys), keys
    lm, out = OrderedDict(), OrderedDict()
    for key in order:
        if key.startswith("embedding."):
            _, table, param = key.split(".")
            lm.setdefault("embedding", OrderedDict())[table] = OrderedDict([(param, core[key])])
        elif key.startswith("decoder.layers."):
            _, _, layer, rest = key.split(".", 3)
            module, param = rest.rsplit(".", 1)
            name = LAYER_MODULES[module]
            name = norm(name) if "norm" in name else name
            lm.setdefault("encoder", OrderedDict())[f"layers.{layer}.{name}.{param}"] = core[key]
        elif key.startswith("decoder.final_layernorm."):
            lm.setdefault("encoder", OrderedDict())[f"{norm('final_norm')}.{key.rsplit('.', 1)[1]}"] = core[key]
        elif tied:   # the last stage's copy of the embedding (PP > 1), beside language_model
            out["word_embeddings_for_head"] = OrderedDict([("weight", core[key])])
        else:
            lm["output_layer"] = OrderedDict([("weight", core[key])])
    return OrderedDict([("language_model", lm), *out.items()]), order


def make_legacy(core_dir, out_dir, older: bool = False):
    """A megatron-core checkpoint directory rewritten as the legacy model's, distrib_optim.pt
    (where there is one) repacked in the legacy parameter order."""
    src = read_source(core_dir, check_manifest=False)
    ckpt, spec, source, files = src.ckpt, src.spec, src.layout, src.files
    has_optimizer = any(p.name == "distrib_optim.pt" for p in ckpt.iter_dir.rglob("*.pt"))
    optim = SourceOptimizer(src) if has_optimizer else None
    for f in files:
        rank = f.rank
        state = torch.load(f.path, weights_only=False)
        orders = {}
        for chunk in f.chunks:
            state[chunk], orders[chunk] = legacy_model(state[chunk], spec.tied_embeddings, older)
        target = out_dir / ckpt.iter_dir.name / Path(f.path).parent.name
        target.mkdir(parents=True)
        torch.save(state, target / "model_optim_rng.pt")
        if optim is None:
            continue
        original = torch.load(optim.files[rank].path, weights_only=False)
        chunks = {chunk: OrderedDict((k, f.chunks[chunk][k]) for k in order) for chunk, order in orders.items()}
        maps = rebuild_maps(spec, source, ckpt.args, f.rank.pp, chunks, optim.grad_dtypes)
        assert len(maps) == sum(isinstance(k, int) for k in original)
        packed = {k: v for k, v in original.items() if not isinstance(k, int)}
        for index, buffer_map in enumerate(maps):
            flats = {}
            for state_name in STATES:
                flat = torch.zeros(buffer_map.numel_unpadded, dtype=torch.float32)
                for slot in buffer_map.params:
                    lazy = optim.views[(state_name, rank, list(chunks)[buffer_map.chunk], slot.name)]
                    offset = buffer_map.legacy_offset(slot)
                    flat[offset:offset + lazy.numel] = optim.files[rank].read(lazy).reshape(-1)
                flats[state_name] = flat
            flats["numel_unpadded"] = buffer_map.numel_unpadded
            packed[index] = {(getattr(torch, buffer_map.param_dtype), getattr(torch, buffer_map.grad_dtype)): flats}
        torch.save(packed, target / "distrib_optim.pt")
    tracker = "latest_checkpointed_iteration.txt"
    (out_dir / tracker).write_text((core_dir / tracker).read_text())
    return out_dir


def rank_files(root):
    iter_dir = next(p for p in root.iterdir() if p.is_dir() and p.name.startswith(("iter_", "release")))
    return {p.relative_to(root): p for p in sorted(iter_dir.rglob("*.pt"))}


def assert_same_files(a_root, b_root, entries=None):
    """Every .pt file of both trees holds the same content (``entries``: only those of the model file)."""
    a, b = rank_files(a_root), rank_files(b_root)
    assert list(a) == list(b)
    for rel in a:
        x, y = (torch.load(root, weights_only=False) for root in (a[rel], b[rel]))
        if entries is not None and rel.name == "model_optim_rng.pt":
            x, y = ({k: v[k] for k in v if k in entries or str(k).startswith("model")} for v in (x, y))
        assert_same(x, y, str(rel))


@pytest.fixture(scope="module")
def legacy(sources, tmp_path_factory):
    """name -> the legacy form of the megatron-core source ``name``, made on first use."""
    root, made = tmp_path_factory.mktemp("legacy"), {}

    def get(name):
        if name not in made:
            made[name] = make_legacy(sources[name].dir, root / name)
        return made[name]
    return get


# (source, target layout); the first keeps its padded vocabulary at both TPs
CASES = [("cont_tp2pp2", {"tp": 1, "pp": 4}),
         ("tied_bf16_tp2pp2", {"tp": 1, "pp": 4}),
         ("tied_bf16_tp2pp2", {"tp": 1, "pp": 1}),
         ("tp1pp2vpp2", {"tp": 2, "pp": 1})]


@pytest.mark.parametrize("name,target", CASES)
def test_convert_keeps_the_legacy_model(sources, legacy, name, target, tmp_path):
    """A legacy checkpoint converted (weights and distributed optimizer) is the legacy form of the
    megatron-core checkpoint converted the same way, file for file and bit for bit, and converted
    back to the source layout too; where the padded vocabulary is the same at both TPs (else the
    padding rows are re-made), the model and optimizer entries come back as the source's, bit for bit."""
    layout = sources[name].layout
    back = Target(tp=layout["tp"], pp=layout["pp"], vpp=layout.get("vpp"))
    for kind, source in (("legacy", legacy(name)), ("core", sources[name].dir)):
        convert(source, tmp_path / kind, Target(**target), quiet=True)
        convert(tmp_path / kind, tmp_path / f"{kind}-back", back, quiet=True)
    for out in ("", "-back"):
        assert_same_files(tmp_path / f"legacy{out}", make_legacy(tmp_path / f"core{out}", tmp_path / f"as-legacy{out}"))
    first = next(p for p in rank_files(tmp_path / "legacy").values() if p.name == "model_optim_rng.pt")
    model = next(v for k, v in torch.load(first, weights_only=False).items() if str(k).startswith("model"))
    assert list(model) == ["language_model"] and "encoder" in model["language_model"]
    if name == "cont_tp2pp2":
        assert_same_files(tmp_path / "legacy-back", legacy(name), entries=("iteration", "checkpoint_version"))


def test_older_norm_names_are_kept(sources, tmp_path):
    """A checkpoint of Megatron-LM before the norms' rename (input_layernorm, post_attention_layernorm,
    final_layernorm) is read, and written back with those names."""
    older = make_legacy(sources["tp2pp2"].dir, tmp_path / "older", older=True)
    convert(older, tmp_path / "out", Target(tp=1, pp=4), convert_param_only=True, quiet=True)
    convert(sources["tp2pp2"].dir, tmp_path / "core", Target(tp=1, pp=4), convert_param_only=True, quiet=True)
    assert_same_files(tmp_path / "out", make_legacy(tmp_path / "core", tmp_path / "core-as-older", older=True))
    last = torch.load(rank_files(tmp_path / "out")[next(k for k in rank_files(tmp_path / "out")
                                                        if "mp_rank_00_003" in str(k))], weights_only=False)
    assert "final_layernorm.weight" in last["model"]["language_model"]["encoder"]


@pytest.mark.parametrize("name", ["tp2pp2", "tied_bf16_tp2pp2"])
def test_legacy_to_hf_is_the_megatron_core_output(sources, legacy, name, tmp_path):
    """megatron-to-hf of the legacy checkpoint writes the same files, byte for byte, as of the
    megatron-core checkpoint it was made from."""
    megatron_to_hf(legacy(name), tmp_path / "legacy", quiet=True)
    megatron_to_hf(sources[name].dir, tmp_path / "core", quiet=True)
    assert tree_digest(tmp_path / "legacy") == tree_digest(tmp_path / "core")


def test_lora_merge_into_a_legacy_base(sources, legacy, tmp_path):
    """A LoRA checkpoint with legacy module names merged into the legacy base is the legacy form
    of the same merge into the megatron-core base (Megatron output), and the same HF files."""
    base = sources["tp2pp2"]
    lora = save_lora(tmp_path / "lora", random_lora(torch.load(base.truth, weights_only=False), 0), base, 1, 4,
                     legacy=True)
    for out, load in (("legacy", legacy("tp2pp2")), ("core", base.dir)):
        merge_lora(load, lora, tmp_path / out, target_modules=LEGACY_TARGETS, target=Target(tp=1, pp=2), quiet=True)
        merge_lora(load, lora, tmp_path / f"{out}-hf", target_modules=LEGACY_TARGETS, save_format="hf", quiet=True)
    assert_same_files(tmp_path / "legacy", make_legacy(tmp_path / "core", tmp_path / "core-as-legacy"))
    assert tree_digest(tmp_path / "legacy-hf") == tree_digest(tmp_path / "core-hf")


def _rewrite(path, edit):
    state = torch.load(path, weights_only=False)
    edit(state)
    torch.save(state, path)


def test_bad_legacy_checkpoints_are_refused(legacy, tmp_path):
    """An unknown legacy tensor, a tensor named twice (new and older names), or rank files of
    both kinds: one-line errors naming the file."""
    cases = {
        "unknown": (lambda s: s["model"]["language_model"]["encoder"].__setitem__(
            "layers.0.self_attention.rotary.weight", torch.zeros(2)),
            "unsupported tensor 'language_model.encoder.layers.0"),
        "twice": (lambda s: s["model"]["language_model"]["encoder"].__setitem__(
            "layers.0.input_layernorm.weight", torch.zeros(2)), "twice"),
        "mixed": (lambda s: s.__setitem__("model", {"embedding.word_embeddings.weight": torch.zeros(2)}),
                  "some rank files hold a Megatron-LM legacy model"),
    }
    for case, (edit, says) in cases.items():
        root = shutil.copytree(legacy("tp2pp2"), tmp_path / case)
        _rewrite(root / "iter_0000003" / "mp_rank_01_001" / "model_optim_rng.pt", edit)
        with pytest.raises(CheckpointError) as error:
            convert(root, tmp_path / f"{case}-out", convert_param_only=True, quiet=True)
        assert says in str(error.value) and "\n" not in str(error.value), (case, str(error.value))
