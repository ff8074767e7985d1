"""The torch-free `.pt` reader: real files, malicious files, and files written here.

Files other than the shared real/malicious ones are made by `_TorchWriter` below, a tiny writer of
the format torch.save uses (protocol-2 opcodes, persistent ids, zip records, legacy stream). It is
checked against the real files' structure (`test_writer_matches_real_file_structure`) and, where
torch is installed, against torch.load itself.
"""

import collections
import io
import json
import pickle
import pickletools
import struct
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest

from diffjax.io.torch_pt import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    open_pt,
    read_pt,
)
from tests._util import PARITY, require

REAL = ("unet_cond32", "classifier32")
STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


# ------------------------------------------------------------------------- a torch.save writer


class G:
    """A pickle global `module.name`."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class R:
    """`fn(*args)` pickled as REDUCE; `items` are then added with SETITEMS (an OrderedDict)."""

    def __init__(self, fn, args, items=None):
        self.fn, self.args, self.items = fn, args, items


class PID:
    """A persistent id (BINPERSID), as torch writes for storages."""

    def __init__(self, pid):
        self.pid = pid


class Raw:
    """Opcodes written verbatim (for crafted pickles)."""

    def __init__(self, data):
        self.data = data


def ordered_dict(items):
    return R(G("collections", "OrderedDict"), (), items=list(items))


class Storage:
    """A storage: its flat data and key."""

    def __init__(self, key, flat):
        self.key, self.flat = key, np.ascontiguousarray(flat).reshape(-1)


def tensor(storage, offset, shape, stride, legacy=False, parameter=False, view=None):
    """torch's pickle of a tensor; `view` = (key, offset, size): a pre-1.0 legacy storage view."""
    name = STORAGE_NAMES[storage.flat.dtype]
    pid = ("storage", G("torch", name), storage.key, "cpu", storage.flat.size) + (
        (view,) if legacy else ()
    )
    t = R(
        G("torch._utils", "_rebuild_tensor_v2"),
        (PID(pid), offset, tuple(shape), tuple(stride), False, ordered_dict([])),
    )
    if parameter:
        requires_grad = storage.flat.dtype.kind == "f" or storage.flat.dtype == ml_dtypes.bfloat16
        t = R(G("torch._utils", "_rebuild_parameter"), (t, requires_grad, ordered_dict([])))
    return t


def contiguous(shape):
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def dumps(obj, protocol=2):
    """Protocol-2 opcodes as Python's pickler emits them for these objects (no memo)."""
    out = bytearray(b"\x80" + bytes([protocol]))

    def emit(o):
        if isinstance(o, Raw):
            out.extend(o.data)
        elif isinstance(o, G):
            out.extend(b"c" + f"{o.module}\n{o.name}\n".encode())
        elif isinstance(o, R):
            emit(o.fn)
            emit(o.args)
            out.extend(b"R")
            if o.items:
                items(o.items)
        elif isinstance(o, PID):
            emit(o.pid)
            out.extend(b"Q")
        elif o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            if 0 <= o < 256:
                out.extend(b"K" + bytes([o]))
            elif 0 <= o < 65536:
                out.extend(b"M" + struct.pack("<H", o))
            elif -(2**31) <= o < 2**31:
                out.extend(b"J" + struct.pack("<i", o))
            else:
                raw = o.to_bytes((o.bit_length() + 8) // 8, "little", signed=True)
                out.extend(b"\x8a" + bytes([len(raw)]) + raw)
        elif isinstance(o, str):
            raw = o.encode()
            out.extend(b"X" + struct.pack("<I", len(raw)) + raw)
        elif isinstance(o, tuple):
            if not o:
                out.extend(b")")
            elif len(o) <= 3:
                for v in o:
                    emit(v)
                out.extend(b"\x85\x86\x87"[len(o) - 1 : len(o)])
            else:
                out.extend(b"(")
                for v in o:
                    emit(v)
                out.extend(b"t")
        elif isinstance(o, list):
            out.extend(b"]")
            items_list(o)
        elif isinstance(o, dict):
            out.extend(b"}")
            items(list(o.items()))
        else:
            raise TypeError(type(o))

    def items(pairs):  # pickle batches dict items: SETITEM for one, MARK ... SETITEMS for more
        if len(pairs) == 1:
            emit(pairs[0][0]), emit(pairs[0][1])
            out.extend(b"s")
        elif pairs:
            out.extend(b"(")
            for k, v in pairs:
                emit(k), emit(v)
            out.extend(b"u")

    def items_list(values):
        if values:
            out.extend(b"(")
            for v in values:
                emit(v)
            out.extend(b"e")

    emit(obj)
    out.extend(b".")
    return bytes(out)


def write_zip(path, obj, storages, prefix="archive", big_endian=False):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", dumps(obj))
        z.writestr(f"{prefix}/byteorder", "big" if big_endian else "little")
        for st in storages:
            flat = st.flat.astype(st.flat.dtype.newbyteorder(">")) if big_endian else st.flat
            z.writestr(f"{prefix}/data/{st.key}", flat.tobytes())
        z.writestr(f"{prefix}/version", "3\n")
    return path


def write_legacy(path, obj, storages):
    with open(path, "wb") as f:
        f.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(
            pickle.dumps(
                {
                    "protocol_version": 1001,
                    "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4},
                },
                protocol=2,
            )
        )
        f.write(dumps(obj))
        keys = sorted(st.key for st in storages)
        f.write(pickle.dumps(keys, protocol=2))
        for key in keys:
            st = next(s for s in storages if s.key == key)
            f.write(struct.pack("<q", st.flat.size) + st.flat.tobytes())
    return path


def state_dict_file(path, arrays, fmt="zip", parameter=False, **kw):
    """One storage per array, as torch.save(model.state_dict()) writes."""
    storages = [Storage(str(i), a) for i, a in enumerate(arrays.values())]
    legacy = fmt == "legacy"
    obj = ordered_dict(
        (k, tensor(st, 0, a.shape, contiguous(a.shape), legacy, parameter))
        for (k, a), st in zip(arrays.items(), storages)
    )
    return (write_legacy if legacy else write_zip)(path, obj, storages, **kw)


# ------------------------------------------------------------------------- real files


@pytest.mark.parametrize("name", REAL)
def test_real_files_match_npz(name, golden):
    g = golden(name)
    sd = read_pt(require(PARITY / "pt" / f"{name}.pt"))
    assert list(sd) == g.config["state_dict_keys"]
    for key, value in sd.items():
        expected = g[key]
        assert value.dtype == expected.dtype and value.shape == expected.shape, key
        assert np.array_equal(value.view(np.uint32), expected.view(np.uint32)), key  # bit-identical


def test_open_pt_knows_shapes_before_reading(golden):
    g = golden("classifier32")
    with open_pt(require(PARITY / "pt" / "classifier32.pt")) as sd:
        assert [tuple(r.shape) for r in sd.refs.values()] == [
            g[k].shape for k in g.config["state_dict_keys"]
        ]
        key = g.config["state_dict_keys"][5]
        np.testing.assert_array_equal(sd[key], g[key])


def _normalised_ops(data):
    """(kind, value) per opcode, memo puts dropped and gets replaced by the value they recall."""
    ops, memo = [], {}
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = ops[-1]
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            assert memo[arg][0] in ("int", "str", "GLOBAL"), "a get of a compound value"
            ops.append(memo[arg])
        elif op.name in ("BININT", "BININT1", "BININT2", "LONG1"):
            ops.append(("int", arg))
        elif op.name in ("BINUNICODE", "SHORT_BINUNICODE"):
            ops.append(("str", arg))
        else:
            ops.append((op.name, arg))
    return ops


def test_writer_matches_real_file_structure(golden, tmp_path):
    """The test writer emits what torch.save wrote for the real file, opcode for opcode."""
    g = golden("classifier32")
    arrays = g.state_dict()
    mine = zipfile.ZipFile(state_dict_file(tmp_path / "mine.pt", arrays))
    real = zipfile.ZipFile(require(PARITY / "pt" / "classifier32.pt"))
    ops_real = _normalised_ops(real.read("archive/data.pkl"))
    ops_mine = _normalised_ops(mine.read("archive/data.pkl"))
    cut = (
        ops_real.index(("str", "_metadata")) - 1
    )  # torch adds the module versions after the tensors
    assert ops_mine[:-1] == ops_real[:cut] and ops_mine[-1] == ("STOP", None)
    assert ops_real[cut : cut + 2] == [("EMPTY_DICT", None), ("str", "_metadata")]
    for i in range(len(arrays)):
        assert mine.read(f"archive/data/{i}") == real.read(f"archive/data/{i}")


# ------------------------------------------------------------------------- malicious files


def _malicious():
    path = PARITY / "pt" / "malicious" / "expected.json"
    if not path.exists():
        return []
    return sorted(json.loads(path.read_text())["fixtures"].items())


@pytest.mark.parametrize("name,fixture", _malicious(), ids=[n for n, _ in _malicious()])
def test_malicious_files_are_refused(name, fixture, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = require(PARITY / "pt" / "malicious" / fixture["file"])
    refused = fixture["first_global_outside_state_dict_allowlist"]
    with pytest.raises(UnsafeCheckpointError, match=f"`{refused}`") as err:
        read_pt(path)
    assert isinstance(err.value, pickle.UnpicklingError)
    assert err.value.global_name == refused and str(path) in str(err.value)
    assert not (tmp_path / fixture["marker"]).exists()
    assert list(tmp_path.iterdir()) == []


def _touch(name):
    return f"open('{name}', 'w').close()"


@pytest.mark.parametrize(
    "case", ["global_after_tensors", "inst", "newobj", "stack_global", "legacy"]
)
def test_crafted_pickles_are_refused_before_running_anything(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    st = Storage("0", np.arange(4, dtype=np.float32))
    good = tensor(st, 0, (4,), (1,), legacy=case == "legacy")
    evil = R(G("builtins", "exec"), (_touch("pwned"),))
    expected = "builtins.exec"
    if case == "inst":  # INST resolves and calls in one opcode
        evil = Raw(
            b"(X"
            + struct.pack("<I", len(_touch("pwned")))
            + _touch("pwned").encode()
            + b"ibuiltins\nexec\n"
        )
    elif case == "newobj":  # cls.__new__ on a class from the stack: refused as an opcode
        evil = Raw(b"c" + b"collections\nOrderedDict\n" + b")\x81")
        expected = "NEWOBJ"
    elif case == "stack_global":  # protocol-4 globals take module and name from the stack
        evil = Raw(b"\x8c\x02os\x94\x8c\x06system\x94\x93\x8c\x0btouch pwned\x85R")
        expected = "os.system"
    obj = ordered_dict([("w", good), ("evil", evil)])
    writer = write_legacy if case == "legacy" else write_zip
    path = writer(tmp_path / "evil.pt", obj, [st])
    with pytest.raises(UnsafeCheckpointError, match=expected):
        read_pt(path)
    assert not (tmp_path / "pwned").exists()


def test_lookalike_torch_global_is_refused(tmp_path):
    st = Storage("0", np.zeros(1, np.float32))
    obj = ordered_dict([("w", R(G("torch", "load"), ("x",))), ("v", tensor(st, 0, (1,), (1,)))])
    with pytest.raises(UnsafeCheckpointError, match="`torch.load`"):
        read_pt(write_zip(tmp_path / "x.pt", obj, [st]))


# ------------------------------------------------------------------------- layouts and dtypes


def _arrays(rng):
    return collections.OrderedDict(
        f32=rng.standard_normal((3, 4)).astype(np.float32),
        f16=rng.standard_normal((2, 5)).astype(np.float16),
        bf16=rng.standard_normal((4, 3)).astype(ml_dtypes.bfloat16),
        f64=rng.standard_normal(7),
        i64=np.arange(-3, 3, dtype=np.int64),
        i32=np.arange(5, dtype=np.int32),
        u8=np.arange(250, 256, dtype=np.uint8),
        b=np.array([True, False, True]),
        scalar=np.array(2.5, np.float32),
        empty=np.zeros((0, 3), np.float32),
    )


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_dtypes_and_formats(fmt, tmp_path):
    arrays = _arrays(np.random.default_rng(0))
    out = read_pt(state_dict_file(tmp_path / "x.pt", arrays, fmt))
    assert list(out) == list(arrays)
    for key, expected in arrays.items():
        assert out[key].dtype == expected.dtype and out[key].shape == expected.shape, key
        assert out[key].tobytes() == expected.tobytes(), key


def test_parameters_big_endian_and_any_top_folder(tmp_path):
    arrays = _arrays(np.random.default_rng(1))
    path = state_dict_file(
        tmp_path / "x.pt", arrays, parameter=True, prefix="my_model-7", big_endian=True
    )
    out = read_pt(path)
    for key, expected in arrays.items():
        np.testing.assert_array_equal(out[key], expected)
        assert out[key].dtype == expected.dtype


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_views_into_one_shared_storage(fmt, tmp_path):
    """GD's mixed-precision training saves the params as views of one flat master tensor."""
    flat = np.arange(100, dtype=np.float32) * 0.5
    st = Storage("flat", flat)
    legacy = fmt == "legacy"
    obj = ordered_dict(
        [
            (
                "w",
                tensor(st, 10, (3, 4), (4, 1), legacy, parameter=True),
            ),  # flat[10:22].reshape(3, 4)
            ("b", tensor(st, 22, (4,), (1,), legacy)),
            ("wt", tensor(st, 30, (4, 3), (1, 4), legacy)),  # flat[30:42].reshape(3, 4).T
            ("every_other", tensor(st, 50, (2, 5), (10, 2), legacy)),  # flat[50:70:2].reshape(2, 5)
            ("bcast", tensor(st, 99, (3,), (0,), legacy)),  # expand of a scalar
        ]
    )
    out = read_pt((write_legacy if legacy else write_zip)(tmp_path / "v.pt", obj, [st]))
    np.testing.assert_array_equal(out["w"], flat[10:22].reshape(3, 4))
    np.testing.assert_array_equal(out["b"], flat[22:26])
    np.testing.assert_array_equal(out["wt"], flat[30:42].reshape(3, 4).T)
    np.testing.assert_array_equal(out["every_other"], flat[50:70:2].reshape(2, 5))
    np.testing.assert_array_equal(out["bcast"], np.full(3, flat[99]))
    assert all(v.flags.owndata or v.base is not None for v in out.values())
    out["wt"][0, 0] = -1  # each tensor owns its memory: no aliasing between entries
    assert out["w"][0, 0] == flat[10]


def test_legacy_storage_views(tmp_path):
    """Files of torch < 1.0 could reference a slice of a storage (a storage view)."""
    flat = np.arange(40, dtype=np.float64)
    st = Storage("root", flat)
    obj = ordered_dict(
        [
            ("whole", tensor(st, 0, (40,), (1,), legacy=True)),
            ("in_view", tensor(st, 2, (2, 3), (3, 1), legacy=True, view=("v1", 10, 20))),
            ("outside", tensor(st, 0, (5, 5), (5, 1), legacy=True, view=("v2", 30, 10))),
        ]
    )
    path = write_legacy(tmp_path / "old.pt", obj, [st])
    with pytest.raises(CheckpointFormatError, match=r"outside: shape \(5, 5\)"):
        read_pt(path)
    obj.items.pop()
    out = read_pt(write_legacy(tmp_path / "old.pt", obj, [st]))
    np.testing.assert_array_equal(out["whole"], flat)
    np.testing.assert_array_equal(out["in_view"], flat[12:18].reshape(2, 3))


def test_nested_containers(tmp_path):
    arrays = {"a.weight": np.ones((2, 2), np.float32), "a.bias": np.zeros(2, np.float32)}
    storages = [Storage(str(i), a) for i, a in enumerate(arrays.values())]

    def sd():
        return ordered_dict(
            (k, tensor(st, 0, a.shape, contiguous(a.shape)))
            for (k, a), st in zip(arrays.items(), storages)
        )

    wrapped = {"state_dict": sd(), "step": 1000, "optimizer": {"state": {0: {"m": sd()}}}}
    assert list(read_pt(write_zip(tmp_path / "w.pt", wrapped, storages))) == list(arrays)
    two = write_zip(tmp_path / "two.pt", {"model": sd(), "ema": sd()}, storages)
    with pytest.raises(CheckpointFormatError, match="model.*ema.*key="):
        read_pt(two)
    np.testing.assert_array_equal(read_pt(two, key="ema")["a.weight"], arrays["a.weight"])


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pythons_own_pickler(protocol, tmp_path, monkeypatch):
    """torch.save pickles with Python's pickler (protocol 2 by default, any with pickle_protocol=):
    memo gets of shared values, frames, MEMOIZE and STACK_GLOBAL, and BUILD for `_metadata`."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    for module in (torch, utils):
        monkeypatch.setitem(sys.modules, module.__name__, module)

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled here")

    class FloatStorage:
        pass

    for obj, module in ((_rebuild_tensor_v2, "torch._utils"), (FloatStorage, "torch")):
        obj.__module__, obj.__qualname__ = module, obj.__name__
    utils._rebuild_tensor_v2, torch.FloatStorage = _rebuild_tensor_v2, FloatStorage

    class Tensor:  # reduces as torch.Tensor does; its storage becomes a persistent id
        def __init__(self, storage, offset, shape, stride):
            self.args = (storage, offset, shape, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return _rebuild_tensor_v2, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", FloatStorage, obj.key, "cpu", obj.flat.size)
            return None

    flat = np.arange(24, dtype=np.float32)
    st = Storage("0", flat)
    sd = collections.OrderedDict(
        a=Tensor(st, 0, (2, 3), (3, 1)),
        b=Tensor(st, 6, (3, 2), (1, 3)),
        c=Tensor(st, 12, (6,), (1,)),
    )
    sd._metadata = collections.OrderedDict(a={"version": 1})
    buf = io.BytesIO()
    Pickler(buf, protocol=protocol).dump({"state_dict": sd, "step": 3})
    path = tmp_path / "p.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/data/0", flat.tobytes())
    out = read_pt(path)
    assert list(out) == ["a", "b", "c"]
    np.testing.assert_array_equal(out["a"], flat[:6].reshape(2, 3))
    np.testing.assert_array_equal(out["b"], flat[6:12].reshape(2, 3).T)
    np.testing.assert_array_equal(out["c"], flat[12:18])


# ------------------------------------------------------------------------- broken files


def test_truncated_zip_names_the_file(tmp_path):
    data = require(PARITY / "pt" / "unet_cond32.pt").read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError, match="truncated") as err:
            read_pt(path)
        assert str(path) in str(err.value)


def test_corrupt_pickle_and_missing_record(tmp_path):
    st = Storage("0", np.zeros(4, np.float32))
    obj = ordered_dict([("w", tensor(st, 0, (4,), (1,)))])
    path = tmp_path / "bad.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", dumps(obj)[:-9])
        z.writestr("archive/data/0", st.flat.tobytes())
    with pytest.raises(CheckpointFormatError, match="bad.pt.*corrupt or truncated pickle"):
        read_pt(path)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", dumps(obj))
    with pytest.raises(
        CheckpointFormatError, match="storage '0' is referenced but its data record is missing"
    ):
        read_pt(path)
    legacy = write_legacy(
        tmp_path / "legacy.pt", ordered_dict([("w", tensor(st, 0, (4,), (1,), legacy=True))]), [st]
    )
    legacy.write_bytes(legacy.read_bytes()[:-5])
    with pytest.raises(CheckpointFormatError, match="legacy.pt.*truncated"):
        read_pt(legacy)


def test_tensor_outside_its_storage_is_refused(tmp_path):
    st = Storage("0", np.zeros(10, np.float32))
    obj = ordered_dict(
        [("ok", tensor(st, 0, (2, 5), (5, 1))), ("too_big", tensor(st, 2, (3, 3), (3, 1)))]
    )
    with pytest.raises(CheckpointFormatError, match=r"too_big: shape \(3, 3\).*has 10") as err:
        open_pt(write_zip(tmp_path / "x.pt", obj, [st]))
    assert "ok:" not in str(err.value)


def test_storage_record_of_the_wrong_size(tmp_path):
    st = Storage("0", np.zeros(10, np.float32))
    obj = ordered_dict([("w", tensor(st, 0, (10,), (1,)))])
    path = write_zip(tmp_path / "x.pt", obj, [Storage("0", np.zeros(9, np.float32))])
    with pytest.raises(
        CheckpointFormatError, match="storage '0' should hold 10 x float32 = 40 bytes.*36"
    ):
        read_pt(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    with pytest.raises(CheckpointFormatError, match="magic number"):
        read_pt(path)
    path.write_text("hello")
    with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
        read_pt(path)


# ------------------------------------------------------------------------- against torch itself


def test_against_torch(tmp_path):
    """torch.save files read back exactly; the test writer's files load in torch (weights_only)."""
    torch = pytest.importorskip("torch", reason="torch is optional: only this cross-check needs it")
    flat = torch.nn.Parameter(torch.randn(200))
    sd = collections.OrderedDict(
        w=torch.randn(3, 4),
        h=torch.randn(5).half(),
        bf=torch.randn(4, 2).bfloat16(),
        d=torch.randn(3).double(),
        i=torch.arange(4),
        p=torch.nn.Parameter(torch.randn(2, 2)),
        view=flat[10:70].view(6, 10),
        view_t=flat[100:160].view(6, 10).t(),
    )
    expected = {
        k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        for k, v in sd.items()
    }
    for kw in ({}, {"_use_new_zipfile_serialization": False}, {"pickle_protocol": 4}):
        buf = io.BytesIO()
        torch.save(sd, buf, **kw)
        path = tmp_path / "t.pt"
        path.write_bytes(buf.getvalue())
        out = read_pt(path)
        for k, v in expected.items():
            np.testing.assert_array_equal(out[k].astype(v.dtype), v)
        assert out["bf"].dtype == ml_dtypes.bfloat16
    arrays = _arrays(np.random.default_rng(2))
    for fmt in ("zip", "legacy"):
        path = state_dict_file(tmp_path / f"mine_{fmt}.pt", arrays, fmt, parameter=fmt == "zip")
        loaded = torch.load(path, weights_only=True)
        for k, v in arrays.items():
            t = loaded[k].detach()
            got = t.float().numpy().astype(v.dtype) if v.dtype == ml_dtypes.bfloat16 else t.numpy()
            assert got.shape == v.shape and got.tobytes() == v.tobytes(), k
