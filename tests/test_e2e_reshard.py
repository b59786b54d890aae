"""End to end through the CLI: full -> distributed, distributed -> distributed and
distributed -> full on a small Llama-shaped checkpoint, every output tensor compared with
torch slices of the full tensors computed by tests/oracle.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import oracle

H, FFN, VOCAB, LAYERS = 8, 12, 16, 2


def llama_specs(dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    specs = {"model.embed_tokens.weight": ((VOCAB, H), dtype), "model.norm.weight": ((H,), dtype), "lm_head.weight": ((VOCAB, H), dtype)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for w in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs[p + f"self_attn.{w}.weight"] = ((H, H), dtype)
        specs[p + "mlp.gate_proj.weight"] = ((FFN, H), dtype)
        specs[p + "mlp.up_proj.weight"] = ((FFN, H), dtype)
        specs[p + "mlp.down_proj.weight"] = ((H, FFN), dtype)
        specs[p + "input_layernorm.weight"] = ((H,), dtype)
    return specs


def layout_dp2_tp2_pp2(specs) -> dict:
    """Megatron-like: stage 0 embeds + layer 0, stage 1 layer 1 + head; opt shard on MLPs."""
    dev = [2, 2]
    params = {}
    for name, (shape, dtype) in specs.items():
        stage = 1 if (".1." in name or name.startswith(("lm_head", "model.norm"))) else 0
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")) or "embed" in name or "lm_head" in name:
            tmap = [0, -1]  # column / vocab parallel
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            tmap = [-1, 0]  # row parallel
        else:
            tmap = [-1]
        opt = 2 if "mlp" in name else 1
        params[name] = oracle.param(shape, dtype, stage=stage, dev_matrix=dev, tensor_map=tmap, opt_shard=opt)
    return oracle.strategy([[0, 1, 2, 3], [4, 5, 6, 7]], params)


def layout_tp4_multi_axis(specs) -> dict:
    """One stage of 4 ranks as dev_matrix [2, 2]; 2-D weights split over both axes."""
    params = {}
    for name, (shape, dtype) in specs.items():
        tmap = [[1, 0], -1] if len(shape) == 2 and shape[0] % 4 == 0 else [-1] * len(shape)
        params[name] = oracle.param(shape, dtype, dev_matrix=[2, 2], tensor_map=tmap)
    return oracle.strategy([[0, 1, 2, 3]], params)


def autotrans(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def write_job(tmp: Path, **keys) -> Path:
    job = tmp / "job.yaml"
    job.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
    return job


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "I32"])
def test_split_reshard_merge(tmp_path: Path, dtype: str) -> None:
    specs = llama_specs(dtype)
    full = oracle.random_full(specs, seed=1)
    save_file(full, str(tmp_path / "full.safetensors"))
    a = layout_dp2_tp2_pp2(specs)
    b = layout_tp4_multi_axis(specs)
    oracle.write_strategy(a, tmp_path / "strategy_a")
    oracle.write_strategy(b, tmp_path / "strategy_b")

    # full -> distributed
    job = write_job(tmp_path, load_checkpoint="full.safetensors", dst_strategy_path_or_dir="strategy_a", output_dir="out_a")
    r = autotrans("run", str(job), "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    oracle.check_output(tmp_path / "out_a/transformed_checkpoint", full, a)
    strategy_files = sorted(p.name for p in (tmp_path / "out_a/strategy").iterdir())
    assert strategy_files == sorted([f"ckpt_strategy_rank_{i}.json" for i in range(8)] + ["merged_ckpt_strategy.json"])
    manifest = json.loads((tmp_path / "out_a/transformed_checkpoint/autotrans.json").read_text())
    assert len(manifest["files"]) == 8

    # distributed -> distributed, from a source written by the oracle (not by the runner)
    src = oracle.write_distributed(full, a, tmp_path / "src_a")
    r = autotrans("run", str(job), f"load_checkpoint={src}", f"src_strategy_path_or_dir={src.parent / 'strategy'}",
                  "dst_strategy_path_or_dir=strategy_b", "output_dir=out_b", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    oracle.check_output(tmp_path / "out_b/transformed_checkpoint", full, b)

    # distributed -> full
    r = autotrans("run", str(job), f"load_checkpoint={src}", f"src_strategy_path_or_dir={src.parent / 'strategy'}",
                  "dst_strategy_path_or_dir=", "use_parallel=false", "output_dir=out_full", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    merged = load_file(str(tmp_path / "out_full/transformed_checkpoint/rank_0/checkpoint_0.safetensors"))
    assert sorted(merged) == sorted(full)
    assert all(oracle.same_bits(merged[n], full[n]) for n in full)


def test_worker_processes_write_the_same_bytes(tmp_path: Path) -> None:
    specs = llama_specs("BF16")
    full = oracle.random_full(specs, seed=2)
    save_file(full, str(tmp_path / "full.safetensors"))
    oracle.write_strategy(layout_dp2_tp2_pp2(specs), tmp_path / "s")
    job = write_job(tmp_path, load_checkpoint="full.safetensors", dst_strategy_path_or_dir="s")
    for n, out in ((1, "one"), (3, "three"), ("auto", "auto")):
        r = autotrans("run", str(job), f"output_dir={out}", f"transform_process_num={n}", "--no-progress", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    for i in range(8):
        rel = f"transformed_checkpoint/rank_{i}/checkpoint_{i}.safetensors"
        one = (tmp_path / "one" / rel).read_bytes()
        assert one == (tmp_path / "three" / rel).read_bytes() == (tmp_path / "auto" / rel).read_bytes()


def test_dtype_cast_rounds_like_torch(tmp_path: Path) -> None:
    full = oracle.random_full({"w": ((4, 6), "F32"), "step": ((1,), "I64")}, seed=3)
    save_file(full, str(tmp_path / "full.safetensors"))
    job = write_job(tmp_path, load_checkpoint="full.safetensors", use_parallel=False, dtype="bf16")
    r = autotrans("run", str(job), "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = load_file(str(tmp_path / "output/transformed_checkpoint/rank_0/checkpoint_0.safetensors"))
    assert oracle.same_bits(got["w"], full["w"].to(torch.bfloat16))
    assert oracle.same_bits(got["step"], full["step"])  # integers are never cast


def test_matching_layout_copies_nothing_and_check_mode(tmp_path: Path) -> None:
    specs = llama_specs("F16")
    full = oracle.random_full(specs)
    a = layout_dp2_tp2_pp2(specs)
    src = oracle.write_distributed(full, a, tmp_path / "src", prefix="checkpoint_")
    job = write_job(tmp_path, load_checkpoint=str(src), src_strategy_path_or_dir=str(src.parent / "strategy"),
                    dst_strategy_path_or_dir=str(src.parent / "strategy"), output_dir="out")
    r = autotrans("run", str(job), "--no-progress", cwd=tmp_path)
    assert r.returncode == 0 and "nothing to do" in r.stderr
    assert not (tmp_path / "out").exists()
    # auto_trans_ckpt: false only checks: match -> 0, mismatch -> 1; writes nothing
    r = autotrans("run", str(job), "auto_trans_ckpt=false", cwd=tmp_path)
    assert r.returncode == 0 and "already matches" in r.stderr
    oracle.write_strategy(layout_tp4_multi_axis(specs), tmp_path / "b")
    r = autotrans("run", str(job), "auto_trans_ckpt=false", "dst_strategy_path_or_dir=b", cwd=tmp_path)
    assert r.returncode == 1 and "does not match" in r.stderr
    assert not (tmp_path / "out").exists()


def test_rerun_of_a_complete_job_is_skipped_and_other_folders_refused(tmp_path: Path) -> None:
    full = oracle.random_full({"w": ((4, 4), "F32")})
    save_file(full, str(tmp_path / "full.safetensors"))
    oracle.write_strategy(oracle.strategy([[0, 1]], {"w": oracle.param((4, 4), dev_matrix=[2], tensor_map=[0, -1])}), tmp_path / "s")
    job = write_job(tmp_path, load_checkpoint="full.safetensors", dst_strategy_path_or_dir="s")
    assert autotrans("run", str(job), cwd=tmp_path).returncode == 0
    r = autotrans("run", str(job), cwd=tmp_path)
    assert r.returncode == 0 and "already holds this job's complete output" in r.stderr
    foreign = tmp_path / "foreign/transformed_checkpoint"
    foreign.mkdir(parents=True)
    (foreign / "precious.txt").write_text("keep me")
    r = autotrans("run", str(job), "output_dir=foreign", cwd=tmp_path)
    assert r.returncode == 2 and "not written by autotrans" in r.stderr
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_verify_names_the_first_differing_tensor(tmp_path: Path) -> None:
    specs = llama_specs("BF16")
    full = oracle.random_full(specs, seed=4)
    save_file(full, str(tmp_path / "full.safetensors"))
    oracle.write_strategy(layout_dp2_tp2_pp2(specs), tmp_path / "s")
    job = write_job(tmp_path, load_checkpoint="full.safetensors", dst_strategy_path_or_dir="s", verify=True)
    r = autotrans("run", str(job), "--no-progress", cwd=tmp_path)
    assert r.returncode == 0 and "bit-identical" in r.stdout, r.stdout + r.stderr
    out = tmp_path / "output/transformed_checkpoint"
    r = autotrans("verify", "full.safetensors", str(out), cwd=tmp_path)
    assert r.returncode == 0 and "bit-identical" in r.stdout
    # flip one element of one tensor on rank 5 (stage 1)
    path = out / "rank_5/checkpoint_5.safetensors"
    shard = load_file(str(path))
    name = "model.layers.1.mlp.down_proj.weight"
    shard[name] = shard[name].clone()
    shard[name][0, 1] += 1
    save_file(shard, str(path))
    r = autotrans("verify", "full.safetensors", str(out), cwd=tmp_path)
    assert r.returncode == 1
    assert name in r.stdout.splitlines()[0], r.stdout
