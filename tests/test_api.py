"""The seed-004 example configs end to end (CLI and the Python API), checked against
numpy slicing of the demo source written here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runner import cli
from runner.api import checkpoint_for_rank
from runner.errors import AutotransError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
DEMO = CONFIGS / "demo"


def bits(path: Path) -> dict[str, np.ndarray]:
    """Raw 16-bit patterns of a BF16 safetensors file."""
    import torch
    from safetensors.torch import load_file

    return {k: v.view(torch.int16).numpy() for k, v in load_file(str(path)).items()}


@pytest.fixture(scope="module")
def demo_full() -> dict[str, np.ndarray]:
    """The demo model whole: its 2 tensor-parallel files joined by hand."""
    a, b = bits(DEMO / "checkpoint/rank_0/checkpoint_0.safetensors"), bits(DEMO / "checkpoint/rank_1/checkpoint_1.safetensors")
    out = {}
    for name in a:
        if a[name].ndim == 1:
            out[name] = a[name]
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            out[name] = np.concatenate([a[name], b[name]], axis=1)
        else:
            out[name] = np.concatenate([a[name], b[name]], axis=0)
    return out


def run(config: str, *overrides: str) -> int:
    return cli.main(["run", "--no-progress", str(CONFIGS / config), *overrides])


def test_demo_rebuilds_bit_identically(tmp_path):
    """configs/demo/ is what make_demo.py writes."""
    script = (DEMO / "make_demo.py").read_text().replace("HERE = Path(__file__).resolve().parent", f"HERE = Path({str(tmp_path)!r})")
    (tmp_path / "make.py").write_text(script)
    subprocess.run([sys.executable, str(tmp_path / "make.py")], check=True, capture_output=True)
    for rel in ("checkpoint/rank_0/checkpoint_0.safetensors", "checkpoint/rank_1/checkpoint_1.safetensors",
                "strategy/ckpt_strategy_rank_0.json", "strategy/ckpt_strategy_rank_1.json"):
        assert (tmp_path / rel).read_bytes() == (DEMO / rel).read_bytes(), rel


def test_demo_job(tmp_path, demo_full):
    assert run("demo.yaml", f"output_dir={tmp_path}") == 0
    # dp2 x mp2 x pp2: rank 6 is stage 1, dp 1, tp 0 -> layers 2-3, first half of q rows;
    # vocab_emb_dp (default) keeps lm_head whole on the last stage
    got = bits(tmp_path / "transformed_checkpoint/rank_6/checkpoint_6.safetensors")
    assert np.array_equal(got["model.layers.3.self_attn.q_proj.weight"], demo_full["model.layers.3.self_attn.q_proj.weight"][:64])
    assert np.array_equal(got["model.layers.2.mlp.down_proj.weight"], demo_full["model.layers.2.mlp.down_proj.weight"][:, :176])
    assert np.array_equal(got["lm_head.weight"], demo_full["lm_head.weight"])
    assert "model.embed_tokens.weight" not in got and "model.layers.1.mlp.up_proj.weight" not in got


def test_seed_scenarios_chain_through_cli(tmp_path, demo_full):
    m2s, s2m, m2m = tmp_path / "m2s", tmp_path / "s2m", tmp_path / "m2m"
    assert run("multi_to_single.yaml", f"output_dir={m2s}") == 0
    full_file = m2s / "transformed_checkpoint/rank_0/checkpoint_0.safetensors"
    merged = bits(full_file)
    assert merged.keys() == demo_full.keys() and all(np.array_equal(merged[k], demo_full[k]) for k in merged)

    assert run("single_to_multi.yaml", f"output_dir={s2m}", f"load_checkpoint={full_file}") == 0
    assert run("multi_to_multi.yaml", f"output_dir={m2m}", f"load_checkpoint={s2m / 'transformed_checkpoint'}",
               f"src_strategy_path_or_dir={s2m / 'strategy' / 'merged_ckpt_strategy.json'}") == 0
    # dp4 x mp1 x pp2 with optimizer shard: rank 5 is stage 1, replica 1 of 4 -> rows 32..63;
    # norms are declared parallel_optimizer=False and stay whole
    got = bits(m2m / "transformed_checkpoint/rank_5/checkpoint_5.safetensors")
    q = demo_full["model.layers.2.self_attn.q_proj.weight"]
    assert np.array_equal(got["model.layers.2.self_attn.q_proj.weight"], q[32:64])
    assert np.array_equal(got["model.norm.weight"], demo_full["model.norm.weight"])
    assert cli.main(["verify", str(DEMO / "checkpoint"), str(m2m / "transformed_checkpoint"),
                     "--strategy-a", str(DEMO / "strategy"), "--strategy-b", str(m2m / "strategy")]) == 0


API_CALL = """
import sys
from runner.api import checkpoint_for_rank
print(checkpoint_for_rank(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
"""


def test_api_every_rank_at_once(tmp_path, demo_full):
    assert run("multi_to_single.yaml", f"output_dir={tmp_path / 'm2s'}") == 0
    source = tmp_path / "m2s/transformed_checkpoint/rank_0/checkpoint_0.safetensors"
    overrides = [f"load_checkpoint={source}", f"output_dir={tmp_path / 'out'}"]
    procs = [subprocess.Popen([sys.executable, "-c", API_CALL, str(CONFIGS / "single_to_multi.yaml"), str(r), *overrides],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for r in range(4)]
    paths = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        paths.append(Path(out.strip().splitlines()[-1]))
    assert paths == [tmp_path / "out" / "transformed_checkpoint" / f"rank_{r}" / f"checkpoint_{r}.safetensors" for r in range(4)]
    assert (tmp_path / "out" / "transformed_checkpoint" / "autotrans.json").is_file()
    # dp1 x mp2 x pp2: rank 3 is stage 1, tp 1
    got = bits(paths[3])
    assert np.array_equal(got["model.layers.3.mlp.gate_proj.weight"], demo_full["model.layers.3.mlp.gate_proj.weight"][176:])
    assert np.array_equal(got["model.layers.3.self_attn.o_proj.weight"], demo_full["model.layers.3.self_attn.o_proj.weight"][:, 64:])
    assert sorted(got) == sorted(n for n in demo_full if n.startswith(("model.layers.2.", "model.layers.3.")) or n in ("model.norm.weight", "lm_head.weight"))


def demo_job(tmp_path: Path, **pc) -> dict:
    return {"load_checkpoint": str(DEMO / "checkpoint"), "src_strategy_path_or_dir": str(DEMO / "strategy"),
            "output_dir": str(tmp_path / "out"), "parallel_config": pc,
            "model": {"arch": "llama", "model_config": {"num_layers": 4, "hidden_size": 128, "num_heads": 4,
                                                        "n_kv_heads": 2, "intermediate_size": 352, "vocab_size": 1024}}}


def test_api_returns_the_source_when_layouts_match(tmp_path, monkeypatch):
    # the demo is mp2 with vocab-parallel embeddings: the same layout needs no transform
    raw = demo_job(tmp_path, model_parallel=2, vocab_emb_dp=False)
    monkeypatch.setenv("RANK_ID", "1")
    assert checkpoint_for_rank(raw) == DEMO / "checkpoint/rank_1/checkpoint_1.safetensors"
    assert not (tmp_path / "out").exists()


def test_api_auto_trans_false_refuses_a_mismatch(tmp_path):
    raw = {**demo_job(tmp_path, model_parallel=2), "auto_trans_ckpt": False}
    with pytest.raises(AutotransError, match="does not match the destination layout and auto_trans_ckpt is false"):
        checkpoint_for_rank(raw, 0)
    assert run("demo.yaml", f"output_dir={tmp_path / 'check'}", "auto_trans_ckpt=false") == 1


def test_api_rejects_a_rank_outside_the_layout(tmp_path):
    with pytest.raises(AutotransError, match="rank 4 is not a destination rank"):
        checkpoint_for_rank(demo_job(tmp_path, model_parallel=2, pipeline_stage=2), 4)
