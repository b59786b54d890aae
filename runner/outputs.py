"""The output folder: its ownership, the progress record that makes a killed job
resumable, and the manifest written last (SPEC 3, "Never lose data").

`transformed_checkpoint/.autotrans-progress/` holds `job.json` (the job digest) from
the job's start and one record per finished file (size, crc32, the source files it
read). A rerun of the same job keeps every file whose record still proves it right."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import socket
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from runner.checksum import crc32
from runner.errors import AutotransError, ConfigError, excerpt, one_line
from runner.durable import PARTIAL, write_json
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


PROGRESS_FORMAT = "autotrans-progress"
MANIFEST_FORMAT = "autotrans-manifest"


class OutputFolder:
    """`output_dir/transformed_checkpoint/`, claimed for one job digest."""

    def __init__(self, folder: Path, digest: str):
        self.folder = Path(folder)
        self.digest = digest
        self.progress = self.folder / PROGRESS

    def manifest(self) -> dict | None:
        m = read_json(self.folder / MANIFEST)
        return m if _owned_paths(m, MANIFEST_FORMAT) is not None else None

    def is_complete(self) -> bool:
        """This job's manifest is there and every file it lists has its byte count (a
        cheap check: a file cut or removed since makes the rerun resume instead)."""
        m = self.manifest()
        if m is None or m.get("job_digest") != self.digest:
            return False
        try:
            return all((self.folder / f["path"]).stat().st_size == f["bytes"] for f in m["files"])
        except (OSError, TypeError, KeyError):
            return False

    def claim(self, paths: list[str], check: Callable[[list[Path]], None] = lambda folders: None) -> None:
        """Make the folder this job's, which will create `paths` (relative to it): resume
        our own, replace what an earlier job's record or manifest vouches for, keep
        everything else, and refuse a folder nothing vouches for, or one where this job
        would overwrite what is not ours (SPEC 3). `check` refuses folders that overlap an
        input (runner.durable.check_no_overlap), before anything is removed from them.
        Call on one process per output folder. The output_dir's lock is taken first and
        held as long as this object lives (the driver keeps it for the whole job)."""
        weakref.finalize(self, lock_output(self.folder.parent))
        record = read_json(self.progress / "job.json")
        owned = _owned_paths(record, PROGRESS_FORMAT)
        manifest = self.manifest()
        entries = _entries(self.folder)
        if owned is None and manifest is None:
            # a job killed before its job.json was renamed into place leaves only the progress folder
            if [e for e in entries if e != PROGRESS and not (e.startswith(PROGRESS + "/") and e.endswith(PARTIAL))]:
                raise ConfigError(f"{self.folder} is not empty and was not written by autotrans (it holds "
                                  f"{_some(entries)}); move its contents away or choose another output_dir")
        vouched = set(owned or ()) | set(_owned_paths(manifest, MANIFEST_FORMAT) or ())
        if owned is not None:
            vouched |= {e for e in entries if _progress_file(e)}
        if manifest is not None:
            vouched.add(MANIFEST)
        writes = set(paths) | {MANIFEST}
        on_the_way = _folders_above(vouched | writes)
        foreign = [e for e in entries if e not in vouched and e not in on_the_way and not _temporary_of(e, vouched | writes)]
        clash = [e for e in foreign if (e in writes or e in _folders_above(writes)) and not _real_dir(self.folder / e)]
        if clash:
            raise ConfigError(f"{self.folder} holds files autotrans did not write where this job writes ({_some(clash)}); "
                              "move them away or choose another output_dir")
        if owned is None or record.get("job_digest") != self.digest:
            doomed = [e for e in entries if e in vouched or _temporary_of(e, vouched)]
            check(sorted({(self.folder / e).parent for e in doomed}))
            self._remove(doomed, _folders_above(vouched) & set(entries))
        write_json(self.progress / "job.json", {"format": PROGRESS_FORMAT, "version": 1, "job_digest": self.digest,
                                                "paths": sorted(set(paths))})

    def _remove(self, files: list[str], folders: set[str]) -> None:
        """Remove what an earlier job's record vouches for: regular files reached through
        real folders only (never through a symlink), the manifest first and the record
        last (a run killed on the way still finds the rest vouched for), then the
        folders left empty."""
        def order(rel: str) -> int:
            return 0 if rel == MANIFEST else 2 if rel == f"{PROGRESS}/job.json" else 1

        for rel in sorted(files, key=order):
            path = self.folder / rel
            if all(_real_dir(p) for p in _between(self.folder, path.parent)) and _regular(path):
                path.unlink()
        for rel in sorted(folders, key=lambda r: -r.count("/")):
            try:
                (self.folder / rel).rmdir()  # only when empty: what is not ours stays
            except OSError:
                pass

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


def _owned_paths(doc: Any, fmt: str) -> list[str] | None:
    """The paths a progress record (`paths`) or a manifest (`files`) of the runner's own
    vouches for; None when `doc` does not parse as one: a folder it is in is not ours."""
    if not isinstance(doc, dict) or doc.get("format") != fmt or not isinstance(doc.get("job_digest"), str):
        return None
    if fmt == PROGRESS_FORMAT:
        paths = doc.get("paths")
    else:
        files = doc.get("files")
        paths = [f.get("path") if isinstance(f, dict) else None for f in files] if isinstance(files, list) else None
    if not isinstance(paths, list) or not all(_safe(p) for p in paths):
        return None
    return paths


def _safe(rel: Any) -> bool:
    """A relative path inside the folder: no empty, `.` or `..` part, not absolute, no NUL."""
    return (isinstance(rel, str) and not rel.startswith("/") and "\0" not in rel
            and all(part not in ("", ".", "..") for part in rel.split("/")))


def _entries(folder: Path) -> list[str]:
    """Every file and folder under `folder` (relative, `/`-separated), symlinks not followed."""
    out: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            children = list(os.scandir(folder / rel if rel else folder))
        except FileNotFoundError:
            continue
        for c in children:
            name = f"{rel}/{c.name}" if rel else c.name
            out.append(name)
            if c.is_dir(follow_symlinks=False):
                stack.append(name)
    return sorted(out)


def _progress_file(rel: str) -> bool:
    """The progress folder and the records the runner keeps in it."""
    if rel == PROGRESS:
        return True
    head, _, name = rel.partition("/")
    base = name[:-len(PARTIAL)] if name.endswith(PARTIAL) else name
    return head == PROGRESS and "/" not in name and (base == "job.json" or (base.startswith("rank_") and base.endswith(".json")))


def _temporary_of(rel: str, paths: set[str]) -> bool:
    """`rel` is a temporary name (runner.durable) of one of `paths`."""
    if not rel.endswith(PARTIAL):
        return False
    return any(rel.startswith(p) for p in paths)


def _folders_above(paths: set[str]) -> set[str]:
    """The folders on the way to `paths` (relative)."""
    return {p.rsplit("/", i)[0] for p in paths for i in range(1, p.count("/") + 1)}


def _some(names: list[str]) -> str:
    return one_line(", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else ""))


def _real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _between(top: Path, folder: Path) -> list[Path]:
    """`folder` and the folders above it, up to and including `top`."""
    rel = folder.relative_to(top)
    return [top, *(top / Path(*rel.parts[:i]) for i in range(1, len(rel.parts) + 1))]


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
