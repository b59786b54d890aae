"""What every job compiles to (DESIGN "One engine"): output units, each one destination
file with its writer and a frozen plan of read items, plus finishing steps (index.json,
config and tokenizer copies, marker files). Renames, row permutations, LoRA merges and
casts travel with the plan and the pool its reads go through, so runner.run runs a
reshard, a conversion or a LoRA merge the same way. Also the job digest."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from runner.config import JobConfig
from runner.execute import SlicePool, WrittenFile
from runner.fp8 import Dequant
from runner.durable import check_no_overlap
from runner.errors import AutotransError, one_line
from runner.outputs import PROGRESS
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
    finish: Callable[[Path], list[Path]] = _plain_finish  # finishing steps in an output folder
    finish_paths: tuple[str, ...] = ()  # the files they write, relative to it
    finish_reads: tuple[Path, ...] = ()  # the files they copy (reference config and tokenizer files)
    extra_files: tuple[Path, ...] = ()  # read besides the source ranks' files (LoRA adapters)
    whole_source: bool = False  # every unit reads every source rank (conversions)
    source_bytes: int = 0
    protected: tuple[Path, ...] = ()  # the job's input paths besides its source files (SPEC 3)
    job: object = field(default=None, compare=False)  # runner.job.Job of a reshard
    dequant: Dequant | None = None  # FP8 weights a conversion's cast dequantizes

    def read_bytes(self, fp: FilePlan) -> int:
        """Source bytes a unit's plan reads (a reshard's dequantized weights at their FP8 size)."""
        d = self.job.dequant if self.kind == "reshard" and self.job is not None else None
        return fp.read_bytes if d is None else sum(d.read_bytes(t) for t in fp.tensors)

    @property
    def out_dir(self) -> Path:
        return self.cfg.output_path / TRANSFORMED

    def inputs(self) -> list[Path]:
        """Every input the job reads: source files and folder, strategies, adapters, reference."""
        files = [p for ps in (self.source.files.values() if self.source else ()) for p in ps]
        return [*self.protected, *files, *self.extra_files]

    def check_overlap(self, folders: list[Path] = ()) -> None:
        """Refuse (exit 2) an output tree any folder of which (output_dir, strategy/,
        transformed_checkpoint/ and the folders the units write in, and `folders`) is,
        holds or lies inside an input."""
        out, tc = self.cfg.output_path, self.out_dir
        mine = {out, out / STRATEGY_DIR, tc, tc / PROGRESS, *((tc / p).parent for p in self.paths()), *folders}
        check_no_overlap(sorted(mine), self.inputs())

    def paths(self) -> list[str]:
        """Every file the job creates in transformed_checkpoint/, relative to it."""
        return sorted({u.path for u in self.units} | set(self.finish_paths))

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
        files += [*self.extra_files, *self.finish_reads] if extras else []
        return [(_label(p, root), p) for p in dict.fromkeys(files)]


def _label(p: Path, root: Path) -> str:
    try:
        return str(Path(p).relative_to(root))
    except ValueError:
        return Path(p).name


def stamp(label: str, path: Path) -> dict:
    st = Path(path).stat()
    return {"label": label, "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_unchanged(stamps: list[dict]) -> None:
    """Fail (exit 1) naming the first source file whose size or mtime is no longer what
    its stamp says: the output may mix its old and new bytes (SPEC 3)."""
    for s in stamps:
        try:
            st = os.stat(s["path"])
        except OSError as e:
            raise AutotransError(f"source file {one_line(s['path'])} cannot be read any more ({e.strerror}); "
                                 "it changed while the job ran: run the job again once the source is settled") from None
        if (st.st_size, st.st_mtime_ns) != (s["size"], s["mtime_ns"]):
            raise AutotransError(f"source file {one_line(s['path'])} changed while the job ran (size or mtime); "
                                 "the output may mix old and new bytes: run the job again once the source is settled")


def digest(job: Compiled, stamps: list[dict]) -> str:
    """The job digest: what it does and the source files it reads (size and mtime), not
    where they are (SPEC 9: ranks on different nodes compare it)."""
    doc = {"content": job.content, "stamps": sorted([s["label"], s["size"], s["mtime_ns"]] for s in stamps)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def content_digest(job: Compiled) -> str:
    return hashlib.sha256(json.dumps(job.content, sort_keys=True, default=str).encode()).hexdigest()


def protected_paths(cfg: JobConfig) -> list[Path]:
    """The input paths a job file names."""
    keys = (cfg.load_checkpoint, cfg.src_strategy_path_or_dir, cfg.dst_strategy_path_or_dir, cfg.reference_hf_dir,
            (cfg.lora or {}).get("adapter"))
    return [Path(p) for p in keys if p]  # Path("") would be the cwd
