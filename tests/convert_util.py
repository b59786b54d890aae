"""Helpers for the conversion tests: tiny HF models built from a config (nothing
downloaded), jobs run in-process, and checkpoints read back with plain torch."""

from __future__ import annotations

import glob
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
    return Path(folder)


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
