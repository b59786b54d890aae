"""The one driver (DESIGN "One engine"): runs any compiled job (runner.compile) the
same way. Compare, claim the output folder, write the strategy files, write this
process's share of the units (keeping files an earlier run proved right), run the
finishing steps, write the manifest, summarize, verify.

Where the steps run is a World: LocalWorld is this process and its local workers;
runner.mpi.MpiWorld runs the same steps on every MPI rank, each step failing on all
at once, and splits the units over the ranks."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

from runner import __version__
from runner.compile import compile_job, own_strategy_folder, write_strategies
from runner.config import JobConfig
from runner.execute import LocalPool, SlicePool, WrittenFile
from runner.log import count, debug, say
from runner.outputs import OutputFolder, file_crc32
from runner.progress import Progress
from runner.units import Compiled, STRATEGY_DIR, Unit, check_unchanged, digest, stamp
from runner.verify import verify_compiled

T = TypeVar("T")


def balance(sizes: dict[int, int], workers: int) -> list[list[int]]:
    """Split unit keys into `workers` shares balanced by bytes (largest first)."""
    shares: list[list[int]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        i = loads.index(min(loads))
        shares[i].append(key)
        loads[i] += sizes[key]
    return [sorted(s) for s in shares]


def run_units(job: Compiled, units: list[Unit], folder: OutputFolder, base: SlicePool,
              on_bytes: Callable[[int], None] = lambda n: None,
              local: Callable[[int], bool] | None = None) -> list[WrittenFile]:
    """Plan and write `units`, keeping files an earlier run of this job proved right.
    `base`: where source regions come from; `local`: the source ranks this process sees
    (default all); reads prefer them, and only their files are stamped in records."""
    pool = job.wrap(base)
    try:
        return [_write_unit(job, unit, folder, pool, on_bytes, local) for unit in units]
    finally:
        pool.close()


def _write_unit(job: Compiled, unit: Unit, folder: OutputFolder, pool: SlicePool,
                on_bytes: Callable[[int], None], local: Callable[[int], bool] | None) -> WrittenFile:
    fp = job.plan(unit, local)
    path = job.out_dir / unit.path
    sources = job.unit_sources(fp, local)
    kept = folder.finished(unit.key, path, sources)
    if kept is not None:
        on_bytes(unit.write_bytes)
        return kept
    written = job.write(unit, fp, pool, path, on_bytes)
    folder.record(unit.key, written, sources)
    return written


def writer_threads() -> int:
    """Threads one process writes with: one per core, at most two (each may hold a
    gathered tensor, so memory grows with them, and two already keep the disk busy)."""
    return min(2, len(os.sched_getaffinity(0)))


class _Stopped(Exception):
    """Another writing thread failed: this one drops its file at its next piece."""


def run_threads(job: Compiled, units: list[Unit], folder: OutputFolder, new_pool: Callable[[], SlicePool],
                on_bytes: Callable[[int], None], threads: int) -> list[WrittenFile]:
    """Write `units` with up to `threads` threads, this one included, each taking the
    largest unit left. The copies (copy_file_range, pread, pwrite) and the checksum run
    in the kernel and in ISA-L, outside Python's lock, so on two cores two files go at
    nearly twice the pace of one. A failure in any thread (an interrupt arrives in this
    one) stops the others at their next piece, their temporary files removed."""
    threads = min(threads, len(units))
    if threads <= 1:
        return run_units(job, units, folder, new_pool(), on_bytes)
    todo = sorted(units, key=lambda u: (-u.write_bytes, u.key))
    lock, stop = threading.Lock(), threading.Event()
    done: dict[int, WrittenFile] = {}
    errors: list[BaseException] = []

    def counted(n: int) -> None:
        if stop.is_set():
            raise _Stopped()
        with lock:
            on_bytes(n)

    def take() -> Unit | None:
        with lock:
            return todo.pop(0) if todo and not stop.is_set() else None

    def work() -> None:
        try:
            pool = job.wrap(new_pool())
            try:
                while (unit := take()) is not None:
                    written = _write_unit(job, unit, folder, pool, counted, None)
                    with lock:
                        done[unit.key] = written
            finally:
                pool.close()
        except BaseException as e:  # noqa: B036 - handed to the calling thread, which raises it
            stop.set()
            errors.append(e)

    others = [threading.Thread(target=work, name=f"autotrans-writer-{i}", daemon=True) for i in range(1, threads)]
    try:
        for t in others:
            t.start()
        work()
        for t in others:
            t.join()
    except BaseException:  # an interrupt outside work(): stop the others before it goes on
        stop.set()
        for t in others:
            if t.ident is not None:
                t.join()
        raise
    failure = next((e for e in errors if not isinstance(e, _Stopped)), None)
    errors.clear()  # no cycle error -> traceback -> this frame -> errors: the job's lock goes with its frames
    if failure is not None:
        try:
            raise failure
        finally:
            del failure
    return [done[u.key] for u in units]


_COUNTER = None  # a worker process's shared byte counter, set by _init_worker


def _init_worker(counter, parent: int) -> None:
    global _COUNTER
    _COUNTER = counter
    _end_with_parent(parent)


def _end_with_parent(parent: int) -> None:
    """A worker ends when its parent does, even by SIGKILL (it would otherwise wait on its
    work pipe forever): Linux kills it (PR_SET_PDEATHSIG); a thread that watches
    getppid() covers other systems and a parent gone before the prctl call."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def _worker(cfg: JobConfig, keys: list[int], folder_digest: str) -> list[WrittenFile]:
    """A local worker compiles the same job (deterministic) and writes its units."""
    def on_bytes(n: int) -> None:
        with _COUNTER.get_lock():
            _COUNTER.value += n

    job = compile_job(cfg)
    units = [u for u in job.units if u.key in set(keys)]
    return run_units(job, units, OutputFolder(job.out_dir, folder_digest), LocalPool(job.source), on_bytes)


def execute_local(job: Compiled, folder: OutputFolder, progress) -> list[WrittenFile]:
    """Every unit in this process, or in `transform_process_num` workers."""
    nproc = min(job.cfg.transform_process_num, len(job.units))
    if nproc <= 1:
        return run_threads(job, list(job.units), folder, lambda: LocalPool(job.source), progress.update, writer_threads())
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    shares = balance({u.key: u.write_bytes for u in job.units}, nproc)
    written: list[WrittenFile] = []
    with ProcessPoolExecutor(nproc, mp_context=ctx, initializer=_init_worker, initargs=(counter, os.getpid())) as ex:
        futures = [ex.submit(_worker, job.cfg, share, folder.digest) for share in shares if share]
        seen = 0
        while not all(f.done() for f in futures):
            time.sleep(0.1)
            progress.update(counter.value - seen)
            seen = counter.value
        progress.update(counter.value - seen)
        for f in futures:
            written.extend(f.result())
    return written


def file_entries(job: Compiled, written: list[WrittenFile], mpi_rank: int) -> list[dict]:
    return [{"path": str(w.path.relative_to(job.out_dir)), "bytes": w.size, "crc32": w.crc32, "mpi_rank": mpi_rank,
             "kept": w.kept} for w in written]


def finish_folder(job: Compiled, mpi_rank: int = 0) -> list[dict]:
    """The finishing steps in this process's output folder; their manifest entries."""
    return [{"path": str(p.relative_to(job.out_dir)), "bytes": p.stat().st_size, "crc32": file_crc32(p), "mpi_rank": mpi_rank}
            for p in job.finish(job.out_dir)]


def manifest(job: Compiled, files: list[dict], stamps: list[dict], elapsed: float) -> dict:
    """SPEC 3: every file with its bytes, crc32 and writing MPI rank; every source file
    read, with size and mtime_ns; the strategies; the time taken."""
    cfg = job.cfg
    strategies = job.cfg.output_path / STRATEGY_DIR
    return {
        "format": "autotrans-manifest",
        "version": 1,
        "autotrans": __version__,
        "kind": job.kind,
        "source": str(Path(cfg.load_checkpoint).resolve()),
        "source_files": [{"path": s["path"], "size": s["size"], "mtime_ns": s["mtime_ns"]}
                         for s in sorted(stamps, key=lambda s: s["label"])],
        "strategies": {"source": cfg.src_strategy_path_or_dir or None,
                       "destination": cfg.dst_strategy_path_or_dir or "generated",
                       "written": sorted(p.name for p in strategies.iterdir()) if strategies.is_dir() else []},
        "options": cfg.options(),
        "world_size": job.dst.world_size,
        "files": sorted(({k: v for k, v in f.items() if k != "kept"} for f in files), key=lambda f: f["path"]),
        "checksum": "crc32",
        "bytes_written": sum(f["bytes"] for f in files),
        "elapsed_s": round(elapsed, 3),
    }


class LocalWorld:
    """Where the job's steps run: this process and its local workers."""

    is_root = True
    progress_tty_only = True  # a progress bar only when stderr is a terminal

    def __init__(self) -> None:
        self.stamps: list[dict] = []  # every source file read, with size and mtime

    def step(self, name: str, fn: Callable[[], T]) -> T:
        return fn()

    def compile(self, cfg: JobConfig) -> Compiled:
        job = compile_job(cfg)
        self.stamps = [stamp(label, p) for label, p in job.source_files()]
        return job

    def digest(self, job: Compiled) -> str:
        return digest(job, self.stamps)

    def write_strategies(self, job: Compiled) -> None:
        own_strategy_folder(job)
        write_strategies(job)

    def claim(self, job: Compiled) -> OutputFolder | None:
        """The output folder, claimed; None when it already holds this job's output."""
        job.check_overlap()
        folder = OutputFolder(job.out_dir, self.digest(job))
        if folder.is_complete():
            return None
        folder.claim(job.paths(), job.check_overlap)
        return folder

    def execute(self, job: Compiled, folder: OutputFolder, progress) -> list[dict]:
        return file_entries(job, execute_local(job, folder, progress), 0)

    def finish(self, job: Compiled, folder: OutputFolder, files: list[dict], elapsed: float) -> list[dict]:
        """Finishing steps, then the manifest; every file written, for the summary."""
        files = files + finish_folder(job)
        check_unchanged(self.stamps)
        folder.write_manifest(manifest(job, files, self.stamps, elapsed))
        return files

    def verify(self, job: Compiled) -> int:
        return verify_compiled(job)


def run(cfg: JobConfig, show_progress: bool = True, world: LocalWorld | None = None) -> int:
    """Run any job in this process (and its local workers), or as one MPI rank of many
    (`world`); the exit code."""
    world = world or LocalWorld()
    job = world.step("prepare", lambda: world.compile(cfg))
    debug(f"compiled a {job.kind}: {len(job.units)} unit(s), {sum(u.write_bytes for u in job.units)} tensor bytes, "
          f"{len(job.dst.ranks)} destination rank(s)")
    if cfg.only_save_strategy:
        world.step("write strategies", lambda: world.write_strategies(job))
        say(f"wrote {job.dst.world_size} strategy file(s) to {cfg.output_path / STRATEGY_DIR}; no weights touched")
        return 0
    reasons = job.changes
    if not cfg.auto_trans_ckpt:
        if reasons:
            say(f"the source does not match the destination ({len(reasons)} difference(s)); first: {reasons[0]}")
            return 1
        say("the source already matches the destination layout")
        return 0
    if not reasons:
        say(f"nothing to do: {cfg.load_checkpoint} already has the destination layout and format")
        return 0
    folder = world.step("claim output", lambda: world.claim(job))
    debug(f"output folder {job.out_dir}, job digest {folder.digest if folder else '(complete)'}")
    if folder is None:
        say(f"{job.out_dir} already holds this job's complete output (same source and settings); skipped, nothing to do")
        return 0
    world.step("write strategies", lambda: world.write_strategies(job))
    start = time.monotonic()
    total = sum(u.write_bytes for u in job.units)
    with Progress(total, enabled=show_progress and world.is_root, tty_only=world.progress_tty_only) as progress:
        files = world.step("transform", lambda: world.execute(job, folder, progress))
    elapsed = time.monotonic() - start
    files = world.step("manifest", lambda: world.finish(job, folder, files, elapsed))
    nbytes = sum(f["bytes"] for f in files)
    kept = sum(1 for f in files if f.get("kept"))
    say(f"done: {count(len(files), 'file')}, {nbytes / 1e9:.3f} GB in {elapsed:.2f} s "
        f"({nbytes / 1e9 / max(elapsed, 1e-9):.2f} GB/s)"
        + (f", kept {count(kept, 'file')} an earlier run proved complete" if kept else "") + f" -> {job.out_dir}")
    if cfg.verify:
        return world.step("verify", lambda: world.verify(job))
    return 0
