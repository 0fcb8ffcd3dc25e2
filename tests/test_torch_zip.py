"""The torch.save writer (``torch_save.save`` on ``torch_zip``'s layout) and the scattered reads
that fill its tensors: what torch's own reader and Python's zipfile make of the files, ZIP64 past
4 GiB, and reads landing exactly where they belong."""

import errno
import os
import random
import struct
import zipfile

import pytest
import torch

from ckpt_hooks.formats import torch_pickle, torch_save, torch_zip
from ckpt_hooks.formats.torch_pickle import TensorView, TorchFile
from ckpt_hooks.formats.torch_save import PendingTensor


def test_files_read_back_by_torch_with_real_crcs(tmp_path):
    path = tmp_path / "f.pt"
    obj = {"args": {"lr": 1e-3}, "a": torch.arange(10.0), "b": torch.ones(3, dtype=torch.bfloat16),
           "c": PendingTensor((40, 50), torch.int64, fill=lambda out: out.copy_(torch.arange(2000).view(40, 50))),
           "d": PendingTensor((0,), torch.float32, lambda: torch.empty(0)),
           "e": PendingTensor((7,), torch.float16, lambda: torch.arange(14.0)[::2].half())}
    crcs = torch_save.save(obj, path, threads=3)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None   # every record's CRC-32 is right
        assert {i.filename: i.CRC for i in z.infolist() if "/data/" in i.filename} == \
            {f"archive/{k}": v for k, v in crcs.items()}
    for mmap in (False, True):   # torch reads the data at the offsets its local headers give
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert loaded["args"] == obj["args"] and torch.equal(loaded["a"], obj["a"])
        assert torch.equal(loaded["c"], torch.arange(2000).view(40, 50)) and loaded["d"].numel() == 0
        assert torch.equal(loaded["e"], torch.arange(14.0)[::2].half())
    assert TorchFile(path).check_crcs() == (4, 1)   # the empty record has nothing to check
    again = tmp_path / "g.pt"
    torch_save.save(obj, again)
    assert again.read_bytes() == path.read_bytes()   # the same content, the same bytes


def test_a_filesystem_that_cannot_map_gets_the_same_bytes(tmp_path, monkeypatch):
    tensors = {"w": torch.arange(3000.0).view(30, 100)}
    torch_save.save({"w": PendingTensor((30, 100), torch.float32, fill=lambda out: out.copy_(tensors["w"]))},
                      tmp_path / "mapped.pt")

    def unmappable(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")
    monkeypatch.setattr(torch_save.mmap, "mmap", unmappable)
    torch_save.save({"w": PendingTensor((30, 100), torch.float32, fill=lambda out: out.copy_(tensors["w"]))},
                      tmp_path / "written.pt")
    assert (tmp_path / "written.pt").read_bytes() == (tmp_path / "mapped.pt").read_bytes()


def test_data_is_aligned_and_zip64_past_4_gib(tmp_path):
    """Offsets and sizes past 32 bits, laid out and written (a sparse file: headers only)."""
    sizes = [("data.pkl", 100), ("data/0", 5 << 30), ("data/1", 3), ("version", 2)]
    records, directory = torch_zip.layout(sizes)
    assert all(r.data_offset % torch_zip.ALIGNMENT == 0 for r in records)
    path = tmp_path / "big.pt"
    with open(path, "wb") as f:
        for r in records:
            f.seek(r.header_offset)
            f.write(torch_zip.local_header(r))
        f.seek(records[-1].data_offset)
        f.write(b"3\n")   # torch's reader wants the format version
        f.seek(directory)
        f.write(torch_zip.central_directory(records, directory))
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    assert [(i.filename, i.file_size, i.header_offset) for i in infos] == \
        [("archive/" + r.name, r.size, r.header_offset) for r in records]
    with open(path, "rb") as f:   # each local header leads to the data, the way readers find it
        for r in records:
            f.seek(r.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            assert r.header_offset + 30 + name_len + extra_len == r.data_offset
    reader = torch._C.PyTorchFileReader(str(path))
    assert reader.get_record_offset("data/1") == records[2].data_offset
    assert os.path.getsize(path) > 5 << 30


@pytest.mark.parametrize("short_run", [0, 1 << 30], ids=["scattered", "covered"])
def test_reads_land_exactly_in_strided_places(tmp_path, short_run, monkeypatch):
    """Any box of a stored tensor into a strided window of a larger tensor: those elements, there,
    and nothing around them touched; straight into place (preadv) or through a covering read."""
    monkeypatch.setattr(torch_pickle, "SHORT_READ", short_run)
    monkeypatch.setattr(torch_pickle, "_SHORT_PLACE", short_run)
    stored = torch.arange(6 * 8 * 10, dtype=torch.float32).view(6, 8, 10)
    torch_save.save({"x": stored}, tmp_path / "s.pt")
    source = TorchFile(tmp_path / "s.pt")
    view = TensorView(source, source.obj["x"], (6, 8, 10))
    rng = random.Random(0)
    for _ in range(200):
        box = []
        for n in stored.shape:
            start = rng.randrange(n)
            box.append(slice(start, rng.randrange(start + 1, n + 1)))
        want = stored[tuple(box)]
        margins = [rng.randrange(3) for _ in want.shape]
        around = torch.full([n + m for n, m in zip(want.shape, margins)], -1.0)
        at = [rng.randrange(m + 1) for m in margins]
        window = tuple(slice(a, a + n) for a, n in zip(at, want.shape))
        for exact in (False, True):
            around.fill_(-1.0)
            view.read_into(tuple(box), around[window], exact)
            assert torch.equal(around[window], want)
            around[window] = -1.0
            assert (around == -1.0).all()
