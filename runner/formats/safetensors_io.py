"""safetensors: header-only metadata, zero-copy mmap reads, and output framing
computed up front. Format: u64 little-endian header length, JSON header, raw data."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from runner import dtypes
from runner.errors import FormatError
from runner.formats.base import Entry, FileLayout, MappedFile, TensorInfo

SUFFIX = ".safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def read_header(path: Path) -> tuple[int, dict[str, TensorInfo], dict[str, tuple[int, int]], dict]:
    """Parse and check a file's header: (data start, tensors, byte ranges, metadata)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise FormatError(f"{path}: header length {n} does not fit in the file ({size} bytes); truncated or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a 5000-digit number, absurd nesting
        raise FormatError(f"{path}: corrupt safetensors header JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for name, spec in header.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(begin, int) and isinstance(end, int)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise FormatError(f"{path}: corrupt header entry for tensor {name!r}")
        if not isinstance(dtype, str) or dtype not in dtypes.ITEMSIZE:
            raise FormatError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        info = TensorInfo(dtype, shape)
        if math.prod(d for d in shape if d) * dtypes.itemsize(dtype) >= 1 << 63:  # numpy's limit, even when empty
            raise FormatError(f"{path}: tensor {name!r} has an impossible shape {list(shape)}; header corrupt")
        if not 0 <= begin <= end <= data_len:
            raise FormatError(f"{path}: tensor {name!r} bytes [{begin}, {end}) lie outside the data ({data_len} bytes); file truncated or header corrupt")
        if end - begin != info.numel * dtypes.itemsize(dtype):
            raise FormatError(f"{path}: tensor {name!r} has {end - begin} bytes but shape {list(shape)} {dtype} needs {info.numel * dtypes.itemsize(dtype)}")
        tensors[name] = info
        ranges[name] = (begin, end)
    spans = sorted((b, e, k) for k, (b, e) in ranges.items() if e > b)
    for (b0, e0, k0), (b1, _e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"{path}: tensors {k0!r} and {k1!r} overlap in the file; header corrupt")
    return data_start, tensors, ranges, meta


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
