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


QWEN25_72B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568,
              "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
              "tie_word_embeddings": False, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
              "rope_theta": 1000000.0, "torch_dtype": "bfloat16"}


def test_a_72b_interleaved_fuse_is_a_few_strided_links(tmp_path):
    """Qwen2.5-72B with qkv_concat: w_gate_hidden interleaves 29568 gate and up rows per
    layer, w_qkv 8 query groups of [q; k; v]. The map holds one strided link per fused
    part (not one per row or group), so its size does not grow with the rows; the
    recipes' blocks are the interleavings convert_utils' ffn_concat_hf2mg and
    qkv_concat_hf2mg describe (gate row i is row 2i, up row i is row 2i + 1)."""
    import json

    from runner.convert.model import read_hf_config
    from runner.convert.names import scheme_map, scheme_tensors
    from runner.convert.rows import Block
    from runner.formats.base import TensorInfo

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_72B))
    spec = read_hf_config(tmp_path)[1].with_job(QKV_CONCAT)
    m = scheme_map(spec, "hf", "mindformers")
    per_layer = 3 + 3 + 2 + 1 + 1 + 2  # w_qkv weight and bias, w_gate_hidden, wo, w2, two norms
    assert len(m.links) == 80 * per_layer + 3  # + embedding, final norm, lm_head
    hf = {n: TensorInfo("BF16", s) for n, s in m.hf_shapes.items()}
    infos, recipes = scheme_tensors(spec, "mindformers", hf)
    p = "model.layers.7."
    gh = recipes[p + "feed_forward.w_gate_hidden.weight"]
    assert infos[p + "feed_forward.w_gate_hidden.weight"].shape == (2 * 29568, 8192)
    assert gh.blocks == (Block(p + "mlp.gate_proj.weight", 0, 1, at=0, times=29568, step=1, at_step=2),
                         Block(p + "mlp.up_proj.weight", 0, 1, at=1, times=29568, step=1, at_step=2))
    q_rows, kv_rows = 64 * 128 // 8, 128  # rows of one query group: 8 q heads, 1 k head, 1 v head
    group = q_rows + 2 * kv_rows
    assert recipes[p + "attention.w_qkv.weight"].blocks == (
        Block(p + "self_attn.q_proj.weight", 0, q_rows, at=0, times=8, step=q_rows, at_step=group),
        Block(p + "self_attn.k_proj.weight", 0, kv_rows, at=q_rows, times=8, step=kv_rows, at_step=group),
        Block(p + "self_attn.v_proj.weight", 0, kv_rows, at=q_rows + kv_rows, times=8, step=kv_rows, at_step=group))
    assert sum(len(r.blocks) for r in recipes.values()) == len(m.links)
    megatron = scheme_map(spec, "hf", "megatron")
    assert len(megatron.links) < 20 * 80


def test_strided_links_build_the_interleaving_and_refuse_gaps_and_doubles():
    """Gate and up rows interleaved by two strided links: any box of the result equals
    numpy's interleaving; a link one repetition short, or two links on the same rows,
    is refused naming the first bad row."""
    import numpy as np

    from runner.convert.rows import Link, forward
    from runner.errors import PlanError
    from runner.formats.base import TensorInfo
    from runner.layout import Box

    rng = np.random.default_rng(5)
    gate, up = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    a = {"g": TensorInfo("F32", (5, 3)), "u": TensorInfo("F32", (5, 3))}
    b = {"gu": TensorInfo("F32", (10, 3))}
    links = [Link("g", 0, "gu", 0, 1, times=5, a_step=1, b_step=2), Link("u", 0, "gu", 1, 1, times=5, a_step=1, b_step=2)]
    recipe = forward(links, [], a, b, {})["gu"]
    want = np.stack([gate, up], 1).reshape(10, 3)
    fetch = {"g": gate.view(np.uint32), "u": up.view(np.uint32)}.__getitem__
    for box in (Box((0, 0), (10, 3)), Box((3, 1), (4, 2)), Box((9, 0), (1, 3))):
        assert np.array_equal(recipe.region(box, fetch).view(np.float32), want[box.slices()])
    with pytest.raises(PlanError, match=r"leaves row 9 of gu \(10 rows\)"):
        forward([links[0], links[1]._replace(times=4)], [], a, b, {})
    with pytest.raises(PlanError, match="leaves row 0 of gu"):
        forward([links[0], links[0]._replace(a="u")], [], a, b, {})


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
