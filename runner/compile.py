"""Compiling a job (runner.units): a conversion between ecosystems (runner.convert.job)
or a layout transform (runner.job, LoRA merges included). Deterministic and reading only
headers, so every MPI rank and local worker compiles the same job and runs its own share
of the units; also the strategy files every kind of job writes."""

from __future__ import annotations

from runner import dtypes, fp8, lora, strategy as strat, strategy_files
from runner.config import JobConfig
from runner.convert import wants_conversion
from runner.convert.job import compile_conversion
from runner.execute import write_file
from runner.formats import mindspore_strategy
from runner.formats.registry import output_format
from runner.job import Job, needs_change, prepare
from runner.source import Source, SourceFiles
from runner.units import Compiled, STRATEGY_DIR, Unit, protected_paths


def strategy_names(job: Compiled) -> list[str]:
    """The names of every strategy file the job writes (all ranks, merged if several stages)."""
    files = mindspore_strategy if job.cfg.strategy_format == "mindspore" else strat
    suffix = ".ckpt" if files is mindspore_strategy else ".json"
    names = [strat.RANK_FILE.format(rank=r, suffix=suffix) for r in job.dst.ranks]
    return names + ([strat.MERGED_FILE.format(suffix=suffix)] if len(job.dst.stages) > 1 else [])


def own_strategy_folder(job: Compiled) -> None:
    """Remove an earlier job's strategy files that this one will not replace (SPEC 3)."""
    job.check_overlap()
    strategy_files.own_folder(job.cfg.output_path / STRATEGY_DIR, strategy_names(job))


def write_strategies(job: Compiled, ranks: list[int] | None = None, merged: bool = True) -> None:
    """The destination strategy files (of `ranks`, default all), as `strategy_format` says."""
    job.check_overlap()  # a dry run never writes into an input either
    folder = job.cfg.output_path / STRATEGY_DIR
    files = mindspore_strategy if job.cfg.strategy_format == "mindspore" else strat
    write_rank_file, write_merged_file = files.write_rank_file, files.write_merged_file
    for r in job.dst.ranks if ranks is None else ranks:
        write_rank_file(job.dst, r, folder)
    if merged and len(job.dst.stages) > 1:
        write_merged_file(job.dst, folder)


# -- reshards (and LoRA merges) ---------------------------------------------------------------
def compile_reshard(cfg: JobConfig, source: Source | None = None, headers=None) -> Compiled:
    """A layout transform: one unit per destination rank, read through the LoRA merge."""
    return from_job(prepare(cfg, source, headers))


def from_job(job: Job) -> Compiled:
    """A prepared runner.job.Job as units (without a checkpoint: planned, not run)."""
    cfg = job.cfg
    fmt = output_format(cfg.output_format)
    units = tuple(Unit(r, str(job.out_path(r).relative_to(job.out_dir)), job.dst.rank_bytes(r), job.dst.stage_of(r))
                  for r in job.dst.ranks)
    changes = tuple(needs_change(job)) if job.source is not None else ()

    nbytes = sum(t.numel * dtypes.itemsize(t.dtype) for h in job.headers.values() for t in h.values()) \
        if job.dequant is None else job.dequant.source_bytes(job.headers)
    return Compiled(
        cfg, "reshard", job.source, job.dst, units, job.describe(),
        plan=lambda unit, prefer: job.plan(unit.key, prefer=prefer),
        write=lambda unit, fp, pool, path, on_bytes: write_file(fp, pool, fmt, path, on_bytes),
        wrap=lambda base: fp8.wrap(lora.wrap(base, job.lora), job.dequant),
        changes=changes,
        extra_files=tuple(job.lora.files) if job.lora else (),
        source_bytes=nbytes, protected=tuple(protected_paths(cfg)), job=job,
    )


def compile_job(cfg: JobConfig, source: Source | None = None, headers=None, files: SourceFiles | None = None) -> Compiled:
    """Any job: a conversion between ecosystems (SPEC 6) or a layout transform. Under
    MPI, `source` and `headers` (a reshard) or `files` (a conversion) are the union of
    what the ranks see."""
    if wants_conversion(cfg):
        return compile_conversion(cfg, files)
    return compile_reshard(cfg, source, headers)
