"""Architecture templates (`strategies/<arch>.yaml`): which weights a model family has,
under each naming scheme, with shapes as expressions of model_config, the split rule
of each weight, and the stored reshape of fused weights. Data, not code: this module
only loads templates and evaluates their expressions.

A template file holds:

  name, architectures (model class names it answers for), schemes (naming schemes),
  switch: {model_config key: other template} taken when that key is truthy,
  defaults: {key: expression} for model_config keys the job leaves out,
  divisible: [[key, parallel key], ...] checked before generating,
  weights: {role: {names: {scheme: name template}, shape: [expr, ...], split, ...}},
  extends: another template whose defaults, divisible and weights this one starts
  from (a weight set to null is removed; a weight given again replaces it),
  unmodelled: model_config keys the base models but this template does not (a job
  setting one is refused).

Weight fields: `split` is column | row | vocab | replicate | expert; `dim` the tensor
dim that column/row/vocab split (defaults 0, 1, 0); `place` is layer | embedding
(first stage, and the last when embeddings are tied) | output (last stage, absent
when tied) | first | last; `experts: each` repeats the weight per expert (`{expert}`
in its name), `experts: stacked` means dim 0 counts experts (split over
expert_parallel); `stored` is the full tensor's stored shape when the logical shape
is a finer view of it (SwiGLU fc1 [2, ffn, h] stored [2*ffn, h], so that each
tensor-parallel rank stores [gate_shard; up_shard]); `kind` is weight | norm | embedding |
bias | router, which decides the dtype of a generated weight and whether MindSpore's
parallel optimizer may shard it; `when: {scheme: expression}` keeps the weight's name
in that scheme only while the expression is true (MindSpore Transformers' qkv_concat
stores attention.w_qkv instead of wq, wk and wv).
"""

from __future__ import annotations

import ast
import json
import math
import operator
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from runner.errors import ConfigError

def _template_dir() -> Path:
    """strategies/ beside the package in a source tree (editable install), else the copy
    a wheel installs under <prefix>/share/autotrans/strategies (setup.cfg data_files)."""
    here = Path(__file__).resolve().parent.parent / "strategies"
    return here if here.is_dir() else Path(sys.prefix) / "share" / "autotrans" / "strategies"


TEMPLATE_DIR = _template_dir()
SPLITS = ("column", "row", "vocab", "replicate", "expert")
PLACES = ("layer", "embedding", "output", "first", "last")
KINDS = ("weight", "norm", "embedding", "bias", "router")
DEFAULT_DIM = {"column": 0, "row": 1, "vocab": 0}

# Canonical model_config names (MindSpore Transformers') and the names HF and
# Megatron use for the same sizes.
ALIASES: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer"),
    "hidden_size": ("n_embd",),
    "num_heads": ("num_attention_heads", "n_head"),
    "n_kv_heads": ("num_key_value_heads", "num_query_groups"),
    "head_dim": ("kv_channels",),
    "intermediate_size": ("ffn_hidden_size", "n_inner"),
    "num_experts": ("expert_num", "num_local_experts", "num_moe_experts"),
    "max_position_embeddings": ("n_positions", "max_position_embedding"),
    "param_init_type": ("torch_dtype", "dtype", "params_dtype"),
}


@dataclass(frozen=True)
class Weight:
    role: str
    names: Mapping[str, str]  # scheme -> name template ({layer}, {expert})
    shape: tuple[str, ...]  # expressions
    split: str
    dim: int | None
    place: str
    experts: str | None  # None, "each", "stacked"
    stored: tuple[str, ...] | None
    kind: str = "weight"
    when: Mapping[str, str] | None = None  # scheme -> expression


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
    unmodelled: frozenset[str] = frozenset()  # keys its base models but it does not

    def weights_of(self, scheme: str) -> list[Weight]:
        return [w for w in self.weights if scheme in w.names]

    def mentions(self) -> set[str]:
        """The model_config keys the template models: those its expressions, defaults
        and switch name."""
        exprs = [*self.defaults.values(), *(e for pair in self.divisible for e in pair)]
        for w in self.weights:
            exprs += [*w.shape, *(w.stored or ()), *(w.when or {}).values()]
        names = {n.id for e in exprs for n in ast.walk(ast.parse(e.strip(), mode="eval")) if isinstance(n, ast.Name)}
        return (names | set(self.defaults) | set(self.switch)) - self.unmodelled

    def switched(self, values: Mapping[str, Any]) -> "Template":
        """Follow `switch` while a key is set (truthy, or a count above 1): LlamaForCausalLM
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
                raise ConfigError(f"template {t.name}: switch leads back to itself")
            seen.add(t.name)


# -- loading ---------------------------------------------------------------------------------
def available() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


@lru_cache(maxsize=None)
def load_file(path: Path) -> Template:
    return _parse(_raw(Path(path), ()), Path(path))


def _raw(path: Path, seen: tuple[Path, ...]) -> dict:
    """The template document with `extends` applied."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"template {path}: cannot read ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"template {path}: expected a mapping")
    base_name = doc.get("extends")
    if not base_name:
        return doc
    base_path = path.parent / f"{base_name}.yaml"
    if base_path in seen or not base_path.is_file():
        raise ConfigError(f"template {path}: extends {base_name!r}, which is missing or circular")
    base = _raw(base_path, seen + (path,))
    weights = {**(base.get("weights") or {}), **(doc.get("weights") or {})}
    return {
        **doc,
        "schemes": doc.get("schemes", base.get("schemes")),
        "defaults": {**(base.get("defaults") or {}), **(doc.get("defaults") or {})},
        "divisible": list(base.get("divisible") or []) + list(doc.get("divisible") or []),
        "weights": {k: v for k, v in weights.items() if v is not None},
    }


def _parse(doc: Any, path: Path) -> Template:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"template {path}: {msg}")

    if not isinstance(doc.get("weights"), dict):
        raise bad("expected a 'weights' mapping")
    schemes = tuple(doc.get("schemes") or ())
    weights = []
    for role, w in doc["weights"].items():
        if not isinstance(w, dict) or not isinstance(w.get("names"), dict) or not isinstance(w.get("shape"), list):
            raise bad(f"weight {role}: needs 'names' (scheme: name) and 'shape' (list)")
        split = w.get("split", "replicate")
        place = w.get("place", "layer")
        experts = w.get("experts")
        if split not in SPLITS:
            raise bad(f"weight {role}: split {split!r} is not one of {', '.join(SPLITS)}")
        if place not in PLACES:
            raise bad(f"weight {role}: place {place!r} is not one of {', '.join(PLACES)}")
        if experts not in (None, "each", "stacked") or (split == "expert" and experts != "stacked"):
            raise bad(f"weight {role}: experts must be 'each' or 'stacked' ('stacked' for split: expert)")
        kind, when = w.get("kind", "weight"), w.get("when")
        if kind not in KINDS:
            raise bad(f"weight {role}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if when is not None and (not isinstance(when, dict) or set(when) - set(w["names"])):
            raise bad(f"weight {role}: when must map schemes the weight names to expressions")
        unknown = set(w["names"]) - set(schemes)
        if unknown:
            raise bad(f"weight {role}: scheme(s) {sorted(unknown)} not listed in 'schemes'")
        dim = w.get("dim", DEFAULT_DIM.get(split))
        if dim is not None and experts == "stacked" and "dim" not in w:
            dim += 1  # dim 0 counts experts
        stored = w.get("stored")
        weights.append(Weight(role, dict(w["names"]), tuple(str(s) for s in w["shape"]), split, dim, place,
                              experts, tuple(str(s) for s in stored) if stored is not None else None,
                              kind, {k: str(v) for k, v in when.items()} if when else None))
    return Template(
        name=str(doc.get("name", path.stem)), path=path,
        architectures=tuple(doc.get("architectures") or ()), schemes=schemes,
        switch=dict(doc.get("switch") or {}), defaults={k: str(v) for k, v in (doc.get("defaults") or {}).items()},
        divisible=tuple(tuple(d) for d in doc.get("divisible") or ()), weights=tuple(weights),
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
    names = available()
    if arch in names:
        return load_file(TEMPLATE_DIR / f"{arch}.yaml")
    for n in names:
        t = load_file(TEMPLATE_DIR / f"{n}.yaml")
        if arch.lower() in (a.lower() for a in t.architectures):
            return t
    raise ConfigError(f"config key model.arch: no template for {arch!r} in {TEMPLATE_DIR} (templates: {', '.join(names)})")


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


def hf_config(folder: Path) -> dict[str, Any]:
    """config.json of an HF model folder, or {} when there is none."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    return doc if isinstance(doc, dict) else {}


class Env:
    """Values of model_config and parallel_config for expressions; template defaults
    are evaluated on first use."""

    def __init__(self, template: Template, values: Mapping[str, Any]):
        self.template = template
        self.values = dict(values)
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
_FUNCS = {"int": int, "min": min, "max": max, "ceil": math.ceil}


def evaluate(expr: str, env: Env) -> Any:
    """Evaluate an arithmetic expression over model_config names (no Python eval)."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ConfigError(f"template {env.template.name}: cannot parse expression {expr!r}") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool, str)):
            return node.value
        if isinstance(node, ast.Name):
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, (ast.FloorDiv, ast.Mod, ast.Div)) and b == 0:
                raise ConfigError(f"template {env.template.name}: division by zero in {expr!r}")
            return _BINOPS[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not ev(node.operand)
        if isinstance(node, ast.IfExp):
            return ev(node.body) if ev(node.test) else ev(node.orelse)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
            return _FUNCS[node.func.id](*(ev(a) for a in node.args))
        raise ConfigError(f"template {env.template.name}: unsupported syntax in expression {expr!r}")

    return ev(tree)


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
