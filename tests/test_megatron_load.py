"""ckpt_hooks.megatron.load inside a real megatron-core job: a checkpoint saved at one layout
(by Megatron-LM's own save path, no hooks) resumes at another, weights and optimizer state,
each rank reading only its share, and training continues the uninterrupted loss curve."""

import json
import shutil
import zipfile

import pytest
import torch

from tests.conftest import uninterrupted_losses
from tests.harness import resume_job, run_jobs

# (source, the run it was saved from, running layout). World of 4: DP fills the rest.
CASES = [
    ("cont_tp2pp2", "cont_tp2pp2", {"tp": 1, "pp": 1}),        # TP, PP and DP at once
    ("cont_tp2pp2", "cont_tp2pp2", {"tp": 1, "pp": 2}),        # TP and DP
    ("cont_tp2pp2", "cont_tp2pp2", {"tp": 4, "pp": 1}),
    ("cont_tp1pp2vpp2", "cont_tp1pp2vpp2", {"tp": 2, "pp": 2}),  # VPP off
    ("cont_tp2pp2", "cont_tp2pp2", {"tp": 1, "pp": 2, "vpp": 2}),  # VPP on
    ("cont_tp2pp2", "cont_tp2pp2", {"tp": 2, "pp": 2}),        # same layout
    ("saved_tp2pp2", "cont_tp2pp2", {"tp": 1, "pp": 2}),       # saved by ckpt_hooks.megatron.save
    ("saved_tp2pp2", "cont_tp2pp2", {"tp": 2, "pp": 2}),
]
STEPS = 2


def case_id(case):
    name, _, t = case
    return f"{name}-to-tp{t['tp']}pp{t['pp']}" + (f"vpp{t['vpp']}" if t.get("vpp") else "")


@pytest.fixture(scope="module")
def resumed(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("hook_load")
    results = {case_id(c): root / f"{case_id(c)}.json" for c in CASES}
    jobs = [resume_job(t, sources[name].dir, sources[name].truth, results[case_id(c)], model=sources[name].model,
                       steps=STEPS, loader="ckpt_hooks") for c in CASES for name, _, t in [c]]
    # Bad input: another model's checkpoint, an iteration directory missing a rank, and one
    # whose manifest disagrees with a file (replaced by the same rank's file of another save).
    source = sources["cont_tp2pp2"]
    partial = root / "partial"
    shutil.copytree(source.dir, partial)
    shutil.rmtree(next(partial.glob("iter_*/mp_rank_01_001")))
    replaced = root / "replaced"
    shutil.copytree(sources["saved_tp2pp2"].dir, replaced)
    shutil.copy(next(source.dir.glob("iter_*/mp_rank_00_001/model_optim_rng.pt")),
                next(replaced.glob("iter_*/mp_rank_00_001/model_optim_rng.pt")))
    for key, load_dir, model in (("other-model", source.dir, {**source.model, "query_groups": 4}),
                                 ("missing-rank", partial, source.model),
                                 ("replaced-file", replaced, source.model)):
        results[key] = root / f"{key}.json"
        jobs.append(resume_job({"tp": 1, "pp": 2}, load_dir, source.truth, results[key], model=model, steps=STEPS,
                               loader="ckpt_hooks"))
    run_jobs(jobs, root / "logs")
    return {key: (json.loads(path.read_text()),
                  [json.loads(p.read_text()) for p in sorted(root.glob(f"{path.name}.bytes.*.json"))])
            for key, path in results.items()}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_resume_at_new_layout_is_bitwise_and_continues_the_loss(sources, resumed, case):
    name, reference, target = case
    result, _ = resumed[case_id(case)]
    assert result["load_error"] is None, result["load_error"]
    assert result["weight_mismatches"] == [] and result["optim_mismatches"] == [], result
    assert result["missing"] == [] and result["extra"] == [], result
    assert result["iteration"] == sources[name].steps
    want = uninterrupted_losses(sources, reference, STEPS)
    assert max(abs(a - b) for a, b in zip(result["losses"], want)) <= 1e-5, (result["losses"], want)
    if target == sources[name].layout:
        assert result["losses"] == want


@pytest.mark.parametrize("key, says", [("other-model", "checkpoint of a different model: num_query_groups 2 "
                                                        "(running 4)"),
                                        ("missing-rank", "mp_rank_01_001: missing rank directory"),
                                        ("replaced-file", "bytes, ckpt_hooks_manifest.json says")])
def test_bad_checkpoint_is_refused_on_every_rank(resumed, key, says):
    result, _ = resumed[key]
    lines = result["load_error"].splitlines()
    assert len(lines) == 4, result["load_error"]  # every rank says why, and the job ends cleanly
    assert all(says in line for line in lines), result["load_error"]
    assert result["losses"] == []


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_rank_reads_only_its_share(sources, resumed, case):
    """Bytes read by each rank <= 1.1 x (its model share + its DP shard of the optimizer
    state) + the metadata records (pickles) of the source files, which every rank parses."""
    name, _, target = case
    _, ranks = resumed[case_id(case)]
    assert len(ranks) == 4
    truth = torch.load(sources[name].truth, weights_only=False)
    model_bytes = sum(t.numel() * t.element_size() for t in truth["tensors"].values())
    optim_bytes = sum(t.numel() * 4 for state in truth["optimizer"].values() for t in state.values())
    dp = 4 // (target["tp"] * target["pp"])
    share = model_bytes / (target["tp"] * target["pp"]) + optim_bytes / (target["tp"] * target["pp"] * dp)
    metadata = sum(info.file_size for path in sources[name].dir.rglob("*.pt")
                   for info in zipfile.ZipFile(path).infolist() if "/data/" not in info.filename)
    for rank in ranks:
        assert rank["bytes_read"] <= 1.1 * share + metadata, (rank, share)
