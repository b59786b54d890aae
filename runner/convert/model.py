"""A model's sizes, read from an HF `config.json` or from Megatron's `args`, in one
record the name maps use."""

from __future__ import annotations

import json
from argparse import Namespace
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runner.errors import FormatError

# HF model_type -> family whose name map applies (Mistral has Llama's names).
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "mixtral": "mixtral"}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}


@dataclass(frozen=True)
class ModelSpec:
    family: str  # llama (also Mistral), qwen2, mixtral
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # true vocabulary size, without padding
    tied: bool
    qkv_bias: bool
    experts: int = 0  # 0: dense MLP
    topk: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_positions: int = 4096

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def padded_vocab(self, divisible_by: int, tp: int) -> int:
        """Megatron's `_vocab_size_with_padding`: a multiple of divisible_by x TP."""
        multiple = divisible_by * tp
        return -(-self.vocab // multiple) * multiple

    def to_json(self) -> dict:
        return asdict(self)


def _get(cfg: dict, key: str, where: str, default: Any = None) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is None:
        raise FormatError(f"{where}: config lacks {key!r}")
    return default


def from_hf_config(cfg: dict, where: str) -> ModelSpec:
    """The sizes in an HF config.json (Llama 2/3, Mistral, Qwen2, Mixtral)."""
    mtype = cfg.get("model_type")
    if mtype not in FAMILIES:
        raise FormatError(f"{where}: model_type {mtype!r} has no conversion map (known: {', '.join(FAMILIES)})")
    family = FAMILIES[mtype]
    heads = _get(cfg, "num_attention_heads", where)
    hidden = _get(cfg, "hidden_size", where)
    rope = cfg.get("rope_parameters") or {}
    return ModelSpec(
        family=family,
        num_layers=_get(cfg, "num_hidden_layers", where),
        hidden=hidden,
        ffn=_get(cfg, "intermediate_size", where),
        heads=heads,
        kv_heads=_get(cfg, "num_key_value_heads", where, heads),
        head_dim=_get(cfg, "head_dim", where, hidden // heads),
        vocab=_get(cfg, "vocab_size", where),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        experts=cfg.get("num_local_experts", 0) if family == "mixtral" else 0,
        topk=cfg.get("num_experts_per_tok", 0) if family == "mixtral" else 0,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        max_positions=int(cfg.get("max_position_embeddings", 4096)),
    )


def read_hf_config(folder: Path) -> tuple[dict, ModelSpec]:
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read HF config ({e})") from None
    return cfg, from_hf_config(cfg, str(path))


def from_megatron_args(args: Namespace, where: str, true_vocab: int | None = None) -> ModelSpec:
    """The sizes in a Megatron checkpoint's `args`. The true vocabulary size comes from
    `true_vocab` (a reference config.json), else args.vocab_size / true_vocab_size."""
    a = vars(args)

    def need(key: str) -> Any:
        if a.get(key) is None:
            raise FormatError(f"{where}: Megatron args lack {key!r}")
        return a[key]

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    vocab = true_vocab or a.get("true_vocab_size") or a.get("vocab_size")
    if not vocab:
        raise FormatError(f"{where}: Megatron args do not record the true vocabulary size; set reference_hf_dir to the original HF folder")
    experts = a.get("num_experts") or 0
    kv = a.get("num_query_groups") if a.get("group_query_attention") else heads
    return ModelSpec(
        family="mixtral" if experts else "qwen2" if a.get("add_qkv_bias") else "llama",
        num_layers=need("num_layers"),
        hidden=hidden,
        ffn=(a.get("moe_ffn_hidden_size") if experts else None) or need("ffn_hidden_size"),
        heads=heads,
        kv_heads=kv or heads,
        head_dim=a.get("kv_channels") or hidden // heads,
        vocab=int(vocab),
        tied=not a.get("untie_embeddings_and_output_weights", False),
        qkv_bias=bool(a.get("add_qkv_bias", False)),
        experts=experts,
        topk=a.get("moe_router_topk") or 0,
        norm_eps=float(a.get("norm_epsilon", 1e-5)),
        rope_theta=float(a.get("rotary_base", 10000.0)),
        max_positions=int(a.get("max_position_embeddings") or 4096),
    )


def hf_config(spec: ModelSpec, dtype: str) -> dict:
    """A minimal config.json for the spec, when no reference HF folder is given."""
    cfg = {
        "architectures": [ARCHITECTURES[spec.family]], "model_type": spec.family,
        "hidden_size": spec.hidden, "intermediate_size": spec.ffn, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim,
        "vocab_size": spec.vocab, "tie_word_embeddings": spec.tied, "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta, "max_position_embeddings": spec.max_positions, "hidden_act": "silu",
        "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtype, "float32"),
    }
    if spec.family == "llama" and spec.qkv_bias:
        cfg["attention_bias"] = True
    if spec.experts:
        cfg.update(num_local_experts=spec.experts, num_experts_per_tok=spec.topk)
    return cfg
