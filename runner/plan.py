"""The planner: a pure function from two strategies (and, when known, the source
headers) to frozen read items per destination file. It reads no tensor bytes.

Each destination box is intersected with the source layout's grid arithmetically
(runner.layout), so the cost grows with parameters x destination ranks only. Each
source piece is read once, from one replica; the plan is validated before use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from runner import dtypes
from runner.errors import PlanError, name_list
from runner.formats.base import TensorInfo
from runner.layout import Box, Shape
from runner.strategy import Strategy


@dataclass(frozen=True)
class ReadItem:
    """Copy `region` (global coordinates) out of the box `src_box` that source rank
    `src_rank` stores as tensor `src_name`."""

    src_rank: int
    src_name: str
    src_box: Box
    region: Box


@dataclass(frozen=True)
class TensorPlan:
    name: str
    dtype: str  # source element type
    out_dtype: str
    box: Box  # the destination box, global coordinates
    stored_shape: Shape
    reads: tuple[ReadItem, ...]

    @property
    def write_bytes(self) -> int:
        return self.box.numel * dtypes.itemsize(self.out_dtype)

    @property
    def read_bytes(self) -> int:
        return sum(r.region.numel for r in self.reads) * dtypes.itemsize(self.dtype)


@dataclass(frozen=True)
class FilePlan:
    """Everything destination rank `rank`'s file holds, in file order."""

    rank: int
    tensors: tuple[TensorPlan, ...]

    @property
    def write_bytes(self) -> int:
        return sum(t.write_bytes for t in self.tensors)

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tensors)

    @property
    def src_ranks(self) -> set[int]:
        return {r.src_rank for t in self.tensors for r in t.reads}


Headers = Callable[[int], Mapping[str, TensorInfo]]


def check_compatible(src: Strategy, dst: Strategy, cast_to: str | None = None) -> None:
    """Both strategies must describe the same parameters with the same global shapes."""
    if set(src.params) != set(dst.params):
        raise name_mismatch("source and destination name different parameters", {
            "only in the source": set(src.params) - set(dst.params),
            "only in the destination strategy": set(dst.params) - set(src.params),
        })
    for name, s in src.params.items():
        d = dst.params[name]
        if s.shape != d.shape:
            raise PlanError(f"parameter {name}: source shape {list(s.shape)} != destination shape {list(d.shape)}")
        if d.dtype not in (s.dtype, dtypes.cast_dtype(s.dtype, cast_to)):
            raise PlanError(f"parameter {name}: source dtype {s.dtype} != destination dtype {d.dtype} (set `dtype` to cast)")


def check_headers(src: Strategy, headers: Mapping[int, Mapping[str, TensorInfo]]) -> None:
    """Every source rank's header against the source layout, before any output is
    written: the same ranks, and each parameter of a rank's stage stored with the
    layout's dtype and box (or stored) shape. Raises PlanError naming rank and parameter."""
    if sorted(headers) != src.ranks:
        missing = [r for r in src.ranks if r not in headers]
        if missing and set(headers) <= set(src.ranks):  # the checkpoint is short, not the strategy wrong
            more = ", ..." if len(missing) > 5 else ""
            raise PlanError(f"the source checkpoint lacks rank folder(s) {', '.join(f'rank_{r}' for r in missing[:5])}{more}: "
                            f"its strategy has {src.world_size} ranks, the checkpoint {len(headers)}; copy in the missing ones")
        raise PlanError(f"the source checkpoint has {len(headers)} rank(s) but its strategy has {src.world_size}; "
                        "give the strategy files written with this checkpoint")
    for rank, header in sorted(headers.items()):
        for name in src.params_of_rank(rank):
            p, info = src.params[name], header.get(name)
            box = src.box(name, rank).sizes
            if info is None:
                raise PlanError(f"parameter {name}: source rank {rank}'s checkpoint lacks it, but its strategy places it there")
            if info.dtype != p.dtype or info.shape not in (box, p.stored()):
                raise PlanError(f"parameter {name}: source rank {rank} stores {list(info.shape)} {info.dtype}, "
                                f"but its layout gives the box {list(box)} {p.dtype}")


def name_mismatch(head: str, groups: Mapping[str, set[str]]) -> PlanError:
    """One error line for name sets that should match: each non-empty group, named."""
    return PlanError(head + "; " + "; ".join(f"{label}: {name_list(sorted(names))}" for label, names in groups.items() if names))


def plan_rank(
    src: Strategy,
    dst: Strategy,
    rank: int,
    *,
    cast_to: str | None = None,
    extras: Mapping[str, tuple[int, TensorInfo]] | None = None,
    headers: Headers | None = None,
    available: Callable[[int], bool] | None = None,
    prefer: Callable[[int], bool] | None = None,
) -> FilePlan:
    """Plan destination rank `rank`'s file.

    Each parameter is written in its destination dtype (check_compatible: the source's,
    or its `cast_to` cast); `extras`, entries no strategy names, are copied whole from
    (source rank, header), cast to `cast_to`.
    `headers`: source rank -> its tensors' headers, to check every read against.
    Tensors keep the source checkpoint's order when `headers` are known, else name order.
    `available`: which source ranks may be read (default all); replicas are chosen
    as the destination's own rank first, else spread by destination rank (reads_for);
    among `prefer`red ranks (those on this node, under MPI) when any holds the piece."""
    tensors = []
    for name in dst.params_of_rank(rank):
        p = dst.params[name]
        box = dst.box(name, rank)
        reads = tuple(reads_for(src, name, box, rank, available, prefer))
        tensors.append(TensorPlan(name, src.params[name].dtype, p.dtype, box, p.stored(), reads))
    for name, (src_rank, info) in sorted((extras or {}).items()):
        whole = Box((0,) * len(info.shape), info.shape)
        out = dtypes.cast_dtype(info.dtype, cast_to)
        tensors.append(TensorPlan(name, info.dtype, out, whole, info.shape, (ReadItem(src_rank, name, whole, whole),)))
    if headers is not None:  # keep the source checkpoint's order, as MindSpore's transform does
        order = source_order(headers, sorted({r.src_rank for t in tensors for r in t.reads}))
        tensors.sort(key=lambda t: (order.get(t.name, len(order)), t.name))
    fp = FilePlan(rank, tuple(tensors))
    validate(fp, src, headers)
    return fp


def source_order(headers: Headers, ranks: list[int]) -> dict[str, int]:
    """Tensor name -> place of its first appearance in the given source ranks' files."""
    order: dict[str, int] = {}
    for r in ranks:
        for name in headers(r):
            order.setdefault(name, len(order))
    return order


def reads_for(src: Strategy, name: str, box: Box, dst_rank: int, available: Callable[[int], bool] | None,
              prefer: Callable[[int], bool] | None = None) -> list[ReadItem]:
    """Reads that cover `box` of parameter `name` from the layout `src`, each piece from
    `dst_rank` when it holds it, else from holder number `dst_rank % holders`, so that
    destinations spread their reads over the replicas instead of all reading one file."""
    p = src.params[name]
    holders = p.holders()
    chunk = p.chunk
    reads = []
    for cell, region in p.cells_overlapping(box):
        candidates = [src.rank_at(s, pos) for s in p.stages for pos in holders.get(cell, ())]
        usable = [r for r in candidates if available is None or available(r)]
        if not usable:
            raise PlanError(f"parameter {name}: no readable source rank holds the piece at {list(region.offsets)} (holders: {candidates})")
        pick = ([r for r in usable if prefer(r)] or usable) if prefer else usable
        src_rank = dst_rank if dst_rank in pick else pick[dst_rank % len(pick)]
        src_box = Box(tuple(c * k for c, k in zip(cell, chunk)), chunk)
        reads.append(ReadItem(src_rank, name, src_box, region))
    return reads


def validate(fp: FilePlan, src: Strategy, headers: Headers | None) -> None:
    """Every destination element covered exactly once, every read inside the tensor the
    source rank stores, dtypes and sizes as the headers say. Raises PlanError."""
    for t in fp.tensors:
        covered = 0
        for r in t.reads:
            if not (_inside(r.region, t.box) and _inside(r.region, r.src_box)):
                raise PlanError(f"parameter {t.name} on rank {fp.rank}: read {r.region} falls outside its boxes")
            covered += r.region.numel
        twice = _overlap(t.reads)
        if twice is not None:
            raise PlanError(f"parameter {t.name} on rank {fp.rank}: reads {twice[0]} and {twice[1]} overlap "
                            "(an element would be read twice)")
        if covered != t.box.numel:  # disjoint reads inside the box: equal volume means every element is read
            raise PlanError(f"parameter {t.name} on rank {fp.rank}: reads cover {covered} of {t.box.numel} elements")
        if math.prod(t.stored_shape) != t.box.numel:
            raise PlanError(f"parameter {t.name} on rank {fp.rank}: stored shape {list(t.stored_shape)} does not hold box {list(t.box.sizes)}")
        if headers is None:
            continue
        for r in t.reads:
            info = headers(r.src_rank).get(r.src_name)
            if info is None:
                raise PlanError(f"parameter {r.src_name}: source rank {r.src_rank}'s checkpoint lacks it")
            if info.dtype != t.dtype:
                raise PlanError(f"parameter {r.src_name}: source rank {r.src_rank} stores {info.dtype}, the strategy says {t.dtype}")
            expected = src.params[r.src_name].stored() if r.src_name in src.params else r.src_box.sizes
            if info.numel != r.src_box.numel or info.shape not in (tuple(r.src_box.sizes), tuple(expected)):
                raise PlanError(
                    f"parameter {r.src_name}: source rank {r.src_rank} stores shape {list(info.shape)}, "
                    f"but its layout gives the box {list(r.src_box.sizes)}"
                )


def _overlap(reads: tuple[ReadItem, ...]) -> tuple[Box, Box] | None:
    """Two read regions sharing an element, if any: a sweep along dim 0, so only reads
    whose dim-0 ranges meet are compared."""
    regions = sorted((r.region for r in reads if r.region.numel), key=lambda b: b.offsets[:1])
    active: list[Box] = []
    for box in regions:
        start = box.offsets[0] if box.offsets else 0
        active = [a for a in active if not a.offsets or a.offsets[0] + a.sizes[0] > start]
        for a in active:
            if all(o < ao + asz and ao < o + sz for o, sz, ao, asz in zip(box.offsets, box.sizes, a.offsets, a.sizes)):
                return a, box
        active.append(box)
    return None


def _inside(inner: Box, outer: Box) -> bool:
    return all(o <= i and i + s <= o + os_ for i, s, o, os_ in zip(inner.offsets, inner.sizes, outer.offsets, outer.sizes))
