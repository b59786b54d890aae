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
from runner.errors import FormatError
from runner.formats.base import Entry, FileLayout, MappedFile, TensorInfo

SUFFIX = ".safetensors"
# The safetensors library's own limits: header bytes (MAX_HEADER_SIZE) and the JSON
# nesting its parser (serde_json) accepts. A header is read as that library reads it.
_MAX_HEADER = 100_000_000
_MAX_DEPTH = 127
_INFO_KEYS = ("dtype", "shape", "data_offsets")
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Spec(NamedTuple):
    """One tensor's header entry as parsed: kept compact, since a header may hold
    millions (extra keys the library ignores are kept only to check their nesting)."""

    dtype: Any
    shape: Any
    offsets: Any
    extra: dict | None


class _Refused(ValueError):
    """JSON the safetensors library's parser refuses though Python's accepts it."""


def _object(pairs: list[tuple[str, Any]]) -> Any:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"{dup!r} appears twice")
    if isinstance(d.get("dtype"), str) and "shape" in d and "data_offsets" in d:
        extra = {k: v for k, v in d.items() if k not in _INFO_KEYS}
        return _Spec(d["dtype"], d["shape"], d["data_offsets"], extra or None)
    return d


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
        elif isinstance(v, (dict, list, _Spec)):
            if d > _MAX_DEPTH:
                raise _Refused(f"{what} is nested deeper than {_MAX_DEPTH} levels")
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else list(v)
            stack += [(x, d + 1) for x in items]


def _parse(raw: bytes) -> dict:
    """The header JSON, refusing what the library's parser refuses: not UTF-8, NaN,
    duplicate keys, lone surrogates, deep nesting."""
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_object, parse_constant=_constant, parse_int=_int)
    if not isinstance(header, dict):
        raise _Refused("not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Refused("__metadata__ must map names to strings")
    _check_strings_and_depth(meta, 2, "__metadata__")
    for name, spec in header.items():
        if isinstance(spec, _Spec) and spec.extra:
            _check_strings_and_depth(spec.extra, 2, f"the entry of tensor {name!r}")  # the entry object is level 2
    header["__metadata__"] = meta
    return header


def read_header(path: Path) -> tuple[int, dict[str, TensorInfo], dict[str, tuple[int, int]], dict]:
    """Parse and check a file's header: (data start, tensors, byte ranges, metadata).
    Refuses every header the safetensors library refuses; memory is a small multiple
    of the header's bytes on disk."""
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
        header = _parse(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, absurd nesting
        raise FormatError(f"{path}: corrupt safetensors header JSON ({e})") from None
    del raw
    meta = header.pop("__metadata__")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    ranges: dict[str, tuple[int, int]] = {}
    infos: dict[tuple, TensorInfo] = {}  # one object per (dtype, shape): a header may hold millions of tensors
    for name, spec in header.items():
        if _SURROGATE.search(name):
            raise FormatError(f"{path}: tensor name {ascii(name)[:80]} holds a lone surrogate; header corrupt")
        if not isinstance(spec, _Spec) or not _uints(spec.shape) or not _uints(spec.offsets) or len(spec.offsets) != 2:
            raise FormatError(f"{path}: corrupt header entry for tensor {name!r}")
        if spec.dtype not in dtypes.ITEMSIZE or spec.dtype == dtypes.STRING:
            raise FormatError(f"{path}: tensor {name!r} has unknown dtype {spec.dtype!r}")
        key = (spec.dtype, *spec.shape)
        info = infos.get(key) or infos.setdefault(key, TensorInfo(spec.dtype, tuple(spec.shape)))
        begin, end = spec.offsets
        if math.prod(d for d in info.shape if d) * dtypes.itemsize(info.dtype) >= 1 << 63:  # numpy's limit, even when empty
            raise FormatError(f"{path}: tensor {name!r} has an impossible shape {list(info.shape)}; header corrupt")
        if not 0 <= begin <= end <= data_len:
            raise FormatError(f"{path}: tensor {name!r} bytes [{begin}, {end}) lie outside the data ({data_len} bytes); file truncated or header corrupt")
        if end - begin != info.numel * dtypes.itemsize(info.dtype):
            raise FormatError(f"{path}: tensor {name!r} has {end - begin} bytes but shape {list(info.shape)} {info.dtype} needs {info.numel * dtypes.itemsize(info.dtype)}")
        tensors[name] = info
        ranges[name] = (begin, end)
    del header
    _check_coverage(path, ranges, data_len)
    return data_start, tensors, ranges, meta


def _uints(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)


def _check_coverage(path: Path, ranges: dict[str, tuple[int, int]], data_len: int) -> None:
    """Tensors tile the data exactly, in offset order, as the library requires: no gap,
    no overlap, no trailing bytes."""
    pos, prev = 0, None
    for (begin, end), name in sorted((r, k) for k, r in ranges.items()):
        if begin < pos:
            raise FormatError(f"{path}: tensors {prev!r} and {name!r} overlap in the file; header corrupt")
        if begin > pos:
            raise FormatError(f"{path}: {begin - pos} bytes before tensor {name!r} belong to no tensor; header corrupt")
        pos, prev = end, name
    if pos != data_len:
        raise FormatError(f"{path}: the last {data_len - pos} bytes belong to no tensor; file corrupt or not safetensors")


class SafetensorsReader(MappedFile):
    def __init__(self, path: Path):
        self._start, self._tensors, self._ranges, self.metadata = read_header(Path(path))
        super().__init__(path)

    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def array(self, name: str) -> np.ndarray:
        info = self._tensors[name]
        begin, _ = self._ranges[name]
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
