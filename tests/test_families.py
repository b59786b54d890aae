"""The families added as templates (issue 16): tiny transformers models built from a
config go HF -> MindSpore Transformers' names -> HF bit for bit, with the names
MindSpore Transformers stores (HF -> Megatron -> HF is in test_convert_roundtrip, the
megatron-core oracle in test_convert_mcore)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.convert_util import hf_tensors, make_hf, run

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
}


@pytest.mark.parametrize("family", sorted(MF_NAMES))
def test_hf_to_mindformers_names_and_back_is_bit_identical(tmp_path, family):
    hf = make_hf(tmp_path / "hf", family)
    assert run(load_checkpoint=str(hf), output_format="mindformers", use_parallel=False, output_dir=str(tmp_path / "mf")) == 0
    mf_file = tmp_path / "mf" / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors"
    mf, src = load_file(mf_file), hf_tensors(hf)
    assert len(mf) == len(src)
    for hf_name, mf_name in MF_NAMES[family].items():
        assert torch.equal(mf[mf_name], src[hf_name]), mf_name
    assert run(load_checkpoint=str(mf_file), output_format="hf", reference_hf_dir=str(hf), output_dir=str(tmp_path / "h")) == 0
    back = hf_tensors(tmp_path / "h" / "transformed_checkpoint")
    assert sorted(back) == sorted(src)
    assert all(torch.equal(back[k].view(torch.int16), src[k].view(torch.int16)) for k in src)
