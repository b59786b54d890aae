"""Reversible permutations between two namings of the same weights, as row blocks.

Every conversion this package does (QKV fused per query group, SwiGLU fc1 as
[gate; up], stacked experts, vocab padding, plain renames) moves whole rows: the
leading dims of a tensor, flattened, index rows whose trailing elements are copied
unchanged. A `Link` says that `count` rows of tensor A start at row `a_row` of A and
at row `b_row` of tensor B. The same links give the recipe in both directions, so
the inverse permutation is never written twice. Regions of a target tensor are
computed from source rows only, never materialising more than the region."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, NamedTuple

import numpy as np

from runner import dtypes
from runner.errors import PlanError
from runner.formats.base import TensorInfo
from runner.layout import Box

Fetch = Callable[[str], np.ndarray]  # source tensor name -> its raw bits (any shape)


class Link(NamedTuple):
    """`count` rows: A's rows from `a_row` are B's rows from `b_row`, `times` times, the
    g-th time `g * a_step` and `g * b_step` rows further on (an interleaved fuse is one
    strided link per part, not one per row). `primary` links are used from B back to A;
    a non-primary link makes a copy (a tied output layer) that is dropped on the way back."""

    a: str
    a_row: int
    b: str
    b_row: int
    count: int
    primary: bool = True
    transpose: bool = False  # A's rows are those of A transposed (a 2-D [in, out] weight)
    times: int = 1
    a_step: int = 0
    b_step: int = 0


@dataclass(frozen=True)
class Pad:
    """Rows of B that no A row maps to: each is a copy of A's row `a_row` (Megatron
    pads vocabularies with copies of the last row); dropped on the way back."""

    b: str
    b_row: int
    count: int
    a: str
    a_row: int


class Block(NamedTuple):
    """Target rows `at + g * at_step + i` (g < times, i < count) are rows `start + g * step + i`
    of `src` (with `repeat`, every one is row `start`)."""

    src: str
    start: int
    count: int
    at: int = 0
    times: int = 1
    step: int = 0
    at_step: int = 0
    repeat: bool = False
    transpose: bool = False  # rows of the source transposed

    @property
    def rows(self) -> int:
        return self.count * self.times

    def shifted(self, g0: int, times: int, skip: int = 0, count: int | None = None) -> "Block":
        """Repetitions g0 .. g0 + times - 1, each from its `skip`-th row, `count` rows of it."""
        n = self.count - skip if count is None else count
        start = self.start if self.repeat else self.start + g0 * self.step + skip
        return self._replace(start=start, count=n, at=self.at + g0 * self.at_step + skip, times=times,
                             step=self.step if times > 1 else 0, at_step=self.at_step if times > 1 else 0)


def _rows_of(fetch: Fetch, b: Block, cols: tuple[int, ...]) -> np.ndarray:
    src = fetch(b.src)
    return (src.T if b.transpose else src).reshape(-1, *cols)


@dataclass(frozen=True)
class Recipe:
    """How to build one target tensor: `shape`, whose first `row_dims` dims are rows,
    from source row blocks that cover its rows once; with `transpose`, the blocks
    build the 2-D target's transpose."""

    shape: tuple[int, ...]
    dtype: str
    row_dims: int
    blocks: tuple[Block, ...]
    transpose: bool = False

    @property
    def rows(self) -> int:
        return math.prod(self.shape[: self.row_dims])

    def region(self, box: Box, fetch: Fetch) -> np.ndarray:
        """The target's elements inside `box`, as raw bits shaped as the box."""
        if self.transpose:
            inner = Recipe(self.shape[::-1], self.dtype, 1, self.blocks)
            return np.ascontiguousarray(inner.region(Box(box.offsets[::-1], box.sizes[::-1]), fetch).T)
        cols = self.shape[self.row_dims:]
        b = self.blocks[0]
        if len(self.blocks) == 1 and b.times == 1 and b.at == 0 and not b.repeat:  # rows in order: a view
            src = _rows_of(fetch, b, cols)[b.start: b.start + b.count]
            return src.reshape(self.shape)[box.slices()]
        lead = [np.arange(o, o + s) for o, s in zip(box.offsets[: self.row_dims], box.sizes[: self.row_dims])]
        rows = np.ravel_multi_index(np.meshgrid(*lead, indexing="ij"), self.shape[: self.row_dims]).reshape(-1)
        col_slices = box.slices()[self.row_dims:]
        out = np.empty((rows.size, *box.sizes[self.row_dims:]), dtypes.bits_dtype(self.dtype))
        # Each row's source row, block by block (a few per tensor: strided blocks), then
        # one pass per source tensor.
        keys = {k: i for i, k in enumerate(dict.fromkeys((b.src, b.transpose) for b in self.blocks))}
        src_rows = np.zeros(rows.size, np.int64)
        key_of = np.full(rows.size, -1, np.int64)
        for b in self.blocks:
            rel = rows - b.at
            g = rel // b.at_step if b.times > 1 else np.zeros_like(rel)
            i = rel - g * b.at_step
            mask = (rel >= 0) & (g < b.times) & (i < b.count)
            src_rows[mask] = b.start if b.repeat else b.start + g[mask] * b.step + i[mask]
            key_of[mask] = keys[(b.src, b.transpose)]
        for (name, transpose), k in keys.items():
            mask = key_of == k
            if not mask.any():
                continue
            src = _rows_of(fetch, Block(name, 0, 0, transpose=transpose), cols)
            picked = src_rows[mask]
            if picked[-1] - picked[0] + 1 == picked.size and np.all(np.diff(picked) == 1):
                out[mask] = src[picked[0]: picked[-1] + 1][(slice(None), *col_slices)]
            else:
                out[mask] = src[(picked, *col_slices)]
        return out.reshape(box.sizes)


def compose(outer: dict[str, Recipe], inner: dict[str, Recipe]) -> dict[str, Recipe]:
    """`outer`'s recipes with every block that reads a tensor `inner` builds rewritten
    to read that tensor's own sources (MindFormers names <- HF names <- Megatron ranks),
    so a conversion through a middle naming never materialises the middle tensors."""
    out = {}
    for name, r in outer.items():
        if not any(b.src in inner for b in r.blocks):
            out[name] = r
            continue
        b0 = r.blocks[0]
        mid = inner[b0.src] if len(r.blocks) == 1 else None
        if mid is not None and mid.shape == r.shape and not r.transpose and not b0.repeat and not b0.transpose \
                and b0.start == 0 and b0.at == 0 and b0.times == 1 and b0.count == r.rows:
            out[name] = Recipe(r.shape, r.dtype, mid.row_dims, mid.blocks, mid.transpose)  # a rename
            continue
        blocks: list[Block] = []
        for b in r.blocks:
            if b.src not in inner:
                blocks.append(b)
                continue
            mid = inner[b.src]
            if r.transpose or b.transpose or mid.transpose or \
                    math.prod(mid.shape[mid.row_dims:]) != math.prod(r.shape[r.row_dims:]):
                raise PlanError(f"conversion map: {name} reads rows of {b.src} that are not rows of its sources")
            for m in mid.blocks:
                blocks += _meet(b, m)
        out[name] = Recipe(r.shape, r.dtype, r.row_dims, tuple(sorted(blocks, key=lambda x: x.at)))
    return out


def renamed(recipes: dict[str, Recipe], names: dict[str, str]) -> dict[str, Recipe]:
    """`recipes` reading their sources under other names (`names`: old -> new)."""
    return {n: replace(r, blocks=tuple(b._replace(src=names.get(b.src, b.src)) for b in r.blocks)) for n, r in recipes.items()}


def _within(first: int, step: int, count: int, times: int, lo: int, hi: int) -> tuple[range, range]:
    """Of the intervals [first + g * step, + count), g < times: the g whose interval lies
    inside [lo, hi), and the g whose interval meets it (step > 0 when times > 1)."""
    if times == 1 or step == 0:
        inside = range(times) if first >= lo and first + count <= hi else range(0)
        meets = range(times) if first < hi and first + count > lo else range(0)
        return inside, meets
    def ceil(a: int) -> int:
        return -(-a // step)
    inside = range(max(0, ceil(lo - first)), min(times, (hi - count - first) // step + 1))
    meets = range(max(0, (lo - count - first) // step + 1), min(times, ceil(hi - first)))
    return inside, meets


def _meet(b: Block, m: Block) -> list[Block]:
    """The target rows of `b` (reading rows of a middle tensor) that the middle tensor's
    block `m` builds, as blocks of `m`'s source: strided when either is one interval
    per repetition of the other; else repetition by repetition."""
    if b.repeat:  # every row is middle row b.start
        for h in _within(m.at, m.at_step, m.count, m.times, b.start, b.start + 1)[1]:
            row = m.start if m.repeat else m.start + h * m.step + (b.start - m.at - h * m.at_step)
            return [b._replace(src=m.src, start=row, transpose=m.transpose)]
        return []
    if m.times == 1:  # m is one interval of middle rows: b's repetitions inside it map linearly
        lo, hi = m.at, m.at + m.count
        inside, meets = _within(b.start, b.step, b.count, b.times, lo, hi)
        out = []
        if inside:
            g0 = inside.start
            row = b.start + g0 * b.step - m.at
            n = len(inside)
            out.append(Block(m.src, m.start if m.repeat else m.start + row, b.count, b.at + g0 * b.at_step, n,
                             b.step if n > 1 and not m.repeat else 0, b.at_step if n > 1 else 0, m.repeat, m.transpose))
        for g in (g for g in meets if g not in inside):
            a = max(lo, b.start + g * b.step)
            z = min(hi, b.start + g * b.step + b.count)
            out.append(Block(m.src, m.start if m.repeat else m.start + a - m.at, z - a,
                             b.at + g * b.at_step + a - b.start - g * b.step, repeat=m.repeat, transpose=m.transpose))
        return out
    if b.times == 1:  # b is one interval of middle rows: m's repetitions inside it keep m's stride
        lo, hi = b.start, b.start + b.count
        inside, meets = _within(m.at, m.at_step, m.count, m.times, lo, hi)
        out = []
        if inside:
            out.append(m.shifted(inside.start, len(inside))._replace(at=b.at + m.at + inside.start * m.at_step - lo))
        for h in (h for h in meets if h not in inside):
            a = max(lo, m.at + h * m.at_step)
            z = min(hi, m.at + h * m.at_step + m.count)
            skip = a - m.at - h * m.at_step
            out.append(m.shifted(h, 1, skip, z - a)._replace(at=b.at + a - lo))
        return out
    return [blk for g in range(b.times) for blk in _meet(b.shifted(g, 1), m)]


def _recipes(items: dict[str, list[Block]], infos: dict[str, TensorInfo], row_dims: dict[str, int],
             dtype_of: Callable[[Block], str], transposed: set[str] = frozenset()) -> dict[str, Recipe]:
    out = {}
    for name, blocks in items.items():
        info = infos[name]
        blocks = sorted(blocks, key=lambda b: b.at)
        t = name in transposed
        r = Recipe(info.shape, dtype_of(blocks[0]), 1 if t else row_dims.get(name, 1), tuple(blocks), transpose=t)
        _check_cover(name + (" transposed" if t else ""), blocks, info.shape[-1] if t else r.rows)
        out[name] = r
    return out


def _check_cover(name: str, blocks: list[Block], rows: int) -> None:
    """Every row of the target built exactly once. Strided blocks of one period that
    tile it, and plain blocks, are checked as spans (whatever the row count); anything
    else row by row, which also names the first row left unmapped or mapped twice."""
    spans: list[tuple[int, int]] = []
    periodic: dict[tuple[int, int], list[Block]] = {}
    for b in blocks:
        if b.times == 1:
            spans.append((b.at, b.count))
        else:
            periodic.setdefault((b.at_step, b.times), []).append(b)
    tiled = True
    for (period, times), family in periodic.items():
        first = min(b.at for b in family)
        tiled = tiled and _tiles([(b.at - first, b.count) for b in family], period)
        spans.append((first, period * times))
    if tiled and _tiles(spans, rows):
        return
    idx = np.concatenate([(b.at + np.arange(b.times)[:, None] * b.at_step + np.arange(b.count)[None, :]).reshape(-1)
                          for b in blocks])
    hits = np.bincount(np.minimum(idx, rows), minlength=rows + 1)  # the last slot counts rows past the end
    bad = np.flatnonzero(hits[:rows] != 1)
    if bad.size or hits[rows]:
        row = int(bad[0]) if bad.size else rows
        raise PlanError(f"conversion map leaves row {row} of {name} ({rows} rows) unmapped or mapped twice")


def _tiles(spans: list[tuple[int, int]], total: int) -> bool:
    """Whether the (start, length) spans cover [0, total) once, end to end."""
    pos = 0
    for start, n in sorted(spans):
        if start != pos:
            return False
        pos += n
    return pos == total


def forward(links: Iterable[Link], pads: Iterable[Pad], a: dict[str, TensorInfo], b: dict[str, TensorInfo],
            b_row_dims: dict[str, int]) -> dict[str, Recipe]:
    """Recipes for every B tensor from A tensors."""
    items: dict[str, list[Block]] = {}
    for lk in links:
        items.setdefault(lk.b, []).append(Block(lk.a, lk.a_row, lk.count, lk.b_row, lk.times, lk.a_step, lk.b_step,
                                                transpose=lk.transpose))
    for p in pads:
        items.setdefault(p.b, []).append(Block(p.a, p.a_row, p.count, p.b_row, repeat=True))
    return _recipes(items, b, b_row_dims, lambda blk: a[blk.src].dtype)


def backward(links: Iterable[Link], a: dict[str, TensorInfo], b: dict[str, TensorInfo],
             a_row_dims: dict[str, int]) -> dict[str, Recipe]:
    """Recipes for every A tensor from B tensors (primary links only). An A tensor whose
    links are transposed is built as its transpose, then transposed."""
    items: dict[str, list[Block]] = {}
    transposed = set()
    for lk in links:
        if lk.primary:
            items.setdefault(lk.a, []).append(Block(lk.b, lk.b_row, lk.count, lk.a_row, lk.times, lk.b_step, lk.a_step))
            if lk.transpose:
                transposed.add(lk.a)
    return _recipes(items, a, a_row_dims, lambda blk: b[blk.src].dtype, transposed)


class RecipePool:
    """A SlicePool (runner.execute) serving regions of converted tensors: reads whose
    `src_name` has a recipe are computed from `fetch`; others go to `inner`. `owned`
    (release/close) holds what `fetch` reads from; it defaults to `inner`."""

    def __init__(self, recipes: dict[str, Recipe], fetch: Fetch, inner=None, owned=None):
        self.recipes, self.fetch, self.inner = recipes, fetch, inner
        self.owned = owned if owned is not None else inner

    def region(self, read) -> np.ndarray:
        recipe = self.recipes.get(read.src_name)
        if recipe is None:
            return self.inner.region(read)
        return recipe.region(read.region, self.fetch)

    def release(self) -> None:
        if self.owned is not None:
            self.owned.release()

    def close(self) -> None:
        if self.owned is not None:
            self.owned.close()
