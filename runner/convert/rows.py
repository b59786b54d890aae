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


class Link(NamedTuple):  # a tuple: an interleaved fuse makes one per row
    """`count` rows: A's rows from `a_row` are B's rows from `b_row`. `primary` links
    are used from B back to A; a non-primary link makes a copy (a tied output layer)
    that is dropped on the way back."""

    a: str
    a_row: int
    b: str
    b_row: int
    count: int
    primary: bool = True
    transpose: bool = False  # A's rows are those of A transposed (a 2-D [in, out] weight)


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
    src: str
    start: int
    count: int
    repeat: bool = False  # every row is source row `start`
    transpose: bool = False  # rows of the source transposed


def _rows_of(fetch: Fetch, b: Block, cols: tuple[int, ...]) -> np.ndarray:
    src = fetch(b.src)
    return (src.T if b.transpose else src).reshape(-1, *cols)


@dataclass(frozen=True)
class Recipe:
    """How to build one target tensor: `shape`, whose first `row_dims` dims are rows,
    from source row blocks listed in target row order; with `transpose`, the blocks
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
        if len(self.blocks) == 1 and not self.blocks[0].repeat:  # rows in order: a view
            b = self.blocks[0]
            src = _rows_of(fetch, b, cols)[b.start: b.start + b.count]
            return src.reshape(self.shape)[box.slices()]
        lead = [np.arange(o, o + s) for o, s in zip(box.offsets[: self.row_dims], box.sizes[: self.row_dims])]
        rows = np.ravel_multi_index(np.meshgrid(*lead, indexing="ij"), self.shape[: self.row_dims]).reshape(-1)
        col_slices = box.slices()[self.row_dims:]
        out = np.empty((rows.size, *box.sizes[self.row_dims:]), dtypes.bits_dtype(self.dtype))
        # Each row's source: one pass per source tensor, however many blocks read it
        # (an interleaved fuse has one block per row).
        starts = np.cumsum([0] + [b.count for b in self.blocks])
        which = np.searchsorted(starts, rows, side="right") - 1
        first = np.array([b.start for b in self.blocks])
        repeat = np.array([b.repeat for b in self.blocks])
        src_rows = first[which] + np.where(repeat[which], 0, rows - starts[which])
        keys = {k: i for i, k in enumerate(dict.fromkeys((b.src, b.transpose) for b in self.blocks))}
        key_of = np.array([keys[(b.src, b.transpose)] for b in self.blocks])[which]
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
        mid = inner[r.blocks[0].src] if len(r.blocks) == 1 else None
        if mid is not None and mid.shape == r.shape and not r.transpose and not r.blocks[0].repeat \
                and r.blocks[0].start == 0 and r.blocks[0].count == r.rows and not r.blocks[0].transpose:
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
            blocks += _sub_blocks(mid.blocks, b.start, 1 if b.repeat else b.count, b.count if b.repeat else 0)
        out[name] = Recipe(r.shape, r.dtype, r.row_dims, tuple(blocks))
    return out


def renamed(recipes: dict[str, Recipe], names: dict[str, str]) -> dict[str, Recipe]:
    """`recipes` reading their sources under other names (`names`: old -> new)."""
    return {n: replace(r, blocks=tuple(b._replace(src=names.get(b.src, b.src)) for b in r.blocks)) for n, r in recipes.items()}


def _sub_blocks(blocks: tuple[Block, ...], start: int, count: int, repeat: int) -> list[Block]:
    """Rows [start, start + count) of the tensor `blocks` build, as blocks of its
    sources; with `repeat`, that one row `repeat` times."""
    out, pos = [], 0
    for b in blocks:
        lo, hi = max(start, pos), min(start + count, pos + b.count)
        if lo < hi:
            row = b.start if b.repeat else b.start + lo - pos
            n = repeat or hi - lo
            out.append(Block(b.src, row, n, repeat=b.repeat or bool(repeat), transpose=b.transpose))
        pos += b.count
    return out


def _recipes(items: dict[str, list[Block]], infos: dict[str, TensorInfo], row_dims: dict[str, int],
             dtype_of: Callable[[Block], str], transposed: set[str] = frozenset()) -> dict[str, Recipe]:
    out = {}
    for name, blocks in items.items():
        info = infos[name]
        if name in transposed:
            r = Recipe(info.shape, dtype_of(blocks[0]), 1, tuple(blocks), transpose=True)
            covered, want = sum(b.count for b in blocks), info.shape[-1]
            if covered != want:
                raise PlanError(f"conversion map covers {covered} of the {want} rows of {name} transposed")
            out[name] = r
            continue
        r = Recipe(info.shape, dtype_of(blocks[0]), row_dims.get(name, 1), tuple(blocks))
        covered = sum(b.count for b in blocks)
        if covered != r.rows:
            raise PlanError(f"conversion map covers {covered} of the {r.rows} rows of {name}")
        out[name] = r
    return out


def forward(links: Iterable[Link], pads: Iterable[Pad], a: dict[str, TensorInfo], b: dict[str, TensorInfo],
            b_row_dims: dict[str, int]) -> dict[str, Recipe]:
    """Recipes for every B tensor from A tensors."""
    parts: dict[str, list[tuple[int, Block]]] = {}
    for lk in links:
        parts.setdefault(lk.b, []).append((lk.b_row, Block(lk.a, lk.a_row, lk.count, transpose=lk.transpose)))
    for p in pads:
        parts.setdefault(p.b, []).append((p.b_row, Block(p.a, p.a_row, p.count, repeat=True)))
    items = {n: [blk for _, blk in sorted(v, key=lambda x: x[0])] for n, v in parts.items()}
    _check_contiguous(parts)
    return _recipes(items, b, b_row_dims, lambda blk: a[blk.src].dtype)


def backward(links: Iterable[Link], a: dict[str, TensorInfo], b: dict[str, TensorInfo],
             a_row_dims: dict[str, int]) -> dict[str, Recipe]:
    """Recipes for every A tensor from B tensors (primary links only). An A tensor whose
    links are transposed is built as its transpose, then transposed."""
    parts: dict[str, list[tuple[int, Block]]] = {}
    transposed = set()
    for lk in links:
        if lk.primary:
            parts.setdefault(lk.a, []).append((lk.a_row, Block(lk.b, lk.b_row, lk.count)))
            if lk.transpose:
                transposed.add(lk.a)
    items = {n: [blk for _, blk in sorted(v, key=lambda x: x[0])] for n, v in parts.items()}
    _check_contiguous(parts)
    return _recipes(items, a, a_row_dims, lambda blk: b[blk.src].dtype, transposed)


def _check_contiguous(parts: dict[str, list[tuple[int, Block]]]) -> None:
    for name, v in parts.items():
        pos = 0
        for row, blk in sorted(v, key=lambda x: x[0]):
            if row != pos:
                raise PlanError(f"conversion map leaves rows {pos}..{row - 1} of {name} unmapped or mapped twice")
            pos += blk.count


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
