"""ckpt_hooks.patches.megatron_core in a real megatron-core run: the param_map is recorded at
save time beside distrib_optim.pt, the trainer's own files are unchanged, and a load whose
bucket layout does not fit is refused on every rank."""

import json
import shutil

import pytest
import torch

from ckpt_hooks.algebra.param_map import BufferMap
from tests.conftest import uninterrupted_losses
from tests.harness import resume_job, run_jobs
from tests.util import assert_same

HOOKED, TWIN = "hooked_tp1pp2vpp2", "cont_tp1pp2vpp2"


def rank_dirs(source):
    return sorted(source.dir.glob("iter_*/mp_rank_*"))


def test_save_hook_records_the_live_param_map(sources):
    recorded = {(r["tp_rank"], r["pp_rank"]): r["buffers"]
                for r in torch.load(sources[HOOKED].truth, weights_only=False)["param_map"]}
    dirs = rank_dirs(sources[HOOKED])
    assert len(dirs) == 2
    for pp_rank, rank_dir in enumerate(dirs):
        saved = json.loads((rank_dir / "param_map.json").read_text())
        assert [BufferMap.from_json(b).to_json() for b in saved] == \
            [BufferMap.from_json(b).to_json() for b in recorded[(0, pp_rank)]]
        # MindSpeed-Core-MS files: one per DP rank (DP 2) and virtual chunk (2), one buffer each.
        names = sorted(p.name for p in (rank_dir / "param_map").iterdir())
        assert names == [f"param_map_buffer0_dp{d}tp0pp{pp_rank}vpp{v}.json" for d in (0, 1) for v in (0, 1)]
        mindspeed = json.loads((rank_dir / "param_map" / f"param_map_buffer0_dp1tp0pp{pp_rank}vpp1.json").read_text())
        chunk1 = next(b for b in saved if b["chunk"] == 1)
        assert mindspeed == {n: ["float32", shape, start, end, bucket] for n, shape, start, end, bucket in chunk1["params"]}


def test_trainer_files_are_unchanged_by_the_save_hook(sources):
    for hooked, twin in zip(rank_dirs(sources[HOOKED]), rank_dirs(sources[TWIN])):
        for name in ("distrib_optim.pt", "model_optim_rng.pt"):
            a = torch.load(hooked / name, weights_only=False)
            b = torch.load(twin / name, weights_only=False)
            assert_same(a, b, name)
        assert sorted(p.name for p in twin.iterdir()) == ["distrib_optim.pt", "model_optim_rng.pt"]


@pytest.fixture(scope="module")
def hooked_loads(sources, tmp_path_factory):
    """Same-layout resumes through Megatron-LM's load path with the patch installed: one of the
    hooked checkpoint, one of a copy whose recorded bucket layout was tampered with."""
    root = tmp_path_factory.mktemp("hooked")
    source = sources[HOOKED]
    tampered = root / "tampered"
    shutil.copytree(source.dir, tampered)
    for path in tampered.glob("iter_*/mp_rank_*/param_map.json"):
        # A well-formed map of another order: two parameters of one shape swap places.
        params = json.loads(path.read_text())
        slots = params[0]["params"]
        a, b = next((i, j) for i in range(len(slots)) for j in range(i + 1, len(slots)) if slots[i][1] == slots[j][1])
        slots[a][0], slots[b][0] = slots[b][0], slots[a][0]
        path.write_text(json.dumps(params))
    jobs = {name: resume_job(source.layout, load_dir, source.truth, root / f"{name}.json", model=source.model,
                             steps=2, patches=("megatron_core",))
            for name, load_dir in (("intact", source.dir), ("tampered", tampered))}
    run_jobs(list(jobs.values()), root / "logs")
    return {name: json.loads((root / f"{name}.json").read_text()) for name in jobs}


def test_hooked_checkpoint_resumes_exactly_with_the_patch(sources, hooked_loads):
    result = hooked_loads["intact"]
    assert result["ok"], result
    assert result["losses"] == uninterrupted_losses(sources, "cont_tp1pp2vpp2")


def test_bucket_layout_that_does_not_fit_is_refused_on_every_rank(hooked_loads):
    error = hooked_loads["tampered"]["load_error"]
    assert error is not None
    lines = error.splitlines()
    assert len(lines) == 4  # every rank reports it, none hangs
    assert all("distrib_optim.pt: saved with buckets" in line and "misplaced" in line for line in lines), error


SAVED, PLAIN = "saved_tp2pp2", "cont_tp2pp2"


def test_library_save_writes_what_megatron_lm_writes_plus_manifest_and_maps(sources):
    """ckpt_hooks.megatron.save of a run = Megatron-LM's files of the same run (args aside: the
    library describes the model from its config), plus the manifest and the param_maps."""
    saved_iter = next(sources[SAVED].dir.glob("iter_*"))
    plain_iter = next(sources[PLAIN].dir.glob("iter_*"))
    for rank_dir in sorted(plain_iter.glob("mp_rank_*")):
        twin = saved_iter / rank_dir.name
        assert_same(torch.load(twin / "distrib_optim.pt", weights_only=False),
                    torch.load(rank_dir / "distrib_optim.pt", weights_only=False), "distrib_optim.pt")
        ours, theirs = (torch.load(d / "model_optim_rng.pt", weights_only=False) for d in (twin, rank_dir))
        assert ours.keys() == theirs.keys()
        assert_same({k: v for k, v in ours.items() if k != "args"},
                    {k: v for k, v in theirs.items() if k != "args"}, "model_optim_rng.pt")
        assert (twin / "param_map.json").is_file() and any((twin / "param_map").iterdir())
    manifest = json.loads((saved_iter / "ckpt_hooks_manifest.json").read_text())
    assert manifest["layout"] == {"tp": 2, "pp": 2, "vpp": 1, "dp": 1, "layers_per_stage": None, "cp": 1, "ep": 1,
                                  "etp": None}
    listed = {p for p in manifest["files"] if p.endswith(".pt")}
    assert listed == {str(p.relative_to(saved_iter)) for p in saved_iter.rglob("*.pt")}
    tensors = manifest["files"]["mp_rank_01_000/model_optim_rng.pt"]["tensors"]
    qkv = tensors["model.decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv["logical"] == "decoder.layers.0.self_attention.linear_qkv.weight"
    assert qkv["offsets"][0] == qkv["global_shape"][0] // 2  # TP rank 1 holds the second half of the groups
