"""Running a transform job as one MPI rank of many (SPEC 9).

Every rank runs the job's steps (runner.run.run) through MpiWorld: the source is the
union of what the ranks see, each rank reads the headers of the source ranks it serves
and all share them, every rank prepares the same Job and the digests are compared;
destination ranks are split across MPI ranks (balanced by bytes, or rank r -> rank r),
each rank plans and writes only its share, reading slices it cannot see from a rank
that can. Output folders are found per node: one rank per distinct folder claims it,
writes the merged strategy and, after every rank succeeded, the manifest.

This module imports no MPI at import time (runner.collective and runner.remote, which
initialise MPI, are imported by the functions that run under it), so a single-process
run never loads mpi4py; runner.launch says whether mpiexec started this process."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Callable

from runner import log
from runner.compile import compile_job, compile_reshard, own_strategy_folder, write_strategies
from runner.config import JobConfig
from runner.convert import wants_conversion
from runner.errors import AutotransError, ConfigError, FormatError
from runner.execute import LocalPool
from runner.log import warn
from runner.outputs import OutputFolder
from runner.run import LocalWorld, balance, file_entries, finish_folder, manifest, run, run_units
from runner.convert.megatron_dir import source_files
from runner.source import Source, SourceFiles, file_header, read_headers
from runner.union import local_view, union_files, union_source
from runner.units import Compiled, check_unchanged, content_digest, stamp
from runner.verify import verify_compiled


def run_mpi(cfg: JobConfig, show_progress: bool = True) -> int:
    """This rank's part of the job; the exit code (the same on every rank)."""
    from runner.collective import Link, StepError

    link = Link()
    link.watch(cfg.mpi_timeout)
    log.configure(quiet=link.rank != 0)
    try:
        return run(cfg, show_progress, MpiWorld(link))
    except (StepError, KeyboardInterrupt):  # Ctrl-C reaches every rank (mpiexec passes it on): each ends itself
        raise
    except BaseException as e:  # outside a step the other ranks cannot hear of it
        link.abort(str(e) if isinstance(e, AutotransError) else f"internal error: {type(e).__name__}: {e}")
        raise


class MpiWorld(LocalWorld):
    """runner.run.LocalWorld's steps, run by every MPI rank together."""

    progress_tty_only = False  # rank 0's stderr is a pipe to mpiexec

    def __init__(self, link):
        super().__init__()
        self.link = link
        self.is_root = link.rank == 0
        self.step = link.step
        self.union = None  # runner.union.Union, once the source is known
        self.share: list[int] = []  # the unit keys this rank writes
        self.group: tuple[int, ...] = (link.rank,)  # the ranks that share this rank's output_dir
        self.groups = 1
        self.mine: list[dict] = []  # the stamps of the source files this rank serves

    def converts(self, cfg: JobConfig) -> bool:
        """Whether any rank takes the job for a conversion (an HF or Megatron source it
        sees whole, or output); a source a rank sees only in part is not one."""
        def here() -> bool:
            try:
                return wants_conversion(cfg)
            except FormatError:
                return False

        return any(self.link.exchange(self.step("classify the job", here)))

    # -- compile ------------------------------------------------------------------------
    def compile(self, cfg: JobConfig) -> Compiled:
        """Every rank compiles the same job from the union of what the ranks see, each
        reading the headers of the source files it serves. Source files are stamped by
        the ranks that serve them, so every rank computes the same digest."""
        root = Path(cfg.load_checkpoint) if cfg.load_checkpoint else None
        if root is None:
            job = self.step("prepare", lambda: compile_job(cfg))
        elif self.converts(cfg):
            job = self._compile_conversion(cfg, root)
        else:
            job = self._compile_reshard(cfg, root)
        self.step("compare jobs", lambda: _same_job(self.link.exchange(content_digest(job))))
        if root is not None:
            u, me = self.union, self.link.rank
            mine = self.step("stamp source files", lambda: [
                stamp(label, p) for label, p in job.source_files(lambda s: u.server(s) == me, extras=self.is_root)])
            self.stamps = [s for part in self.link.exchange(mine) for s in part]
            self.mine = mine
        self._find_output_folders(cfg, job)
        self.share = self.step("split the work", lambda: self._split(job))
        return job

    def _headers(self, read: Callable[[], dict]) -> dict:
        """Every rank's headers joined: `read` reads those this rank serves."""
        out: dict = {}
        for part in self.link.exchange(self.step("read source headers", read)):
            out.update(part)
        return dict(sorted(out.items()))

    def _compile_conversion(self, cfg: JobConfig, root: Path) -> Compiled:
        """A conversion's source files are the union of what the ranks see: an HF folder's
        shards, a Megatron folder's rank files, spread over the nodes."""
        views = self.link.exchange(self.step("find source files", lambda: _file_view(root)))
        fu = self.step("join what the ranks see", lambda: union_files(root, views, cfg.shared_disk))
        mine = [rel for rel in fu.sizes if fu.server(rel) == self.link.rank]
        headers = self._headers(lambda: {rel: file_header(root / rel) for rel in mine})
        job = self.step("prepare", lambda: compile_job(cfg, files=SourceFiles(root, fu.kind, fu.sizes, headers)))
        self.union = self.step("find who serves each source rank", lambda: fu.by_rank(job.source))
        return job

    def _compile_reshard(self, cfg: JobConfig, root: Path) -> Compiled:
        views = self.link.exchange(self.step("find source files", lambda: local_view(root)))
        self.union = u = self.step("join what the ranks see", lambda: union_source(root, views, cfg.shared_disk))
        mine = Source(root, u.source.kind, {s: f for s, f in u.source.files.items() if u.server(s) == self.link.rank})
        headers = self._headers(lambda: read_headers(mine))
        return self.step("prepare", lambda: compile_reshard(cfg, u.source, headers))

    def _find_output_folders(self, cfg: JobConfig, job: Compiled) -> None:
        """Which ranks share this rank's output_dir (one disk, or one per node): each
        rank drops a token file there and looks for the others' tokens."""
        out = cfg.output_path
        nonce = self.link.comm.bcast(uuid.uuid4().hex if self.is_root else None)
        token = out / f".autotrans-{nonce}-{self.link.rank}"

        def drop() -> None:
            job.check_overlap()
            out.mkdir(parents=True, exist_ok=True)
            token.touch()

        def look() -> tuple[int, ...]:
            prefix = f".autotrans-{nonce}-"
            return tuple(sorted(int(p.name[len(prefix):]) for p in out.iterdir() if p.name.startswith(prefix)))

        self.step("check output_dir", drop)
        seen = self.link.exchange(self.step("find output folders", look))
        self.step("clean output_dir", lambda: (token.unlink(missing_ok=True), _check_groups(seen, out)))
        self.group = seen[self.link.rank]
        self.groups = len(set(seen))

    @property
    def leader(self) -> bool:
        """This rank speaks for its output folder."""
        return self.group[0] == self.link.rank

    def _split(self, job: Compiled) -> list[int]:
        n, world, me = self.link.size, len(job.units), self.link.rank
        if job.cfg.transform_by_rank:
            if n != world:
                raise ConfigError(f"transform_by_rank: the destination has {world} ranks but MPI runs {n}; "
                                  f"launch {world} MPI ranks or set transform_by_rank: false")
            return [job.units[me].key]
        if self.groups > 1 and n == world:
            return [job.units[me].key]  # each node keeps the files of its own ranks
        return balance({u.key: u.write_bytes for u in job.units}, n)[me]

    # -- the steps of runner.run.run ------------------------------------------------------
    def write_strategies(self, job: Compiled) -> None:
        """Rank r writes destination rank r's file when the worlds match, else those of
        its share of the units; first one rank per output folder clears an earlier job's."""
        self.step("clear the strategy folder", lambda: own_strategy_folder(job) if self.leader else None)
        same = self.link.size == job.dst.world_size
        ranks = [self.link.rank] if same else [k for k in self.share if k in set(job.dst.ranks)]
        write_strategies(job, ranks, merged=self.leader)

    def claim(self, job: Compiled):
        folder = OutputFolder(job.out_dir, self.digest(job))
        complete = self.link.exchange(self.step("check output", folder.is_complete))
        if all(complete):
            return None
        self.step("claim output", lambda: folder.claim(job.paths(), job.check_overlap) if self.leader else None)
        return folder

    def execute(self, job: Compiled, folder, progress) -> list[dict]:
        from runner.remote import RemotePool

        u = self.union
        seen = {s for s, ranks in u.seers.items() if self.link.rank in ranks}
        relay = ProgressRelay(self.link, progress)
        pool = RemotePool(self.link, LocalPool(job.source), seen, {s: u.server(s) for s in u.seers})
        units = [unit for unit in job.units if unit.key in set(self.share)]

        def work():
            written = run_units(job, units, folder, Borrowed(pool), relay.on_bytes, seen.__contains__)
            relay.flush()
            return written

        try:
            written = self.step("transform", work)
        finally:
            pool.close()  # only once every rank is done: until then peers may ask for slices
        relay.drain(self.link.exchange(relay.sent))
        return file_entries(job, written, self.link.rank)

    def finish(self, job: Compiled, folder, files: list[dict], elapsed: float) -> list[dict]:
        everyone = self.link.exchange(files)
        ours = self.step("finishing steps", lambda: finish_folder(job, self.link.rank) if self.leader else [])
        self.step("check source files", lambda: check_unchanged(self.mine))
        if self.leader:
            ours = [f for r in self.group for f in everyone[r]] + ours
            folder.write_manifest({**manifest(job, ours, self.stamps, elapsed), "mpi_ranks": self.link.size})
        return [f for part in everyone for f in part]

    def verify(self, job: Compiled) -> int:
        u = self.union
        if self.groups > 1 or (u and any(len(s) < self.link.size for s in u.seers.values())):
            warn("verify skipped: under MPI it needs one output folder and every source file on every node")
            return 0
        self.link.watch(None)  # rank 0 verifies alone, for as long as the output takes to read
        code = self.step("verify", lambda: verify_compiled(job) if self.is_root else 0)
        return max(self.link.exchange(code))


class Borrowed:
    """A pool lent to run_units, which closes what it reads through: the lender closes it."""

    def __init__(self, pool):
        self.pool = pool

    def region(self, read):
        return self.pool.region(read)

    def release(self) -> None:
        self.pool.release()

    def close(self) -> None:
        pass


def _file_view(root: Path):
    """What this rank sees of a conversion's source (runner.union.FileView)."""
    files = source_files(root)
    return files.kind, files.sizes


def _same_job(digests: list[str]) -> None:
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise ConfigError(f"MPI ranks {odd} run a different job than rank 0 (strategies or options differ); "
                          "give every rank the same job file and strategy files")


def _check_groups(seen: list[tuple[int, ...]], out: Path) -> None:
    for r, group in enumerate(seen):
        if r not in group or any(seen[g] != group for g in group):
            raise AutotransError(f"output_dir {out} looks different to MPI ranks {list(group)}; "
                                 "use a folder every rank of a node sees the same way")


class ProgressRelay:
    """Bytes written on every rank, into rank 0's progress bar: the other ranks send
    their count at most every INTERVAL seconds; rank 0 takes them in as it polls."""

    INTERVAL = 0.5
    TAG = 104

    def __init__(self, link, progress):
        self.link, self.progress = link, progress
        self.pending = 0
        self.sent = 0  # bytes reported to rank 0 so far
        self.last = time.monotonic()
        self.requests: list = []
        self.received = [0] * link.size
        if link.rank == 0:
            link.handlers.append(self._take)

    def on_bytes(self, n: int) -> None:
        if self.link.rank == 0:
            self.progress.update(n)
        else:
            self.pending += n
            if time.monotonic() - self.last >= self.INTERVAL:
                self.flush()
        self.link.poll()

    def flush(self) -> None:
        if self.link.rank == 0 or not self.pending:
            return
        self.requests = [r for r in self.requests if not r.Test()]
        self.requests.append(self.link.p2p.isend(self.pending, dest=0, tag=self.TAG))
        self.sent += self.pending
        self.pending = 0
        self.last = time.monotonic()

    def _take(self) -> bool:
        from mpi4py import MPI

        status, did = MPI.Status(), False
        while self.link.p2p.iprobe(source=MPI.ANY_SOURCE, tag=self.TAG, status=status):
            peer = status.Get_source()
            n = self.link.p2p.recv(source=peer, tag=self.TAG)
            self.received[peer] += n
            self.progress.update(n)
            did = True
        return did

    def drain(self, sent: list[int]) -> None:
        """Take the counts still on their way (`sent`: what each rank reported), so no
        message outlives the job; then stop listening."""
        if self.link.rank == 0:
            self.link.handlers.remove(self._take)
            for peer, total in enumerate(sent):
                while self.received[peer] < total:
                    n = self.link.p2p.recv(source=peer, tag=self.TAG)
                    self.received[peer] += n
                    self.progress.update(n)
        self.link.wait(self.requests)
