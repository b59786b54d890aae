"""Native strategy files: reading, writing, merging per-rank files, comparing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner import strategy as strat, strategy_files
from runner.errors import FormatError, LayoutError
from tests import oracle

STAGES = [[0, 1], [2, 3]]
PARAMS = {
    "emb": oracle.param((8, 4), "BF16", stage=[0, 1], dev_matrix=[2], tensor_map=[0, -1]),
    "l0": oracle.param((4, 4, 2), "F16", stage=0, dev_matrix=[2], tensor_map=[[0], -1, -1], stored_shape=[8, 2]),
    "l1": oracle.param((4, 4), "F32", stage=1, dev_matrix=[2], tensor_map=[-1, 0]),
}


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    s = strat.parse_native(oracle.strategy(STAGES, PARAMS), "test")
    for r in range(4):
        strat.write_rank_file(s, r, tmp_path)
    strat.write_merged_file(s, tmp_path)
    rank2 = json.loads((tmp_path / "ckpt_strategy_rank_2.json").read_text())
    assert rank2["rank"] == 2 and sorted(rank2["params"]) == ["emb", "l1"]
    assert rank2["params"]["emb"]["stage"] == [0, 1]
    merged = json.loads((tmp_path / "merged_ckpt_strategy.json").read_text())
    assert "rank" not in merged and sorted(merged["params"]) == ["emb", "l0", "l1"]
    back = strategy_files.load(tmp_path)
    assert back.params == s.params and back.stages == s.stages
    # per-rank files alone merge to the same strategy
    (tmp_path / "merged_ckpt_strategy.json").unlink()
    assert strategy_files.load(tmp_path).params == s.params


def test_differences_and_diff_command(tmp_path: Path) -> None:
    a = oracle.write_strategy(oracle.strategy(STAGES, PARAMS), tmp_path / "a")
    changed = {**PARAMS, "l1": oracle.param((4, 4), "F32", stage=1, dev_matrix=[2], tensor_map=[0, -1])}
    b = oracle.write_strategy(oracle.strategy(STAGES, changed), tmp_path / "b")
    same = oracle.write_strategy(oracle.strategy(STAGES, {**PARAMS}), tmp_path / "same")
    lines = strat.differences(strategy_files.load(a), strategy_files.load(b))
    assert len(lines) == 1 and lines[0].startswith("l1: ") and "tensor_map [-1, 0]" in lines[0] and "tensor_map [0, -1]" in lines[0]
    run = lambda x, y: subprocess.run([sys.executable, "-m", "runner", "diff", str(x), str(y)], capture_output=True, text=True)
    assert run(a, same).returncode == 0
    r = run(a, b)
    assert r.returncode == 1 and "l1" in r.stdout


def test_equivalent_layouts_compare_equal() -> None:
    """dev_matrix [1, 2] with axis 0 and dev_matrix [2] with axis 0 give every rank the same box."""
    a = strat.parse_native(oracle.strategy([[0, 1]], {"w": oracle.param((4,), dev_matrix=[1, 2], tensor_map=[0])}), "a")
    b = strat.parse_native(oracle.strategy([[0, 1]], {"w": oracle.param((4,), dev_matrix=[2], tensor_map=[0])}), "b")
    assert strat.differences(a, b) == []


@pytest.mark.parametrize("doc, message", [
    ({"format": "other"}, "not an autotrans strategy file"),
    ({**oracle.strategy(STAGES, PARAMS), "version": 2}, "version 2 is not supported"),
    (oracle.strategy(STAGES, {"w": {"shape": [4]}}), "parameter w: missing key 'dtype'"),
    (oracle.strategy(STAGES, {"w": {**oracle.param((4,)), "dtype": "F128"}}), "unknown dtype 'F128'"),
    (oracle.strategy(STAGES, {"w": {**oracle.param((4,)), "tensor_map": ["x"]}}), "tensor_map must hold integers"),
])
def test_malformed_files_are_named(tmp_path: Path, doc, message) -> None:
    f = tmp_path / "s.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match=message) as e:
        strategy_files.load(f)
    assert str(f) in str(e.value)


def test_per_rank_files_that_disagree_are_refused(tmp_path: Path) -> None:
    one = oracle.strategy(STAGES, {"w": oracle.param((4,), dev_matrix=[2], tensor_map=[0])})
    two = oracle.strategy(STAGES, {"w": oracle.param((4,), dev_matrix=[2], tensor_map=[-1])})
    (tmp_path / "ckpt_strategy_rank_0.json").write_text(json.dumps(one))
    (tmp_path / "ckpt_strategy_rank_1.json").write_text(json.dumps(two))
    with pytest.raises(LayoutError, match="disagree on parameter w"):
        strategy_files.load(tmp_path)
