"""Read PyTorch `.pt` checkpoints without torch and without executing pickled code.

A `.pt` file is a pickle whose tensors point at raw storages kept beside it: in the zip format
(torch >= 1.6: `<top>/data.pkl` + `<top>/data/<key>` + `<top>/byteorder`) or the legacy format
(a stream of pickles: magic number, protocol, sys_info, the object, the storage keys, then each
storage as an 8-byte little-endian element count followed by its raw little-endian bytes).

Safety: the pickle is first scanned opcode by opcode (nothing is built or called during the
scan), then unpickled by an allow-list unpickler. Only these globals are resolved, each to a
harmless stand-in defined here, never to torch itself:
`collections.OrderedDict`, `torch.<Float|Half|BFloat16|Double|Int|Long|Short|Char|Byte|Bool>Storage`,
`torch.UntypedStorage`, `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`,
`torch._utils._rebuild_parameter_with_state`. Anything else, and the opcodes a state dict never
needs (INST, OBJ, NEWOBJ, NEWOBJ_EX, EXT1/2/4, out-of-band buffers), raise
`UnsafeCheckpointError` naming the refused global as `module.name` (Python-3 names).

Streaming: `open_pt` returns a lazy mapping whose keys come from the pickle; each tensor is read
from the file when it is accessed (only the bytes it spans, also for views into a large shared
storage), so a converter holds at most one tensor of the checkpoint at a time beyond its output.

dtypes: storages keep their dtype; bfloat16 comes back as `ml_dtypes.bfloat16` (exact, and
understood by JAX); cast with `.astype(np.float32)` where float32 is wanted.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pathlib
import pickle
import pickletools
import struct
import threading
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointFormatError",
    "LazyStateDict",
    "TensorRef",
    "UnsafeCheckpointError",
    "find_state_dict",
    "open_pt",
    "read_pt",
]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle asks for a global or an opcode outside the state-dict allow-list."""

    def __init__(self, message: str, global_name: str | None = None):
        super().__init__(message)
        self.global_name = global_name


class CheckpointFormatError(ValueError):
    """The file is not a readable PyTorch checkpoint (truncated, corrupt, unsupported layout)."""


# --------------------------------------------------------------------------- allow-list


class _StorageType:
    """What `torch.FloatStorage` & co. unpickle to: only the dtype they stand for."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self):
        return f"torch.{self.name}"


_STORAGE_TYPES = {
    name: _StorageType(name, dtype)
    for name, dtype in {
        "FloatStorage": np.float32,
        "HalfStorage": np.float16,
        "BFloat16Storage": ml_dtypes.bfloat16,
        "DoubleStorage": np.float64,
        "IntStorage": np.int32,
        "LongStorage": np.int64,
        "ShortStorage": np.int16,
        "CharStorage": np.int8,
        "ByteStorage": np.uint8,
        "BoolStorage": np.bool_,
        # torch 2.x writes an untyped (byte) storage when a bare UntypedStorage is saved.
        "UntypedStorage": np.uint8,
    }.items()
}


class _Storage:
    """One storage of the checkpoint: `numel` elements of `dtype` at element `base` of record `key`."""

    __slots__ = ("key", "dtype", "numel", "base")

    def __init__(self, key: str, dtype: np.dtype, numel: int, base: int = 0):
        self.key, self.dtype, self.numel, self.base = key, dtype, numel, base


class TensorRef:
    """An unread tensor: `shape`, `dtype`, and element `offset` / `stride` in its storage."""

    __slots__ = ("storage", "offset", "shape", "stride", "is_parameter")

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.is_parameter = False

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def span(self) -> tuple[int, int]:
        """Half-open element range [start, stop) of the storage this tensor touches."""
        if self.size == 0:
            return self.offset, self.offset
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return self.offset, last + 1

    def is_contiguous(self) -> bool:
        expected = 1
        for n, s in zip(reversed(self.shape), reversed(self.stride)):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True

    def __repr__(self):
        kind = "Parameter" if self.is_parameter else "Tensor"
        return f"TensorRef({kind}, shape={self.shape}, dtype={self.dtype}, storage={self.storage.key!r})"


def _check_ints(value, what):
    if not (isinstance(value, tuple) and all(type(v) is int and v >= 0 for v in value)):
        raise CheckpointFormatError(
            f"_rebuild_tensor_v2: {what} must be a tuple of non-negative ints, got {value!r}"
        )


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    """Stand-in for torch._utils._rebuild_tensor_v2: validates and records, reads nothing."""
    del requires_grad  # inference weights: autograd flags do not matter
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(
            f"_rebuild_tensor_v2: expected a storage, got {type(storage).__name__}"
        )
    if type(storage_offset) is not int or storage_offset < 0:
        raise CheckpointFormatError(f"_rebuild_tensor_v2: bad storage offset {storage_offset!r}")
    _check_ints(size, "size")
    _check_ints(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointFormatError(
            f"_rebuild_tensor_v2: size {size} and stride {stride} differ in length"
        )
    if backward_hooks or metadata:
        raise CheckpointFormatError(
            "_rebuild_tensor_v2: tensors with backward hooks or extra metadata are not plain weights; "
            "re-save the state dict with torch.save(model.state_dict(), path)"
        )
    return TensorRef(storage, storage_offset + storage.base, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """Stand-in for torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its data."""
    del requires_grad, backward_hooks, state  # Python-side attributes of the Parameter: not weights
    if not isinstance(data, TensorRef):
        raise CheckpointFormatError(
            f"_rebuild_parameter: expected a tensor, got {type(data).__name__}"
        )
    data.is_parameter = True
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): st for name, st in _STORAGE_TYPES.items()},
}

# Opcodes that build objects without find_class's say-so, or pull in data from outside the stream;
# torch never writes them for a state dict.
_REFUSED_OPCODES = {
    "INST",
    "OBJ",
    "NEWOBJ",
    "NEWOBJ_EX",
    "EXT1",
    "EXT2",
    "EXT4",
    "NEXT_BUFFER",
    "READONLY_BUFFER",
}
_STRING_OPCODES = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
}
_PUT_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPCODES = {"GET", "BINGET", "LONG_BINGET"}


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Map Python-2 names that protocol <= 2 writes (`__builtin__.exec`) to what Python 3 resolves."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _resolve_global(module: str, name: str, source: str):
    module, name = _python3_name(module, name)
    try:
        return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
        raise UnsafeCheckpointError(
            f"{source}: refused the pickle global `{module}.{name}`: a PyTorch state dict needs only "
            f"tensors and plain containers, and resolving other globals can run arbitrary code. "
            f"If you trust this file, load it with torch.load(path, weights_only=False) and re-save "
            f"the tensors alone with torch.save(model.state_dict(), new_path).",
            global_name=f"{module}.{name}",
        ) from None


def _scan_pickle(file, source: str) -> None:
    """Walk one pickle's opcodes without building anything; refuse what a state dict never needs.

    Leaves `file` just after the pickle's STOP.
    """
    memo: dict[int, Any] = {}
    recent: list = []  # values of the last consecutive pushes, to resolve STACK_GLOBAL operands
    try:
        for op, arg, _ in pickletools.genops(file):
            kind = op.name
            if kind in _REFUSED_OPCODES:
                named = ".".join(_python3_name(*arg.split(" ", 1))) if kind == "INST" else None
                raise UnsafeCheckpointError(
                    f"{source}: refused the pickle opcode {kind}"
                    + (f" (naming `{named}`)" if named else "")
                    + ": a PyTorch state dict never contains it and it can construct arbitrary "
                    "objects.",
                    global_name=named,
                )
            if kind == "GLOBAL":
                _resolve_global(*arg.split(" ", 1), source)
            elif kind == "STACK_GLOBAL":
                if len(recent) < 2 or not all(isinstance(v, str) for v in recent[-2:]):
                    raise UnsafeCheckpointError(
                        f"{source}: refused a STACK_GLOBAL whose module and name are not literal strings"
                    )
                _resolve_global(recent[-2], recent[-1], source)
            if kind in _STRING_OPCODES:
                recent.append(arg)
            elif kind in _GET_OPCODES:
                recent.append(memo.get(arg))
            elif kind in _PUT_OPCODES or kind == "MEMOIZE":
                memo[arg if kind != "MEMOIZE" else len(memo)] = recent[-1] if recent else None
            else:
                recent = []
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # genops raises ValueError / struct.error on garbage or truncation
        raise CheckpointFormatError(f"{source}: corrupt or truncated pickle ({e})") from e


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str, persistent_load):
        super().__init__(file, encoding="utf-8")
        self._source = source
        self._persistent = persistent_load

    def find_class(self, module, name):
        # Defence in depth: the scan has already refused everything this would.
        return _resolve_global(module, name, self._source)

    def persistent_load(self, pid):
        return self._persistent(pid)


def _safe_load(file, source: str, persistent_load=None):
    """Scan, then unpickle one pickle from `file` with the allow-list unpickler."""
    start = file.tell()
    _scan_pickle(file, source)
    end = file.tell()
    file.seek(start)

    def refuse_persistent(pid):
        raise CheckpointFormatError(
            f"{source}: unexpected persistent id {pid!r} outside the object pickle"
        )

    try:
        obj = _SafeUnpickler(file, source, persistent_load or refuse_persistent).load()
        file.seek(end)  # the next pickle (legacy format) starts where the scan stopped
        return obj
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except Exception as e:
        raise CheckpointFormatError(
            f"{source}: cannot rebuild the pickled object ({type(e).__name__}: {e})"
        ) from e


# --------------------------------------------------------------------------- file layouts


class _Records:
    """Byte access to the storages of one checkpoint file: key -> (file offset, nbytes) or zip member."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._file = open(path, "rb", buffering=0)
        self.size = os.fstat(self._file.fileno()).st_size
        self._lock = threading.Lock()
        self.extents: dict[str, tuple[int, int]] = {}  # key -> (file offset, nbytes) of raw bytes
        self.zip: zipfile.ZipFile | None = None
        self.compressed: dict[str, zipfile.ZipInfo] = {}
        self.big_endian = False

    def close(self):
        if self.zip is not None:
            self.zip.close()
        self._file.close()

    def nbytes(self, key: str) -> int:
        if key in self.extents:
            return self.extents[key][1]
        return self.compressed[key].file_size

    def _read_at(self, offset: int, out: memoryview) -> int:
        """Fill `out` from file offset `offset`; returns how many bytes there were."""
        with self._lock:
            self._file.seek(offset)
            got = 0
            while got < len(out):
                n = self._file.readinto(out[got:])
                if not n:
                    break
                got += n
        return got

    def pread(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        return bytes(buf[: self._read_at(offset, memoryview(buf))])

    def read_into(self, key: str, byte_start: int, out: memoryview) -> None:
        """Fill `out` with storage `key`'s bytes from `byte_start` on."""
        if key in self.compressed:  # not written by torch; slow path through zipfile
            with self.zip.open(self.compressed[key]) as member:
                member.seek(byte_start)
                data = member.read(len(out))
            out[: len(data)] = data
            got = len(data)
        else:
            got = self._read_at(self.extents[key][0] + byte_start, out)
        if got != len(out):
            raise CheckpointFormatError(
                f"{self.path}: storage {key!r} ends early: the file is truncated"
            )


def _open_zip(records: _Records):
    path = records.path
    try:
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointFormatError(
            f"{path}: not a readable zip archive ({e}); the file is truncated or corrupt: "
            "download it again"
        ) from e
    records.zip = zf
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise CheckpointFormatError(
            f"{path}: expected one '<folder>/data.pkl' record in a torch zip checkpoint, "
            f"found {pkls or 'none'}"
        )
    prefix = pkls[0][: -len("data.pkl")]
    if prefix + "byteorder" in names:
        order = zf.read(prefix + "byteorder").strip()
        if order not in (b"little", b"big"):
            raise CheckpointFormatError(f"{path}: unknown byteorder {order!r}")
        records.big_endian = order == b"big"
    data_prefix = prefix + "data/"
    for info in zf.infolist():
        if not info.filename.startswith(data_prefix):
            continue
        key = info.filename[len(data_prefix) :]
        if info.compress_type != zipfile.ZIP_STORED:
            records.compressed[key] = info
            continue
        # Raw offset of a stored member: after its local header (30 bytes + name + extra field).
        header = records.pread(info.header_offset, 30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointFormatError(
                f"{path}: bad local header for {info.filename}; the file is corrupt"
            )
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > records.size:
            raise CheckpointFormatError(
                f"{path}: record {info.filename} runs past the end of the file; the file is truncated"
            )
        records.extents[key] = (start, info.file_size)
    try:
        pickle_bytes = zf.read(pkls[0])
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointFormatError(
            f"{path}: cannot read {pkls[0]} ({e}); the file is corrupt"
        ) from e
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"{path}: unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        return _register_storage(storages, records, stype, key, numel)

    obj = _safe_load(io.BytesIO(pickle_bytes), f"{path} ({pkls[0]})", persistent_load)
    _check_storage_sizes(storages, records)
    return obj


def _register_storage(storages, records, stype, key, numel, *, check_record=True):
    """The storage `key` of a persistent id, validated and shared between all its references."""
    path = records.path
    if (
        not isinstance(stype, _StorageType)
        or not isinstance(key, str)
        or type(numel) is not int
        or numel < 0
    ):
        raise CheckpointFormatError(f"{path}: malformed storage reference {(stype, key, numel)!r}")
    if check_record and key not in records.extents and key not in records.compressed:
        raise CheckpointFormatError(
            f"{path}: storage {key!r} is referenced but its data record is missing"
        )
    known = storages.get(key)
    if known is None:
        storages[key] = known = _Storage(key, stype.dtype, numel)
    elif known.dtype != stype.dtype or known.numel != numel:
        raise CheckpointFormatError(
            f"{path}: storage {key!r} is referenced both as {known.numel} x {known.dtype} "
            f"and {numel} x {stype.dtype}"
        )
    return known


def _check_storage_sizes(storages, records):
    for st in storages.values():
        expected, actual = st.numel * st.dtype.itemsize, records.nbytes(st.key)
        if expected != actual:
            raise CheckpointFormatError(
                f"{records.path}: storage {st.key!r} should hold {st.numel} x {st.dtype} = "
                f"{expected} bytes "
                f"but its record has {actual} bytes; the file is corrupt"
            )


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _open_legacy(records: _Records):
    # A buffered handle of its own: the pickles are parsed opcode by opcode.
    with open(records.path, "rb") as f:
        return _parse_legacy(records, f)


def _parse_legacy(records: _Records, f):
    path = records.path
    source = f"{path} (legacy format)"
    magic = _safe_load(f, source)
    if magic != _LEGACY_MAGIC:
        raise CheckpointFormatError(
            f"{path}: neither a torch zip archive nor a legacy torch file (its first pickle is not "
            f"torch's magic number); diffjax reads only files written by torch.save"
        )
    protocol = _safe_load(f, source)
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointFormatError(f"{path}: unsupported legacy protocol version {protocol!r}")
    _safe_load(f, source)  # sys_info: storages are little-endian whatever the writer's host was
    storages: dict[str, _Storage] = {}
    views: list[tuple[_Storage, str, int, int]] = []

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointFormatError(f"{path}: unsupported persistent id {pid!r}")
        _, stype, key, _location, numel, view = pid
        # Records are located after the object pickle: checked there.
        root = _register_storage(storages, records, stype, key, numel, check_record=False)
        if view is None:
            return root
        # Pre-1.0 storage views: (view key, element offset, element count) into the root storage.
        if not (
            isinstance(view, tuple)
            and len(view) == 3
            and all(type(v) is int and v >= 0 for v in view[1:])
        ):
            raise CheckpointFormatError(f"{path}: malformed storage view {view!r}")
        view_key, offset, count = view
        st = _Storage(key, stype.dtype, count, offset)
        views.append((st, view_key, offset, count))
        return st

    obj = _safe_load(f, source, persistent_load)
    keys = _safe_load(f, source)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise CheckpointFormatError(f"{path}: malformed legacy storage key list")
    pos = f.tell()
    for key in keys:
        if key not in storages:
            raise CheckpointFormatError(
                f"{path}: legacy storage {key!r} is not referenced by the object"
            )
        head = records.pread(pos, 8)
        if len(head) != 8:
            raise CheckpointFormatError(f"{path}: truncated before storage {key!r}")
        numel = struct.unpack("<q", head)[0]
        st = storages[key]
        if numel != st.numel:
            raise CheckpointFormatError(
                f"{path}: legacy storage {key!r} has {numel} elements, the object expects {st.numel}"
            )
        nbytes = numel * st.dtype.itemsize
        if pos + 8 + nbytes > records.size:
            raise CheckpointFormatError(
                f"{path}: storage {key!r} runs past the end of the file; it is truncated"
            )
        records.extents[key] = (pos + 8, nbytes)
        pos += 8 + nbytes
    for st, view_key, offset, count in views:
        if st.key not in records.extents or offset + count > storages[st.key].numel:
            raise CheckpointFormatError(
                f"{path}: storage view {view_key!r} lies outside storage {st.key!r}"
            )
    return obj


# --------------------------------------------------------------------------- public API


def _is_state_dict(obj) -> bool:
    return (
        isinstance(obj, Mapping)
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, TensorRef) for v in obj.values())
    )


_STATE_DICT_NAMES = tuple(
    "state_dict model_state_dict model ema ema_model module net params".split()
)


def find_state_dict(obj, key: str | tuple[str, ...] | None = None) -> Mapping[str, TensorRef]:
    """The state dict inside a checkpoint's object: `obj` itself when it is one, `obj[key]` (or a
    path of keys) when given, else the one nested mapping of tensors (preferring the usual names
    `state_dict`, `model_state_dict`, `model`, `ema`, ...)."""
    if key is not None:
        for part in (key,) if isinstance(key, str) else key:
            if not isinstance(obj, Mapping) or part not in obj:
                have = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
                raise KeyError(f"checkpoint has no entry {part!r} (it has {have})")
            obj = obj[part]
        if not _is_state_dict(obj):
            raise CheckpointFormatError(f"entry {key!r} is not a mapping from names to tensors")
        return obj
    if _is_state_dict(obj):
        return obj
    found: list[tuple[tuple, Mapping]] = []

    def walk(node, where):
        if _is_state_dict(node) and node:
            found.append((where, node))
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, where + (k,))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, where + (i,))

    walk(obj, ())
    preferred = [f for f in found if len(f[0]) == 1 and f[0][0] in _STATE_DICT_NAMES]
    for candidates in (found, preferred):
        if len(candidates) == 1:
            return candidates[0][1]
    where = [".".join(map(str, w)) for w, _ in found]
    raise CheckpointFormatError(
        f"cannot tell which state dict to use: found {where or 'none'}"
        + (
            "; pass key=... (a name or a tuple of names) to choose one"
            if found
            else " (a state dict is a mapping from str to tensors)"
        )
    )


class LazyStateDict(Mapping):
    """Read-only ordered mapping key -> np.ndarray over one open checkpoint; reads on access.

    Use as a context manager (or call `close()`). `refs` gives the unread `TensorRef`s, so shapes
    and dtypes are known before any data is read.
    """

    def __init__(self, records: _Records, refs: Mapping[str, TensorRef]):
        self._records = records
        self.refs: dict[str, TensorRef] = dict(refs)
        bad = []
        for name, ref in self.refs.items():
            _, hi = ref.span()
            if hi > ref.storage.base + ref.storage.numel:
                bad.append(
                    f"{name}: shape {ref.shape} stride {ref.stride} at offset {ref.offset} needs "
                    f"elements up to {hi} of storage {ref.storage.key!r}, which has "
                    f"{ref.storage.base + ref.storage.numel}"
                )
        if bad:
            raise CheckpointFormatError(
                f"{records.path}: tensors outside their storage (corrupt file):\n  "
                + "\n  ".join(bad)
            )

    @property
    def path(self) -> pathlib.Path:
        return self._records.path

    def __getitem__(self, key: str) -> np.ndarray:
        ref = self.refs[key]
        if ref.size == 0:
            return np.empty(ref.shape, ref.dtype)
        lo, hi = ref.span()
        dtype = ref.dtype.newbyteorder(">") if self._records.big_endian else ref.dtype
        flat = np.empty(hi - lo, dtype)
        itemsize = dtype.itemsize
        self._records.read_into(ref.storage.key, lo * itemsize, memoryview(flat.view(np.uint8)))
        if ref.is_contiguous():
            out = flat.reshape(ref.shape)
        else:  # a view with its own strides (e.g. a transposed or sliced tensor): gather, then own it
            strides = tuple(s * itemsize for s in ref.stride)
            out = np.lib.stride_tricks.as_strided(flat, ref.shape, strides).copy()
        return out.astype(ref.dtype, copy=False) if self._records.big_endian else out

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def close(self) -> None:
        self._records.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"LazyStateDict({str(self.path)!r}, {len(self)} tensors)"


def _load_object(path) -> tuple[_Records, Any]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    records = _Records(path)
    try:
        head = records.pread(0, 512)
        if head[:4] == b"PK\x03\x04" or zipfile.is_zipfile(path):
            obj = _open_zip(records)
        elif head[257:262] == b"ustar":
            raise CheckpointFormatError(
                f"{path}: tar-format torch checkpoint (PyTorch < 0.4) is not supported; "
                "re-save it with a newer torch"
            )
        elif head[:1] == b"\x80":
            obj = _open_legacy(records)
        else:
            raise CheckpointFormatError(
                f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)"
            )
    except BaseException:
        records.close()
        raise
    return records, obj


def open_pt(path, *, key=None) -> LazyStateDict:
    """Open a `.pt` checkpoint lazily: keys and shapes now, each tensor's data when accessed.

    `key` selects a nested state dict (`"ema"`, or `("checkpoint", "model")`); by default the
    state dict is found as `find_state_dict` describes.
    """
    records, obj = _load_object(path)
    try:
        refs = find_state_dict(obj, key)
        return LazyStateDict(records, refs)
    except BaseException as e:
        records.close()
        if isinstance(e, (CheckpointFormatError, KeyError)) and not str(e).startswith(
            str(records.path)
        ):
            raise type(e)(f"{records.path}: {e.args[0]}") from None
        raise


def read_pt(path, *, key=None) -> dict[str, np.ndarray]:
    """Read a `.pt` checkpoint's state dict eagerly: an ordered dict from PyTorch key to array."""
    with open_pt(path, key=key) as sd:
        return {k: sd[k] for k in sd}
