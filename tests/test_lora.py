"""LoRA merge (SPEC 7) end to end through the CLI.

Oracles: numpy (exact float64 merge, with round-to-nearest-even written here), PEFT's
merge_and_unload on tiny random transformers models built from a config, and the
runner's own plain split for "a distributed merge equals the full merge followed by
the same split" (the split itself is checked against torch slicing in test_e2e_reshard)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from runner.cli import main
from tests import oracle

H, FFN, VOCAB, R = 8, 16, 32, 4


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # job files use paths relative to the working folder


def run(tmp: Path, capsys, **keys) -> tuple[int, str]:
    job = tmp / "job.yaml"
    job.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
    code = main(["run", str(job), "--no-progress"])
    return code, capsys.readouterr().err


def merged_file(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "transformed_checkpoint/rank_0/checkpoint_0.safetensors"))


def rne_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (finite values)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def as_f64(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float64).numpy()


# -- numpy oracle -------------------------------------------------------------------------
def write_peft_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return folder


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_merge_matches_numpy_exactly(tmp_path: Path, capsys, dtype: str) -> None:
    """Values chosen so the merge is exact in float32: the only rounding left is the
    final one to the base dtype, which must be round-to-nearest-even."""
    rng = np.random.default_rng(0)
    tdt = oracle.DTYPES[dtype]
    base = {
        "model.layers.0.self_attn.q_proj.weight": torch.from_numpy(rng.integers(-64, 64, (H, H)) / 16).to(tdt),
        "model.layers.0.mlp.down_proj.weight": torch.from_numpy(rng.integers(-64, 64, (H, FFN)) / 16).to(tdt),
        "model.norm.weight": torch.from_numpy(rng.integers(-64, 64, (H,)) / 16).to(tdt),
    }
    save_file(base, str(tmp_path / "base.safetensors"))
    lora = {}
    for mod, (out, inp) in (("model.layers.0.self_attn.q_proj", (H, H)), ("model.layers.0.mlp.down_proj", (H, FFN))):
        lora[f"base_model.model.{mod}.lora_A.weight"] = torch.from_numpy(rng.integers(-3, 4, (R, inp)).astype(np.float32))
        lora[f"base_model.model.{mod}.lora_B.weight"] = torch.from_numpy(rng.integers(-3, 4, (out, R)).astype(np.float32))
    write_peft_adapter(tmp_path / "adapter", lora, r=R, lora_alpha=2)  # scaling 0.5
    code, err = run(tmp_path, capsys, load_checkpoint="base.safetensors", use_parallel=False,
                    lora={"adapter": "adapter"}, output_dir="out")
    assert code == 0, err
    got = merged_file(tmp_path / "out")
    assert sorted(got) == sorted(base)
    assert torch.equal(got["model.norm.weight"].view(torch.uint8), base["model.norm.weight"].view(torch.uint8))
    for mod in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        a = as_f64(lora[f"base_model.model.{mod}.lora_A.weight"])
        b = as_f64(lora[f"base_model.model.{mod}.lora_B.weight"])
        exact = as_f64(base[mod + ".weight"]) + 0.5 * (b @ a)
        assert np.all(exact.astype(np.float32) == exact)  # the premise: exact in fp32
        out = got[mod + ".weight"]
        assert out.dtype == tdt
        if dtype == "BF16":
            assert np.array_equal(out.view(torch.int16).numpy().view(np.uint16), rne_bf16(exact.astype(np.float32)))
        else:
            assert np.array_equal(out.numpy(), exact.astype(out.numpy().dtype))


def test_scaling_override_and_random_values(tmp_path: Path, capsys) -> None:
    """lora.scaling wins over adapter_config.json; random fp32 values within fp32 error."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(FFN, H, generator=g)
    a, b = torch.randn(R, H, generator=g), torch.randn(FFN, R, generator=g)
    save_file({"w.weight": w}, str(tmp_path / "base.safetensors"))
    write_peft_adapter(tmp_path / "ad", {"w.lora_A.weight": a, "w.lora_B.weight": b}, r=R, lora_alpha=16)
    code, err = run(tmp_path, capsys, load_checkpoint="base.safetensors", use_parallel=False,
                    lora={"adapter": "ad/adapter_model.safetensors", "scaling": 0.3}, output_dir="out")
    assert code == 0, err
    want = as_f64(w) + 0.3 * (as_f64(b) @ as_f64(a))
    np.testing.assert_allclose(merged_file(tmp_path / "out")["w.weight"].numpy(), want, rtol=1e-6, atol=1e-6)


# -- PEFT oracle ---------------------------------------------------------------------------
def peft_case(tmp: Path, model: torch.nn.Module, lora_config, retrain: str = "") -> dict[str, torch.Tensor]:
    """Save base and adapter the way users do; return PEFT's merged state dict.
    `retrain`: a base weight the adapter saves whole, changed after the base was saved."""
    import peft
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(base, str(tmp / "base.safetensors"))
    model.save_pretrained(str(tmp / "base_hf"))  # an HF folder: config.json + model.safetensors
    pm = peft.get_peft_model(model, lora_config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:  # PEFT zeroes B (or embedding A) at init: make every factor count
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name == retrain:
                p.add_(1.0)
    pm.save_pretrained(str(tmp / "adapter"))
    merged = pm.merge_and_unload().state_dict()
    return {k: v.detach() for k, v in merged.items()}


def check_against_peft(tmp: Path, capsys, want: dict[str, torch.Tensor], base_path: str = "base.safetensors") -> None:
    code, err = run(tmp, capsys, load_checkpoint=base_path, use_parallel=False,
                    lora={"adapter": "adapter"}, output_dir="out")
    assert code == 0, err
    got = merged_file(tmp / "out")
    base = load_file(str(tmp / "base.safetensors"))
    assert sorted(got) == sorted(base) == sorted(want)
    changed = 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(got[name], base[name])
    assert changed >= 2


def tiny_llama():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def test_peft_llama(tmp_path: Path, capsys) -> None:
    import peft
    want = peft_case(tmp_path, tiny_llama(), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    check_against_peft(tmp_path, capsys, want, base_path="base_hf")
    # merging while converting (SPEC 7: `output_format: hf` and Megatron) gives the same tensors
    core = merged_file(tmp_path / "out")
    code, err = run(tmp_path, capsys, load_checkpoint="base_hf", lora={"adapter": "adapter"}, output_format="hf", output_dir="hf")
    assert code == 0, err
    assert_same(load_file(str(tmp_path / "hf/transformed_checkpoint/model-00001-of-00001.safetensors")), core)
    code, err = run(tmp_path, capsys, load_checkpoint="base_hf", lora={"adapter": "adapter"}, output_format="megatron",
                    parallel_config={"model_parallel": 2, "pipeline_stage": 2}, output_dir="mg")
    assert code == 0, err
    code, err = run(tmp_path, capsys, load_checkpoint="mg/transformed_checkpoint", output_format="hf",
                    reference_hf_dir="base_hf", output_dir="back")
    assert code == 0, err
    assert_same(load_file(str(tmp_path / "back/transformed_checkpoint/model-00001-of-00001.safetensors")), core)
    code, err = run(tmp_path, capsys, load_checkpoint="mg/transformed_checkpoint", lora={"adapter": "adapter"},
                    output_format="hf", reference_hf_dir="base_hf", output_dir="refused")
    assert code == 2 and "convert the Megatron checkpoint to HF first" in err, err


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name


def test_peft_llama_rslora_patterns_and_embeddings(tmp_path: Path, capsys) -> None:
    import peft
    want = peft_case(tmp_path, tiny_llama(), peft.LoraConfig(
        r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 5}),
        retrain="base_model.model.model.embed_tokens.base_layer.weight")
    keys = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
    assert any("lora_embedding_A" in k for k in keys)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys  # PEFT's save_embedding_layers
    check_against_peft(tmp_path, capsys, want)


def test_peft_gpt2_fan_in_fan_out(tmp_path: Path, capsys) -> None:
    import transformers
    import peft
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64))
    want = peft_case(tmp_path, model, peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"]))
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["fan_in_fan_out"]
    check_against_peft(tmp_path, capsys, want)


# -- MindFormers names, distributed ---------------------------------------------------------
LORA_TARGETS = {  # base weight -> (shape, source tensor_map of W, of lora_a, of lora_b)
    "attention.wq": ((H, H), [0, -1], [-1, -1], [0, -1]),  # column parallel, B sharded with W
    "attention.wo": ((H, H), [-1, 0], [-1, 0], [-1, -1]),  # row parallel, A sharded with W
    "feed_forward.w1": ((FFN, H), [0, -1], [-1, -1], [-1, -1]),  # B replicated + opt shard: gathered
    "feed_forward.w2": ((H, FFN), [-1, 0], [0, -1], [-1, -1]),  # A split on its rank dim: gathered
}


def mindformers_model(dtype: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Base + LoRA tensors in one full checkpoint; a dp2 x tp2 source layout that also
    names the LoRA weights; a two-stage tp2 destination layout for the base only."""
    specs, src, dst = {}, {}, {}
    specs["model.tok_embeddings.embedding_weight"] = ((VOCAB, H), dtype)
    src["model.tok_embeddings.embedding_weight"] = oracle.param((VOCAB, H), dtype, dev_matrix=[2, 2], tensor_map=[0, -1])
    dst["model.tok_embeddings.embedding_weight"] = oracle.param((VOCAB, H), dtype, stage=0, dev_matrix=[2], tensor_map=[-1, 0])
    for i in range(2):
        for mod, (shape, tw, ta, tb) in LORA_TARGETS.items():
            p = f"model.layers.{i}.{mod}"
            specs[p + ".weight"] = (shape, dtype)
            specs[p + ".tk_delta_lora_a"] = ((R, shape[1]), "F32")
            specs[p + ".tk_delta_lora_b"] = ((shape[0], R), "F32")
            src[p + ".weight"] = oracle.param(shape, dtype, dev_matrix=[2, 2], tensor_map=tw)
            src[p + ".tk_delta_lora_a"] = oracle.param((R, shape[1]), "F32", dev_matrix=[2, 2], tensor_map=ta)
            src[p + ".tk_delta_lora_b"] = oracle.param((shape[0], R), "F32", dev_matrix=[2, 2], tensor_map=tb,
                                                       opt_shard=2 if mod == "feed_forward.w1" else 1)
            dst[p + ".weight"] = oracle.param(shape, dtype, stage=i, dev_matrix=[2], tensor_map=[-1, 0] if i == 0 else [0, -1])
        specs[f"model.layers.{i}.attention_norm.weight"] = ((H,), dtype)
        src[f"model.layers.{i}.attention_norm.weight"] = oracle.param((H,), dtype, dev_matrix=[2, 2])
        dst[f"model.layers.{i}.attention_norm.weight"] = oracle.param((H,), dtype, stage=i, dev_matrix=[2])
    full = oracle.random_full(specs, seed=3)
    return full, oracle.strategy([[0, 1, 2, 3]], src), oracle.strategy([[0, 1], [2, 3]], dst)


def test_distributed_merge_equals_full_merge_then_split(tmp_path: Path, capsys) -> None:
    full, src, dst = mindformers_model("BF16")
    base_names = sorted(n for n in full if "lora" not in n)
    opt_state = {"adam_m.model.layers.0.attention.wq.tk_delta_lora_a": torch.zeros(R, H)}
    save_file({**full, **opt_state}, str(tmp_path / "full.safetensors"))
    ckpt = oracle.write_distributed(full, src, tmp_path / "dist")
    oracle.write_strategy(dst, tmp_path / "dst_strategy")

    # full checkpoint with LoRA inside -> merged full file; scaling from the MindFormers YAML
    code, err = run(tmp_path, capsys, load_checkpoint="full.safetensors", use_parallel=False, lora={}, output_dir="m",
                    model={"model_config": {"pet_config": {"pet_type": "lora", "lora_rank": R, "lora_alpha": 3}}})
    assert code == 0, err
    assert "optimizer states of LoRA weights are dropped" in err
    merged = merged_file(tmp_path / "m")
    assert sorted(merged) == base_names
    for name in base_names:
        if name.endswith("embedding_weight") or "norm" in name:
            assert oracle.same_bits(merged[name], full[name])
            continue
        p = name.removesuffix(".weight")
        exact = as_f64(full[name]) + 0.75 * (as_f64(full[p + ".tk_delta_lora_b"]) @ as_f64(full[p + ".tk_delta_lora_a"]))
        got = merged[name].to(torch.float64).numpy()
        assert np.all(np.abs(got - exact) <= 2.0 ** -8 * np.abs(exact) + 1e-30), name  # within half a bf16 ulp
        assert not oracle.same_bits(merged[name], full[name])

    # the same merge from the distributed checkpoint, straight to another layout
    code, err = run(tmp_path, capsys, load_checkpoint=str(ckpt), src_strategy_path_or_dir=str(ckpt.parent / "strategy"),
                    dst_strategy_path_or_dir="dst_strategy", lora={"scaling": 0.75}, output_dir="d")
    assert code == 0, err
    # the full merge, split by the plain (non-LoRA) path
    code, err = run(tmp_path, capsys, load_checkpoint="m/transformed_checkpoint/rank_0/checkpoint_0.safetensors",
                    dst_strategy_path_or_dir="dst_strategy", output_dir="c")
    assert code == 0, err
    for r in range(4):
        rel = f"transformed_checkpoint/rank_{r}/checkpoint_{r}.safetensors"
        assert (tmp_path / "d" / rel).read_bytes() == (tmp_path / "c" / rel).read_bytes(), rel
    for f in (tmp_path / "d/strategy").iterdir():
        assert "lora" not in f.read_text()

    # distributed -> full, in two worker processes: the same bytes as the full merge
    code, err = run(tmp_path, capsys, load_checkpoint=str(ckpt), src_strategy_path_or_dir=str(ckpt.parent / "strategy"),
                    use_parallel=False, lora={"scaling": 0.75}, output_dir="f", transform_process_num=2)
    assert code == 0, err
    rel = "transformed_checkpoint/rank_0/checkpoint_0.safetensors"
    assert (tmp_path / "f" / rel).read_bytes() == (tmp_path / "m" / rel).read_bytes()


# -- errors ---------------------------------------------------------------------------------
def error_case(tmp: Path, capsys, lora_tensors: dict[str, torch.Tensor], **section) -> tuple[int, str]:
    save_file({"m.weight": torch.zeros(H, FFN), "n.weight": torch.zeros(H)}, str(tmp / "base.safetensors"))
    write_peft_adapter(tmp / "ad", lora_tensors, r=R, lora_alpha=R)
    code, err = run(tmp, capsys, load_checkpoint="base.safetensors", use_parallel=False,
                    lora={"adapter": "ad", **section}, output_dir="out")
    assert not (tmp / "out/transformed_checkpoint/rank_0").exists()
    assert len(err.strip().splitlines()) == 1, err
    return code, err


@pytest.mark.parametrize("a_shape,b_shape,message", [
    ((R, FFN), (H, R - 1), "rank mismatch, A base_model.model.m.lora_A.weight has shape [4, 16] and B base_model.model.m.lora_B.weight has shape [8, 3]"),
    ((R, FFN + 1), (H, R), "LoRA pair for m.weight: B @ A gives shape [8, 17] but the base weight has shape [8, 16]"),
])
def test_shape_errors(tmp_path: Path, capsys, a_shape, b_shape, message) -> None:
    code, err = error_case(tmp_path, capsys, {"base_model.model.m.lora_A.weight": torch.zeros(a_shape),
                                              "base_model.model.m.lora_B.weight": torch.zeros(b_shape)})
    assert code == 1 and message in err, err


def test_missing_base_weight(tmp_path: Path, capsys) -> None:
    code, err = error_case(tmp_path, capsys, {"base_model.model.x.q.lora_A.weight": torch.zeros(R, H),
                                              "base_model.model.x.q.lora_B.weight": torch.zeros(H, R)})
    assert code == 1 and "targets base weight x.q.weight, which load_checkpoint does not hold" in err, err


def test_half_a_pair(tmp_path: Path, capsys) -> None:
    code, err = error_case(tmp_path, capsys, {"base_model.model.m.lora_A.weight": torch.zeros(R, FFN)})
    assert code == 1 and "has no matching B weight" in err, err


def test_config_errors(tmp_path: Path, capsys) -> None:
    code, err = error_case(tmp_path, capsys, {}, scalng=2)
    assert code == 2 and "config key lora.scalng is unknown; did you mean lora.scaling?" in err, err
    code, err = error_case(tmp_path, capsys, {}, scaling="big")
    assert code == 2 and "config key lora.scaling: expected" in err, err
    save_file({"m.tk_delta_lora_a": torch.zeros(R, FFN), "m.tk_delta_lora_b": torch.zeros(H, R)}, str(tmp_path / "l.safetensors"))
    code, err = error_case(tmp_path, capsys, {}, adapter="l.safetensors")
    assert code == 2 and "set lora.scaling" in err, err
