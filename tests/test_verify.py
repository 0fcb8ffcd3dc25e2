"""``ckpt-hooks verify A B``: the equivalence certificate users run on their own checkpoints."""

import json
import shutil

import torch

from ckpt_hooks import convert
from ckpt_hooks.algebra.target import Target
from ckpt_hooks.converters.hf.to_hf import megatron_to_hf
from ckpt_hooks.formats.torch_dist import DistCheckpoint
from ckpt_hooks.formats.torch_pickle import TorchFile
from ckpt_hooks.verify import verify
from tests.util import cli


def test_the_same_run_in_both_formats_is_equal(sources):
    """A legacy save and a torch_dist save of one run: every weight, fp32 param and Adam moment,
    and the run state, equal — two independent readers agree."""
    certificate = verify(sources["cont_tp2pp2"].dir, sources["dist_tp2pp2"].dir)
    assert certificate.equal, certificate
    assert {t.name.split(":")[0] for t in certificate.tensors} >= {"param", "exp_avg", "exp_avg_sq"}
    assert set(certificate.run_state) == {"iteration", "param_groups", "scheduler",
                                          "num_floating_point_operations_so_far"}
    assert not certificate.only_first and not certificate.only_second


def test_a_conversion_is_certified_and_a_one_ulp_change_is_found(sources, tmp_path):
    source = sources["cont_tp2pp2"]
    out = tmp_path / "tp1pp1"
    convert(source.dir, out, Target(tp=1, pp=1), quiet=True)
    result = cli("verify", source.dir, out)
    assert result.returncode == 0 and "EQUAL: " in result.stdout, result.stdout + result.stderr
    # One element of one layer's fc1 moved by one ulp inside the converted file, in place: the
    # same size, so the manifest (sizes) cannot see it; the certificate must.
    path = next(out.glob("iter_*/mp_rank_00/model_optim_rng.pt"))
    torch_file = TorchFile(path)
    lazy = torch_file.obj["model"]["decoder.layers.2.mlp.linear_fc1.weight"]
    at = torch_file._data_offset(lazy.storage) + (lazy.offset + 5 * lazy.stride[0] + 7 * lazy.stride[1]) * 4
    with open(path, "r+b") as f:
        f.seek(at)
        value = torch.frombuffer(bytearray(f.read(4)), dtype=torch.float32)
        f.seek(at)
        f.write(torch.nextafter(value, torch.tensor([float("inf")])).numpy().tobytes())
    result = cli("verify", source.dir, out, "--weights-only", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    wrong = [t for t in report["tensors"] if not t["equal"]]
    assert [t["name"] for t in wrong] == ["decoder.layers.2.mlp.linear_fc1.weight"]
    assert wrong[0]["differing"] == 1 and wrong[0]["first"] == [0, 5, 7] and 0 < wrong[0]["max_abs"] < 1e-6
    assert report["equal"] is False and "param_groups" not in report["run_state"]
    # Alone, the converted checkpoint's recorded CRC-32s name the record that changed.
    alone = cli("verify", out, "--quiet")
    assert alone.returncode == 2 and alone.stderr.count("\n") == 1, alone.stderr
    assert "mp_rank_00/model_optim_rng.pt: record data/" in alone.stderr and "CRC-32" in alone.stderr


def test_one_checkpoint_alone_is_checked_against_its_crcs(sources, tmp_path):
    """Megatron-LM's own files (torch.save's zip CRCs), torch_dist records, and a conversion's
    output (the CRC-32s its manifest records while writing): all checked; a flipped bit inside a
    torch_dist record is found."""
    for name in ("cont_tp2pp2", "dist_tp2pp2"):
        result = cli("verify", sources[name].dir)
        assert result.returncode == 0 and "match their CRC-32" in result.stdout, result.stderr
        assert "none recorded" not in result.stdout
    copy = tmp_path / "dist"
    shutil.copytree(sources["dist_tp2pp2"].dir, copy)
    flipped = flip_a_bit(copy, "decoder.layers.mlp.linear_fc2.weight")
    result = cli("verify", copy, "--quiet")
    assert result.returncode == 2 and f"{flipped}: record" in result.stderr, result.stderr


def test_a_torch_dist_conversion_lists_each_records_crc(sources, tmp_path):
    """The torch_dist output's manifest records every .distcp record's CRC-32 (keyed by the
    archive's offset), taken while writing; verify checks each record against it."""
    out = tmp_path / "tp1"
    convert(sources["dist_tp2pp2"].dir, out, Target(tp=1, pp=2), quiet=True)
    iter_dir = next(out.glob("iter_*"))
    listed = json.loads((iter_dir / "ckpt_hooks_manifest.json").read_text())["files"]
    distcp = sorted(name for name in listed if name.endswith(".distcp"))
    assert distcp and all(listed[name]["crc32"] for name in distcp)
    assert not any(name.startswith(".__") for name in listed)   # no marker of the staged output
    flipped = flip_a_bit(out, "decoder.layers.mlp.linear_fc2.weight")
    result = cli("verify", out, "--quiet")
    assert result.returncode == 2 and f"{flipped}: record" in result.stderr, result.stderr
    assert "the manifest says" in result.stderr, result.stderr


def flip_a_bit(directory, key: str) -> str:
    """Flip one bit inside the bytes of ``key``'s first chunk in a torch_dist checkpoint; its file."""
    checkpoint = DistCheckpoint(next(directory.glob("iter_*")))
    chunk = checkpoint.tensors[key].chunks[0]
    torch_file, lazy = checkpoint.chunk_tensor(key, chunk)
    path = checkpoint.iter_dir / chunk.record.relative_path
    blob = bytearray(path.read_bytes())
    blob[torch_file._data_offset(lazy.storage) + 100] ^= 1
    path.write_bytes(bytes(blob))
    return chunk.record.relative_path


def test_another_iteration_is_not_equal(sources):
    certificate = verify(sources["cont_tp2pp2"].dir, sources["cont_tp2pp2_5steps"].dir)
    assert not certificate.equal
    assert certificate.run_state["iteration"] == (False, 3, 5)
    assert all(not t.equal for t in certificate.tensors if t.name.startswith("exp_avg:"))
    assert "NOT EQUAL" in str(certificate)


def test_another_model_is_refused(sources):
    result = cli("verify", sources["cont_tp2pp2"].dir, sources["tp2pp2"].dir, "--quiet")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "a checkpoint of another model" in result.stderr and "true_vocab_size" in result.stderr


def test_a_hugging_face_export_is_certified_against_its_source(sources, tmp_path):
    """megatron-to-hf's output, read through the HF name table, equals the Megatron weights; a
    flipped bit in the safetensors file is found and named by its Megatron tensor."""
    source = sources["dist_tp2pp2"].dir
    megatron_to_hf(source, tmp_path / "hf", quiet=True)
    result = cli("verify", source, tmp_path / "hf")
    assert result.returncode == 0 and "EQUAL: " in result.stdout and "run state not compared" in result.stdout, \
        result.stdout + result.stderr
    path = next((tmp_path / "hf").glob("*.safetensors"))
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x10   # inside the last tensor's bytes
    path.write_bytes(bytes(blob))
    certificate = verify(source, tmp_path / "hf")
    wrong = [t for t in certificate.tensors if not t.equal]
    assert not certificate.equal and len(wrong) == 1 and wrong[0].differing == 1, str(certificate)
