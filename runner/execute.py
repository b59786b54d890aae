"""Runs file plans: for each destination file, compute its framing from the plan, then
write every tensor's bytes at their final offset. Files are built under a temporary
name, fsynced and renamed (runner.durable); the executor has no policy of its own.

A plain copy (local source files, no dtype cast) moves each piece that is one run of
bytes in its source file and in the destination (a dim-0 split, a whole tensor) file to
file inside the kernel, as `cp` does; other pieces are read with one pread of their span
and gathered into the tensor, both in buffers reused from tensor to tensor, since the
kernel zeroes every freshly allocated page on first touch (that pass cost more than the
copy). Casts, LoRA merges, recipes and remote ranks give their bits through their pool.
The checksum runs over the bytes in file order as they are written."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from runner import dtypes
from runner.checksum import crc32
from runner.durable import DurableFile
from runner.errors import AutotransError, PlanError, disk_error
from runner.formats.base import Entry, FileFormat, FileLayout
from runner.layout import Box
from runner.plan import FilePlan, ReadItem, TensorPlan
from runner.source import RankReader, Source


class SlicePool(Protocol):
    """Where read items come from: local files, or other MPI ranks."""

    def region(self, read: ReadItem) -> np.ndarray:
        """The elements of `read.region` as raw bits, shaped as the region."""

    def release(self) -> None:
        """Drop pages and buffers held for the reads served so far."""

    def close(self) -> None: ...


class Scratch:
    """One buffer reused for every request, grown to the largest one."""

    def __init__(self) -> None:
        self._buf = np.empty(0, np.uint8)

    def take(self, nbytes: int) -> np.ndarray:
        if self._buf.size < nbytes:
            self._buf = np.empty(0, np.uint8)  # let the old one go before the new one is made
            self._buf = np.empty(nbytes, np.uint8)
        return self._buf[:nbytes]


class LocalPool:
    """Reads source ranks' files; each file opened once."""

    def __init__(self, source: Source):
        self.source = source
        self._open: dict[int, RankReader] = {}
        self.span_buffer, self.tensor_buffer = Scratch(), Scratch()  # for write_file's plain copies

    def reader(self, rank: int) -> RankReader:
        if rank not in self._open:
            self._open[rank] = self.source.open(rank)
        return self._open[rank]

    def _view(self, read: ReadItem) -> tuple[RankReader, np.ndarray, np.ndarray]:
        reader = self.reader(read.src_rank)
        stored = reader.array(read.src_name).reshape(read.src_box.sizes)
        return reader, stored, stored[(*read.region.slices(read.src_box), ...)]  # `...` keeps 0-d views arrays

    def region(self, read: ReadItem, scratch: Scratch | None = None) -> np.ndarray:
        """The region read with one pread of the bytes spanning it (at most the source
        tensor) when the file is mapped: no page faults, and the memory is ours to free.
        With `scratch` the bytes land in its buffer, valid until its next use."""
        reader, stored, view = self._view(read)
        where = _locate(reader, read.src_name, stored)
        if where is None or view.size == 0:
            return view
        first = view.ctypes.data - stored.ctypes.data
        last = first + sum((n - 1) * st for n, st in zip(view.shape, view.strides)) + view.itemsize
        span = scratch.take(last - first) if scratch is not None else np.empty(last - first, np.uint8)
        pread_all(where[0], memoryview(span), where[1] + first)
        return np.ndarray(view.shape, view.dtype, buffer=span, strides=view.strides)

    def extent(self, read: ReadItem) -> tuple[int, int, np.ndarray] | None:
        """(file descriptor, offset, mapped view) of the region when its bytes are one run
        of a mapped source file, so the kernel can copy them file to file."""
        reader, _, view = self._view(read)
        if view.size == 0 or not view.flags.c_contiguous:
            return None
        where = _locate(reader, read.src_name, view)
        return None if where is None else (*where, view)

    def release(self) -> None:
        for r in self._open.values():
            r.release()

    def close(self) -> None:
        for r in self._open.values():
            r.close()
        self._open.clear()


def _locate(reader, name: str, arr: np.ndarray) -> tuple[int, int] | None:
    locate = getattr(reader, "locate", None)  # readers over mapped files have it
    return locate(name, arr) if locate is not None else None


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    size: int
    crc32: int
    kept: bool = False  # an earlier run of the job wrote it and proved it intact


def tensor_bits(t: TensorPlan, pool: SlicePool) -> np.ndarray:
    """The destination tensor as contiguous raw bits of its output dtype."""
    if len(t.reads) == 1 and t.reads[0].region == t.box:
        view = pool.region(t.reads[0])
        if t.out_dtype == t.dtype and view.flags.c_contiguous:
            return view
    else:
        view = np.empty(t.box.sizes, dtypes.bits_dtype(t.dtype))
        for r in t.reads:
            view[r.region.slices(t.box)] = pool.region(r)
    return np.ascontiguousarray(dtypes.cast(view, t.dtype, t.out_dtype))


def pread_all(fd: int, buf: memoryview, offset: int) -> None:
    while buf:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            raise AutotransError(f"source file shrank while being read (fd {fd}, offset {offset}); was it changed during the job?")
        buf, offset = buf[n:], offset + n


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


# errors with which a filesystem (or a seccomp filter) refuses a file-to-file copy call
_REFUSED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM, errno.EBADF}
_CHUNK = 8 << 20  # pread / pwrite step of the last-resort copy
_FLUSH_STEP = 64 << 20  # bytes written between two writeback starts


class _Output:
    """The file being written: writes at offsets, the checksum of the bytes in file
    order, and which file-to-file copy calls its filesystem accepts."""

    def __init__(self, fd: int):
        self.fd = fd
        self.crc = 0
        self.calls = ["copy_file_range", "sendfile"]
        self.flushed = 0  # bytes before this offset are on their way to the disk (-1: no advice)

    def write(self, data: memoryview, offset: int) -> None:
        self.crc = crc32(data, self.crc)
        _pwrite_all(self.fd, data, offset)
        self._written(offset + len(data))

    def _written(self, end: int) -> None:
        """Start the disk writing the bytes written so far while the next ones are
        copied, so that the fsync at the end finds little left to do (cp + sync lets the
        kernel's background writeback do this; a job fsyncs file by file). The advice
        starts writeback of dirty pages; clean ones, never read again, are dropped."""
        if self.flushed >= 0 and end - self.flushed >= _FLUSH_STEP:
            try:
                os.posix_fadvise(self.fd, self.flushed, end - self.flushed, os.POSIX_FADV_DONTNEED)
                self.flushed = end
            except OSError:  # only advice: a filesystem that refuses it is written all the same
                self.flushed = -1

    def copy(self, src_fd: int, src_offset: int, data: memoryview, offset: int, scratch: Scratch) -> None:
        """Write `data`, the bytes at `src_offset` in file `src_fd`, by copying them file
        to file: copy_file_range, else sendfile, else pread / pwrite. `data`, a mapped
        view, is checksummed after the copy, which has checked that the file is long enough."""
        n = len(data)
        while n:
            k = self._kernel_copy(src_fd, src_offset, offset, n) if self.calls else 0
            if k == 0:  # refused, or nothing copied: the plain loop copies or names a short file
                buf = memoryview(scratch.take(min(n, _CHUNK)))
                pread_all(src_fd, buf, src_offset)
                _pwrite_all(self.fd, buf, offset)
                k = len(buf)
            src_offset, offset, n = src_offset + k, offset + k, n - k
        self.crc = crc32(data, self.crc)
        self._written(offset)

    def _kernel_copy(self, src_fd: int, src_offset: int, offset: int, n: int) -> int:
        while self.calls:
            try:
                if self.calls[0] == "copy_file_range":
                    return os.copy_file_range(src_fd, self.fd, n, src_offset, offset)
                os.lseek(self.fd, offset, os.SEEK_SET)
                return os.sendfile(self.fd, src_fd, src_offset, n)
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                self.calls.pop(0)
        return 0


# A tensor's bytes in order, as segments: bytes in memory, or (source fd, offset, mapped
# view) for bytes the kernel copies file to file.
Segment = tuple[int, "memoryview | tuple[int, int, memoryview]"]


def write_file(
    fp: FilePlan, pool: SlicePool, fmt: FileFormat, path: Path, on_bytes: Callable[[int], None] = lambda n: None
) -> WrittenFile:
    """Write destination file `path` as planned; atomic and durable."""
    entries = [Entry(t.name, t.out_dtype, t.stored_shape) for t in fp.tensors]
    lay = fmt.layout(entries)
    by_name = {t.name: t for t in fp.tensors}
    # (file offset, framing bytes or tensor, start and length of the run in the tensor's bytes)
    writes: list[tuple[int, bytes | TensorPlan, int, int]] = sorted(
        [*((o, b, 0, len(b)) for o, b in lay.pieces), *((o, t, a, n) for t in fp.tensors for o, a, n in _runs(lay, t))],
        key=lambda w: (w[0], w[3] > 0),  # an empty run before whatever starts at its offset
    )
    file = DurableFile(path)
    try:
        out, pos = _Output(file.open().fd), 0
        segments: list[Segment] = []  # of the tensor whose runs are being written
        for offset, what, start, n in writes:
            if offset != pos:
                raise PlanError(f"{path}: layout leaves a gap at byte {pos}")
            if isinstance(what, bytes):
                out.write(memoryview(what), offset)
            else:
                if start == 0:
                    segments = _tensor_segments(by_name[what.name], pool)
                _write_run(out, segments, start, n, offset, pool)
                on_bytes(n)  # progress counts tensor payload, as its total does
            pos += n
            pool.release()
        if pos != lay.size:
            raise PlanError(f"{path}: wrote {pos} bytes, the layout says {lay.size}")
        file.commit()
        return WrittenFile(path, pos, out.crc)
    except OSError as e:
        raise disk_error(e, path) from None
    finally:
        file.discard()


def _write_run(out: _Output, segments: list[Segment], start: int, n: int, offset: int, pool: SlicePool) -> None:
    """Write bytes [start, start + n) of a tensor, given as `segments`, at `offset`."""
    for seg_start, src in segments:
        size = len(src) if isinstance(src, memoryview) else len(src[2])
        a, b = max(start, seg_start), min(start + n, seg_start + size)
        if a >= b:
            continue
        at = offset + a - start
        if isinstance(src, memoryview):
            out.write(src[a - seg_start:b - seg_start], at)
        else:
            src_fd, src_offset, view = src
            out.copy(src_fd, src_offset + a - seg_start, view[a - seg_start:b - seg_start], at, pool.span_buffer)


def _tensor_segments(t: TensorPlan, pool: SlicePool) -> list[Segment]:
    """The tensor's bytes: kernel copies when every piece is one run of its source file
    and of the tensor, else gathered in memory."""
    if not isinstance(pool, LocalPool) or t.out_dtype != t.dtype:
        return [(0, _as_bytes(tensor_bits(t, pool)))]
    itemsize = dtypes.itemsize(t.dtype)
    copies: list[Segment] = []
    for r in t.reads:
        at = _run_in(r.region, t.box)
        where = pool.extent(r) if at is not None else None
        if where is None:
            break
        copies.append((at * itemsize, (where[0], where[1], _as_bytes(where[2]))))
    else:
        return sorted(copies, key=lambda c: c[0])
    bits = pool.tensor_buffer.take(t.write_bytes).view(dtypes.bits_dtype(t.dtype)).reshape(t.box.sizes)
    for r in t.reads:
        bits[r.region.slices(t.box)] = pool.region(r, pool.span_buffer)
    return [(0, _as_bytes(bits))]


def _run_in(region: Box, box: Box) -> int | None:
    """The element offset of `region` within `box` (C order) when the region is one
    contiguous run there: leading dims of size 1, one partial dim, then whole dims."""
    rel = [o - b for o, b in zip(region.offsets, box.offsets)]
    lead = 0
    while lead < len(rel) and region.sizes[lead] == 1:
        lead += 1
    if any(n != full for n, full in zip(region.sizes[lead + 1:], box.sizes[lead + 1:])):
        return None
    start = 0
    for r, full in zip(rel, box.sizes):
        start = start * full + r
    return start


def _runs(lay: FileLayout, t: TensorPlan) -> list[tuple[int, int, int]]:
    """(file offset, start within the tensor's bytes, length) of each run of `t`'s bytes."""
    out, start = [], 0
    for offset, n in lay.tensor_runs(t.name, t.write_bytes):
        out.append((offset, start, n))
        start += n
    return out


def _as_bytes(bits: np.ndarray) -> memoryview:
    return memoryview(bits.reshape(-1)).cast("B") if bits.size else memoryview(b"")
