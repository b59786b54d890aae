"""The engine's contracts that no single command shows: preparing a job changes none
of its inputs, and what it builds cannot be changed afterwards."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from runner import config
from runner.generate import with_source
from runner.job import prepare, read_headers
from runner.source import discover
from runner.strategy import Strategy
from tests.test_generate import hf_model


def test_prepare_changes_none_of_its_inputs(tmp_path: Path) -> None:
    """A checkpoint holding LoRA pairs: the prepared job plans base weights only, yet the
    headers handed to prepare still name every tensor, and the job cannot be edited."""
    rng = np.random.default_rng(0)
    tensors = {"w.weight": rng.standard_normal((8, 6), dtype=np.float32),
               "w.tk_delta_lora_a": rng.standard_normal((2, 6), dtype=np.float32),
               "w.tk_delta_lora_b": rng.standard_normal((8, 2), dtype=np.float32),
               "norm.weight": rng.standard_normal((6,), dtype=np.float32)}
    save_file(tensors, str(tmp_path / "full.safetensors"))
    cfg = config.from_mapping({"load_checkpoint": str(tmp_path / "full.safetensors"), "use_parallel": False,
                               "output_dir": str(tmp_path / "out"), "lora": {"scaling": 0.5}})
    source = discover(Path(cfg.load_checkpoint))
    headers = read_headers(source)
    before = copy.deepcopy(headers)
    job = prepare(cfg, source, headers)
    assert headers == before and sorted(headers[0]) == sorted(tensors)
    assert sorted(job.src.params) == sorted(job.dst.params) == ["norm.weight", "w.weight"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.dst = job.src  # type: ignore[misc]
    with pytest.raises(TypeError):
        job.src.params["w.weight"] = job.src.params["norm.weight"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del job.dst.params["w.weight"]  # type: ignore[attr-defined]


def test_generating_leaves_the_source_strategy_alone(tmp_path: Path) -> None:
    """GPT-2 stores c_attn flat ([h, 3h]); generation re-expresses it in a new source
    strategy with the template's logical shape and leaves the one it was given as it was."""
    folder = hf_model("gpt", tmp_path / "hf")
    cfg = config.from_mapping({"load_checkpoint": str(folder / "model.safetensors"),
                               "model": {"arch": "gpt", "model_config": json.loads((folder / "config.json").read_text())},
                               "parallel_config": {"model_parallel": 2}})
    src = Strategy.full(read_headers(discover(Path(cfg.load_checkpoint)))[0])
    before = copy.deepcopy(dict(src.params))
    dst, seen = with_source(cfg, src)
    name = "transformer.h.1.attn.c_attn.weight"
    assert dict(src.params) == before and src.params[name].shape == (32, 96)
    assert seen.params[name].shape == dst.params[name].shape != (32, 96)
    assert seen.params[name].stored() == (32, 96)
