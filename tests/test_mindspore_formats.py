"""MindSpore .ckpt and safetensors files against real MindSpore: our writers produce its bytes,
our readers agree with its loader bit for bit, and damaged files are refused in one line."""

import weakref

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from ckpt_hooks.errors import CheckpointError  # noqa: E402
from ckpt_hooks.formats import mindspore_ckpt, ms_safetensors  # noqa: E402
from ckpt_hooks.formats.mindspore_ckpt import BF16, CkptFile  # noqa: E402
from ckpt_hooks.formats.ms_safetensors import SafetensorsFile  # noqa: E402


def _arrays():
    rng = np.random.default_rng(0)
    out = {"fp32": rng.standard_normal((3, 4)).astype(np.float32),
           "fp16": rng.standard_normal((5,)).astype(np.float16),
           "bf16": (rng.standard_normal((4, 2)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(BF16),
           "fp64": rng.standard_normal((2,)),
           "int32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
           "int64_scalar": np.array(7, np.int64),
           "bool": np.array([True, False, True])}
    for dtype in (np.int8, np.uint8, np.int16, np.uint16, np.uint32, np.uint64):
        out[np.dtype(dtype).name] = np.arange(4, dtype=dtype)
    return out


def _parameters(arrays):
    """The same content as MindSpore Parameters (bf16 cast by MindSpore from float32, exactly:
    the bits hold no NaN, which a cast would make canonical)."""
    params = {}
    for name, array in arrays.items():
        tensor = ms.Tensor(_bf16_to_float32(array), ms.bfloat16) if array.dtype == BF16 else ms.Tensor(array)
        params[name] = ms.Parameter(tensor, name=name)
    return params


def _bf16_to_float32(bits):
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _assert_bitwise(ours, theirs):
    """Our array equals MindSpore's Parameter (or array) bit for bit, shape and dtype included."""
    theirs = theirs.asnumpy() if hasattr(theirs, "asnumpy") else theirs
    assert ours.shape == theirs.shape
    if ours.dtype == BF16:
        assert theirs.dtype.name == "bfloat16"
    else:
        assert ours.dtype == theirs.dtype
    assert ours.tobytes() == theirs.tobytes()


@pytest.mark.parametrize("crc", [False, True])
def test_writer_is_byte_identical_and_reader_matches_load_checkpoint(tmp_path, crc):
    arrays = _arrays()
    params = _parameters(arrays)
    theirs, ours = tmp_path / "ms.ckpt", tmp_path / "ours.ckpt"
    ms.save_checkpoint({**params, "note": "épochs"}, str(theirs), crc_check=crc)
    mindspore_ckpt.save(ours, {**arrays, "note": "épochs"}, crc=crc)
    assert ours.read_bytes() == theirs.read_bytes()

    f = CkptFile(theirs, check_crc=True)
    assert f.has_crc == crc and f.names == list(arrays) and f.strings == {"note": "épochs"}
    loaded = ms.load_checkpoint(str(theirs), crc_check=crc)
    assert loaded["note"] == "épochs"
    for name in arrays:
        _assert_bitwise(f.read(name), loaded[name])
    rows = f.read("fp32", slice(1, 3))
    assert not rows.flags.writeable and rows.tobytes() == arrays["fp32"][1:3].tobytes()  # a view of the map


def test_tiny_network(tmp_path):
    """A real network's parameters: read, rewritten and converted to safetensors, all as MindSpore does."""
    ms.set_seed(1)
    net = ms.nn.SequentialCell(ms.nn.Embedding(16, 8), ms.nn.Dense(8, 8), ms.nn.LayerNorm((8,)), ms.nn.Dense(8, 3))
    saved = tmp_path / "net.ckpt"
    ms.save_checkpoint(net, str(saved))
    f = CkptFile(saved)
    assert f.names == [p.name for p in net.get_parameters()]
    for p in net.get_parameters():
        _assert_bitwise(f.read(p.name), p)

    rewritten = tmp_path / "ours.ckpt"
    mindspore_ckpt.save(rewritten, ((name, f.read(name)) for name in f.names))
    assert rewritten.read_bytes() == saved.read_bytes()

    ms.save_checkpoint(net, str(tmp_path / "net.safetensors"), format="safetensors")
    ms_safetensors.save(tmp_path / "ours.safetensors", {name: f.read(name) for name in f.names})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "net.safetensors").read_bytes()


def test_split_records(tmp_path, monkeypatch):
    """A tensor over the record size (512 MiB; 64 bytes here) spans several records with one tag:
    MindSpore and we read it back whole, and a row range reads only the records it needs."""
    monkeypatch.setattr(mindspore_ckpt, "SLICE_BYTES", 64)
    big = np.arange(70, dtype=np.float32).reshape(7, 10)  # 280 bytes: 5 records, cut mid-row
    path = tmp_path / "split.ckpt"
    mindspore_ckpt.save(path, {"small": np.ones(3, np.float16), "big": big, "after": np.array(2, np.int32)}, crc=True)
    f = CkptFile(path, check_crc=True)
    assert len(f.tensors["big"].pieces) == 5
    loaded = ms.load_checkpoint(str(path), crc_check=True)
    assert set(loaded) == {"small", "big", "after"}
    for name in loaded:
        _assert_bitwise(f.read(name), loaded[name])
    for rows in (slice(0, 1), slice(1, 6), slice(6, 7), slice(3, 3)):
        np.testing.assert_array_equal(f.read("big", rows), big[rows])


def test_safetensors_both_ways(tmp_path):
    arrays = _arrays()
    arrays["transposed"] = np.arange(6, dtype=np.float32).reshape(2, 3).T  # a non-contiguous view
    theirs, ours = tmp_path / "ms.safetensors", tmp_path / "ours.safetensors"
    ms.save_checkpoint(_parameters(arrays), str(theirs), format="safetensors")
    ms_safetensors.save(ours, arrays)
    assert ours.read_bytes() == theirs.read_bytes()

    loaded = ms.load_checkpoint(str(ours), format="safetensors")
    f = SafetensorsFile(theirs)
    assert f.metadata == {"format": "ms"} and f.names == sorted(arrays)
    for name, array in arrays.items():
        _assert_bitwise(f.read(name), loaded[name])
        assert f.read(name).tobytes() == np.ascontiguousarray(array).tobytes()

    # MindSpore's crc_check=True adds crc_num (it fails on bf16 tensors, so none here).
    crc_file = tmp_path / "crc.safetensors"
    ms.save_checkpoint({"fp32": _parameters(arrays)["fp32"]}, str(crc_file), format="safetensors", crc_check=True)
    assert "crc_num" in SafetensorsFile(crc_file, check_crc=True).metadata


@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_arrays_are_produced_one_at_a_time_when_written(tmp_path, suffix):
    """PendingArrays (what a conversion writes) are made one at a time, each released before the
    next is made, and the file is byte-identical to the one written from the arrays themselves."""
    arrays = _arrays()
    made = []

    def pending(name):
        def produce():
            assert all(ref() is None for ref in made), "an earlier array is still held"
            array = arrays[name].copy()
            made.append(weakref.ref(array))
            return array
        return mindspore_ckpt.PendingArray(arrays[name].shape, arrays[name].dtype, produce)

    writer = ms_safetensors if suffix == "safetensors" else mindspore_ckpt
    streamed, whole = tmp_path / f"streamed.{suffix}", tmp_path / f"whole.{suffix}"
    writer.save(streamed, {name: pending(name) for name in arrays})
    writer.save(whole, arrays)
    assert len(made) == len(arrays) and streamed.read_bytes() == whole.read_bytes()


def _damaged(tmp_path, damage):
    """A MindSpore .ckpt (with CRC for 'flipped'), damaged."""
    path = tmp_path / "bad.ckpt"
    ms.save_checkpoint(_parameters({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}), str(path),
                       crc_check=damage == "flipped")
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[-10:]
    elif damage == "flipped":
        data[40] ^= 0x01
    elif damage == "bad dtype":
        data = data.replace(b"Float32", b"Float31")
    elif damage == "size":
        data = data.replace(b"\x08\x03\x08\x04", b"\x08\x03\x08\x03")  # dims (3, 4) -> (3, 3)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damage, says", [("truncated", "truncated"), ("flipped", "CRC mismatch"),
                                          ("bad dtype", "unknown or unsupported dtype 'Float31'"),
                                          ("size", "48 bytes of data for shape [3, 3] Float32")])
def test_damaged_ckpt_is_refused_and_nothing_is_written(tmp_path, damage, says):
    bad = _damaged(tmp_path, damage)
    if damage != "size":  # MindSpore loads a size mismatch without a word, overrunning its heap
        with pytest.raises(ValueError):  # it refuses the others too
            ms.load_checkpoint(str(bad), crc_check=True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def conversion():  # opens its source only once the output is being written
        yield "first", np.zeros(2, np.float32)
        source = CkptFile(bad, check_crc=True)
        yield from ((name, source.read(name)) for name in source.names)

    with pytest.raises(CheckpointError) as error:
        mindspore_ckpt.save(out_dir / "out.ckpt", conversion())
    assert str(error.value).startswith(f"{bad}: ") and says in str(error.value)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("value, says", [(np.zeros((0, 3), np.float32), "empty tensor"),
                                         (np.zeros(2, np.complex64), "no MindSpore equivalent")])
def test_writer_refuses_what_ckpt_cannot_hold(tmp_path, value, says):
    for save, name in ((mindspore_ckpt.save, "out.ckpt"), (ms_safetensors.save, "out.safetensors")):
        if save is ms_safetensors.save and value.size == 0:
            continue  # safetensors holds empty tensors
        with pytest.raises(CheckpointError, match=says):
            save(tmp_path / name, {"ok": np.ones(2, np.float32), "bad": value})
    assert list(tmp_path.iterdir()) == []


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "ms.safetensors"
    ms.save_checkpoint(_parameters({"w": np.ones((4, 4), np.float32)}), str(path), format="safetensors")
    data = path.read_bytes()
    for cut in (data[:-4], data[:20]):
        path.write_bytes(cut)
        with pytest.raises(CheckpointError, match=f"^{path}: .*truncated"):
            SafetensorsFile(path)
