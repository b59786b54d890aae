"""The one way the runner writes a file (SPEC 3, "Never lose data"): under a temporary
name that does not end in the final extension, created fresh with O_CREAT | O_EXCL |
O_NOFOLLOW after removing a stale one (so a planted symlink is never followed), fsynced,
renamed into place, and the folder fsynced. Writers never write through a folder that
is a symlink, and no folder a job writes in may overlap one of its inputs."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Iterator

from runner.errors import AutotransError, ConfigError, FormatError, one_line

PARTIAL = ".partial"


def temp_path(path: Path, tag: str = "") -> Path:
    """The temporary name `path` is built under (`tag` tells apart two temporaries of one file)."""
    return path.with_name(path.name + tag + PARTIAL)


def make_folder(folder: Path) -> Path:
    """Create `folder` (and its parents); refuse it when it is a symlink: the runner
    writes only into real folders of its output tree."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if folder.is_symlink():
        raise ConfigError(f"{folder} is a symlink; autotrans writes only into real folders of output_dir; remove it or choose another output_dir")
    return folder


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DurableFile:
    """`with DurableFile(path) as f:` write through `f.fd` (pwrite) or `f.stream()`; on
    a clean exit the file is fsynced and renamed to `path`, else the temporary is
    removed. Writers that keep a file open across calls use open / commit / discard."""

    def __init__(self, path: Path, tag: str = ""):
        self.path = Path(path)
        self.tmp = temp_path(self.path, tag)
        self.fd = -1
        self._stream: IO[bytes] | None = None
        self._id = (0, 0)  # (st_dev, st_ino) of the temporary this object created
        # inside open(): a signal there (its handler raises) may land after the file is
        # created and before its descriptor or identity is kept; the temporary is then ours
        self._opening = False

    def open(self) -> "DurableFile":
        make_folder(self.path.parent)
        self._opening = True
        try:
            os.unlink(self.tmp)  # stale, from a killed run; a symlink is removed, not followed
        except FileNotFoundError:
            pass
        try:
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError:  # not created by us (EEXIST: someone else's)
            self._opening = False
            raise
        st = os.fstat(self.fd)
        self._id = (st.st_dev, st.st_ino)
        self._opening = False
        return self

    def stream(self) -> IO[bytes]:
        """A buffered binary file over the temporary, for reading and writing."""
        if self._stream is None:
            self._stream = open(self.fd, "r+b", closefd=False)
        return self._stream

    def commit(self) -> None:
        """fsync, rename to the final name, fsync the folder."""
        try:
            if self._stream is not None:
                self._stream.flush()
            os.fsync(self.fd)
            # another process that removed and recreated the temporary would otherwise
            # have its half-written bytes renamed into place
            if not self._ours():
                raise AutotransError(f"{self.tmp} was replaced while this job wrote it; is another job writing into the same output_dir?")
            self._close()
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        finally:
            self.discard()

    def discard(self) -> None:
        """Close and remove the temporary (if it is still the one this object made)."""
        self._close()
        if self._ours() or (self._opening and os.path.lexists(self.tmp)):
            self.tmp.unlink()
        self._opening = False

    def __enter__(self) -> "DurableFile":
        return self.open()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    def _ours(self) -> bool:
        try:
            st = os.lstat(self.tmp)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._id

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_bytes(path: Path, data: bytes) -> None:
    with DurableFile(path) as f:
        view = memoryview(data)
        while view:
            view = view[os.write(f.fd, view):]


def write_json(path: Path, doc: Any) -> None:
    """`doc` as indented JSON with sorted keys and a final newline."""
    write_bytes(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def copy_regular(src: Path, dst: Path) -> None:
    """Copy `src`, which must be a regular file and not a symlink: a reference folder's
    symlink could otherwise copy any file the user can read into the output."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise FormatError(f"{src}: cannot copy: {'it is a symlink' if os.path.islink(src) else e.strerror}; "
                          "copy the real file there (not a link) or remove it; a Hugging Face cache snapshot is made of links: "
                          "give a copy made with cp -rL") from None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(f"{src}: not a regular file; copy the real file there or remove it")
        with DurableFile(dst) as out:
            while chunk := f.read(16 << 20):
                out.stream().write(chunk)


def _identities(path: Path) -> tuple[list[tuple[int, int]], bool]:
    """(st_dev, st_ino) of `path` (symlinks resolved) and of every folder above it, the
    path's own first; for a path that does not exist, those of its nearest existing
    folder, and False."""
    p = Path(os.path.abspath(path)).resolve()
    exists = p.exists()
    ids = []
    for q in (p, *p.parents):
        try:
            st = q.stat()
        except OSError:
            continue
        ids.append((st.st_dev, st.st_ino))
    return ids, exists


def check_no_overlap(folders: list[Path], inputs: list[Path]) -> None:
    """Refuse (exit 2) when a folder (or file) the job writes or deletes in is, is inside,
    or contains one of its inputs (SPEC 3). Judged by device and inode after resolving
    symlinks, so a symlinked alias or a bind mount of an input is seen for what it is."""
    own: dict[tuple[int, int], Path] = {}  # an input's identity -> the input
    above: dict[tuple[int, int], Path] = {}  # the identity of an input or a folder above it -> the input
    for p in inputs:
        ids, exists = _identities(p)
        if exists:
            own.setdefault(ids[0], p)
            for i in ids:
                above.setdefault(i, p)
    for folder in folders:
        ids, exists = _identities(folder)
        hit = next((own[i] for i in ids if i in own), None) or (above.get(ids[0]) if exists and ids else None)
        if hit is not None:
            raise ConfigError(f"the output path {one_line(str(folder))} overlaps the job's input {one_line(str(hit))} "
                              "(it is, holds or lies inside it, symlinks and mounts resolved); write the output apart from every input")


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends, then act on the first one
    that came (its handler runs: the interrupt is raised then). For native writers that
    call back into Python (torch.save): an interrupt raised inside them would come out as
    the writer's own error (a RuntimeError about the zip stream), not as an interrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    before = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if came:
            handler = before[came[0]]
            if callable(handler):
                handler(came[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(came[0])
