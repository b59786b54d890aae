"""The interfaces every file format implements."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A stored tensor as its file header describes it (no bytes read)."""

    dtype: str  # safetensors dtype name (runner.dtypes)
    shape: tuple[int, ...]  # the stored shape

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class CheckpointReader(Protocol):
    """A checkpoint file opened for reading. Opening reads the header only."""

    path: Path

    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor in the file, by name, from the header alone."""

    def array(self, name: str) -> np.ndarray:
        """The stored tensor as raw bits (runner.dtypes.bits_dtype) in its stored shape,
        a zero-copy view of the mapped file where the format allows."""

    def release(self) -> None:
        """Drop the pages mapped so far, so that RSS reflects only live data."""

    def close(self) -> None:
        """Unmap and close."""


@dataclass(frozen=True)
class Entry:
    """A tensor to be written: name, dtype name and stored shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FileLayout:
    """Where everything goes in an output file, computed before any byte is written.

    `pieces` are framing bytes (headers, protobuf tags) at fixed offsets;
    `offsets[name]` is where tensor `name`'s raw bytes start; `size` is the file size.
    `runs[name]`, for a tensor whose bytes are cut by framing (a .ckpt tensor over
    512 MiB), lists the (file offset, length) of each consecutive run of its bytes."""

    pieces: tuple[tuple[int, bytes], ...]
    offsets: dict[str, int]
    size: int
    runs: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)

    def tensor_runs(self, name: str, nbytes: int) -> tuple[tuple[int, int], ...]:
        return self.runs.get(name) or ((self.offsets[name], nbytes),)


class MappedFile:
    """A checkpoint file mapped read-only, for readers that hand out views of it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        self.size = os.fstat(self._file.fileno()).st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None

    def locate(self, arr: np.ndarray) -> tuple[int, int] | None:
        """(file descriptor, file offset of arr's first byte) when `arr` is a view of
        this mapping, so its bytes can be read with pread rather than page faults."""
        if self._mm is None or arr.size == 0:
            return None
        base = np.frombuffer(self._mm, np.uint8, 1).ctypes.data  # address only; no page touched
        offset = arr.ctypes.data - base
        return (self._file.fileno(), offset) if 0 <= offset < self.size else None

    def release(self) -> None:
        if self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive; the GC unmaps it later
                pass
            self._mm = None
        self._file.close()


class FileFormat(Protocol):
    suffix: str  # final extension, with the dot

    def open(self, path: Path) -> CheckpointReader: ...

    def layout(self, entries: list[Entry]) -> FileLayout: ...
