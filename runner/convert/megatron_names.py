"""Megatron's tensor names. Logical tensors use Megatron-Core names with global layer
numbers and experts stacked; a file stores them under its own names: layer numbers
local to its pipeline stage, norms fused into the next linear with TransformerEngine,
one tensor per local expert, or the legacy `language_model.*` names."""

from __future__ import annotations

import re

from runner.errors import ConfigError

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
EXPERT_FC1 = "mlp.experts.linear_fc1.weight"
EXPERT_FC2 = "mlp.experts.linear_fc2.weight"
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")

# Fused into the following linear by TransformerEngine's layer spec (dense layers only
# for the MLP norm: MoE layers keep pre_mlp_layernorm, as Megatron-Core does).
_TE_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
# Modules whose `_extra_state` a Megatron-Core model's state dict holds (written as
# None): the linears in both layer specs, and TransformerEngine's attention.
_EXTRA = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_TE_EXTRA = ("self_attention.core_attention",)
_LEGACY = {
    "input_layernorm.weight": "input_norm.weight",
    "self_attention.linear_qkv.weight": "self_attention.query_key_value.weight",
    "self_attention.linear_qkv.bias": "self_attention.query_key_value.bias",
    "self_attention.linear_proj.weight": "self_attention.dense.weight",
    "pre_mlp_layernorm.weight": "post_attention_norm.weight",
    "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
}
_LEGACY_TOP = {
    EMBEDDING: "language_model.embedding.word_embeddings.weight",
    FINAL_NORM: "language_model.encoder.final_norm.weight",
    OUTPUT: "language_model.output_layer.weight",
}


def layer(i: int, rest: str) -> str:
    return f"decoder.layers.{i}.{rest}"


def split_layer(name: str) -> tuple[int, str] | None:
    m = _LAYER.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else None


def file_names(logical: str, first_layer: int, impl: str, naming: str, moe: bool, local_experts: int) -> list[str]:
    """The names a file stores `logical` under: one, or one per local expert in order.
    `first_layer` is the global number of the file's stage's first layer."""
    if naming == "legacy":
        if moe:
            raise ConfigError("megatron_naming: legacy has no mixture-of-experts names; use megatron_naming: core")
        if logical in _LEGACY_TOP:
            return [_LEGACY_TOP[logical]]
        i, rest = split_layer(logical)
        return [f"language_model.encoder.layers.{i - first_layer}.{_LEGACY[rest]}"]
    parts = split_layer(logical)
    if parts is None:
        return [logical]
    i, rest = parts
    prefix = f"decoder.layers.{i - first_layer}."
    if rest in (EXPERT_FC1, EXPERT_FC2):
        leaf = rest.split(".", 2)[2]
        return [f"{prefix}mlp.experts.local_experts.{j}.{leaf}" for j in range(local_experts)]
    if impl == "transformer_engine" and rest in _TE_NORMS and not (moe and rest == "pre_mlp_layernorm.weight"):
        rest = _TE_NORMS[rest]
    return [prefix + rest]


def extra_state_names(layers: range, first_layer: int, impl: str, moe: bool, local_experts: int, last_stage: bool) -> list[str]:
    """`_extra_state` keys of a Megatron-Core model's stage (written as None). The last
    stage's output layer has one whether or not it shares the embedding's weight."""
    modules = _EXTRA + (_TE_EXTRA if impl == "transformer_engine" else ())
    out = []
    for i in layers:
        prefix = f"decoder.layers.{i - first_layer}."
        for module in modules:
            if moe and module.startswith("mlp."):
                leaf = module.split(".")[1]
                out += [f"{prefix}mlp.experts.local_experts.{j}.{leaf}._extra_state" for j in range(local_experts)]
            else:
                out.append(f"{prefix}{module}._extra_state")
    return out + (["output_layer._extra_state"] if last_stage else [])


def nest_legacy(flat: dict) -> dict:
    """Legacy checkpoints nest `language_model` by module: embedding, encoder (flat
    keys below it), output_layer."""
    out: dict = {}
    for name, value in flat.items():
        if not name.startswith("language_model."):
            out[name] = value
            continue
        rest = name[len("language_model."):]
        lm = out.setdefault("language_model", {})
        if rest.startswith("encoder."):
            lm.setdefault("encoder", {})[rest[len("encoder."):]] = value
        else:
            node = lm
            *path, leaf = rest.split(".")
            for key in path:
                node = node.setdefault(key, {})
            node[leaf] = value
    return out
