"""Hugging Face model folders as output (SPEC 6): `model-0000x-of-0000N.safetensors`
cut by `max_shard_size`, `model.safetensors.index.json`, and config, generation
config and tokenizer files copied from the reference HF folder."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from runner import dtypes
from runner.errors import ConfigError
from runner.execute import PARTIAL, fsync_dir
from runner.formats.base import TensorInfo
from runner.log import warn
from runner.outputs import write_json_atomic

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
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
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
    write_json_atomic(path, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return path


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + PARTIAL)
    shutil.copyfile(src, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


def copy_reference(folder: Path, reference: Path | None, config: dict | None) -> list[Path]:
    """Copy config and the tokenizer files `reference` has; write `config` when the
    reference has no config.json. Warns when that leaves the output with no tokenizer."""
    written = []
    for name in CONFIG_FILES + TOKENIZER_FILES:
        src = reference / name if reference else None
        if src is not None and src.is_file():
            _copy_atomic(src, folder / name)
            written.append(folder / name)
        elif name == "config.json" and config is not None:
            write_json_atomic(folder / name, config)
            written.append(folder / name)
            warn(f"no config.json in {reference or 'reference_hf_dir (not set)'}: wrote one from the checkpoint's sizes; check it before serving")
    if not any((folder / n).exists() for n in TOKENIZER_FILES):
        where = f"reference_hf_dir {reference} holds none" if reference else "reference_hf_dir is not set"
        warn(f"the HF output has no tokenizer files ({where}); copy the model's tokenizer in before serving it")
    fsync_dir(folder)
    return written
