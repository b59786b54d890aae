"""FP8 block-scaled weights (DeepSeek-V3's released checkpoints, HF's fp8 quantization):
each such weight `X.weight` is float8_e4m3fn, with a float32 `X.weight_scale_inv` holding
one value per block (config.json's quantization_config.weight_block_size, 128 x 128),
a partial last block where a dim is not a multiple of it. Templates mark the weights
that may carry one (`block_scale`).

Without a cast they are tensors like any other: a split cuts the scale at block
granularity (runner.layout.block_layout), a rename or fuse moves its rows with the
weight's (runner.convert.names.scale_links). A `dtype:` cast dequantizes instead: element
(i, j) becomes round_once(fp32(w[i, j]) * scale[i // block_rows, j // block_cols]) in the
cast's dtype, as DeepSeek's weight_dequant and transformers' FP8 dequantization compute
it; the scales are dropped. The planner then sees each weight in that dtype, with no
scale, and `DequantPool` serves its regions dequantized, row block by row block, the
scale's blocks read from their own layout."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from runner import dtypes, plan as planner
from runner.errors import ConfigError, FormatError, name_list
from runner.formats.base import TensorInfo
from runner.layout import Box, block_grid
from runner.plan import ReadItem, TensorPlan
from runner.strategy import Strategy

FP8 = ("F8_E4M3", "F8_E5M2")
SCALE_DTYPES = ("F32", "BF16", "F16")
ROW_BLOCK = 1 << 20  # elements per step of the dequant math, to keep temporaries in cache

Headers = Mapping[int, Mapping[str, TensorInfo]]


@dataclass(frozen=True)
class Dequant:
    """What the executor needs to dequantize: picklable, for worker processes."""

    scale_of: Mapping[str, str]  # FP8 weight -> its block scale tensor
    block: tuple[int, int]
    layouts: Strategy  # of the scale tensors, as the source holds them
    fp8: Mapping[str, str]  # FP8 weight -> its dtype in the source
    out: Mapping[str, str]  # FP8 weight -> the dtype it is dequantized to

    def describe(self) -> dict:
        return {"block": list(self.block), "weights": sorted(self.scale_of.items()), "out": sorted(self.out.items())}

    def read_bytes(self, t: TensorPlan) -> int:
        """Source bytes a planned tensor reads: of a dequantized weight, its FP8 elements
        and the scale blocks they need, not the dequantized bytes the plan counts."""
        if t.name not in self.scale_of:
            return t.read_bytes
        scale = dtypes.itemsize(self.layouts.params[self.scale_of[t.name]].dtype)
        return sum(r.region.numel * dtypes.itemsize(self.fp8[t.name]) + blocks(r.region, self.block).numel * scale for r in t.reads)

    def source_bytes(self, headers: Headers) -> int:
        """The source's tensor bytes, given its headers as the planner sees them."""
        held = sum(t.numel * dtypes.itemsize(self.fp8.get(n, t.dtype)) for h in headers.values() for n, t in h.items())
        return held + sum(self.layouts.rank_bytes(r) for r in self.layouts.ranks)


def blocks(region: Box, block: tuple[int, int]) -> Box:
    """The blocks a 2-D region of a weight touches, as a box of its scale."""
    (r0, c0), (nr, nc) = region.offsets, region.sizes
    first = (r0 // block[0], c0 // block[1])
    return Box(first, ((r0 + nr - 1) // block[0] - first[0] + 1, (c0 + nc - 1) // block[1] - first[1] + 1))


def pairs(candidates: Mapping[str, str], held: Mapping[str, TensorInfo]) -> dict[str, str]:
    """FP8 weight -> its block scale, of the `candidates` (a template's block_scaled
    names) a source holds as a pair."""
    return {w: s for w, s in candidates.items() if s in held and w in held and held[w].dtype in FP8}


def check_pairs(scale_of: Mapping[str, str], shapes: Mapping[str, TensorInfo], block: tuple[int, int]) -> None:
    """Each scale is one value per block of its weight, of a floating dtype."""
    for w, s in scale_of.items():
        want = block_grid(shapes[w].shape, block)
        if shapes[s].shape != want or shapes[s].dtype not in SCALE_DTYPES:
            raise FormatError(f"{s}: the block scale of {w} {list(shapes[w].shape)} is {list(shapes[s].shape)} {shapes[s].dtype}; "
                              f"blocks of {list(block)} need {list(want)} F32 (check quantization_config.weight_block_size)")


def refuse_plain_casts(src: Strategy, scale_of: Mapping[str, str]) -> None:
    """A cast of an FP8 tensor whose scale the template does not name would drop the scale."""
    lone = sorted(n for n, p in src.params.items() if p.dtype in FP8 and n not in scale_of)
    if lone:
        raise ConfigError(f"dtype: FP8 tensors {name_list(lone)} have no block scale the model's template names; a cast "
                          "dequantizes FP8 weights with their scales: set pretrained_model_dir to the model's HF folder (or model.arch "
                          "and model_config), or leave out dtype")


def dequantize(src: Strategy, headers: Headers, scale_of: Mapping[str, str], block: tuple[int, int],
               cast_to: str) -> tuple[Dequant, Strategy, dict[int, dict[str, TensorInfo]]]:
    """The dequantization, and the source strategy and headers as the planner sees them
    then: each FP8 weight in the `cast_to` dtype, no scale tensors (new objects)."""
    infos = {n: TensorInfo(p.dtype, p.shape) for n, p in src.params.items()}
    scale_of = pairs(scale_of, infos)
    check_pairs(scale_of, infos, block)
    refuse_plain_casts(src, scale_of)
    scales = set(scale_of.values())
    merge = Dequant(dict(scale_of), block, Strategy(src.stages, {s: src.params[s] for s in scales}),
                    {w: src.params[w].dtype for w in scale_of}, {w: cast_to for w in scale_of})
    params = {n: (p if n not in scale_of else replace(p, dtype=cast_to)) for n, p in src.params.items() if n not in scales}
    seen = {r: {n: (TensorInfo(cast_to, t.shape) if n in scale_of else t) for n, t in h.items() if n not in scales}
            for r, h in headers.items()}
    return merge, src.with_params(params), seen


def to_f32(bits: np.ndarray, dtype: str) -> np.ndarray:
    return dtypes.cast(bits, dtype, "F32").view(np.float32)


class DequantPool:
    """A SlicePool serving FP8 weights dequantized; everything else passes through."""

    def __init__(self, inner, d: Dequant):
        self.inner, self.d = inner, d

    def region(self, read: ReadItem) -> np.ndarray:
        scale = self.d.scale_of.get(read.src_name)
        if scale is None:
            return self.inner.region(read)
        w = self.inner.region(read)
        fp8, out_dtype = self.d.fp8[read.src_name], self.d.out[read.src_name]
        (r0, c0), (nr, nc) = read.region.offsets, read.region.sizes
        out = np.empty((nr, nc), dtypes.bits_dtype(out_dtype))
        if not out.size:
            return out
        br, bc = self.d.block
        box = blocks(read.region, self.d.block)
        s = self._scale(scale, box, read.src_rank)
        rows = np.arange(r0, r0 + nr) // br - box.offsets[0]
        cols = np.arange(c0, c0 + nc) // bc - box.offsets[1]
        step = max(1, ROW_BLOCK // max(nc, 1))
        for i in range(0, nr, step):
            product = to_f32(np.ascontiguousarray(w[i:i + step]), fp8) * s[rows[i:i + step]][:, cols]
            out[i:i + step] = dtypes.cast(product.view(np.uint32), "F32", out_dtype)
        return out

    def _scale(self, name: str, box: Box, prefer: int) -> np.ndarray:
        """The scale's blocks in `box`, as float32, read from the scale's own layout."""
        dtype = self.d.layouts.params[name].dtype
        bits = np.empty(box.sizes, dtypes.bits_dtype(dtype))
        for r in planner.reads_for(self.d.layouts, name, box, prefer, None):
            bits[r.region.slices(box)] = self.inner.region(r)
        return to_f32(bits, dtype)

    def release(self) -> None:
        self.inner.release()

    def close(self) -> None:
        self.inner.close()


def wrap(pool, d: Dequant | None):
    """The pool a job reads through: dequantizing when the job casts FP8 weights."""
    return pool if d is None else DequantPool(pool, d)
