"""Hugging Face model folders as output (SPEC 6): `model-0000x-of-0000N.safetensors`
cut by `max_shard_size`, `model.safetensors.index.json`, and config, generation
config and tokenizer files copied from the reference HF folder."""

from __future__ import annotations

import re
from pathlib import Path

from runner import dtypes
from runner.errors import ConfigError
from runner.durable import copy_regular, fsync_dir, write_json
from runner.formats.base import TensorInfo
from runner.log import warn
from runner.templates import hf_config

INDEX = "model.safetensors.index.json"
# Every file an HF tokenizer may be saved as; a model has some of them (transformers 5
# saves tokenizer.json + tokenizer_config.json + chat_template.jinja, Llama 2 a tokenizer.model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json")
CONFIG_FILES = ("config.json", "generation_config.json")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: str | int) -> int:
    """Bytes in `max_shard_size`: an int, or "5GB", "500MB", "2GiB" (HF's units)."""
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"config key max_shard_size: {value!r} is not a size such as 5GB, 500MB or 2GiB")
        size = float(m.group(1)) * _UNITS[m.group(2).upper()]  # inf for 400 digits
    if size >= 1 << 63:
        raise ConfigError(f"config key max_shard_size: {value!r} is too large (at most 8 EiB)")
    size = int(size)
    if size <= 0:
        raise ConfigError("config key max_shard_size: must be positive")
    return size


def shard(names: list[str], infos: dict[str, TensorInfo], max_bytes: int) -> list[list[str]]:
    """Consecutive tensors per file, each file at most `max_bytes` unless one tensor
    alone is larger (as HF's save_pretrained does)."""
    out: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = infos[n].numel * dtypes.itemsize(infos[n].dtype)
        if out[-1] and size + nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(n)
        size += nbytes
    return out


def shard_name(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_index(folder: Path, shards: list[list[str]], infos: dict[str, TensorInfo]) -> Path:
    total = sum(infos[n].numel * dtypes.itemsize(infos[n].dtype) for s in shards for n in s)
    weight_map = {n: shard_name(i, len(shards)) for i, s in enumerate(shards) for n in s}
    path = folder / INDEX
    write_json(path, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return path


def reference_files(reference: Path | None, config: dict | None) -> tuple[str, ...]:
    """The config and tokenizer files copy_reference writes: those `reference` has, and
    config.json when it has none and the template gives one (`config`)."""
    def has(name: str) -> bool:
        return reference is not None and ((reference / name).is_file() or (reference / name).is_symlink())

    return tuple(n for n in CONFIG_FILES + TOKENIZER_FILES if has(n) or (n == "config.json" and config is not None))


def copy_reference(folder: Path, reference: Path | None, config: dict | None, names: tuple[str, ...],
                   unquantized: bool = True) -> list[Path]:
    """Copy the files `names` (reference_files) from `reference`, or write `config` as
    config.json when the reference has none; an `unquantized` output (no FP8 block
    scales) gets the reference's config.json without its quantization_config. Warns when
    that leaves the output with no tokenizer."""
    written = []
    for name in names:
        src = reference / name if reference else None
        doc = hf_config(reference) if name == "config.json" and unquantized and reference is not None else {}
        if "quantization_config" in doc:
            write_json(folder / name, {k: v for k, v in doc.items() if k != "quantization_config"})
        elif name == "config.json" and config is not None and (src is None or not (src.exists() or src.is_symlink())):
            write_json(folder / name, config)
            warn(f"no config.json in {reference or 'reference_hf_dir (not set)'}: wrote one from the checkpoint's sizes; check it before serving")
        else:
            copy_regular(src, folder / name)
        written.append(folder / name)
    if not any((folder / n).exists() for n in TOKENIZER_FILES):
        where = f"reference_hf_dir {reference} holds none" if reference else "reference_hf_dir is not set"
        warn(f"the HF output has no tokenizer files ({where}); copy the model's tokenizer in before serving it")
    fsync_dir(folder)
    return written
