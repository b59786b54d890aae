"""Every job compiles to the same thing (DESIGN "One engine"): a list of output units,
each one destination file with its writer and a frozen plan of read items, plus
finishing steps (index.json, config and tokenizer copies, marker files). Renames, row
permutations, LoRA merges and casts travel with the plan and the pool its reads go
through, so runner.run runs a reshard, a conversion or a LoRA merge the same way.

Compiling is deterministic and reads only headers, so every MPI rank and local worker
compiles the same job and runs its own share of the units."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from runner import dtypes, lora, strategy as strat
from runner.config import JobConfig
from runner.execute import SlicePool, WrittenFile, write_file
from runner.formats.registry import output_format
from runner.plan import FilePlan
from runner.source import Source
from runner.strategy import Strategy

TRANSFORMED = "transformed_checkpoint"
STRATEGY_DIR = "strategy"

Prefer = Callable[[int], bool] | None  # source ranks this process sees; reads prefer them
OnBytes = Callable[[int], None]


@dataclass(frozen=True)
class Unit:
    """One destination file: `key` names its progress record (the destination rank, or
    an HF shard's number); `path` is relative to transformed_checkpoint/."""

    key: int
    path: str
    write_bytes: int  # tensor payload bytes, file headers excluded
    stage: int = 0


def _plain_finish(out: Path) -> list[Path]:
    return []


@dataclass(frozen=True)
class Compiled:
    """A compiled job: what runner.run, runner.mpi and runner.plan_report need."""

    cfg: JobConfig
    kind: str  # "reshard" or "conversion"
    source: Source | None  # the files base pools read, per source rank
    dst: Strategy  # written to output_dir/strategy
    units: tuple[Unit, ...]
    content: Mapping  # what the job does, without paths or stamps
    plan: Callable[[Unit, Prefer], FilePlan]
    write: Callable[[Unit, FilePlan, SlicePool, Path, OnBytes], WrittenFile]
    wrap: Callable[[SlicePool], SlicePool]  # base pool (local or MPI) -> the pool plans read
    changes: tuple[str, ...]  # why the job writes anything; empty: the source already fits
    verify: Callable[[], int]
    finish: Callable[[Path], list[Path]] = _plain_finish  # finishing steps in an output folder
    extra_files: tuple[Path, ...] = ()  # read besides the source ranks' files (LoRA adapters)
    whole_source: bool = False  # every unit reads every source rank (conversions)
    source_bytes: int = 0
    protected: tuple[Path, ...] = ()  # never written into (SPEC 3)
    job: object = field(default=None, compare=False)  # runner.job.Job of a reshard

    @property
    def out_dir(self) -> Path:
        return self.cfg.output_path / TRANSFORMED

    def unit_sources(self, fp: FilePlan, local: Prefer) -> list[Path]:
        """Source files a unit's bytes depend on that this process sees (their stamps
        prove a resumed file right)."""
        if self.source is None:
            return []
        ranks = self.source.ranks if self.whole_source else fp.src_ranks
        seen = {p for r in ranks if local is None or local(r) for p in self.source.files[r]}
        return sorted(seen | set(self.extra_files))

    def source_files(self, serves: Callable[[int], bool] = lambda r: True, extras: bool = True) -> list[tuple[str, Path]]:
        """(label, path) of the source files the job reads: those of the source ranks
        `serves` accepts, and the extra files; labels are relative to load_checkpoint, so
        they are the same on every node."""
        root = Path(self.cfg.load_checkpoint)
        files = [p for r in (self.source.ranks if self.source else ()) if serves(r) for p in self.source.files[r]]
        return [(_label(p, root), p) for p in files + (list(self.extra_files) if extras else [])]


def _label(p: Path, root: Path) -> str:
    try:
        return str(Path(p).relative_to(root))
    except ValueError:
        return Path(p).name


def stamp(label: str, path: Path) -> dict:
    st = Path(path).stat()
    return {"label": label, "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def digest(job: Compiled, stamps: list[dict]) -> str:
    """The job digest: what it does and the source files it reads (size and mtime), not
    where they are (SPEC 9: ranks on different nodes compare it)."""
    doc = {"content": job.content, "stamps": sorted([s["label"], s["size"], s["mtime_ns"]] for s in stamps)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def content_digest(job: Compiled) -> str:
    return hashlib.sha256(json.dumps(job.content, sort_keys=True, default=str).encode()).hexdigest()


def write_strategies(job: Compiled, ranks: list[int] | None = None, merged: bool = True) -> None:
    """The destination strategy files (of `ranks`, default all), as `strategy_format` says."""
    from runner.outputs import check_no_overlap

    check_no_overlap(job.cfg.output_path, list(job.protected))  # a dry run never writes into the source either
    folder = job.cfg.output_path / STRATEGY_DIR
    if job.cfg.strategy_format == "mindspore":
        from runner.formats.mindspore_strategy import write_merged_file, write_rank_file
    else:
        write_rank_file, write_merged_file = strat.write_rank_file, strat.write_merged_file
    for r in job.dst.ranks if ranks is None else ranks:
        write_rank_file(job.dst, r, folder)
    if merged and len(job.dst.stages) > 1:
        write_merged_file(job.dst, folder)


def protected_paths(cfg: JobConfig) -> list[Path]:
    keys = (cfg.load_checkpoint, cfg.src_strategy_path_or_dir, cfg.reference_hf_dir)
    return [Path(p) for p in keys if p]  # Path("") would be the cwd


# -- reshards (and LoRA merges) ---------------------------------------------------------------
def compile_reshard(cfg: JobConfig, source: Source | None = None, headers=None) -> Compiled:
    """A layout transform: one unit per destination rank, read through the LoRA merge."""
    from runner.job import prepare

    return from_job(prepare(cfg, source, headers))


def from_job(job) -> Compiled:
    """A prepared runner.job.Job as units (without a checkpoint: planned, not run)."""
    from runner.job import needs_change

    cfg = job.cfg
    fmt = output_format(cfg.output_format)
    units = tuple(Unit(r, str(job.out_path(r).relative_to(job.out_dir)), job.dst.rank_bytes(r), job.dst.stage_of(r))
                  for r in job.dst.ranks)
    changes = tuple(needs_change(job)) if job.source is not None else ()

    def verify() -> int:
        from runner.verify import verify_job

        return verify_job(job)

    nbytes = sum(t.numel * dtypes.itemsize(t.dtype) for h in job.headers.values() for t in h.values())
    return Compiled(
        cfg, "reshard", job.source, job.dst, units, job.describe(),
        plan=lambda unit, prefer: job.plan(unit.key, prefer=prefer),
        write=lambda unit, fp, pool, path, on_bytes: write_file(fp, pool, fmt, path, on_bytes),
        wrap=lambda base: lora.wrap(base, job.lora),
        changes=changes, verify=verify,
        extra_files=tuple(job.lora.files) if job.lora else (),
        source_bytes=nbytes, protected=tuple(protected_paths(cfg)), job=job,
    )


def compile_job(cfg: JobConfig, source: Source | None = None, headers=None) -> Compiled:
    """Any job: a conversion between ecosystems (SPEC 6) or a layout transform."""
    from runner.convert import wants_conversion

    if wants_conversion(cfg):
        from runner.convert.job import compile_conversion

        return compile_conversion(cfg)
    return compile_reshard(cfg, source, headers)
