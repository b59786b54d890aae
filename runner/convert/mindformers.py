"""MindSpore Transformers names <-> HF names for Llama 2/3, Mistral and Qwen2, as
MindFormers' convert_weight.py maps them (seed 004): plain renames, no permutation."""

from __future__ import annotations

from runner.errors import FormatError

_TOP = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER = (
    (".self_attn.q_proj.", ".attention.wq."),
    (".self_attn.k_proj.", ".attention.wk."),
    (".self_attn.v_proj.", ".attention.wv."),
    (".self_attn.o_proj.", ".attention.wo."),
    (".mlp.gate_proj.", ".feed_forward.w1."),
    (".mlp.down_proj.", ".feed_forward.w2."),
    (".mlp.up_proj.", ".feed_forward.w3."),
    (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."),
)


def _swap(name: str, table: dict[str, str], pairs: tuple[tuple[str, str], ...], what: str) -> str:
    if name in table:
        return table[name]
    if name.startswith("model.layers."):
        for a, b in pairs:
            if a in name:
                return name.replace(a, b)
    raise FormatError(f"tensor {name} has no {what} name (MindFormers names cover Llama, Mistral and Qwen2)")


def to_mindformers(hf_name: str) -> str:
    return _swap(hf_name, _TOP, _LAYER, "MindFormers")


def to_hf(mf_name: str) -> str:
    return _swap(mf_name, {v: k for k, v in _TOP.items()}, tuple((b, a) for a, b in _LAYER), "HF")


def looks_like_mindformers(names) -> bool:
    return "model.tok_embeddings.embedding_weight" in names
