"""`autotrans inspect PATH` and `autotrans diff A B`."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from runner import strategy as strat, strategy_files
from runner.convert.megatron_dir import describe_folder
from runner.dtypes import itemsize
from runner.errors import ConfigError, FormatError, one_line, shown
from runner.formats.mindspore_strategy import fill_shapes
from runner.source import discover, rank_folders, read_headers


_DATASET_MAGIC = b"MMIDIDX\x00\x00"  # Megatron's indexed dataset .idx
_DATASET_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"}


def _is_strategy_file(path: Path) -> bool:
    """By content, not name: a native strategy's "format" tag, or a MindSpore protobuf
    whose first field is ParallelStrategyMap's current_stage (a varint; a checkpoint's
    first field is a Value message)."""
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text()).get("format") == strat.FORMAT_TAG
        except (OSError, ValueError, AttributeError):
            return False
    if path.suffix == ".ckpt":
        with open(path, "rb") as f:
            return f.read(1) == b"\x08"
    return False


def _is_strategy(path: Path) -> bool:
    if path.is_file():
        return _is_strategy_file(path)
    return not rank_folders(path) and any(p.is_file() and _is_strategy_file(p) for p in path.iterdir())


def _dataset_index(path: Path) -> Path | None:
    """The Megatron .idx of a dataset .bin or .idx `path`, when it is one."""
    idx = path.with_suffix(".idx")
    if path.suffix not in (".bin", ".idx") or not idx.is_file():
        return None
    with open(idx, "rb") as f:
        return idx if f.read(len(_DATASET_MAGIC)) == _DATASET_MAGIC else None


def _describe_dataset(idx: Path) -> str:
    with open(idx, "rb") as f:
        head = f.read(len(_DATASET_MAGIC) + 8 + 1 + 8 + 8)
    version, code, sequences, documents = struct.unpack_from("<QBQQ", head, len(_DATASET_MAGIC))
    return (f"Megatron indexed dataset {idx.with_suffix('.bin')} + {idx.name} (version {version}, "
            f"{_DATASET_DTYPES.get(code, f'dtype code {code}')} tokens, {sequences} sequences, {documents - 1} documents); "
            "not a checkpoint")


def inspect(path: str) -> int:
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{shown(path)} does not exist")
    idx = _dataset_index(p) if p.is_file() else None
    if idx is not None:
        print(one_line(_describe_dataset(idx)))
        return 0
    if _is_strategy(p):
        _print_layouts(strategy_files.load(p))
        return 0
    src = discover(p)
    if src.kind == "megatron":
        print(describe_folder(p))
        return 0
    headers = read_headers(src)
    formats = sorted({f.suffix for files in src.files.values() for f in files})
    print(one_line(f"checkpoint ({src.kind}, {', '.join(formats)}): {len(src.ranks)} rank(s)"))
    for r in src.ranks:
        h = headers[r]
        nbytes = sum(t.numel * _size(t.dtype) for t in h.values())
        print(one_line(f"rank {r}: {', '.join(str(f) for f in src.files[r])}: {len(h)} tensors, {nbytes} bytes"))
    names = sorted(headers[src.ranks[0]] if len(src.ranks) == 1 else set().union(*(h.keys() for h in headers.values())))
    print(f"{len(names)} tensors (shapes as stored on the first rank holding each)")
    for n in names:
        r = next(r for r in src.ranks if n in headers[r])
        t = headers[r][n]
        print(one_line(f"  {n}: {list(t.shape)} {t.dtype}"))
    beside = p.resolve().parent / "strategy"
    if src.kind == "distributed" and beside.is_dir() and _is_strategy(beside):  # as training and autotrans lay them out
        s = strategy_files.load(beside)
        if s.origin == "mindspore":
            s = fill_shapes(s, headers)
        print(one_line(f"layouts, from the strategy beside it ({beside}):"))
        _print_layouts(s)
    return 0


def _print_layouts(s: strat.Strategy) -> None:
    print(f"strategy ({s.origin}): {s.world_size} ranks in {len(s.stages)} stage(s): {[list(x) for x in s.stages]}")
    print(f"{len(s.params)} parameters")
    for name in sorted(s.params):
        print(one_line(f"  {name}: {strat.describe(s.params[name])}"))


def _size(dtype: str) -> int:
    return itemsize(dtype)


def _strategy_path(path: str) -> Path:
    """`path` as a strategy; a checkpoint given instead is a usage mistake, said so."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{shown(path)} does not exist")
    if _is_strategy(p):
        return p
    beside = p.resolve().parent / "strategy"
    hint = f" (its strategy may be {beside})" if beside.is_dir() and beside != p.resolve() else ""
    raise ConfigError(f"{path} is not a strategy file or folder{hint}: autotrans diff compares layouts; "
                      "compare checkpoints tensor by tensor with autotrans verify A B")


def diff(a: str, b: str) -> int:
    sa, sb = strategy_files.load(_strategy_path(a)), strategy_files.load(_strategy_path(b))
    lines = strat.differences(sa, sb)
    if not lines:
        print(f"autotrans: diff: layouts match ({sa.world_size} ranks, {len(sa.params)} parameters)")
        return 0
    print(f"autotrans: diff: {len(lines)} difference(s)")
    for line in lines:
        print(one_line(f"  {line}"))
    return 1
