"""torch.save's zip archive, written deterministically (torch_dist output, SPEC 6): the
same bytes for the same content on every run and on every MPI rank, and its size known
before it is written, so a torch_dist folder's `.metadata` follows from the plan alone.
(torch.save stamps every archive with a random serialization id.)

An archive holds `archive/data.pkl` (the object pickled at protocol 2, a tensor as torch
pickles one: `torch._utils._rebuild_tensor_v2` over a persistent storage reference),
`archive/byteorder`, `archive/data/0` (a tensor's bytes) and `archive/version`, each
stored uncompressed and starting at a multiple of 64 bytes as torch aligns them, with
ZIP64 records where a size or offset needs them."""

from __future__ import annotations

import io
import math
import pickle  # torch.load reads a pickle: the checkpoint's own objects go in it; the runner's records stay JSON
import struct
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np

from runner import dtypes

ALIGN = 64
LIMIT = 0xFFFFFFFF  # sizes and offsets at or above it need ZIP64 fields
_MARK = 0xFFFFFFFF  # a 32-bit field whose value is in the ZIP64 fields
_PREFIX = "archive/"
_DATE = 0x21  # 1980-01-01, the earliest a zip records: no clock in the bytes
_PAD_ID = 0x4246  # "FB", the extra field torch pads with


class _Storage:
    def __init__(self, pid: tuple):
        self.pid = pid


class _Tensor:
    """Pickles as torch pickles a contiguous tensor that owns its storage."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        import torch._utils

        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, _Storage) else None


def _pickled(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _tensor_pickle(dtype: str, shape: tuple[int, ...]) -> bytes:
    import torch

    storage = getattr(torch, torch.storage._dtype_to_storage_type_map()[dtypes.torch_dtype(dtype)])
    return _pickled(_Tensor(_Storage(("storage", storage, "0", "cpu", math.prod(shape))), tuple(shape)))


class _Count:
    """A sink that only counts: the size of an archive without its payloads."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, b) -> None:
        self.n += b if isinstance(b, int) else len(b)


def _zip(out, records: list[tuple[str, Any]]) -> int:
    """Write `records` ((name, bytes-like payload, or an int: that many bytes when only
    counting) as a stored zip; the bytes written."""
    pos, central = 0, []
    for name, payload in records:
        raw = (_PREFIX + name).encode()
        size = payload if isinstance(payload, int) else len(payload)
        crc = 0 if isinstance(payload, int) else zlib.crc32(payload)
        big = size >= LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if big else b""
        pad = -(pos + 30 + len(raw) + len(extra) + 4) % ALIGN
        extra += struct.pack("<HH", _PAD_ID, pad) + b"Z" * pad
        small = _MARK if big else size
        header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if big else 20, 0, 0, 0, _DATE, crc, small, small,
                             len(raw), len(extra)) + raw + extra
        out.write(header)
        out.write(payload)
        central.append((raw, size, crc, pos))
        pos += len(header) + size
    start = pos
    for raw, size, crc, offset in central:
        wide = [v for v in (size, size, offset) if v >= LIMIT] if size >= LIMIT or offset >= LIMIT else []
        extra = struct.pack("<HH", 1, 8 * len(wide)) + b"".join(struct.pack("<Q", v) for v in wide) if wide else b""
        version = 45 if wide else 20
        entry = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, 0, 0, 0, _DATE, crc,
                            _narrow(size), _narrow(size), len(raw), len(extra), 0, 0, 0, 0, _narrow(offset)) + raw + extra
        out.write(entry)
        pos += len(entry)
    n, length = len(central), pos - start
    if start >= LIMIT or length >= LIMIT:
        out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, length, start))
        out.write(struct.pack("<IIQI", 0x07064B50, 0, pos, 1))
        pos += 56 + 20
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, _narrow(length), _narrow(start), 0))
    return pos + 22


def _narrow(v: int) -> int:
    return _MARK if v >= LIMIT else v


def _tensor_records(dtype: str, shape: tuple[int, ...], data: Any) -> list[tuple[str, Any]]:
    return [("data.pkl", _tensor_pickle(dtype, shape)), ("byteorder", b"little"), ("data/0", data), ("version", b"3\n")]


def tensor_size(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of the archive `write_tensor` writes for a tensor of this dtype and shape."""
    return _zip(_Count(), _tensor_records(dtype, shape, math.prod(shape) * dtypes.itemsize(dtype)))


def write_tensor(out, bits: np.ndarray, dtype: str) -> int:
    """Append one tensor's archive (its raw bits, any contiguous array shaped as the
    tensor) to `out`; the bytes written."""
    data = memoryview(np.ascontiguousarray(bits)).cast("B")
    return _zip(out, _tensor_records(dtype, tuple(bits.shape), data))


def object_archive(obj: Any) -> bytes:
    """The archive of a tensor-free object (common.pt's args, an `_extra_state` None)."""
    buf = io.BytesIO()
    _zip(buf, [("data.pkl", _pickled(obj)), ("byteorder", b"little"), ("version", b"3\n")])
    return buf.getvalue()
