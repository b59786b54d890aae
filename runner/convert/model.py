"""A model for a conversion: its template and its sizes, read from an HF `config.json`
or from Megatron's `args` under model_config's canonical names (runner.templates).
Nothing here knows a family: the template is chosen by `model.arch`, by config.json's
architecture, or by the names a Megatron checkpoint holds."""

from __future__ import annotations

import json
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from runner.errors import ConfigError, FormatError, cause
from runner.templates import Env, Template, available, canonical_config, check_modelled, evaluate, find, resolve


@dataclass(frozen=True)
class Model:
    template: Template
    config: Mapping[str, Any]  # canonical model_config values

    def env(self) -> Env:
        return Env(self.template, self.config)

    @property
    def family(self) -> str:
        return self.template.name

    @property
    def num_layers(self) -> int:
        return self.env().int("num_layers")

    @property
    def vocab(self) -> int:
        """The true vocabulary size, without padding."""
        return self.env().int("vocab_size")

    @property
    def tied(self) -> bool:
        return bool(self.env().get("tie_word_embeddings", 0))

    @property
    def experts(self) -> int:
        """Experts per MoE layer; 0 for a template without per-expert weights."""
        if not any(w.experts for w in self.template.weights):
            return 0
        return self.env().int("num_experts")

    def padded_vocab(self, divisible_by: int, tp: int) -> int:
        """Megatron's `_vocab_size_with_padding`: a multiple of divisible_by x TP."""
        multiple = divisible_by * tp
        return -(-self.vocab // multiple) * multiple

    def with_config(self, **values: Any) -> "Model":
        return Model(self.template, {**self.config, **values})

    def with_job(self, model_section: Any) -> "Model":
        """The model with a job's model.model_config over the checkpoint's values: a
        MindSpore Transformers layout key such as qkv_concat."""
        mc = (model_section or {}).get("model_config") if isinstance(model_section, Mapping) else None
        if mc is not None and not isinstance(mc, Mapping):
            raise ConfigError("config key model.model_config: expected a mapping")
        values = canonical_config(mc or {})
        for key in sorted(self.template.unmodelled):
            if values.get(key):
                raise ConfigError(f"config key model.model_config.{key}: template {self.family} ({self.template.path}) "
                                  "does not model it; no conversion is made for a layout it cannot name")
        return Model(self.template, {**self.config, **values})

    def to_json(self) -> dict:
        return {"template": str(self.template.path), "config": dict(self.config)}


def from_hf_config(cfg: dict, where: str, arch: Any = None) -> Model:
    """The model an HF config.json describes; `arch` (model.arch) names its template,
    else config.json's architectures / model_type do."""
    rope = cfg.get("rope_parameters") or {}  # transformers 5 keeps the rotary settings here
    values = canonical_config(cfg, {k: rope.get(k) for k in ("rope_theta", "partial_rotary_factor")})
    if arch:
        template = resolve(arch)
    else:
        names = [*(cfg.get("architectures") or []), cfg.get("model_type")]
        found = next((t for t in (find(n) for n in names if isinstance(n, str)) if t is not None), None)
        if found is None:
            raise FormatError(f"{where}: model_type {cfg.get('model_type')!r} has no template in strategies/ "
                              f"(templates: {', '.join(available())}); set model.arch to a template file of your own")
        template = found.switched(values)
    check_modelled(template, [(where, cfg)])  # a layer layout the template cannot name is refused
    return Model(template, values)


def read_hf_config(folder: Path, arch: Any = None) -> tuple[dict, Model]:
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read HF config ({cause(e)})") from None
    return cfg, from_hf_config(cfg, str(path), arch)


def megatron_config(args: Namespace, where: str, true_vocab: int | None = None) -> dict[str, Any]:
    """The sizes in a Megatron checkpoint's `args` under model_config's names. The true
    vocabulary size comes from `true_vocab` (a reference config.json), else
    args.true_vocab_size / vocab_size."""
    a = vars(args)

    def need(key: str) -> Any:
        if a.get(key) is None:
            raise FormatError(f"{where}: Megatron args lack {key!r}")
        return a[key]

    heads = need("num_attention_heads")
    vocab = true_vocab or a.get("true_vocab_size") or a.get("vocab_size")
    if not vocab:
        raise FormatError(f"{where}: Megatron args do not record the true vocabulary size; set reference_hf_dir to the original HF folder")
    experts = a.get("num_experts") or 0
    out = {
        "num_layers": need("num_layers"), "hidden_size": need("hidden_size"), "num_heads": heads,
        "n_kv_heads": (a.get("num_query_groups") if a.get("group_query_attention") else None) or heads,
        "head_dim": a.get("kv_channels") or need("hidden_size") // heads,
        "intermediate_size": need("ffn_hidden_size"),
        "vocab_size": int(vocab), "tie_word_embeddings": not a.get("untie_embeddings_and_output_weights", False),
        "norm_eps": a.get("norm_epsilon"), "rope_theta": a.get("rotary_base"),
        "max_position_embeddings": a.get("max_position_embeddings"),
        "partial_rotary_factor": a.get("rotary_percent"),
    }
    if experts:
        out.update(num_experts=experts, num_experts_per_tok=a.get("moe_router_topk"), moe_intermediate_size=a.get("moe_ffn_hidden_size"),
                   shared_expert_intermediate_size=a.get("moe_shared_expert_intermediate_size"))
    return {k: v for k, v in out.items() if v is not None}


def candidates(arch: Any, reference: Model | None) -> list[Template]:
    """Templates a Megatron checkpoint may be: model.arch's, the reference folder's, or
    every shipped one (the checkpoint's names then decide)."""
    if arch:
        return [resolve(arch)]
    if reference is not None:
        return [reference.template]
    return [resolve(n) for n in available()]


def hf_config(model: Model, dtype: str) -> dict | None:
    """A config.json for the model (the template's `hf_config`), for a conversion to HF
    with no reference folder; None when the template has none."""
    t = model.template
    if not t.hf_fixed and not t.hf_computed:
        return None
    env = model.env()
    cfg = {**t.hf_fixed, **{k: evaluate(e, env) for k, e in t.hf_computed.items()}}
    cfg["torch_dtype"] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtype, "float32")
    return cfg
