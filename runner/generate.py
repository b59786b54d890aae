"""Destination strategies from the model (SPEC 5, "Strategy generation").

Ranks are numbered as Megatron-LM and MindSpore Transformers do: stage-major, then data
parallel, then model (tensor) parallel fastest. Within a stage `dev_matrix` is
[dp * cp, tp] (MindSpore Transformers shards weights ((dp * cp, 1), (mp, 1)): context
parallel multiplies the replicas), so tensor_map axis 0 is tp and axis 1 is dp. Stacked
expert weights use [dp * cp / ep, ep, tp] (expert parallel carved out of data parallel,
as both do), with the expert dim on axis 1. MindSpore Transformers 1.7's grouped experts
use its MoE device matrix [dp * cp * tp / ep, ep] (expert parallel carved out of data x
tensor parallel, fastest), split on dim 0 over ep alone.

With `optimizer_shard`, MindSpore's parallel optimizer splits dim 0 of each rank's
slice further over its replicas (or optimizer_weight_shard_size of them), except for
parameters declared parallel_optimizer=False (norms, embeddings, biases), parameters
shared by several stages, parameters smaller than parallel_optimizer_threshold KB, and
where dim 0 does not divide.

Layers go to pipeline stages as MindSpore Transformers' LayerSetting assigns them:
stage s holds num_layers // pp + offset[s] layers (offset an int, a per-stage list, or
per pp_interleave_num chunk a list of lists) and the offsets must add up to the
remainder; with no offset the layers must divide evenly.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from runner import dtypes
from runner.config import JobConfig
from runner.errors import ConfigError, LayoutError
from runner.layout import ParamLayout, block_layout
from runner.strategy import Strategy
from runner.templates import BLOCK, Env, Template, Weight, block_scaled, canonical_config, check_modelled, config_json_names, find, format_name, hf_config, instances, kept_dtypes, regroup, resolve, weight_block

# Optimizer states that MindSpore checkpoints keep beside each weight, with its layout.
OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.", "accu_grads.", "moments.", "exp_avg.", "exp_avg_sq.")
# Training counters MindSpore checkpoints hold: copied whole to every rank.
BOOKKEEPING = frozenset({"global_step", "scale_sense", "loss_scale", "epoch_num", "step_num",
                         "current_iterator_step", "last_overflow_iterator_step", "learning_rate"})
# How model_config names the parameter dtype (MindSpore and HF spellings).
DTYPE_NAMES = {"float16": "F16", "fp16": "F16", "half": "F16", "bfloat16": "BF16", "bf16": "BF16",
               "float32": "F32", "fp32": "F32", "float": "F32"}
DEFAULT_DTYPE = "F32"  # when neither the source, model_config nor `dtype` says
SCHEME_BY_OUTPUT = {"mindformers": "mindformers", "megatron": "megatron", "hf": "hf"}
# MindSpore Transformers' dtype of a kind of parameter: the model_config key naming it,
# and its default there (None: param_init_type).
KIND_DTYPE = {"norm": ("layernorm_compute_type", "float32"), "embedding": ("embedding_init_type", None),
              "router": ("router_dense_type", "float32")}
# Kinds MindSpore Transformers declares parallel_optimizer=False (embeddings unless
# model_config.parallel_optimizer asks).
NO_OPT_SHARD = ("norm", "bias", "embedding", "state")
STATE_DTYPE = "F32"  # MindSpore Transformers creates its training counters float32
# Optimizer states a MindSpore Transformers training run holds beside every weight
# (float32, with the weight's layout), by optimizer.type.
OPTIMIZER_STATES = {"AdamW": ("adam_m", "adam_v"), "FusedAdamWeightDecay": ("adam_m", "adam_v"),
                    "FP32StateAdamWeightDecay": ("adam_m", "adam_v"), "FusedAdamW": ("exp_avg", "exp_avg_sq")}


def generate(cfg: JobConfig, src: Strategy | None) -> Strategy:
    """The destination strategy of `cfg.model` under `cfg.parallel_config` (with_source)."""
    return with_source(cfg, src)[0]


def with_source(cfg: JobConfig, src: Strategy | None) -> tuple[Strategy, Strategy | None]:
    """The destination strategy of `cfg.model` under `cfg.parallel_config`, and the
    source strategy as the destination sees it.

    With a source, the names follow the source's naming scheme and must match it
    exactly, and shapes and dtypes come from the source. A full source that stores a
    fused weight flat (Megatron fc1 [2*ffn, h]) is re-expressed (in a new Strategy; `src`
    is left as it is) with the template's logical shape and that stored shape, so both
    sides agree."""
    template, env = model_env(cfg)
    scheme = detect_scheme(template, env, src) if src is not None else default_scheme(cfg, template)
    if scheme == "mindformers" and any(w.experts == "each" and instances(w, env, scheme) for w in template.weights_of(scheme)):
        # MindSpore Transformers' training graphs stack experts; per-expert names are only
        # those its weight loader takes from HF names
        grouped = next((w.when[scheme] for w in template.weights_of(scheme) if w.experts == "grouped" and scheme in (w.when or {})), None)
        raise ConfigError(f"template {template.name} names MindSpore Transformers' experts one tensor each (its weight "
                          "loader's names), not as its training graph stacks them: no MindSpore layout is generated for them"
                          + (f"; it names them grouped, as the training graph does, where model_config sets {grouped}" if grouped else ""))
    check_sizes(template, env, scheme)
    pc = cfg.parallel_config
    per_stage = pc.replicas * pc.model_parallel
    stages = tuple(tuple(range(s * per_stage, (s + 1) * per_stage)) for s in range(pc.pipeline_stage))
    # MindSpore Transformers' LayerSetting counts the MTP layers after the last layer
    mtp = env.int("mtp_depth") if "mtp_depth" in template.defaults else 0
    layer_stage = layer_stages(env.int("num_layers") + mtp, pc.pipeline_stage, env.get("offset", 0), env.get("pp_interleave_num", 1))
    cast_to = dtypes.CAST_NAMES.get(cfg.dtype) if cfg.dtype else None
    # MindSpore Transformers' legacy models (a template's mindformers_legacy names are always theirs)
    mindformers = scheme == "mindformers_legacy" or (scheme == "mindformers" and cfg.use_legacy)

    params: dict[str, ParamLayout] = {}
    flat: dict[str, ParamLayout] = {}  # source layouts re-expressed with their logical shape
    counters: set[str] = set()  # training counters: no optimizer states
    for name, weight, stage_list in expand(template, env, scheme, layer_stage):
        if weight.kind == "state":
            counters.add(name)
        shape = env.shape(weight.shape)
        stored = env.shape(weight.stored) if weight.stored else None
        dtype = dtypes.cast_dtype(kind_dtype(env, weight.kind, mindformers), cast_to, weight.keep_dtype)
        if src is not None and name in src.params:
            shape, stored, dtype, logical = _from_source(name, src, shape, stored, cast_to, scheme.startswith("megatron"),
                                                         weight.keep_dtype)
            if logical is not None:
                flat[name] = logical
        params[name] = layout_of(name, weight, shape, stored, dtype, stage_list, pc, bool(env.get("parallel_optimizer", 0)),
                                 whole_uneven_vocab=scheme == "mindformers" and not cfg.use_legacy)
        scale = name + weight.block_scale if weight.block_scale else None
        if src is not None and scale in src.params:  # an FP8 weight's block scale, split with it
            params[scale] = block_layout(name, params[name], weight_block(env.values), src.params[scale].dtype)
    if src is not None:
        _match_source(template, scheme, src, params, pc, cast_to, flat)
        if flat:
            src = src.with_params({n: flat.get(n, p) for n, p in src.params.items()})
    elif scheme.startswith("mindformers"):
        _add_optimizer_states(cfg, params, cast_to, counters)
    return Strategy(stages, params, "generated", [f"generated from template {template.name} ({scheme} names)"]), src


# -- model sizes and names ------------------------------------------------------------------------
def model_env(cfg: JobConfig) -> tuple[Template, Env]:
    """The template and the values its expressions see: the HF config.json of the source
    folder (or of a training YAML's pretrained_model_dir), overridden by a training YAML's
    moe_config, then by model.model_config, plus the parallel settings."""
    mc, sections = _sections(cfg)
    values = canonical_config(*(doc for _label, doc in sections))
    arch = arch_of(cfg)
    if arch is None:
        raise ConfigError("no model: set model.arch (a template name such as llama, or {type: LlamaForCausalLM}), "
                          "or load an HF folder whose config.json names its architecture")
    template = resolve(arch).switched(values)
    check_modelled(template, sections)
    hf = next(((Path(label), doc) for label, doc in sections if label.endswith("config.json")), None)
    names = config_json_names(hf[1], mc, hf[0]) if hf else {}
    pc = cfg.parallel_config
    values.update(data_parallel=pc.data_parallel, model_parallel=pc.model_parallel, pipeline_stage=pc.pipeline_stage,
                  expert_parallel=pc.expert_parallel, context_parallel=pc.context_parallel)
    return template, Env(template, values, names)


def _sections(cfg: JobConfig) -> tuple[dict, list[tuple[str, dict]]]:
    """model.model_config, and every mapping sizes come from, lowest precedence first."""
    mc = (cfg.model or {}).get("model_config") or {}
    if not isinstance(mc, dict):
        raise ConfigError("config key model.model_config: expected a mapping")
    sections = []
    for folder in (cfg.load_checkpoint, cfg.pretrained_model_dir):
        if folder and Path(folder).is_dir() and hf_config(Path(folder)):
            sections.append((str(Path(folder) / "config.json"), hf_config(Path(folder))))
    sections += [("moe_config", dict(cfg.moe_config)), ("model.model_config", mc)]  # moe_config: expert_num ...
    return mc, sections


def arch_of(cfg: JobConfig) -> Any:
    """model.arch; else the architecture a v1.7 training YAML's model_config names
    (architectures / model_type), else the one of the HF config.json the sizes come from."""
    arch = (cfg.model or {}).get("arch")
    if arch:
        return arch
    _mc, sections = _sections(cfg)
    for _label, doc in reversed(sections):
        names = doc.get("architectures")
        if isinstance(names, list) and names and isinstance(names[0], str):
            return names[0]
        if isinstance(doc.get("model_type"), str):
            return doc["model_type"]
    return None


def kept_of(cfg: JobConfig) -> dict[str, tuple[str, ...]]:
    """The dtypes a cast keeps, by tensor name, when the job casts and its model has a
    template that keeps some (a merge or a given strategy needs no template otherwise)."""
    arch = arch_of(cfg) if cfg.dtype else None
    name = arch.get("type") if isinstance(arch, Mapping) else arch
    if not isinstance(name, str) or not name:
        return {}
    template = resolve(name) if name.endswith((".yaml", ".yml")) else find(name)
    if template is None or not any(w.keep_dtype for w in template.weights):
        return {}
    return kept_dtypes(*model_env(cfg))


def scale_pairs(cfg: JobConfig, src: Strategy) -> tuple[dict[str, str], tuple[int, int]]:
    """FP8 weight -> its block scale, of the weights the model's template marks
    `block_scale` (none when the job does not know its template), and the block size."""
    if arch_of(cfg) is None:
        return {}, BLOCK
    template, env = model_env(cfg)
    if not any(w.block_scale for w in template.weights):
        return {}, BLOCK
    scheme = detect_scheme(template, env, src)
    return {w: s for w, s in block_scaled(template, env, scheme).items() if s in src.params and w in src.params}, weight_block(env.values)


def check_sizes(template: Template, env: Env, scheme: str) -> None:
    for key, by in template.divisible:
        n, d = env.int(key), env.int(by)
        if n % d:
            raise ConfigError(f"{env.names.get(key, f'model_config.{key}')} = {n} is not divisible by parallel_config.{by} = {d}; choose a {by} that divides it")
    ep = env.int("expert_parallel")
    if any(w.experts == "stacked" for w in template.weights):
        dp = env.int("data_parallel") * env.int("context_parallel")
        if dp % ep:
            raise ConfigError(f"parallel_config.expert_parallel = {ep} must divide data_parallel x context_parallel = {dp} "
                              "(experts are split within data parallel)")
    if any(w.experts == "grouped" and instances(w, env, scheme) for w in template.weights_of(scheme)):
        dp = env.int("data_parallel") * env.int("model_parallel")
        if dp % ep:
            raise ConfigError(f"parallel_config.expert_parallel = {ep} must divide data_parallel x model_parallel = {dp} "
                              "(MindSpore Transformers' grouped experts are split within them)")


def layer_stages(num_layers: int, pp: int, offset: Any = 0, interleave: Any = 1) -> list[int]:
    """Pipeline stage of every layer, as MindSpore Transformers' LayerSetting computes it."""
    if not isinstance(interleave, int) or isinstance(interleave, bool) or interleave < 1:
        raise ConfigError(f"model_config.pp_interleave_num: expected a positive integer, got {interleave!r}")
    chunks = pp * interleave
    rows = _offset_rows(offset, pp, interleave)
    remainder = num_layers % chunks
    total = sum(map(sum, rows))
    if total != remainder:
        if not any(map(any, rows)):
            raise ConfigError(
                f"num_layers {num_layers} is not divisible by pipeline_stage {pp}"
                + (f" x pp_interleave_num {interleave}" if interleave > 1 else "")
                + f": set model_config.offset to per-stage extra layers adding up to {remainder} (e.g. {_example(remainder, pp)})")
        raise ConfigError(f"model_config.offset {offset} adds up to {total}, but must add up to num_layers {num_layers} % {chunks} = {remainder}")
    counts = [[num_layers // chunks + o for o in row] for row in rows]
    if any(c < 0 for row in counts for c in row):
        raise ConfigError(f"model_config.offset {offset} leaves a pipeline stage with a negative layer count {counts}")
    out = []
    for row in counts:  # interleaved chunks visit the stages in turn
        for stage, n in enumerate(row):
            out.extend([stage] * n)
    return out


def _offset_rows(offset: Any, pp: int, interleave: int) -> list[list[int]]:
    def ints(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)

    if isinstance(offset, int) and not isinstance(offset, bool):
        return [[offset] * pp for _ in range(interleave)]
    if ints(offset) and len(offset) == pp:
        return [list(offset) for _ in range(interleave)]
    if isinstance(offset, list) and len(offset) == interleave and all(ints(r) and len(r) == pp for r in offset):
        return [list(r) for r in offset]
    raise ConfigError(f"model_config.offset {offset!r}: expected an integer or a list of {pp} integers (one per pipeline stage)")


def _example(remainder: int, pp: int) -> list[int]:
    return [1 if s < remainder else 0 for s in range(pp)]


def expand(template: Template, env: Env, scheme: str, layer_stage: list[int]) -> Iterator[tuple[str, Weight, tuple[int, ...]]]:
    """Every parameter name of the scheme, with its weight and the stages holding it."""
    last = env.int("pipeline_stage") - 1
    tied = bool(env.get("tie_word_embeddings", 0))
    for w in template.weights_of(scheme):
        if w.tie is not None and tied:
            continue
        if w.place == "layer":
            where = [(layer, (layer_stage[layer],)) for layer in instances(w, env, scheme)]
        else:
            stages = {"first": (0,), "last": (last,), "output": (last,),
                      "embedding": tuple(sorted({0, last})) if tied else (0,)}[w.place]
            where = [(layer, stages) for layer in instances(w, env, scheme)]
        experts = range(env.int("num_experts")) if w.experts == "each" else [None]
        for layer, stages in where:
            for e in experts:
                yield format_name(w.names[scheme], env, layer, e), w, stages


def names_of(template: Template, env: Env, scheme: str) -> set[str]:
    layers = [0] * env.int("num_layers")  # stage does not matter for names
    return {n for n, _w, _s in expand(template, env, scheme, layers)}


def detect_scheme(template: Template, env: Env, src: Strategy) -> str:
    """The naming scheme whose names the source checkpoint holds most of."""
    held = set(src.params)
    scores = {s: len(names_of(template, env, s) & held) for s in template.schemes}
    best = max(template.schemes, key=lambda s: scores[s])
    if scores[best] == 0:
        sample = ", ".join(sorted(held)[:3])
        raise LayoutError(f"the checkpoint's names ({sample}, ...) match none of template {template.name}'s naming schemes ({', '.join(template.schemes)})")
    return best


def default_scheme(cfg: JobConfig, template: Template) -> str:
    """Naming scheme without a checkpoint: model.naming, else the output format's, else
    MindSpore Transformers' for a training YAML (model.arch given as {type: ...}, or a
    1.7 YAML's use_legacy: False), else HF."""
    model = cfg.model or {}
    scheme = model.get("naming") or SCHEME_BY_OUTPUT.get(cfg.output_format)
    if not scheme:
        scheme = "mindformers" if isinstance(model.get("arch"), dict) or not cfg.use_legacy else "hf"
    if scheme not in template.schemes:
        if not model.get("naming") and "hf" in template.schemes:
            return "hf"
        raise ConfigError(f"config key model.naming: template {template.name} has no {scheme!r} names (schemes: {', '.join(template.schemes)})")
    return scheme


def kind_dtype(env: Env, kind: str, mindformers: bool) -> str:
    """param_init_type; in MindSpore Transformers' models, norms take
    layernorm_compute_type, embeddings embedding_init_type and routers router_dense_type.
    Training counters are float32 in every model."""
    if kind == "state":
        return STATE_DTYPE
    key, default = KIND_DTYPE.get(kind, ("param_init_type", None)) if mindformers else ("param_init_type", None)
    v = env.get(key, default)
    if v is None:
        key, v = "param_init_type", env.get("param_init_type")
    if v is None:
        return DEFAULT_DTYPE
    name = str(v).lower().replace("torch.", "").replace("mstype.", "")
    if name not in DTYPE_NAMES:
        raise ConfigError(f"model_config.{key} {v!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


# -- layouts ------------------------------------------------------------------------------------
def layout_of(name: str, w: Weight, shape: tuple[int, ...], stored_full: tuple[int, ...] | None, dtype: str,
              stages: tuple[int, ...], pc, embedding_opt_shard: bool = False, whole_uneven_vocab: bool = False) -> ParamLayout:
    """The ParamLayout of one weight under parallel_config `pc`. `whole_uneven_vocab`: an
    embedding whose vocabulary model_parallel does not divide stays whole (MindSpore
    Transformers 1.7's VocabParallelEmbedding) instead of being an error."""
    dp, tp, ep = pc.replicas, pc.model_parallel, pc.expert_parallel
    tmap: list[tuple[int, ...]] = [()] * len(shape)
    if w.experts == "stacked":
        dev_matrix: tuple[int, ...] = (dp // ep, ep, tp)
        tmap[0] = (1,)
    elif w.experts == "grouped":  # MindSpore Transformers 1.7's MoE device matrix: [dp * tp * cp / ep, ep]
        dev_matrix = (dp * tp // ep, ep)
        tmap[0] = (0,)
    else:
        dev_matrix = (dp, tp)
    if w.experts == "each" and ep > 1:
        raise ConfigError(
            f"parameter {name}: experts stored one tensor each cannot be split over expert_parallel {ep} "
            "(every rank of a stage holds every parameter of it); use expert_parallel: 1, or MindSpore Transformers' stacked expert names")
    vocab_split = w.split == "vocab" and not pc.vocab_emb_dp
    if vocab_split and whole_uneven_vocab and w.kind == "embedding" and shape[w.dim] % tp:
        vocab_split = False
    tp_split = w.split in ("column", "row") or vocab_split
    if vocab_split and pc.context_parallel > 1:
        raise LayoutError(f"parameter {name}: a vocab-parallel embedding with context_parallel > 1 is split over "
                          "model x context parallel, which autotrans does not lay out; set vocab_emb_dp: true")
    if tp_split and tp > 1:
        if shape[w.dim] % tp:
            what = "the vocabulary" if w.split == "vocab" else f"dim {w.dim}"
            hint = "; set vocab_emb_dp: true to keep embeddings whole" if w.split == "vocab" else ""
            raise ConfigError(f"parameter {name}: {what} ({shape[w.dim]}) is not divisible by model_parallel {tp}{hint}")
        tmap[w.dim] = (0,)
    if w.experts == "stacked" and shape[0] % ep:
        raise ConfigError(f"parameter {name}: {shape[0]} experts are not divisible by expert_parallel {ep}")
    if w.experts == "grouped" and shape[0] % ep:
        raise ConfigError(f"parameter {name}: its {shape[0]} rows of experts are not divisible by expert_parallel {ep}")
    p = ParamLayout(shape, dtype, stages, dev_matrix, tuple(tmap))
    opted_out = w.kind in NO_OPT_SHARD and not (w.kind == "embedding" and embedding_opt_shard)
    if pc.optimizer_shard and not opted_out:
        p = replace(p, opt_shard=opt_shard(p, pc))
    if stored_full is not None and stored_full != shape:
        local = regroup(shape, stored_full, p.chunk)
        if local is None:
            raise ConfigError(f"parameter {name}: stored shape {list(stored_full)} is no row-major merge of {list(shape)}")
        p = replace(p, stored_shape=local)
    return p


def opt_shard(p: ParamLayout, pc) -> int:
    """How many replicas MindSpore's parallel optimizer splits dim 0 of the slice over."""
    kb = math.prod(p.shape) * dtypes.itemsize(p.dtype) / 1024  # the whole parameter, as MindSpore measures it
    n = p.replicas if pc.optimizer_weight_shard_size == -1 else pc.optimizer_weight_shard_size
    if not p.shape or len(p.stages) > 1 or kb < pc.parallel_optimizer_threshold:
        return 1
    if n <= 1 or p.replicas % n or p.chunk[0] % n:
        return 1
    return n


def _add_optimizer_states(cfg: JobConfig, params: dict[str, ParamLayout], cast_to: str | None, counters: set[str]) -> None:
    """A training run's optimizer states, as the training YAML's optimizer holds them
    (none for `counters`, which are not trained)."""
    prefixes = OPTIMIZER_STATES.get((cfg.optimizer or {}).get("type"), ())
    for name, p in [(n, p) for n, p in params.items() if n not in counters]:
        for prefix in prefixes:
            params[f"{prefix}.{name}"] = replace(p, dtype=dtypes.cast_dtype("F32", cast_to))


def _from_source(name: str, src: Strategy, shape, stored, cast_to, padded: bool,
                 keep: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[int, ...] | None, str, ParamLayout | None]:
    """Shape, full stored shape and dtype of a weight the source holds, and the source's
    layout re-expressed with the logical shape when it stores the weight flat. A
    Megatron source (`padded`) wins on the vocab padding of dim 0 (a larger dim 0);
    otherwise the template's shape must agree."""
    s = src.params[name]
    dtype = dtypes.cast_dtype(s.dtype, cast_to, keep)
    if s.shape == shape or (stored and s.shape == stored and not s.is_split):
        if s.shape != shape:  # a full checkpoint stores the fused weight flat
            return shape, stored, dtype, replace(s, shape=shape, tensor_map=((),) * len(shape), stored_shape=stored)
        return shape, stored, dtype, None
    if padded and len(s.shape) == len(shape) and s.shape[1:] == shape[1:] and s.shape[0] > shape[0] and stored is None:
        return s.shape, None, dtype, None  # e.g. a vocabulary padded for Megatron
    raise ConfigError(f"parameter {name}: the checkpoint holds shape {list(s.shape)}, but model_config gives {list(stored or shape)}; check model.model_config")


def _match_source(template: Template, scheme: str, src: Strategy, params: dict[str, ParamLayout],
                  pc, cast_to: str | None, flat: dict[str, ParamLayout]) -> None:
    """Name for name, the generated strategy must cover the source: optimizer states
    follow their weight (stored flat where it is: re-expressed in `flat`), MindSpore's
    counters go whole to every stage, anything else the template does not know is an
    error, as is a template weight the source lacks."""
    unknown = []
    for name, s in src.params.items():
        if name in params:
            continue
        dtype = dtypes.cast_dtype(s.dtype, cast_to)
        base = next((name[len(p):] for p in OPTIMIZER_PREFIXES if name.startswith(p)), None)
        if base in flat and s.shape == flat[base].stored() and not s.is_split:
            s = flat[name] = replace(s, shape=flat[base].shape, tensor_map=flat[base].tensor_map, stored_shape=flat[base].stored_shape)
        if base in params and s.shape == params[base].shape:
            params[name] = replace(params[base], dtype=dtype)
        elif name in BOOKKEEPING:
            every = tuple(range(pc.pipeline_stage))
            params[name] = ParamLayout(s.shape, dtype, every, (pc.replicas, pc.model_parallel), ((),) * len(s.shape))
        else:
            unknown.append(name)
    if unknown:
        raise LayoutError(f"checkpoint weight {unknown[0]} is not in template {template.name} ({scheme} names)"
                          + _more(unknown) + "; check model.arch and model.model_config")
    missing = sorted(n for n in params if n not in src.params)
    if missing:
        ends = {w.names[scheme] for w in template.weights_of(scheme) if w.place in ("embedding", "output")}
        hint = "set model_config.tie_word_embeddings to match the checkpoint" if missing[0] in ends else "check model.model_config"
        raise LayoutError(f"template {template.name} ({scheme} names) expects weight {missing[0]}, which the checkpoint lacks"
                          + _more(missing) + f"; {hint}")


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""
