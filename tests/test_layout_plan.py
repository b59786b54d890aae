"""Geometry and planning, no I/O: exact read items for known reshards, and property
tests over random layouts against the independent model in tests/oracle.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from runner.errors import LayoutError, PlanError
from runner.formats.base import TensorInfo
from runner.layout import Box, intersect
from runner.plan import FilePlan, ReadItem, TensorPlan, plan_rank, validate
from runner.strategy import Strategy, parse_native
from tests import oracle


def native(stages, params) -> Strategy:
    s = parse_native(oracle.strategy(stages, params), "test")
    s.validate()
    return s


def reads_of(src: Strategy, dst: Strategy, rank: int, name: str = "w") -> list[tuple[int, tuple, tuple]]:
    t = next(t for t in plan_rank(src, dst, rank).tensors if t.name == name)
    return [(r.src_rank, r.region.offsets, r.region.sizes) for r in t.reads]


def tp(n: int, shape=(16,), tmap=(0,), dtype="F32") -> Strategy:
    return native([range(n)], {"w": oracle.param(shape, dtype, dev_matrix=[n], tensor_map=list(tmap))})


def test_intersect() -> None:
    assert intersect(Box((0, 0), (4, 4)), Box((2, 3), (4, 4))) == Box((2, 3), (2, 1))
    assert intersect(Box((0,), (4,)), Box((4,), (4,))) is None


def test_8_to_4_reads_two_neighbours() -> None:
    src, dst = tp(8), tp(4)
    assert reads_of(src, dst, 1) == [(2, (4,), (2,)), (3, (6,), (2,))]
    assert reads_of(src, dst, 3) == [(6, (12,), (2,)), (7, (14,), (2,))]


def test_4_to_8_reads_half_of_one() -> None:
    src, dst = tp(4), tp(8)
    assert reads_of(src, dst, 3) == [(1, (6,), (2,))]
    assert reads_of(src, dst, 0) == [(0, (0,), (2,))]
    t = plan_rank(src, dst, 3).tensors[0]
    assert t.reads[0].src_box == Box((4,), (4,))


def test_4_to_3_uneven_boundaries() -> None:
    src, dst = tp(4, shape=(12,)), tp(3, shape=(12,))
    assert reads_of(src, dst, 0) == [(0, (0,), (3,)), (1, (3,), (1,))]
    assert reads_of(src, dst, 1) == [(1, (4,), (2,)), (2, (6,), (2,))]
    assert reads_of(src, dst, 2) == [(2, (8,), (1,)), (3, (9,), (3,))]


def test_column_split_2d() -> None:
    src = tp(2, shape=(4, 8), tmap=(-1, 0))
    dst = tp(4, shape=(4, 8), tmap=(0, -1))
    # destination rank 1 holds row 1, all columns: half from each source rank
    assert reads_of(src, dst, 1) == [(0, (1, 0), (1, 4)), (1, (1, 4), (1, 4))]


def test_replicated_source_read_once_preferring_own_rank() -> None:
    # dev_matrix [dp=2, tp=2]: positions 0,2 hold tp slice 0; 1,3 hold tp slice 1
    src = native([range(4)], {"w": oracle.param((8,), dev_matrix=[2, 2], tensor_map=[0])})
    full = native([[0]], {"w": oracle.param((8,))})
    assert reads_of(src, full, 0) == [(0, (0,), (4,)), (1, (4,), (4,))]
    same = src
    assert reads_of(src, same, 2) == [(2, (0,), (4,))]  # its own replica, not rank 0's
    assert reads_of(src, same, 3) == [(3, (4,), (4,))]


def test_uneven_stage_sizes() -> None:
    stages = [[0, 1], [2, 3, 4, 5]]
    src = native(stages, {
        "a": oracle.param((8, 2), stage=0, dev_matrix=[2], tensor_map=[0, -1]),
        "b": oracle.param((8,), stage=1, dev_matrix=[4], tensor_map=[0]),
    })
    assert src.params_of_rank(1) == ["a"] and src.params_of_rank(4) == ["b"]
    assert src.box("b", 4) == Box((4,), (2,))
    full = native([[0]], {"a": oracle.param((8, 2)), "b": oracle.param((8,))})
    assert reads_of(src, full, 0, "b") == [(2, (0,), (2,)), (3, (2,), (2,)), (4, (4,), (2,)), (5, (6,), (2,))]
    assert reads_of(src, full, 0, "a") == [(0, (0, 0), (4, 2)), (1, (4, 0), (4, 2))]


def test_dim_split_over_two_axes_first_is_outermost() -> None:
    # dev_matrix [2, 3]; axis 1 = device dim 0 (size 2), axis 0 = device dim 1 (size 3)
    s = native([range(6)], {"w": oracle.param((12,), dev_matrix=[2, 3], tensor_map=[[1, 0]])})
    # position p -> coords (p // 3, p % 3) -> index coords[0] * 3 + coords[1] = p
    assert [s.box("w", r).offsets[0] for r in range(6)] == [0, 2, 4, 6, 8, 10]
    s2 = native([range(6)], {"w": oracle.param((12,), dev_matrix=[2, 3], tensor_map=[[0, 1]])})
    # index coords[1] * 2 + coords[0]
    assert [s2.box("w", r).offsets[0] // 2 for r in range(6)] == [0, 2, 4, 1, 3, 5]


def test_opt_shard_consecutive_and_stepped() -> None:
    # dp 4 x tp 2; w split over tp on dim 1; opt shard 2 over the 4 dp replicas
    p = oracle.param((8, 4), dev_matrix=[4, 2], tensor_map=[-1, 0], opt_shard=2)
    s = native([range(8)], {"w": p})
    rows = [s.box("w", r).offsets[0] for r in range(8)]
    cols = [s.box("w", r).offsets[1] for r in range(8)]
    assert cols == [0, 2] * 4
    assert rows == [0, 0, 4, 4, 0, 0, 4, 4]  # replica index 0,1,2,3 -> opt index 0,1,0,1
    stepped = native([range(8)], {"w": oracle.param((8, 4), dev_matrix=[4, 2], tensor_map=[-1, 0], opt_shard=2, step=2)})
    assert [stepped.box("w", r).offsets[0] for r in range(8)] == [0, 0, 0, 0, 4, 4, 4, 4]
    full = native([[0]], {"w": oracle.param((8, 4))})
    assert reads_of(s, full, 0) == [(0, (0, 0), (4, 2)), (1, (0, 2), (4, 2)), (2, (4, 0), (4, 2)), (3, (4, 2), (4, 2))]


def test_stored_shape_is_a_view_of_the_box() -> None:
    s = native([range(2)], {"w": oracle.param((2, 4, 3), dev_matrix=[2], tensor_map=[-1, 0, -1], stored_shape=[4, 3])})
    assert s.params["w"].stored() == (4, 3)
    assert s.box("w", 1) == Box((0, 2, 0), (2, 2, 3))


@pytest.mark.parametrize("bad, message", [
    ({"dev_matrix": [3], "tensor_map": [0]}, "has 3 devices but stage 0 has 2 ranks"),
    ({"dev_matrix": [2], "tensor_map": [1]}, "names device axis 1"),
    ({"shape": [5], "dev_matrix": [2], "tensor_map": [0]}, "cannot be split into 2 equal parts"),
    ({"dev_matrix": [2], "tensor_map": [0], "opt_shard": 2}, "does not divide its 1 replicas"),
    ({"stored_shape": [3]}, "does not hold the local box"),
])
def test_impossible_layouts_are_named(bad, message) -> None:
    p = {**oracle.param((4,), dev_matrix=[2], tensor_map=[-1]), **bad}
    with pytest.raises(LayoutError, match=message) as e:
        native([[0, 1]], {"model.w": p})
    assert "model.w" in str(e.value)


def test_headers_disagreeing_with_strategy_are_named() -> None:
    src, dst = tp(2), tp(4)
    headers = {0: {"w": TensorInfo("F32", (8,))}, 1: {"w": TensorInfo("F32", (7,))}}
    with pytest.raises(PlanError, match="source rank 1 stores shape \\[7\\]"):
        plan_rank(src, dst, 3, headers=lambda r: headers[r])
    headers[1] = {"w": TensorInfo("F16", (8,))}
    with pytest.raises(PlanError, match="stores F16, the strategy says F32"):
        plan_rank(src, dst, 3, headers=lambda r: headers[r])
    headers[1] = {}
    with pytest.raises(PlanError, match="lacks it"):
        plan_rank(src, dst, 3, headers=lambda r: headers[r])


def test_validation_checks_exact_cover() -> None:
    """Reads of [0, 2) twice and never [2, 4) have the right volume and stay inside the
    box; exact cover rejects them. The honest plan [0, 2) + [2, 4) passes."""
    src = tp(2, shape=(4,))
    whole = Box((0,), (4,))
    first, second = Box((0,), (2,)), Box((2,), (2,))

    def file_plan(regions) -> FilePlan:
        reads = tuple(ReadItem(0 if b.offsets == (0,) else 1, "w", b, b) for b in regions)
        return FilePlan(0, (TensorPlan("w", "F32", "F32", whole, (4,), reads),))

    validate(file_plan([first, second]), src, None)
    with pytest.raises(PlanError, match="overlap"):
        validate(file_plan([first, first]), src, None)
    two_d = Box((0, 0), (4, 4))
    left, right = Box((0, 0), (4, 2)), Box((0, 2), (4, 2))
    ok = FilePlan(0, (TensorPlan("w", "F32", "F32", two_d, (4, 4), (ReadItem(0, "w", two_d, left), ReadItem(0, "w", two_d, right))),))
    validate(ok, tp(1, shape=(4, 4), tmap=(-1, -1)), None)  # same rows, disjoint columns: no overlap
    bad = FilePlan(0, (TensorPlan("w", "F32", "F32", two_d, (4, 4), (ReadItem(0, "w", two_d, left), ReadItem(0, "w", two_d, left))),))
    with pytest.raises(PlanError, match="overlap"):
        validate(bad, tp(1, shape=(4, 4), tmap=(-1, -1)), None)


# -- properties over random layouts -------------------------------------------------------
@st.composite
def layouts(draw, shape_dims: int):
    """A random stage list, dev_matrix and tensor_map (maybe multi-axis, maybe opt shard)."""
    dev = draw(st.lists(st.sampled_from([1, 2, 3]), min_size=1, max_size=3))
    axes = list(range(len(dev)))
    draw(st.randoms()).shuffle(axes)
    tmap = [[] for _ in range(shape_dims)]
    for k in axes:
        dim = draw(st.integers(-1, shape_dims - 1))
        if dim >= 0:
            tmap[dim].append(k)
    parts = [math.prod(dev[len(dev) - 1 - k] for k in a) for a in tmap]
    used = {len(dev) - 1 - k for a in tmap for k in a}
    replicas = math.prod(d for i, d in enumerate(dev) if i not in used)
    opt = draw(st.sampled_from([n for n in (1, 2, 3) if replicas % n == 0]))
    if opt > 1:
        parts[0] *= opt
    step = draw(st.sampled_from([s for s in (1, 2) if replicas % (opt * s) == 0])) if opt > 1 else 1
    entry = [(-1 if not a else a[0] if len(a) == 1 else a) for a in tmap]
    return dev, entry, opt, step, parts


@st.composite
def reshard_cases(draw):
    ndim = draw(st.integers(1, 3))
    a = draw(layouts(ndim))
    b = draw(layouts(ndim))
    shape = [math.lcm(pa, pb) * draw(st.integers(1, 2)) for pa, pb in zip(a[4], b[4])]
    return shape, a, b


def _strategy(shape, lay) -> dict:
    dev, tmap, opt, step, _ = lay
    return oracle.strategy([range(math.prod(dev))], {"w": oracle.param(shape, dev_matrix=dev, tensor_map=tmap, opt_shard=opt, step=step)})


class ArrayPool:
    """Source ranks' tensors held in memory (the SlicePool protocol), for pure tests."""

    def __init__(self, per_rank: dict[int, dict[str, np.ndarray]]):
        self.per_rank = per_rank
        self.reads: list[ReadItem] = []

    def region(self, read: ReadItem) -> np.ndarray:
        self.reads.append(read)
        return self.per_rank[read.src_rank][read.src_name].reshape(read.src_box.sizes)[read.region.slices(read.src_box)]

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


def _np_shard(full: np.ndarray, strat: dict, rank: int) -> np.ndarray:
    return full[oracle.rank_slices(strat, "w", rank)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reshard_cases())
def test_reshard_matches_oracle_and_covers_once(case) -> None:
    from runner.execute import tensor_bits

    shape, a, b = case
    sa, sb = _strategy(shape, a), _strategy(shape, b)
    A, B = native(sa["stages"], sa["params"]), native(sb["stages"], sb["params"])
    full = np.arange(math.prod(shape), dtype=np.uint32).reshape(shape)
    pool = ArrayPool({r: {"w": _np_shard(full, sa, r)} for r in oracle.world(sa)})
    for r in oracle.world(sb):
        t = plan_rank(A, B, r).tensors[0]
        assert sum(x.region.numel for x in t.reads) == t.box.numel
        assert np.array_equal(tensor_bits(t, pool), _np_shard(full, sb, r))


@settings(max_examples=100, deadline=None)
@given(reshard_cases())
def test_split_then_merge_is_identity(case) -> None:
    from runner.execute import tensor_bits

    shape, a, _ = case
    sa = _strategy(shape, a)
    A = native(sa["stages"], sa["params"])
    full_s = native([[0]], {"w": oracle.param(shape)})
    full = np.random.default_rng(0).integers(0, 2**32, size=shape, dtype=np.uint32)
    split = {r: {"w": tensor_bits(plan_rank(full_s, A, r).tensors[0], ArrayPool({0: {"w": full}}))} for r in oracle.world(sa)}
    merged = tensor_bits(plan_rank(A, full_s, 0).tensors[0], ArrayPool(split))
    assert np.array_equal(merged, full)
