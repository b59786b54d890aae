"""The job file: a MindSpore Transformers training YAML works as is (SPEC 3).

The runner reads its own keys and ignores the rest of a training YAML; a top-level key
within edit distance 2 of one of its keys is taken for a typo. Values are checked
against the types below and errors name the key. Sections only the runner has
(`lora`, `preprocess_data`) reject unknown keys."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from runner.errors import ConfigError, cause, shown
from runner.log import warn
from runner.preprocess import PREPROCESS_KEYS, validate_section as check_preprocess

OUTPUT_FORMATS = ("safetensors", "ckpt", "hf", "megatron", "mindformers")

# key: (expected types, default, allowed values or None)
TOP_KEYS: dict[str, tuple[tuple[type, ...], Any, tuple | None]] = {
    "load_checkpoint": ((str,), "", None),
    "src_strategy_path_or_dir": ((str,), "", None),
    "dst_strategy_path_or_dir": ((str,), "", None),
    "auto_trans_ckpt": ((bool,), True, None),
    "only_save_strategy": ((bool,), False, None),
    "use_parallel": ((bool,), True, None),
    "parallel_config": ((dict,), {}, None),
    "parallel": ((dict,), {}, None),
    "model": ((dict,), {}, None),
    "moe_config": ((dict,), {}, None),  # MindSpore Transformers keeps expert_num here
    "optimizer": ((dict,), {}, None),  # its type names the optimizer states a training run holds
    "pretrained_model_dir": ((str,), "", None),  # MindSpore Transformers 1.7: the HF folder with config.json
    "use_legacy": ((bool,), True, None),  # MindSpore Transformers 1.7: false = its mcore models' names
    "transform_process_num": ((int,), 1, None),
    "transform_by_rank": ((bool,), False, None),
    "mpi_timeout": ((int, float), 600, None),  # seconds a rank may make no progress under MPI
    "shared_disk": ((str, bool), "auto", ("auto", True, False)),
    "output_dir": ((str,), "./output", None),
    "output_format": ((str,), "", ("",) + OUTPUT_FORMATS),  # "": as the source (output_format_for)
    "load_ckpt_format": ((str,), "", ("", "ckpt", "safetensors")),
    "strategy_format": ((str,), "json", ("json", "mindspore")),
    "prefix": ((str,), "checkpoint_", None),
    "dtype": ((str, type(None)), None, (None, "bf16", "fp16", "fp32")),
    "verify": ((bool,), False, None),
    "lora": ((dict, type(None)), None, None),
    "preprocess_data": ((dict, type(None)), None, None),
    "transformer_impl": ((str,), "transformer_engine", ("transformer_engine", "local")),
    "megatron_naming": ((str,), "core", ("core", "legacy")),
    "megatron_format": ((str,), "torch", ("torch", "torch_dist")),
    "make_vocab_size_divisible_by": ((int,), 128, None),
    "iteration": ((int, str), 1, None),  # or "release", as Megatron names a release checkpoint
    "reference_hf_dir": ((str,), "", None),
    "max_shard_size": ((str, int), "5GB", None),
}

PARALLEL_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "data_parallel": ((int,), 1),
    "model_parallel": ((int,), 1),
    "pipeline_stage": ((int,), 1),
    "expert_parallel": ((int,), 1),
    "expert_tensor_parallel": ((int,), 0),
    "context_parallel": ((int,), 1),
    "vocab_emb_dp": ((bool,), True),
    "optimizer_shard": ((bool,), False),
}

# parallel_config keys of MindSpore Transformers the runner does not read: never typos.
TRAINING_PARALLEL_KEYS = frozenset("""
micro_batch_num seq_split_num use_seq_parallel gradient_aggregation_group context_parallel_algo
ulysses_degree_in_cp mem_coeff micro_batch_interleave_num pipeline_interleave pipeline_scheduler
""".split())

# Top-level keys of MindSpore Transformers training YAMLs: never taken for typos.
TRAINING_YAML_KEYS = frozenset("""
seed run_mode output_dir load_checkpoint src_strategy_path_or_dir auto_trans_ckpt
only_save_strategy resume_training use_parallel trainer do_eval eval_step_interval eval_epoch_interval
runner_config runner_wrapper optimizer lr_schedule train_dataset train_dataset_task eval_dataset
eval_dataset_task context parallel parallel_config micro_batch_interleave_num model moe_config
recompute_config callbacks eval_callbacks metric processor profile profile_start_step profile_stop_step
profile_communication profile_memory init_start_profile layer_scale layer_decay lr_scale lr_scale_factor
remote_save_url auto_tune filepath_prefix autotune_per_step ignore_data_skip data_skip_steps
transform_process_num local_rank device_num use_legacy pretrained_model_dir print_separate_loss
remove_redundancy load_balance swap_config monitor_config tensorboard ckpt_use_legacy_format
use_past_check load_ckpt_async balance_parallel_config
""".split())


@dataclass(frozen=True)
class ParallelConfig:
    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: int = 0  # Megatron's expert_tensor_parallel_size; 0: model_parallel
    context_parallel: int = 1
    vocab_emb_dp: bool = True
    optimizer_shard: bool = False
    # MindSpore's parallel_optimizer_config: shard over this many replicas (-1: all of
    # them); parameters smaller than the threshold (KB) stay whole
    optimizer_weight_shard_size: int = -1
    parallel_optimizer_threshold: int = 64

    @property
    def replicas(self) -> int:
        """Ranks of a stage that hold the same tensor-parallel slice of a dense weight:
        MindSpore Transformers replicates weights over data x context parallel."""
        return self.data_parallel * self.context_parallel

    @property
    def world_size(self) -> int:
        return self.replicas * self.model_parallel * self.pipeline_stage


@dataclass(frozen=True)
class JobConfig:
    """The runner's view of a job file; every key of SPEC 3, checked."""

    load_checkpoint: str = ""
    src_strategy_path_or_dir: str = ""
    dst_strategy_path_or_dir: str = ""
    auto_trans_ckpt: bool = True
    only_save_strategy: bool = False
    use_parallel: bool = True
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    model: Mapping[str, Any] = field(default_factory=dict)
    moe_config: Mapping[str, Any] = field(default_factory=dict)
    optimizer: Mapping[str, Any] = field(default_factory=dict)
    pretrained_model_dir: str = ""
    use_legacy: bool = True
    transform_process_num: int = 1
    transform_by_rank: bool = False
    mpi_timeout: float = 600
    shared_disk: str | bool = "auto"
    output_dir: str = "./output"
    output_format: str = ""
    load_ckpt_format: str = ""
    strategy_format: str = "json"
    prefix: str = "checkpoint_"
    dtype: str | None = None
    verify: bool = False
    lora: Mapping[str, Any] | None = None
    preprocess_data: Mapping[str, Any] | None = None
    transformer_impl: str = "transformer_engine"
    megatron_naming: str = "core"
    megatron_format: str = "torch"
    make_vocab_size_divisible_by: int = 128
    iteration: int | str = 1
    reference_hf_dir: str = ""
    max_shard_size: str | int = "5GB"
    source_file: str = ""  # the job file's own path, for messages and the manifest

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    def options(self) -> dict[str, Any]:
        """What the job does, independent of where files are (for the job digest)."""
        keys = ("auto_trans_ckpt", "use_parallel", "output_format", "strategy_format", "prefix", "dtype",
                "transformer_impl", "megatron_naming", "megatron_format", "make_vocab_size_divisible_by", "iteration", "max_shard_size")
        out = {k: getattr(self, k) for k in keys}
        out["lora"] = {k: v for k, v in (self.lora or {}).items() if k != "adapter"}
        return out


def output_format_for(cfg: JobConfig, suffixes: set[str]) -> JobConfig:
    """`cfg` with its output_format settled for a source whose files have `suffixes`
    (SPEC 3; none: no checkpoint read): as given; else load_ckpt_format; else ckpt for
    a .ckpt source; else safetensors.
    A load_ckpt_format the source's files do not have is an error naming the key."""
    if cfg.load_ckpt_format and suffixes and suffixes != {f".{cfg.load_ckpt_format}"}:
        raise ConfigError(f"config key load_ckpt_format: {cfg.load_ckpt_format}, but load_checkpoint {cfg.load_checkpoint} "
                          f"holds {', '.join(sorted(suffixes))} files; set it to the source's format or leave it out")
    if cfg.output_format:
        return cfg
    fmt = cfg.load_ckpt_format or ("ckpt" if suffixes == {".ckpt"} else "safetensors")
    return replace(cfg, output_format=fmt)


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def closest(key: str, known) -> str | None:
    best = min(known, key=lambda k: edit_distance(key, k), default=None)
    return best if best is not None and edit_distance(key, best) <= 2 else None


def check_value(path: str, value: Any, types: tuple[type, ...], allowed: tuple | None = None) -> Any:
    """Check one value's type (bool is not an int here) and allowed values."""
    ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in types)
    if not ok:
        names = " or ".join("null" if t is type(None) else {"dict": "mapping"}.get(t.__name__, t.__name__) for t in types)
        raise ConfigError(f"config key {path}: expected {names}, got {type(value).__name__} {value!r}")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"config key {path}: {value!r} is not one of {', '.join(map(repr, allowed))}")
    return value


def check_section(section: str, raw: Any, keys: Mapping[str, tuple], required: tuple[str, ...] = ()) -> dict:
    """Check a runner-only section: unknown keys are errors; fill in defaults."""
    if raw is None:
        raw = {}
    check_value(section, raw, (dict,))
    for k in raw:
        if k not in keys:
            hint = closest(k, keys)
            raise ConfigError(f"config key {section}.{k} is unknown" + (f"; did you mean {section}.{hint}?" if hint else f" (known: {', '.join(keys)})"))
    out = {}
    for k, spec in keys.items():
        types, default = spec[0], spec[1]
        allowed = spec[2] if len(spec) > 2 else None
        if k in raw:
            out[k] = check_value(f"{section}.{k}", raw[k], types, allowed)
        elif k in required:
            raise ConfigError(f"config key {section}.{k} is required")
        else:
            out[k] = default
    return out


LORA_KEYS = {
    "adapter": ((str, type(None)), ""),
    "scaling": ((int, float, type(None)), None),
}


def check_lora(raw: Any) -> Mapping[str, Any]:
    """Check the job's `lora:` section (unknown keys are errors naming `lora.<key>`)."""
    out = check_section("lora", raw, LORA_KEYS)
    out["adapter"] = out["adapter"] or ""
    if out["scaling"] is not None:
        out["scaling"] = float(out["scaling"])
        if not math.isfinite(out["scaling"]):
            raise ConfigError(f"config key lora.scaling: expected a finite number, got {out['scaling']}")
    return out


def _parallel_optimizer(parallel: Mapping[str, Any], has_optimizer_shard: bool) -> dict[str, Any]:
    """MindSpore's parallel optimizer settings from a training YAML's `parallel` section:
    enable_parallel_optimizer, and parallel_optimizer_config's optimizer_weight_shard_size
    and parallel_optimizer_threshold (KB; -1 means MindSpore's default, 64)."""
    out: dict[str, Any] = {}
    opt = parallel.get("enable_parallel_optimizer")
    if opt is not None and not has_optimizer_shard:
        out["optimizer_shard"] = check_value("parallel.enable_parallel_optimizer", opt, (bool,))
    poc = parallel.get("parallel_optimizer_config") or {}
    check_value("parallel.parallel_optimizer_config", poc, (dict,))
    for key, where in (("optimizer_weight_shard_size", poc), ("optimizer_weight_shard_size", parallel),
                       ("parallel_optimizer_threshold", poc)):
        if where.get(key) is not None and key not in out:
            path = "parallel." + ("parallel_optimizer_config." if where is poc else "") + key
            v = check_value(path, where[key], (int,))
            if v != -1 and v < (1 if key == "optimizer_weight_shard_size" else 0):
                raise ConfigError(f"config key {path}: expected -1 or a {'positive' if key == 'optimizer_weight_shard_size' else 'non-negative'} integer, got {v}")
            out[key] = 64 if key == "parallel_optimizer_threshold" and v == -1 else v
    return out


def load(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Read a job file plus `key=value` overrides into a checked JobConfig."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.load(str(path)) if path is not None else OmegaConf.create({})
    except FileNotFoundError:
        raise ConfigError(f"job file {shown(path)} does not exist") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"job file {path}: cannot parse YAML ({where}{cause(e.problem or '')})") from None
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError) as e:  # YAMLError: a NUL byte, bad encoding
        raise ConfigError(f"job file {path}: cannot parse YAML ({cause(e)})") from None
    if not OmegaConf.is_dict(cfg):
        raise ConfigError(f"job file {path}: expected a mapping of keys at the top level")
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"job file {path}: {cause(e)}") from None
    except yaml.YAMLError as e:  # an override's value is YAML: `load_checkpoint=[1,2`
        raise ConfigError(f"overrides {' '.join(overrides)!r}: cannot parse a value as YAML ({cause(e)})") from None
    return from_mapping(raw, str(path or ""))


def from_mapping(raw: Mapping[str, Any], source_file: str = "") -> JobConfig:
    """Check an already-parsed job mapping (the Python API's entry point)."""
    for k in raw:
        if not isinstance(k, str):
            raise ConfigError(f"config key {k!r} is not a string")
        if k not in TOP_KEYS and k not in TRAINING_YAML_KEYS:
            hint = closest(k, TOP_KEYS)
            if hint is not None:
                raise ConfigError(f"config key {k} is unknown; did you mean {hint}?")
    if raw.get("transform_process_num") == "auto":  # one worker per core this process may run on
        raw = {**raw, "transform_process_num": len(os.sched_getaffinity(0))}
    values: dict[str, Any] = {}
    for k, (types, default, allowed) in TOP_KEYS.items():
        if k in raw and raw[k] is not None or k in ("dtype", "lora", "preprocess_data"):
            values[k] = check_value(k, raw.get(k, default), types, allowed)
        else:
            values[k] = default
    values["dtype"] = values["dtype"] or None
    pc = {k: check_value(f"parallel_config.{k}", values["parallel_config"][k], t)
          for k, (t, _d) in PARALLEL_KEYS.items() if k in values["parallel_config"]}
    for k in values["parallel_config"]:  # other keys are ignored, as a training YAML has many
        hint = closest(str(k), PARALLEL_KEYS) if k not in PARALLEL_KEYS and k not in TRAINING_PARALLEL_KEYS else None
        if hint:
            warn(f"config key parallel_config.{k} is not one the runner reads and is ignored; did you mean parallel_config.{hint}?")
    if "vocab_emb_dp" not in pc and not values["use_legacy"]:
        pc["vocab_emb_dp"] = False  # MindSpore Transformers 1.7's mcore models' default
    pc.update(_parallel_optimizer(values.pop("parallel"), "optimizer_shard" in pc))
    parallel = ParallelConfig(**pc)
    for k in ("data_parallel", "model_parallel", "pipeline_stage", "expert_parallel", "context_parallel"):
        if getattr(parallel, k) < 1:
            raise ConfigError(f"config key parallel_config.{k}: must be >= 1, got {getattr(parallel, k)}")
    if parallel.expert_tensor_parallel < 0:
        raise ConfigError(f"config key parallel_config.expert_tensor_parallel: must be >= 1 (or 0: model_parallel), got {parallel.expert_tensor_parallel}")
    it = values["iteration"]
    if it != "release" and (isinstance(it, str) or it < 0):
        raise ConfigError(f"config key iteration: expected a number >= 0 or 'release', got {values['iteration']!r}")
    if not 0 < values["mpi_timeout"] < float("inf"):
        raise ConfigError(f"config key mpi_timeout: expected a positive number of seconds, got {values['mpi_timeout']!r}")
    if values["transform_process_num"] < 1:
        raise ConfigError("config key transform_process_num: must be >= 1 or auto")
    if any(c in values["prefix"] for c in "/\\\0"):  # it becomes part of each rank file's name
        raise ConfigError(f"config key prefix: {values['prefix']!r} must be a file name stem, without '/', '\\' or NUL")
    values["parallel_config"] = parallel
    if values["lora"] is not None:
        values["lora"] = check_lora(values["lora"])
    if values["preprocess_data"] is not None:
        values["preprocess_data"] = check_preprocess(values["preprocess_data"])
    return JobConfig(**values, source_file=source_file)


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(map(_yaml_value, value))}]"
    return repr(value) if value == "" else str(value)


# Defaults that depend on the source, as --help shows them.
COMPUTED_DEFAULTS = {"output_format": "the source's: ckpt for .ckpt files, else safetensors",
                     "load_ckpt_format": "any (MindSpore Transformers': read only files of this format)"}


def describe_keys() -> str:
    """The job keys with their defaults and allowed values, from the schemas (for --help)."""
    sections = {"parallel_config": PARALLEL_KEYS, "lora": LORA_KEYS}
    rows = []
    for key, (_types, default, allowed) in TOP_KEYS.items():
        if key in sections:
            rows += [(f"{key}.{k}", _yaml_value(spec[1])) for k, spec in sections[key].items()]
        elif key == "preprocess_data":
            rows += [(f"{key}.{k}", "required: " + spec.expected if spec.required else _yaml_value(spec.default))
                     for k, spec in PREPROCESS_KEYS.items()]
        elif key == "model":
            rows.append(("model.arch, model.model_config.*", "from config.json for an HF source; else a template of strategies/"))
        elif key not in ("parallel", "moe_config"):  # read from training YAMLs, never needed
            shown = COMPUTED_DEFAULTS.get(key, _yaml_value(default))
            rows.append((key, shown + (f"  (one of: {', '.join(_yaml_value(v) for v in allowed if v != '')})" if allowed else "")))
    width = max(len(k) for k, _ in rows)
    return "job keys (in the job file or as key=value), with their defaults:\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
