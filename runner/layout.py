"""Layout geometry: which box of a parameter's logical global shape each rank holds.

Semantics are MindSpore's: `tensor_map[i]` lists the device axes that split tensor dim
i, where axis k is `dev_matrix[len - 1 - k]` (first listed = outermost); a rank's
place in its pipeline stage, unravelled row-major over `dev_matrix`, gives its device
coordinates. Optimizer sharding splits the slice's dim 0 further across `opt_shard`
ranks of the replica group (the ranks that hold the same slice), consecutive ranks of
the group by default, every `opt_shard_step`-th otherwise.

A layout cuts every dim into equal chunks, so the chunks form a grid; a rank holds one
grid cell. Overlaps are found arithmetically from chunk sizes, never by scanning ranks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Iterator

from runner.errors import LayoutError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Box:
    """A hyper-rectangle of a global tensor: start offsets and sizes per dim."""

    offsets: Shape
    sizes: Shape

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def slices(self, within: "Box | None" = None) -> tuple[slice, ...]:
        """Index of this box inside `within` (default: inside the global tensor)."""
        base = within.offsets if within is not None else (0,) * len(self.offsets)
        return tuple(slice(o - b, o - b + s) for o, b, s in zip(self.offsets, base, self.sizes))


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes, or None when they do not overlap."""
    offsets, sizes = [], []
    for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        offsets.append(lo)
        sizes.append(hi - lo)
    return Box(tuple(offsets), tuple(sizes))


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is laid out over the ranks of the stages that hold it."""

    shape: Shape  # logical global shape
    dtype: str
    stages: tuple[int, ...]
    dev_matrix: Shape = (1,)
    tensor_map: tuple[tuple[int, ...], ...] = ()  # per dim, device axes; () = not split
    opt_shard: int = 1
    opt_shard_step: int = 1
    stored_shape: Shape | None = None  # row-major reshape the local box is stored as

    @staticmethod
    def replicated(shape: Shape, dtype: str, stages: tuple[int, ...] = (0,)) -> "ParamLayout":
        return ParamLayout(tuple(shape), dtype, stages, (1,), ((),) * len(shape))

    # -- derived geometry -------------------------------------------------------------
    def _device_dim(self, axis: int) -> int:
        return len(self.dev_matrix) - 1 - axis

    # cached: the planner asks for parts/chunk once per destination tensor (frozen, so safe)
    @cached_property
    def parts(self) -> Shape:
        """How many chunks each dim is cut into (opt shard included on dim 0)."""
        out = [math.prod(self.dev_matrix[self._device_dim(k)] for k in axes) for axes in self.tensor_map]
        if out and self.opt_shard > 1:
            out[0] *= self.opt_shard
        return tuple(out)

    @cached_property
    def chunk(self) -> Shape:
        return tuple(s // p for s, p in zip(self.shape, self.parts))

    @property
    def local_numel(self) -> int:
        return math.prod(self.chunk)

    @property
    def is_split(self) -> bool:
        return any(p > 1 for p in self.parts)

    def check(self, name: str, stage_sizes: dict[int, int]) -> None:
        """Raise LayoutError (naming the parameter) unless the layout is possible."""
        ndev = len(self.dev_matrix)
        if any(d < 1 for d in self.dev_matrix):
            raise LayoutError(f"parameter {name}: dev_matrix {list(self.dev_matrix)} has a non-positive entry")
        if len(self.tensor_map) != len(self.shape):
            raise LayoutError(f"parameter {name}: tensor_map has {len(self.tensor_map)} dims but shape {list(self.shape)} has {len(self.shape)}")
        used = [k for axes in self.tensor_map for k in axes]
        for k in used:
            if not 0 <= k < ndev:
                raise LayoutError(f"parameter {name}: tensor_map names device axis {k}, but dev_matrix {list(self.dev_matrix)} has axes 0..{ndev - 1}")
        if len(set(used)) != len(used):
            raise LayoutError(f"parameter {name}: tensor_map {self.tensor_map} uses a device axis twice")
        for s in self.stages:
            if s not in stage_sizes:
                raise LayoutError(f"parameter {name}: stage {s} does not exist")
            if math.prod(self.dev_matrix) != stage_sizes[s]:
                raise LayoutError(f"parameter {name}: dev_matrix {list(self.dev_matrix)} has {math.prod(self.dev_matrix)} devices but stage {s} has {stage_sizes[s]} ranks")
        if self.opt_shard < 1 or self.opt_shard_step < 1:
            raise LayoutError(f"parameter {name}: opt_shard and opt_shard_step must be >= 1")
        if self.opt_shard > 1:
            if not self.shape:
                raise LayoutError(f"parameter {name}: a scalar cannot be optimizer-sharded")
            if self.replicas % (self.opt_shard * self.opt_shard_step):
                raise LayoutError(f"parameter {name}: opt_shard {self.opt_shard} x step {self.opt_shard_step} does not divide its {self.replicas} replicas")
        for i, (s, p) in enumerate(zip(self.shape, self.parts)):
            if s % p:
                raise LayoutError(f"parameter {name}: dim {i} of size {s} cannot be split into {p} equal parts")
        if self.stored_shape is not None and any(d < 0 for d in self.stored_shape):  # [-2, -2] holds 4 elements too
            raise LayoutError(f"parameter {name}: stored_shape {list(self.stored_shape)} has a negative size; its entries must be positive")
        if self.stored_shape is not None and math.prod(self.stored_shape) != self.local_numel:
            raise LayoutError(f"parameter {name}: stored_shape {list(self.stored_shape)} does not hold the local box {list(self.chunk)}")

    @property
    def replicas(self) -> int:
        """Ranks of a stage that hold the same tensor-parallel slice (before opt shard)."""
        used = {self._device_dim(k) for axes in self.tensor_map for k in axes}
        return math.prod(d for i, d in enumerate(self.dev_matrix) if i not in used)

    def cell(self, position: int) -> Shape:
        """The grid cell held by the rank at `position` in its stage."""
        return _cells(self._grid_key())[position]

    def box(self, position: int) -> Box:
        cell = self.cell(position)
        chunk = self.chunk
        return Box(tuple(c * k for c, k in zip(cell, chunk)), chunk)

    def holders(self) -> dict[Shape, tuple[int, ...]]:
        """Grid cell -> positions (within a stage) that hold it, ascending."""
        return _holders(self._grid_key())

    def stored(self) -> Shape:
        return self.stored_shape if self.stored_shape is not None else self.chunk

    def cells_overlapping(self, region: Box) -> Iterator[tuple[Shape, Box]]:
        """Grid cells of this layout that overlap `region`, with the overlap."""
        chunk = self.chunk
        ranges = []
        for lo, size, c in zip(region.offsets, region.sizes, chunk):
            ranges.append(range(lo // c, (lo + size - 1) // c + 1) if size else range(0))
        for cell in itertools.product(*ranges):
            cbox = Box(tuple(i * c for i, c in zip(cell, chunk)), chunk)
            common = intersect(cbox, region)
            if common is not None:
                yield cell, common

    def same_geometry(self, other: "ParamLayout") -> bool:
        """True when every rank holds the same box, stored the same way."""
        if (self.shape, self.dtype, self.stages) != (other.shape, other.dtype, other.stages):
            return False
        if self.stored() != other.stored():
            return False
        if self._grid_key() == other._grid_key():
            return True
        if self.parts != other.parts or math.prod(self.dev_matrix) != math.prod(other.dev_matrix):
            return False
        return _cells(self._grid_key()) == _cells(other._grid_key())

    def _grid_key(self) -> tuple:
        return (self.dev_matrix, self.tensor_map, self.opt_shard, self.opt_shard_step)


@lru_cache(maxsize=4096)
def _cells(key: tuple) -> tuple[Shape, ...]:
    """Grid cell of every position in a stage; depends on the layout, not the shape."""
    dev_matrix, tensor_map, opt_shard, opt_step = key
    ndev = len(dev_matrix)
    used = {ndev - 1 - k for axes in tensor_map for k in axes}
    unused = [i for i in range(ndev) if i not in used]
    out = []
    for coords in itertools.product(*(range(d) for d in dev_matrix)):
        cell = []
        for axes in tensor_map:
            idx = 0
            for k in axes:  # first listed = outermost
                d = ndev - 1 - k
                idx = idx * dev_matrix[d] + coords[d]
            cell.append(idx)
        if opt_shard > 1 and cell:
            q = 0
            for d in unused:
                q = q * dev_matrix[d] + coords[d]
            cell[0] = cell[0] * opt_shard + (q // opt_step) % opt_shard
        out.append(tuple(cell))
    return tuple(out)


@lru_cache(maxsize=4096)
def _holders(key: tuple) -> dict[Shape, tuple[int, ...]]:
    out: dict[Shape, list[int]] = {}
    for pos, cell in enumerate(_cells(key)):
        out.setdefault(cell, []).append(pos)
    return {c: tuple(p) for c, p in out.items()}


def block_grid(shape: Shape, block: Shape) -> Shape:
    """How many blocks of `block` cover `shape`, a partial last block counted."""
    return tuple(-(-n // b) for n, b in zip(shape, block))


def block_layout(name: str, p: ParamLayout, block: Shape, dtype: str) -> ParamLayout:
    """The layout of the per-block values (FP8 scales) of a weight laid out as `p`: the
    same split at block granularity. A split whose slices are not whole blocks would cut
    a block's scale apart: refused."""
    if p.stored_shape is not None and p.stored_shape != p.chunk:
        raise LayoutError(f"parameter {name}: a block-scaled weight stored reshaped is not supported")
    for d, (n, parts, b) in enumerate(zip(p.chunk, p.parts, block)):
        if parts > 1 and n % b:
            raise LayoutError(f"parameter {name}: split {parts} ways, dim {d} gives slices of {n}, which cut its "
                              f"{b}-wide FP8 blocks apart; choose a split whose slices are multiples of {b}, or set "
                              "dtype: bf16 to dequantize")
    return ParamLayout(block_grid(p.shape, block), dtype, p.stages, p.dev_matrix, p.tensor_map, p.opt_shard, p.opt_shard_step)
