"""`autotrans plan` (SPEC 10): per-rank and total byte counts checked against counts made
here, independently: every rank's box from the SPEC's layout rules with numpy, and the
source pieces found by scanning every source rank (the planner finds them arithmetically).
Replicas are read once, from the destination's own rank when it holds the piece, else
from the lowest rank holding it."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from runner.cli import main

ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}
NUMPY = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def param(shape, dtype, stage, dev, tmap, opt=1) -> dict:
    return {"shape": list(shape), "dtype": dtype, "stage": stage, "dev_matrix": list(dev),
            "tensor_map": list(tmap), "opt_shard": opt, "stored_shape": None}


def write_strategy(folder: Path, stages, params: dict) -> Path:
    """Per-rank files (the parameters of the rank's stage) plus the merged file."""
    folder.mkdir(parents=True)
    head = {"format": "autotrans-strategy", "version": 1, "stages": [list(s) for s in stages]}
    for s, ranks in enumerate(stages):
        mine = {n: p for n, p in params.items() if s in _stages_of(p)}
        for r in ranks:
            (folder / f"ckpt_strategy_rank_{r}.json").write_text(json.dumps({**head, "rank": r, "params": mine}))
    (folder / "merged_ckpt_strategy.json").write_text(json.dumps({**head, "params": params}))
    return folder


def _stages_of(p: dict) -> list[int]:
    return p["stage"] if isinstance(p["stage"], list) else [p["stage"]]


# -- the independent count ------------------------------------------------------------------
def boxes(p: dict, stages) -> dict[int, tuple[tuple[int, int], ...]]:
    """rank -> [start, stop) per dim, from SPEC 5: position unravelled over dev_matrix,
    tensor_map[i] = k splits dim i over dev_matrix[len-1-k], opt_shard splits dim 0
    again across consecutive members of the replica group."""
    dev = p["dev_matrix"]
    nd = len(dev)
    axes = [[] if a == -1 else a if isinstance(a, list) else [a] for a in p["tensor_map"]]
    split_dims = {nd - 1 - k for a in axes for k in a}
    out = {}
    for s in _stages_of(p):
        for pos, rank in enumerate(stages[s]):
            coords = np.unravel_index(pos, dev)
            idx_parts = []
            for a in axes:
                idx, parts = 0, 1
                for k in a:
                    idx, parts = idx * dev[nd - 1 - k] + int(coords[nd - 1 - k]), parts * dev[nd - 1 - k]
                idx_parts.append((idx, parts))
            if p["opt_shard"] > 1:
                free = [d for d in range(nd) if d not in split_dims]
                member = int(np.ravel_multi_index([coords[d] for d in free], [dev[d] for d in free])) if free else 0
                idx, parts = idx_parts[0]
                idx_parts[0] = (idx * p["opt_shard"] + member % p["opt_shard"], parts * p["opt_shard"])
            out[rank] = tuple((i * n // k, (i + 1) * n // k) for (i, k), n in zip(idx_parts, p["shape"]))
    return out


def overlap(a, b) -> int:
    return math.prod(max(0, min(ah, bh) - max(al, bl)) for (al, ah), (bl, bh) in zip(a, b))


def expected(src_params: dict, src_stages, dst_params: dict, dst_stages, cast: str | None = None) -> dict:
    """Per destination rank: tensors, read bytes, write bytes, source ranks read."""
    rows = {r: {"tensors": 0, "read_bytes": 0, "write_bytes": 0, "src": set()} for r in itertools.chain(*dst_stages)}
    for name, dp in dst_params.items():
        sp = src_params[name]
        src_boxes = boxes(sp, src_stages)
        distinct: dict[tuple, list[int]] = {}
        for r, b in src_boxes.items():
            distinct.setdefault(b, []).append(r)
        out_dtype = cast if cast and sp["dtype"].startswith(("F", "BF")) else sp["dtype"]
        for rank, box in boxes(dp, dst_stages).items():
            row = rows[rank]
            row["tensors"] += 1
            row["write_bytes"] += math.prod(hi - lo for lo, hi in box) * ITEMSIZE[out_dtype]
            for sbox, holders in distinct.items():
                n = overlap(box, sbox)
                if n:
                    row["read_bytes"] += n * ITEMSIZE[sp["dtype"]]
                    row["src"].add(rank if rank in holders else holders[rank % len(holders)])  # SPEC-free policy: spread over replicas
    return rows


# -- running the command --------------------------------------------------------------------
def plan(capsys, tmp_path: Path, *args: str, json_out: bool = True, **keys) -> tuple[int, dict | str, str]:
    """Exit code, the output (parsed when JSON), and stderr."""
    job = tmp_path / "job.yaml"
    job.write_text("".join(f"{k}: {v}\n" for k, v in {"output_dir": tmp_path / "out", **keys}.items()))
    code = main(["plan", str(job), *args, *(["--json"] if json_out else [])])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if json_out and code == 0 else out), err


def spans(want: dict) -> list[str]:
    """Runs of consecutive ranks with equal counts, as the text table shows them."""
    out: list[list[int]] = []
    key = lambda r: (want[r]["tensors"], want[r]["read_bytes"], want[r]["write_bytes"], len(want[r]["src"]))
    for r in sorted(want):
        if out and key(out[-1][-1]) == key(r):
            out[-1].append(r)
        else:
            out.append([r])
    return [str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in out]


def check(doc: dict, want: dict, one_file_per_rank: bool = True) -> None:
    assert [r["rank"] for r in doc["ranks"]] == sorted(want)
    for row in doc["ranks"]:
        w = want[row["rank"]]
        got = {k: row[k] for k in ("tensors", "read_bytes", "write_bytes", "src_ranks")}
        assert got == {"tensors": w["tensors"], "read_bytes": w["read_bytes"], "write_bytes": w["write_bytes"],
                       "src_ranks": len(w["src"])}, row["rank"]
        if one_file_per_rank:
            assert row["src_files"] == len(w["src"])
        assert row["read_amplification"] == pytest.approx(w["read_bytes"] / w["write_bytes"])
    total = doc["total"]
    read = sum(w["read_bytes"] for w in want.values())
    write = sum(w["write_bytes"] for w in want.values())
    assert (total["files"], total["read_bytes"], total["write_bytes"]) == (len(want), read, write)
    assert total["tensors"] == sum(w["tensors"] for w in want.values())
    assert total["read_amplification"] == pytest.approx(read / write)
    if one_file_per_rank:
        assert total["src_files_touched"] == len(set().union(*(w["src"] for w in want.values())))


# Layout pairs: (source stages, source params, destination stages, destination params).
def tp2_to_tp4():
    def ps(n):
        return {"wq": param((8, 6), "F32", 0, [n], [0, -1]), "wo": param((6, 8), "F32", 0, [n], [-1, 0]),
                "norm": param((6,), "F32", 0, [n], [-1]), "step": param((1,), "I64", 0, [n], [-1])}
    return [[0, 1]], ps(2), [[0, 1, 2, 3]], ps(4)


def pp2_to_dp2tp2_opt():
    src = {"emb": param((12, 4), "BF16", 0, [2], [0, -1]), "l0": param((4, 12), "BF16", 0, [2], [-1, 0]),
           "l1": param((8, 4), "BF16", 1, [2], [0, -1]), "head": param((12, 4), "BF16", 1, [2], [-1, -1])}
    dst = {"emb": param((12, 4), "BF16", 0, [2, 2], [-1, -1]), "l0": param((4, 12), "BF16", 0, [2, 2], [-1, 0]),
           "l1": param((8, 4), "BF16", 0, [2, 2], [0, -1], opt=2), "head": param((12, 4), "BF16", 0, [2, 2], [0, -1])}
    return [[0, 1], [2, 3]], src, [[0, 1, 2, 3]], dst


def tp3_to_2x2_multi_axis():
    src = {"w": param((6, 6), "F32", 0, [3], [0, -1]), "w2": param((8, 12), "F32", 0, [3], [-1, 0])}
    dst = {"w": param((6, 6), "F32", 0, [2, 2], [1, 0]), "w2": param((8, 12), "F32", 0, [2, 2], [[1, 0], -1])}
    return [[0, 1, 2]], src, [[0, 1, 2, 3]], dst


def tied_two_stages():
    src = {"emb": param((8, 4), "F16", [0, 1], [2], [0, -1]), "mid": param((4, 4), "F16", 0, [2], [-1, 0])}
    dst = {"emb": param((8, 4), "F16", [0, 1], [1], [-1, -1]), "mid": param((4, 4), "F16", 0, [1], [-1, -1])}
    return [[0, 1], [2, 3]], src, [[0], [1]], dst


CASES = [tp2_to_tp4, pp2_to_dp2tp2_opt, tp3_to_2x2_multi_axis, tied_two_stages]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_counts_from_strategies_alone(case, tmp_path, capsys) -> None:
    ss, sp, ds, dp = case()
    code, doc, _ = plan(capsys, tmp_path, src_strategy_path_or_dir=write_strategy(tmp_path / "src", ss, sp),
                     dst_strategy_path_or_dir=write_strategy(tmp_path / "dst", ds, dp))
    assert code == 0
    check(doc, expected(sp, ss, dp, ds))
    assert doc["source"]["assumed"] and doc["source"]["files"] == len(list(itertools.chain(*ss)))
    assert doc["nothing_to_do"] is None


def test_cast_shows_in_amplification(tmp_path, capsys) -> None:
    ss, sp, ds, dp = tp2_to_tp4()
    dp = {n: {**p, "dtype": "F16" if p["dtype"] == "F32" else p["dtype"]} for n, p in dp.items()}
    code, doc, _ = plan(capsys, tmp_path, src_strategy_path_or_dir=write_strategy(tmp_path / "src", ss, sp),
                     dst_strategy_path_or_dir=write_strategy(tmp_path / "dst", ds, dp), dtype="fp16")
    assert code == 0
    want = expected(sp, ss, dp, ds, cast="F16")
    check(doc, want)
    assert 1.5 < doc["total"]["read_amplification"] < 2.0  # floats halve, the I64 step does not


# -- with a checkpoint ----------------------------------------------------------------------
def full_arrays(params: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.integers(0, 100, p["shape"]).astype(NUMPY[p["dtype"]]) for n, p in params.items()}


def write_distributed(root: Path, params: dict, stages, full: dict[str, np.ndarray]) -> Path:
    """rank_N/checkpoint_N.safetensors holding each rank's box, sliced with numpy."""
    per_rank: dict[int, dict[str, np.ndarray]] = {r: {} for r in itertools.chain(*stages)}
    for name, p in params.items():
        for rank, box in boxes(p, stages).items():
            per_rank[rank][name] = np.ascontiguousarray(full[name][tuple(slice(lo, hi) for lo, hi in box)])
    for rank, tensors in per_rank.items():
        (root / f"rank_{rank}").mkdir(parents=True)
        save_file(tensors, str(root / f"rank_{rank}" / f"checkpoint_{rank}.safetensors"))
    return root


@pytest.fixture
def no_weights(monkeypatch):
    """Reading any tensor's bytes fails the test: plan reads headers only."""
    from runner.formats import safetensors_io

    def refuse(self, name):
        raise AssertionError(f"plan read the bytes of {name}")

    monkeypatch.setattr(safetensors_io.SafetensorsReader, "array", refuse)


def test_distributed_checkpoint_same_counts(tmp_path, capsys, no_weights) -> None:
    ss, sp, ds, dp = tp2_to_tp4()
    ckpt = write_distributed(tmp_path / "ckpt", sp, ss, full_arrays(sp))
    code, doc, _ = plan(capsys, tmp_path, load_checkpoint=ckpt,
                     src_strategy_path_or_dir=write_strategy(tmp_path / "src", ss, sp),
                     dst_strategy_path_or_dir=write_strategy(tmp_path / "dst", ds, dp))
    assert code == 0
    check(doc, expected(sp, ss, dp, ds))
    payload = sum(math.prod(hi - lo for lo, hi in b) * ITEMSIZE[p["dtype"]] for p in sp.values() for b in boxes(p, ss).values())
    assert doc["source"] == {"path": str(ckpt), "kind": "distributed", "assumed": False, "ranks": 2, "files": 2, "bytes": payload}
    assert doc["nothing_to_do"] is False


def test_full_checkpoint_read_from_header(tmp_path, capsys, no_weights) -> None:
    _, _, ds, dp = tp2_to_tp4()
    full = full_arrays(dp)
    save_file(full, str(tmp_path / "full.safetensors"))
    whole = {n: {**p, "dev_matrix": [1], "tensor_map": [-1] * len(p["shape"])} for n, p in dp.items()}
    code, doc, _ = plan(capsys, tmp_path, load_checkpoint=tmp_path / "full.safetensors",
                     dst_strategy_path_or_dir=write_strategy(tmp_path / "dst", ds, dp))
    assert code == 0
    check(doc, expected(whole, [[0]], dp, ds))
    assert doc["source"]["bytes"] == sum(a.nbytes for a in full.values())
    assert doc["total"]["src_files_touched"] == 1


def test_nothing_to_do_when_layouts_match(tmp_path, capsys) -> None:
    ss, sp, _, _ = tp2_to_tp4()
    ckpt = write_distributed(tmp_path / "ckpt", sp, ss, full_arrays(sp))
    strategy = write_strategy(tmp_path / "s", ss, sp)
    code, doc, _ = plan(capsys, tmp_path, load_checkpoint=ckpt, src_strategy_path_or_dir=strategy,
                     dst_strategy_path_or_dir=strategy)
    assert code == 0 and doc["nothing_to_do"] is True


def test_plan_matches_the_run(tmp_path, capsys) -> None:
    """total.write_bytes equals the tensor bytes the run then writes (headers excluded),
    as the safetensors library reads them back."""
    from safetensors import safe_open

    ss, sp, ds, dp = pp2_to_dp2tp2_opt()
    sp = {n: {**p, "dtype": "F32"} for n, p in sp.items()}
    dp = {n: {**p, "dtype": "F32"} for n, p in dp.items()}
    keys = dict(load_checkpoint=write_distributed(tmp_path / "ckpt", sp, ss, full_arrays(sp)),
                src_strategy_path_or_dir=write_strategy(tmp_path / "src", ss, sp),
                dst_strategy_path_or_dir=write_strategy(tmp_path / "dst", ds, dp))
    code, doc, _ = plan(capsys, tmp_path, **keys)
    assert code == 0
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 0
    for row in doc["ranks"]:
        with safe_open(row["file"], "numpy") as f:
            assert sum(f.get_tensor(k).nbytes for k in f.keys()) == row["write_bytes"]


# -- text output and errors ------------------------------------------------------------------
def table_spans(out: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines() if line[:1].isdigit()]


def test_text_groups_ranks_and_shows_totals(tmp_path, capsys) -> None:
    ss, sp, ds, dp = pp2_to_dp2tp2_opt()
    want = expected(sp, ss, dp, ds)
    code, out, _ = plan(capsys, tmp_path, json_out=False, src_strategy_path_or_dir=write_strategy(tmp_path / "src", ss, sp),
                        dst_strategy_path_or_dir=write_strategy(tmp_path / "dst", ds, dp))
    assert code == 0
    assert table_spans(out) == spans(want) == ["0-3"]  # replicas spread: every rank reads alike
    total = next(line for line in out.splitlines() if line.startswith("total:"))
    read = int(re.search(r"read [^(]*\((\d+) B\)", total).group(1))
    write = int(re.search(r"write [^(]*\((\d+) B\)", total).group(1))
    assert (read, write) == (sum(w["read_bytes"] for w in want.values()), sum(w["write_bytes"] for w in want.values()))
    assert "4 file(s)" in total and "4 of 4 source file(s) touched" in total


def test_text_summarises_many_groups(tmp_path, capsys, monkeypatch) -> None:
    from runner import plan_report

    monkeypatch.setattr(plan_report, "MAX_GROUPS", 0)
    ss, sp, ds, dp = pp2_to_dp2tp2_opt()
    code, out, _ = plan(capsys, tmp_path, json_out=False, src_strategy_path_or_dir=write_strategy(tmp_path / "src", ss, sp),
                        dst_strategy_path_or_dir=write_strategy(tmp_path / "dst", ds, dp))
    assert code == 0
    want = expected(sp, ss, dp, ds)
    assert table_spans(out) == ["0-3"]  # the one stage
    row = next(line for line in out.splitlines() if line.startswith("0-3"))
    files = sorted(len(w["src"]) for w in want.values())
    assert row.split()[1] == "4" and row.split()[-2] == (str(files[0]) if files[0] == files[-1] else f"{files[0]}-{files[-1]}")
    assert "ranks per stage, as ranges (1 runs of ranks with equal shares" in out


def test_needs_a_source(tmp_path, capsys) -> None:
    _, _, ds, dp = tp2_to_tp4()
    code, _, err = plan(capsys, tmp_path, dst_strategy_path_or_dir=write_strategy(tmp_path / "dst", ds, dp))
    assert code == 2
    assert "load_checkpoint" in err and "src_strategy_path_or_dir" in err


# -- MindSpore strategies: shapes come from the checkpoint headers ----------------------------
def test_mindspore_strategy_reads_headers(tmp_path, capsys, no_weights) -> None:
    import runner.formats.mindspore_strategy as ms
    from runner.strategy import parse_native

    ss, sp, ds, dp = tp2_to_tp4()
    native = parse_native({"format": "autotrans-strategy", "version": 1, "stages": ss, "params": sp}, "test")
    folder = tmp_path / "ms"
    for r in itertools.chain(*ss):
        ms.write_rank_file(native, r, folder)
    ckpt = write_distributed(tmp_path / "ckpt", sp, ss, full_arrays(sp))
    dst = write_strategy(tmp_path / "dst", ds, dp)
    code, doc, _ = plan(capsys, tmp_path, load_checkpoint=ckpt, src_strategy_path_or_dir=folder, dst_strategy_path_or_dir=dst)
    assert code == 0
    check(doc, expected(sp, ss, dp, ds))
    code, _, err = plan(capsys, tmp_path, json_out=False, src_strategy_path_or_dir=folder, dst_strategy_path_or_dir=dst)
    assert code == 2 and "load_checkpoint" in err


def test_conversions_need_their_checkpoint(tmp_path, capsys) -> None:
    ss, sp, ds, dp = tp2_to_tp4()
    code, _, err = plan(capsys, tmp_path, json_out=False, output_format="megatron",
                        src_strategy_path_or_dir=write_strategy(tmp_path / "src", ss, sp),
                        dst_strategy_path_or_dir=write_strategy(tmp_path / "dst", ds, dp))
    assert code == 2 and "conversions" in err
