"""safetensors: header-only metadata, zero-copy mmap reads, and output framing
computed up front. Format: u64 little-endian header length, JSON header, raw data."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from runner import dtypes
from runner.errors import FormatError, cause, clipped
from runner.formats.base import Entry, FileLayout, MappedFile, TensorInfo

SUFFIX = ".safetensors"
# The safetensors library's own limits: header bytes (MAX_HEADER_SIZE) and the JSON
# nesting its parser (serde_json) accepts. A header is read as that library reads it.
_MAX_HEADER = 100_000_000
_MAX_DEPTH = 127
_INFO_KEYS = ("dtype", "shape", "data_offsets")
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Spec(NamedTuple):
    """A tensor's header entry as parsed, when it is not a plain valid one (extra keys
    the library ignores are kept only to check their nesting; the rest is checked, and
    refused naming the tensor, once its name is known)."""

    dtype: Any
    shape: Any
    offsets: Any
    extra: dict | None


class _Entry(NamedTuple):
    """A valid tensor entry, kept compact since a header may hold millions: its shared
    TensorInfo and its byte range in the data."""

    info: TensorInfo
    begin: int
    end: int


class _Refused(ValueError):
    """JSON the safetensors library's parser refuses though Python's accepts it."""


def _object_hook(shared: dict[TensorInfo, TensorInfo]):
    """json's object_pairs_hook: refuses duplicate keys and turns each tensor entry into
    an _Entry (one TensorInfo per dtype and shape, from `shared`) as soon as it is parsed,
    so the parsed header costs about what its text does."""

    def hook(pairs: list[tuple[str, Any]]) -> Any:
        d = dict(pairs)
        if len(d) != len(pairs):
            seen: set[str] = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise _Refused(f"{clipped(dup)!r} appears twice")
        if not (isinstance(d.get("dtype"), str) and "shape" in d and "data_offsets" in d):
            return d
        extra = {k: v for k, v in d.items() if k not in _INFO_KEYS}
        spec = _Spec(d["dtype"], d["shape"], d["data_offsets"], extra or None)
        return spec if extra or _problem(spec) else _entry(spec, shared)

    return hook


def _problem(spec: _Spec) -> str | None:
    """Why a tensor entry is not valid on its own (its range inside the data is checked later)."""
    if not _uints(spec.shape) or not _uints(spec.offsets) or len(spec.offsets) != 2:
        return "corrupt"
    if spec.dtype not in dtypes.ITEMSIZE or spec.dtype == dtypes.STRING:
        return "dtype"
    if math.prod(d for d in spec.shape if d) * dtypes.itemsize(spec.dtype) >= 1 << 63:  # numpy's limit, even when empty
        return "shape"
    if spec.offsets[1] - spec.offsets[0] != math.prod(spec.shape) * dtypes.itemsize(spec.dtype):
        return "size"
    return None


def _entry(spec: _Spec, shared: dict[TensorInfo, TensorInfo]) -> _Entry:
    info = TensorInfo(spec.dtype, tuple(spec.shape))
    return _Entry(shared.setdefault(info, info), *spec.offsets)


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _int(text: str) -> int | float:
    return -0.0 if text == "-0" else int(text)  # the library's parser reads -0 as a float


def _check_strings_and_depth(value: Any, depth: int, what: str) -> None:
    """Refuse a lone surrogate in any string, or nesting past the library's limit
    (iteratively: the value may be deep)."""
    stack = [(value, depth)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise _Refused(f"{what} holds a lone surrogate ({ascii(v)[:60]})")
        elif isinstance(v, (dict, list, _Spec, _Entry)):
            if d > _MAX_DEPTH:
                raise _Refused(f"{what} is nested deeper than {_MAX_DEPTH} levels")
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else list(v)
            stack += [(x, d + 1) for x in items]
        elif isinstance(v, TensorInfo) and d > _MAX_DEPTH:  # stands for an _Entry's shape and offsets lists
            raise _Refused(f"{what} is nested deeper than {_MAX_DEPTH} levels")


def _parse(text: str) -> dict:
    """The header JSON, refusing what the library's parser refuses: NaN, duplicate keys,
    lone surrogates, deep nesting."""
    shared: dict[TensorInfo, TensorInfo] = {}
    header = json.loads(text, object_pairs_hook=_object_hook(shared), parse_constant=_constant, parse_int=_int)
    if not isinstance(header, dict):
        raise _Refused("not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Refused("__metadata__ must map names to strings")
    _check_strings_and_depth(meta, 2, "__metadata__")
    for name, spec in header.items():
        if isinstance(spec, _Spec):
            if spec.extra:
                _check_strings_and_depth(spec.extra, 2, f"the entry of tensor {name!r}")  # the entry object is level 2
            if not _problem(spec):
                header[name] = _entry(spec, shared)
    header["__metadata__"] = meta
    return header


def read_header(path: Path) -> tuple[int, dict[str, TensorInfo], dict[str, _Entry], dict]:
    """Parse and check a file's header: (data start, tensors, entries with their byte
    ranges, metadata). Refuses every header the safetensors library refuses; memory is a
    small multiple of the header's bytes on disk (the text, then compact entries)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise FormatError(f"{path}: header length {n} does not fit in the file ({size} bytes) or the "
                                  f"safetensors limit ({_MAX_HEADER}); truncated or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
        del raw  # not held while the text is parsed
        header = _parse(text)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, absurd nesting
        raise FormatError(f"{path}: corrupt safetensors header JSON ({e if isinstance(e, _Refused) else cause(e)})") from None
    del text
    meta = header.pop("__metadata__")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if _SURROGATE.search(name):
            raise FormatError(f"{path}: tensor name {ascii(name)[:80]} holds a lone surrogate; header corrupt")
        if not isinstance(entry, _Entry):
            _refuse(path, name, entry, data_len)
        _check_inside(path, name, entry.begin, entry.end, data_len)
        tensors[name] = entry.info
    _check_coverage(path, header, data_len)
    return data_start, tensors, header, meta


def _refuse(path: Path, name: str, spec: Any, data_len: int) -> None:
    """Raise the error for a tensor entry that is not valid."""
    problem = _problem(spec) if isinstance(spec, _Spec) else "corrupt"
    if problem == "corrupt":
        raise FormatError(f"{path}: corrupt header entry for tensor {name!r}")
    if problem == "dtype":
        raise FormatError(f"{path}: tensor {name!r} has unknown dtype {spec.dtype!r}")
    if problem == "shape":
        raise FormatError(f"{path}: tensor {name!r} has an impossible shape {list(spec.shape)}; header corrupt")
    begin, end = spec.offsets
    _check_inside(path, name, begin, end, data_len)
    need = math.prod(spec.shape) * dtypes.itemsize(spec.dtype)
    raise FormatError(f"{path}: tensor {name!r} has {end - begin} bytes but shape {list(spec.shape)} {spec.dtype} needs {need}")


def _check_inside(path: Path, name: str, begin: int, end: int, data_len: int) -> None:
    if not 0 <= begin <= end <= data_len:
        raise FormatError(f"{path}: tensor {name!r} bytes [{begin}, {end}) lie outside the data ({data_len} bytes); file truncated or header corrupt")


def _uints(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)


def _check_coverage(path: Path, entries: dict[str, _Entry], data_len: int) -> None:
    """Tensors tile the data exactly, in offset order, as the library requires: no gap,
    no overlap, no trailing bytes. Checked on arrays (a header may hold millions of
    tensors); a fault is then named in (offset, name) order."""
    n = len(entries)
    if n:
        begins = np.fromiter((e.begin for e in entries.values()), np.uint64, n)
        ends = np.fromiter((e.end for e in entries.values()), np.uint64, n)
        order = np.lexsort((ends, begins))
        begins, ends = begins[order], ends[order]
        tiled = begins[0] == 0 and np.array_equal(begins[1:], ends[:-1]) and ends[-1] == data_len
    else:
        tiled = data_len == 0
    if tiled:
        return
    pos, prev = 0, None
    for (begin, end), name in sorted(((e.begin, e.end), k) for k, e in entries.items()):
        if begin < pos:
            raise FormatError(f"{path}: tensors {prev!r} and {name!r} overlap in the file; header corrupt")
        if begin > pos:
            raise FormatError(f"{path}: {begin - pos} bytes before tensor {name!r} belong to no tensor; header corrupt")
        pos, prev = end, name
    raise FormatError(f"{path}: the last {data_len - pos} bytes belong to no tensor; file corrupt or not safetensors")


class SafetensorsReader(MappedFile):
    def __init__(self, path: Path):
        self._start, self._tensors, self._entries, self.metadata = read_header(Path(path))
        super().__init__(path)

    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def array(self, name: str) -> np.ndarray:
        info, begin, _ = self._entries[name]
        dt = dtypes.bits_dtype(info.dtype)
        if info.numel == 0:
            return np.empty(info.shape, dt)
        return np.ndarray(info.shape, dt, buffer=self._mm, offset=self._start + begin)



def layout(entries: list[Entry], metadata: dict[str, str] | None = None) -> FileLayout:
    """Header and offsets for a safetensors file holding `entries` in the given order."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets: dict[str, int] = {}
    pos = 0
    for e in entries:
        if e.dtype == dtypes.STRING:
            raise FormatError(f"{e.name} is a MindSpore string entry, which safetensors cannot hold; use output_format: ckpt")
        n = dtypes.itemsize(e.dtype)
        for d in e.shape:
            n *= d
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + n]}
        offsets[e.name] = pos
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    start = 8 + len(raw)
    return FileLayout(
        pieces=((0, struct.pack("<Q", len(raw)) + raw),),
        offsets={k: start + v for k, v in offsets.items()},
        size=start + pos,
    )


class SafetensorsFormat:
    suffix = SUFFIX

    def open(self, path: Path) -> SafetensorsReader:
        return SafetensorsReader(path)

    def layout(self, entries: list[Entry]) -> FileLayout:
        return layout(entries)
