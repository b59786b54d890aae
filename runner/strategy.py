"""Strategies: which layout every parameter has over which ranks. Native JSON files
(SPEC 5) are read and written here; MindSpore protobuf files by
runner.formats.mindspore_strategy. Per-rank and per-stage files merge into one Strategy."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping

from runner import dtypes, durable
from runner.errors import FormatError, LayoutError, cause, shown
from runner.formats.base import TensorInfo
from runner.layout import Box, ParamLayout
from runner.ranks import gaps

FORMAT_TAG = "autotrans-strategy"
RANK_FILE = "ckpt_strategy_rank_{rank}{suffix}"
MERGED_FILE = "merged_ckpt_strategy{suffix}"


class FrozenParams(dict):
    """A strategy's parameters, read-only: a prepared job never changes its inputs, so
    every change makes a new Strategy."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a Strategy's params are read-only; build a new Strategy")

    __setitem__ = __delitem__ = pop = popitem = clear = update = setdefault = __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self):
        return FrozenParams, (dict(self),)


@dataclass(frozen=True)
class Strategy:
    """Pipeline stages (device ranks per stage) and every parameter's layout; immutable.

    `origin` says where it came from: "native" and "generated" strategies must name
    exactly the checkpoint's tensors; a "mindspore" one may name fewer or more (SPEC 3)."""

    stages: tuple[tuple[int, ...], ...]
    params: Mapping[str, ParamLayout]
    origin: str = "native"
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", FrozenParams(self.params))
        object.__setattr__(self, "notes", tuple(self.notes))

    def with_params(self, params: Mapping[str, ParamLayout]) -> "Strategy":
        """The same stages, origin and notes over other parameters."""
        return Strategy(self.stages, params, self.origin, self.notes)

    def cast(self, cast_to: str | None, keep: Mapping[str, tuple[str, ...]] | None = None) -> "Strategy":
        """The layout of the files a job writes with a `dtype` cast (floats cast, others
        kept, as are the dtypes `keep` names for a parameter)."""
        if not cast_to:
            return self
        keep = keep or {}
        return self.with_params({n: replace(p, dtype=dtypes.cast_dtype(p.dtype, cast_to, keep.get(n, ()))) for n, p in self.params.items()})

    @staticmethod
    def full(tensors: Mapping[str, TensorInfo]) -> "Strategy":
        """The layout of a full checkpoint: one rank holding every tensor whole."""
        return Strategy(((0,),), {n: ParamLayout.replicated(t.shape, t.dtype) for n, t in tensors.items()}, "full")

    @cached_property
    def _where(self) -> dict[int, tuple[int, int]]:
        out: dict[int, tuple[int, int]] = {}
        for s, ranks in enumerate(self.stages):
            for pos, r in enumerate(ranks):
                if r in out:
                    raise LayoutError(f"rank {r} appears in more than one stage position ({self.stages})")
                out[r] = (s, pos)
        return out

    @property
    def world_size(self) -> int:
        return len(self._where)

    @property
    def ranks(self) -> list[int]:
        return sorted(self._where)

    def stage_of(self, rank: int) -> int:
        return self._where[rank][0]

    def params_of_rank(self, rank: int) -> list[str]:
        """Names of the parameters the rank holds, sorted."""
        stage = self.stage_of(rank)
        return sorted(n for n, p in self.params.items() if stage in p.stages)

    def box(self, name: str, rank: int) -> Box | None:
        stage, pos = self._where[rank]
        p = self.params[name]
        return p.box(pos) if stage in p.stages else None

    def rank_at(self, stage: int, position: int) -> int:
        return self.stages[stage][position]

    def validate(self) -> None:
        """Raise LayoutError naming the parameter unless every layout is possible."""
        if sorted(self._where) != list(range(len(self._where))):
            raise LayoutError(f"strategy stages {list(map(list, self.stages))[:8]} leave out ranks {gaps(self._where)}")
        sizes = {s: len(r) for s, r in enumerate(self.stages)}
        for name, p in self.params.items():
            dtypes.itemsize(p.dtype)
            p.check(name, sizes)

    def rank_bytes(self, rank: int) -> int:
        """Tensor payload bytes of the rank's file."""
        return sum(self.params[n].local_numel * dtypes.itemsize(self.params[n].dtype) for n in self.params_of_rank(rank))

    # -- native JSON ------------------------------------------------------------------
    def to_json(self, rank: int | None = None) -> dict:
        """A per-rank file's content (rank given) or the merged file's."""
        names = self.params_of_rank(rank) if rank is not None else sorted(self.params)
        doc: dict[str, Any] = {"format": FORMAT_TAG, "version": 1}
        if rank is not None:
            doc["rank"] = rank
        doc["stages"] = [list(s) for s in self.stages]
        doc["params"] = {n: _param_to_json(self.params[n]) for n in names}
        return doc


def _param_to_json(p: ParamLayout) -> dict:
    out: dict[str, Any] = {
        "shape": list(p.shape), "dtype": p.dtype,
        "stage": p.stages[0] if len(p.stages) == 1 else list(p.stages),
        "dev_matrix": list(p.dev_matrix), "tensor_map": _tensor_map_json(p),
        "opt_shard": p.opt_shard,
        "stored_shape": list(p.stored_shape) if p.stored_shape is not None else None,
    }
    if p.opt_shard_step != 1:
        out["opt_shard_step"] = p.opt_shard_step
    return out


def _tensor_map_json(p: ParamLayout) -> list:
    return [-1 if not axes else axes[0] if len(axes) == 1 else list(axes) for axes in p.tensor_map]


def _int_list(value: Any, what: str, allow_nested: bool = False) -> list:
    if not isinstance(value, list):
        raise FormatError(f"{what} must be a list, got {type(value).__name__}")
    for v in value:
        ok = isinstance(v, int) and not isinstance(v, bool)
        if allow_nested and isinstance(v, list):
            ok = all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        if not ok:
            raise FormatError(f"{what} must hold integers, got {v!r}")
    return value


def _param_from_json(name: str, d: Any, where: str) -> ParamLayout:
    what = f"{where}: parameter {name}"
    if not isinstance(d, dict):
        raise FormatError(f"{what}: expected an object")
    for key in ("shape", "dtype", "stage", "dev_matrix", "tensor_map"):
        if key not in d:
            raise FormatError(f"{what}: missing key {key!r}")
    shape = tuple(_int_list(d["shape"], f"{what}: shape"))
    if any(s < 0 for s in shape):
        raise FormatError(f"{what}: negative size in shape {list(shape)}")
    dtype = d["dtype"]
    if not isinstance(dtype, str) or dtype not in dtypes.ITEMSIZE:
        raise FormatError(f"{what}: unknown dtype {dtype!r}")
    stage = d["stage"]
    stages = (stage,) if isinstance(stage, int) and not isinstance(stage, bool) else tuple(_int_list(stage, f"{what}: stage"))
    tmap = tuple(() if v == -1 else (v,) if isinstance(v, int) else tuple(v)
                 for v in _int_list(d["tensor_map"], f"{what}: tensor_map", allow_nested=True))
    if any(k < 0 for axes in tmap for k in axes):
        raise FormatError(f"{what}: tensor_map entries must be -1 or device axes >= 0")
    stored = d.get("stored_shape")
    opt = d.get("opt_shard", 1)
    step = d.get("opt_shard_step", 1)
    for key, v in (("opt_shard", opt), ("opt_shard_step", step)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise FormatError(f"{what}: {key} must be an integer")
    return ParamLayout(
        shape=shape, dtype=dtype, stages=stages,
        dev_matrix=tuple(_int_list(d["dev_matrix"], f"{what}: dev_matrix")),
        tensor_map=tmap, opt_shard=opt, opt_shard_step=step,
        stored_shape=tuple(_int_list(stored, f"{what}: stored_shape")) if stored is not None else None,
    )


def parse_native(doc: Any, where: str) -> Strategy:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_TAG:
        raise FormatError(f"{where}: not an autotrans strategy file (\"format\": \"{FORMAT_TAG}\" missing)")
    if doc.get("version") != 1:
        raise FormatError(f"{where}: strategy version {doc.get('version')!r} is not supported (expected 1)")
    raw_stages = doc.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise FormatError(f"{where}: 'stages' must be a non-empty list of rank lists")
    stages = tuple(tuple(_int_list(s, f"{where}: stages")) for s in raw_stages)
    params = doc.get("params")
    if not isinstance(params, dict):
        raise FormatError(f"{where}: 'params' must be an object")
    return Strategy(stages, {n: _param_from_json(n, p, where) for n, p in params.items()}, "native")


def merge(parts: Iterable[Strategy], where: str) -> Strategy:
    """One strategy from per-rank or per-stage parts; they must agree where they overlap."""
    parts = list(parts)
    if not parts:
        raise FormatError(f"{where}: no strategy files found")
    first = parts[0]
    params: dict[str, ParamLayout] = {}
    for part in parts:
        if part.stages != first.stages:
            raise LayoutError(f"{where}: strategy files disagree on the pipeline stages")
        for name, p in part.params.items():
            if params.setdefault(name, p) != p:
                raise LayoutError(f"{where}: strategy files disagree on parameter {name}")
    return Strategy(first.stages, params, first.origin, [n for s in parts for n in s.notes])


def strategy_files(path: Path) -> list[Path]:
    """A strategy file, or the strategy files at the top level of a folder."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"strategy path {shown(path)} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".ckpt"))
    if not files:
        raise FormatError(f"strategy folder {path} holds no .json or .ckpt strategy files")
    return files


def load_native(files: list[Path], path: Path) -> Strategy:
    """Native JSON strategy files (of strategy path `path`), merged."""
    parts = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a 5000-digit number
            raise FormatError(f"{f}: cannot read strategy JSON ({cause(e)})") from None
        parts.append(parse_native(doc, str(f)))
    return merge(parts, str(path))


def write_rank_file(strategy: Strategy, rank: int, folder: Path) -> Path:
    out = Path(folder) / RANK_FILE.format(rank=rank, suffix=".json")
    _write_json(out, strategy.to_json(rank))
    return out


def write_merged_file(strategy: Strategy, folder: Path) -> Path:
    out = Path(folder) / MERGED_FILE.format(suffix=".json")
    _write_json(out, strategy.to_json())
    return out


def dumps(doc: dict) -> str:
    """A strategy document with one parameter per line: diffable, readable, compact."""
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items() if k != "params")
    params = ",\n".join(f"  {json.dumps(n)}: {json.dumps(p)}" for n, p in doc["params"].items())
    return "{\n" + head + ',\n "params": {\n' + params + "\n }\n}\n"


def _write_json(path: Path, doc: dict) -> None:
    durable.write_bytes(path, dumps(doc).encode())


# -- comparison ---------------------------------------------------------------------------
def describe(p: ParamLayout) -> str:
    s = f"shape {list(p.shape)} {p.dtype} stage {list(p.stages)} dev_matrix {list(p.dev_matrix)} tensor_map {_tensor_map_json(p)}"
    if p.opt_shard > 1:
        s += f" opt_shard {p.opt_shard}"
    if p.stored_shape is not None:
        s += f" stored {list(p.stored_shape)}"
    return s


def differences(a: Strategy, b: Strategy) -> list[str]:
    """Human-readable differences, parameter by parameter; empty when the layouts match."""
    out = []
    if a.world_size != b.world_size or a.stages != b.stages:
        out.append(f"stages: {[list(s) for s in a.stages]} != {[list(s) for s in b.stages]}")
    for name in sorted(set(a.params) | set(b.params)):
        pa, pb = a.params.get(name), b.params.get(name)
        if pa is None:
            out.append(f"{name}: only in B ({describe(pb)})")
        elif pb is None:
            out.append(f"{name}: only in A ({describe(pa)})")
        elif not pa.same_geometry(pb) or (a.stages != b.stages and _stage_ranks(a, pa) != _stage_ranks(b, pb)):
            out.append(f"{name}: {describe(pa)} != {describe(pb)}")
    return out


def _stage_ranks(s: Strategy, p: ParamLayout) -> list[tuple[int, ...]]:
    return [s.stages[i] for i in p.stages]
