"""MindSpore's protobuf strategy files (ParallelStrategyMap): ckpt_strategy_rank_{r}.ckpt
per rank and merged_ckpt_strategy.ckpt, read and written with MindSpore's semantics
(mindspore.parallel._parallel_serialization and _tensor):

- a file's pipeline stage is its first parallel_strategy_item's stage (none: stage 0);
  a merged file names parameters "{stage}-{name}"; a stage holds prod(dev_matrix) ranks,
  stage s being ranks s*n .. s*n+n-1;
- one TensorMap entry is the flat tensor_map; several entries are one per tensor dim,
  each listing that dim's device axes (first = outermost);
- opt_weight_shard_size (0: none, -1: all replicas) splits dim 0 further over the
  innermost replica coordinates, which is our opt_shard with opt_shard_step 1;
  opt_weight_shard_step is the device-rank stride of that group, checked by MindSpore;
- `field` and op strategies play no part in a checkpoint transform.

The files carry no shapes or dtypes: `fill_shapes` takes them from checkpoint headers."""

from __future__ import annotations

import math
import re
from pathlib import Path

from runner.dtypes import cast_dtype
from runner.errors import FormatError, LayoutError, cause, name_list
from runner.formats.base import TensorInfo
from runner.formats.mindspore_proto import message
from runner.layout import ParamLayout
from runner.log import warn
from runner.ranks import gaps
from runner.durable import write_bytes
from runner.strategy import MERGED_FILE, RANK_FILE, Strategy

UNKNOWN_DTYPE = "?"  # until fill_shapes; shapes are -1 per dim until then
_MERGED_NAME = re.compile(r"(\d{1,9})-(.+)")
MAX_DEVICES = 1 << 20  # bounds what a corrupt file can make the reader enumerate
_STAGE_NODE = "autotrans_pipeline_stage"  # the one op strategy item our files carry


def _warn(what: str, names: list[str]) -> None:
    warn(f"{len(names)} parameters {what} and are skipped: {name_list(sorted(names))}")


# -- reading ------------------------------------------------------------------------------
def _parse(path: Path):
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read strategy file: {e.strerror}") from None
    if not raw:
        raise FormatError(f"{path}: empty strategy file")
    doc = message("ParallelStrategyMap")()
    try:
        doc.ParseFromString(raw)
    except Exception as e:  # protobuf's DecodeError and friends
        raise FormatError(f"{path}: not a MindSpore protobuf strategy file ({cause(e)})") from None
    return doc


def _layout(path: Path, name: str, pl) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], int]:
    """(dev_matrix, tensor_map, opt_shard) of one ParallelLayouts message."""
    what = f"{path}: parameter {name}"
    if len(pl.dev_matrix) != 1 or not pl.dev_matrix[0].dim:
        raise FormatError(f"{what}: expected one non-empty dev_matrix (a strategy with pipeline parallelism only cannot be transformed)")
    dev = tuple(int(d) for d in pl.dev_matrix[0].dim)
    if not pl.tensor_map:
        raise FormatError(f"{what}: no tensor_map")
    if len(pl.tensor_map) == 1:
        tmap = tuple(() if k == -1 else (k,) for k in pl.tensor_map[0].dim)
    else:  # one entry per tensor dim; MindSpore drops empty entries
        tmap = tuple(tuple(k for k in tm.dim if k != -1) for tm in pl.tensor_map if len(tm.dim))
    if any(not 0 <= k < len(dev) for axes in tmap for k in axes):
        raise FormatError(f"{what}: tensor_map {[list(a) for a in tmap]} names a device axis outside dev_matrix {list(dev)}")
    if any(len(s.dim) for s in pl.param_split_shape):
        raise FormatError(f"{what}: uneven splits (param_split_shape) are not supported")
    size = pl.opt_weight_shard_size
    parts = math.prod(dev[len(dev) - 1 - k] for axes in tmap for k in axes)
    if size == -1:
        size = math.prod(dev) // parts  # every replica, as MindSpore's _extract_layout_item
    if size < -1:
        raise FormatError(f"{what}: opt_weight_shard_size {size} is invalid")
    return dev, tmap, max(size, 1)


def _read_file(path: Path) -> tuple[set[int], dict[tuple[int, str], tuple]]:
    """Stages a file covers and its layouts by (stage, name)."""
    doc = _parse(path)
    items = doc.parallel_strategy_item
    stages = {int(it.parallel_strategys.stage) for it in items} or {0}
    own_stage = int(items[0].parallel_strategys.stage) if items else 0
    out: dict[tuple[int, str], tuple] = {}
    for item in doc.parallel_layout_item:
        name, stage = item.param_name, own_stage
        if not isinstance(name, str):  # protobuf hands back bytes for a name that is not UTF-8
            raise FormatError(f"{path}: a parameter name that is not UTF-8; the file is corrupt")
        m = _MERGED_NAME.fullmatch(name)
        if m:  # a merged file: "{stage}-{name}"
            stage, name = int(m.group(1)), m.group(2)
            stages.add(stage)
        out[(stage, name)] = _layout(path, name, item.parallel_layouts)
    return stages, out


def load(files: list[Path], where: str) -> Strategy:
    """Per-rank, per-stage or merged strategy files, merged into one Strategy (origin
    "mindspore"): shapes are unknown (-1) and dtypes "?" until `fill_shapes`."""
    stages: set[int] = set()
    layouts: dict[tuple[int, str], tuple] = {}
    for f in files:
        file_stages, file_layouts = _read_file(Path(f))
        stages |= file_stages
        for key, lay in file_layouts.items():
            if layouts.setdefault(key, lay) != lay:
                raise LayoutError(f"{where}: strategy files disagree on parameter {key[1]} in stage {key[0]}")
    if not layouts:
        raise FormatError(f"{where}: the strategy files name no parameters")
    if max(stages) + 1 != len(stages) or min(stages) < 0:
        raise FormatError(f"{where}: strategy files cover pipeline stage(s) {sorted(stages)[:10]} but not {gaps(stages)}; give every stage's file or merged_ckpt_strategy.ckpt")
    n = max(math.prod(dev) for dev, _, _ in layouts.values())
    if n * len(stages) > MAX_DEVICES:
        raise FormatError(f"{where}: {len(stages)} stage(s) of {n} devices is beyond any cluster ({MAX_DEVICES}); the file is corrupt")
    params: dict[str, ParamLayout] = {}
    by_name: dict[str, list[tuple[int, tuple]]] = {}
    for (stage, name), lay in sorted(layouts.items()):
        by_name.setdefault(name, []).append((stage, lay))
    for name, held in by_name.items():
        lays = {lay for _, lay in held}
        if len(lays) > 1:
            raise LayoutError(f"{where}: parameter {name} has different layouts in stages {[s for s, _ in held]}; autotrans needs one layout per parameter")
        dev, tmap, opt = lays.pop()
        ndev = math.prod(dev)
        if n % ndev:
            raise LayoutError(f"{where}: parameter {name}: dev_matrix {list(dev)} does not divide the stage's {n} devices")
        if ndev < n:  # MindSpore adds the missing devices as an outer repeat dim
            dev = (n // ndev, *dev)
        params[name] = ParamLayout(
            shape=(-1,) * len(tmap), dtype=UNKNOWN_DTYPE, stages=tuple(s for s, _ in held),
            dev_matrix=dev, tensor_map=tmap, opt_shard=opt,
        )
    ranks = tuple(tuple(range(s * n, (s + 1) * n)) for s in range(max(stages) + 1))
    return Strategy(ranks, params, "mindspore")


def fill_shapes(strategy: Strategy, headers: dict[int, dict[str, TensorInfo]]) -> Strategy:
    """Global shapes and dtypes from the checkpoint slices the ranks hold (local shape x
    parts). Parameters no rank holds are dropped with a warning, as MindSpore skips them."""
    params: dict[str, ParamLayout] = {}
    absent = []
    for name, p in strategy.params.items():
        ranks = [r for s in p.stages for r in strategy.stages[s] if name in headers.get(r, {})]
        if not ranks:
            absent.append(name)
            continue
        found = {}
        for r in ranks:
            info = headers[r][name]
            if len(info.shape) != len(p.tensor_map):
                raise LayoutError(f"parameter {name}: rank {r} stores shape {list(info.shape)} but the strategy's tensor_map has {len(p.tensor_map)} dims")
            found.setdefault((tuple(s * k for s, k in zip(info.shape, p.parts)), info.dtype), r)
        if len(found) > 1:
            desc = "; ".join(f"rank {r}: {list(shape)} {dtype}" for (shape, dtype), r in found.items())
            raise LayoutError(f"parameter {name}: checkpoint slices imply different global shapes or dtypes ({desc})")
        (shape, dtype), = found
        params[name] = ParamLayout(shape, dtype, p.stages, p.dev_matrix, p.tensor_map, p.opt_shard, p.opt_shard_step, p.stored_shape)
    if absent:
        _warn("the strategy names are not in the checkpoint", absent)
    return Strategy(strategy.stages, params, strategy.origin, list(strategy.notes))


def fill_from(strategy: Strategy, src: Strategy, cast_to: str | None = None) -> Strategy:
    """A MindSpore destination strategy with the source's global shapes and dtypes (after
    the job's cast); parameters the source lacks are dropped, as MindSpore does."""
    params = {}
    for name, p in strategy.params.items():
        s = src.params.get(name)
        if s is not None:
            params[name] = ParamLayout(s.shape, cast_dtype(s.dtype, cast_to), p.stages, p.dev_matrix,
                                       p.tensor_map, p.opt_shard, p.opt_shard_step, p.stored_shape)
    absent = sorted(set(strategy.params) - set(params))
    if absent:
        _warn("the destination strategy names are not in the source", absent)
    return Strategy(strategy.stages, params, strategy.origin, list(strategy.notes))


# -- writing ------------------------------------------------------------------------------
def _stage_size(strategy: Strategy) -> int:
    n = len(strategy.stages[0])
    for s, ranks in enumerate(strategy.stages):
        if tuple(ranks) != tuple(range(s * n, (s + 1) * n)):
            raise FormatError(f"stages {[list(x) for x in strategy.stages]} cannot be written as MindSpore strategy files, which number stage s as ranks s*n .. s*n+n-1")
    return n


def _opt_step(name: str, p: ParamLayout) -> int:
    """MindSpore's opt_weight_shard_step: the device-rank stride of the opt shard group,
    whose members differ in the innermost replica coordinate."""
    if p.opt_shard_step != 1:
        raise FormatError(f"parameter {name}: opt_shard_step {p.opt_shard_step} has no MindSpore equivalent (MindSpore shards over the innermost replicas)")
    used = {len(p.dev_matrix) - 1 - k for axes in p.tensor_map for k in axes}
    inner = max((i for i, d in enumerate(p.dev_matrix) if i not in used and d > 1), default=len(p.dev_matrix) - 1)
    return math.prod(p.dev_matrix[inner + 1:])


def _fill_layout(pl, name: str, p: ParamLayout) -> None:
    pl.dev_matrix.add().dim.extend(p.dev_matrix)
    if all(len(axes) <= 1 for axes in p.tensor_map):
        pl.tensor_map.add().dim.extend(axes[0] if axes else -1 for axes in p.tensor_map)
    elif len(p.tensor_map) == 1:
        raise FormatError(f"parameter {name}: a 1-D tensor split over several device axes cannot be written as a MindSpore strategy (its reader would take the axes for dims)")
    else:
        for axes in p.tensor_map:
            pl.tensor_map.add().dim.extend(axes or (-1,))
    pl.param_split_shape.add()
    pl.indices_offset.add()
    pl.field = 0
    pl.opt_weight_shard_size = p.opt_shard if p.opt_shard > 1 else 0
    pl.opt_weight_shard_step = _opt_step(name, p) if p.opt_shard > 1 else 0


def _document(strategy: Strategy, stages: list[int], merged: bool) -> bytes:
    _stage_size(strategy)
    doc = message("ParallelStrategyMap")()
    doc.current_stage = 1 if merged else stages[0]  # as MindSpore's merge writes it
    for s in stages:
        item = doc.parallel_strategy_item.add(node_name=_STAGE_NODE)
        item.parallel_strategys.stage = s
    for s in stages:
        for name in sorted(n for n, p in strategy.params.items() if s in p.stages):
            item = doc.parallel_layout_item.add(param_name=f"{s}-{name}" if merged else name)
            _fill_layout(item.parallel_layouts, name, strategy.params[name])
    return doc.SerializeToString()


def write_rank_file(strategy: Strategy, rank: int, folder: Path) -> Path:
    out = Path(folder) / RANK_FILE.format(rank=rank, suffix=".ckpt")
    write_bytes(out, _document(strategy, [strategy.stage_of(rank)], merged=False))
    return out


def write_merged_file(strategy: Strategy, folder: Path) -> Path:
    out = Path(folder) / MERGED_FILE.format(suffix=".ckpt")
    write_bytes(out, _document(strategy, list(range(len(strategy.stages))), merged=True))
    return out
