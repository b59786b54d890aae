"""Strategy files of either kind: native JSON (runner.strategy) or MindSpore protobuf
(runner.formats.mindspore_strategy)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from runner import durable
from runner.errors import FormatError, one_line
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


# -- the job's strategy folder (SPEC 3, "Never lose data") -------------------------------
RECORD_FORMAT = "autotrans-strategy-record"


def record_path(folder: Path) -> Path:
    """The list of strategy files the runner wrote into `folder`; kept beside it, so a
    listing of the folder shows strategy files only."""
    return folder.with_name(f".autotrans-{folder.name}-record.json")


def own_folder(folder: Path, names: list[str]) -> None:
    """Make `folder` ready for a job that writes the strategy files `names`: remove the
    files an earlier job recorded that this one will not write (regular files only, never
    through a symlink); refuse when it holds anything no record vouches for (a record that
    does not parse vouches for nothing), even under a name this job writes."""
    folder = Path(folder)
    if not folder.exists():
        durable.write_json(record_path(folder), {"format": RECORD_FORMAT, "files": sorted(names)})
        return
    durable.make_folder(folder)  # refuses a symlinked folder
    recorded = _recorded(record_path(folder))
    ours = {n for n in recorded if (folder / n).is_file() and not (folder / n).is_symlink()}
    ours |= {n + durable.PARTIAL for n in ours | set(names)}  # temporaries of a killed run
    present = {p.name for p in folder.iterdir()}
    foreign = sorted(present - ours)
    if foreign:
        raise FormatError(one_line(f"{folder} holds files autotrans did not write ({', '.join(foreign[:3])}"
                                   f"{', ...' if len(foreign) > 3 else ''}); move them away or choose another output_dir"))
    durable.write_json(record_path(folder), {"format": RECORD_FORMAT, "files": sorted(set(names) | set(recorded))})  # before removing: a crash leaves nothing unlisted
    for name in sorted(present & ours - set(names)):
        os.unlink(folder / name)  # unlink removes a symlink planted since, never its target
    durable.write_json(record_path(folder), {"format": RECORD_FORMAT, "files": sorted(names)})
    durable.fsync_dir(folder)


def _recorded(path: Path) -> list[str]:
    if path.is_symlink() or not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # unreadable: nothing is proven ours, so nothing is removed
    files = doc.get("files") if isinstance(doc, dict) and doc.get("format") == RECORD_FORMAT else None
    return [n for n in files if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")] if isinstance(files, list) else []
