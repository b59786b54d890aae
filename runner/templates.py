"""Architecture templates (`strategies/<family>.yaml`, or a user's own file named by
`model.arch`): the one place that knows a model family. Strategy generation and every
conversion (HF, MindFormers, Megatron) read them; this module only loads templates,
checks them strictly and evaluates their expressions. Any key not listed here, or a
value of the wrong kind, is an error naming the file and the key.

Top-level keys:

  name            the family's name (default: the file's stem)
  extends         another template (same folder) whose keys this one starts from; a
                  weight set to null is removed, a weight given again replaces it
  architectures   model class names / model_type values it answers for
  schemes         naming schemes: hf, mindformers, megatron (Megatron-Core with the
                  TransformerEngine spec), megatron_local (local spec), megatron_legacy
                  (Megatron-LM's `language_model.*` names), or any other name
  switch          {model_config key: other template} taken when that key is set (true, or a
                  count above 1), followed again from the template it leads to
  unmodelled      model_config keys the template it extends models but this one does not
                  (a job setting one is refused rather than given a different layout)
  defaults        {model_config key: expression} for keys the job / config.json leaves out
  divisible       [[model_config key, parallel key], ...] checked before generating
  weights         {role: weight}, below
  extra_state     {role: entry} Megatron-Core modules whose state dict holds
                  `<module>._extra_state` (written as None): `names` (module names),
                  `place`, `layers`, `experts`, `when`, as for weights
  megatron_args   {key: constant} written into a Megatron checkpoint's `args` beside the
                  sizes (normalization, swiglu, position_embedding_type, ...)
  hf_config       {fixed: {key: constant}, computed: {key: expression}}: the config.json
                  written when a conversion to HF has no reference folder

A weight:

  names    {scheme: name}; `{layer}` and `{expert}` are replaced by the layer / expert
           number, any other `{expression}` by its value (`{layer - num_layers}`)
  shape    [expression, ...], the logical shape
  split    column | row | vocab | replicate | expert (default replicate)
  dim      the tensor dim that column / row / vocab split (defaults 0, 1, 0; one more
           for experts: stacked)
  place    layer (default) | embedding (first stage, and the last when embeddings are
           tied or the model has MTP layers) | output (last stage) | first | last (with
           `layers`, layers after the decoder's: MTP, on the last stage)
  layers   [start, stop] expressions: the layers that have this weight (default all
           layers, [0, num_layers]); e.g. dense layers [0, first_k_dense_replace]
  when     expression: the weight exists only where it is true (q_lora_rank > 0); or
           {scheme: expression}: its name in that scheme exists only where it is true
           (MindSpore Transformers' qkv_concat stores w_qkv instead of wq, wk and wv)
  kind     weight (default) | norm | embedding | bias | router | state: the dtype of a
           generated parameter and whether MindSpore's parallel optimizer may shard it;
           `state` is a training counter that is no trained weight (MindSpore
           Transformers' router fi_accu): float32, never optimizer-sharded, no
           optimizer states
  experts  each (one tensor per expert, `{expert}` in its names; Megatron stacks them
           into one logical tensor split over expert parallel) | stacked (dim 0 counts
           experts) | grouped (dim 0 is the experts' rows one expert after another,
           split over expert parallel carved out of all the ranks of a stage, expert
           parallel fastest, and over nothing else: MindSpore Transformers 1.7's
           grouped-GEMM weight1 / weight2)
  stored   the whole tensor's stored shape when `shape` is a finer view of it (SwiGLU fc1
           [2, ffn, h] stored [2*ffn, h], so that each tensor-parallel rank stores
           [gate_shard; up_shard])
  tie      role: absent when `tie_word_embeddings` is set, this weight is then that
           role's tensor; Megatron keeps a copy where their pipeline stages differ
  pad      vocab: Megatron pads dim 0 to its padded vocabulary with copies of the last
           row (dropped on the way back)
  fuse     how this weight is made of other roles' tensors, for schemes that store
           them apart: {parts: [part, ...], groups: expression (default 1)}. Its rows
           (all dims but the last, flattened; a 1-D tensor's elements) are, for each
           group g in turn, block g of each part in order (each part's rows cut in
           `groups` equal blocks): QKV per query group is
           {parts: [q, k, v], groups: n_kv_heads}, SwiGLU fc1 is {parts: [gate, up]}.
           A part is a role, or {role, rows: [start, count], transpose: true} for a row
           range of a role's tensor, transposed first when asked (GPT-2's Conv1D c_attn
           [h, 3h] holds q, k, v as row ranges of its transpose). With `experts`, parts
           are taken per expert, experts outermost. A weight that has a name in a
           scheme and is fused from one whole role there is a copy of it (DeepSeek-V3's MTP
           embed_tokens): dropped going to a scheme that keeps only the original, written
           back from the original. A scheme that names the parts and not the fused
           weight, converted from one that names only the fused weight, cuts it into them
           (DeepSeek-V3's q_b_proj, per head [q_nope; q_rope], is two tensors in MindSpore
           Transformers 1.5).
  permute  {scheme: {view: [expression, ...], order: [dim, ...]}}: in that scheme the
           tensor's rows are stored reordered: the rows it has in every other scheme,
           viewed as `view` (whose product is the row count) and with the view's dims
           taken in `order`. torchtitan keeps Meta's rotary layout, each head's q and k
           rows interleaved in pairs where HF has them in two halves:
           {torchtitan: {view: [num_heads, 2, head_dim // 2], order: [0, 2, 1]}}.
  block_scale  the suffix of the companion tensor a block-quantized checkpoint stores
           beside this 2-D weight (`_scale_inv`: DeepSeek-V3's FP8 `X.weight` has
           `X.weight_scale_inv`, float32, one value per block of config.json's
           quantization_config.weight_block_size): the weight may be FP8 with that scale
  keep_dtype   dtypes ([F32]) a `dtype:` cast leaves this weight in (DeepSeek-V3's router
           bias stays float32, as every framework keeps it)

A conversion from scheme A to scheme B takes each weight of B from the weight of the
same role in A (a rename), or from its `fuse` parts in A; runner/convert/names.py
compiles that into row permutations.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from runner import dtypes
from runner.errors import ConfigError, cause


def _template_dir() -> Path:
    """strategies/ beside the package in a source tree (editable install), else the copy
    a wheel installs under <prefix>/share/autotrans/strategies (setup.cfg data_files)."""
    here = Path(__file__).resolve().parent.parent / "strategies"
    return here if here.is_dir() else Path(sys.prefix) / "share" / "autotrans" / "strategies"


TEMPLATE_DIR = _template_dir()
SPLITS = ("column", "row", "vocab", "replicate", "expert")
PLACES = ("layer", "embedding", "output", "first", "last")
DEFAULT_DIM = {"column": 0, "row": 1, "vocab": 0}
TOP_KEYS = ("name", "extends", "architectures", "schemes", "switch", "unmodelled", "defaults", "divisible", "weights",
            "extra_state", "megatron_args", "hf_config")
WEIGHT_KEYS = ("names", "shape", "split", "dim", "place", "layers", "when", "experts", "stored", "tie", "pad", "fuse",
               "kind", "permute", "block_scale", "keep_dtype")
KINDS = ("weight", "norm", "embedding", "bias", "router", "state")
EXTRA_KEYS = ("names", "place", "layers", "when", "experts")

# Canonical model_config names (MindSpore Transformers') and the names HF and
# Megatron use for the same sizes.
ALIASES: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer"),
    "hidden_size": ("n_embd",),
    "num_heads": ("num_attention_heads", "n_head"),
    "n_kv_heads": ("num_key_value_heads", "num_query_groups"),
    "head_dim": ("kv_channels",),
    "intermediate_size": ("ffn_hidden_size", "n_inner"),
    "num_experts": ("expert_num", "num_local_experts", "num_moe_experts", "n_routed_experts"),
    "mtp_depth": ("num_nextn_predict_layers", "mtp_num_layers"),
    "num_experts_per_tok": ("moe_router_topk",),
    "max_position_embeddings": ("n_positions", "max_position_embedding"),
    "norm_eps": ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_epsilon"),
    "rope_theta": ("rotary_base",),
    "param_init_type": ("torch_dtype", "dtype", "params_dtype"),
}

# MindSpore Transformers' model_config / moe_config keys (and HF's) that change which
# weights exist or how they are laid out, with the value that changes nothing. Another
# value needs a template that models the key (SPEC 5: never a silently different layout).
LAYOUT_KEYS = {"qkv_concat": False, "qkv_has_bias": False, "attn_proj_has_bias": False, "attention_bias": False,
               "mlp_bias": False, "add_bias_linear": False, "qk_layernorm": False, "use_3d_tensor_parallel": False,
               "mtp_depth": 0, "multi_latent_attention": False, "q_lora_rank": None, "kv_lora_rank": None,
               "expert_num": 1, "shared_expert_num": 0, "use_shared_expert_gating": False,
               "first_k_dense_replace": True, "moe_intermediate_size": 1407, "balance_via_topk_bias": False,
               "use_allgather_dispatcher": False, "expert_model_parallel": None, "use_gmm": False,
               "enable_cold_hot_expert": False, "enable_deredundency": False,
               "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_grouped_gemm": False,
               "use_contiguous_weight_layout_attention": False, "moe_router_enable_expert_bias": False,
               "moe_shared_expert_intermediate_size": None, "moe_layer_freq": 1}

@dataclass(frozen=True)
class Part:
    role: str
    rows: tuple[str, str] | None  # (start, count) expressions; None: every row
    transpose: bool


@dataclass(frozen=True)
class Fuse:
    parts: tuple[Part, ...]
    groups: str  # expression


@dataclass(frozen=True)
class Permute:
    view: tuple[str, ...]  # expressions
    order: tuple[int, ...]


@dataclass(frozen=True)
class Weight:
    role: str
    names: Mapping[str, str]  # scheme -> name template ({layer}, {expert}, {expression})
    shape: tuple[str, ...]  # expressions
    split: str
    dim: int | None
    place: str
    experts: str | None  # None, "each", "stacked"
    stored: tuple[str, ...] | None
    layers: tuple[str, str] | None = None  # (start, stop) expressions
    when: Mapping[str, str] | None = None  # scheme -> expression
    tie: str | None = None
    pad: str | None = None
    fuse: Fuse | None = None
    kind: str = "weight"
    permute: Mapping[str, Permute] | None = None  # scheme -> how its rows are reordered
    block_scale: str | None = None  # suffix of its block-scale tensor's name, when it may have one
    keep_dtype: tuple[str, ...] = ()  # dtypes a cast keeps


@dataclass(frozen=True)
class Template:
    name: str
    path: Path
    architectures: tuple[str, ...]
    schemes: tuple[str, ...]
    switch: Mapping[str, str]
    defaults: Mapping[str, str]
    divisible: tuple[tuple[str, str], ...]
    weights: tuple[Weight, ...]
    extra_state: tuple[Weight, ...] = ()
    megatron_args: Mapping[str, Any] = None  # type: ignore[assignment]
    hf_fixed: Mapping[str, Any] = None  # type: ignore[assignment]
    hf_computed: Mapping[str, str] = None  # type: ignore[assignment]
    unmodelled: frozenset[str] = frozenset()

    def weights_of(self, scheme: str) -> list[Weight]:
        return [w for w in self.weights if scheme in w.names]

    def role(self, role: str) -> Weight:
        return next(w for w in self.weights if w.role == role)

    def mentions(self) -> set[str]:
        """The model_config keys the template models: those its expressions, defaults
        and switch name, less `unmodelled`."""
        exprs = [*self.defaults.values(), *(e for pair in self.divisible for e in pair)]
        for w in (*self.weights, *self.extra_state):
            exprs += [*w.shape, *(w.stored or ()), *(w.layers or ()), *(w.when or {}).values()]
            exprs += [e for p in (w.fuse.parts if w.fuse else ()) for e in p.rows or ()] + ([w.fuse.groups] if w.fuse else [])
            exprs += [f for name in w.names.values() for f in _FIELD.findall(name)]
            exprs += [e for p in (w.permute or {}).values() for e in p.view]
        names = {n.id for e in exprs for n in ast.walk(ast.parse(e.strip(), mode="eval")) if isinstance(n, ast.Name)}
        return (names | set(self.defaults) | set(self.switch)) - self.unmodelled - {"layer", "expert"}

    def switched(self, values: Mapping[str, Any]) -> "Template":
        """Follow `switch` while a key is set: MindSpore Transformers' LlamaForCausalLM
        with qkv_has_bias is Qwen2, and Qwen2 with experts is Qwen2-MoE."""
        seen, t = {self.name}, self
        while True:
            for key, other in t.switch.items():
                v = values.get(key)
                if v is True or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 1):
                    t = resolve(other)
                    break
            else:
                return t
            if t.name in seen:
                raise ConfigError(f"template {t.name} ({t.path}): key switch leads back to {t.name}")
            seen.add(t.name)


# -- loading ---------------------------------------------------------------------------------
def available() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


@lru_cache(maxsize=None)
def load_file(path: Path) -> Template:
    return _parse(_raw(Path(path), ()), Path(path))


def _raw(path: Path, seen: tuple[Path, ...]) -> dict:
    """The template document, its keys checked, with `extends` applied."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"template {path}: cannot read ({str(e).splitlines()[0]})") from None
    _check_doc(doc, path)
    base_name = doc.get("extends")
    if not base_name:
        return doc
    base_path = path.parent / f"{base_name}.yaml"
    if base_path in seen or not base_path.is_file():
        raise ConfigError(f"template {path}: key extends: {base_name!r} is missing or circular")
    base = _raw(base_path, seen + (path,))

    def merged(key: str) -> dict:
        both = {**(base.get(key) or {}), **(doc.get(key) or {})}
        return {k: v for k, v in both.items() if v is not None}

    hf_base, hf_doc = base.get("hf_config") or {}, doc.get("hf_config") or {}
    return {
        **doc,
        "schemes": doc.get("schemes", base.get("schemes")),
        "defaults": merged("defaults"),
        "divisible": list(base.get("divisible") or []) + list(doc.get("divisible") or []),
        "weights": merged("weights"),
        "extra_state": merged("extra_state"),
        "megatron_args": merged("megatron_args"),
        "hf_config": {k: {**(hf_base.get(k) or {}), **(hf_doc.get(k) or {})} for k in ("fixed", "computed")},
    }


class _Checker:
    """One-line errors naming the file and the key (`weights.q.split`)."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"template {self.path}: key {key}: {msg}")

    def keys(self, doc: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(doc, dict):
            raise self.fail(where or "(top)", f"expected a mapping, got {doc!r}")
        for k in doc:
            if k not in allowed:
                raise self.fail(f"{where}.{k}" if where else str(k), f"unknown key (expected one of: {', '.join(allowed)})")
        for k in required:
            if k not in doc:
                raise self.fail(f"{where}.{k}" if where else k, "missing")
        return doc

    def expr(self, v: Any, key: str) -> str:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise self.fail(key, f"expected an expression, got {v!r}")
        try:
            ast.parse(str(v).strip(), mode="eval")
        except SyntaxError:
            raise self.fail(key, f"cannot parse expression {v!r}") from None
        return str(v)

    def exprs(self, v: Any, key: str, n: int | None = None) -> tuple[str, ...]:
        if not isinstance(v, list) or (n is not None and len(v) != n):
            raise self.fail(key, f"expected a list of {n or 'one or more'} expressions, got {v!r}")
        return tuple(self.expr(x, f"{key}[{i}]") for i, x in enumerate(v))

    def choice(self, v: Any, key: str, options: tuple) -> Any:
        if v not in options:
            raise self.fail(key, f"{v!r} is not one of {', '.join(str(o) for o in options)}")
        return v

    def names(self, v: Any, key: str) -> dict[str, str]:
        if not isinstance(v, dict) or not v or not all(isinstance(s, str) and isinstance(n, str) for s, n in v.items()):
            raise self.fail(key, "expected a mapping {scheme: name}")
        return dict(v)


def _check_doc(doc: Any, path: Path) -> None:
    c = _Checker(path)
    if not isinstance(doc, dict):
        raise ConfigError(f"template {path}: expected a mapping of keys ({', '.join(TOP_KEYS)})")
    c.keys(doc, "", TOP_KEYS, () if doc.get("extends") else ("weights",))
    for key in ("architectures", "schemes", "unmodelled"):
        if key in doc and not (isinstance(doc[key], list) and all(isinstance(x, str) for x in doc[key])):
            raise c.fail(key, "expected a list of names")
    for key in ("switch", "defaults", "megatron_args"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise c.fail(key, "expected a mapping")
    for k, v in (doc.get("defaults") or {}).items():
        c.expr(v, f"defaults.{k}")
    for i, d in enumerate(doc.get("divisible") or []):
        if not (isinstance(d, list) and len(d) == 2 and all(isinstance(x, str) for x in d)):
            raise c.fail(f"divisible[{i}]", f"expected [model_config key, parallel key], got {d!r}")
    hf = doc.get("hf_config")
    if hf is not None:
        c.keys(hf, "hf_config", ("fixed", "computed"))
        for k, v in (hf.get("computed") or {}).items():
            c.expr(v, f"hf_config.computed.{k}")
    for section, allowed in (("weights", WEIGHT_KEYS), ("extra_state", EXTRA_KEYS)):
        entries = doc.get(section)
        if entries is not None and not isinstance(entries, dict):
            raise c.fail(section, "expected a mapping {role: entry}")
        for role, w in (entries or {}).items():
            if w is not None:
                _weight(c, f"{section}.{role}", str(role), w, allowed)


def _weight(c: _Checker, key: str, role: str, w: Any, allowed: tuple[str, ...]) -> Weight:
    """A weight (or extra_state entry) with every value checked."""
    c.keys(w, key, allowed, ("names", "shape") if "shape" in allowed else ("names",))
    split = c.choice(w.get("split", "replicate"), f"{key}.split", SPLITS)
    place = c.choice(w.get("place", "layer"), f"{key}.place", PLACES)
    experts = c.choice(w.get("experts"), f"{key}.experts", (None, "each", "stacked", "grouped"))
    if split == "expert" and experts != "stacked":
        raise c.fail(f"{key}.experts", "split: expert needs experts: stacked")
    if experts == "grouped" and split != "replicate":
        raise c.fail(f"{key}.split", "experts: grouped is split over expert parallel only")
    dim = w.get("dim", DEFAULT_DIM.get(split))
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 0):
        raise c.fail(f"{key}.dim", f"expected a tensor dim (0, 1, ...), got {dim!r}")
    if dim is not None and experts == "stacked" and "dim" not in w:
        dim += 1  # dim 0 counts experts
    shape = c.exprs(w["shape"], f"{key}.shape") if "shape" in w else ()
    stored = c.exprs(w["stored"], f"{key}.stored") if w.get("stored") is not None else None
    layers = c.exprs(w["layers"], f"{key}.layers", 2) if w.get("layers") is not None else None
    when = _when(c, f"{key}.when", w.get("when"), w.get("names"))
    kind = c.choice(w.get("kind", "weight"), f"{key}.kind", KINDS)
    tie = w.get("tie")
    if tie is not None and not isinstance(tie, str):
        raise c.fail(f"{key}.tie", f"expected a role name, got {tie!r}")
    pad = c.choice(w.get("pad"), f"{key}.pad", (None, "vocab"))
    fuse = _fuse(c, f"{key}.fuse", w["fuse"]) if w.get("fuse") is not None else None
    permute = _permute(c, f"{key}.permute", w.get("permute"), w.get("names"))
    scale = w.get("block_scale")
    if scale is not None and (not isinstance(scale, str) or not scale or len(shape) != 2):
        raise c.fail(f"{key}.block_scale", f"expected a name suffix such as _scale_inv on a 2-D weight, got {scale!r}")
    keep = w.get("keep_dtype", [])
    if not isinstance(keep, list) or any(k not in dtypes.ITEMSIZE for k in keep):
        raise c.fail(f"{key}.keep_dtype", f"expected a list of dtypes such as [F32], got {keep!r}")
    return Weight(role, c.names(w["names"], f"{key}.names"), shape, split, dim, place, experts, stored,
                  layers, when, tie, pad, fuse, kind, permute, scale, tuple(keep))


def _permute(c: _Checker, key: str, p: Any, names: Any) -> dict[str, Permute] | None:
    if p is None:
        return None
    if not isinstance(p, dict):
        raise c.fail(key, "expected a mapping {scheme: {view, order}}")
    out = {}
    for s, entry in p.items():
        if not isinstance(names, dict) or s not in names:
            raise c.fail(f"{key}.{s}", "the weight has no name in that scheme")
        c.keys(entry, f"{key}.{s}", ("view", "order"), ("view", "order"))
        view = c.exprs(entry["view"], f"{key}.{s}.view")
        order = entry["order"]
        if not isinstance(order, list) or sorted(order) != list(range(len(view))) or any(isinstance(d, bool) for d in order):
            raise c.fail(f"{key}.{s}.order", f"expected a reordering of the view's dims 0..{len(view) - 1}, got {order!r}")
        out[str(s)] = Permute(view, tuple(order))
    return out


def _when(c: _Checker, key: str, when: Any, names: Any) -> dict[str, str] | None:
    """`when` as {scheme: expression}; a bare expression holds in every scheme."""
    if when is None:
        return None
    schemes = list(names) if isinstance(names, dict) else []
    if not isinstance(when, dict):
        expr = c.expr(when, key)
        return {s: expr for s in schemes}
    for s, e in when.items():
        if s not in schemes:
            raise c.fail(f"{key}.{s}", "the weight has no name in that scheme")
        c.expr(e, f"{key}.{s}")
    return {s: str(e) for s, e in when.items()}


def _fuse(c: _Checker, key: str, f: Any) -> Fuse:
    c.keys(f, key, ("parts", "groups"), ("parts",))
    if not isinstance(f["parts"], list) or not f["parts"]:
        raise c.fail(f"{key}.parts", "expected a list of roles")
    parts = []
    for i, p in enumerate(f["parts"]):
        k = f"{key}.parts[{i}]"
        if isinstance(p, str):
            parts.append(Part(p, None, False))
            continue
        c.keys(p, k, ("role", "rows", "transpose"), ("role",))
        if not isinstance(p["role"], str):
            raise c.fail(f"{k}.role", f"expected a role name, got {p['role']!r}")
        if p.get("transpose", False) not in (True, False):
            raise c.fail(f"{k}.transpose", f"expected true or false, got {p['transpose']!r}")
        rows = c.exprs(p["rows"], f"{k}.rows", 2) if p.get("rows") is not None else None
        parts.append(Part(p["role"], rows, bool(p.get("transpose", False))))
    return Fuse(tuple(parts), c.expr(f.get("groups", 1), f"{key}.groups"))


def _parse(doc: dict, path: Path) -> Template:
    c = _Checker(path)
    schemes = tuple(doc.get("schemes") or ())
    weights = tuple(_weight(c, f"weights.{r}", str(r), w, WEIGHT_KEYS) for r, w in doc["weights"].items())
    extra = tuple(_weight(c, f"extra_state.{r}", str(r), w, EXTRA_KEYS) for r, w in (doc.get("extra_state") or {}).items())
    roles = {w.role for w in weights}
    for section, entries in (("weights", weights), ("extra_state", extra)):
        for w in entries:
            unknown = sorted(set(w.names) - set(schemes))
            if unknown:
                raise c.fail(f"{section}.{w.role}.names", f"scheme(s) {unknown} not listed in 'schemes'")
            refs = ([("tie", w.tie)] if w.tie else []) + [("fuse", p.role) for p in (w.fuse.parts if w.fuse else ())]
            for what, ref in refs:
                if ref not in roles:
                    raise c.fail(f"{section}.{w.role}.{what}", f"no weight named {ref!r}")
    hf = doc.get("hf_config") or {}
    return Template(
        name=str(doc.get("name", path.stem)), path=path,
        architectures=tuple(doc.get("architectures") or ()), schemes=schemes,
        switch=dict(doc.get("switch") or {}), defaults={k: str(v) for k, v in (doc.get("defaults") or {}).items()},
        divisible=tuple(tuple(d) for d in doc.get("divisible") or ()), weights=weights, extra_state=extra,
        megatron_args=dict(doc.get("megatron_args") or {}), hf_fixed=dict(hf.get("fixed") or {}),
        hf_computed={k: str(v) for k, v in (hf.get("computed") or {}).items()},
        unmodelled=frozenset(doc.get("unmodelled") or ()),
    )


def resolve(arch: Any) -> Template:
    """The template for `model.arch`: a template name, a model class name listed in a
    template's `architectures`, MindSpore Transformers' `{type: ...}`, or a YAML path."""
    if isinstance(arch, Mapping):
        arch = arch.get("type", "")
    if not isinstance(arch, str) or not arch:
        raise ConfigError("config key model.arch: expected a template name such as llama, or {type: LlamaForCausalLM}")
    if arch.endswith((".yaml", ".yml")):
        if not Path(arch).is_file():
            raise ConfigError(f"config key model.arch: template file {arch} does not exist")
        return load_file(Path(arch).resolve())
    found = find(arch)
    if found is None:
        raise ConfigError(f"config key model.arch: no template for {arch!r} in {TEMPLATE_DIR} (templates: {', '.join(available())})")
    return found


def find(arch: str) -> Template | None:
    """The shipped template named `arch` or answering for it (`architectures`)."""
    names = available()
    if arch in names:
        return load_file(TEMPLATE_DIR / f"{arch}.yaml")
    for n in names:
        t = load_file(TEMPLATE_DIR / f"{n}.yaml")
        if arch.lower() in (a.lower() for a in t.architectures):
            return t
    return None


# -- model sizes ------------------------------------------------------------------------------
def canonical_config(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge model_config mappings (later ones win) under canonical key names; None
    values count as missing."""
    out: dict[str, Any] = {}
    reverse = {alias: key for key, aliases in ALIASES.items() for alias in aliases}
    for layer in layers:
        for k, v in layer.items():
            if v is None:
                continue
            out[reverse.get(k, k)] = v
    return out


SIZE_KEYS = ("num_layers", "hidden_size", "num_heads", "n_kv_heads", "head_dim", "intermediate_size", "num_experts", "vocab_size")


def config_json_names(hf: Mapping[str, Any], mc: Mapping[str, Any], where: Path) -> dict[str, str]:
    """How a message names each canonical size config.json gives (`mc`, the job's
    model_config, must agree with it: a disagreement is an error naming both)."""
    reverse = {alias: key for key, aliases in ALIASES.items() for alias in aliases}
    given = {reverse.get(k, k): (k, v) for k, v in mc.items() if v is not None}
    names = {}
    for k, v in hf.items():
        key = reverse.get(k, k)
        if key in SIZE_KEYS and key in given and given[key][1] != v and v is not None:
            raise ConfigError(f"model.model_config.{given[key][0]} = {given[key][1]} disagrees with {where}'s {k} = {v}; "
                              "the HF folder gives the sizes: leave it out or give the right one")
        names[key] = f"{where}'s {k}"
    return names


def check_modelled(template: Template, sections: list[tuple[str, dict]]) -> None:
    """A layout key set to a value that changes the layout must be one the template
    models; else the layout would silently differ from the model's."""
    known = template.mentions()
    reverse = {alias: key for key, aliases in ALIASES.items() for alias in aliases}
    for label, doc in sections:
        for key, value in doc.items():
            if key in LAYOUT_KEYS and value is not None and value != LAYOUT_KEYS[key] \
                    and key not in known and reverse.get(key, key) not in known:
                raise ConfigError(f"{label}.{key}: {value!r} changes the weights or their layout in a way "
                                  f"template {template.name} does not model; no layout is generated for it")


def hf_config(folder: Path) -> dict[str, Any]:
    """config.json of an HF model folder, or {} when there is none."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read ({cause(e)})") from None
    return doc if isinstance(doc, dict) else {}


class Env:
    """Values of model_config and parallel_config for expressions; template defaults
    are evaluated on first use."""

    def __init__(self, template: Template, values: Mapping[str, Any], names: Mapping[str, str] | None = None):
        self.template = template
        self.values = dict(values)
        self.names = dict(names or {})  # key -> where its value comes from, for messages
        self._busy: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.values or key in self.template.defaults

    def __getitem__(self, key: str) -> Any:
        if key in self.values:
            return self.values[key]
        expr = self.template.defaults.get(key)
        if expr is None or key in self._busy:
            raise ConfigError(f"model.model_config.{key} is needed by template {self.template.name} but not set")
        self._busy.add(key)
        try:
            self.values[key] = evaluate(expr, self)
        finally:
            self._busy.discard(key)
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def int(self, key: str) -> int:
        v = self[key]
        if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
            raise ConfigError(f"model.model_config.{key}: expected an integer, got {v!r}")
        return int(v)

    def shape(self, exprs: tuple[str, ...]) -> tuple[int, ...]:
        out = []
        for e in exprs:
            v = evaluate(e, self)
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"template {self.template.name}: shape expression {e!r} gives {v!r}, not a size")
            out.append(v)
        return tuple(out)


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Div: operator.truediv, ast.Mod: operator.mod}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_FUNCS = {"int": int, "min": min, "max": max, "ceil": math.ceil}


@lru_cache(maxsize=4096)
def _tree(expr: str) -> ast.Expression | None:
    try:
        return ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return None


def evaluate(expr: str, env: Env, local: Mapping[str, Any] | None = None) -> Any:
    """Evaluate an arithmetic expression over model_config names (no Python eval);
    `local` adds names such as layer and expert."""
    tree = _tree(str(expr))
    if tree is None:
        raise ConfigError(f"template {env.template.name}: cannot parse expression {expr!r}")

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool, str)):
            return node.value
        if isinstance(node, ast.Name):
            return local[node.id] if local and node.id in local else env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, (ast.FloorDiv, ast.Mod, ast.Div)) and b == 0:
                raise ConfigError(f"template {env.template.name}: division by zero in {expr!r}")
            return _BINOPS[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else not v
        if isinstance(node, ast.BoolOp):
            values = [ev(v) for v in node.values]
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            left = ev(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                right = ev(right_node)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return ev(node.body) if ev(node.test) else ev(node.orelse)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
            return _FUNCS[node.func.id](*(ev(a) for a in node.args))
        raise ConfigError(f"template {env.template.name}: unsupported syntax in expression {expr!r}")

    return ev(tree)


_FIELD = re.compile(r"\{([^{}]+)\}")


def format_name(name: str, env: Env, layer: int | None = None, expert: Any = None) -> str:
    """A weight's name with `{layer}`, `{expert}` and `{expression}` fields filled in."""
    local = {"layer": layer, "expert": expert}

    def field(m: re.Match) -> str:
        key = m.group(1).strip()
        if key in local:
            return str(local[key])
        return str(evaluate(key, env, local))

    return _FIELD.sub(field, name)


def instances(w: Weight, env: Env, scheme: str) -> list[int | None]:
    """The layer numbers a weight exists at under `scheme` (None: once, outside the
    layers)."""
    if w.when and scheme in w.when and not evaluate(w.when[scheme], env):
        return []
    if w.layers is not None:
        start, stop = (int(evaluate(e, env)) for e in w.layers)
        return list(range(start, stop))
    return list(range(env.int("num_layers"))) if w.place == "layer" else [None]


def kept_dtypes(template: Template, env: Env) -> dict[str, tuple[str, ...]]:
    """Tensor name, in every scheme, -> the dtypes a `dtype:` cast keeps it in (`keep_dtype`)."""
    out: dict[str, tuple[str, ...]] = {}
    for w in template.weights:
        for scheme in w.names if w.keep_dtype else ():
            for layer in instances(w, env, scheme):
                for e in range(env.int("num_experts")) if w.experts == "each" else [None]:
                    out[format_name(w.names[scheme], env, layer, e)] = w.keep_dtype
    return out


BLOCK = (128, 128)  # HF fp8 quantization_config's default weight_block_size


def weight_block(config: Mapping[str, Any]) -> tuple[int, int]:
    """The FP8 block of a checkpoint whose config.json (`config`) may have HF's fp8
    quantization_config; 128 x 128 when it does not say."""
    q = config.get("quantization_config") or {}
    size = q.get("weight_block_size") if isinstance(q, Mapping) else None
    if size is None:
        return BLOCK
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(b, int) and b > 0 for b in size)):
        raise ConfigError(f"config.json quantization_config.weight_block_size: expected two positive integers, got {size!r}")
    return size[0], size[1]


def block_scaled(template: Template, env: Env, scheme: str) -> dict[str, str]:
    """Weight name -> the name of the block scale it may carry (`block_scale`), in `scheme`."""
    out = {}
    for w in template.weights_of(scheme):
        for layer in instances(w, env, scheme) if w.block_scale else ():
            for e in range(env.int("num_experts")) if w.experts == "each" else [None]:
                name = format_name(w.names[scheme], env, layer, e)
                out[name] = name + w.block_scale
    return out


def regroup(shape: tuple[int, ...], stored: tuple[int, ...], target: tuple[int, ...]) -> tuple[int, ...] | None:
    """`stored` merges runs of consecutive dims of `shape` (a row-major reshape); apply
    the same merging to `target` (a box of the same rank). None if it is no merging."""
    groups: list[list[int]] = []
    i = 0
    for d in stored:
        if i >= len(shape):
            return None
        group, prod = [i], shape[i]
        i += 1
        while prod != d and i < len(shape) and prod < d:
            group.append(i)
            prod *= shape[i]
            i += 1
        if prod != d:
            return None
        groups.append(group)
    if any(s != 1 for s in shape[i:]) or not groups:
        return None
    groups[-1].extend(range(i, len(shape)))
    return tuple(math.prod(target[j] for j in g) for g in groups)
