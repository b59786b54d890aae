"""`autotrans verify A B`: reassemble both checkpoints tensor by tensor, whatever their
layouts, and compare every element bit for bit. Memory: two full tensors at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from runner import dtypes, fp8, plan as planner, strategy_files
from runner.convert.job import megatron_as_hf
from runner.errors import AutotransError, ConfigError, FormatError, name_list, one_line, shown
from runner.execute import LocalPool, tensor_bits
from runner.formats.mindspore_strategy import fill_shapes
from runner.job import Job
from runner.log import warn
from runner.source import Source, discover, read_headers
from runner.strategy import Strategy
from runner.units import Compiled


@dataclass
class Checkpoint:
    """A checkpoint with its layout, ready to be reassembled."""

    source: Source
    strategy: Strategy
    headers: dict
    make_pool: Callable[[], object] | None = None  # for sources read through a conversion

    def pool(self):
        return self.make_pool() if self.make_pool is not None else LocalPool(self.source)

    @staticmethod
    def open(path: str | Path, strategy_path: str | Path = "") -> "Checkpoint":
        source = discover(Path(path))
        if source.kind == "megatron":  # compared under HF names, as the conversion reads it
            infos, make_pool = megatron_as_hf(Path(path))
            return Checkpoint(source, Strategy.full(infos), {0: infos}, make_pool)
        headers = read_headers(source)
        if not strategy_path and source.kind == "distributed":
            guess = Path(path).resolve().parent / "strategy"
            if not guess.is_dir():
                raise ConfigError(f"{path} is distributed: give its strategy (--strategy-a/--strategy-b)")
            strategy_path = guess
        if strategy_path:
            s = strategy_files.load(Path(strategy_path))
            if s.origin == "mindspore":
                s = fill_shapes(s, headers)
        else:
            s = Strategy.full(headers[0])
        return Checkpoint(source, s, headers)

    def full_plan(self, names: list[str]) -> planner.FilePlan:
        """Reads that reassemble `names` whole."""
        full = Strategy(((0,),), {n: p.replicated(p.shape, p.dtype) for n, p in self.strategy.params.items() if n in names})
        return planner.plan_rank(self.strategy, full, 0, headers=lambda r: self.headers[r])


def replica_differences(c: Checkpoint, label: str) -> list[str]:
    """Replicated copies of a parameter that disagree. A transform reads each piece
    from one holder only, so this is where disagreeing replicas are found."""

    problems = []
    pool = LocalPool(c.source)
    try:
        for name in sorted(c.strategy.params):
            p = c.strategy.params[name]
            for cell, positions in sorted(p.holders().items()):
                ranks = sorted({c.strategy.rank_at(s, pos) for s in p.stages for pos in positions})
                if len(ranks) < 2:
                    continue
                first = pool.reader(ranks[0]).array(name)
                for r in ranks[1:]:
                    other = pool.reader(r).array(name)
                    if first.shape != other.shape or not np.array_equal(first, other):
                        problems.append(f"{label}: parameter {name}: replicas on source ranks {ranks[0]} and {r} disagree")
                        break
                pool.release()
    finally:
        pool.close()
    return problems


def compare(a: Checkpoint, b: Checkpoint, cast_to: str | None = None) -> list[str]:
    """Differences between two checkpoints; empty when every tensor is bit-identical
    and every replicated copy in each agrees with its first copy.
    With `cast_to`, A's floating tensors are cast first (B holds a cast copy of A)."""
    problems = replica_differences(a, "A") + replica_differences(b, "B")
    names_a, names_b = set(a.strategy.params), set(b.strategy.params)
    if names_a != names_b:
        if names_a - names_b:
            problems.append(f"only in A: {name_list(sorted(names_a - names_b))}")
        if names_b - names_a:
            problems.append(f"only in B: {name_list(sorted(names_b - names_a))}")
    common = sorted(names_a & names_b)
    plan_a, plan_b = a.full_plan(common), b.full_plan(common)
    pool_a, pool_b = a.pool(), b.pool()
    try:
        b_by_name = {t.name: t for t in plan_b.tensors}  # each plan keeps its own file order
        for ta in plan_a.tensors:
            name, tb = ta.name, b_by_name[ta.name]
            want = tb.dtype if tb.dtype == ta.dtype else dtypes.cast_dtype(ta.dtype, cast_to)  # a cast may keep some
            if ta.box.sizes != tb.box.sizes or want != tb.dtype:
                problems.append(f"{name}: A is {list(ta.box.sizes)} {want}, B is {list(tb.box.sizes)} {tb.dtype}")
                continue
            xa = dtypes.cast(tensor_bits(ta, pool_a), ta.dtype, want)
            xb = tensor_bits(tb, pool_b)
            if not np.array_equal(xa, xb):
                idx = np.unravel_index(int(np.argmax(xa != xb)), xa.shape)
                problems.append(f"{name}: first difference at index {list(map(int, idx))}")
            pool_a.release()
            pool_b.release()
    finally:
        pool_a.close()
        pool_b.close()
    return problems


def report(problems: list[str], what: str, cast: str | None = None) -> int:
    """Print the verdict. After a cast (`cast`: the job's dtype) the output cannot be
    bit-identical to the source: say what was compared instead."""
    if problems:
        print(one_line(f"autotrans: verify: {what} differ: {problems[0]}"))
        for p in problems[1:]:
            print(one_line(f"  {p}"))
        return 1
    print(one_line(f"autotrans: verify: {what} are " + (f"equal after casting the source to {cast}" if cast else "bit-identical")))
    return 0


def verify_paths(a: str, b: str, strategy_a: str = "", strategy_b: str = "") -> int:
    for label, path in (("A", a), ("B", b)):
        if not Path(path).exists():
            raise FormatError(f"verify: checkpoint {label}, {shown(path)}, does not exist")
    return report(compare(Checkpoint.open(a, strategy_a), Checkpoint.open(b, strategy_b)), f"{a} and {b}")


def verify_compiled(job: Compiled) -> int:
    """`verify: true` after any job: compare its output with its source."""
    return verify_job(job.job) if job.kind == "reshard" else verify_conversion(job)


def verify_conversion(job: Compiled) -> int:
    """HF and Megatron checkpoints are both read under HF names, so the output is compared
    with the source tensor by tensor. A MindFormers side, or a LoRA merge, changes names
    or values by design: said, not compared."""
    cfg = job.cfg
    mindformers_side = cfg.output_format == "mindformers" or job.source.kind not in ("hf", "megatron")
    if mindformers_side or cfg.lora is not None:
        warn("verify: not run; this conversion renames tensors (MindFormers) or merges LoRA, so outputs differ from the source by design")
        return 0
    cast_to = dtypes.CAST_NAMES[cfg.dtype] if cfg.dtype else None
    src = Checkpoint.open(cfg.load_checkpoint)
    if job.dequant is not None:  # the source's FP8 weights as the job dequantized them
        d = job.dequant
        _, seen, headers = fp8.dequantize(src.strategy, src.headers, d.scale_of, d.block, cast_to)
        src = Checkpoint(src.source, seen, headers, lambda: fp8.wrap(LocalPool(src.source), d))
    return report(compare(src, Checkpoint.open(job.out_dir), cast_to), "source and output", cfg.dtype)


def verify_job(job: Job) -> int:
    """Compare a finished job's output with its source (after the job's cast)."""
    if job.cfg.lora:
        raise AutotransError("verify compares outputs with sources; a LoRA merge changes the weights by design")
    src = Checkpoint(job.source, job.src, job.headers, lambda: fp8.wrap(LocalPool(job.source), job.dequant))
    out = Checkpoint.open(job.out_dir, job.cfg.output_path / "strategy")
    return report(compare(src, out, job.cast_to), "source and output", job.cfg.dtype)

