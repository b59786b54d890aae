"""Runs file plans: for each destination file, compute its framing from the plan, then
write every tensor's bytes at their final offset, straight from mmap views of the
sources where a tensor is one contiguous run, else assembled in one buffer. Files are
written durably (runner.durable); the executor has no policy of its own."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from runner import dtypes
from runner.durable import DurableFile
from runner.errors import AutotransError, PlanError, disk_error
from runner.formats.base import Entry, FileFormat, FileLayout
from runner.plan import FilePlan, ReadItem, TensorPlan
from runner.source import RankReader, Source


class SlicePool(Protocol):
    """Where read items come from: local files, or other MPI ranks."""

    def region(self, read: ReadItem) -> np.ndarray:
        """The elements of `read.region` as raw bits, shaped as the region."""

    def release(self) -> None:
        """Drop pages and buffers held for the reads served so far."""

    def close(self) -> None: ...


class LocalPool:
    """Reads source ranks' files through mmap; each file opened once."""

    def __init__(self, source: Source):
        self.source = source
        self._open: dict[int, RankReader] = {}

    def reader(self, rank: int) -> RankReader:
        if rank not in self._open:
            self._open[rank] = self.source.open(rank)
        return self._open[rank]

    def region(self, read: ReadItem) -> np.ndarray:
        """The region read with one pread of the bytes spanning it (at most the source
        tensor) when the file is mapped: no page faults, and the memory is ours to free."""
        reader = self.reader(read.src_rank)
        stored = reader.array(read.src_name).reshape(read.src_box.sizes)
        view = stored[(*read.region.slices(read.src_box), ...)]  # `...` keeps 0-d views arrays
        locate = getattr(reader, "locate", None)  # readers over mapped files have it
        where = locate(read.src_name, stored) if locate is not None else None
        if where is None or view.size == 0:
            return view
        first = view.ctypes.data - stored.ctypes.data
        last = first + sum((n - 1) * st for n, st in zip(view.shape, view.strides)) + view.itemsize
        span = np.empty(last - first, np.uint8)
        pread_all(where[0], memoryview(span), where[1] + first)
        return np.ndarray(view.shape, view.dtype, buffer=span, strides=view.strides)

    def release(self) -> None:
        for r in self._open.values():
            r.release()

    def close(self) -> None:
        for r in self._open.values():
            r.close()
        self._open.clear()


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    size: int
    crc32: int


def tensor_bits(t: TensorPlan, pool: SlicePool) -> np.ndarray:
    """The destination tensor as contiguous raw bits of its output dtype."""
    if len(t.reads) == 1 and t.reads[0].region == t.box:
        view = pool.region(t.reads[0])
        if t.out_dtype == t.dtype and view.flags.c_contiguous:
            return view  # one contiguous run: written straight from the mapped source
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
    try:
        with DurableFile(path) as out:
            crc, pos = 0, 0
            tensor = memoryview(b"")  # bytes of the tensor whose runs are being written
            for offset, what, start, n in writes:
                if offset != pos:
                    raise PlanError(f"{path}: layout leaves a gap at byte {pos}")
                if isinstance(what, bytes):
                    data = memoryview(what)
                else:
                    if start == 0:
                        tensor = _tensor_bytes(by_name[what.name], pool)
                    data = tensor[start:start + n]
                crc = zlib.crc32(data, crc)
                _pwrite_all(out.fd, data, offset)
                pos += len(data)
                if not isinstance(what, bytes):  # progress counts tensor payload, as its total does
                    on_bytes(len(data))
                pool.release()
            if pos != lay.size:
                raise PlanError(f"{path}: wrote {pos} bytes, the layout says {lay.size}")
        return WrittenFile(path, pos, crc)
    except OSError as e:
        raise disk_error(e, path) from None


def _runs(lay: FileLayout, t: TensorPlan) -> list[tuple[int, int, int]]:
    """(file offset, start within the tensor's bytes, length) of each run of `t`'s bytes."""
    out, start = [], 0
    for offset, n in lay.tensor_runs(t.name, t.write_bytes):
        out.append((offset, start, n))
        start += n
    return out


def _tensor_bytes(t: TensorPlan, pool: SlicePool) -> memoryview:
    bits = tensor_bits(t, pool)
    return memoryview(bits.reshape(-1)).cast("B") if bits.size else memoryview(b"")
