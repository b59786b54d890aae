"""The families added as templates (issue 16): tiny transformers models built from a
config go HF -> MindSpore Transformers' names -> HF bit for bit, with the names
MindSpore Transformers stores, and megatron-core loads the Megatron output of the MoE
families strictly (HF -> Megatron -> HF is in test_convert_roundtrip, the dense
families' megatron-core oracle in test_convert_mcore)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.convert_util import FAMILIES, hf_tensors, legacy_deepseek_v3, logits, make_hf, run
from tests.test_convert_mcore import IDS, forward, mcore_cpu  # noqa: F401  (mcore_cpu: a fixture)

# HF name -> MindSpore Transformers' name, written from its weight loaders' mappings
MF_NAMES = {
    "qwen3": {
        "model.embed_tokens.weight": "embedding.word_embeddings.weight",
        "model.layers.1.self_attn.q_proj.weight": "decoder.layers.1.self_attention.linear_q.weight",
        "model.layers.1.self_attn.k_norm.weight": "decoder.layers.1.self_attention.k_layernorm.weight",
        "model.layers.0.mlp.up_proj.weight": "decoder.layers.0.mlp.hidden.weight",
        "model.layers.0.mlp.gate_proj.weight": "decoder.layers.0.mlp.gating.weight",
        "model.layers.2.post_attention_layernorm.weight": "decoder.layers.2.pre_mlp_layernorm.weight",
        "model.norm.weight": "decoder.final_layernorm.weight",
        "lm_head.weight": "output_layer.weight",
    },
    "glm4": {  # its Glm4 weight_mapping
        "model.embed_tokens.weight": "embedding.word_embeddings.weight",
        "model.layers.0.self_attn.q_proj.bias": "decoder.layers.0.self_attention.linear_q.bias",
        "model.layers.3.self_attn.k_proj.weight": "decoder.layers.3.self_attention.linear_k.weight",
        "model.layers.1.mlp.gate_up_proj.weight": "decoder.layers.1.mlp.linear_fc1.weight",
        "model.layers.1.post_attention_layernorm.weight": "decoder.layers.1.pre_mlp_layernorm.weight",
        "model.layers.2.post_self_attn_layernorm.weight": "decoder.layers.2.post_self_attn_layernorm.weight",
        "model.layers.2.post_mlp_layernorm.weight": "decoder.layers.2.post_mlp_layernorm.weight",
        "lm_head.weight": "output_layer.weight",
    },
    "qwen3_moe": {  # its 1.7 Qwen3-MoE weight_mapping (mindformers/models/qwen3_moe/utils.py, v1.7.0)
        "model.layers.1.self_attn.q_norm.weight": "decoder.layers.1.self_attention.q_layernorm.weight",
        "model.layers.1.self_attn.v_proj.weight": "decoder.layers.1.self_attention.linear_v.weight",
        "model.layers.0.mlp.gate.weight": "decoder.layers.0.mlp.router.weight",
        "model.layers.0.mlp.experts.3.gate_proj.weight": "decoder.layers.0.mlp.experts.3.gating.weight",
        "model.layers.1.mlp.experts.0.up_proj.weight": "decoder.layers.1.mlp.experts.0.hidden.weight",
        "model.layers.1.mlp.experts.2.down_proj.weight": "decoder.layers.1.mlp.experts.2.linear_fc2.weight",
        "model.layers.1.post_attention_layernorm.weight": "decoder.layers.1.pre_mlp_layernorm.weight",
        "lm_head.weight": "output_layer.weight",
    },
    # MindSpore Transformers 1.7's DeepseekV3 weight_mapping (mindformers/models/deepseek3/utils.py,
    # v1.7.0, commit 8ccc49b) for the main model; the MTP layer as its training graph's
    # MultiTokenPredictionBlock names it (mtp.layers.{i}.enorm / hnorm / eh_proj / final_layernorm /
    # transformer_layer.*; its embedding and head are the main model's, so the HF copies are not stored)
    "deepseek_v3": {
        "model.embed_tokens.weight": "embedding.word_embeddings.weight",
        "model.layers.0.input_layernorm.weight": "decoder.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_a_proj.weight": "decoder.layers.0.self_attention.linear_q_down_proj.weight",
        "model.layers.0.self_attn.q_a_layernorm.weight": "decoder.layers.0.self_attention.q_layernorm.weight",
        "model.layers.1.self_attn.q_b_proj.weight": "decoder.layers.1.self_attention.linear_q_up_proj.weight",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight": "decoder.layers.1.self_attention.linear_kv_down_proj.weight",
        "model.layers.2.self_attn.kv_a_layernorm.weight": "decoder.layers.2.self_attention.kv_layernorm.weight",
        "model.layers.2.self_attn.kv_b_proj.weight": "decoder.layers.2.self_attention.linear_kv_up_proj.weight",
        "model.layers.3.self_attn.o_proj.weight": "decoder.layers.3.self_attention.linear_proj.weight",
        "model.layers.0.mlp.gate_proj.weight": "decoder.layers.0.mlp.gating.weight",
        "model.layers.0.mlp.up_proj.weight": "decoder.layers.0.mlp.hidden.weight",
        "model.layers.0.mlp.down_proj.weight": "decoder.layers.0.mlp.linear_fc2.weight",
        "model.layers.1.post_attention_layernorm.weight": "decoder.layers.1.pre_mlp_layernorm.weight",
        "model.layers.1.mlp.gate.weight": "decoder.layers.1.mlp.router.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias": "decoder.layers.1.mlp.router.expert_bias",
        "model.layers.2.mlp.experts.3.gate_proj.weight": "decoder.layers.2.mlp.experts.3.gating.weight",
        "model.layers.2.mlp.experts.0.up_proj.weight": "decoder.layers.2.mlp.experts.0.hidden.weight",
        "model.layers.3.mlp.experts.1.down_proj.weight": "decoder.layers.3.mlp.experts.1.linear_fc2.weight",
        "model.layers.3.mlp.shared_experts.gate_proj.weight": "decoder.layers.3.mlp.shared_experts.gating.weight",
        "model.layers.3.mlp.shared_experts.up_proj.weight": "decoder.layers.3.mlp.shared_experts.hidden.weight",
        "model.layers.3.mlp.shared_experts.down_proj.weight": "decoder.layers.3.mlp.shared_experts.linear_fc2.weight",
        "model.norm.weight": "decoder.final_layernorm.weight",
        "lm_head.weight": "output_layer.weight",
        "model.layers.4.enorm.weight": "mtp.layers.0.enorm.weight",
        "model.layers.4.hnorm.weight": "mtp.layers.0.hnorm.weight",
        "model.layers.4.eh_proj.weight": "mtp.layers.0.eh_proj.weight",
        "model.layers.4.shared_head.norm.weight": "mtp.layers.0.final_layernorm.weight",
        "model.layers.4.self_attn.q_a_proj.weight": "mtp.layers.0.transformer_layer.self_attention.linear_q_down_proj.weight",
        "model.layers.4.mlp.gate.e_score_correction_bias": "mtp.layers.0.transformer_layer.mlp.router.expert_bias",
        "model.layers.4.mlp.experts.2.gate_proj.weight": "mtp.layers.0.transformer_layer.mlp.experts.2.gating.weight",
    },
    # without q_lora_rank: MLASelfAttention's linear_q_proj
    "deepseek_v3_q_proj": {
        "model.layers.1.self_attn.q_proj.weight": "decoder.layers.1.self_attention.linear_q_proj.weight",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight": "decoder.layers.1.self_attention.linear_kv_down_proj.weight",
    },
}
# the MTP layers' copies of the embedding and the output head, which MindSpore Transformers shares
MTP_COPY = re.compile(r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.")


@pytest.mark.parametrize("family", sorted(MF_NAMES))
def test_hf_to_mindformers_names_and_back_is_bit_identical(tmp_path, family):
    hf = make_hf(tmp_path / "hf", family)
    assert run(load_checkpoint=str(hf), output_format="mindformers", use_parallel=False, output_dir=str(tmp_path / "mf")) == 0
    mf_file = tmp_path / "mf" / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors"
    mf, src = load_file(mf_file), hf_tensors(hf)
    assert len(mf) == len([n for n in src if not MTP_COPY.match(n)])
    for hf_name, mf_name in MF_NAMES[family].items():
        assert torch.equal(mf[mf_name], src[hf_name]), mf_name
    assert run(load_checkpoint=str(mf_file), output_format="hf", reference_hf_dir=str(hf), output_dir=str(tmp_path / "h")) == 0
    back = hf_tensors(tmp_path / "h" / "transformed_checkpoint")
    assert sorted(back) == sorted(src)
    assert all(torch.equal(back[k].view(torch.int16), src[k].view(torch.int16)) for k in src)


def test_hf_to_mindformers_legacy_deepseek_v3_and_back_is_bit_identical(tmp_path):
    """model.naming: mindformers_legacy writes MindSpore Transformers 1.5's DeepSeek-V3 names
    and values (the split and de-interleaved MLA projections computed here with torch, as its
    converter does); the legacy file is recognised by its names and converts back bit for bit."""
    hf = make_hf(tmp_path / "hf", "deepseek_v3")
    assert run(load_checkpoint=str(hf), output_format="mindformers", use_parallel=False, output_dir=str(tmp_path / "mf"),
               model={"naming": "mindformers_legacy"}) == 0
    mf_file = tmp_path / "mf" / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors"
    mf, src = load_file(mf_file), hf_tensors(hf)
    expected = legacy_deepseek_v3(src, FAMILIES["deepseek_v3"])
    assert sorted(mf) == sorted(expected)
    for name, t in expected.items():
        assert mf[name].dtype == t.dtype and torch.equal(mf[name], t), name
    assert run(load_checkpoint=str(mf_file), output_format="hf", reference_hf_dir=str(hf), output_dir=str(tmp_path / "h")) == 0
    back = hf_tensors(tmp_path / "h" / "transformed_checkpoint")
    assert sorted(back) == sorted(src)
    assert all(back[k].dtype == src[k].dtype and torch.equal(back[k], src[k]) for k in src)


def test_deepseek_v3_without_q_lora_rank_has_no_legacy_names(tmp_path):
    """MindSpore Transformers 1.5's DeepSeek-V3 always has q2l_proj (q_lora_rank): a model with
    one q_proj is refused in one line rather than written without its query."""
    from runner.errors import ConfigError

    hf = make_hf(tmp_path / "hf", "deepseek_v3_q_proj")
    with pytest.raises(ConfigError, match="weight q has no 'mindformers_legacy' name") as e:
        run(load_checkpoint=str(hf), output_format="mindformers", use_parallel=False, output_dir=str(tmp_path / "mf"),
            model={"naming": "mindformers_legacy"})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("naming", ["megatron", "mindformers_new"])
def test_mindformers_output_naming_is_one_of_the_templates_mindformers_schemes(tmp_path, naming):
    from runner.errors import ConfigError

    hf = make_hf(tmp_path / "hf", "deepseek_v3_q_proj")
    with pytest.raises(ConfigError, match=f"model.naming: output_format mindformers writes template deepseek_v3's "
                                          f"mindformers or mindformers_legacy names, not '{naming}'"):
        run(load_checkpoint=str(hf), output_format="mindformers", use_parallel=False, output_dir=str(tmp_path / "mf"),
            model={"naming": naming})


def test_a_part_that_does_not_fill_its_fused_weight_is_a_template_error(tmp_path):
    """Cutting q_b_proj / kv_b_proj into the parts the legacy names store needs the parts to
    be the whole weight: a template whose parts are short is refused in one line."""
    from runner.errors import ConfigError
    from runner.templates import TEMPLATE_DIR

    text = (TEMPLATE_DIR / "deepseek_v3.yaml").read_text()
    short = "shape: [num_heads * v_head_dim // 2, kv_lora_rank]"
    (tmp_path / "ds.yaml").write_text(text.replace("shape: [num_heads * v_head_dim, kv_lora_rank]", short, 1))
    hf = make_hf(tmp_path / "hf", "deepseek_v3")
    with pytest.raises(ConfigError, match="weight kv_up .* is not 4 groups of whole blocks of its parts, so k_up cannot be cut") as e:
        run(load_checkpoint=str(hf), output_format="mindformers", use_parallel=False, output_dir=str(tmp_path / "mf"),
            model={"arch": str(tmp_path / "ds.yaml"), "naming": "mindformers_legacy"})
    assert "\n" not in str(e.value)


def test_mindformers_legacy_grouped_gemm_deepseek_v3_is_refused_in_one_line(tmp_path):
    """MindSpore Transformers 1.5's converter with grouped GEMM stores each layer's routed
    experts as ffn.w1 [experts, hidden, 2 * ffn] (gate and up transposed, side by side), which
    no row mapping expresses: such a file is refused naming that tensor, nothing written."""
    from runner.errors import FormatError
    from safetensors.torch import save_file

    hf = make_hf(tmp_path / "hf", "deepseek_v3")
    legacy = legacy_deepseek_v3(hf_tensors(hf), FAMILIES["deepseek_v3"])
    p = "model.layers.1.feed_forward.routed_experts."
    w1, w3 = legacy.pop(p + "ffn.w1.weight"), legacy.pop(p + "ffn.w3.weight")
    legacy[p + "ffn.w1"] = torch.cat([w1.transpose(1, 2), w3.transpose(1, 2)], -1).contiguous()
    legacy[p + "ffn.w2"] = legacy.pop(p + "ffn.w2.weight").transpose(1, 2).contiguous()
    legacy[p + "router_dense.weight"] = legacy.pop(p + "router.dense.weight")
    legacy[p + "topk_bias"] = legacy.pop(p + "router.router.topk_bias")
    save_file(legacy, str(tmp_path / "gmm.safetensors"))
    with pytest.raises(FormatError, match=r"holds model\.layers\.1\.feed_forward\.routed_experts\.ffn\.w1, which is not a "
                                          "mindformers_legacy name") as err:
        run(load_checkpoint=str(tmp_path / "gmm.safetensors"), output_format="hf", reference_hf_dir=str(hf),
            output_dir=str(tmp_path / "h"))
    assert "\n" not in str(err.value) and not (tmp_path / "h" / "transformed_checkpoint").exists()


class CausalAttention(torch.nn.Module):
    """Causal softmax attention for MLA on the CPU, where megatron-core's local
    DotProductAttention refuses MLA's separate key and value head sizes."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, k_channels=None,
                 v_channels=None, **_):
        super().__init__()
        self.scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [s, b, heads, d] -> [b, heads, s, d]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


# megatron-core settings of each MoE family's routing (the weights say nothing of it)
MOE_ROUTING = {
    # softmax over all experts before top-k, no renormalisation; a shared expert with a sigmoid gate
    "qwen2_moe": dict(moe_router_pre_softmax=True, moe_shared_expert_gate=True),
    # norm_topk_prob: top-k of the logits, softmax over those k (= renormalised probabilities); q/k norms
    "qwen3_moe": dict(moe_router_pre_softmax=False, qk_layernorm=True),
}


@pytest.mark.parametrize("family", sorted(MOE_ROUTING))
def test_moe_megatron_output_loads_strict_into_gpt_model_and_matches_transformers(tmp_path, mcore_cpu, monkeypatch, family):
    """Routed experts (and a shared expert where the family has one): megatron-core's MoE
    layer on the CPU (local spec, the allgather dispatcher) gives transformers' logits."""
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)  # its router reads this TransformerEngine hook
    c, routing = FAMILIES[family], MOE_ROUTING[family]
    hf = make_hf(tmp_path / "hf", family, dtype=torch.float32)
    assert run(load_checkpoint=str(hf), output_format="megatron", transformer_impl="local", output_dir=str(tmp_path / "m")) == 0
    doc = torch.load(tmp_path / "m" / "transformed_checkpoint" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    a = doc["args"]
    cfg = TransformerConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads, num_query_groups=a.num_query_groups, kv_channels=a.kv_channels,
        normalization="RMSNorm", layernorm_epsilon=c["rms_norm_eps"], gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=a.add_qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32, use_cpu_initialization=True,
        num_moe_experts=a.num_experts, moe_ffn_hidden_size=a.moe_ffn_hidden_size, moe_router_topk=a.moe_router_topk,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_shared_expert_intermediate_size=a.moe_shared_expert_intermediate_size,
        moe_token_dispatcher_type="allgather", **routing)
    spec = get_gpt_layer_local_spec(num_experts=a.num_experts, moe_grouped_gemm=False, qk_layernorm=cfg.qk_layernorm)
    model = GPTModel(cfg, spec, vocab_size=a.padded_vocab_size, max_sequence_length=64, position_embedding_type="rope",
                     rotary_base=int(a.rotary_base), share_embeddings_and_output_weights=False)
    assert sorted(doc["model"]) == sorted(model.state_dict())
    result = model.load_state_dict(doc["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    got = forward(model)[..., : c["vocab_size"]]
    want = logits(hf, family, torch.tensor(IDS))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key,value", [("mlp_only_layers", [1]), ("decoder_sparse_step", 2)])
def test_qwen3_moe_dense_layers_are_refused_naming_the_key(tmp_path, key, value):
    """Layers with a dense MLP among the MoE layers are a layout the template does not
    name: the conversion stops with a one-line error naming the config.json key."""
    import json

    from runner.errors import ConfigError

    hf = make_hf(tmp_path / "hf", "qwen3_moe")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ConfigError) as e:
        run(load_checkpoint=str(hf), output_format="megatron", output_dir=str(tmp_path / "m"))
    assert f"config.json.{key}: {value!r}" in str(e.value) and "qwen3_moe" in str(e.value) and "\n" not in str(e.value)


def test_glm4_megatron_output_loads_strict_into_gpt_model_and_matches_transformers(tmp_path, mcore_cpu):
    """GLM-4 in GPTModel (local spec): q/k/v biases, gate_up_proj as fc1, rotary on the first
    half of each head with interleaved pairs (rotary_interleaved, rotary_percent 0.5, q and k
    rows as HF has them). Megatron-Core 0.16's TransformerLayer has no sandwich norms: the
    test gives each layer post_self_attn_layernorm and post_mlp_layernorm modules (norms of
    the attention and MLP outputs, applied by forward hooks), which the checkpoint fills."""
    import copy

    from tests.test_convert_mcore import gpt_from_args

    c = FAMILIES["glm4"]
    hf = make_hf(tmp_path / "hf", "glm4", dtype=torch.float32)
    assert run(load_checkpoint=str(hf), output_format="megatron", transformer_impl="local", output_dir=str(tmp_path / "m")) == 0
    doc = torch.load(tmp_path / "m" / "transformed_checkpoint" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    model = gpt_from_args(doc["args"], c["rms_norm_eps"], config={"rotary_interleaved": True}, rotary_percent=0.5)
    for layer in model.decoder.layers:
        for module, norm_name in ((layer.self_attention, "post_self_attn_layernorm"), (layer.mlp, "post_mlp_layernorm")):
            norm = copy.deepcopy(layer.input_layernorm)
            setattr(layer, norm_name, norm)
            module.register_forward_hook(lambda _m, _i, out, norm=norm: (norm(out[0]), out[1]))
    assert sorted(doc["model"]) == sorted(model.state_dict())
    result = model.load_state_dict(doc["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    got = forward(model)[..., : c["vocab_size"]]
    want = logits(hf, "glm4", torch.tensor(IDS))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def deepseek_gpt_model(c: dict, padded_vocab: int, monkeypatch):
    """DeepSeek-V3 of config `c` (transformers' keys) as megatron-core's GPTModel, local
    spec, built on the CPU with its MTP layer (MLA's attention by CausalAttention)."""
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    import megatron.core.transformer.multi_latent_attention as mla

    monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)
    monkeypatch.setattr(mla, "HAVE_TE", False)  # its TELinear check runs whenever TE's name imports
    layers, dense = c["num_hidden_layers"], c["first_k_dense_replace"]
    cfg = MLATransformerConfig(
        num_layers=layers, hidden_size=c["hidden_size"], ffn_hidden_size=c["intermediate_size"],
        num_attention_heads=c["num_attention_heads"], normalization="RMSNorm", layernorm_epsilon=c["rms_norm_eps"],
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, params_dtype=torch.float32, use_cpu_initialization=True,
        multi_latent_attention=True, q_lora_rank=c["q_lora_rank"], kv_lora_rank=c["kv_lora_rank"],
        qk_head_dim=c["qk_nope_head_dim"], qk_pos_emb_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"],
        rope_type="rope", qk_layernorm=True,
        num_moe_experts=c["n_routed_experts"], moe_ffn_hidden_size=c["moe_intermediate_size"],
        moe_router_topk=c["num_experts_per_tok"], moe_layer_freq=[0] * dense + [1] * (layers - dense),
        moe_shared_expert_intermediate_size=c["n_shared_experts"] * c["moe_intermediate_size"],
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5,
        moe_router_num_groups=c["n_group"], moe_router_group_topk=c["topk_group"], moe_router_dtype="fp32",
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather",
        mtp_num_layers=c["num_nextn_predict_layers"])
    block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    for spec in block.layer_specs:  # megatron-core 0.16's local attention takes no k_channels (MLA's)
        spec.submodules.self_attention.submodules.core_attention = CausalAttention
    return GPTModel(cfg, block, vocab_size=padded_vocab, max_sequence_length=64, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False,
                    mtp_block_spec=get_gpt_mtp_block_spec(cfg, block.layer_specs[-1], use_transformer_engine=False))


def main_model_logits(model) -> torch.Tensor:
    """The main model's logits (the MTP layer needs labels)."""
    model.mtp_process, model.config.mtp_num_layers = False, None
    return forward(model)


def test_deepseek_v3_megatron_output_loads_strict_into_gpt_model_and_matches_transformers(tmp_path, mcore_cpu, monkeypatch):
    """DeepSeek-V3 in GPTModel (local spec, built on the CPU): MLA with q / kv LoRA ranks
    (its rotary de-interleaves the rope dims itself, as HF's rope_interleave), one dense layer then MoE layers (sigmoid router with expert
    bias, group-limited top-k, renormalised and scaled, a shared expert), and the MTP
    layer, whose weights (mtp.layers.0.*) load strictly too. The logits are the main
    model's, which transformers gives."""
    c = FAMILIES["deepseek_v3"]
    hf = make_hf(tmp_path / "hf", "deepseek_v3", dtype=torch.float32)
    assert run(load_checkpoint=str(hf), output_format="megatron", transformer_impl="local", output_dir=str(tmp_path / "m")) == 0
    doc = torch.load(tmp_path / "m" / "transformed_checkpoint" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    model = deepseek_gpt_model(c, doc["args"].padded_vocab_size, monkeypatch)
    assert sorted(doc["model"]) == sorted(model.state_dict())
    result = model.load_state_dict(doc["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    want = logits(hf, "deepseek_v3", torch.tensor(IDS))
    got = main_model_logits(model)[..., : c["vocab_size"]]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_tensor_parallel_files_and_round_trip(tmp_path, ep):
    """TP 2 with expert_tensor_parallel 1: Megatron-LM saves the ranks whose expert-data-
    parallel rank is 0; rank q of a stage is tensor-parallel rank q % 2 and expert-parallel
    rank q (etp 1), so the files are mp_rank_{q % 2}_{q} for q < ep, each with its half
    of the dense weights and its experts whole. Megatron -> HF is bit for bit."""
    from tests.convert_util import megatron_files

    c = FAMILIES["qwen3_moe"]
    hf = make_hf(tmp_path / "hf", "qwen3_moe")
    src = hf_tensors(hf)
    par = {"model_parallel": 2, "expert_parallel": ep, "expert_tensor_parallel": 1}
    assert run(load_checkpoint=str(hf), output_format="megatron", parallel_config=par, output_dir=str(tmp_path / "m")) == 0
    files = megatron_files(tmp_path / "m" / "transformed_checkpoint")
    assert sorted(files) == sorted(f"mp_rank_{q % 2:02d}_{q:03d}" for q in range(ep))
    local = c["num_experts"] // ep
    for q in range(ep):
        m, half = files[f"mp_rank_{q % 2:02d}_{q:03d}"]["model"], q % 2
        o = src["model.layers.1.self_attn.o_proj.weight"]
        assert torch.equal(m["decoder.layers.1.self_attention.linear_proj.weight"], o.chunk(2, dim=1)[half])
        for j in range(local):
            p = f"model.layers.1.mlp.experts.{q * local + j}."
            fc1 = torch.cat([src[p + "gate_proj.weight"], src[p + "up_proj.weight"]])
            assert torch.equal(m[f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc1.weight"], fc1)
            assert torch.equal(m[f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc2.weight"], src[p + "down_proj.weight"])
        assert files[f"mp_rank_{q % 2:02d}_{q:03d}"]["args"].expert_tensor_parallel_size == 1
    assert run(load_checkpoint=str(tmp_path / "m" / "transformed_checkpoint"), output_format="hf", reference_hf_dir=str(hf),
               output_dir=str(tmp_path / "h")) == 0
    back = hf_tensors(tmp_path / "h" / "transformed_checkpoint")
    assert sorted(back) == sorted(src) and all(torch.equal(back[k].view(torch.int16), src[k].view(torch.int16)) for k in src)


def test_expert_tensor_parallel_megatron_files_cannot_hold_is_refused(tmp_path):
    from runner.errors import ConfigError

    hf = make_hf(tmp_path / "hf", "qwen3_moe")
    with pytest.raises(ConfigError, match="parallel_config.expert_tensor_parallel"):
        run(load_checkpoint=str(hf), output_format="megatron", output_dir=str(tmp_path / "m"),
            parallel_config={"model_parallel": 2, "expert_parallel": 1, "expert_tensor_parallel": 1})


def _mf_strategy_job(family: str, arch: str, **model_config):
    from runner import config

    c = FAMILIES[family]
    return config.from_mapping({"only_save_strategy": True, "output_format": "mindformers", "model": {
        "arch": arch, "model_config": {**{k: v for k, v in c.items() if k not in ("cls", "model")}, **model_config}}})


@pytest.mark.parametrize("family,arch,hint", [
    ("qwen3_moe", "Qwen3MoeForCausalLM", "grouped, as the training graph does, where model_config sets moe_grouped_gemm"),
    ("deepseek_v3", "DeepseekV3ForCausalLM", "no MindSpore layout is generated for them")])
def test_moe_mindspore_layout_of_per_expert_names_is_refused_not_guessed(family, arch, hint):
    """Qwen3-MoE's (without moe_grouped_gemm) and DeepSeek-V3's MindFormers names are their
    weight loaders' (one tensor per expert); the training graphs group the experts
    (experts.weight1 / weight2): a MindSpore strategy is refused rather than given other names."""
    from runner.errors import ConfigError
    from runner.generate import generate

    with pytest.raises(ConfigError, match=f"{family} names MindSpore Transformers' experts one tensor each") as e:
        generate(_mf_strategy_job(family, arch), None)
    assert hint in str(e.value) and "\n" not in str(e.value)


def test_mindformers_legacy_deepseek_v3_strategy_splits_attention_as_its_model_shards_it():
    """A strategy in MindSpore Transformers 1.5's DeepSeek-V3 names: the MLA projections split
    as research/deepseek3's attention shards them (l2q_* and lkv2kv_* (mp, 1), wo (1, mp),
    q2l_proj and kv2l_* whole), norms and the router in float32 as its model declares them."""
    from runner import config
    from runner.generate import generate

    c = FAMILIES["deepseek_v3"]
    mc = {**{k: v for k, v in c.items() if k not in ("cls", "model")}, "param_init_type": "bfloat16"}
    s = generate(config.from_mapping({"only_save_strategy": True, "parallel_config": {"model_parallel": 2}, "model": {
        "arch": "DeepseekV3ForCausalLM", "naming": "mindformers_legacy", "model_config": mc}}), None)
    a = "model.layers.1.attention."
    split = {a + n: ((0,), ()) for n in ("l2q_nope_proj.weight", "l2q_pe_proj.weight", "lkv2kv_k_nope.weight", "lkv2kv_v.weight")}
    split.update({a + n: ((), ()) for n in ("q2l_proj.weight", "kv2l_latent_kv.weight", "kv2l_k_pe.weight")})
    split[a + "wo.weight"] = ((), (0,))
    assert {n: tuple(s.params[n].tensor_map) for n in split} == split  # per dim, the device axes (0: mp)
    r = "model.layers.1.feed_forward.routed_experts.router."
    dtypes = {n: s.params[n].dtype for n in (a + "wo.weight", a + "lq_norm.weight", "model.layers.1.ffn_norm.weight",
                                             r + "dense.weight", r + "router.topk_bias")}
    assert dtypes == {a + "wo.weight": "BF16", a + "lq_norm.weight": "F32", "model.layers.1.ffn_norm.weight": "F32",
                      r + "dense.weight": "F32", r + "router.topk_bias": "F32"}


def test_qwen3_moe_grouped_experts_layout_and_conversions_refused(tmp_path):
    """With moe_grouped_gemm (MindSpore Transformers 1.7's training graph) a strategy has the
    grouped experts and no per-expert tensor (tests/test_mindformers_fidelity.py checks the
    layout of a shipped YAML); a conversion to or from those names is refused in one line."""
    from runner.errors import ConfigError
    from runner.generate import generate

    c = FAMILIES["qwen3_moe"]
    e, h, f = c["num_experts"], c["hidden_size"], c["moe_intermediate_size"]
    s = generate(_mf_strategy_job("qwen3_moe", "Qwen3MoeForCausalLM", moe_grouped_gemm=True), None)
    p = "decoder.layers.1.mlp."
    mlp = {n[len(p):] for n in s.params if n.startswith(p)}
    assert mlp == {"router.weight", "router.fi_accu", "experts.weight1", "experts.weight2"}
    assert s.params[p + "experts.weight2"].shape == (e * f, h)
    hf = make_hf(tmp_path / "hf", "qwen3_moe")
    with pytest.raises(ConfigError, match="mlp.router.fi_accu is a tensor of MindSpore Transformers' training graph") as err:
        run(load_checkpoint=str(hf), output_format="mindformers", use_parallel=False, output_dir=str(tmp_path / "mf"),
            model={"model_config": {"moe_grouped_gemm": True}})
    assert "\n" not in str(err.value)


def test_deepseek_v3_casts_keep_the_float32_router_bias(tmp_path):
    """The template keeps e_score_correction_bias float32 under a `dtype:` cast (keep_dtype),
    as MindSpore Transformers, Megatron and DeepSeek keep it; the other weights are cast."""
    from safetensors import safe_open

    hf = make_hf(tmp_path / "hf", "deepseek_v3")
    bias, weight = "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.self_attn.o_proj.weight"
    jobs = {"tp2": dict(parallel_config={"model_parallel": 2}, dtype="fp16"),
            "merged": dict(use_parallel=False, dtype="fp16"),
            "hf": dict(output_format="hf", dtype="fp16")}
    for label, keys in jobs.items():
        assert run(load_checkpoint=str(hf), output_dir=str(tmp_path / f"out_{label}"), **keys) == 0
        out = tmp_path / f"out_{label}" / "transformed_checkpoint"
        seen = 0
        for f in sorted(out.glob("**/*.safetensors")):
            with safe_open(str(f), "pt") as st:
                if bias in st.keys():
                    assert st.get_slice(bias).get_dtype() == "F32", label
                    seen += 1
                if weight in st.keys():
                    assert st.get_slice(weight).get_dtype() == {"fp16": "F16", "bf16": "BF16"}[keys["dtype"]], label
        assert seen == (2 if label == "tp2" else 1)
    strategy = json.loads((tmp_path / "out_tp2" / "strategy" / "ckpt_strategy_rank_0.json").read_text())
    assert strategy["params"][bias]["dtype"] == "F32" and strategy["params"][weight]["dtype"] == "F16"
