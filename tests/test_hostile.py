"""Hostile input (#15): pickles that would import or call, names and links that lead out of the
checkpoint, zip and pickle bombs, petabyte shapes. The CLI refuses each with one line naming the
file, writes nothing and leaves the source as it was, and nothing of the payload runs or is
imported; the library readers raise CheckpointError. The CLI runs in this process (main(), as
the console script calls it): a payload module on sys.path shows it was never imported."""

import argparse
import copyreg
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ckpt_hooks.cli import main
from ckpt_hooks.converters.hf.files import open_directory
from ckpt_hooks.errors import CheckpointError
from ckpt_hooks.formats import mindspore_ckpt, torch_pickle
from ckpt_hooks.formats.mindspore_ckpt import CkptFile
from ckpt_hooks.formats.safetensors import SafetensorsFile
from ckpt_hooks.formats.torch_dist import DistCheckpoint
from ckpt_hooks.formats.torch_pickle import TorchFile
from ckpt_hooks.megatron.checkpoint import read_source
from ckpt_hooks.mindspore.transform import open_source
from tests.util import tree_digest

MODULE = "hostile_payload"
# Imported, constructed, called or given state, it leaves a line in the marker file.
PAYLOAD = """import os
def _mark(why):
    with open(os.environ["HOSTILE_MARKER"], "a") as f:
        f.write(why + "\\n")
_mark("imported " + __name__)
class Boom:
    def __new__(cls, *args, **kwargs):
        _mark("new")
        return object.__new__(cls)
    def __init__(self, *args, **kwargs):
        _mark("init")
    def __setstate__(self, state):
        _mark("setstate")
"""

_MOD = MODULE.encode()
_GLOBAL = b"c" + _MOD + b"\nBoom\n"
_STACK_GLOBAL = b"\x8c" + bytes([len(_MOD)]) + _MOD + b"\x8c\x04Boom\x93"
# Each pushes one object; run, each would import the payload and call into it. EXT codes are
# registered for the test (copyreg), so that they name the payload rather than nothing.
OPCODES = {
    "GLOBAL": _GLOBAL,
    "STACK_GLOBAL": _STACK_GLOBAL,
    "REDUCE": _STACK_GLOBAL + b")R",
    "INST": b"(i" + _MOD + b"\nBoom\n",
    "OBJ": b"(" + _GLOBAL + b"o",
    "NEWOBJ": _GLOBAL + b")\x81",
    "NEWOBJ_EX": _GLOBAL + b")}\x92",
    "BUILD": _GLOBAL + b")\x81}b",
    "EXT1": b"\x82\x01",
    "EXT2": b"\x83\x01\x00",
    "EXT4": b"\x84\x01\x00\x00\x00",
}
ITER = "iter_0000003"
RANK_FILE = f"{ITER}/mp_rank_01_001/model_optim_rng.pt"
PLACEHOLDER = "hostile-placeholder-5d1c"


@pytest.fixture
def payload(tmp_path, monkeypatch):
    """The payload module on sys.path (also as megatron.hostile_payload: megatron is a namespace
    package), EXT code 1 naming it; yields the marker file, checked to be absent afterwards."""
    where = tmp_path / "payload"
    (where / "megatron").mkdir(parents=True)
    (where / f"{MODULE}.py").write_text(PAYLOAD)
    (where / "megatron" / f"{MODULE}.py").write_text(PAYLOAD)
    marker = tmp_path / "marker"
    monkeypatch.setenv("HOSTILE_MARKER", str(marker))
    monkeypatch.syspath_prepend(str(where))
    copyreg.add_extension(MODULE, "Boom", 1)
    yield marker
    copyreg.remove_extension(MODULE, "Boom", 1)
    assert not marker.exists(), marker.read_text()
    assert MODULE not in sys.modules and f"megatron.{MODULE}" not in sys.modules


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE)}
    try:
        code = main([str(a) for a in argv])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return code, capsys.readouterr().err.strip().splitlines()


def refused(capsys, ckpt: Path, *, names, says: str, command=("convert", "--convert-param-only")) -> None:
    """``ckpt-hooks convert`` (or ``command``) fails with one line naming ``names``, writes nothing
    and leaves ``ckpt`` as it was."""
    before, out = tree_digest(ckpt), ckpt.parent / "out"
    argv = [*command, "--load-dir", ckpt, "--save-dir", out, "--quiet"]
    if command[0] == "convert":
        argv += ["--target-tensor-parallel-size", 1]
    code, lines = run_cli(capsys, *argv)
    assert code != 0 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {names}") and says in lines[0], lines[0]
    assert not out.exists() and not any(".partial" in p.name for p in ckpt.parent.iterdir())
    assert tree_digest(ckpt) == before


def copy(sources, name, tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(sources[name].dir, target, symlinks=True)
    return target


# ---- crafting ------------------------------------------------------------------------------

def records(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def write_zip(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def with_pickle(path, data: bytes) -> None:
    """The torch file ``path`` with its data.pkl replaced by ``data``."""
    members = records(path)
    members[next(n for n in members if n.endswith("/data.pkl"))] = data
    write_zip(path, members)


def spliced(path, fragment: bytes, into=lambda state: vars(state["args"])) -> None:
    """The torch file ``path`` with the opcodes ``fragment`` as the value of a new key of a dict
    inside it (its args by default): the rest stays a valid checkpoint."""
    state = torch.load(path, weights_only=False)
    into(state)["hostile"] = PLACEHOLDER
    torch.save(state, path)
    members = records(path)
    name = next(n for n in members if n.endswith("/data.pkl"))
    text = PLACEHOLDER.encode()
    members[name] = members[name].replace(b"X" + struct.pack("<I", len(text)) + text, fragment)
    write_zip(path, members)


def torch_zip(path, data: bytes) -> Path:
    write_zip(path, {"archive/data.pkl": data, "archive/byteorder": b"little"})
    return path


def lazy_tensor(numel: int, size: tuple, storage_key: str = "0") -> bytes:
    """Opcodes of a tensor torch.save would write: a FloatStorage of ``numel`` elements viewed as ``size``."""
    ints = lambda values: b"(" + b"".join(b"I%d\n" % v for v in values) + b"t"   # noqa: E731
    strides = [int(np.prod(size[i + 1:])) for i in range(len(size))]
    pid = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX" + struct.pack("<I", len(storage_key)) + \
        storage_key.encode() + b"X\x03\x00\x00\x00cpu" + b"I%d\n" % numel + b"tQ"
    return b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"I0\n" + ints(size) + ints(strides) + \
        b"I00\nccollections\nOrderedDict\n)Rt" + b"R"


def _put(i: int) -> bytes:   # memo indices far above those of a pickle it is spliced into
    return b"r" + struct.pack("<I", 1_000_000 + i)


def _get(i: int) -> bytes:
    return b"j" + struct.pack("<I", 1_000_000 + i)


def doubling(levels: int) -> bytes:
    """A list of two references to a list of two references to ... (a "billion laughs")."""
    out = b"]" + _put(0) + b"0"
    for i in range(levels):
        out += b"(" + _get(i) + _get(i) + b"l" + _put(i + 1) + b"0"
    return out + _get(levels)


SELF = b"]" + _put(0) + _get(0) + b"a"   # a list appended to itself


# ---- 1. pickles ----------------------------------------------------------------------------

@pytest.mark.parametrize("opcode", OPCODES)
@pytest.mark.parametrize("place", ["model data.pkl", "optimizer data.pkl", "nested in args", "nested in model",
                                   ".metadata", "common.pt"])
def test_pickle_that_would_import_or_call_is_refused_not_run(sources, tmp_path, capsys, payload, opcode, place):
    fragment = OPCODES[opcode]
    dist = place in (".metadata", "common.pt")
    ckpt = copy(sources, "dist_tp2pp2" if dist else "tp2pp2", tmp_path)
    victim = {"optimizer data.pkl": ckpt / RANK_FILE.replace("model_optim_rng", "distrib_optim"),
              ".metadata": ckpt / ITER / ".metadata", "common.pt": ckpt / ITER / "common.pt"}.get(place, ckpt / RANK_FILE)
    if place == ".metadata":
        victim.write_bytes(b"\x80\x04" + fragment + b".")
    elif place == "nested in args":
        spliced(victim, fragment)
    elif place == "nested in model":
        spliced(victim, fragment, into=lambda state: state["model"])
    else:
        with_pickle(victim, b"\x80\x02" + fragment + b".")
    command = ("convert",) if place == "optimizer data.pkl" or dist else ("convert", "--convert-param-only")
    refused(capsys, ckpt, names=victim, says=f"the pickle needs '{MODULE}.Boom', which is not on the allowlist",
            command=command)
    with pytest.raises(CheckpointError, match="not on the allowlist"):
        DistCheckpoint(ckpt / ITER) if dist else TorchFile(victim)


def test_a_module_in_the_working_directory_is_not_imported(sources, tmp_path):
    """``python -m`` puts the working directory first on sys.path, and megatron is a namespace
    package: a checkpoint read from inside itself could bring its own megatron.* module, which a
    pickle naming it (as an enum of saved args) imported before."""
    ckpt = copy(sources, "tp2pp2", tmp_path)
    (ckpt / "megatron").mkdir()
    (ckpt / "megatron" / f"{MODULE}.py").write_text(PAYLOAD)
    spliced(ckpt / RANK_FILE, b"cmegatron." + _MOD + b"\nBoom\n")
    env = {**os.environ, "HOSTILE_MARKER": str(tmp_path / "marker"), "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([sys.executable, "-m", "ckpt_hooks.cli", "inspect", "."], cwd=ckpt, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {RANK_FILE}: refused to load: the pickle needs 'megatron.{MODULE}.Boom', which is not on the allowlist"]
    assert not (tmp_path / "marker").exists()


# What a pickle could do with the allowlisted objects themselves: set attributes of a class or a
# function (BUILD with slot state), or call a helper that rebinds a module's names.
ALTERING = {
    "BUILD on argparse.Namespace": b"cargparse\nNamespace\n(N}V__repr__\ncbuiltins\nset\nstb.",
    "BUILD on signal.Signals": b"csignal\nSignals\n(N}V_missing_\ncbuiltins\nset\nstb.",
    "BUILD on an enum member": b"csignal\nSignals\n(I15\ntR(N}V_value_\nI0\nstb.",
    "BUILD on _rebuild_tensor_v2": b"ctorch._utils\n_rebuild_tensor_v2\n(N}V__defaults__\n(I1\ntstb.",
    "REDUCE numpy.dtypes._add_dtype_helper": b"cnumpy.dtypes\n_add_dtype_helper\n(cargparse\nNamespace\n"
                                             b"VFloat32DType\ntR.",
    "enum of an unlisted megatron module": b"cmegatron." + _MOD + b"\nBoom\n.",
}


@pytest.mark.parametrize("case", ALTERING)
def test_allowlisted_objects_cannot_be_altered(tmp_path, payload, case):
    import numpy.dtypes

    watched = lambda: (dict(vars(argparse.Namespace)), dict(vars(signal.Signals)), signal.SIGTERM.value,  # noqa: E731
                       torch_pickle._rebuild_tensor.__defaults__, numpy.dtypes.Float32DType)
    before = watched()
    path = torch_zip(tmp_path / "file.pt", ALTERING[case])
    with pytest.raises(CheckpointError, match=f"^{path}: refused to load: the pickle "):
        TorchFile(path)
    assert watched() == before


PROTOCOL = {   # data.pkl -> what the one-line error says
    "persistent id not a tuple": (b"\x80\x02X\x03\x00\x00\x00abcQ.", "unexpected persistent id 'abc'"),
    "persistent id with no dtype": (b"\x80\x02(X\x07\x00\x00\x00storageX\x01\x00\x00\x00aX\x01\x00\x00\x000"
                                    b"X\x03\x00\x00\x00cpuK\x01tQ.", "is not a storage"),
    "GET of an undefined memo": (b"\x80\x02h\x05.", "Memo value not found at index 5"),
    "deep nesting": (b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".", "nests containers more than 100 deep"),
    "list inside itself": (b"\x80\x02" + SELF + b".", "holds a list inside itself"),
    "billion laughs": (b"\x80\x04" + doubling(80) + b".", "expand to more than 10000000 items"),
    "BYTEARRAY8 of 2**40 bytes": (b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b".", "a bytearray of"),
    "storage of a petabyte": (b"\x80\x02" + lazy_tensor(1 << 48, (1 << 48,)) + b".",
                              "storage data/0 declares 281474976710656 elements"),
    "tensor beyond its storage": (b"\x80\x02" + lazy_tensor(4, (1 << 24, 1 << 24)) + b".",
                                  "a tensor of shape [16777216, 16777216] (strides [16777216, 1], offset 0) "
                                  "reaches beyond its storage of 4 elements"),
}


@pytest.mark.parametrize("case", PROTOCOL)
def test_pickle_protocol_edge_cases(tmp_path, case):
    data, says = PROTOCOL[case]
    path = torch_zip(tmp_path / "file.pt", data)
    started = time.monotonic()
    with pytest.raises(CheckpointError) as error:
        TorchFile(path)
    assert str(error.value).startswith(f"{path}: ") and says in str(error.value) and "\n" not in str(error.value)
    assert time.monotonic() - started < 10


def test_a_memo_index_of_billions_allocates_nothing(tmp_path):
    """The C unpickler grew its memo array to a PUT's index (16 GiB for 2**31); a dict does not."""
    path = torch_zip(tmp_path / "file.pt", b"\x80\x02}r\xff\xff\xff\x7f.")
    assert TorchFile(path).obj == {}


@pytest.mark.parametrize("case, says", [
    ("storage of a petabyte", "storage data/0 declares 281474976710656 elements"),
    ("tensor beyond its storage", "reaches beyond its storage of 4 elements"),
    ("billion laughs", "expand to more than 10000000 items"),
    ("list inside itself", "inside itself"),
])
def test_nested_bombs_in_a_valid_checkpoint(sources, tmp_path, capsys, case, says):
    ckpt = copy(sources, "tp2pp2", tmp_path)
    fragment = {"storage of a petabyte": lazy_tensor(1 << 48, (1 << 48,)),
                "tensor beyond its storage": lazy_tensor(4, (1 << 24, 1 << 24)),
                "billion laughs": doubling(80), "list inside itself": SELF}[case]
    spliced(ckpt / RANK_FILE, fragment, into=lambda state: state["model"])
    refused(capsys, ckpt, names=ckpt / RANK_FILE, says=says)


# ---- 2 and 4. names, trackers, zip bombs -------------------------------------------------------

def _renamed(prefix):
    def damage(path):
        members = records(path)
        write_zip(path, {prefix + n.split("/", 1)[1]: data for n, data in members.items()})
    return damage


def _declared_size(path):
    """data.pkl's central directory entry says 4 GiB."""
    data = bytearray(path.read_bytes())
    name = next(n for n in records(path) if n.endswith("/data.pkl")).encode()
    entry = data.rfind(b"PK\x01\x02", 0, data.rfind(name))
    data[entry + 24:entry + 28] = struct.pack("<I", 0xFFFFFFFE)
    path.write_bytes(bytes(data))


def _central_directory(path):
    """The end record says 65535 entries in a central directory of 4 GiB."""
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end + 8:end + 16] = struct.pack("<HHI", 0xFFFF, 0xFFFF, 0xFFFFFFFF)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case, damage, says", [
    ("member ../", _renamed("../../escape/"), "record name '../../escape/data.pkl' leaves the archive"),
    ("member absolute", _renamed("/tmp/escape/"), "record name '/tmp/escape/data.pkl' leaves the archive"),
    ("deflated members", lambda p: write_zip(p, records(p), zipfile.ZIP_DEFLATED), "is compressed"),
    ("declared size 4 GiB", _declared_size, "record data.pkl is cut short"),
])
def test_zip_names_and_bombs(sources, tmp_path, capsys, case, damage, says):
    ckpt = copy(sources, "tp2pp2", tmp_path)
    damage(ckpt / RANK_FILE)
    refused(capsys, ckpt, names=ckpt / RANK_FILE, says=says)


def test_an_end_record_declaring_65535_entries_of_4_gib_is_not_believed(sources, tmp_path):
    """zipfile lists the entries there are, and a record's bytes are read from its local header."""
    path = tmp_path / "model_optim_rng.pt"
    shutil.copy(sources["tp2pp2"].dir / RANK_FILE, path)
    _central_directory(path)
    started = time.monotonic()
    assert list(TorchFile(path).obj) == list(torch.load(sources["tp2pp2"].dir / RANK_FILE, weights_only=False))
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("text", [b"../../../etc", b"/etc/passwd", b"9" * 5000, "²".encode(), b"1" * 30,
                                  b"\xff\xfe\x00garbage", b"3\n" + b"\0" * (1 << 20)])
def test_tracker_that_is_not_an_iteration(sources, tmp_path, capsys, text):
    ckpt = copy(sources, "tp2pp2", tmp_path)
    (ckpt / "latest_checkpointed_iteration.txt").write_bytes(text)
    refused(capsys, ckpt, names=ckpt / "latest_checkpointed_iteration.txt",
            says="expected an iteration number or 'release', found")


def hf_directory(root: Path, shard: str = "model-00001-of-00001.safetensors") -> Path:
    from safetensors.numpy import save_file

    root.mkdir()
    save_file({"model.norm.weight": np.ones(4, np.float32)}, str(root / "model-00001-of-00001.safetensors"))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": shard}}))
    return root


@pytest.mark.parametrize("shard", ["../model-00001-of-00001.safetensors", "/etc/passwd", "sub/../../x", "", ["x"]])
def test_index_naming_a_file_outside_the_directory(tmp_path, shard):
    root = hf_directory(tmp_path / "hf", shard)
    shutil.copy(root / "model-00001-of-00001.safetensors", tmp_path)
    with pytest.raises(CheckpointError) as error:
        open_directory(root)
    assert str(error.value).startswith(f"{root / 'model.safetensors.index.json'}: ")


# ---- 3. symlinks ------------------------------------------------------------------------------

def _link_out(ckpt: Path, relative: str, outside: Path) -> Path:
    """``relative`` moved outside the checkpoint and linked back."""
    link, target = ckpt / relative, outside / relative.replace("/", "_")
    shutil.move(link, target)
    link.symlink_to(target)
    return link


@pytest.mark.parametrize("source, relative", [
    ("tp2pp2", f"{ITER}/mp_rank_01_001"), ("tp2pp2", RANK_FILE), ("tp2pp2", "latest_checkpointed_iteration.txt"),
    ("tp2pp2", ITER), ("tp2pp2", f"{ITER}/mp_rank_00_000/distrib_optim.pt"),
    ("dist_tp2pp2", f"{ITER}/__1_0.distcp"), ("dist_tp2pp2", f"{ITER}/.metadata"),
])
def test_symlink_leaving_the_checkpoint_is_refused(sources, tmp_path, capsys, source, relative):
    ckpt = copy(sources, source, tmp_path)
    (tmp_path / "outside").mkdir()
    link = _link_out(ckpt, relative, tmp_path / "outside")
    refused(capsys, ckpt, names=link, says="outside the checkpoint directory", command=("convert",))


def test_symlinks_inside_the_checkpoint_are_followed(sources, tmp_path):
    ckpt = copy(sources, "tp2pp2", tmp_path)
    shutil.move(ckpt / ITER / "mp_rank_01_001", ckpt / "elsewhere")
    (ckpt / ITER / "mp_rank_01_001").symlink_to("../elsewhere")
    assert read_source(ckpt).layout.tp == 2


def test_a_fifo_in_the_checkpoint_is_refused_not_waited_on(sources, tmp_path, capsys):
    ckpt = copy(sources, "tp2pp2", tmp_path)
    (ckpt / RANK_FILE).unlink()
    os.mkfifo(ckpt / RANK_FILE)
    refused(capsys, ckpt, names=ckpt / RANK_FILE, says="neither a file nor a directory")


def test_symlinked_shard_or_rank_file_of_hf_and_mindspore(tmp_path):
    hf = hf_directory(tmp_path / "hf")
    (tmp_path / "elsewhere").mkdir()
    _link_out(hf, "model-00001-of-00001.safetensors", tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=f"^{hf}/model-00001-of-00001.safetensors: a symlink to .* outside"):
        open_directory(hf)
    ms = tmp_path / "ms"
    (ms / "rank_0").mkdir(parents=True)
    mindspore_ckpt.save(ms / "rank_0" / "net.ckpt", {"w": np.ones(4, np.float32)})
    link = _link_out(ms, "rank_0/net.ckpt", tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=f"^{link}: a symlink to .* outside"):
        open_source(ms, 1)


# ---- 5. declared sizes of petabytes -------------------------------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def test_petabyte_shapes_of_safetensors_and_mindspore(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 30, 1 << 30], "data_offsets": [0, 1 << 62]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match=f"^{path}: w: data runs past the end of the file"):
        SafetensorsFile(path)
    ckpt = tmp_path / "net.ckpt"   # one record, as mindspore.save_checkpoint writes it, of 48 bytes
    field = lambda number, data: bytes([number << 3 | 2]) + _varint(len(data)) + data   # noqa: E731
    tensor = b"\x08" + _varint(1 << 40) + b"\x08" + _varint(1 << 40) + field(2, b"Float32") + field(3, bytes(48))
    ckpt.write_bytes(field(1, field(1, b"w") + field(2, tensor)))
    with pytest.raises(CheckpointError, match=f"^{ckpt}: .*for shape \\[1099511627776, 1099511627776\\]"):
        CkptFile(ckpt)


@pytest.mark.parametrize("what, says", [
    ("global shape", "declares shape (1000000000000, 1000000000000) (1000000000000000000000000 elements), its chunks"),
    ("chunk", "of size (1000000000000, 1000000000000) lies outside its shape"),
])
def test_petabyte_shapes_in_torch_dist_metadata(sources, tmp_path, capsys, what, says):
    ckpt = copy(sources, "dist_tp2pp2", tmp_path)
    path = ckpt / ITER / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    entry = metadata.state_dict_metadata["embedding.word_embeddings.weight"]
    huge = torch.Size([10**12, 10**12])
    if what == "global shape":
        entry.size = huge
    else:
        entry.chunks[0] = type(entry.chunks[0])(offsets=entry.chunks[0].offsets, sizes=huge)
    path.write_bytes(pickle.dumps(metadata))
    refused(capsys, ckpt, names=path, says=says, command=("convert",))
