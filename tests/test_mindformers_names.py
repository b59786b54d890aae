"""MindSpore Transformers' fused and stacked names convert through the templates' fuse
mechanism: qkv_concat's w_qkv (per query group [q_g; k_g; v_g], bias too) and
w_gate_hidden (gate and up rows interleaved), Mixtral's experts stacked on dim 0.
Expected tensors are built here with torch from the HF tensors, following the layouts
MindSpore Transformers documents in its convert_utils (qkv_concat_hf2mg, ffn_concat_hf2mg)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.convert_util import FAMILIES, hf_tensors, make_hf, megatron_files, run

QKV_CONCAT = {"model_config": {"qkv_concat": True}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: make_hf(root / f, f) for f in ("qwen2", "mixtral")}


def to_mindformers(tmp_path, hf, name: str, **keys) -> tuple:
    assert run(load_checkpoint=str(hf), output_format="mindformers", use_parallel=False, output_dir=str(tmp_path / name), **keys) == 0
    path = tmp_path / name / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors"
    return path, load_file(path)


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k


def test_qkv_concat_hf_mindformers_hf(models, tmp_path):
    hf = models["qwen2"]
    src = hf_tensors(hf)
    path, mf = to_mindformers(tmp_path, hf, "mf", model=QKV_CONCAT)
    spec = FAMILIES["qwen2"]
    groups = spec["num_key_value_heads"]
    for layer in range(spec["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for kind in ("weight", "bias"):
            q, k, v = (src[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv")
            tail = q.shape[1:]
            want = torch.cat([q.reshape(groups, -1, *tail), k.reshape(groups, -1, *tail), v.reshape(groups, -1, *tail)], 1)
            assert torch.equal(mf[p + f"attention.w_qkv.{kind}"], want.reshape(-1, *tail))
            assert p + f"attention.wq.{kind}" not in mf
        gate, up = src[p + "mlp.gate_proj.weight"], src[p + "mlp.up_proj.weight"]
        assert torch.equal(mf[p + "feed_forward.w_gate_hidden.weight"], torch.stack([gate, up], 1).reshape(-1, gate.shape[1]))
        assert torch.equal(mf[p + "feed_forward.w2.weight"], src[p + "mlp.down_proj.weight"])
    # per layer, q, k, v weights and biases and gate, up (8 tensors) are 3
    assert len(mf) == len(src) - 5 * spec["num_hidden_layers"]
    # and back: MindFormers fused names -> HF, bit for bit
    assert run(load_checkpoint=str(path), output_format="hf", reference_hf_dir=str(hf), model=QKV_CONCAT,
               output_dir=str(tmp_path / "h")) == 0
    assert_same(hf_tensors(tmp_path / "h" / "transformed_checkpoint"), src)


def test_qkv_concat_names_to_and_from_megatron(models, tmp_path):
    """MindFormers fused names -> Megatron TP2 equals HF -> Megatron; Megatron ->
    MindFormers fused names equals HF -> MindFormers."""
    hf = models["qwen2"]
    path, mf = to_mindformers(tmp_path, hf, "mf", model=QKV_CONCAT)
    par = dict(model_parallel=2, pipeline_stage=1)
    assert run(load_checkpoint=str(path), output_format="megatron", parallel_config=par, reference_hf_dir=str(hf),
               model=QKV_CONCAT, output_dir=str(tmp_path / "a")) == 0
    assert run(load_checkpoint=str(hf), output_format="megatron", parallel_config=par, output_dir=str(tmp_path / "b")) == 0
    a, b = megatron_files(tmp_path / "a" / "transformed_checkpoint"), megatron_files(tmp_path / "b" / "transformed_checkpoint")
    assert sorted(a) == sorted(b)
    for rank in b:
        assert sorted(a[rank]["model"]) == sorted(b[rank]["model"])
        for k, v in b[rank]["model"].items():
            assert (v is None and a[rank]["model"][k] is None) or torch.equal(v, a[rank]["model"][k]), k
    _, back = to_mindformers(tmp_path, tmp_path / "b" / "transformed_checkpoint", "mf2", model=QKV_CONCAT,
                             reference_hf_dir=str(hf))
    assert_same(back, mf)


def test_mixtral_stacked_experts_hf_mindformers_hf(models, tmp_path):
    hf = models["mixtral"]
    src = hf_tensors(hf)
    path, mf = to_mindformers(tmp_path, hf, "mf")
    experts = FAMILIES["mixtral"]["num_local_experts"]
    for layer in range(FAMILIES["mixtral"]["num_hidden_layers"]):
        for w in ("w1", "w2", "w3"):
            want = torch.stack([src[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"] for e in range(experts)])
            assert torch.equal(mf[f"model.layers.{layer}.feed_forward.ffn.{w}.weight"], want)
        assert torch.equal(mf[f"model.layers.{layer}.feed_forward.router.dense.weight"],
                           src[f"model.layers.{layer}.block_sparse_moe.gate.weight"])
    assert not any("experts" in n for n in mf)
    assert run(load_checkpoint=str(path), output_format="hf", reference_hf_dir=str(hf), output_dir=str(tmp_path / "h")) == 0
    assert_same(hf_tensors(tmp_path / "h" / "transformed_checkpoint"), src)


def test_mixtral_refuses_qkv_concat_it_does_not_model(models, tmp_path):
    from runner.errors import ConfigError
    from runner.templates import find

    assert "qkv_concat" not in find("mixtral").mentions() and "qkv_concat" in find("qwen2").mentions()
    with pytest.raises(ConfigError, match="model.model_config.qkv_concat: template mixtral"):
        run(load_checkpoint=str(models["mixtral"]), output_format="mindformers", use_parallel=False,
            model=QKV_CONCAT, output_dir=str(tmp_path / "mf"))


def test_qwen2_moe_shared_experts_hf_mindformers_hf(tmp_path):
    """Qwen2-MoE: routed experts stacked under routed_experts.ffn, the shared expert and its
    gate under shared_experts / shared_experts_gate (LlamaFeedForwardWithMoE's names)."""
    hf = make_hf(tmp_path / "hf", "qwen2_moe")
    src = hf_tensors(hf)
    path, mf = to_mindformers(tmp_path, hf, "mf")
    c = FAMILIES["qwen2_moe"]
    for layer in range(c["num_hidden_layers"]):
        p, f = f"model.layers.{layer}.mlp.", f"model.layers.{layer}.feed_forward."
        for hf_name, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            want = torch.stack([src[f"{p}experts.{e}.{hf_name}.weight"] for e in range(c["num_experts"])])
            assert torch.equal(mf[f"{f}routed_experts.ffn.{w}.weight"], want)
            assert torch.equal(mf[f"{f}shared_experts.{w}.weight"], src[f"{p}shared_expert.{hf_name}.weight"])
        assert torch.equal(mf[f"{f}routed_experts.router.dense.weight"], src[f"{p}gate.weight"])
        assert torch.equal(mf[f"{f}shared_experts_gate.weight"], src[f"{p}shared_expert_gate.weight"])
    assert run(load_checkpoint=str(path), output_format="hf", reference_hf_dir=str(hf), output_dir=str(tmp_path / "h")) == 0
    assert_same(hf_tensors(tmp_path / "h" / "transformed_checkpoint"), src)
