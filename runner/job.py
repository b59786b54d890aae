"""The transform job (SPEC 3): resolve source and strategies, compare, plan, execute,
write the manifest. Every step before execution is deterministic, so each worker or
MPI rank can prepare the same Job and take its own share of destination ranks."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from runner import __version__, dtypes, lora, plan as planner, strategy as strat
from runner.config import JobConfig
from runner.errors import ConfigError
from runner.execute import LocalPool, SlicePool, WrittenFile, write_file
from runner.formats.base import TensorInfo
from runner.formats.registry import output_format
from runner.outputs import OutputFolder, check_no_overlap
from runner.source import Source, discover
from runner.layout import ParamLayout
from runner.log import say, warn
from runner.strategy import Strategy
from runner.templates import regroup

T = TypeVar("T")
TRANSFORMED = "transformed_checkpoint"
STRATEGY_DIR = "strategy"


Headers = Mapping[int, Mapping[str, TensorInfo]]


@dataclass(frozen=True)
class Job:
    """A prepared job; immutable (preparing builds new strategies, never edits one)."""

    cfg: JobConfig
    source: Source | None
    src: Strategy | None
    dst: Strategy
    headers: Mapping[int, Mapping[str, TensorInfo]] = field(default_factory=dict)
    extras: Mapping[str, tuple[int, TensorInfo]] = field(default_factory=dict)
    lora: lora.LoraMerge | None = None

    @property
    def out_dir(self) -> Path:
        return self.cfg.output_path / TRANSFORMED

    @property
    def cast_to(self) -> str | None:
        return dtypes.CAST_NAMES[self.cfg.dtype] if self.cfg.dtype else None

    def out_path(self, rank: int) -> Path:
        suffix = output_format(self.cfg.output_format).suffix
        return self.out_dir / f"rank_{rank}" / f"{self.cfg.prefix}{rank}{suffix}"

    def digest(self) -> str:
        """What the job does, independent of paths: strategies, options, extras."""
        doc = {
            "src": self.src.to_json() if self.src else None,
            "dst": self.dst.to_json(),
            "options": self.cfg.options(),
            "extras": sorted(self.extras),
            "lora": self.lora.describe() if self.lora else None,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def plan(self, rank: int, available: Callable[[int], bool] | None = None,
             prefer: Callable[[int], bool] | None = None) -> planner.FilePlan:
        return planner.plan_rank(
            self.src, self.dst, rank, cast_to=self.cast_to, extras=self.extras,
            headers=(lambda r: self.headers[r]) if self.headers else None, available=available, prefer=prefer,
        )


# -- preparing ------------------------------------------------------------------------------
def read_headers(source: Source) -> dict[int, dict[str, TensorInfo]]:
    """Every source rank's tensor headers (and file sizes, checked by the readers)."""
    out = {}
    for r in source.ranks:
        reader = source.open(r)
        try:
            out[r] = dict(reader.tensors())
        finally:
            reader.close()
    return out


def source_strategy(cfg: JobConfig, source: Source, headers: dict[int, dict[str, TensorInfo]]) -> Strategy:
    if cfg.src_strategy_path_or_dir:
        s = strat.load(Path(cfg.src_strategy_path_or_dir))
        if s.origin == "mindspore":
            from runner.formats.mindspore_strategy import fill_shapes

            s = fill_shapes(s, headers)
        s.validate()
        return s
    if source.kind == "distributed":
        raise ConfigError(
            f"load_checkpoint {source.root} is distributed ({len(source.ranks)} ranks): "
            "set src_strategy_path_or_dir to its strategy files"
        )
    return Strategy.full(headers[0])


def merged_layout(p: ParamLayout, dtype: str) -> ParamLayout:
    """One rank holding the whole tensor; a fused weight each rank stores flat (SwiGLU
    fc1 as [gate_shard; up_shard]) is stored flat whole too ([gate; up])."""
    full = ParamLayout.replicated(p.shape, dtype)
    stored = regroup(p.chunk, p.stored_shape, p.shape) if p.stored_shape is not None else None
    return replace(full, stored_shape=stored) if stored is not None and stored != p.shape else full


def destination_strategy(cfg: JobConfig, src: Strategy | None) -> tuple[Strategy, Strategy | None]:
    """The destination layout, and the source's as the destination sees it (a generated
    destination may re-express weights a full source stores flat)."""
    if cfg.dst_strategy_path_or_dir:
        dst = strat.load(Path(cfg.dst_strategy_path_or_dir))
        if dst.origin == "mindspore":  # its files hold no shapes: take the source's
            if src is None:
                raise ConfigError("a MindSpore destination strategy holds no shapes: set load_checkpoint")
            from runner.formats.mindspore_strategy import fill_from

            dst = fill_from(dst, src, dtypes.CAST_NAMES.get(cfg.dtype))
    elif not cfg.use_parallel:
        if src is None:
            raise ConfigError("use_parallel: false merges a checkpoint: set load_checkpoint")
        dst = Strategy(((0,),), {n: merged_layout(p, dtypes.cast_dtype(p.dtype, dtypes.CAST_NAMES.get(cfg.dtype))) for n, p in src.params.items()}, "full")
    elif cfg.model.get("arch"):
        from runner.generate import with_source

        dst, src = with_source(cfg, src)
    else:
        raise ConfigError(
            "no destination layout: set dst_strategy_path_or_dir, or model.arch with parallel_config, "
            "or use_parallel: false to merge"
        )
    dst.validate()
    return dst, src


def reconcile_names(src: Strategy, dst: Strategy, headers: Headers) -> tuple[Strategy, Strategy, dict[str, tuple[int, TensorInfo]]]:
    """Match strategy names with checkpoint tensors (SPEC 3, "What the layouts cover"):
    the source and destination strategies restricted to what both the strategies and
    the checkpoint hold, and the extras (entries no strategy names), copied whole."""
    held = set().union(*(h.keys() for h in headers.values()))
    named = set(src.params)
    # A full checkpoint laid out by a MindSpore strategy: what it does not name is an extra.
    split_by_mindspore = src.origin == "full" and dst.origin == "mindspore"
    if split_by_mindspore:
        named &= set(dst.params)
        src = src.with_params({n: p for n, p in src.params.items() if n in named})
    unnamed, missing = sorted(held - named), sorted(named - held)
    if not unnamed and not missing:
        return src, dst, {}
    if src.origin == "mindspore" or split_by_mindspore:
        extras = {}
        for name in unnamed:
            rank = min(r for r, h in headers.items() if name in h)
            extras[name] = (rank, headers[rank][name])
        gone = set(missing)
        src = src.with_params({n: p for n, p in src.params.items() if n not in gone})
        dst = dst.with_params({n: p for n, p in dst.params.items() if n not in gone})
        if unnamed:
            warn(f"{len(unnamed)} checkpoint entries the strategy does not name are copied whole to every rank: {planner._names(unnamed)}")
        if missing:
            warn(f"{len(missing)} parameters the strategy names are not in the checkpoint and are skipped: {planner._names(missing)}")
        return src, dst, extras
    raise planner.name_mismatch("source checkpoint and strategy disagree", {
        "in the checkpoint but not the source strategy": set(unnamed),
        "in the source strategy but not the checkpoint": set(missing),
    })


def prepare(cfg: JobConfig, source: Source | None = None,
            headers: Headers | None = None) -> Job:
    """Everything the job needs before a byte moves; deterministic, and it changes none
    of its arguments. Under MPI the source and its headers come from every rank (runner.mpi)."""
    if not cfg.load_checkpoint:
        if cfg.only_save_strategy and (cfg.dst_strategy_path_or_dir or cfg.model.get("arch")):
            return Job(cfg, None, None, destination_strategy(cfg, None)[0])
        raise ConfigError("config key load_checkpoint is required")
    source = source or discover(Path(cfg.load_checkpoint))
    headers = headers if headers is not None else read_headers(source)
    src = source_strategy(cfg, source, headers)
    merge = None
    if cfg.lora is not None:
        merge, src, headers = lora.prepare(cfg.lora, cfg.model, src, headers)
    dst, src = destination_strategy(cfg, src)
    if merge:
        dst = merge.exclude(dst)
    extras: dict[str, tuple[int, TensorInfo]] = {}
    if not cfg.only_save_strategy:
        src, dst, extras = reconcile_names(src, dst, headers)
        planner.check_headers(src, headers)
        planner.check_compatible(src, dst, dtypes.CAST_NAMES[cfg.dtype] if cfg.dtype else None)
    return Job(cfg, source, src, dst, dict(headers), extras, merge)


def needs_change(job: Job) -> list[str]:
    """Why the job must write anything; empty when the source can be used as it is."""
    reasons = [f"layout: {d}" for d in strat.differences(job.src, job.dst)]
    suffixes = {p.suffix for files in job.source.files.values() for p in files}
    if suffixes != {output_format(job.cfg.output_format).suffix}:
        reasons.append(f"format: {', '.join(sorted(suffixes))} -> {job.cfg.output_format}")
    if any(dtypes.cast_dtype(p.dtype, job.cast_to) != p.dtype for p in job.src.params.values()):
        reasons.append(f"dtype cast to {job.cast_to}")
    if job.cfg.lora:
        reasons.append("LoRA merge")
    return reasons


def write_strategies(job: Job, ranks: list[int] | None = None, merged: bool = True) -> None:
    check_no_overlap(job.cfg.output_path, protected_paths(job.cfg))  # a dry run never writes into the source either
    folder = job.cfg.output_path / STRATEGY_DIR
    if job.cfg.strategy_format == "mindspore":
        from runner.formats.mindspore_strategy import write_rank_file, write_merged_file
    else:
        write_rank_file, write_merged_file = strat.write_rank_file, strat.write_merged_file
    for r in job.dst.ranks if ranks is None else ranks:
        write_rank_file(job.dst, r, folder)
    if merged and len(job.dst.stages) > 1:
        write_merged_file(job.dst, folder)


# -- executing ------------------------------------------------------------------------------
def balance(sizes: dict[int, int], workers: int) -> list[list[int]]:
    """Split destination ranks into `workers` shares balanced by bytes (largest first)."""
    shares: list[list[int]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for rank in sorted(sizes, key=lambda r: (-sizes[r], r)):
        i = loads.index(min(loads))
        shares[i].append(rank)
        loads[i] += sizes[rank]
    return [sorted(s) for s in shares]


def run_ranks(job: Job, ranks: list[int], folder: OutputFolder, pool: SlicePool,
              on_bytes: Callable[[int], None] = lambda n: None,
              local: Callable[[int], bool] | None = None) -> list[WrittenFile]:
    """Plan and write the files of `ranks`, keeping ones an earlier run proved right.
    `local`: the source ranks this process sees (default all); reads prefer them, and
    only their files can be stamped in the progress record."""
    fmt = output_format(job.cfg.output_format)
    done = []
    for rank in ranks:
        fp = job.plan(rank, prefer=local)
        path = job.out_path(rank)
        seen = {p for r in fp.src_ranks if local is None or local(r) for p in job.source.files[r]}
        sources = sorted(seen | set(job.lora.files if job.lora else ()))
        kept = folder.finished(rank, path, sources)
        if kept is not None:
            on_bytes(fp.write_bytes)
            done.append(kept)
            continue
        written = write_file(fp, pool, fmt, path, on_bytes)
        folder.record(rank, written, sources)
        done.append(written)
    return done


_COUNTER = None  # a worker process's shared byte counter, set by _init_worker


def _init_worker(counter) -> None:
    global _COUNTER
    _COUNTER = counter


def _worker(job: Job, ranks: list[int], digest: str) -> list[WrittenFile]:
    def on_bytes(n: int) -> None:
        with _COUNTER.get_lock():
            _COUNTER.value += n

    pool = lora.wrap(LocalPool(job.source), job.lora)
    try:
        return run_ranks(job, ranks, OutputFolder(job.out_dir, digest), pool, on_bytes)
    finally:
        pool.close()


def execute_local(job: Job, folder: OutputFolder, progress) -> list[WrittenFile]:
    """All destination ranks in this process, or in `transform_process_num` workers."""
    ranks = job.dst.ranks
    nproc = min(job.cfg.transform_process_num, len(ranks))
    if nproc <= 1:
        pool = lora.wrap(LocalPool(job.source), job.lora)
        try:
            return run_ranks(job, ranks, folder, pool, progress.update)
        finally:
            pool.close()
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    shares = balance({r: job.dst.rank_bytes(r) for r in ranks}, nproc)
    written: list[WrittenFile] = []
    with ProcessPoolExecutor(nproc, mp_context=ctx, initializer=_init_worker, initargs=(counter,)) as ex:
        futures = [ex.submit(_worker, job, share, folder.digest) for share in shares if share]
        seen = 0
        while not all(f.done() for f in futures):
            time.sleep(0.1)
            progress.update(counter.value - seen)
            seen = counter.value
        progress.update(counter.value - seen)
        for f in futures:
            written.extend(f.result())
    return sorted(written, key=lambda w: str(w.path))


def manifest(job: Job, written: list[WrittenFile], elapsed: float) -> dict:
    return {
        "format": "autotrans-manifest",
        "version": 1,
        "autotrans": __version__,
        "source": str(Path(job.cfg.load_checkpoint).resolve()),
        "src_strategy": job.cfg.src_strategy_path_or_dir or None,
        "dst_strategy": job.cfg.dst_strategy_path_or_dir or "generated",
        "options": job.cfg.options(),
        "world_size": job.dst.world_size,
        "files": [{"path": str(w.path.relative_to(job.out_dir)), "bytes": w.size, "crc32": w.crc32} for w in written],
        "bytes_written": sum(w.size for w in written),
        "elapsed_s": round(elapsed, 3),
    }


class LocalWorld:
    """Where the job's steps run: this process and its local workers. runner.mpi's
    MpiWorld runs the same steps on every MPI rank, each step failing on all at once."""

    is_root = True
    progress_tty_only = True  # a progress bar only when stderr is a terminal

    def step(self, name: str, fn: Callable[[], T]) -> T:
        return fn()

    def prepare(self, cfg: JobConfig) -> Job:
        return prepare(cfg)

    def write_strategies(self, job: Job) -> None:
        write_strategies(job)

    def claim(self, job: Job) -> OutputFolder | None:
        """The output folder, claimed; None when it already holds this job's output."""
        check_no_overlap(job.cfg.output_path, protected_paths(job.cfg))
        folder = OutputFolder(job.out_dir, job.digest())
        if folder.is_complete():
            return None
        folder.claim()
        return folder

    def execute(self, job: Job, folder: OutputFolder, progress) -> list[WrittenFile]:
        return execute_local(job, folder, progress)

    def finish(self, job: Job, folder: OutputFolder, written: list[WrittenFile], elapsed: float) -> list[WrittenFile]:
        """Write the manifest; every file written, for the summary."""
        folder.write_manifest(manifest(job, written, elapsed))
        return written

    def verify(self, job: Job) -> int:
        from runner.verify import verify_job

        return verify_job(job)


def protected_paths(cfg: JobConfig) -> list[Path]:
    return [Path(p) for p in (cfg.load_checkpoint, cfg.src_strategy_path_or_dir) if p]  # Path("") would be the cwd


def run(cfg: JobConfig, show_progress: bool = True, world: LocalWorld | None = None) -> int:
    """Run a transform job in this process (and its local workers), or as one MPI rank
    of many (`world`); the exit code."""
    from runner.progress import Progress

    world = world or LocalWorld()
    job = world.step("prepare", lambda: world.prepare(cfg))
    if cfg.only_save_strategy:
        world.step("write strategies", lambda: world.write_strategies(job))
        say(f"wrote {job.dst.world_size} strategy file(s) to {cfg.output_path / STRATEGY_DIR}; no weights touched")
        return 0
    reasons = needs_change(job)
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
    if folder is None:
        say(f"{job.out_dir} already holds this job's complete output; nothing to do")
        return 0
    world.step("write strategies", lambda: world.write_strategies(job))
    start = time.monotonic()
    total = sum(job.dst.rank_bytes(r) for r in job.dst.ranks)
    with Progress(total, enabled=show_progress and world.is_root, tty_only=world.progress_tty_only) as progress:
        written = world.step("transform", lambda: world.execute(job, folder, progress))
    elapsed = time.monotonic() - start
    written = world.step("manifest", lambda: world.finish(job, folder, written, elapsed))
    nbytes = sum(w.size for w in written)
    say(f"done: {len(written)} files, {nbytes / 1e9:.3f} GB in {elapsed:.2f} s ({nbytes / 1e9 / max(elapsed, 1e-9):.2f} GB/s) -> {job.out_dir}")
    if cfg.verify:
        return world.step("verify", lambda: world.verify(job))
    return 0
