"""LoRA merge (SPEC 7): W' = W + scaling * (B @ A), streamed region by region.

LoRA pairs are found by name, in a PEFT adapter folder (`adapter_config.json` +
`adapter_model.*`), in another checkpoint, or inside `load_checkpoint` itself
(MindFormers' `*.tk_delta_lora_a/b`, or PEFT names). They are taken out of the job's
strategies and headers, so the planner sees only base weights; `LoraPool` then serves
every region of a merged base weight as its merged value. A and B are read region by
region through the same planner geometry, from their own layout: a shard held by the
rank that holds the base region is read there, anything else is gathered.

Each element's delta is summed over the rank in a fixed order from its own row of B and
column of A, so any split of a weight merges to the same bits as the whole."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runner import dtypes, plan as planner
from runner.errors import ConfigError, FormatError, PlanError, cause, name_list, shown
from runner.execute import LocalPool
from runner.fp8 import FP8
from runner.formats.base import TensorInfo
from runner.formats.registry import CHECKPOINT_SUFFIXES
from runner.layout import Box, ParamLayout
from runner.log import warn
from runner.plan import ReadItem
from runner.source import Source, discover, read_headers
from runner.strategy import Strategy
from runner.templates import available, find, hf_config

# name -> (module, "A"/"B", is_embedding); PEFT names may carry an adapter name.
_PATTERNS = (
    (re.compile(r"(?P<m>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight"), False),
    (re.compile(r"(?P<m>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?"), True),
    (re.compile(r"(?P<m>.+)\.(?:tk|mindpet)_delta_lora_(?P<ab>[ab])"), False),
)
PEFT_PREFIX = "base_model.model."
# MindSpore optimizer states of the LoRA weights: dropped with them.
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "moments.", "accu_grads.")
ROW_BLOCK = 1 << 20  # elements per block of merge math, to keep temporaries in cache


def lora_name(name: str) -> tuple[str, str, bool] | None:
    """(module, "A" or "B", embedding?) when `name` is a LoRA weight, else None."""
    for pattern, embedding in _PATTERNS:
        m = pattern.fullmatch(name)
        if m:
            return m["m"], m["ab"].upper(), embedding
    return None


@dataclass(frozen=True)
class Pair:
    """One merge: base weight `base` gets scaling * (B @ A), transposed when
    `transpose` (PEFT fan_in_fan_out, embeddings). A and B are read from `store`."""

    base: str
    a: str
    b: str
    store: str  # "source" or "adapter"
    scaling: float
    transpose: bool
    rank: int


@dataclass
class LoraMerge:
    """Everything the executor needs to merge: picklable, for worker processes."""

    pairs: dict[str, Pair]
    layouts: dict[str, Strategy]  # store -> layout of its LoRA tensors
    base_dtypes: dict[str, str]
    adapter: Source | None = None
    replaced: dict[str, str] = field(default_factory=dict)  # base weight -> adapter tensor

    @property
    def files(self) -> list[Path]:
        """Adapter files outside load_checkpoint (their stamps prove resumed outputs)."""
        return [p for ps in (self.adapter.files.values() if self.adapter else ()) for p in ps]

    def describe(self) -> dict:
        """What the merge does, independent of paths (for the job digest)."""
        return {"pairs": {n: [p.a, p.b, p.scaling, p.transpose] for n, p in sorted(self.pairs.items())},
                "replaced": self.replaced}

    @staticmethod
    def exclude(strategy: Strategy) -> Strategy:
        """The strategy without LoRA tensors (a training job's strategy names them)."""
        return strategy.with_params({n: p for n, p in strategy.params.items() if not _is_lora_entry(n)})


def _is_lora_entry(name: str) -> bool:
    return lora_name(name.split(".", 1)[1] if name.startswith(OPTIMIZER_PREFIXES) else name) is not None


# -- preparing ------------------------------------------------------------------------------
Headers = Mapping[int, Mapping[str, TensorInfo]]


def prepare(section: Mapping[str, Any], model: Mapping[str, Any], src: Strategy,
            headers: Headers, base: Path | None = None) -> tuple[LoraMerge, Strategy, dict[int, dict[str, TensorInfo]]]:
    """Find the LoRA pairs and check them against the base (`base`: load_checkpoint,
    whose config.json an adapter's base_model_name_or_path must fit); also `src` and
    `headers` without any LoRA tensor (new objects; the arguments are left as they
    are), so that only base weights are planned."""
    held = {n for h in headers.values() for n in h}
    in_source = sorted(n for n in held | set(src.params) if _is_lora_entry(n))
    dropped = [n for n in in_source if n.startswith(OPTIMIZER_PREFIXES)]
    lora_layouts = {n: src.params[n] for n in in_source if n in src.params}
    for n in in_source:
        if n in held and n not in lora_layouts and n not in dropped:
            raise PlanError(f"LoRA weight {n} is in the checkpoint but the source strategy does not name it; give a strategy that does")
    lora_layouts = {n: p for n, p in lora_layouts.items() if n in held and n not in dropped}
    _check_headers(Strategy(src.stages, lora_layouts), headers)
    lora_names = set(in_source)
    base_headers = {r: {n: t for n, t in h.items() if n not in lora_names} for r, h in headers.items()}
    src = src.with_params({n: p for n, p in src.params.items() if n not in lora_names})
    if dropped:
        warn(f"{len(dropped)} optimizer states of LoRA weights are dropped with them: {name_list(dropped)}")
    found = {n: ("source", p) for n, p in lora_layouts.items()}
    config: dict = {}
    adapter, replaced = None, {}
    layouts = {"source": Strategy(src.stages, lora_layouts)}
    if section["adapter"]:
        adapter, adapter_headers, config = open_adapter(Path(section["adapter"]))
        check_trained_on(config, section["adapter"], base)
        layouts["adapter"] = Strategy.full(adapter_headers)
        replaced = _replacements(adapter_headers, src, section["adapter"])
        for n in (n for n in adapter_headers if lora_name(n) is not None):
            if n in found:
                raise FormatError(f"LoRA weight {n} is both in load_checkpoint and in adapter {section['adapter']}")
            found[n] = ("adapter", layouts["adapter"].params[n])
    if not found:
        where = f"adapter {section['adapter']}" if section["adapter"] else "load_checkpoint"
        raise FormatError(f"lora: {where} holds no LoRA weights (*.lora_A.weight / *.lora_B.weight or *.tk_delta_lora_a / *.tk_delta_lora_b)")
    pairs = _pairs(found, src, section, model, config)
    merge = LoraMerge(pairs, layouts, {n: src.params[n].dtype for n in (*pairs, *replaced)}, adapter, replaced)
    return merge, src, base_headers


def _replacements(adapter_headers: Mapping[str, TensorInfo], src: Strategy, where: str) -> dict[str, str]:
    """Base weights a PEFT adapter saves whole (modules_to_save, embedding layers saved
    with embedding LoRA): PEFT loads them over the base before merging, and so do we."""
    out, foreign = {}, []
    for n, info in sorted(adapter_headers.items()):
        if lora_name(n) is not None:
            continue
        base = n[len(PEFT_PREFIX):].replace(".base_layer.", ".") if n.startswith(PEFT_PREFIX) else None
        if base not in src.params:
            foreign.append(n)
        elif info.shape != src.params[base].shape or not dtypes.is_float(info.dtype) or not dtypes.is_float(src.params[base].dtype):
            raise PlanError(f"adapter {where}: {n} ({list(info.shape)} {info.dtype}) cannot replace base weight {base} "
                            f"({list(src.params[base].shape)} {src.params[base].dtype}); a resized vocabulary is not supported")
        else:
            out[base] = n
    if foreign:
        raise FormatError(f"adapter {where} holds tensors that are neither LoRA A/B weights nor base weights: "
                          f"{name_list(foreign)}; autotrans merges plain LoRA adapters only (no DoRA or LoRA biases)")
    return out


def _check_headers(layout: Strategy, headers: dict[int, dict[str, TensorInfo]]) -> None:
    """Every piece of every LoRA tensor in the source is where its layout says, with
    the right dtype and size: plan a gather of them all and let the planner check it."""
    whole = {n: ParamLayout.replicated(p.shape, p.dtype) for n, p in layout.params.items()}
    planner.plan_rank(layout, Strategy(((0,),), whole), 0, headers=lambda r: headers[r])


def open_adapter(path: Path) -> tuple[Source, dict[str, TensorInfo], dict]:
    """A PEFT folder, a checkpoint file, or a folder of loose checkpoint files (full):
    its source, tensor headers and adapter_config.json (empty when there is none)."""
    if not path.exists():
        raise FormatError(f"lora.adapter {shown(path)} does not exist")
    folder = path if path.is_dir() else path.parent
    config_path = folder / "adapter_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{config_path}: cannot read ({cause(e)})") from None
        if not isinstance(config, dict):
            raise FormatError(f"{config_path}: expected a JSON object")
        _check_peft_config(config, config_path)
    if path.is_dir() and config:
        weights = [folder / f"adapter_model{s}" for s in CHECKPOINT_SUFFIXES]
        weights = [w for w in weights if w.is_file()][:1]
        if not weights:
            raise FormatError(f"PEFT adapter folder {folder} holds no adapter_model.safetensors or adapter_model.bin")
        source = Source(folder, "full", {0: tuple(weights)})
    else:
        source = discover(path)
        if source.kind != "full":
            raise ConfigError(f"config key lora.adapter: {path} is a {source.kind} checkpoint; give one file or a PEFT folder "
                              "(distributed LoRA weights belong in load_checkpoint, with its strategy)")
    return source, read_headers(source)[0], config


_SIZES = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "intermediate_size", "vocab_size")


def check_trained_on(config: Mapping[str, Any], where: str, base: Path | None) -> None:
    """An adapter trained on another model is refused, even when the shapes fit (a Llama
    adapter on a Qwen2 base): PEFT's base_model_name_or_path against the base HF folder's
    config.json; a local folder's config.json must agree on the sizes, a hub name must
    not name another family than the base's template answers for."""
    named = config.get("base_model_name_or_path")
    ours = hf_config(base) if base is not None and base.is_dir() else {}
    if not isinstance(named, str) or not named or not ours:
        return
    if (Path(named) / "config.json").is_file():
        theirs = hf_config(Path(named))
        for k in _SIZES:
            if k in theirs and k in ours and theirs[k] != ours[k]:
                raise FormatError(f"adapter {where} was trained on {named}, whose {k} is {theirs[k]!r}, but load_checkpoint "
                                  f"{base} has {ours[k]!r}; merge an adapter trained on this model")
        return

    def words(template) -> set[str]:  # the model_type values a template answers for
        return {a.lower() for a in template.architectures if a.islower()} | {template.name}

    mine = find(str(ours.get("model_type", "")))
    if mine is None or any(w in named.lower() for w in words(mine)):
        return
    other = next((t for t in map(find, available()) if t and any(w in named.lower() for w in words(t))), None)
    if other is not None:
        raise FormatError(f"adapter {where} was trained on {named} (base_model_name_or_path), a {other.name} model, but "
                          f"load_checkpoint {base} is a {mine.name} model; merge an adapter trained on this model")


def _check_peft_config(config: dict, path: Path) -> None:
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise FormatError(f"{path}: peft_type {kind!r} is not LoRA; autotrans merges LoRA adapters only")
    for key in ("use_dora", "lora_bias"):
        if config.get(key):
            raise FormatError(f"{path}: {key} is set; autotrans merges plain LoRA adapters only")


def _pairs(found: dict[str, tuple[str, ParamLayout]], src: Strategy, section: Mapping[str, Any],
           model: Mapping[str, Any], config: dict) -> dict[str, Pair]:
    halves: dict[tuple[str, str, bool], dict[str, str]] = {}
    for name in found:
        module, ab, embedding = lora_name(name)
        half = halves.setdefault((module, found[name][0], embedding), {})
        if ab in half:
            raise FormatError(f"LoRA {ab} for {module} appears twice ({half[ab]}, {name}); merge one adapter at a time")
        half[ab] = name
    pairs: dict[str, Pair] = {}
    for (module, store, embedding), ab in sorted(halves.items()):
        if len(ab) != 2:
            (have,) = ab.values()
            raise FormatError(f"LoRA weight {have} has no matching {'B' if 'A' in ab else 'A'} weight")
        base = _base_name(module, src, ab["A"])
        a, b = found[ab["A"]][1], found[ab["B"]][1]
        w = src.params[base]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise PlanError(f"LoRA pair for {base}: rank mismatch, A {ab['A']} has shape {list(a.shape)} "
                            f"and B {ab['B']} has shape {list(b.shape)} (want A [r, in], B [out, r])")
        transpose = embedding or bool(config.get("fan_in_fan_out"))
        delta = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        if w.shape != delta:
            raise PlanError(f"LoRA pair for {base}: B @ A gives shape {list(delta)}{' (transposed)' if transpose else ''} "
                            f"but the base weight has shape {list(w.shape)}")
        for n, p in ((base, w), (ab["A"], a), (ab["B"], b)):
            if not dtypes.is_float(p.dtype):
                raise PlanError(f"LoRA merge: {n} has dtype {p.dtype}; LoRA merges floating point weights only")
            if p.dtype in FP8:  # its values mean nothing without its block scale
                raise PlanError(f"LoRA merge: {n} is {p.dtype}; dequantize the checkpoint first (a job with dtype: bf16), then merge")
        if base in pairs:
            raise FormatError(f"base weight {base} has two LoRA pairs ({pairs[base].a}, {ab['A']}); merge one adapter at a time")
        scaling = _scaling(section, model, config, base.removesuffix(".weight"), a.shape[0])
        pairs[base] = Pair(base, ab["A"], ab["B"], store, scaling, transpose, a.shape[0])
    return pairs


def _base_name(module: str, src: Strategy, lora: str) -> str:
    candidates = [module + ".weight"]
    if module.startswith(PEFT_PREFIX):
        candidates.insert(0, module[len(PEFT_PREFIX):] + ".weight")
    for c in candidates:
        if c in src.params:
            return c
    raise PlanError(f"LoRA weight {lora} targets base weight {candidates[0]}, which load_checkpoint does not hold; "
                    "check that the adapter was trained on this model")


def _scaling(section: Mapping[str, Any], model: Mapping[str, Any], config: dict, module: str, rank: int) -> float:
    """lora.scaling, else PEFT's lora_alpha / r (sqrt(r) with use_rslora; rank_pattern and
    alpha_pattern per module), else MindFormers' pet_config lora_alpha / lora_rank."""
    if section["scaling"] is not None:
        return section["scaling"]
    if "lora_alpha" in config and "r" in config:
        r = _pattern(config.get("rank_pattern"), module, config["r"])
        alpha = _pattern(config.get("alpha_pattern"), module, config["lora_alpha"])
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    pet = ((model or {}).get("model_config") or {}).get("pet_config") or {}
    if "lora_alpha" in pet and "lora_rank" in pet:
        return pet["lora_alpha"] / pet["lora_rank"]
    raise ConfigError(f"set lora.scaling (lora_alpha / r): no adapter_config.json or model.model_config.pet_config gives it (LoRA rank here: {rank})")


def _pattern(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# -- merging --------------------------------------------------------------------------------
def _math_dtype(dtype: str) -> str:
    """fp32 math, except for fp64 weights, which it would round."""
    return "F64" if dtype == "F64" else "F32"


def _to_math(bits: np.ndarray, dtype: str) -> np.ndarray:
    return dtypes.cast(bits, dtype, _math_dtype(dtype)).view(dtypes.NUMPY[_math_dtype(dtype)])


def low_rank_product(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left @ right, summed over the rank in order with one rounding per step: each
    element depends only on its own row and column, unlike a BLAS matmul, whose
    blocking may change the bits of an element with the matrix shape."""
    out = left[:, :1] * right[:1, :]
    tmp = np.empty_like(out)
    for k in range(1, left.shape[1]):
        np.multiply(left[:, k:k + 1], right[k:k + 1, :], out=tmp)
        out += tmp
    return out


class LoraPool:
    """A SlicePool that serves merged base weights; everything else passes through."""

    def __init__(self, inner, merge: LoraMerge):
        self.inner = inner
        self.merge = merge
        self.stores = {"source": inner}
        if merge.adapter is not None:
            self.stores["adapter"] = LocalPool(merge.adapter)

    def region(self, read: ReadItem) -> np.ndarray:
        new = self.merge.replaced.get(read.src_name)
        if new is None:
            w = self.inner.region(read)
        else:
            w = self._read("adapter", new, read.region, 0)
            w = dtypes.cast(w, self.merge.layouts["adapter"].params[new].dtype, self.merge.base_dtypes[read.src_name])
        pair = self.merge.pairs.get(read.src_name)
        if pair is None:
            return w
        (r0, c0), (nr, nc) = read.region.offsets, read.region.sizes
        k = pair.rank
        if pair.transpose:
            left = self._lora(pair, pair.a, Box((0, r0), (k, nr)), read.src_rank).T
            right = self._lora(pair, pair.b, Box((c0, 0), (nc, k)), read.src_rank).T
        else:
            left = self._lora(pair, pair.b, Box((r0, 0), (nr, k)), read.src_rank)
            right = self._lora(pair, pair.a, Box((0, c0), (k, nc)), read.src_rank)
        dtype = self.merge.base_dtypes[pair.base]
        math_type = dtypes.NUMPY[_math_dtype(dtype)]
        left, right = left.astype(math_type), right.astype(math_type)
        scale = math_type.type(pair.scaling)
        out = np.empty(w.shape, w.dtype)
        step = max(1, ROW_BLOCK // max(nc, 1))
        for i in range(0, nr, step):
            merged = _to_math(w[i:i + step].copy(), dtype) + scale * low_rank_product(left[i:i + step], right)
            out[i:i + step] = dtypes.cast(merged.view(dtypes.bits_dtype(dtype)), _math_dtype(dtype), dtype)
        return out

    def _lora(self, pair: Pair, name: str, box: Box, prefer: int) -> np.ndarray:
        """A region of a LoRA tensor in math precision."""
        bits = self._read(pair.store, name, box, prefer if pair.store == "source" else 0)
        return _to_math(bits, self.merge.layouts[pair.store].params[name].dtype)

    def _read(self, store: str, name: str, box: Box, prefer: int) -> np.ndarray:
        """Raw bits of `box` of tensor `name` in `store`, read from its own layout."""
        layout = self.merge.layouts[store]
        bits = np.empty(box.sizes, dtypes.bits_dtype(layout.params[name].dtype))
        for r in planner.reads_for(layout, name, box, prefer, None):
            bits[r.region.slices(box)] = self.stores[store].region(r)
        return bits

    def release(self) -> None:
        for pool in self.stores.values():
            pool.release()

    def close(self) -> None:
        for pool in self.stores.values():
            pool.close()


def wrap(pool, merge: LoraMerge | None):
    """The pool a job's executor reads through: merging when the job has LoRA pairs."""
    return pool if merge is None else LoraPool(pool, merge)
