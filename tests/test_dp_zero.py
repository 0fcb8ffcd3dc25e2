"""combine-dp-zero: MindSpeed-Core-MS distributed-optimizer shards back to per-parameter tensors.

MindSpeed-Core-MS does not run here, so its shard files are built by the rules of its
DistributedOptimizer (parameters in reverse order, starts aligned to 512 bytes, buckets padded
to DP x 512 bytes and split evenly over the DP ranks) and written with MindSpore's own
save_checkpoint; the merged output is read back with MindSpore's load_checkpoint and compared
bit for bit with the tensors the shards were cut from."""

import json
import math

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from ckpt_hooks.errors import CheckpointError  # noqa: E402
from ckpt_hooks.mindspore.dp_zero import combine_dp_zero  # noqa: E402
from ckpt_hooks.mindspore.verify import check  # noqa: E402
from tests.util import cli, tree_digest  # noqa: E402

DP_GROUPS = [[0, 2], [1, 3]]  # global ranks; TP2 x DP2: rank = dp * 2 + tp
PARAMS = {  # name -> shape, per TP rank (the same shapes on both)
    "embedding.weight": (50, 16), "layers.0.attention.qkv_proj.weight": (48, 16),
    "layers.0.attention.out_proj.weight": (16, 16), "layers.0.norm.weight": (16,),
    "layers.1.mapping.weight": (40, 16), "final_norm.weight": (16,),
}
ALIGN = 128  # 512 bytes of fp32
BUCKET_SIZE = 1500  # elements: two buckets


def buffer_layout(dp: int):
    """MindSpeed's _ParamAndGradBuffer: (range per param, padded bucket sizes)."""
    ranges, buckets, at, bucket_start = {}, [], 0, 0
    for name in reversed(PARAMS):
        numel = math.prod(PARAMS[name])
        ranges[name] = (len(buckets), at, at + numel)
        at = -(-(at + numel) // ALIGN) * ALIGN
        if at - bucket_start >= BUCKET_SIZE:
            at = -(-at // (dp * ALIGN)) * (dp * ALIGN)
            buckets.append(at - bucket_start)
            bucket_start = at
    if at > bucket_start:
        at = -(-at // (dp * ALIGN)) * (dp * ALIGN)
        buckets.append(at - bucket_start)
    return ranges, buckets


def write_group(root, ranks, seed, fmt="ckpt"):
    """Shards of one DP group, and the truth: {name: array} of every state."""
    rng = np.random.default_rng(seed)
    ranges, buckets = buffer_layout(len(ranks))
    total = sum(buckets)
    truth, flat = {}, {}
    for state in ("", "exp_avg.", "exp_avg_sq."):
        flat[state] = np.zeros(total, np.float32)
        for name, (_, start, end) in ranges.items():
            value = rng.standard_normal(PARAMS[name]).astype(np.float32)
            flat[state][start:end] = value.reshape(-1)
            truth[state + name] = value
    for dp, rank in enumerate(ranks):
        entries, offset = {}, 0
        for k, size in enumerate(buckets):
            per_rank = size // len(ranks)
            for state in flat:
                shard = flat[state][offset + dp * per_rank:offset + (dp + 1) * per_rank]
                entries[f"{state}buffer_0_bucket_{k}"] = ms.Parameter(ms.Tensor(shard), name=f"{state}buffer_0_bucket_{k}")
            offset += size
        entries["state_step"] = ms.Parameter(ms.Tensor(np.array(7, np.int32)), name="state_step")
        entries["learning_rate_group_0"] = ms.Parameter(ms.Tensor(np.float32(1e-3)), name="learning_rate_group_0")
        (root / "output" / f"rank_{rank}").mkdir(parents=True)
        ms.save_checkpoint(entries, str(root / "output" / f"rank_{rank}" / f"network_rank_{rank}-1_7.{fmt}"),
                           format="safetensors" if fmt == "safetensors" else "ckpt")
    info = {"dp_rank_list": ranks,
            "param_info": {name: {"range_map": [0, bucket, start, end], "shape": list(PARAMS[name]), "dtype": "float32"}
                           for name, (bucket, start, end) in ranges.items()},
            "zero3_params": [],
            "buffer_info": {"0": {"buckets": {str(k): [size, size] for k, size in enumerate(buckets)},
                                  "buffer_size": total, "buffer_numel_unpadded": total, "bucket_num": len(buckets)}}}
    info_dir = root / "opt_shard_info" / f"rank_{ranks[0]}"
    info_dir.mkdir(parents=True)
    (info_dir / f"dist_opt_shard_info_rank_{ranks[0]}-0_0.json").write_text(json.dumps(info, indent=4))
    return truth


@pytest.fixture
def sharded(tmp_path):
    truths = {ranks[0]: write_group(tmp_path, ranks, seed) for seed, ranks in enumerate(DP_GROUPS)}
    return tmp_path, truths


def loaded(path, fmt="ckpt"):
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path), format=fmt).items()}


def test_buckets_combine_into_the_very_tensors_they_were_cut_from(sharded):
    root, truths = sharded
    _, buckets = buffer_layout(2)
    assert len(buckets) == 2  # a parameter straddles DP ranks and buckets
    result = cli("combine-dp-zero", "--strategy-dir", root / "opt_shard_info", "--checkpoint-dir", root / "output",
                 "--output-dir", root / "merged", "--copy-to-all-dp-ranks", "--quiet")
    assert result.returncode == 0, result.stderr
    assert len(list((root / "merged").rglob("*.ckpt"))) == 4
    for first, truth in truths.items():
        out = loaded(root / "merged" / f"rank_{first}" / f"network_rank_{first}-1_7_dp_merged.ckpt")
        assert set(out) == set(truth) | {"state_step", "learning_rate_group_0"}
        for name, value in truth.items():
            assert out[name].dtype == np.float32 and out[name].tobytes() == value.tobytes(), name
        assert out["state_step"] == 7
    peer = root / "merged" / "rank_2" / "network_rank_2-1_7_dp_merged.ckpt"
    assert peer.read_bytes() == (root / "merged" / "rank_0" / "network_rank_0-1_7_dp_merged.ckpt").read_bytes()
    # each file's manifest holds the CRC-32 of every tensor, taken while writing
    integrity = check(root / "merged")
    assert (integrity.files, integrity.unchecked) == (4, 0) and integrity.checked == 4 * (3 * len(PARAMS) + 2)


def test_rank_section_safetensors_and_no_optimizer(tmp_path):
    truth = write_group(tmp_path, [1, 3], seed=5, fmt="safetensors")
    combine_dp_zero(tmp_path / "opt_shard_info", tmp_path / "output", tmp_path / "merged", src_format="safetensors",
                    dst_format="safetensors", rank_section=(1, 2), no_save_optim=True, quiet=True)
    [merged] = (tmp_path / "merged").rglob("*.safetensors")
    out = loaded(merged, "safetensors")
    assert set(out) == set(PARAMS)
    assert all(out[name].tobytes() == truth[name].tobytes() for name in PARAMS)
    combine_dp_zero(tmp_path / "opt_shard_info", tmp_path / "output", tmp_path / "none", rank_section=(0, 1),
                    quiet=True)
    assert not any((tmp_path / "none").iterdir())


def test_missing_rank_and_misfit_shard_info_are_refused(sharded):
    root, _ = sharded
    before = tree_digest(root / "output")
    (root / "output" / "rank_3").rename(root / "rank_3_moved")
    result = cli("combine-dp-zero", "--strategy-dir", root / "opt_shard_info", "--checkpoint-dir", root / "output",
                 "--output-dir", root / "merged")
    assert result.returncode == 2
    assert result.stderr == f"error: {root / 'output' / 'rank_3'}: missing rank directory\n"
    (root / "rank_3_moved").rename(root / "output" / "rank_3")
    info_path = root / "opt_shard_info" / "rank_1" / "dist_opt_shard_info_rank_1-0_0.json"
    info = json.loads(info_path.read_text())
    info["buffer_info"]["0"]["buckets"]["0"][0] += 256
    info_path.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"rank_1-1_7.ckpt: buffer_0_bucket_0: shape \[\d+\] float32, the shard "
                                              r"info implies"):
        combine_dp_zero(root / "opt_shard_info", root / "output", root / "merged", quiet=True)
    assert not (root / "merged").exists()
    info["param_info"]["x"] = {"range_map": [0, 0, 0, 10], "shape": [3, 3], "dtype": "float32"}
    info_path.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="x: range 0..10 does not fit shape"):
        combine_dp_zero(root / "opt_shard_info", root / "output", root / "merged", quiet=True)
    assert not (root / "merged").exists() and tree_digest(root / "output") == before
