"""The job file: a MindSpore Transformers training YAML works as is (SPEC 3).

The runner reads its own keys and ignores the rest of a training YAML; a top-level key
within edit distance 2 of one of its keys is taken for a typo. Values are checked
against the types below and errors name the key. Sections only the runner has
(`lora`, `preprocess_data`) reject unknown keys."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from runner.errors import ConfigError, one_line

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
    "transform_process_num": ((int,), 1, None),
    "transform_by_rank": ((bool,), False, None),
    "shared_disk": ((str, bool), "auto", ("auto", True, False)),
    "output_dir": ((str,), "./output", None),
    "output_format": ((str,), "safetensors", OUTPUT_FORMATS),
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
    "iteration": ((int,), 1, None),
    "reference_hf_dir": ((str,), "", None),
    "max_shard_size": ((str, int), "5GB", None),
}

PARALLEL_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "data_parallel": ((int,), 1),
    "model_parallel": ((int,), 1),
    "pipeline_stage": ((int,), 1),
    "expert_parallel": ((int,), 1),
    "vocab_emb_dp": ((bool,), True),
    "optimizer_shard": ((bool,), False),
}

# Top-level keys of MindSpore Transformers training YAMLs: never taken for typos.
TRAINING_YAML_KEYS = frozenset("""
seed run_mode output_dir load_checkpoint load_ckpt_format src_strategy_path_or_dir auto_trans_ckpt
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
    vocab_emb_dp: bool = True
    optimizer_shard: bool = False

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage


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
    transform_process_num: int = 1
    transform_by_rank: bool = False
    shared_disk: str | bool = "auto"
    output_dir: str = "./output"
    output_format: str = "safetensors"
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
    iteration: int = 1
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


def load(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Read a job file plus `key=value` overrides into a checked JobConfig."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.load(str(path)) if path is not None else OmegaConf.create({})
    except FileNotFoundError:
        raise ConfigError(f"job file {path} does not exist") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"job file {path}: cannot parse YAML ({where}{e.problem})") from None
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError) as e:  # YAMLError: a NUL byte, bad encoding
        raise ConfigError(f"job file {path}: cannot parse YAML ({one_line(str(e).splitlines()[0])})") from None
    if not OmegaConf.is_dict(cfg):
        raise ConfigError(f"job file {path}: expected a mapping of keys at the top level")
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"job file {path}: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:  # an override's value is YAML: `load_checkpoint=[1,2`
        raise ConfigError(f"overrides {' '.join(overrides)!r}: cannot parse a value as YAML ({one_line(str(e).splitlines()[0])})") from None
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
    opt = values.pop("parallel").get("enable_parallel_optimizer")
    if opt is not None and "optimizer_shard" not in pc:
        pc["optimizer_shard"] = check_value("parallel.enable_parallel_optimizer", opt, (bool,))
    parallel = ParallelConfig(**pc)
    for k in ("data_parallel", "model_parallel", "pipeline_stage", "expert_parallel"):
        if getattr(parallel, k) < 1:
            raise ConfigError(f"config key parallel_config.{k}: must be >= 1, got {getattr(parallel, k)}")
    if values["transform_process_num"] < 1:
        raise ConfigError("config key transform_process_num: must be >= 1 or auto")
    if any(c in values["prefix"] for c in "/\\\0"):  # it becomes part of each rank file's name
        raise ConfigError(f"config key prefix: {values['prefix']!r} must be a file name stem, without '/', '\\' or NUL")
    values["parallel_config"] = parallel
    if values["lora"] is not None:
        from runner.lora import validate_section as check_lora

        values["lora"] = check_lora(values["lora"])
    if values["preprocess_data"] is not None:
        from runner.preprocess import validate_section as check_preprocess

        values["preprocess_data"] = check_preprocess(values["preprocess_data"])
    return JobConfig(**values, source_file=source_file)


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(map(_yaml_value, value))}]"
    return repr(value) if value == "" else str(value)


def describe_keys() -> str:
    """The job keys with their defaults and allowed values, from the schemas (for --help)."""
    from runner.lora import SECTION_KEYS as LORA_KEYS
    from runner.preprocess import PREPROCESS_KEYS

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
            rows.append((key, _yaml_value(default) + (f"  (one of: {', '.join(map(_yaml_value, allowed))})" if allowed else "")))
    width = max(len(k) for k, _ in rows)
    return "job keys (in the job file or as key=value), with their defaults:\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
