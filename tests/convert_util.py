"""Helpers for the conversion tests: tiny HF models built from a config (nothing
downloaded), jobs run in-process, and checkpoints read back with plain torch."""

from __future__ import annotations

import glob
import shutil
from pathlib import Path

import torch

from runner import config
from runner.dispatch import run_job

FAMILIES = {
    # Llama with GQA (8 heads, 4 query groups) and untied embeddings
    "llama": dict(cls="LlamaConfig", model="LlamaForCausalLM", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=300, tie_word_embeddings=False, rms_norm_eps=1e-6),
    # Qwen2: qkv bias, tied embeddings
    "qwen2": dict(cls="Qwen2Config", model="Qwen2ForCausalLM", hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=200, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "mixtral": dict(cls="MixtralConfig", model="MixtralForCausalLM", hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=150, num_local_experts=4, num_experts_per_tok=2,
                    tie_word_embeddings=False, rms_norm_eps=1e-6),
    # Qwen2-MoE: qkv bias, routed experts, a shared expert and its gate
    "qwen2_moe": dict(cls="Qwen2MoeConfig", model="Qwen2MoeForCausalLM", hidden_size=64, intermediate_size=96,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=150, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                      rms_norm_eps=1e-6),
    # Qwen3: per-head q and k norms (tests/test_templates.py describes it in its own template)
    # GPT-2: Conv1D weights [in, out], learned positions, LayerNorm with bias, tied embeddings
    "gpt2": dict(cls="GPT2Config", model="GPT2LMHeadModel", n_embd=64, n_layer=4, n_head=4, n_positions=32, vocab_size=300,
                 bos_token_id=0, eos_token_id=0, tie_word_embeddings=True),
    # Qwen3-MoE: Qwen3's attention, routed experts only, top-k probabilities renormalised
    "qwen3_moe": dict(cls="Qwen3MoeConfig", model="Qwen3MoeForCausalLM", hidden_size=64, intermediate_size=96,
                      moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      vocab_size=150, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False,
                      rms_norm_eps=1e-6),
    # GLM-4: q/k/v biases, fused gate_up_proj, sandwich norms, interleaved rotary on half of each head
    "glm4": dict(cls="Glm4Config", model="Glm4ForCausalLM", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=150, tie_word_embeddings=False,
                 rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=0),
    # DeepSeek-V3: MLA (q_lora_rank), 1 dense layer then MoE layers with a shared expert and a float32
    # router bias, and one MTP layer (model.layers.4.*), which transformers' model does not hold:
    # make_hf adds it as the released checkpoints store it
    "deepseek_v3": dict(cls="DeepseekV3Config", model="DeepseekV3ForCausalLM", hidden_size=64, intermediate_size=96,
                        moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                        vocab_size=150, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=2,
                        topk_group=1, num_nextn_predict_layers=1, tie_word_embeddings=False, rms_norm_eps=1e-6,
                        pad_token_id=0, bos_token_id=0, eos_token_id=0),
    # ... without q_lora_rank (as DeepSeek-V2-Lite): one q_proj; no MTP layer
    "deepseek_v3_q_proj": dict(cls="DeepseekV3Config", model="DeepseekV3ForCausalLM", hidden_size=64, intermediate_size=96,
                               moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                               vocab_size=150, n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2,
                               first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
                               qk_rope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, num_nextn_predict_layers=0,
                               tie_word_embeddings=False, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "qwen3": dict(cls="Qwen3Config", model="Qwen3ForCausalLM", hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=200, tie_word_embeddings=False,
                  rms_norm_eps=1e-6),
}


def make_hf(folder: Path, family: str, dtype=torch.bfloat16, seed: int = 0, **config) -> Path:
    """A tiny model of `family` (FAMILIES, `config` over its sizes) saved as an HF folder."""
    import transformers

    spec = {**FAMILIES[family], **config}
    cfg = getattr(transformers, spec.pop("cls"))(**{k: v for k, v in spec.items() if k != "model"})
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family]["model"])(cfg).to(dtype)
    with torch.no_grad():  # norms are ones and biases zeros at init: make them distinguishable
        for n, p in model.named_parameters():
            if "norm" in n or bool(torch.all(p == p.reshape(-1)[0])):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    if getattr(cfg, "num_nextn_predict_layers", 0):
        _add_mtp_layers(Path(folder), cfg, model, dtype)
    return Path(folder)


def _add_mtp_layers(folder: Path, cfg, model, dtype) -> None:
    """DeepSeek-V3's MTP layers as its released checkpoints store them after the last layer
    (model.layers.{num_layers + i}): a decoder layer (taken from a deeper model of the same
    config), enorm, hnorm, eh_proj, shared_head.norm, and copies of the embedding and head."""
    from safetensors.torch import load_file, save_file
    import transformers

    n, k = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    deeper = getattr(transformers, type(model).__name__)(type(cfg)(**{**cfg.to_dict(), "num_hidden_layers": n + k})).to(dtype)
    deeper.save_pretrained(folder / "deeper")  # per-expert names, as checkpoints store them
    layers = load_file(folder / "deeper" / "model.safetensors")
    shutil.rmtree(folder / "deeper")
    path = folder / "model.safetensors"
    tensors = load_file(path)
    h = cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    for layer in range(n, n + k):
        p = f"model.layers.{layer}."
        tensors.update({name: t for name, t in layers.items() if name.startswith(p)})
        tensors[p + "mlp.gate.e_score_correction_bias"] = torch.randn(cfg.n_routed_experts, generator=g)
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            tensors[p + norm + ".weight"] = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)
        tensors[p + "eh_proj.weight"] = (0.05 * torch.randn(h, 2 * h, generator=g)).to(dtype)
        tensors[p + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[p + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    for name in tensors:  # the router bias is float32 in the released checkpoints
        if name.endswith("e_score_correction_bias"):
            tensors[name] = tensors[name].float()
    save_file(tensors, str(path), metadata={"format": "pt"})


def legacy_deepseek_v3(src: dict[str, torch.Tensor], c: dict) -> dict[str, torch.Tensor]:
    """MindSpore Transformers 1.5's DeepSeek-V3 (research/deepseek3) of an HF state dict, as
    its convert_weight.py (v1.5.0) writes it without grouped GEMM: renamed, q_b_proj,
    kv_a_proj_with_mqa and kv_b_proj cut into their parts, each head's rope rows
    de-interleaved (even rows, then odd rows), routed experts stacked, the MTP layer's
    fusion weights renamed and its embedding and head copies left out."""
    heads, nope, rope, v_dim = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    layers, mtp, dense = c["num_hidden_layers"], c["num_nextn_predict_layers"], c["first_k_dense_replace"]
    out = {"model.tok_embeddings.embedding_weight": src["model.embed_tokens.weight"],
           "model.norm_out.weight": src["model.norm.weight"], "lm_head.weight": src["lm_head.weight"]}
    for i in range(layers + mtp):
        h, m = f"model.layers.{i}.", f"model.layers.{i}."
        attn = {"q_a_proj": "q2l_proj", "q_a_layernorm": "lq_norm", "kv_a_layernorm": "lkv_norm", "o_proj": "wo"}
        out.update({f"{m}attention.{b}.weight": src[f"{h}self_attn.{a}.weight"] for a, b in attn.items()})
        out[m + "attention_norm.weight"] = src[h + "input_layernorm.weight"]
        out[m + "ffn_norm.weight"] = src[h + "post_attention_layernorm.weight"]
        q_nope, q_rope = src[h + "self_attn.q_b_proj.weight"].reshape(heads, nope + rope, -1).split([nope, rope], dim=1)
        out[m + "attention.l2q_nope_proj.weight"] = q_nope.reshape(heads * nope, -1)
        out[m + "attention.l2q_pe_proj.weight"] = q_rope.reshape(heads, rope // 2, 2, -1).permute(0, 2, 1, 3).reshape(heads * rope, -1)
        latent, k_rope = src[h + "self_attn.kv_a_proj_with_mqa.weight"].split([c["kv_lora_rank"], rope], dim=0)
        out[m + "attention.kv2l_latent_kv.weight"] = latent
        out[m + "attention.kv2l_k_pe.weight"] = k_rope.reshape(rope // 2, 2, -1).permute(1, 0, 2).reshape(rope, -1)
        k_nope, v = src[h + "self_attn.kv_b_proj.weight"].reshape(heads, nope + v_dim, -1).split([nope, v_dim], dim=1)
        out[m + "attention.lkv2kv_k_nope.weight"] = k_nope.reshape(heads * nope, -1)
        out[m + "attention.lkv2kv_v.weight"] = v.reshape(heads * v_dim, -1)
        ffn = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
        if i < dense:
            out.update({f"{m}feed_forward.{b}.weight": src[f"{h}mlp.{a}.weight"] for a, b in ffn.items()})
            continue
        out.update({f"{m}feed_forward.shared_experts.{b}.weight": src[f"{h}mlp.shared_experts.{a}.weight"] for a, b in ffn.items()})
        out[m + "feed_forward.routed_experts.router.dense.weight"] = src[h + "mlp.gate.weight"]
        out[m + "feed_forward.routed_experts.router.router.topk_bias"] = src[h + "mlp.gate.e_score_correction_bias"]
        for a, b in ffn.items():
            out[f"{m}feed_forward.routed_experts.ffn.{b}.weight"] = torch.stack(
                [src[f"{h}mlp.experts.{e}.{a}.weight"] for e in range(c["n_routed_experts"])])
        if i >= layers:
            fusers = {"enorm": "norm_emb", "hnorm": "norm", "eh_proj": "dense"}
            out.update({f"model.mtp_hidden_fusers.{i - layers}.{b}.weight": src[f"{h}{a}.weight"] for a, b in fusers.items()})
            out[f"model.mtp_norms.{i - layers}.weight"] = src[h + "shared_head.norm.weight"]
    return out


def run(**keys) -> int:
    return run_job(config.from_mapping(keys), show_progress=False)


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(str(Path(folder) / "*.safetensors"))):
        out.update(load_file(f))
    return out


def megatron_files(folder: Path) -> dict[str, dict]:
    """Every rank file of a Megatron output, by its folder name (trusted test data:
    plain torch.load, independent of the runner's reader)."""
    return {Path(p).parent.name: torch.load(p, weights_only=False)
            for p in sorted(glob.glob(str(Path(folder) / "iter_*" / "mp_rank_*" / "model_optim_rng.pt")))}


def logits(folder: Path, family: str, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = getattr(transformers, FAMILIES[family]["model"]).from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits
