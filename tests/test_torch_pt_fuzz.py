"""Hostile `.pt` files: the reader loads them, with every tensor inside its storage, or refuses them
with a `CheckpointError` (a ValueError) naming the file, in bounded time and memory.

Two kinds of cases, all run by one child process (`_child_main`) under an address-space limit
(RLIMIT_AS) and a per-case alarm, so that a huge allocation or a hang fails its case instead of
taking the machine down: seeded truncations and byte mutations of the real files in
../shared/parity/pt (and of a legacy-format copy), and crafted opcode sequences (`CRAFTED`).
"""

import collections
import dataclasses
import io
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import traceback
import zipfile
import zlib

import numpy as np
import pytest

from diffjax.io.torch_pt import CheckpointError, Limits, open_pt, read_pt
from tests._util import PARITY, REPO
from tests.test_torch_pt import (
    Raw,
    Storage,
    dumps,
    ordered_dict,
    state_dict_file,
    tensor,
    write_zip,
)

REAL = ("unet_cond32", "classifier32")
SEED = 20240611
# (source, kind of mutation, how many): 360 mutants, ~5 s on an idle core. The legacy copy has no
# zip to fix up around a mutated pickle.
PLAN = (
    *[(name, kind, n) for name in REAL for kind, n in (("cut", 25), ("bytes", 45), ("pickle", 55))],
    ("classifier32", "rezip", 40),
    ("classifier32_legacy", "cut", 25),
    ("classifier32_legacy", "bytes", 45),
)
CASE_SECONDS = 10  # a case that takes longer has hung
CHILD_MEMORY = 768 << 20  # address space a child may add to what it has after its imports


# ------------------------------------------------------------------------- checking one file


def _refused(e: Exception) -> dict:
    return {"outcome": "refused", "error": type(e).__name__, "message": str(e)}


def _outcome(path, limits=Limits()) -> dict:
    """Open `path` and materialise every tensor: 'loaded' or 'refused'; AssertionError when a
    tensor lies outside its storage record or a refusal is not a CheckpointError naming the file."""
    try:
        with open_pt(path, limits=limits) as sd:
            records = sd._records
            for key, ref in sd.refs.items():
                array = sd[key]
                nbytes = records.nbytes(ref.storage.key)
                last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
                inside = 0 in ref.shape or (last + 1) * ref.dtype.itemsize <= nbytes
                assert inside and array.shape == ref.shape and array.nbytes <= nbytes, key
                start, size = records.extents.get(ref.storage.key, (0, 0))
                assert start + size <= records.size, key
            return {"outcome": "loaded", "keys": list(sd)}
    except ValueError as e:
        assert isinstance(e, CheckpointError), f"{type(e).__name__} is not a CheckpointError: {e}"
        assert str(path) in str(e), f"the message does not name the file: {e}"
        return _refused(e)


# ------------------------------------------------------------------------- mutants of real files


@dataclasses.dataclass
class _Source:
    """A file to mutate; for a zip, where its data.pkl lies, its headers, and its CRC field."""

    data: bytes
    legacy: bool
    pickle: tuple[int, int] = (0, 0)
    headers: tuple = ()
    crc_at: int = 0

    @classmethod
    def of(cls, data: bytes, legacy: bool = False):
        if legacy:
            return cls(data, legacy)
        z = zipfile.ZipFile(io.BytesIO(data))
        first = z.infolist()[0]
        assert first.filename == "archive/data.pkl"
        assert data[z.start_dir : z.start_dir + 4] == b"PK\x01\x02"  # first directory entry
        name_len, extra_len = struct.unpack_from("<HH", data, first.header_offset + 26)
        start = first.header_offset + 30 + name_len + extra_len  # torch pads the local extra field
        headers = [(i.header_offset, i.header_offset + 94) for i in z.infolist()]
        headers.append((z.start_dir, len(data)))
        return cls(data, legacy, (start, start + first.file_size), tuple(headers), z.start_dir + 16)


_INTERESTING = b"\x00\x01\x7f\x80\xff" + bytes(range(0x20, 0x80))  # covers every opcode byte


def _poke(rng, data: bytearray, lo: int, hi: int, count: int) -> None:
    for _ in range(count):
        at = rng.randrange(lo, min(hi, len(data)))
        data[at] = rng.choice(_INTERESTING) if rng.random() < 0.6 else rng.randrange(256)


def _mutant(rng, kind: str, src: _Source) -> bytes:
    """One seeded mutant of a real zip checkpoint or of its legacy copy."""
    data, out = src.data, bytearray(src.data)
    if kind == "cut":  # anywhere, or in the pickles (legacy: at the start) / zip directory
        if rng.random() < 0.5:
            return data[: rng.randrange(1, len(data))]
        near = rng.randrange(1, 64 << 10)
        return data[:near] if src.legacy else data[: len(data) - near]
    if src.legacy:  # mostly in the pickles, which take the first ~20 KB
        _poke(rng, out, 0, 20_000 if rng.random() < 0.7 else len(data), rng.randint(1, 8))
        return bytes(out)
    if kind == "bytes":  # anywhere in the file, mostly in the zip headers
        lo, hi = rng.choice(src.headers) if rng.random() < 0.6 else (0, len(data))
        _poke(rng, out, lo, hi, rng.randint(1, 8))
        return bytes(out)
    lo, hi = src.pickle
    pkl = bytearray(data[lo:hi])
    if kind == "pickle":  # in place, with the CRC fixed so that the pickle itself is parsed
        _poke(rng, pkl, 0, len(pkl), rng.randint(1, 6))
        out[lo:hi] = pkl
        out[src.crc_at : src.crc_at + 4] = zlib.crc32(pkl).to_bytes(4, "little")
        return bytes(out)
    # rezip: cut, repeat or insert spans of the pickle, then write a well-formed zip around it
    for _ in range(rng.randint(1, 3)):
        at, n, choice = rng.randrange(len(pkl)), rng.randint(1, 40), rng.random()
        if choice < 0.4:
            del pkl[at : at + n]
        else:
            new = pkl[at : at + n] if choice < 0.7 else bytes(rng.choices(_INTERESTING, k=n))
            pkl[at:at] = new
    old = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for info in old.infolist():
            z.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else old.read(info))
    return buf.getvalue()


# ------------------------------------------------------------------------- crafted files


def _body(obj) -> bytes:
    """The test writer's opcodes for `obj`, without PROTO and STOP, to embed in a crafted pickle."""
    return dumps(obj)[2:-1]


def _zip(path, pickle_bytes, storages=(), compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compress) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        for st in storages:
            z.writestr(f"archive/data/{st.key}", st.flat.tobytes())
    return path


def _patch_directory(path, name, offset, value):
    """Overwrite a 4-byte field of record `name`'s central directory entry (a lying zip)."""
    data = bytearray(path.read_bytes())
    z = zipfile.ZipFile(io.BytesIO(bytes(data)))
    at = z.start_dir
    for info in z.infolist():
        if info.filename == name:
            data[at + offset : at + offset + 4] = value.to_bytes(4, "little")
        at += 46 + len(info.filename.encode()) + len(info.extra) + len(info.comment)
    path.write_bytes(bytes(data))
    return path


_SIZE_AT = 24  # offset of the uncompressed size in a central directory entry


def _one_tensor(shape, stride, offset=0):
    st = Storage("0", np.arange(6, dtype=np.float32))
    return ordered_dict([("w", tensor(st, offset, shape, stride))]), [st]


_STORAGES = _one_tensor((6,), (1,))[1]
_TENSOR = _body(_one_tensor((4,), (1,))[0].items[0][1])  # REDUCE of _rebuild_tensor_v2
_SLOT_STATE = b"N}X\x05\x00\x00\x00shapeK\x07\x85s\x86"  # (None, {'shape': (7,)}): setattr state
_HUGE = 40_000  # bytes of a LONG4 int


def _crafted_tensor(tmp, *args):
    return _outcome(write_zip(tmp / "x.pt", *_one_tensor(*args)))


def _crafted_pickle(tmp, opcodes, name="x"):
    """A zip whose data.pkl is `opcodes` (beside the storage of `_TENSOR`)."""
    return _outcome(_zip(tmp / f"{name}.pt", b"\x80\x02" + opcodes + b".", _STORAGES))


def _shared_paths(levels):
    """A state dict reached through 2**levels paths: lists of [previous, previous]."""
    ops = _body(_one_tensor((2, 3), (3, 1))[0]) + b"q\x00" + b"0"  # BINPUT 0, POP
    for i in range(1, levels + 1):  # EMPTY_LIST MARK BINGET BINGET APPENDS BINPUT POP
        previous = bytes([i - 1])
        ops += b"](h" + previous + b"h" + previous + b"eq" + bytes([i]) + b"0"
    return ops + b"h" + bytes([levels])


def _honest_after_hostile(tmp):
    """Hostile pickles that try to change shared stand-ins, then an honest file: bit-identical."""
    honest = PARITY / "pt" / "classifier32.pt"
    clean = read_pt(honest)
    storage_global = b"ctorch\nFloatStorage\n"
    rebuild_global = b"ctorch._utils\n_rebuild_tensor_v2\n"
    hostile = {
        "build_storage_type": storage_global + b"N}X\x05\x00\x00\x00dtypeK\x01s\x86b0",
        "build_rebuild_fn": rebuild_global + b"N}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b0",
        "build_rebuild_fn_dict": rebuild_global + b"}X\x08\x00\x00\x00__code__K\x01sb0",
        "setitem_storage_type": storage_global + b"X\x05\x00\x00\x00dtypeK\x01s0",
        "build_tensor": _TENSOR + _SLOT_STATE + b"b0",
    }
    for name, ops in hostile.items():  # each would leave an empty dict: a loadable file
        result = _crafted_pickle(tmp, ops + b"}", name)
        assert result["outcome"] == "refused", (name, result)
    again = read_pt(honest)
    same = list(again) == list(clean) and all(
        again[k].dtype == clean[k].dtype and again[k].tobytes() == clean[k].tobytes() for k in clean
    )
    return {"outcome": "identical" if same else "changed"}


def _view_changed_after_open(tmp):
    """`refs` is a plain dict: a view swapped in after open_pt is checked where it is read."""
    with open_pt(write_zip(tmp / "swap.pt", *_one_tensor((6,), (1,)))) as sd:
        sd.refs["w"] = dataclasses.replace(sd.refs["w"], shape=(65536, 65536), stride=(0, 0))
        try:
            sd["w"]
        except CheckpointError as e:
            return _refused(e)
    return {"outcome": "loaded"}


def _deflated_storages(tmp):
    """Deflated records (not torch's, but a zip tool's) read the same as stored ones."""
    real = PARITY / "pt" / "classifier32.pt"
    src, path = zipfile.ZipFile(real), tmp / "deflated.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info))
    clean, got = read_pt(real), read_pt(path)
    same = list(got) == list(clean) and all(got[k].tobytes() == clean[k].tobytes() for k in clean)
    return {"outcome": "identical" if same else "changed"}


_BOMB = b"\x80\x02]" + b"N" * (4 << 20) + b"."  # 4 MiB of pickle, a few KB deflated


def _pickle_bomb(tmp):
    """Against a 1 MiB pickle limit: refused before it is inflated."""
    path = _zip(tmp / "bomb.pt", _BOMB, compress=zipfile.ZIP_DEFLATED)
    return _outcome(path, Limits(max_pickle_bytes=1 << 20))


def _lying_pickle_size(tmp):
    """The directory says data.pkl has 100 bytes, its deflated stream has 4 MiB: 100 are read."""
    path = _zip(tmp / "lie.pt", _BOMB, compress=zipfile.ZIP_DEFLATED)
    return _outcome(_patch_directory(path, "archive/data.pkl", _SIZE_AT, 100))


def _lying_storage_size(tmp):
    """A deflated 24-byte storage record whose directory claims 2 GiB: more than deflate gives."""
    obj, storages = _one_tensor((6,), (1,))
    path = _zip(tmp / "lie.pt", dumps(obj), storages, compress=zipfile.ZIP_DEFLATED)
    return _outcome(_patch_directory(path, "archive/data/0", _SIZE_AT, 2 << 30))


def _overlapping_views(tmp):
    """Twenty keys viewing one 1 MiB storage: open_pt streams them, read_pt refuses to hold all."""
    st = Storage("0", np.zeros(1 << 18, np.float32))
    obj = ordered_dict((f"w{i}", tensor(st, 0, (1 << 18,), (1,))) for i in range(20))
    path = write_zip(tmp / "reuse.pt", obj, [st])
    assert _outcome(path)["outcome"] == "loaded"
    try:
        read_pt(path)
    except CheckpointError as e:
        return _refused(e)
    return {"outcome": "loaded"}


def _visited_limit(tmp):
    sd, storages = _one_tensor((6,), (1,))
    path = write_zip(tmp / "nested.pt", {"a": [[[sd]]], "b": [{}, {}, {}]}, storages)
    return _outcome(path, Limits(max_visited=4))


def _real_with(**limits):
    return lambda tmp: _outcome(PARITY / "pt" / "unet_cond32.pt", Limits(**limits))


def _pickled(opcodes: bytes):
    return lambda tmp: _crafted_pickle(tmp, opcodes)


def _tensor(*args):
    return lambda tmp: _crafted_tensor(tmp, *args)


_COLLIDING_KEYS = b"".join(  # k * (2**61 - 1) all hash to 0: filling a dict would be quadratic
    b"\x8a\x0a" + (k * (2**61 - 1)).to_bytes(10, "little") + b"N" for k in range(1, 50_000)
)
_HUGE_INT = Raw(b"\x8b" + _HUGE.to_bytes(4, "little") + b"\x01" * _HUGE)  # LONG4

# name -> (case(tmp dir) -> outcome, expected outcome or error class, regex on the message)
CRAFTED = {
    "self_referencing_list": (
        _pickled(b"]q\x00h\x00a"), "CheckpointFormatError", "cannot tell which state dict"
    ),
    "self_referencing_dict": (
        _pickled(b"}q\x00X\x01\x00\x00\x00ah\x00s"),
        "CheckpointFormatError", "cannot tell which state dict",
    ),
    "self_appending_list": (  # each self-append nests the list one level deeper
        _pickled(b"]q\x00" + b"h\x00a" * 200), "CheckpointLimitError", "nested more than 100 deep"
    ),
    "shared_containers_2_to_the_60_paths": (
        lambda tmp: _outcome(_zip(tmp / "x.pt", b"\x80\x02" + _shared_paths(60) + b".", _STORAGES)),
        "loaded", "",
    ),
    "deep_lists_by_mark": (
        _pickled(b"](" * 100_000 + b"e" * 100_000), "CheckpointLimitError", "nested MARKs"
    ),
    "deep_lists_by_append": (
        _pickled(b"]" * 100_000 + b"a" * 99_999),
        "CheckpointLimitError", "nested more than 100 deep",
    ),
    "deep_tuples": (  # hashing a deep tuple recurses in C: refused before anything hashes it
        _pickled(b")" + b"\x85" * 100_000), "CheckpointLimitError", "nested more than 100 deep"
    ),
    "huge_memo_index": (  # 10 bytes that made the C unpickler allocate a 16 GiB memo
        _pickled(b"]r\xff\xff\xff\x7f"), "CheckpointLimitError", "memo index 2147483647"
    ),
    "memo_read_before_write": (
        _pickled(b"h\x05"), "CheckpointFormatError", "memo entry 5 is read before"
    ),
    "colliding_int_keys": (
        _pickled(b"}(" + _COLLIDING_KEYS + b"u"),
        "CheckpointFormatError", "keys are strings or small ints",
    ),
    "huge_int_offset": (  # a 96k-digit int: Python refuses to print it, so must the message
        _tensor((2,), (1,), _HUGE_INT),
        "CheckpointFormatError", r"bad storage offset <319993-bit int>",
    ),
    "zero_stride_huge_view": (  # 24 bytes declared as 65536 x 65536: 16 GiB if materialised
        _tensor((65536, 65536), (0, 0)),
        "CheckpointFormatError", r"w: shape \(65536, 65536\) .* more than the 6 of its storage",
    ),
    "view_past_storage_end": (
        _tensor((10,), (1,)),
        "CheckpointFormatError", r"w: shape \(10,\) stride \(1,\) at offset 0 needs .* up to 10",
    ),
    "offset_past_storage_end": (
        _tensor((2,), (1,), 5),
        "CheckpointFormatError", "needs elements up to 7 of storage '0', which has 6",
    ),
    "negative_stride": (
        _tensor((2,), (-1,), 3),
        "CheckpointFormatError", "stride must be a tuple of at most 64 non-negative",
    ),
    "view_changed_after_open": (
        _view_changed_after_open, "CheckpointFormatError", r"swap.pt: w: shape \(65536, 65536\)"
    ),
    "build_on_tensor": (
        _pickled(_TENSOR + _SLOT_STATE + b"b"),
        "UnsafeCheckpointError", "refused BUILD on TensorRef",
    ),
    "build_on_storage_global": (
        _pickled(b"ctorch\nFloatStorage\nN}\x86b"),
        "UnsafeCheckpointError", "refused BUILD on torch.FloatStorage",
    ),
    "build_on_list": (
        _pickled(b"]}b"), "UnsafeCheckpointError", "refused BUILD on <list of 0>"
    ),
    "append_to_tuple": (_pickled(b")Na"), "UnsafeCheckpointError", r"refused APPEND on \(\)"),
    "setitems_on_tensor": (
        _pickled(_TENSOR + b"(X\x01\x00\x00\x00aNu"),
        "UnsafeCheckpointError", "refused SETITEMS on TensorRef",
    ),
    "reduce_of_a_storage_type": (
        _pickled(b"ctorch\nFloatStorage\n)R"),
        "UnsafeCheckpointError", "refused REDUCE of torch.FloatStorage",
    ),
    "honest_file_after_hostile_ones": (_honest_after_hostile, "identical", ""),
    "deflated_storages": (_deflated_storages, "identical", ""),
    "deflate_bomb_pickle": (
        _pickle_bomb, "CheckpointLimitError", "holds 4194308 bytes, more than the 1048576"
    ),
    "lying_pickle_size": (_lying_pickle_size, "CheckpointFormatError", "data.pkl .*Bad CRC"),
    "lying_storage_size": (
        _lying_storage_size, "CheckpointFormatError", "more than deflate can give"
    ),
    "overlapping_views_in_read_pt": (
        _overlapping_views, "CheckpointLimitError", "Limits.max_view_reuse"
    ),
    "limit_opcodes": (
        _real_with(max_opcodes=5000), "CheckpointLimitError", "more than 5000 pickle opcodes"
    ),
    "limit_pickle_bytes": (
        _real_with(max_pickle_bytes=10_000), "CheckpointLimitError", "Limits.max_pickle_bytes"
    ),
    "limit_memo_index": (
        _real_with(max_memo_index=100), "CheckpointLimitError", "memo index 101 outside 0..100"
    ),
    "limit_depth": (_real_with(max_depth=2), "CheckpointLimitError", "Limits.max_depth"),
    "limit_zip_directory": (
        _real_with(max_zip_directory_bytes=1000), "CheckpointLimitError", "zip directory has"
    ),
    "limit_visited": (_visited_limit, "CheckpointLimitError", "Limits.max_visited"),
}


# ------------------------------------------------------------------------- the child process


def _run_case(case, *args) -> dict:
    """`case(*args)` under the alarm; any exception (a hang, MemoryError, ...) fails the case."""

    def alarm(*_):
        raise TimeoutError(f"more than {CASE_SECONDS} s")

    start = time.perf_counter()
    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        result = case(*args)
    except BaseException as e:
        result = {"outcome": "failed", "error": type(e).__name__, "message": traceback.format_exc()}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return dict(result, seconds=time.perf_counter() - start)


def _child_main(tmp: str) -> None:
    """Run every case with bounded memory; print {name: outcome} as JSON."""
    import pathlib
    import resource

    tmp = pathlib.Path(tmp)
    sources = {name: _Source.of((PARITY / "pt" / f"{name}.pt").read_bytes()) for name in REAL}
    arrays = read_pt(PARITY / "pt" / "classifier32.pt")
    legacy = state_dict_file(tmp / "legacy.pt", arrays, "legacy")
    sources["classifier32_legacy"] = _Source.of(legacy.read_bytes(), legacy=True)
    status = open("/proc/self/status").read()
    vm = int(re.search(r"VmSize:\s+(\d+) kB", status).group(1)) * 1024
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (vm + CHILD_MEMORY, hard))
    results = {}
    for name, (case, _, _) in CRAFTED.items():
        (tmp / name).mkdir()
        results[name] = _run_case(case, tmp / name)
    rng, path = random.Random(SEED), tmp / "mutant.pt"
    for source, kind, count in PLAN:
        for i in range(count):
            path.write_bytes(_mutant(rng, kind, sources[source]))
            results[f"{source}/{kind}/{i}"] = _run_case(_outcome, path)
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("resource", reason="the child's memory limit needs resource (POSIX)")
    if not os.path.exists("/proc/self/status"):
        pytest.skip("the child's memory limit is measured from /proc (Linux)")
    for name in REAL:
        if not (PARITY / "pt" / f"{name}.pt").exists():
            pytest.skip(f"golden data {PARITY / 'pt'} is absent (set DIFFJAX_SHARED)")
    tmp = tmp_path_factory.mktemp("fuzz")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    code = f"from tests.test_torch_pt_fuzz import _child_main; _child_main({str(tmp)!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULTS ", 1)[1])


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted(results, name):
    _, expected, pattern = CRAFTED[name]
    result = results[name]
    assert result["outcome"] != "failed", result["message"]
    assert result.get("error", result["outcome"]) == expected, result
    assert re.search(pattern, result.get("message", "")), result["message"]


def test_mutants_load_or_are_refused(results):
    mutants = {k: v for k, v in results.items() if "/" in k}
    assert len(mutants) == sum(n for _, _, n in PLAN)
    failed = {k: v for k, v in mutants.items() if v["outcome"] not in ("loaded", "refused")}
    assert not failed, json.dumps(failed, indent=1)[:5000]
    # The mutants reach every stage: some load, others are refused as corrupt, unsafe, too large.
    outcomes = collections.Counter(v.get("error", v["outcome"]) for v in mutants.values())
    assert outcomes["loaded"] > 20 and outcomes["CheckpointFormatError"] > 100, outcomes
    assert outcomes["UnsafeCheckpointError"] and outcomes["CheckpointLimitError"], outcomes


def test_convert_refuses_with_one_line_and_writes_nothing(tmp_path, monkeypatch):
    """`python -m diffjax convert` on a hostile file: `error: ...`, non-zero exit, no output."""
    from diffjax.cli import convert
    from diffjax.io import torch_pt

    hostile = write_zip(tmp_path / "hostile.pt", *_one_tensor((65536, 65536), (0, 0)))
    out = tmp_path / "out"
    argv = ["--pt", str(hostile), "--preset", "64x64_diffusion", "--out", str(out), "--no-progress"]
    with pytest.raises(SystemExit, match=r"^error: .*hostile.pt: tensors outside their storage"):
        convert.main(argv)
    for raised, message in ((RuntimeError("boom"), "boom"), (MemoryError(), "MemoryError")):

        def open_pt(*args, raised=raised, **kwargs):  # whatever a reader raises: one line
            raise raised

        monkeypatch.setattr(torch_pt, "open_pt", open_pt)
        with pytest.raises(SystemExit, match=rf"^error: {message}$"):
            convert.main(argv)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["hostile.pt"]
