"""Read PyTorch `.pt` checkpoints without torch and without executing pickled code.

A `.pt` file is a pickle whose tensors point at raw storages kept beside it: in the zip format
(torch >= 1.6: `<top>/data.pkl` + `<top>/data/<key>` + `<top>/byteorder`) or the legacy format
(a stream of pickles: magic number, protocol, sys_info, the object, the storage keys, then each
storage as an 8-byte little-endian element count followed by its raw little-endian bytes).

Safety: the pickle is run by a small stack machine of this module, not by `pickle`. It builds only
plain values (None, bool, int, float, str, bytes, tuple, list, dict, OrderedDict) and frozen
stand-ins for these globals, never torch itself:
`collections.OrderedDict`, `torch.<Float|Half|BFloat16|Double|Int|Long|Short|Char|Byte|Bool>Storage`,
`torch.UntypedStorage`, `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`,
`torch._utils._rebuild_parameter_with_state`. Any other global raises `UnsafeCheckpointError`
naming it as `module.name` (Python-3 names); so do the opcodes that construct arbitrary objects
(INST, OBJ, NEWOBJ, ...) and any attempt to fill or BUILD something other than a dict or list the
pickle made itself, so no file can change a stand-in, let alone one a later file would share.
Tensor metadata is checked and frozen as plain ints when a tensor is rebuilt, and every view is
checked against its storage record again when its array is materialised.

Bounds: the work and memory a file may cost are bounded by `Limits` (pickle bytes, opcodes, memo
indices, nesting depth, objects visited by the state-dict search, zip directory size) and by the
storages the checkpoint declares: a tensor view never reads or allocates more than its storage.
Every refusal is a `CheckpointError` (a `ValueError`) whose message names the file and the entry.

Streaming: `open_pt` returns a lazy mapping whose keys come from the pickle; each tensor is read
from the file when it is accessed (only the bytes it spans, also for views into a large shared
storage), so a converter holds at most one tensor of the checkpoint at a time beyond its output.

dtypes: storages keep their dtype; bfloat16 comes back as `ml_dtypes.bfloat16` (exact, and
understood by JAX); cast with `.astype(np.float32)` where float32 is wanted.

Why one module of ~1200 lines: because it is the one place that parses untrusted bytes, and its
safety argument (the bounded pickle machine, the frozen stand-ins, the view checks) is easier to
review whole than spread over files.
"""

from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import dataclasses
import io
import math
import os
import pathlib
import pickle
import pickletools
import struct
import threading
import types
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = (
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointLimitError",
    "LazyStateDict",
    "Limits",
    "TensorRef",
    "UnsafeCheckpointError",
    "find_state_dict",
    "open_pt",
    "read_pt",
)


class CheckpointError(ValueError):
    """A refused file; the message names the file, the entry and, where there is one, the fix."""


class CheckpointFormatError(CheckpointError):
    """The file is not a readable PyTorch checkpoint (truncated, corrupt, unsupported layout)."""


class CheckpointLimitError(CheckpointError):
    """The file needs more work or memory than `Limits` allows."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The pickle asks for a global or an opcode outside the state-dict allow-list."""

    def __init__(self, message: str, global_name: str | None = None):
        super().__init__(message)
        self.global_name = global_name


def _located(error: CheckpointError, where: str) -> CheckpointError:
    """`error` with `where` (file, record, entry) put in front of its message."""
    error.args = (f"{where}: {error.args[0]}",) + error.args[1:]
    return error


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on what reading one checkpoint may cost. The defaults are far above what torch.save
    writes for the largest released models (a 2.2 GB 512x512 UNet: ~1000 tensors, ~45 opcodes,
    ~11 memo entries and ~190 pickle bytes per tensor, containers nested ~5 deep)."""

    max_pickle_bytes: int = 64 << 20  # each pickle: data.pkl, or each pickle of a legacy file
    max_opcodes: int = 2_000_000  # each pickle: room for ~40k tensors
    max_memo_index: int = 1_000_000  # pickle numbers its memo 0, 1, ...: room for ~90k tensors
    max_depth: int = 100  # containers nested in containers (and open MARKs)
    max_visited: int = 1_000_000  # containers the state-dict search looks at
    # zipfile makes a ~0.5 KB object per record before anything can be checked; torch writes
    # ~100 bytes of directory per record.
    max_zip_directory_bytes: int = 16 << 20
    # read_pt holds every tensor at once: their bytes may add up to this many times their storages'
    # (plus 1 MiB): tied weights read one storage twice, overlapping views could read it endlessly.
    max_view_reuse: int = 4


DEFAULT_LIMITS = Limits()
_MAX_NDIM = 64  # numpy's limit
_INT64_MAX = 2**63 - 1
_DEFLATE_MAX_RATIO = 1032  # deflate cannot inflate more than this: a larger claim is a lie


# --------------------------------------------------------------------------- allow-list


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _StorageType:
    """What `torch.FloatStorage` & co. unpickle to: only the dtype they stand for."""

    name: str
    dtype: np.dtype

    def __repr__(self):
        return f"torch.{self.name}"


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _Callable:
    """What an allowed callable global unpickles to: its name; REDUCE looks up the stand-in."""

    name: str


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _Storage:
    """One storage of the checkpoint: `numel` elements of `dtype` at element `base` of record `key`."""

    key: str
    dtype: np.dtype
    numel: int
    base: int = 0


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class TensorRef:
    """An unread tensor: `shape`, `dtype`, and element `offset` / `stride` in its storage."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    is_parameter: bool = False

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # exact: numpy's int64 product would wrap on hostile shapes

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


_STORAGE_TYPES = types.MappingProxyType(
    {
        name: _StorageType(name, np.dtype(dtype))
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
)
_DTYPES = frozenset(st.dtype for st in _STORAGE_TYPES.values())
_DICTS = (dict, collections.OrderedDict)
_CONTAINERS = (tuple, list, dict, collections.OrderedDict)


def _brief(value, nested: bool = False) -> str:
    """A short description of an untrusted value for a message: never a deep or huge repr."""
    kind = type(value)
    if kind is int and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit int>"  # repr of a huge int is slow, or refused by Python
    if kind in (str, bytes):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if kind is tuple and not nested and len(value) <= 8:
        items = ", ".join(_brief(v, True) for v in value)
        return f"({items},)" if len(value) == 1 else f"({items})"
    if kind in _CONTAINERS:
        return f"<{kind.__name__} of {len(value)}>"
    return repr(value)  # None, bool, float and the stand-ins: short by construction


def _cause(error: Exception) -> str:
    """An exception in a message, cut short: some quote the (up to 64 MiB) input they failed on."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 200 else text[:200] + "..."


def _plain_ints(value, what: str) -> tuple[int, ...]:
    if not (
        type(value) is tuple
        and len(value) <= _MAX_NDIM
        and all(type(v) is int and 0 <= v <= _INT64_MAX for v in value)
    ):
        raise CheckpointFormatError(
            f"_rebuild_tensor_v2: {what} must be a tuple of at most {_MAX_NDIM} non-negative "
            f"int64s, got {_brief(value)}"
        )
    return value


def _no_extras(value) -> bool:
    return value is None or (type(value) in _DICTS and not value)


def _rebuild_tensor_v2(args: tuple) -> TensorRef:
    """Stand-in for torch._utils._rebuild_tensor_v2: validates and records, reads nothing."""
    if len(args) not in (6, 7):
        raise CheckpointFormatError(
            f"_rebuild_tensor_v2: expected 6 or 7 arguments, got {len(args)}"
        )
    # requires_grad (args[4]) is an autograd flag: it does not matter for inference weights.
    storage, offset, size, stride, _, hooks, *metadata = args
    if type(storage) is not _Storage:
        raise CheckpointFormatError(
            f"_rebuild_tensor_v2: expected a storage, got {type(storage).__name__}"
        )
    if type(offset) is not int or not 0 <= offset <= _INT64_MAX:
        raise CheckpointFormatError(f"_rebuild_tensor_v2: bad storage offset {_brief(offset)}")
    size, stride = _plain_ints(size, "size"), _plain_ints(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointFormatError(
            f"_rebuild_tensor_v2: size {size} and stride {stride} differ in length"
        )
    if not (_no_extras(hooks) and all(map(_no_extras, metadata))):
        raise CheckpointFormatError(
            "_rebuild_tensor_v2: tensors with backward hooks or extra metadata are not plain weights; "
            "re-save the state dict with torch.save(model.state_dict(), path)"
        )
    return TensorRef(storage, storage.base + offset, size, stride)


def _rebuild_parameter(args: tuple) -> TensorRef:
    """Stand-in for torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its data."""
    # requires_grad, backward hooks and state are Python-side attributes of the Parameter: not weights.
    if len(args) not in (3, 4) or type(args[0]) is not TensorRef:
        raise CheckpointFormatError(
            "_rebuild_parameter: expected (tensor, requires_grad, hooks[, state]), got "
            f"{len(args)} arguments starting with {type(args[0]).__name__ if args else 'nothing'}"
        )
    return dataclasses.replace(args[0], is_parameter=True)


def _new_ordered_dict(args: tuple) -> collections.OrderedDict:
    if args:  # pickle writes OrderedDict() and then fills it with SETITEMS
        raise CheckpointFormatError("collections.OrderedDict: expected no arguments")
    return collections.OrderedDict()


_CALLABLES = types.MappingProxyType(
    {
        "collections.OrderedDict": _new_ordered_dict,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    }
)


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Map Python-2 names that protocol <= 2 writes (`__builtin__.exec`) to what Python 3 resolves."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _resolve_global(module: str, name: str):
    module, name = _python3_name(module, name)
    qualified = f"{module}.{name}"
    if module == "torch" and name in _STORAGE_TYPES:
        return _STORAGE_TYPES[name]
    if qualified in _CALLABLES:
        return _Callable(qualified)
    if len(qualified) > 200:  # a name is short; a long one only makes a huge message
        qualified = qualified[:200] + "..."
    raise UnsafeCheckpointError(
        f"refused the pickle global `{qualified}`: a PyTorch state dict needs only "
        f"tensors and plain containers, and resolving other globals can run arbitrary code. "
        f"If you trust this file, load it with torch.load(path, weights_only=False) and re-save "
        f"the tensors alone with torch.save(model.state_dict(), new_path).",
        global_name=qualified,
    )


# --------------------------------------------------------------------------- the pickle machine

# Opcodes that build objects without the allow-list's say-so, or pull in data from outside the
# stream; torch never writes them for a state dict.
_REFUSED_OPCODES = frozenset(
    "INST OBJ NEWOBJ NEWOBJ_EX EXT1 EXT2 EXT4 NEXT_BUFFER READONLY_BUFFER".split()
)
# Opcodes whose argument, as pickletools decodes it, is the value to push.
_LITERALS = frozenset(
    "INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT STRING UNICODE SHORT_BINUNICODE "
    "BINUNICODE BINUNICODE8 SHORT_BINBYTES BINBYTES BINBYTES8".split()
)
# Python-2 str, which pickletools decodes as latin-1; pickle.load(encoding="utf-8") reads UTF-8.
_PY2_STRINGS = frozenset({"SHORT_BINSTRING", "BINSTRING"})
_CONSTANTS = types.MappingProxyType({"NONE": None, "NEWTRUE": True, "NEWFALSE": False})
_EMPTY = types.MappingProxyType({"EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_TUPLE": tuple})


class _Unpickler:
    """Runs one pickle on a stack of plain values and frozen stand-ins (see the module docstring).

    Only dicts and lists that this pickle made may be filled; BUILD is accepted only on such a
    dict (torch sets `_metadata` on state dicts), and the attributes it would set are dropped.
    """

    def __init__(self, reader, source: str, persistent_load, limits: Limits):
        self._reader, self._source = reader, source
        self._persistent_load, self._limits = persistent_load, limits
        self._stack: list = []
        self._marks: list[int] = []  # stack heights at the open MARKs
        self._memo: dict[int, Any] = {}
        # id -> (container, depth) for containers that hold containers; holding the container
        # keeps its id from being reused by another one.
        self._depths: dict[int, tuple[Any, int]] = {}

    def load(self):
        ops = pickletools.genops(self._reader)
        pos = 0
        for count in range(1, self._limits.max_opcodes + 2):
            try:
                op, arg, pos = next(ops)
            except CheckpointError as e:  # the reader's limit
                raise _located(e, self._where(pos)) from None
            except Exception as e:  # pickletools raises ValueError & co. on garbage or truncation
                raise CheckpointFormatError(
                    f"{self._where(pos)}: corrupt or truncated pickle ({_cause(e)})"
                ) from None
            try:
                if count > self._limits.max_opcodes:
                    raise CheckpointLimitError(
                        f"more than {self._limits.max_opcodes} pickle opcodes "
                        "(Limits.max_opcodes); no state dict needs that many"
                    )
                if op.name == "STOP":
                    return self._pop()
                self._step(op.name, arg)
            except CheckpointError as e:
                raise _located(e, self._where(pos)) from None
            except Exception as e:  # e.g. UnicodeDecodeError, unhashable key: a malformed pickle
                raise CheckpointFormatError(
                    f"{self._where(pos)}: malformed pickle at {op.name} ({_cause(e)})"
                ) from None

    def _where(self, pos) -> str:
        entry = self._entry()
        return f"{self._source}, byte {pos}" + (f", entry {_brief(entry)}" if entry else "")

    def _entry(self) -> str | None:
        """The dict key whose value is being unpickled, when a dict's SETITEMS batch is open."""
        for height in reversed(self._marks):
            if height and type(self._stack[height - 1]) in _DICTS and len(self._stack) > height:
                key = self._stack[height + 2 * ((len(self._stack) - height - 1) // 2)]
                return key if type(key) is str else None
        return None

    # ---- stack

    def _floor(self) -> int:
        return self._marks[-1] if self._marks else 0

    def _top(self):
        if len(self._stack) <= self._floor():
            raise CheckpointFormatError("stack underflow: the pickle is corrupt")
        return self._stack[-1]

    def _pop(self):
        self._top()
        return self._stack.pop()

    def _pop_mark(self) -> list:
        if not self._marks:
            raise CheckpointFormatError("no MARK to pop to: the pickle is corrupt")
        height = self._marks.pop()
        items = self._stack[height:]
        del self._stack[height:]
        return items

    def _depth(self, value) -> int:
        if type(value) not in _CONTAINERS:
            return 0
        known = self._depths.get(id(value))
        return known[1] if known else 1

    def _nest(self, container, children) -> None:
        """Record that `container` now holds `children`; refuse nesting deeper than the limit."""
        depth = 1 + max(map(self._depth, children), default=0)
        if depth > self._depth(container):
            if depth > self._limits.max_depth:
                raise CheckpointLimitError(
                    f"containers nested more than {self._limits.max_depth} deep "
                    "(Limits.max_depth); a state dict nests about 5"
                )
            self._depths[id(container)] = (container, depth)

    def _memo_index(self, index) -> int:
        if not 0 <= index <= self._limits.max_memo_index:
            raise CheckpointLimitError(
                f"memo index {_brief(index)} outside 0..{self._limits.max_memo_index} "
                "(Limits.max_memo_index)"
            )
        return index

    def _fillable(self, types_, opcode: str):
        """The object below the operands, when this pickle made it as one of `types_`."""
        target = self._top()
        if type(target) not in types_:
            raise UnsafeCheckpointError(
                f"refused {opcode} on {_brief(target)}: only dicts and lists that the pickle "
                "built may be filled, never the stand-ins for tensors, storages or globals"
            )
        return target

    def _set_items(self, target, items: list) -> None:
        if len(items) % 2:
            raise CheckpointFormatError("SETITEMS with a key but no value: the pickle is corrupt")
        for key in items[::2]:
            # str/bytes hashes are salted; small ints hash to themselves: neither can be made to
            # collide en masse and turn filling a dict into quadratic work.
            if not (
                type(key) in (str, bytes, bool)
                or key is None
                or (type(key) is int and -(2**60) < key < 2**60)
            ):
                raise CheckpointFormatError(
                    f"dict key {_brief(key)}: a checkpoint's keys are strings or small ints"
                )
        self._nest(target, items[1::2])
        target.update(zip(items[::2], items[1::2]))

    # ---- opcodes

    def _step(self, name: str, arg) -> None:
        stack = self._stack
        if name in _LITERALS:
            stack.append(arg)
        elif name in _PY2_STRINGS:
            stack.append(arg.encode("latin-1").decode("utf-8"))
        elif name in _CONSTANTS:
            stack.append(_CONSTANTS[name])
        elif name in _EMPTY:
            stack.append(_EMPTY[name]())
        elif name == "MARK":
            if len(self._marks) >= self._limits.max_depth:
                raise CheckpointLimitError(
                    f"more than {self._limits.max_depth} nested MARKs (Limits.max_depth)"
                )
            self._marks.append(len(stack))
        elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "LIST"):
            if name in ("TUPLE", "LIST"):
                items = self._pop_mark()
            else:
                items = [self._pop() for _ in range(int(name[-1]))][::-1]
            value = list(items) if name == "LIST" else tuple(items)
            self._nest(value, items)
            stack.append(value)
        elif name == "DICT":
            items, value = self._pop_mark(), {}
            self._set_items(value, items)
            stack.append(value)
        elif name in ("APPEND", "APPENDS"):
            items = [self._pop()] if name == "APPEND" else self._pop_mark()
            target = self._fillable((list,), name)
            self._nest(target, items)
            target.extend(items)
        elif name in ("SETITEM", "SETITEMS"):
            items = [self._pop() for _ in range(2)][::-1] if name == "SETITEM" else self._pop_mark()
            self._set_items(self._fillable(_DICTS, name), items)
        elif name == "BUILD":
            state = self._pop()
            self._fillable(_DICTS, name)
            if not (state is None or type(state) is dict):
                raise UnsafeCheckpointError(f"refused BUILD with state {_brief(state)}")
            # Attributes of a dict (torch's `_metadata`: module versions) are not weights, and set
            # on the dict they could shadow its methods: dropped.
        elif name == "POP":
            if self._marks and len(stack) == self._marks[-1]:
                self._marks.pop()  # what pickle does: POP right after a MARK pops the mark
            else:
                self._pop()
        elif name == "POP_MARK":
            self._pop_mark()
        elif name == "DUP":
            stack.append(self._top())
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(self._memo) if name == "MEMOIZE" else arg
            self._memo[self._memo_index(index)] = self._top()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in self._memo:
                raise CheckpointFormatError(
                    f"memo entry {_brief(arg)} is read before it is written"
                )
            stack.append(self._memo[arg])
        elif name == "GLOBAL":
            stack.append(_resolve_global(*arg.split(" ", 1)))
        elif name == "STACK_GLOBAL":
            attr, module = self._pop(), self._pop()
            if type(module) is not str or type(attr) is not str:
                raise UnsafeCheckpointError(
                    "refused a STACK_GLOBAL whose module and name are not strings"
                )
            stack.append(_resolve_global(module, attr))
        elif name == "REDUCE":
            args, fn = self._pop(), self._pop()
            if type(fn) is not _Callable or type(args) is not tuple:
                raise UnsafeCheckpointError(
                    f"refused REDUCE of {_brief(fn)}: only the allowed rebuild functions may be "
                    "called, with a tuple of arguments"
                )
            stack.append(_CALLABLES[fn.name](args))
        elif name in ("PERSID", "BINPERSID"):
            stack.append(self._persistent_load(arg if name == "PERSID" else self._pop()))
        elif name == "PROTO":
            if not 2 <= arg <= pickle.HIGHEST_PROTOCOL:
                raise CheckpointFormatError(f"unsupported pickle protocol {arg}")
        elif name == "FRAME":
            pass  # framing only groups reads; the reader is bounded by Limits.max_pickle_bytes
        elif name in _REFUSED_OPCODES:
            named = ".".join(_python3_name(*arg.split(" ", 1))) if name == "INST" else None
            raise UnsafeCheckpointError(
                f"refused the pickle opcode {name}"
                + (f" (naming `{named}`)" if named else "")
                + ": a PyTorch state dict never contains it and it can construct arbitrary "
                "objects.",
                global_name=named,
            )
        else:
            raise CheckpointFormatError(
                f"unsupported pickle opcode {name}: a PyTorch state dict never contains it"
            )


class _LimitedReader:
    """The pickle at a file's position, as `pickletools` reads it, bounded by `limit` bytes."""

    def __init__(self, file, limit: int):
        self._file, self._limit = file, limit
        self._start = file.tell()

    def _refuse(self):
        raise CheckpointLimitError(
            f"the pickle runs past {self._limit} bytes (Limits.max_pickle_bytes): it is corrupt "
            "or far larger than a state dict's"
        )

    def read(self, n: int) -> bytes:
        if not 0 <= n <= self._limit - self.tell():
            self._refuse()
        return self._file.read(n)

    def readline(self) -> bytes:
        left = self._limit - self.tell()
        line = self._file.readline(left)
        if len(line) == left and not line.endswith(b"\n"):
            self._refuse()
        return line

    def tell(self) -> int:
        return self._file.tell() - self._start


def _load_pickle(reader, source: str, limits: Limits, persistent_load=None):
    """Run one pickle from `reader` (positioned at it; left just after its STOP)."""

    def refuse_persistent(pid):
        raise CheckpointFormatError(
            f"unexpected persistent id {_brief(pid)} outside the object pickle"
        )

    return _Unpickler(reader, source, persistent_load or refuse_persistent, limits).load()


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
        self.names: dict[str, str] = {}  # key -> record name, for messages
        self.big_endian = False

    def close(self):
        if self.zip is not None:
            self.zip.close()
        self._file.close()

    def nbytes(self, key: str) -> int | None:
        """Bytes of storage record `key`, or None when the file has no such record."""
        if key in self.extents:
            return self.extents[key][1]
        return self.compressed[key].file_size if key in self.compressed else None

    def record(self, key: str) -> str:
        return self.names.get(key, f"storage {key!r}")

    def end_record(self):
        """zipfile's own reading of the zip's end record (so both agree), or None."""
        with self._lock:
            return zipfile._EndRecData(self._file)

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

    def read_into(self, key: str, byte_start: int, out: memoryview, where: str) -> None:
        """Fill `out` with storage `key`'s bytes from `byte_start` on (`where` names the reader)."""
        if key in self.compressed:  # not written by torch; slow path through zipfile
            with _zip_errors(where, self.record(key)), self.zip.open(self.compressed[key]) as f:
                f.seek(byte_start)  # inflates and drops the bytes before, a chunk at a time
                data = f.read(len(out))
            out[: len(data)] = data
            got = len(data)
        else:
            got = self._read_at(self.extents[key][0] + byte_start, out)
        if got != len(out):
            raise CheckpointFormatError(
                f"{where}: {self.record(key)} ends early: the file is truncated"
            )


@contextlib.contextmanager
def _zip_errors(where, what: str):
    """zipfile's many exception types (BadZipFile, zlib.error, RuntimeError, ...) as one refusal."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointFormatError(
            f"{where}: cannot read {what} ({_cause(e)}); the file is truncated or "
            "corrupt: download it again"
        ) from e


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path, setting="") -> bytes:
    """A small zip member, refused before inflating when it claims to be larger than `limit`."""
    if info.file_size > limit:
        raise CheckpointLimitError(
            f"{path}: record {info.filename} holds {info.file_size} bytes, more than the "
            f"{limit} allowed" + (f" ({setting})" if setting else "")
        )
    with _zip_errors(path, info.filename), zf.open(info) as member:
        return member.read(limit)  # zipfile stops at the size the directory declares


def _open_zip(records: _Records, limits: Limits):
    path = records.path
    with _zip_errors(path, "the zip directory"):
        end = records.end_record()
    if end is not None and end[zipfile._ECD_SIZE] > limits.max_zip_directory_bytes:
        raise CheckpointLimitError(
            f"{path}: the zip directory has {end[zipfile._ECD_SIZE]} bytes, more than the "
            f"{limits.max_zip_directory_bytes} allowed (Limits.max_zip_directory_bytes)"
        )
    with _zip_errors(path, "the zip directory"):
        records.zip = zf = zipfile.ZipFile(path)
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise CheckpointFormatError(
            f"{path}: expected one '<folder>/data.pkl' record in a torch zip checkpoint, "
            f"found {pkls[:5] or 'none'}"
        )
    prefix = pkls[0][: -len("data.pkl")]
    if prefix + "byteorder" in names:
        order = _read_member(zf, zf.getinfo(prefix + "byteorder"), 16, path).strip()
        if order not in (b"little", b"big"):
            raise CheckpointFormatError(f"{path}: unknown byteorder {_brief(order)}")
        records.big_endian = order == b"big"
    data_prefix = prefix + "data/"
    for info in zf.infolist():
        if info.filename.startswith(data_prefix):
            _locate_member(records, info, info.filename[len(data_prefix) :])
    pickle_bytes = _read_member(
        zf, zf.getinfo(pkls[0]), limits.max_pickle_bytes, path, "Limits.max_pickle_bytes"
    )
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"unsupported persistent id {_brief(pid)}")
        _, stype, key, _location, numel = pid
        return _register_storage(storages, records, stype, key, numel)

    obj = _load_pickle(io.BytesIO(pickle_bytes), f"{path} ({pkls[0]})", limits, persistent_load)
    for st in storages.values():
        expected, actual = st.numel * st.dtype.itemsize, records.nbytes(st.key)
        if expected != actual:
            raise CheckpointFormatError(
                f"{path}: storage {st.key!r} should hold {st.numel} x {st.dtype} = {expected} "
                f"bytes but its record {records.record(st.key)} has {actual} bytes; the file is "
                "corrupt"
            )
    return obj


def _locate_member(records: _Records, info: zipfile.ZipInfo, key: str) -> None:
    """Note where storage record `key` lies: raw bytes of the file, or a deflated member."""
    path, name = records.path, info.filename
    records.names[key] = name
    if info.flag_bits & 1:
        raise CheckpointFormatError(f"{path}: record {name} is encrypted")
    if info.compress_type == zipfile.ZIP_DEFLATED:  # not written by torch, but a zip tool may
        if info.file_size > _DEFLATE_MAX_RATIO * max(info.compress_size, 1):
            raise CheckpointFormatError(
                f"{path}: record {name} claims {info.file_size} bytes from {info.compress_size} "
                f"deflated ones, more than deflate can give; the file is corrupt"
            )
        records.compressed[key] = info
        return
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise CheckpointFormatError(
            f"{path}: record {name} is compressed with method {info.compress_type}; "
            "re-save the checkpoint with torch.save (it stores records uncompressed)"
        )
    # Raw offset of a stored member: after its local header (30 bytes + name + extra field).
    header = records.pread(info.header_offset, 30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointFormatError(f"{path}: bad local header for {name}; the file is corrupt")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > records.size:
        raise CheckpointFormatError(
            f"{path}: record {name} runs past the end of the file; the file is truncated"
        )
    records.extents[key] = (start, info.file_size)


def _register_storage(storages, records, stype, key, numel, *, check_record=True):
    """The storage `key` of a persistent id, validated and shared between all its references."""
    if not (
        type(stype) is _StorageType
        and type(key) is str
        and len(key) <= 256
        and type(numel) is int
        and 0 <= numel <= _INT64_MAX // 8
    ):
        raise CheckpointFormatError(
            f"malformed storage reference {_brief(stype)}, {_brief(key)}, {_brief(numel)}"
        )
    if check_record and records.nbytes(key) is None:
        raise CheckpointFormatError(f"storage {key!r} is referenced but its data record is missing")
    known = storages.get(key)
    if known is None:
        storages[key] = known = _Storage(key, stype.dtype, numel)
    elif known.dtype != stype.dtype or known.numel != numel:
        raise CheckpointFormatError(
            f"storage {key!r} is referenced both as {known.numel} x {known.dtype} "
            f"and {numel} x {stype.dtype}"
        )
    return known


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _open_legacy(records: _Records, limits: Limits):
    # A buffered handle of its own: the pickles are parsed opcode by opcode.
    with open(records.path, "rb") as f:
        return _parse_legacy(records, f, limits)


def _parse_legacy(records: _Records, f, limits: Limits):
    path = records.path

    def load(what, persistent_load=None):
        source = f"{path} (legacy format, {what} pickle)"
        reader = _LimitedReader(f, limits.max_pickle_bytes)
        return _load_pickle(reader, source, limits, persistent_load)

    if load("magic number") != _LEGACY_MAGIC:
        raise CheckpointFormatError(
            f"{path}: neither a torch zip archive nor a legacy torch file (its first pickle is not "
            f"torch's magic number); diffjax reads only files written by torch.save"
        )
    protocol = load("protocol")
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointFormatError(
            f"{path}: unsupported legacy protocol version {_brief(protocol)}"
        )
    load("sys_info")  # storages are little-endian whatever the writer's host was
    storages: dict[str, _Storage] = {}
    views: list[tuple[_Storage, str]] = []

    def persistent_load(pid):
        if not (type(pid) is tuple and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointFormatError(f"unsupported persistent id {_brief(pid)}")
        _, stype, key, _location, numel, view = pid
        # Records are located after the object pickle: checked there.
        root = _register_storage(storages, records, stype, key, numel, check_record=False)
        if view is None:
            return root
        # Pre-1.0 storage views: (view key, element offset, element count) into the root storage.
        if not (
            type(view) is tuple
            and len(view) == 3
            and all(type(v) is int and 0 <= v <= _INT64_MAX for v in view[1:])
        ):
            raise CheckpointFormatError(f"malformed storage view {_brief(view)}")
        view_key, offset, count = view
        st = _Storage(key, root.dtype, count, offset)
        views.append((st, view_key))
        return st

    obj = load("object", persistent_load)
    keys = load("storage keys")
    if not (type(keys) is list and all(type(k) is str for k in keys)):
        raise CheckpointFormatError(f"{path}: malformed legacy storage key list")
    pos = f.tell()
    for key in keys:
        if key not in storages or key in records.extents:
            raise CheckpointFormatError(
                f"{path}: legacy storage {key!r} is listed twice or not referenced by the object"
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
    missing = [key for key in storages if key not in records.extents]
    if missing:
        raise CheckpointFormatError(
            f"{path}: storages {missing[:5]} are referenced but not stored; the file is corrupt"
        )
    for st, view_key in views:
        if st.base + st.numel > storages[st.key].numel:
            raise CheckpointFormatError(
                f"{path}: storage view {_brief(view_key)} lies outside storage {st.key!r}"
            )
    return obj


# --------------------------------------------------------------------------- views


def _view_span(ref: TensorRef, records: _Records) -> tuple[int, int]:
    """The element range [lo, hi) of its storage record that `ref` reads, once checked that it
    lies within its storage and record, reads no more elements than the storage holds, and has
    plain non-negative int64 metadata and a known dtype."""
    if type(ref) is not TensorRef or type(ref.storage) is not _Storage:
        raise CheckpointFormatError(f"{type(ref).__name__} is not a tensor of a checkpoint")
    st = ref.storage
    if st.dtype not in _DTYPES:
        raise CheckpointFormatError(f"unknown dtype {st.dtype!r}")
    record_bytes = records.nbytes(st.key)
    if record_bytes is None:
        raise CheckpointFormatError(f"storage {st.key!r} has no data record in this file")
    shape, stride, itemsize = ref.shape, ref.stride, st.dtype.itemsize
    if not (
        type(shape) is tuple
        and type(stride) is tuple
        and len(shape) == len(stride) <= _MAX_NDIM
        and all(
            type(v) is int and 0 <= v <= _INT64_MAX
            for v in (ref.offset, st.base, st.numel, *shape, *stride)
        )
    ):
        raise CheckpointFormatError(
            f"malformed metadata: offset {_brief(ref.offset)}, shape {_brief(shape)}, "
            f"stride {_brief(stride)}"
        )
    if 0 in shape:  # reads nothing; numpy still refuses shapes whose other dims overflow
        if math.prod(max(n, 1) for n in shape) * itemsize > _INT64_MAX:
            raise CheckpointFormatError(f"shape {shape} is too large")
        return ref.offset, ref.offset
    last = ref.offset + sum((n - 1) * s for n, s in zip(shape, stride))
    end = min(st.base + st.numel, record_bytes // itemsize)  # the storage, within its record
    if ref.offset < st.base or last >= end:
        raise CheckpointFormatError(
            f"shape {shape} stride {stride} at offset {ref.offset} needs elements up to "
            f"{last + 1} of storage {st.key!r}, which has {end}"
        )
    if math.prod(shape) > st.numel:
        raise CheckpointFormatError(
            f"shape {shape} stride {stride} has {math.prod(shape)} elements, more than the "
            f"{st.numel} of its storage {st.key!r} (overlapping strides, as expand() makes); "
            "re-save it with tensor.contiguous() so that it cannot cost more memory than the file"
        )
    return ref.offset, last + 1


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


def _state_dicts(obj, limits: Limits) -> list[tuple[tuple, Mapping]]:
    """(path of keys, mapping) of every non-empty state dict in `obj`, depth first, each object
    looked at once (a shared or self-referencing container costs nothing more)."""
    found, seen = [], set()
    # An explicit stack (deep nesting cannot exhaust Python's) of (node, depth, path), the path
    # as (key, parent's path) links: O(1) memory per entry however deep.
    todo: list[tuple[Any, int, tuple | None]] = [(obj, 0, None)]
    while todo:
        node, depth, path = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > limits.max_visited or depth > limits.max_depth:
            raise CheckpointLimitError(
                f"the checkpoint's object has more than {limits.max_visited} containers or nests "
                f"them more than {limits.max_depth} deep (Limits.max_visited, Limits.max_depth); "
                "pass key=... to name the state dict"
            )
        if _is_state_dict(node) and node:
            keys = []
            while path is not None:
                key, path = path
                keys.append(key)
            found.append((tuple(reversed(keys)), node))
        elif isinstance(node, (Mapping, list, tuple)):
            children = list(node.items() if isinstance(node, Mapping) else enumerate(node))
            todo.extend(
                (v, depth + 1, (k, path))
                for k, v in reversed(children)
                if isinstance(v, (Mapping, list, tuple))
            )
    return found


def find_state_dict(
    obj, key: str | tuple[str, ...] | None = None, *, limits: Limits = DEFAULT_LIMITS
) -> Mapping[str, TensorRef]:
    """The state dict inside a checkpoint's object: `obj` itself when it is one, `obj[key]` (or a
    path of keys) when given, else the one nested mapping of tensors (preferring the usual names
    `state_dict`, `model_state_dict`, `model`, `ema`, ...)."""
    if key is not None:
        for part in (key,) if isinstance(key, str) else key:
            if not isinstance(obj, Mapping) or part not in obj:
                have = list(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
                raise KeyError(f"checkpoint has no entry {part!r} (it has {have})")
            obj = obj[part]
        if not _is_state_dict(obj):
            raise CheckpointFormatError(f"entry {key!r} is not a mapping from names to tensors")
        return obj
    if _is_state_dict(obj):
        return obj
    found = _state_dicts(obj, limits)
    preferred = [f for f in found if len(f[0]) == 1 and f[0][0] in _STATE_DICT_NAMES]
    for candidates in (found, preferred):
        if len(candidates) == 1:
            return candidates[0][1]
    where = [".".join(map(str, w)) for w, _ in found[:20]]
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
            try:
                _view_span(ref, records)
            except CheckpointFormatError as e:
                bad.append(f"{name}: {e}")
        if bad:
            raise CheckpointFormatError(
                f"{records.path}: tensors outside their storage (corrupt file):\n  "
                + "\n  ".join(bad[:20])
                + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
            )

    @property
    def path(self) -> pathlib.Path:
        return self._records.path

    def __getitem__(self, key: str) -> np.ndarray:
        ref = self.refs[key]
        # Checked again here, where memory is allocated and bytes are read: `refs` is a plain
        # dict that callers can change.
        where = f"{self.path}: {key}"
        try:
            lo, hi = _view_span(ref, self._records)
        except CheckpointFormatError as e:
            raise _located(e, where) from None
        if hi == lo:
            return np.empty(ref.shape, ref.dtype)
        dtype = ref.dtype.newbyteorder(">") if self._records.big_endian else ref.dtype
        flat = np.empty(hi - lo, dtype)
        itemsize = dtype.itemsize
        out = memoryview(flat.view(np.uint8))
        self._records.read_into(ref.storage.key, lo * itemsize, out, where)
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


def _load_object(path, limits: Limits) -> tuple[_Records, Any]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    records = _Records(path)
    try:
        head = records.pread(0, 512)
        if head[:4] == b"PK\x03\x04" or zipfile.is_zipfile(path):
            obj = _open_zip(records, limits)
        elif head[257:262] == b"ustar":
            raise CheckpointFormatError(
                f"{path}: tar-format torch checkpoint (PyTorch < 0.4) is not supported; "
                "re-save it with a newer torch"
            )
        elif head[:1] == b"\x80":
            obj = _open_legacy(records, limits)
        else:
            raise CheckpointFormatError(
                f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)"
            )
    except BaseException:
        records.close()
        raise
    return records, obj


def open_pt(path, *, key=None, limits: Limits = DEFAULT_LIMITS) -> LazyStateDict:
    """Open a `.pt` checkpoint lazily: keys and shapes now, each tensor's data when accessed.

    `key` selects a nested state dict (`"ema"`, or `("checkpoint", "model")`); by default the
    state dict is found as `find_state_dict` describes.
    """
    records, obj = _load_object(path, limits)
    try:
        return LazyStateDict(records, find_state_dict(obj, key, limits=limits))
    except BaseException as e:
        records.close()
        if isinstance(e, (CheckpointError, KeyError)) and not str(e.args[0]).startswith(
            str(records.path)
        ):
            raise _located(e, str(records.path)) from None
        raise


def read_pt(path, *, key=None, limits: Limits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """Read a `.pt` checkpoint's state dict eagerly: an ordered dict from PyTorch key to array."""
    with open_pt(path, key=key, limits=limits) as sd:
        wanted = sum(ref.nbytes for ref in sd.refs.values())
        stored = sum(
            sd._records.nbytes(k) for k in {ref.storage.key for ref in sd.refs.values()}
        )
        if wanted > limits.max_view_reuse * stored + (1 << 20):
            raise CheckpointLimitError(
                f"{sd.path}: its tensors add up to {wanted} bytes, more than "
                f"{limits.max_view_reuse} times the {stored} bytes of their storages "
                "(Limits.max_view_reuse: views that overlap); read them one at a time with open_pt"
            )
        return {k: sd[k] for k in sd}
