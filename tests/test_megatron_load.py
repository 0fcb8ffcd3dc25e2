"""ckpt_hooks.megatron.load inside a real megatron-core job: a checkpoint saved at one layout
(by Megatron-LM's own save path, no hooks) resumes at another, weights and optimizer state,
each rank reading only its share, and training continues the uninterrupted loss curve."""

import json
import zipfile

import pytest
import torch

from tests.harness import resume_job, run_jobs

# (source, 5-step reference of the same run, running layout). World of 4: DP fills the rest.
CASES = [
    ("cont_tp2pp2", "cont_tp2pp2_5steps", {"tp": 1, "pp": 1}),        # TP, PP and DP at once
    ("cont_tp2pp2", "cont_tp2pp2_5steps", {"tp": 1, "pp": 2}),        # TP and DP
    ("cont_tp2pp2", "cont_tp2pp2_5steps", {"tp": 4, "pp": 1}),
    ("cont_tp1pp2vpp2", "cont_tp1pp2vpp2_5steps", {"tp": 2, "pp": 2}),  # VPP off
    ("cont_tp2pp2", "cont_tp2pp2_5steps", {"tp": 1, "pp": 2, "vpp": 2}),  # VPP on
    ("cont_tp2pp2", "cont_tp2pp2_5steps", {"tp": 2, "pp": 2}),        # same layout
]
STEPS = 2


def case_id(case):
    name, _, t = case
    return f"{name}-to-tp{t['tp']}pp{t['pp']}" + (f"vpp{t['vpp']}" if t.get("vpp") else "")


@pytest.fixture(scope="module")
def resumed(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("hook_load")
    results = {case_id(c): root / f"{case_id(c)}.json" for c in CASES}
    run_jobs([resume_job(t, sources[name].dir, sources[name].truth, results[case_id(c)], model=sources[name].model,
                         steps=STEPS, loader="ckpt_hooks") for c in CASES for name, _, t in [c]], root / "logs")
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
    want = torch.load(sources[reference].truth, weights_only=False)["train_losses"][3:3 + STEPS]
    assert max(abs(a - b) for a, b in zip(result["losses"], want)) <= 1e-5, (result["losses"], want)
    if target == sources[name].layout:
        assert result["losses"] == want


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
