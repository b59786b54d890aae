"""`autotrans plan CONFIG` (SPEC 10): what the job would read and write, per destination
rank and in total, touching no weights.

Native strategies carry shapes and dtypes, so with no `load_checkpoint` the source is
taken to be distributed as its strategy says, one file per source rank. With a
checkpoint the job is prepared exactly as `run` prepares it (headers only), so the plan
shows what the run would do, MindSpore strategies and extra entries included.

Ranks are planned one at a time and only their summary rows are kept, so memory stays
bounded by one rank's plan. Byte counts are tensor payload bytes, file headers
excluded; read amplification is bytes read / bytes written (above 1 only where a
cast narrows the type; replicated destinations each count their own reads)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from runner import plan as planner, strategy_files
from runner.compile import compile_job, from_job
from runner.config import JobConfig, output_format_for
from runner.errors import ConfigError, one_line
from runner.job import Job, destination_strategy
from runner.log import warn
from runner.units import Compiled

MAX_GROUPS = 40  # text output: more runs of equal ranks than this are shown per stage


def plan_job(cfg: JobConfig) -> Compiled:
    """The job `run` would compile; without a checkpoint, from native strategies alone."""
    cfg = replace(cfg, only_save_strategy=False)
    if cfg.preprocess_data is not None:
        raise ConfigError("this job preprocesses a dataset: autotrans plan has no checkpoint layout to plan")
    if cfg.load_checkpoint and Path(cfg.load_checkpoint).exists():
        return compile_job(cfg)
    if cfg.output_format in ("hf", "megatron", "mindformers"):
        raise ConfigError(f"load_checkpoint {cfg.load_checkpoint or '(not set)'} does not exist: "
                          "conversions are planned from their checkpoint's headers")
    if cfg.load_checkpoint:
        warn(f"load_checkpoint {cfg.load_checkpoint} does not exist yet: planned from the strategies alone")
        cfg = replace(cfg, load_checkpoint="")
    if not cfg.src_strategy_path_or_dir:
        raise ConfigError("autotrans plan needs load_checkpoint, or src_strategy_path_or_dir naming native strategy files")
    src = strategy_files.load(Path(cfg.src_strategy_path_or_dir))
    if src.origin == "mindspore":
        raise ConfigError(
            f"src_strategy_path_or_dir {cfg.src_strategy_path_or_dir} holds MindSpore strategy files, which carry "
            "no shapes: set load_checkpoint so that plan can read the checkpoint headers"
        )
    src.validate()
    dst, src = destination_strategy(cfg, src)
    job = Job(output_format_for(cfg, set()), None, src, dst)
    planner.check_compatible(job.src, job.dst, job.cast_to)
    return from_job(job)


def rank_rows(job: Compiled) -> tuple[list[dict], set[int]]:
    """Plan every unit, keeping only its summary; also the source ranks read."""
    rows, touched = [], set()
    for unit in job.units:
        fp = job.plan(unit, None)
        src_ranks = set(job.source.ranks) if job.whole_source else fp.src_ranks
        touched |= src_ranks
        read, write = job.read_bytes(fp), fp.write_bytes
        rows.append({"rank": unit.key, "stage": unit.stage, "file": str(job.out_dir / unit.path), "files": 1,
                     "tensors": len(fp.tensors), "read_bytes": read, "write_bytes": write,
                     "src_ranks": len(src_ranks), "src_files": _file_count(job, src_ranks),
                     "read_amplification": _ratio(read, write)})
    return rows, touched


def _file_count(job: Compiled, src_ranks: set[int]) -> int:
    """Source files behind `src_ranks`: one per rank when no checkpoint is given."""
    return sum(len(job.source.files[r]) for r in src_ranks) if job.source else len(src_ranks)


def source_summary(job: Compiled) -> dict:
    if job.source is None:
        src = job.job.src
        return {"path": None, "kind": "distributed", "assumed": True, "ranks": src.world_size,
                "files": src.world_size, "bytes": sum(src.rank_bytes(r) for r in src.ranks)}
    return {"path": str(job.source.root), "kind": job.source.kind, "assumed": False,
            "ranks": len(job.source.ranks), "files": sum(len(f) for f in job.source.files.values()),
            "bytes": job.source_bytes}


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def summarize(job: Compiled) -> dict:
    """The whole report as a JSON-ready document."""
    rows, touched = rank_rows(job)
    source = source_summary(job)
    read = sum(r["read_bytes"] for r in rows)
    write = sum(r["write_bytes"] for r in rows)
    return {
        "format": "autotrans-plan", "version": 1,
        "kind": job.kind,
        "source": source,
        "destination": {"ranks": job.dst.world_size, "stages": len(job.dst.stages),
                        "output_format": job.cfg.output_format, "output_dir": str(job.out_dir)},
        "nothing_to_do": not job.changes if job.source is not None else None,
        "ranks": rows,
        "total": {"files": len(rows), "tensors": sum(r["tensors"] for r in rows),
                  "read_bytes": read, "write_bytes": write, "read_amplification": _ratio(read, write),
                  "src_files_touched": _file_count(job, touched), "src_files": source["files"],
                  "reads_per_source_byte": _ratio(read, source["bytes"])},
    }


def human(n: int) -> str:
    """Decimal units, as the run summary prints them."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def runs(ranks: list[dict]) -> list[list[dict]]:
    """Runs of consecutive ranks with the same share (same stage, tensors, bytes, sources)."""
    keys = ("stage", "tensors", "read_bytes", "write_bytes", "src_ranks", "src_files")
    out: list[list[dict]] = []
    for r in ranks:
        if out and all(out[-1][-1][k] == r[k] for k in keys) and out[-1][-1]["rank"] + 1 == r["rank"]:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def by_stage(ranks: list[dict]) -> list[list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in ranks:
        out.setdefault(r["stage"], []).append(r)
    return [out[s] for s in sorted(out)]


def _range(values: list, fmt=str) -> str:
    """One value, or the lowest and highest of a group's values."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    lo, hi = min(present), max(present)
    return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"


def _row(group: list[dict]) -> str:
    ids = [r["rank"] for r in group]
    span = str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}" if ids[-1] - ids[0] == len(ids) - 1 else f"{ids[0]},..,{ids[-1]}"
    col = lambda k, fmt=str: _range([r[k] for r in group], fmt)  # noqa: E731
    return (f"{span:<13}{len(group):>6}{col('stage'):>7}{col('tensors'):>9}{col('read_bytes', human):>17}"
            f"{col('write_bytes', human):>17}{col('src_files'):>10}{col('read_amplification', '{:.2f}'.format):>11}")


def text(doc: dict) -> str:
    """Readable report: one line per run of consecutive ranks with the same share, or,
    when there are more than MAX_GROUPS runs, one line per stage showing ranges."""
    src, dst, total = doc["source"], doc["destination"], doc["total"]
    where = "no checkpoint given: assumed one file per rank of the source strategy" if src["assumed"] else src["path"]
    lines = [
        f"source: {src['kind']}, {src['ranks']} rank(s), {src['files']} file(s), {human(src['bytes'])} ({where})",
        f"destination: {dst['ranks']} rank(s) in {dst['stages']} stage(s), {dst['output_format']} -> {dst['output_dir']}",
    ]
    if doc["nothing_to_do"]:
        lines.append("note: the source already has the destination layout and format; `autotrans run` would copy nothing")
    groups = runs(doc["ranks"])
    if len(groups) > MAX_GROUPS:
        lines.append(f"ranks per stage, as ranges ({len(groups)} runs of ranks with equal shares; --json lists every rank)")
        groups = by_stage(doc["ranks"])
    lines += ["", f"{'ranks':<13}{'count':>6}{'stage':>7}{'tensors':>9}{'read/rank':>17}{'write/rank':>17}"
                  f"{'src files':>10}{'read amp':>11}"]
    lines += [_row(g) for g in groups]
    amp = _range([total["read_amplification"]], "{:.2f}".format)
    per_src = "" if total["reads_per_source_byte"] is None else f"; each source byte read {total['reads_per_source_byte']:.2f} times"
    lines += [
        "",
        f"total: {total['files']} file(s), {total['tensors']} tensors; read {human(total['read_bytes'])} "
        f"({total['read_bytes']} B), write {human(total['write_bytes'])} ({total['write_bytes']} B); "
        f"read amplification {amp}{per_src}; {total['src_files_touched']} of {total['src_files']} source file(s) touched",
    ]
    return "\n".join(one_line(line) for line in lines)  # paths from the job and the disk: no fake lines


def report(cfg: JobConfig, as_json: bool) -> int:
    """Print the plan of the job `cfg` describes; the exit code."""
    doc = summarize(plan_job(cfg))
    if as_json:
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(text(doc))
    return 0
