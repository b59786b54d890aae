"""Preparing a layout transform (SPEC 3): resolve source and strategies, reconcile
names with the checkpoint, compare. Deterministic, so each worker or MPI rank prepares
the same Job (runner.compile turns it into units; runner.run runs them)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

from runner import dtypes, fp8, lora, plan as planner, strategy as strat, strategy_files
from runner.config import JobConfig, output_format_for
from runner.errors import ConfigError, name_list
from runner.formats.base import TensorInfo
from runner.formats.mindspore_strategy import fill_from, fill_shapes
from runner.formats.registry import output_format
from runner.generate import arch_of, kept_of, scale_pairs, with_source
from runner.layout import ParamLayout
from runner.log import warn
from runner.source import Source, discover, read_headers
from runner.strategy import Strategy
from runner.templates import regroup

TRANSFORMED = "transformed_checkpoint"


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
    dequant: fp8.Dequant | None = None  # FP8 weights a cast dequantizes

    @property
    def out_dir(self) -> Path:
        return self.cfg.output_path / TRANSFORMED

    @property
    def cast_to(self) -> str | None:
        return dtypes.CAST_NAMES[self.cfg.dtype] if self.cfg.dtype else None

    def out_path(self, rank: int) -> Path:
        suffix = output_format(self.cfg.output_format).suffix
        return self.out_dir / f"rank_{rank}" / f"{self.cfg.prefix}{rank}{suffix}"

    def describe(self) -> dict:
        """What the job does, independent of paths: strategies, options, extras."""
        return {
            "src": self.src.to_json() if self.src else None,
            "dst": self.dst.to_json(),
            "options": self.cfg.options(),
            "extras": sorted(self.extras),
            "lora": self.lora.describe() if self.lora else None,
            "dequant": self.dequant.describe() if self.dequant else None,
        }

    def plan(self, rank: int, available: Callable[[int], bool] | None = None,
             prefer: Callable[[int], bool] | None = None) -> planner.FilePlan:
        return planner.plan_rank(
            self.src, self.dst, rank, cast_to=self.cast_to, extras=self.extras,
            headers=(lambda r: self.headers[r]) if self.headers else None, available=available, prefer=prefer,
        )


# -- preparing ------------------------------------------------------------------------------
def source_strategy(cfg: JobConfig, source: Source, headers: dict[int, dict[str, TensorInfo]]) -> Strategy:
    if cfg.src_strategy_path_or_dir:
        s = strategy_files.load(Path(cfg.src_strategy_path_or_dir))
        if s.origin == "mindspore":
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
        dst = strategy_files.load(Path(cfg.dst_strategy_path_or_dir))
        cast = dtypes.CAST_NAMES.get(cfg.dtype)
        if dst.origin == "mindspore":  # its files hold no shapes: take the source's
            if src is None:
                raise ConfigError("a MindSpore destination strategy holds no shapes: set load_checkpoint")
            dst = fill_from(dst, src, cast)
        else:  # the strategy written beside the files says what they hold
            dst = dst.cast(cast, kept_of(cfg))
    elif not cfg.use_parallel:
        if src is None:
            raise ConfigError("use_parallel: false merges a checkpoint: set load_checkpoint")
        keep = kept_of(cfg)
        dst = Strategy(((0,),), {n: merged_layout(p, dtypes.cast_dtype(p.dtype, dtypes.CAST_NAMES.get(cfg.dtype), keep.get(n, ())))
                                 for n, p in src.params.items()}, "full")
    elif arch_of(cfg) is not None:
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
            warn(f"{len(unnamed)} checkpoint entries the strategy does not name are copied whole to every rank: {name_list(unnamed)}")
        if missing:
            warn(f"{len(missing)} parameters the strategy names are not in the checkpoint and are skipped: {name_list(missing)}")
        return src, dst, extras
    raise planner.name_mismatch("source checkpoint and strategy disagree", {
        "in the checkpoint but not the source strategy": set(unnamed),
        "in the source strategy but not the checkpoint": set(missing),
    })


def without_placeholder(cfg: JobConfig) -> JobConfig:
    """A dry run whose load_checkpoint does not exist runs without it: training YAMLs
    ship placeholders such as /path/to/ckpt, and a dry run needs no weights."""
    if cfg.only_save_strategy and cfg.load_checkpoint and not Path(cfg.load_checkpoint).exists():
        warn(f"load_checkpoint {cfg.load_checkpoint} does not exist; the dry run generates the strategy without it")
        return replace(cfg, load_checkpoint="")
    return cfg


def prepare(cfg: JobConfig, source: Source | None = None,
            headers: Headers | None = None) -> Job:
    """Everything the job needs before a byte moves; deterministic, and it changes none
    of its arguments. Under MPI the source and its headers come from every rank (runner.mpi)."""
    if not cfg.load_checkpoint:
        if cfg.only_save_strategy and (cfg.dst_strategy_path_or_dir or arch_of(cfg) is not None):
            return Job(output_format_for(cfg, set()), None, None, destination_strategy(cfg, None)[0])
        raise ConfigError("config key load_checkpoint is required")
    source = source or discover(Path(cfg.load_checkpoint), file_format=cfg.load_ckpt_format)
    cfg = output_format_for(cfg, {p.suffix for files in source.files.values() for p in files})
    headers = headers if headers is not None else read_headers(source)
    src = source_strategy(cfg, source, headers)
    merge = None
    if cfg.lora is not None:
        merge, src, headers = lora.prepare(cfg.lora, cfg.model, src, headers, source.root)
    dequant = None
    if cfg.dtype and any(p.dtype in fp8.FP8 for p in src.params.values()):
        scale_of, block = scale_pairs(cfg, src)
        dequant, src, headers = fp8.dequantize(src, headers, scale_of, block, dtypes.CAST_NAMES[cfg.dtype])
    dst, src = destination_strategy(cfg, src)
    if merge:
        dst = merge.exclude(dst)
    extras: dict[str, tuple[int, TensorInfo]] = {}
    if not cfg.only_save_strategy:
        src, dst, extras = reconcile_names(src, dst, headers)
        planner.check_headers(src, headers)
        planner.check_compatible(src, dst, dtypes.CAST_NAMES[cfg.dtype] if cfg.dtype else None)
    return Job(cfg, source, src, dst, dict(headers), extras, merge, dequant)


def needs_change(job: Job) -> list[str]:
    """Why the job must write anything; empty when the source can be used as it is."""
    reasons = [f"layout: {d}" for d in strat.differences(job.src, job.dst)]
    suffixes = {p.suffix for files in job.source.files.values() for p in files}
    if suffixes != {output_format(job.cfg.output_format).suffix}:
        reasons.append(f"format: {', '.join(sorted(suffixes))} -> {job.cfg.output_format}")
    if any(job.dst.params[n].dtype != p.dtype for n, p in job.src.params.items() if n in job.dst.params):
        reasons.append(f"dtype cast to {job.cast_to}")
    if job.cfg.lora:
        reasons.append("LoRA merge")
    return reasons
