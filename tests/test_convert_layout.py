"""Megatron shards checked against Megatron's documented layout, computed here
independently with torch: QKV fused per query group, fc1 as [gate_shard; up_shard],
vocab padded to a multiple of make_vocab_size_divisible_by x TP with copies of the
last row, column / row splits, file and key names, args fields."""

from __future__ import annotations

import math

import pytest
import torch

from tests.convert_util import FAMILIES, hf_tensors, make_hf, megatron_files, run


def expected_shards(hf: dict, family: str, tp: int, pp: int, impl: str) -> dict[str, dict]:
    c = FAMILIES[family]
    h, nh, ng, L, V = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["num_hidden_layers"], c["vocab_size"]
    hd = h // nh
    Vp = math.ceil(V / (128 * tp)) * 128 * tp
    per = L // pp

    def pad(w):
        return torch.cat([w, w[-1:].expand(Vp - V, -1)])

    def qkv(kind):
        p = "model.layers.{}.self_attn.{}_proj." + kind
        return lambda i: torch.cat([hf[p.format(i, "q")].reshape(ng, nh // ng * hd, -1),
                                    hf[p.format(i, "k")].reshape(ng, hd, -1),
                                    hf[p.format(i, "v")].reshape(ng, hd, -1)], dim=1).reshape(ng * (nh // ng + 2) * hd, -1).squeeze(-1)

    out = {}
    for s in range(pp):
        for t in range(tp):
            name = f"mp_rank_{t:02d}" + (f"_{s:03d}" if pp > 1 else "")
            m = {}
            for j in range(per):
                i = s * per + j
                g = f"decoder.layers.{j}."
                m[g + "self_attention.linear_qkv.weight"] = qkv("weight")(i).chunk(tp)[t]
                if family == "qwen2":
                    m[g + "self_attention.linear_qkv.bias"] = qkv("bias")(i).chunk(tp)[t]
                m[g + "self_attention.linear_proj.weight"] = hf[f"model.layers.{i}.self_attn.o_proj.weight"].chunk(tp, 1)[t]
                gate, up = hf[f"model.layers.{i}.mlp.gate_proj.weight"], hf[f"model.layers.{i}.mlp.up_proj.weight"]
                m[g + "mlp.linear_fc1.weight"] = torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]])
                m[g + "mlp.linear_fc2.weight"] = hf[f"model.layers.{i}.mlp.down_proj.weight"].chunk(tp, 1)[t]
                n1, n2 = hf[f"model.layers.{i}.input_layernorm.weight"], hf[f"model.layers.{i}.post_attention_layernorm.weight"]
                if impl == "transformer_engine":
                    m[g + "self_attention.linear_qkv.layer_norm_weight"] = n1
                    m[g + "mlp.linear_fc1.layer_norm_weight"] = n2
                else:
                    m[g + "input_layernorm.weight"] = n1
                    m[g + "pre_mlp_layernorm.weight"] = n2
            if s == 0:
                m["embedding.word_embeddings.weight"] = pad(hf["model.embed_tokens.weight"]).chunk(tp)[t]
            if s == pp - 1:
                m["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
                if not c["tie_word_embeddings"]:
                    m["output_layer.weight"] = pad(hf["lm_head.weight"]).chunk(tp)[t]
                elif pp > 1:  # Megatron-Core: the last stage holds its own copy
                    m["output_layer.weight"] = pad(hf["model.embed_tokens.weight"]).chunk(tp)[t]
            out[name] = m
    return out


@pytest.mark.parametrize("family,tp,pp,impl", [
    ("llama", 2, 2, "transformer_engine"), ("llama", 4, 1, "local"), ("qwen2", 2, 2, "local"), ("qwen2", 1, 1, "transformer_engine"),
])
def test_shards_follow_megatron_layout(tmp_path, family, tp, pp, impl):
    hf = make_hf(tmp_path / "hf", family)
    assert run(load_checkpoint=str(hf), output_format="megatron", parallel_config=dict(model_parallel=tp, pipeline_stage=pp),
               transformer_impl=impl, iteration=20, output_dir=str(tmp_path / "m")) == 0
    out = tmp_path / "m" / "transformed_checkpoint"
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "20"
    files = megatron_files(out)
    assert all((out / "iter_0000020" / name / "model_optim_rng.pt").is_file() for name in files)
    want = expected_shards(hf_tensors(hf), family, tp, pp, impl)
    assert sorted(files) == sorted(want)
    c = FAMILIES[family]
    for name, doc in files.items():
        model = doc["model"]
        weights = {k: v for k, v in model.items() if not k.endswith("._extra_state")}
        assert sorted(weights) == sorted(want[name]), name
        for k, v in want[name].items():
            assert weights[k].dtype == v.dtype and torch.equal(weights[k], v), (name, k)
        assert all(model[k] is None for k in model if k.endswith("._extra_state"))
        assert doc["checkpoint_version"] == 3.0 and doc["iteration"] == 20
        a = doc["args"]
        assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (tp, pp)
        assert (a.num_layers, a.hidden_size, a.ffn_hidden_size) == (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"])
        assert (a.num_attention_heads, a.num_query_groups, a.group_query_attention) == (c["num_attention_heads"], c["num_key_value_heads"], True)
        assert a.padded_vocab_size == math.ceil(c["vocab_size"] / (128 * tp)) * 128 * tp and a.vocab_size == c["vocab_size"]
        assert a.untie_embeddings_and_output_weights == (not c["tie_word_embeddings"])
        assert a.add_qkv_bias == (family == "qwen2") and a.swiglu and a.normalization == "RMSNorm"
        assert a.transformer_impl == impl and a.bf16 and a.params_dtype == torch.bfloat16


def test_mixtral_experts_over_expert_parallel(tmp_path):
    """mp_rank_TT_PPP_EEE files; each holds its local experts, numbered from 0."""
    hf = make_hf(tmp_path / "hf", "mixtral")
    src = hf_tensors(hf)
    assert run(load_checkpoint=str(hf), output_format="megatron", parallel_config=dict(model_parallel=2, pipeline_stage=2, expert_parallel=2),
               output_dir=str(tmp_path / "m")) == 0
    files = megatron_files(tmp_path / "m" / "transformed_checkpoint")
    assert sorted(files) == sorted(f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2))
    for t in range(2):
        for e in range(2):
            m = files[f"mp_rank_{t:02d}_001_{e:03d}"]["model"]  # stage 1 holds global layer 1 as local layer 0
            for j in range(2):
                x = f"model.layers.1.block_sparse_moe.experts.{e * 2 + j}."
                fc1 = m[f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc1.weight"]
                assert torch.equal(fc1, torch.cat([src[x + "w1.weight"].chunk(2)[t], src[x + "w3.weight"].chunk(2)[t]]))
                fc2 = m[f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc2.weight"]
                assert torch.equal(fc2, src[x + "w2.weight"].chunk(2, 1)[t])
            assert torch.equal(m["decoder.layers.0.mlp.router.weight"], src["model.layers.1.block_sparse_moe.gate.weight"])
            # MoE layers keep pre_mlp_layernorm even with TransformerEngine
            assert torch.equal(m["decoder.layers.0.pre_mlp_layernorm.weight"], src["model.layers.1.post_attention_layernorm.weight"])
            assert files[f"mp_rank_{t:02d}_001_{e:03d}"]["args"].num_experts == 4


def test_legacy_names(tmp_path):
    hf = make_hf(tmp_path / "hf", "llama")
    src = hf_tensors(hf)
    assert run(load_checkpoint=str(hf), output_format="megatron", megatron_naming="legacy", output_dir=str(tmp_path / "m")) == 0
    lm = megatron_files(tmp_path / "m" / "transformed_checkpoint")["mp_rank_00"]["model"]["language_model"]
    assert torch.equal(lm["embedding"]["word_embeddings"]["weight"][:300], src["model.embed_tokens.weight"])
    assert torch.equal(lm["encoder"]["layers.2.self_attention.dense.weight"], src["model.layers.2.self_attn.o_proj.weight"])
    assert torch.equal(lm["encoder"]["layers.0.input_norm.weight"], src["model.layers.0.input_layernorm.weight"])
    assert torch.equal(lm["encoder"]["final_norm.weight"], src["model.norm.weight"])
    assert torch.equal(lm["output_layer"]["weight"][:300], src["lm_head.weight"])
    assert "layers.3.mlp.dense_h_to_4h.weight" in lm["encoder"]
