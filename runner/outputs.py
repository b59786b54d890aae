"""The output folder: its ownership, the progress record that makes a killed job
resumable, and the manifest written last (SPEC 3, "Never lose data").

`transformed_checkpoint/.autotrans-progress/` holds `job.json` (the job digest) from
the job's start and one record per finished file (size, crc32, the source files it
read). A rerun of the same job keeps every file whose record still proves it right."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from runner.checksum import crc32
from runner.errors import AutotransError, ConfigError, excerpt, one_line
from runner.durable import write_json
from runner.execute import WrittenFile

MANIFEST = "autotrans.json"
PROGRESS = ".autotrans-progress"
LOCK = ".autotrans.lock"  # in output_dir; never removed (removing a lock file races its next holder)
_HELD: dict[tuple[int, int], list] = {}  # lock files this process holds: (st_dev, st_ino) -> [fd, holds]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def lock_output(output_dir: Path, wait: bool = False) -> Callable[[], None]:
    """Hold output_dir's lock (flock on a file inside it) until the returned function is
    called; a process may take it more than once. Another process holding it is waited
    for (`wait`) or refused with one line naming it (pid, host, start)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(output_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    if key in _HELD:
        os.close(fd)
    else:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "start": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        except BlockingIOError:
            holder = os.pread(fd, 256, 0)
            os.close(fd)
            raise AutotransError(f"{output_dir} is in use by another autotrans run ({_holder(holder)}); "
                                 "wait for it to finish, or choose another output_dir") from None
        except BaseException:
            os.close(fd)
            raise
        _HELD[key] = [fd, 0]
    _HELD[key][1] += 1
    return lambda: _release(key)


def _release(key: tuple[int, int]) -> None:
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        os.ftruncate(held[0], 0)  # the holder's line is only there while it holds the lock
        os.close(held[0])  # closing the last descriptor releases the flock


def _holder(raw: bytes) -> str:
    try:
        h = json.loads(raw)
        return one_line(f"pid {int(h['pid'])} on {str(h['host'])[:64]}, started {str(h['start'])[:40]}")
    except (ValueError, TypeError, KeyError):
        return f"holder unknown: {excerpt(raw)}"


class OutputFolder:
    """`output_dir/transformed_checkpoint/`, claimed for one job digest."""

    def __init__(self, folder: Path, digest: str):
        self.folder = Path(folder)
        self.digest = digest
        self.progress = self.folder / PROGRESS

    def manifest(self) -> dict | None:
        return read_json(self.folder / MANIFEST)

    def is_complete(self) -> bool:
        """This job's manifest is there and every file it lists has its byte count (a
        cheap check: a file cut or removed since makes the rerun resume instead)."""
        m = self.manifest()
        if not isinstance(m, dict) or m.get("job_digest") != self.digest:
            return False
        try:
            return all((self.folder / f["path"]).stat().st_size == f["bytes"] for f in m.get("files", []))
        except (OSError, TypeError, KeyError):
            return False

    def claim(self) -> None:
        """Make the folder this job's: resume our own, replace another job's, refuse
        anything else that is not empty. Call on one process per output folder. The
        output_dir's lock is taken first and held as long as this object lives (the
        driver keeps it for the whole job)."""
        weakref.finalize(self, lock_output(self.folder.parent))
        if self.folder.exists() and any(self.folder.iterdir()):
            # the progress folder is the first thing a job creates: a job killed before
            # job.json was renamed into place still owns the folder
            ours = self.progress.is_dir() or (self.folder / MANIFEST).exists()
            if not ours:
                raise ConfigError(
                    f"{self.folder} is not empty and was not written by autotrans; "
                    "move its contents away or choose another output_dir"
                )
            job = read_json(self.progress / "job.json") or {}
            if job.get("job_digest") != self.digest:
                self._clear()
        (self.folder / MANIFEST).unlink(missing_ok=True)
        write_json(self.progress / "job.json", {"job_digest": self.digest})

    def _clear(self) -> None:
        """Remove a previous job's outputs (the folder is known to be ours)."""
        for child in self.folder.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def record(self, rank: int, written: WrittenFile, sources: list[Path]) -> None:
        write_json(self.progress / f"rank_{rank}.json", {
            "job_digest": self.digest,
            "file": str(written.path.relative_to(self.folder)),
            "size": written.size,
            "crc32": written.crc32,
            "sources": sorted(_stamp(p) for p in sources),
        })

    def finished(self, rank: int, path: Path, sources: list[Path]) -> WrittenFile | None:
        """The file written for `rank` by an earlier run of this job, if it is provably
        intact: recorded by this job, same size and crc32, sources unchanged."""
        rec = read_json(self.progress / f"rank_{rank}.json")
        if not isinstance(rec, dict) or rec.get("job_digest") != self.digest:
            return None
        if rec.get("file") != str(path.relative_to(self.folder)) or not path.is_file():
            return None
        if path.stat().st_size != rec.get("size") or sorted(_stamp(p) for p in sources) != rec.get("sources"):
            return None
        if file_crc32(path) != rec.get("crc32"):
            return None
        return WrittenFile(path, rec["size"], rec["crc32"], kept=True)

    def write_manifest(self, doc: dict) -> None:
        write_json(self.folder / MANIFEST, {**doc, "job_digest": self.digest})


def _stamp(p: Path) -> list:
    st = Path(p).stat()
    return [Path(p).name, st.st_size, st.st_mtime_ns]


def file_crc32(path: Path, chunk: int = 16 << 20) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            crc = crc32(view[:n], crc)
    return crc
