"""MindSpore `.ckpt` checkpoints without MindSpore: a protobuf `Checkpoint` message, a
sequence of `value` records {tag, TensorProto{dims, tensor_type, tensor_content}}.
A string that save_checkpoint's append_dict stored (tensor_type "str") is carried as a
1-D tensor of its UTF-32 code units (dtype STR), so a .ckpt -> .ckpt job keeps it.

Reading walks the protobuf wire format over an mmap and records where each tensor's
bytes lie, so opening reads only the small record headers and `array()` is a view.
MindSpore writes a tensor over 512 MiB as consecutive records with the same tag, each
repeating the full dims and holding the next 512 MiB of its bytes; an optional trailer
`b"crc_num"` + 10-byte big-endian crc32 of everything before it may follow.

Writing computes every record header up front (FileLayout), so the executor writes the
tensor bytes at their final offsets; the bytes equal MindSpore's own save_checkpoint."""

from __future__ import annotations

import math
import mmap
import os
from array import array
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np

from runner import dtypes
from runner.checksum import crc32
from runner.errors import FormatError
from runner.formats.base import Entry, FileLayout, MappedFile, TensorInfo

SUFFIX = ".ckpt"
# MindSpore's save_checkpoint writes a Tensor's bytes in records of at most this size
# (serialization.SLICE_SIZE KB x 1024).
CHUNK_BYTES = 512 * 1024 * 1024

# MindSpore tensor_type names <-> safetensors dtype names (runner.dtypes).
MS_TYPES: dict[str, str] = {
    "Float32": "F32", "Float16": "F16", "BFloat16": "BF16", "Float64": "F64",
    "Int8": "I8", "Int16": "I16", "Int32": "I32", "Int64": "I64",
    "UInt8": "U8", "UInt16": "U16", "UInt32": "U32", "UInt64": "U64", "Bool": "BOOL",
    "str": dtypes.STRING,  # save_checkpoint's append_dict strings: dims [0], content numpy's UTF-32 of the text
}
_TO_MS = {v: k for k, v in MS_TYPES.items()}

_CRC_TAG = b"crc_num"
_CRC_TRAILER = len(_CRC_TAG) + 10
# First 4 bytes (little-endian magic numbers) of files MindSpore encrypted with enc_key:
# AES-GCM, AES-CBC, SM4-CBC. A plain checkpoint starts with the value record tag 0x0a.
_ENCRYPTED = (b"\xd8\x5e\x3a\x7f", b"\xd9\x5e\x3a\x7f", b"\xda\x5e\x3a\x7f")

_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5


@dataclass
class Index:
    """Where each tensor of a checkpoint lies, in about 100 bytes a tensor (a file of a
    million one-byte records must not cost GBs): its name -> TensorInfo (tensors that
    share a dtype and shape share one), which is what `tensors()` hands out, and each
    record's content offset in one array, in record order; the runs of a tensor
    MindSpore cut into several records apart."""

    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    offsets: array = field(default_factory=lambda: array("Q"))
    runs: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)  # (offset, length) of each record's content
    _position: dict[str, int] | None = None  # name -> record number, built when the first tensor is read

    def offset(self, name: str) -> int:
        if self._position is None:
            self._position = {n: i for i, n in enumerate(self.tensors)}
        return self.offsets[self._position[name]]


class _Walker:
    """Reads protobuf wire records from `buf` (bytes-like) with bounds checks."""

    def __init__(self, buf, path: Path):
        self.buf = buf
        self.path = path

    def corrupt(self, pos: int, what: str) -> FormatError:
        return FormatError(f"{self.path}: corrupt or truncated MindSpore checkpoint ({what} at byte {pos}); re-save or re-copy the file")

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        if pos < end and self.buf[pos] < 0x80:  # one byte: most tags and lengths
            return self.buf[pos], pos + 1
        value, shift, start = 0, 0, pos
        while True:
            if pos >= end or shift > 63:
                raise self.corrupt(start, "a number runs past its record")
            b = self.buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value, pos
            shift += 7

    def fields(self, pos: int, end: int):
        """Yield (field number, wire type, value or (start, stop) for LEN) up to `end`."""
        while pos < end:
            key, pos = self.varint(pos, end)
            number, wire = key >> 3, key & 7
            if wire == _VARINT:
                value, pos = self.varint(pos, end)
            elif wire == _LEN:
                n, pos = self.varint(pos, end)
                if pos + n > end:
                    raise self.corrupt(pos, f"a {n}-byte field runs past its record")
                value, pos = (pos, pos + n), pos + n
            elif wire in (_I64, _I32):
                size = 8 if wire == _I64 else 4
                if pos + size > end:
                    raise self.corrupt(pos, "a fixed-size field runs past its record")
                value, pos = None, pos + size
            else:
                raise self.corrupt(pos, f"wire type {wire}")
            yield number, wire, value

    def text(self, span: tuple[int, int]) -> str:
        try:
            return bytes(self.buf[span[0]:span[1]]).decode()
        except UnicodeDecodeError:
            raise self.corrupt(span[0], "a name that is not UTF-8") from None


def _tensor(w: _Walker, span: tuple[int, int], tag: str) -> tuple[list[int], str, tuple[int, int]]:
    dims: list[int] = []
    ttype, content = None, None
    for number, wire, value in w.fields(*span):
        if number == 1 and wire == _VARINT:
            dims.append(value - (1 << 64) if value >= 1 << 63 else value)
        elif number == 1 and wire == _LEN:  # packed dims, as another writer may emit
            pos, end = value
            while pos < end:
                d, pos = w.varint(pos, end)
                dims.append(d)
        elif number == 2 and wire == _LEN:
            ttype = w.text(value)
        elif number == 3 and wire == _LEN:
            content = value
    if ttype is None or content is None:
        raise w.corrupt(span[0], f"tensor {tag!r} lacks its type or content")
    return dims, ttype, content


def _value(w: _Walker, span: tuple[int, int]) -> tuple[str, list[int], str, tuple[int, int]]:
    tag, tensor = None, None
    for number, wire, value in w.fields(*span):
        if number == 1 and wire == _LEN:
            tag = w.text(value)
        elif number == 2 and wire == _LEN:
            tensor = value
        elif number == 3 and wire == _LEN:
            raise FormatError(f"{w.path}: entry {tag!r} is a MindSpore MapParameter (hash table), which autotrans cannot transform")
    if tag is None or tensor is None:
        raise w.corrupt(span[0], f"a value record without {'a tag' if tag is None else 'a tensor'}")
    return (tag, *_tensor(w, tensor, tag))


def scan(buf, size: int, path: Path) -> Index:
    """Every tensor of a checkpoint held in `buf` (no trailer), from its record headers.
    Memory is a small multiple of the record headers' bytes (Index)."""
    w = _Walker(buf, path)
    index = Index()
    shared: dict[TensorInfo, TensorInfo] = {}  # one object per dtype and shape
    pending: tuple[str, list[int], str, list[tuple[int, int]]] | None = None  # a tensor whose chunks may follow
    for number, wire, span in w.fields(0, size):
        if number != 1 or wire != _LEN:
            raise w.corrupt(0, f"unexpected field {number} in the Checkpoint message")
        tag, dims, ttype, content = _value(w, span)
        if pending is not None and tag == pending[0]:
            if (dims, ttype) != pending[1:3]:
                raise w.corrupt(span[0], f"chunks of tensor {tag!r} disagree on dims or type")
            pending[3].append(content)
            continue
        if pending is not None:
            _add(index, path, *pending, shared)
        if tag in index.tensors:
            raise FormatError(f"{path}: tensor {tag!r} appears twice (not in consecutive records); the file is corrupt")
        pending = (tag, dims, ttype, [content])
    if pending is not None:
        _add(index, path, *pending, shared)
    return index


def _add(index: Index, path: Path, tag: str, dims: list[int], ttype: str, spans: list[tuple[int, int]],
         shared: dict[TensorInfo, TensorInfo]) -> None:
    dtype = MS_TYPES.get(ttype)
    if dtype is None:
        raise FormatError(f"{path}: tensor {tag!r} has type {ttype!r}, which autotrans does not support (supported: {', '.join(MS_TYPES)})")
    if any(d < 0 for d in dims):
        raise FormatError(f"{path}: tensor {tag!r} has negative dims {dims}; the file is corrupt")
    nbytes = sum(b - a for a, b in spans)
    size = dtypes.itemsize(dtype)
    if dtype == dtypes.STRING:  # carried as its code units; written back with dims [0]
        if nbytes % size:
            raise FormatError(f"{path}: string entry {tag!r} holds {nbytes} bytes, not 4 per character; the file is corrupt")
        dims = [nbytes // size]
    elif dims == [0] and nbytes == size:  # MindSpore's loader reads dims [0] as a scalar
        dims = []
    if nbytes != math.prod(dims) * size:
        raise FormatError(f"{path}: tensor {tag!r} holds {nbytes} bytes but dims {dims} {ttype} need {math.prod(dims) * size}; the file is corrupt or truncated")
    info = TensorInfo(dtype, tuple(dims))
    index.tensors[tag] = shared.setdefault(info, info)
    index.offsets.append(spans[0][0])
    if len(spans) > 1:
        index.runs[tag] = tuple((a, b - a) for a, b in spans)


_CRC_CHECKED: set[tuple] = set()  # files whose trailer this process has verified


def _check_crc(path: Path, mm: mmap.mmap, end: int, st: os.stat_result) -> None:
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _CRC_CHECKED:
        return
    want = int.from_bytes(mm[end + len(_CRC_TAG):end + _CRC_TRAILER], "big")
    crc, step = 0, 64 << 20
    view = memoryview(mm)
    try:
        for pos in range(0, end, step):
            crc = crc32(view[pos:min(end, pos + step)], crc)
    finally:
        view.release()
    mm.madvise(mmap.MADV_DONTNEED)
    if crc != want:
        raise FormatError(f"{path}: crc32 check failed (file says {want:#010x}, content gives {crc:#010x}); the file is corrupt")
    _CRC_CHECKED.add(key)


class CkptReader(MappedFile):
    def __init__(self, path: Path):
        try:
            super().__init__(path)
        except OSError as e:
            raise FormatError(f"{path}: cannot read: {e.strerror}") from None
        try:
            self._tensors = self._read_index(os.fstat(self._file.fileno()))
        except BaseException:
            self.close()
            raise

    def _read_index(self, st: os.stat_result) -> Index:
        mm, size = self._mm, st.st_size
        if mm is None:
            return Index()
        if mm[:4] in _ENCRYPTED:
            raise FormatError(f"{self.path}: the checkpoint is encrypted (MindSpore enc_key); decrypt it with mindspore.load_checkpoint(dec_key=...) and save it plain first")
        if mm[0] != 0x0A:
            raise FormatError(f"{self.path}: not a MindSpore checkpoint (it does not start with a Checkpoint value record)")
        end = size
        if size >= _CRC_TRAILER and mm[size - _CRC_TRAILER:size - 10] == _CRC_TAG:
            end = size - _CRC_TRAILER
            _check_crc(self.path, mm, end, st)
        return scan(mm, end, self.path)

    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors.tensors

    def array(self, name: str) -> np.ndarray:
        index = self._tensors
        info = index.tensors[name]
        dt = dtypes.bits_dtype(info.dtype)
        if info.numel == 0:
            return np.empty(info.shape, dt)
        if name not in index.runs:
            return np.ndarray(info.shape, dt, buffer=self._mm, offset=index.offset(name))
        out = np.empty(info.numel * dt.itemsize, np.uint8)  # a chunked tensor: one copy
        pos = 0
        for offset, n in index.runs[name]:
            out[pos:pos + n] = np.frombuffer(self._mm, np.uint8, n, offset)
            pos += n
        return out.view(dt).reshape(info.shape)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def layout(entries: list[Entry]) -> FileLayout:
    """Record headers and content offsets for a checkpoint holding `entries` in order,
    byte for byte as MindSpore's save_checkpoint writes Tensors (no trailer)."""
    pieces: list[tuple[int, bytes]] = []
    offsets: dict[str, int] = {}
    runs: dict[str, tuple[tuple[int, int], ...]] = {}
    pos = 0
    for e in entries:
        ttype = _TO_MS.get(e.dtype)
        if ttype is None:
            raise FormatError(f"tensor {e.name}: dtype {e.dtype} has no MindSpore checkpoint type; choose another output_format or a dtype cast")
        nbytes = math.prod(e.shape) * dtypes.itemsize(e.dtype)
        tag = _field(1, e.name.encode())
        dims = [0] if e.dtype == dtypes.STRING else e.shape
        head = b"".join(_varint(1 << 3 | _VARINT) + _varint(d) for d in dims) + _field(2, ttype.encode())
        tensor_runs = []
        for start in range(0, max(nbytes, 1), CHUNK_BYTES):
            n = min(CHUNK_BYTES, nbytes - start)
            content_head = _varint(3 << 3 | _LEN) + _varint(n)
            tensor_len = len(head) + len(content_head) + n
            value_head = tag + _varint(2 << 3 | _LEN) + _varint(tensor_len) + head + content_head
            frame = _varint(1 << 3 | _LEN) + _varint(len(value_head) + n) + value_head
            pieces.append((pos, frame))
            pos += len(frame)
            tensor_runs.append((pos, n))
            pos += n
        offsets[e.name] = tensor_runs[0][0]
        if len(tensor_runs) > 1:
            runs[e.name] = tuple(tensor_runs)
    return FileLayout(tuple(pieces), offsets, pos, runs)


class CkptFormat:
    suffix = SUFFIX

    def open(self, path: Path) -> CkptReader:
        return CkptReader(path)

    def layout(self, entries: list[Entry]) -> FileLayout:
        return layout(entries)
