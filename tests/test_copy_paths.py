"""The executor's ways of moving bytes give the same files: pieces copied file to file
by the kernel (copy_file_range), by sendfile or by pread / pwrite where a filesystem
refuses the faster calls, and every piece gathered in memory; the checksum of each file
matches zlib's crc32 and catches a finished file damaged before a resume.

Each run reshards a tp2 checkpoint to tp4 (dim-0 splits: one run per piece; dim-1
splits: strided; replicated 1-D tensors: whole) and is checked against torch
slices of the full tensors (tests/oracle.py)."""

from __future__ import annotations

import errno
import json
import os
import threading
import zlib
from pathlib import Path

import pytest

from runner import durable, execute
from runner import run as run_module
from runner.cli import main
from runner.outputs import MANIFEST, PROGRESS
from tests import oracle

SPECS = {"emb": ((64, 16), "BF16"), "qkv": ((32, 16), "F32"), "proj": ((16, 32), "F32"), "down": ((8, 24), "F16"),
         "norm": ((16,), "BF16"), "scale": ((1,), "F32"), "steps": ((4,), "I64")}
SPLIT_DIM = {"emb": 0, "qkv": 0, "proj": 1, "down": 1}


def tp(n: int) -> dict:
    params = {}
    for name, (shape, dtype) in SPECS.items():
        tmap = [0 if d == SPLIT_DIM.get(name) else -1 for d in range(len(shape))]
        params[name] = oracle.param(shape, dtype, dev_matrix=[n], tensor_map=tmap)
    return oracle.strategy([list(range(n))], params)


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict]:
    full = oracle.random_full(SPECS, seed=3)
    oracle.write_distributed(full, tp(2), tmp_path)
    oracle.write_strategy(tp(4), tmp_path / "dst")
    return tmp_path, full


def job_file(root: Path, out: str) -> Path:
    job = root / f"{out}.yaml"
    job.write_text(json.dumps({"load_checkpoint": str(root / "ckpt"), "src_strategy_path_or_dir": str(root / "strategy"),
                               "dst_strategy_path_or_dir": str(root / "dst"), "output_dir": str(root / out)}))
    return job


def run(root: Path, out: str) -> Path:
    assert main(["run", str(job_file(root, out)), "--no-progress"]) == 0
    return root / out / "transformed_checkpoint"


def rank_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def counting(monkeypatch, name: str, fail: int | None = None, most: int | None = None) -> list[int]:
    """Count calls of os.`name`; make them fail with errno `fail`, or copy at most
    `most` bytes a call (a filesystem may copy less than asked)."""
    real, calls = getattr(os, name), []

    def call(*a):
        calls.append(1)
        if fail is not None:
            raise OSError(fail, os.strerror(fail))
        if most is not None:
            at = 3 if name == "sendfile" else 2  # where the byte count is
            a = (*a[:at], min(a[at], most), *a[at + 1:])
        return real(*a)
    monkeypatch.setattr(os, name, call)
    return calls


def test_kernel_copy_and_gathered_pieces_give_the_same_bytes(source, monkeypatch) -> None:
    root, full = source
    copies = counting(monkeypatch, "copy_file_range")
    kernel = run(root, "kernel")
    assert copies, "no piece went through copy_file_range"
    assert oracle.check_output(kernel, full, tp(4)) == 4
    with monkeypatch.context() as m:
        m.setattr(execute.LocalPool, "extent", lambda self, read: None)  # every piece through memory
        before = len(copies)
        gathered = run(root, "gathered")
        assert len(copies) == before
    assert rank_files(gathered) == rank_files(kernel)


@pytest.mark.parametrize("refused", [errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS])
def test_fallbacks_when_the_filesystem_refuses_give_the_same_bytes(source, monkeypatch, refused: int) -> None:
    root, full = source
    ref = rank_files(run(root, "ref"))
    copies = counting(monkeypatch, "copy_file_range", fail=refused)
    sends = counting(monkeypatch, "sendfile", most=5)  # short counts: the loop goes on
    assert rank_files(run(root, "sendfile")) == ref
    assert copies and len(sends) > len(copies)
    refused_too = counting(monkeypatch, "sendfile", fail=refused)
    assert rank_files(run(root, "pread")) == ref
    assert refused_too
    assert oracle.check_output(root / "pread" / "transformed_checkpoint", full, tp(4)) == 4


def test_short_kernel_copies_give_the_same_bytes(source, monkeypatch) -> None:
    root, _ = source
    ref = rank_files(run(root, "ref"))
    calls = counting(monkeypatch, "copy_file_range", most=7)
    assert rank_files(run(root, "short")) == ref
    assert len(calls) > 20


def test_a_disk_error_in_a_kernel_copy_is_one_line_and_no_partial_file(source, monkeypatch, capsys) -> None:
    root, _ = source
    counting(monkeypatch, "copy_file_range", fail=errno.ENOSPC)
    job = job_file(root, "full")
    assert main(["run", str(job), "--no-progress"]) == 1
    assert "disk full" in capsys.readouterr().err
    assert not list((root / "full").rglob("*" + durable.PARTIAL))


def test_manifest_checksums_are_zlib_crc32_of_the_files(source) -> None:
    root, _ = source
    out = run(root, "out")
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert len(files) == 4
    for f in files:
        assert f["crc32"] == zlib.crc32((out / f["path"]).read_bytes())


def test_resume_rewrites_a_finished_file_whose_bytes_changed_but_not_its_size_or_mtime(source) -> None:
    """A job killed before its manifest, rerun: a finished file damaged in place (one
    byte flipped, its size and mtime put back) is caught by its checksum alone and
    rewritten; the intact files are kept."""
    root, _ = source
    out = run(root, "out")
    ref = rank_files(out)
    (out / MANIFEST).unlink()  # as if killed after the last file, before the manifest
    victim = out / "rank_1" / "checkpoint_1.safetensors"
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.safetensors") if p != victim}
    assert len(kept) == 3 and (out / PROGRESS).is_dir()
    run(root, "out")
    assert rank_files(out) == ref
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept


def test_writeback_advice_taken_or_refused_gives_the_same_bytes(source, monkeypatch) -> None:
    root, _ = source
    ref = rank_files(run(root, "ref"))
    monkeypatch.setattr(execute, "_FLUSH_STEP", 1)  # advise after every write
    advised = counting(monkeypatch, "posix_fadvise")
    assert rank_files(run(root, "advised")) == ref
    assert len(advised) > 20
    refused = counting(monkeypatch, "posix_fadvise", fail=errno.EINVAL)
    assert rank_files(run(root, "refused")) == ref
    assert len(refused) == 4  # once per file, then the file is written without advice


def test_writer_threads_give_the_bytes_and_manifest_of_one_thread(source, monkeypatch) -> None:
    """Files written two at a time (one per core) are the files one thread writes."""
    root, full = source
    monkeypatch.setattr(run_module, "writer_threads", lambda: 1)
    one = run(root, "one")
    monkeypatch.setattr(run_module, "writer_threads", lambda: 2)
    two = run(root, "two")
    assert rank_files(one) == rank_files(two)
    listed = [{k: f[k] for k in ("path", "bytes", "crc32")} for f in json.loads((one / MANIFEST).read_text())["files"]]
    assert listed == [{k: f[k] for k in ("path", "bytes", "crc32")} for f in json.loads((two / MANIFEST).read_text())["files"]]
    assert oracle.check_output(two, full, tp(4)) == 4


def test_a_failing_writer_thread_stops_the_others_and_leaves_no_partial_file(source, monkeypatch, capsys) -> None:
    """A disk error in the second thread: one line, every thread's temporary removed, no
    manifest; the rerun writes what one thread writes."""
    root, _ = source
    monkeypatch.setattr(run_module, "writer_threads", lambda: 2)
    for name in ("pwrite", "copy_file_range"):
        real = getattr(os, name)

        def failing(*a, _real=real):
            if threading.current_thread() is not threading.main_thread():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return _real(*a)
        monkeypatch.setattr(os, name, failing)
    job = job_file(root, "full")
    assert main(["run", str(job), "--no-progress"]) == 1
    assert "disk full" in capsys.readouterr().err
    assert not list((root / "full").rglob("*" + durable.PARTIAL))
    assert not (root / "full" / "transformed_checkpoint" / MANIFEST).exists()
    monkeypatch.undo()
    assert main(["run", str(job), "--no-progress"]) == 0
    assert rank_files(root / "full" / "transformed_checkpoint") == rank_files(run(root, "ref"))


def test_an_interrupt_inside_creating_a_temporary_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    """A signal whose handler raises may land after the temporary file is created and
    before its descriptor is kept: the file is still removed."""
    real = os.fstat

    def interrupted(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fstat", interrupted)
    file = durable.DurableFile(tmp_path / "x.safetensors")
    with pytest.raises(KeyboardInterrupt):
        file.open()
    assert file.tmp.exists()  # created: the interrupt came after the file
    monkeypatch.setattr(os, "fstat", real)
    file.discard()
    assert not list(tmp_path.iterdir())
