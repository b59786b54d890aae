"""Strategy files of either kind: native JSON (runner.strategy) or MindSpore protobuf
(runner.formats.mindspore_strategy)."""

from __future__ import annotations

from pathlib import Path

from runner.errors import FormatError
from runner.formats import mindspore_strategy
from runner.strategy import Strategy, load_native, strategy_files


def load(path: Path) -> Strategy:
    """Read a strategy file or folder (native JSON or MindSpore protobuf), merged.

    MindSpore strategies carry no shapes; the job fills them in from checkpoint headers."""
    files = strategy_files(path)
    kinds = {f.suffix for f in files}
    if kinds == {".ckpt"}:
        return mindspore_strategy.load(files, str(path))
    if kinds != {".json"}:
        raise FormatError(f"strategy folder {path} mixes .json and .ckpt strategy files")
    return load_native(files, path)
