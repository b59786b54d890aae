"""Crash safety and resume (issue #8; SPEC 3 "Never lose data").

The kill loop runs the job in a forked child that SIGKILLs itself at its n-th
filesystem call (os.pwrite, os.fsync, os.replace, ...), for every n from the first call
to the last, then reruns the job and checks: no file under a final name was ever
incomplete, the manifest appears only with every file, the rerun finishes with the same
bytes as an uninterrupted run, and files an earlier run finished (and recorded) are kept,
not rewritten (same inode and mtime). A second loop kills real `autotrans` processes
(with their worker processes) after timed delays."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from runner import durable
from runner.cli import main
from runner.outputs import LOCK, MANIFEST, PROGRESS
from tests import oracle

SPECS = {f"layer{i}.w": ((16, 8), "F32") for i in range(3)} | {"norm": ((8,), "BF16"), "emb": ((32, 8), "F16")}
# os functions through which the runner changes files: each call is a kill point
FS_CALLS = ("open", "pwrite", "copy_file_range", "sendfile", "write", "fsync", "replace", "rename", "unlink", "mkdir", "rmdir")


def tp2(specs) -> dict:
    return oracle.strategy([[0, 1]], {n: oracle.param(s, d, dev_matrix=[2], tensor_map=[0] + [-1] * (len(s) - 1))
                                      for n, (s, d) in specs.items()})


def dp2_tp2(specs) -> dict:
    return oracle.strategy([[0, 1, 2, 3]], {
        n: oracle.param(s, d, dev_matrix=[2, 2], tensor_map=[-1] * (len(s) - 1) + [0] if len(s) == 2 else [-1],
                        opt_shard=2 if len(s) == 2 else 1)
        for n, (s, d) in specs.items()})


def make_source(root: Path, specs=SPECS) -> None:
    """tp2 source checkpoint (root/ckpt, root/strategy), destination strategy root/dst."""
    oracle.write_distributed(oracle.random_full(specs, seed=5), tp2(specs), root)
    oracle.write_strategy(dp2_tp2(specs), root / "dst")


def job(root: Path, out: Path, **extra) -> Path:
    keys = {"load_checkpoint": str(root / "ckpt"), "src_strategy_path_or_dir": str(root / "strategy"),
            "dst_strategy_path_or_dir": str(root / "dst"), "output_dir": str(out), **extra}
    path = out.parent / f"{out.name}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
    return path


def outputs(out: Path) -> dict[str, bytes]:
    """Every file under its final name in output_dir, but the progress records, the
    manifest (which hold times) and the lock file (a killed holder's line stays in it):
    relative path -> bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and PROGRESS not in p.parts and p.name not in (MANIFEST, LOCK)}


def manifest_sans_time(out: Path) -> dict:
    doc = json.loads((out / "transformed_checkpoint" / MANIFEST).read_text())
    doc.pop("elapsed_s")
    return doc


def fork_run(args: list[str], kill_at: int = 0) -> tuple[int | None, int]:
    """Run the CLI in a forked child that SIGKILLs itself at its `kill_at`-th filesystem
    call (0: never). Returns (exit code, or None when killed; calls made)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(rfd)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            calls = [0]

            def counted(fn):
                def call(*a, **k):
                    calls[0] += 1
                    if calls[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*a, **k)
                return call

            for name in FS_CALLS:
                setattr(os, name, counted(getattr(os, name)))
            # a killed process loses nothing the page cache holds, so durability is not
            # what this tests: skipping the disk flush keeps the loop fast
            os.fsync = counted(lambda fd: None)
            code = main(args)
            os.write(wfd, f"{code} {calls[0]}".encode())
        finally:
            os._exit(0)
    os.close(wfd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(rfd) as f:
        report = f.read()
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return None, kill_at
    code, calls = map(int, report.split())
    return code, calls


def check_intact(out: Path, ref: dict[str, bytes]) -> None:
    """What a killed run leaves: final names hold only complete, right files; progress
    records are whole JSON; a manifest only with every file."""
    got = outputs(out)
    for name, data in got.items():
        if not name.endswith(durable.PARTIAL):
            assert name in ref and data == ref[name], f"{name} is under its final name but not complete"
    tc = out / "transformed_checkpoint"
    for rec in (tc / PROGRESS).glob("*.json") if (tc / PROGRESS).exists() else ():
        json.loads(rec.read_text())
    if (tc / MANIFEST).exists():
        assert {k: v for k, v in got.items() if k.startswith("transformed")} == {k: v for k, v in ref.items() if k.startswith("transformed")}


def finished_files(out: Path) -> dict[str, tuple[int, int]]:
    """Rank files a progress record vouches for: path -> (inode, mtime_ns)."""
    tc = out / "transformed_checkpoint"
    done = {}
    for rec in (tc / PROGRESS).glob("rank_*.json") if (tc / PROGRESS).exists() else ():
        path = tc / json.loads(rec.read_text())["file"]
        if path.exists():
            st = path.stat()
            done[str(path)] = (st.st_ino, st.st_mtime_ns)
    return done


def test_sigkill_at_every_filesystem_call_then_rerun(tmp_path: Path) -> None:
    make_source(tmp_path)
    ref_out = tmp_path / "ref"
    assert main(["run", str(job(tmp_path, ref_out)), "--no-progress"]) == 0
    ref = outputs(ref_out)
    assert sum(k.endswith(".safetensors") for k in ref) == 4

    code, total = fork_run(["run", str(job(tmp_path, tmp_path / "count")), "--no-progress"])
    assert code == 0 and total > 20
    kept = 0
    for n in range(1, total + 1):
        out = tmp_path / f"k{n}"
        cfg = ["run", str(job(tmp_path, out)), "--no-progress"]
        code, _ = fork_run(cfg, kill_at=n)
        assert code is None, f"the run was not killed at call {n}"
        check_intact(out, ref)
        done = finished_files(out)
        if n % 7 == 0:  # a rerun killed in its turn (if it gets that far), resumed once more
            assert fork_run(cfg, kill_at=max(1, n // 4))[0] in (None, 0)
            check_intact(out, ref)
            done = {p: s for p, s in finished_files(out).items() if done.get(p, s) == s}
        code, _ = fork_run(cfg)
        assert code == 0, f"rerun after a kill at call {n} failed"
        assert outputs(out) == ref, f"kill at call {n}: rerun output differs from an uninterrupted run"
        assert manifest_sans_time(out) == manifest_sans_time(ref_out)
        assert not [p for p in out.rglob("*" + durable.PARTIAL)], f"kill at call {n}: temporary files left"
        for path, stamp in done.items():
            st = Path(path).stat()
            assert (st.st_ino, st.st_mtime_ns) == stamp, f"kill at call {n}: finished file {path} was rewritten"
        kept += len(done)
    assert kept > 0  # some kill points fell after finished files, which were then kept



def test_sigkill_during_a_conversion_then_rerun(tmp_path: Path) -> None:
    """HF -> Megatron TP2 PP2 (staging files, torch.save, renames) killed at spread-out
    filesystem calls: nothing incomplete under a final name, and every rerun ends with
    the uninterrupted run's bytes."""
    from tests.convert_util import make_hf

    hf = make_hf(tmp_path / "hf", "llama")

    def cfg(out: Path) -> list[str]:
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(json.dumps({"load_checkpoint": str(hf), "output_format": "megatron", "output_dir": str(out),
                                    "parallel_config": {"model_parallel": 2, "pipeline_stage": 2}}))
        return ["run", str(path), "--no-progress"]

    assert main(cfg(tmp_path / "ref")) == 0
    ref = outputs(tmp_path / "ref")
    assert sum(k.endswith(".pt") for k in ref) == 4
    code, total = fork_run(cfg(tmp_path / "count"))
    assert code == 0 and total > 20
    for n in sorted({1 + i * (total - 1) // 24 for i in range(25)}):
        out = tmp_path / f"k{n}"
        code, _ = fork_run(cfg(out), kill_at=n)
        assert code is None, f"the run was not killed at call {n}"
        check_intact(out, ref)
        code, _ = fork_run(cfg(out))
        assert code == 0, f"rerun after a kill at call {n} failed"
        assert outputs(out) == ref, f"kill at call {n}: rerun output differs from an uninterrupted run"
        assert not [p for p in out.rglob("*" + durable.PARTIAL)], f"kill at call {n}: temporary files left"

def test_timed_sigkill_of_process_group_with_workers(tmp_path: Path) -> None:
    """Real processes (the CLI plus transform_process_num workers) killed at spread-out
    moments; every rerun ends with the uninterrupted run's bytes."""
    specs = {f"layer{i}.w": ((512, 256), "F32") for i in range(8)}
    make_source(tmp_path, specs)

    def start(out: Path) -> subprocess.Popen:
        cfg = job(tmp_path, out, transform_process_num=2)
        return subprocess.Popen([sys.executable, "-m", "runner", "run", str(cfg), "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    t0 = time.monotonic()
    proc = start(tmp_path / "ref")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    duration = time.monotonic() - t0
    ref = outputs(tmp_path / "ref")
    for i in range(5):
        out = tmp_path / f"t{i}"
        proc = start(out)
        time.sleep(duration * (i + 1) / 6)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if out.exists():
            check_intact(out, ref)
        rerun = start(out)
        assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
        assert outputs(out) == ref
        assert not [p for p in out.rglob("*" + durable.PARTIAL)]


def test_workers_end_when_their_parent_is_killed_alone(tmp_path: Path) -> None:
    """SIGKILL of the CLI process alone (not its group) while its transform_process_num
    workers run: within 5 s no process it started is left (SPEC 3 "Signals"), and the
    rerun gives the bytes of an uninterrupted run."""
    import psutil

    specs = {f"layer{i}.w": ((512, 256), "F32") for i in range(8)}
    make_source(tmp_path, specs)
    assert main(["run", str(job(tmp_path, tmp_path / "ref")), "--no-progress"]) == 0
    out = tmp_path / "out"
    cfg = job(tmp_path, out, transform_process_num=2)
    proc = subprocess.Popen([sys.executable, "-m", "runner", "run", str(cfg), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    parent = psutil.Process(proc.pid)
    workers: list = []
    started: list = []
    try:
        while len(workers) < 2 and proc.poll() is None:
            workers = [c for c in parent.children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
            time.sleep(0.01)
        started = parent.children(recursive=True)
        assert len(workers) == 2 and proc.poll() is None, "the job ended before both workers started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(started):
            time.sleep(0.1)
        assert not _alive(started), [p.cmdline() for p in _alive(started)]
    finally:  # a failure leaves no stray process
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in _alive(started):
            p.kill()
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 0
    assert outputs(out) == outputs(tmp_path / "ref")


def _alive(procs: list) -> list:
    import psutil

    def running(p) -> bool:
        """Not yet ended; one whose memory is released (no command line left) is in its
        last step of exiting and writes nothing more."""
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE and bool(p.cmdline())
        except psutil.NoSuchProcess:
            return False
    return [p for p in procs if running(p)]


# -- disk full and permissions --------------------------------------------------------------
def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("autotrans: error: ")]
    assert len(errors) == 1 and "internal error" not in lines[-1] and "Traceback" not in "\n".join(lines), lines
    return errors[0]


def failing(fn, errno_: int, after: int, match=lambda *a: True):
    """`fn` that raises OSError(errno_) from its `after`-th matching call on."""
    calls = [0]

    def call(*a, **k):
        if match(*a):
            calls[0] += 1
            if calls[0] >= after:
                raise OSError(errno_, os.strerror(errno_), a[0])
        return fn(*a, **k)
    return call


@pytest.mark.parametrize("after", [1, 3, 6, 9])
def test_disk_full_mid_file_then_resume(tmp_path: Path, monkeypatch, capsys, after: int) -> None:
    make_source(tmp_path)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    assert main(["run", str(job(tmp_path, tmp_path / "ref")), "--no-progress"]) == 0
    ref = outputs(tmp_path / "ref")
    out = tmp_path / "out"
    cfg = ["run", str(job(tmp_path, out)), "--no-progress"]
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", failing(os.pwrite, errno.ENOSPC, after))
        m.setattr(os, "copy_file_range", failing(os.copy_file_range, errno.ENOSPC, after))
        assert main(cfg) == 1
    line = one_error_line(capsys)
    assert "disk full" in line and "run the job again" in line, line
    check_intact(out, ref)
    assert not list(out.rglob("*" + durable.PARTIAL)), "a failed write left its temporary file"
    assert not (out / "transformed_checkpoint" / MANIFEST).exists()
    done = finished_files(out)
    assert main(cfg) == 0
    assert outputs(out) == ref
    for path, stamp in done.items():
        st = Path(path).stat()
        assert (st.st_ino, st.st_mtime_ns) == stamp, f"{path} was rewritten"


@pytest.mark.parametrize("err,phrase", [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only"),
                                        (errno.ENOSPC, "disk full")])
def test_unwritable_output_folder_is_one_clear_line(tmp_path: Path, monkeypatch, capsys, err: int, phrase: str) -> None:
    """Whatever write fails first (folder, strategy file, progress record, rank file)."""
    make_source(tmp_path)
    out = tmp_path / "out"
    real_open = os.open
    for nth in (1, 2, 4, 8):
        with monkeypatch.context() as m:
            m.setattr(os, "open", failing(real_open, err, nth, lambda p, flags, *a: str(p).startswith(str(out))))
            m.setattr(os, "mkdir", failing(os.mkdir, err, nth + 1, lambda p, *a: str(p).startswith(str(out))))
            code = main(["run", str(job(tmp_path, out)), "--no-progress"])
        assert code == 1
        line = one_error_line(capsys)
        assert phrase in line and str(out) in line, line
        assert not list(out.rglob("*" + durable.PARTIAL)) if out.exists() else True


def test_real_disk_full_on_tiny_tmpfs_then_resume(tmp_path: Path, capsys) -> None:
    """A real ENOSPC: the output filesystem is a tmpfs too small for the job; after it
    grows, the same job resumes and ends with the uninterrupted run's bytes."""
    specs = {f"layer{i}.w": ((256, 128), "F32") for i in range(4)}  # 4 x 128 KiB per layer
    make_source(tmp_path, specs)
    assert main(["run", str(job(tmp_path, tmp_path / "ref")), "--no-progress"]) == 0
    ref = outputs(tmp_path / "ref")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "out"
        cfg = ["run", str(job(tmp_path, out)), "--no-progress"]
        capsys.readouterr()
        assert main(cfg) == 1
        assert "disk full" in one_error_line(capsys)
        check_intact(out, ref)
        assert not list(out.rglob("*" + durable.PARTIAL))
        done = finished_files(out)
        assert done, "the tmpfs should hold at least one finished file"
        subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
        assert main(cfg) == 0
        assert outputs(out) == ref
        for path, stamp in done.items():
            st = Path(path).stat()
            assert (st.st_ino, st.st_mtime_ns) == stamp
    finally:
        # lazy: a file still open elsewhere in this process (a busy machine delays its
        # collection) must not leave the mount behind under pytest's temporary folders
        subprocess.run(["umount", "--lazy", str(mnt)], check=True)


# -- the source is never touched; the output folder is ours or refused ------------------------
def snapshot(*roots: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file and folder under `roots`: bytes (files), mtime_ns, inode."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            out[str(p)] = (p.read_bytes() if p.is_file() else b"", st.st_mtime_ns, st.st_ino)
    return out


def test_source_and_source_strategy_are_never_written(tmp_path: Path, capsys) -> None:
    make_source(tmp_path)
    before = snapshot(tmp_path / "ckpt", tmp_path / "strategy")
    assert main(["run", str(job(tmp_path, tmp_path / "out", verify=True)), "--no-progress"]) == 0
    assert "source and output are bit-identical" in capsys.readouterr().out  # verify: true ran
    for inside in (tmp_path / "ckpt", tmp_path / "ckpt" / "rank_0", tmp_path / "strategy", tmp_path / "strategy" / "out", tmp_path):
        for strategy_only in (False, True):
            cfg = job(tmp_path, tmp_path / "x", output_dir=str(inside), only_save_strategy=strategy_only)
            capsys.readouterr()
            assert main(["run", str(cfg), "--no-progress"]) == 2, inside
            assert "overlaps the job's input" in one_error_line(capsys)
    assert snapshot(tmp_path / "ckpt", tmp_path / "strategy") == before


def _strategy_symlink(tmp: Path) -> tuple[Path, list[Path]]:
    """output_dir/strategy links to the source strategy folder."""
    make_source(tmp)
    (tmp / "out").mkdir()
    (tmp / "out" / "strategy").symlink_to(tmp / "strategy")
    return job(tmp, tmp / "out"), [tmp / "strategy", tmp / "ckpt"]


def _parent_alias(tmp: Path, how: str) -> tuple[Path, list[Path]]:
    """output_dir is another name for the folder that holds the source and its strategy."""
    src = tmp / "src"
    make_source(src)
    alias = tmp / "alias"
    if how == "symlink":
        alias.symlink_to(src)
    else:
        alias.mkdir()
        bind = subprocess.run(["mount", "--bind", str(src), str(alias)], capture_output=True, text=True)
        assert bind.returncode == 0, f"this test needs root and mount(8) for a bind mount: {bind.stderr.strip()}"
    return job(src, alias), [src]


def _transformed_checkpoint_symlink(tmp: Path) -> tuple[Path, list[Path]]:
    """The job's source is an earlier job's output, and output_dir/transformed_checkpoint
    links to it."""
    make_source(tmp)
    first = tmp / "first"
    assert main(["run", str(job(tmp, first)), "--no-progress"]) == 0
    out = tmp / "out"
    out.mkdir()
    (out / "transformed_checkpoint").symlink_to(first / "transformed_checkpoint")
    cfg = job(tmp, out, load_checkpoint=str(first / "transformed_checkpoint"), src_strategy_path_or_dir=str(first / "strategy"),
              dst_strategy_path_or_dir=str(tmp / "strategy"))
    return cfg, [first]


def _adapter_in_output(tmp: Path) -> tuple[Path, list[Path]]:
    """lora.adapter lies in transformed_checkpoint/ of an earlier job's output (whose
    claim would empty it before the adapter is read)."""
    g = torch.Generator().manual_seed(3)
    save_file({"w.weight": torch.randn(16, 8, generator=g)}, str(tmp / "base.safetensors"))
    out = tmp / "out"
    cfg = tmp / "lora.yaml"
    cfg.write_text(f"load_checkpoint: {tmp / 'base.safetensors'}\nuse_parallel: false\noutput_dir: {out}\n")
    assert main(["run", str(cfg), "dtype=bf16", "--no-progress"]) == 0
    adapter = out / "transformed_checkpoint" / "adapter"
    adapter.mkdir()
    save_file({"w.lora_A.weight": torch.randn(2, 8, generator=g), "w.lora_B.weight": torch.randn(16, 2, generator=g)},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    cfg.write_text(cfg.read_text() + f"lora: {{adapter: {adapter}}}\n")
    return cfg, [adapter, tmp / "base.safetensors"]


def _reference_in_output(tmp: Path) -> tuple[Path, list[Path]]:
    """reference_hf_dir is what output_dir/transformed_checkpoint links to."""
    from tests.convert_util import make_hf

    hf = make_hf(tmp / "hf", "qwen2")
    shutil.copytree(hf, tmp / "ref")
    out = tmp / "out"
    out.mkdir()
    (out / "transformed_checkpoint").symlink_to(tmp / "ref")
    cfg = tmp / "hf.yaml"
    cfg.write_text(f"load_checkpoint: {hf}\noutput_format: hf\nreference_hf_dir: {tmp / 'ref'}\noutput_dir: {out}\n")
    return cfg, [tmp / "ref", hf]


OVERLAPS = {"strategy_symlink": _strategy_symlink,
            "parent_symlink_alias": lambda tmp: _parent_alias(tmp, "symlink"),
            "parent_bind_mount": lambda tmp: _parent_alias(tmp, "bind"),
            "transformed_checkpoint_symlink": _transformed_checkpoint_symlink,
            "adapter_in_output": _adapter_in_output,
            "reference_in_output": _reference_in_output}


@pytest.mark.parametrize("case", OVERLAPS)
@pytest.mark.parametrize("strategy_only", [False, True])
def test_output_tree_that_overlaps_an_input_by_identity_is_refused(tmp_path: Path, capsys, case: str, strategy_only: bool) -> None:
    """Folders of the output tree are compared with every input by device and inode,
    symlinks resolved: a symlinked folder, an alias or a bind mount of the source's
    folder, a LoRA adapter or a reference folder inside the output: exit 2 with one line,
    and the inputs keep their bytes, mtimes and inodes. A dry run too."""
    cfg, inputs = OVERLAPS[case](tmp_path)
    try:
        before = snapshot(*inputs)
        capsys.readouterr()
        args = ["run", str(cfg), "--no-progress"] + (["only_save_strategy=true"] if strategy_only else [])
        assert main(args) == 2
        assert "overlaps the job's input" in one_error_line(capsys)
        assert snapshot(*inputs) == before
    finally:
        if case == "parent_bind_mount":
            subprocess.run(["umount", str(tmp_path / "alias")], check=False)


def test_foreign_folder_refused_other_job_replaced_same_job_skipped(tmp_path: Path, capsys) -> None:
    make_source(tmp_path)
    out = tmp_path / "out"
    tc = out / "transformed_checkpoint"
    tc.mkdir(parents=True)
    (tc / "precious.txt").write_text("not ours")
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 2
    assert "not empty and was not written by autotrans" in one_error_line(capsys)
    assert (tc / "precious.txt").read_text() == "not ours" and len(list(tc.iterdir())) == 1

    (tc / "precious.txt").unlink()
    assert main(["run", str(job(tmp_path, out, prefix="other_")), "--no-progress"]) == 0
    assert (tc / "rank_0" / "other_0.safetensors").exists()
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 0  # another job: replaces it
    assert not (tc / "rank_0" / "other_0.safetensors").exists()
    ref = outputs(out)
    stamps = snapshot(tc)
    capsys.readouterr()
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 0  # the same job: nothing to do
    assert "already holds this job's complete output" in capsys.readouterr().err
    assert snapshot(tc) == stamps

    # a finished file damaged after the job: a rerun notices and rewrites only that file
    victim = tc / "rank_2" / "checkpoint_2.safetensors"
    victim.write_bytes(victim.read_bytes()[:-4])
    others = {k: v for k, v in snapshot(tc).items() if k.endswith(".safetensors") and "rank_2" not in k}
    assert len(others) == 3
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 0
    assert outputs(out) == ref
    assert {k: v for k, v in snapshot(tc).items() if k in others} == others


@pytest.mark.parametrize("lure", ["foreign_manifest", "empty_progress_folder", "manifest_of_another_format"])
def test_a_folder_no_runner_record_vouches_for_is_refused(tmp_path: Path, capsys, lure: str) -> None:
    """A file named autotrans.json that is not the runner's manifest, or an empty
    .autotrans-progress/ folder, does not make the user's folder the runner's: refused
    with one line, every file kept."""
    make_source(tmp_path)
    out = tmp_path / "out"
    tc = out / "transformed_checkpoint"
    (tc / "rank_0").mkdir(parents=True)
    (tc / "rank_0" / "checkpoint_0.safetensors").write_bytes(b"the user's weights")
    (tc / "notes.txt").write_text("mine")
    if lure == "foreign_manifest":
        (tc / MANIFEST).write_text('{"files": []}')
    elif lure == "empty_progress_folder":
        (tc / PROGRESS).mkdir()
    else:
        (tc / MANIFEST).write_text(json.dumps({"format": "someone-else", "job_digest": "x", "files": [{"path": "notes.txt"}]}))
    before = snapshot(tc)
    capsys.readouterr()
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "not empty and was not written by autotrans" in line and "notes.txt" in line, line
    assert snapshot(tc) == before


def test_user_files_in_an_hf_output_survive_a_rerun_with_other_options(tmp_path: Path, capsys) -> None:
    """The run says to copy tokenizer files into the HF output; the user does, and runs
    again with another max_shard_size: the earlier shards are replaced, the user's files
    kept byte for byte, and a file of theirs where the job would write is refused."""
    from tests.convert_util import hf_tensors, make_hf

    hf = make_hf(tmp_path / "hf", "qwen2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf / name).unlink(missing_ok=True)
    out = tmp_path / "out"
    cfg = tmp_path / "hf.yaml"
    cfg.write_text(f"load_checkpoint: {hf}\noutput_format: hf\noutput_dir: {out}\n")
    assert main(["run", str(cfg), "--no-progress"]) == 0
    assert "copy the model's tokenizer in" in capsys.readouterr().err
    tc = out / "transformed_checkpoint"
    mine = {"tokenizer.json": b'{"user": 1}', "tokenizer_config.json": b'{"user": 2}', "sub/readme.md": b"mine"}
    for name, data in mine.items():
        (tc / name).parent.mkdir(exist_ok=True)
        (tc / name).write_bytes(data)
    kept = snapshot(tc / "sub")
    assert main(["run", str(cfg), "max_shard_size=100KB", "--no-progress"]) == 0
    assert {n: (tc / n).read_bytes() for n in mine} == mine and snapshot(tc / "sub") == kept
    shards = sorted(p.name for p in tc.glob("model*.safetensors"))
    assert len(shards) > 1 and all(n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards), shards
    want = hf_tensors(hf)
    got = hf_tensors(tc)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    one_shard = tc / "model-00001-of-00001.safetensors"  # where a run with the default max_shard_size writes
    one_shard.write_bytes(b"the user's own model")
    capsys.readouterr()
    assert main(["run", str(cfg), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert f"did not write where this job writes ({one_shard.name})" in line, line
    assert one_shard.read_bytes() == b"the user's own model"
    assert {n: (tc / n).read_bytes() for n in mine} == mine


# -- a changed source is never called complete ------------------------------------------------
def _stepped_source(root: Path, full: dict, step: int) -> None:
    oracle.write_distributed(full, tp2(SPECS), root, prefix=f"llama-{step}_")
    oracle.write_strategy(dp2_tp2(SPECS), root / "dst")


def test_a_newer_step_file_in_every_rank_folder_redoes_the_job(tmp_path: Path, capsys) -> None:
    old, new = oracle.random_full(SPECS, seed=5), oracle.random_full(SPECS, seed=6)
    _stepped_source(tmp_path, old, 1)
    out = tmp_path / "out"
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 0
    assert oracle.check_output(out / "transformed_checkpoint", old, dp2_tp2(SPECS)) == 4
    _stepped_source(tmp_path, new, 2)  # llama-2_r beside llama-1_r: the newest step is read
    capsys.readouterr()
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 0
    assert "nothing to do" not in capsys.readouterr().err
    assert oracle.check_output(out / "transformed_checkpoint", new, dp2_tp2(SPECS)) == 4
    sources = json.loads((out / "transformed_checkpoint" / MANIFEST).read_text())["source_files"]
    assert sorted(Path(f["path"]).name for f in sources) == ["llama-2_0.safetensors", "llama-2_1.safetensors"]


def test_source_files_replaced_in_place_redo_the_job(tmp_path: Path, capsys) -> None:
    """Same names, same sizes, new bytes and mtimes: not the source the output was made from."""
    old, new = oracle.random_full(SPECS, seed=5), oracle.random_full(SPECS, seed=6)
    _stepped_source(tmp_path, old, 1)
    out = tmp_path / "out"
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 0
    files = sorted((tmp_path / "ckpt").rglob("*.safetensors"))
    sizes = [p.stat().st_size for p in files]
    _stepped_source(tmp_path, new, 1)
    assert [p.stat().st_size for p in files] == sizes
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 0
    assert oracle.check_output(out / "transformed_checkpoint", new, dp2_tp2(SPECS)) == 4


def test_a_changed_reference_tokenizer_file_redoes_the_conversion(tmp_path: Path, capsys) -> None:
    """Files the job copies (the reference folder's config and tokenizer) are stamped
    too: a tokenizer changed since the output was written is copied again."""
    from tests.convert_util import make_hf

    hf = make_hf(tmp_path / "hf", "qwen2")
    (hf / "tokenizer.json").write_text('{"version": 1}')
    out = tmp_path / "out"
    cfg = tmp_path / "hf.yaml"
    cfg.write_text(f"load_checkpoint: {hf}\noutput_format: hf\ndtype: fp32\noutput_dir: {out}\n")
    assert main(["run", str(cfg), "--no-progress"]) == 0
    (hf / "tokenizer.json").write_text('{"version": 2}')
    capsys.readouterr()
    assert main(["run", str(cfg), "--no-progress"]) == 0
    assert "nothing to do" not in capsys.readouterr().err
    assert (out / "transformed_checkpoint" / "tokenizer.json").read_text() == '{"version": 2}'


def _touch_source_at_third_write(monkeypatch, victim: Path) -> None:
    """Give `victim` a new mtime in the middle of the job (at its third pwrite)."""
    real, calls = os.pwrite, [0]

    def pwrite(*a):
        calls[0] += 1
        if calls[0] == 3:
            st = victim.stat()
            os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return real(*a)
    monkeypatch.setattr(os, "pwrite", pwrite)


def test_a_source_file_changed_during_the_run_fails_the_job(tmp_path: Path, capsys, monkeypatch) -> None:
    """One line naming the file, exit 1, no manifest; the rerun finishes with the bytes of
    an uninterrupted run. runner.api.checkpoint_for_rank fails the same way."""
    from runner.api import checkpoint_for_rank
    from runner.errors import AutotransError

    make_source(tmp_path)
    assert main(["run", str(job(tmp_path, tmp_path / "ref")), "--no-progress"]) == 0
    victim = tmp_path / "ckpt" / "rank_1" / "ckpt_1.safetensors"
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _touch_source_at_third_write(m, victim)
        capsys.readouterr()
        assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 1
    line = one_error_line(capsys)
    assert str(victim) in line and "changed while the job ran" in line, line
    assert not (out / "transformed_checkpoint" / MANIFEST).exists()
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 0
    assert outputs(out) == outputs(tmp_path / "ref")

    api_out = tmp_path / "api"
    with monkeypatch.context() as m:
        _touch_source_at_third_write(m, victim)
        with pytest.raises(AutotransError, match="changed while the job ran"):
            checkpoint_for_rank(str(job(tmp_path, api_out)), 0)
    assert not (api_out / "transformed_checkpoint" / MANIFEST).exists()


def test_every_source_header_checked_before_any_output(tmp_path: Path, capsys) -> None:
    """A damaged last rank file fails the job before anything is written, whether the
    damage is in its size (truncated) or in what its header says (a wrong shape)."""
    make_source(tmp_path)
    last = tmp_path / "ckpt" / "rank_1" / "ckpt_1.safetensors"
    good = last.read_bytes()
    last.write_bytes(good[:-1])
    out = tmp_path / "out"
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 1
    assert "ckpt_1.safetensors" in one_error_line(capsys)
    assert not out.exists()

    shard = oracle.shard(oracle.random_full(SPECS, seed=5), tp2(SPECS), 1)
    shard["layer2.w"] = shard["layer2.w"].reshape(4, 16).contiguous()  # same bytes, wrong shape
    save_file(shard, str(last))
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 1
    line = one_error_line(capsys)
    assert "layer2.w" in line and "rank 1" in line, line
    assert not out.exists()


def test_output_bytes_do_not_depend_on_paths(tmp_path: Path, monkeypatch) -> None:
    """The same job from another working directory, with the source copied elsewhere and
    another output_dir, writes the same bytes (no paths, times or host names inside)."""

    make_source(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    monkeypatch.chdir(tmp_path / "a")
    assert main(["run", str(job(tmp_path / "a", tmp_path / "a" / "out")), "--no-progress"]) == 0
    time.sleep(0.01)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["run", str(job(tmp_path / "elsewhere" / "b", tmp_path / "o2")), "--no-progress"]) == 0
    a, b = outputs(tmp_path / "a" / "out"), outputs(tmp_path / "o2")
    assert len(a) >= 5 and a == b


# -- writers never follow a symlink inside the output tree ----------------------------------
def test_stale_temporary_names_that_are_symlinks_are_not_followed(tmp_path: Path, capsys) -> None:
    """Temporary names planted as symlinks to an outside file (rank file, strategy file,
    progress record, manifest) are removed, not written through."""
    make_source(tmp_path)
    ref_out = tmp_path / "ref"
    assert main(["run", str(job(tmp_path, ref_out)), "--no-progress"]) == 0
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"the user's file\n")
    out = tmp_path / "out"
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 0
    tc = out / "transformed_checkpoint"
    (tc / MANIFEST).unlink()
    (tc / "rank_0" / "checkpoint_0.safetensors").unlink()
    planted = [tc / "rank_0" / "checkpoint_0.safetensors.partial", tc / f"{MANIFEST}.partial",
               tc / PROGRESS / "job.json.partial", tc / PROGRESS / "rank_0.json.partial",
               out / "strategy" / "ckpt_strategy_rank_0.json.partial"]
    for p in planted:
        p.symlink_to(outside)
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 0
    assert outside.read_bytes() == b"the user's file\n"
    assert outputs(out) == outputs(ref_out)
    assert not [p for p in planted if os.path.lexists(p)]


def test_rank_folder_that_is_a_symlink_is_refused(tmp_path: Path, capsys) -> None:
    make_source(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 0
    tc = out / "transformed_checkpoint"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    for p in (tc / "rank_1").iterdir():
        p.unlink()
    (tc / "rank_1").rmdir()
    (tc / "rank_1").symlink_to(elsewhere)
    (tc / MANIFEST).unlink()
    capsys.readouterr()
    assert main(["run", str(job(tmp_path, out)), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "rank_1" in line and "symlink" in line, line
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"] and (elsewhere / "keep.txt").read_text() == "mine"


def test_reference_file_that_is_a_symlink_is_not_copied(tmp_path: Path, capsys) -> None:
    """A tokenizer file in the reference HF folder that links elsewhere would copy any
    readable file into the output: refused with one line, its content nowhere in the output."""
    from tests.convert_util import make_hf

    hf = make_hf(tmp_path / "hf", "qwen2")
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-KEY-MATERIAL")
    (hf / "tokenizer.json").symlink_to(secret)
    out = tmp_path / "out"
    cfg = tmp_path / "hf.yaml"
    cfg.write_text(f"load_checkpoint: {hf}\noutput_format: hf\noutput_dir: {out}\n")
    capsys.readouterr()
    assert main(["run", str(cfg), "--no-progress"]) == 1
    line = one_error_line(capsys)
    assert "tokenizer.json" in line and "symlink" in line, line
    assert not [p for p in out.rglob("*") if p.is_file() and b"SECRET" in p.read_bytes()]


# -- one run at a time per output_dir ---------------------------------------------------------
HOLD = """
import sys, time
from runner.outputs import lock_output
lock_output(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_second_run_on_a_held_output_dir_is_refused(tmp_path: Path, capsys) -> None:
    """While another process holds output_dir (a run in progress), a run is refused with
    one line naming the holder (pid, host, start), exit 1, and touches nothing there;
    once it is gone, the run proceeds. Runs one after another in one process work."""
    import socket

    make_source(tmp_path)
    out = tmp_path / "out"
    cfg = ["run", str(job(tmp_path, out)), "--no-progress"]
    assert main(cfg) == 0
    (out / "transformed_checkpoint" / MANIFEST).unlink()  # so that the next run has work to do
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        capsys.readouterr()
        assert main(cfg) == 1
        line = one_error_line(capsys)
        assert f"pid {holder.pid} on {socket.gethostname()}" in line and "in use by another autotrans run" in line, line
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(cfg) == 0
    assert main(cfg) == 0  # the lock of the run before was released


def blocked_on_a_lock(pid: int) -> bool:
    """Whether process `pid` waits for a file lock (a "->" line of /proc/locks)."""
    with open("/proc/locks") as f:
        return any(len(parts) > 5 and parts[1] == "->" and parts[5] == str(pid) for parts in map(str.split, f))


def test_checkpoint_for_rank_waits_while_output_dir_is_held(tmp_path: Path) -> None:
    """checkpoint_for_rank takes the same lock: while another process holds output_dir it
    waits on the lock (the kernel lists it as blocked) and changes nothing there; once the
    holder is gone it transforms and returns its rank's file."""
    make_source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        caller = subprocess.Popen([sys.executable, "-c", "import sys; from runner.api import checkpoint_for_rank; "
                                   "print(checkpoint_for_rank(sys.argv[1], 0, []))", str(job(tmp_path, out))],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 120
        while not blocked_on_a_lock(caller.pid):
            assert caller.poll() is None and time.monotonic() < deadline, caller.communicate()
            time.sleep(0.05)
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    stdout, stderr = caller.communicate(timeout=120)
    assert caller.returncode == 0, stderr
    assert Path(stdout.strip().splitlines()[-1]) == out / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors"


# A job that stops once it has claimed its output folder (lock held, record written) and
# goes on when the file named by argv[2] appears: a run caught in the middle, for certain.
PAUSED_RUN = """
import sys, time
from pathlib import Path
from runner import outputs
from runner.cli import main
claim = outputs.OutputFolder.claim
def paused(self, *args, **kwargs):
    claim(self, *args, **kwargs)
    print("claimed", flush=True)
    while not Path(sys.argv[2]).exists():
        time.sleep(0.01)
outputs.OutputFolder.claim = paused
sys.exit(main(["run", sys.argv[1], "--no-progress"]))
"""


def test_a_different_job_on_an_output_dir_in_use_is_refused_and_the_running_job_completes(tmp_path: Path, capsys) -> None:
    """Two different jobs (other dtype, so another job digest) on one output_dir at once:
    the second is refused in one line naming the first's pid, touching nothing; the first
    completes with exactly the files it writes alone."""
    make_source(tmp_path)
    out, alone, go = tmp_path / "out", tmp_path / "alone", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(job(tmp_path, out)), str(go)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    try:
        assert first.stdout.readline().strip() == "claimed"
        before = snapshot(out)
        capsys.readouterr()
        assert main(["run", str(job(tmp_path, out, dtype="fp32")), "--no-progress"]) == 1
        line = one_error_line(capsys)
        assert f"pid {first.pid} " in line and "in use by another autotrans run" in line, line
        assert snapshot(out) == before
    finally:
        go.touch()
        assert first.wait(timeout=60) == 0
    assert main(["run", str(job(tmp_path, alone)), "--no-progress"]) == 0
    files = sorted(p.relative_to(alone) for p in (alone / "transformed_checkpoint").rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(out) for p in (out / "transformed_checkpoint").rglob("*.safetensors"))
    assert all((alone / f).read_bytes() == (out / f).read_bytes() for f in files)


# -- signals ----------------------------------------------------------------------------------
def signalled_run(args: list[str], err: Path, plant: Callable[[], None]) -> int:
    """The CLI's exit status in a forked child, after `plant()` set up the signal it
    gets; its stderr goes to `err`."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            sys.stderr = open(err, "w", buffering=1)
            plant()
            os._exit(main(args))
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    return os.WEXITSTATUS(status)


def check_interrupted(args: list[str], out: Path, ref: Path, err: Path, name: str) -> None:
    """What an interrupted run leaves: one line, no temporary file, no manifest; the rerun
    gives the bytes of an uninterrupted run."""
    lines = err.read_text().strip().splitlines()
    assert lines == [f"autotrans: interrupted ({name}); run the same job again to resume"], lines
    assert not list(out.rglob("*" + durable.PARTIAL))
    assert not (out / "transformed_checkpoint" / MANIFEST).exists()
    assert main(args) == 0
    assert outputs(out) == outputs(ref)


SIGNALS = [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP"), (signal.SIGINT, 130, "SIGINT")]


@pytest.mark.parametrize("sig,code,name", SIGNALS)
def test_sigterm_and_sighup_end_a_job_as_ctrl_c_does(tmp_path: Path, sig: int, code: int, name: str) -> None:
    """The signal arrives in the middle of a rank file (at its 3rd write): one line,
    exit 128 + signal, no temporary file left, and the rerun gives the bytes of an
    uninterrupted run."""
    make_source(tmp_path)
    assert main(["run", str(job(tmp_path, tmp_path / "ref")), "--no-progress"]) == 0
    out = tmp_path / "out"
    cfg = ["run", str(job(tmp_path, out)), "--no-progress"]

    def plant() -> None:
        calls = [0]
        real = os.pwrite

        def pwrite(*a):
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), sig)
            return real(*a)
        os.pwrite = pwrite
    assert signalled_run(cfg, tmp_path / "stderr.txt", plant) == code
    check_interrupted(cfg, out, tmp_path / "ref", tmp_path / "stderr.txt", name)


@pytest.mark.parametrize("sig,code,name", SIGNALS[::2])
def test_a_signal_during_torch_save_is_an_interrupt(tmp_path: Path, sig: int, code: int, name: str) -> None:
    """SIGTERM or Ctrl-C while torch.save writes a Megatron rank file (at its 2nd write
    into the file) ends the job as an interrupt, not as torch's RuntimeError about the zip
    stream; the rerun gives the same bytes."""
    from runner.durable import DurableFile
    from tests.convert_util import make_hf

    hf = make_hf(tmp_path / "hf", "qwen2")
    keys = f"load_checkpoint: {hf}\noutput_format: megatron\nparallel_config: {{model_parallel: 2}}\n"
    (tmp_path / "ref.yaml").write_text(keys + f"output_dir: {tmp_path / 'ref'}\n")
    assert main(["run", str(tmp_path / "ref.yaml"), "--no-progress"]) == 0
    out = tmp_path / "out"
    (tmp_path / "out.yaml").write_text(keys + f"output_dir: {out}\n")
    cfg = ["run", str(tmp_path / "out.yaml"), "--no-progress"]

    def plant() -> None:
        real, writes = DurableFile.stream, [0]

        class Tripwire:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                writes[0] += 1
                if writes[0] == 2:
                    os.kill(os.getpid(), sig)
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)
        DurableFile.stream = lambda self: Tripwire(real(self))
    assert signalled_run(cfg, tmp_path / "stderr.txt", plant) == code
    check_interrupted(cfg, out, tmp_path / "ref", tmp_path / "stderr.txt", name)
