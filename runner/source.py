"""Finding the source checkpoint's files (SPEC 4) and reading them as one per rank."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runner.errors import FormatError, shown
from runner.formats import torch_dist
from runner.formats.base import CheckpointReader, TensorInfo
from runner.formats.dcp import METADATA
from runner.formats.registry import CHECKPOINT_SUFFIXES, open_reader
from runner.ranks import gaps

_RANK_DIR = re.compile(r"rank_(\d+)")


def natural_key(name: str) -> list:
    """Sort key that puts `-10_` after `-9_` and `rank_10` after `rank_2`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class Source:
    """A source checkpoint: its kind and the files of each source rank."""

    root: Path
    kind: str  # "distributed", "full", "hf", "megatron"
    files: dict[int, tuple[Path, ...]]

    @property
    def ranks(self) -> list[int]:
        return sorted(self.files)

    def open(self, rank: int) -> "RankReader":
        return RankReader(self.files[rank])


def _checkpoint_files(folder: Path, suffixes: tuple[str, ...] = CHECKPOINT_SUFFIXES) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix in suffixes),
                  key=lambda p: natural_key(p.name))


def rank_folders(root: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in root.iterdir() if p.is_dir() and (m := _RANK_DIR.fullmatch(p.name))}


def newest_in(folder: Path, suffixes: tuple[str, ...] = CHECKPOINT_SUFFIXES) -> Path:
    """The checkpoint a rank folder holds: the highest step when it holds several."""
    files = _checkpoint_files(folder, suffixes)
    if not files:
        raise FormatError(f"rank folder {folder} holds no checkpoint file ({', '.join(suffixes)})")
    return files[-1]


def check_gap(root: Path, ranks) -> None:
    """Rank folders must be rank_0 ... rank_{N-1}; a gap names the missing ones."""
    missing = gaps(ranks)
    if missing:
        more = ", ..." if max(ranks) + 1 - len(ranks) > len(missing) else ""
        raise FormatError(f"{root}: rank folders {', '.join(f'rank_{r}' for r in missing)}{more} are missing (found {len(ranks)} of {max(ranks) + 1})")


def discover(path: Path, ranks: dict[int, Path] | None = None, file_format: str = "") -> Source:
    """Classify `load_checkpoint` and list its files. `ranks` overrides the rank folders
    seen (under MPI without a shared disk, the union of what every node sees).
    `file_format` (MindSpore Transformers' load_ckpt_format: `ckpt`, `safetensors`)
    reads only the files of that format, as MindSpore Transformers does."""
    suffixes = (f".{file_format}",) if file_format else CHECKPOINT_SUFFIXES
    root = Path(path)
    if not root.exists():
        raise FormatError(f"load_checkpoint {shown(root)} does not exist")
    if root.is_file():
        return Source(root, "full", {0: (root,)})
    if (root / ".metadata").is_file():  # a PyTorch DCP folder; with metadata.json, Megatron's torch_dist
        return Source(root, "megatron", {}) if (root / "metadata.json").exists() else Source(root, "full", {0: (root / ".metadata",)})
    if (root / "latest_checkpointed_iteration.txt").exists() or any(
        p.is_dir() and (p.name == "release" or p.name.startswith(("iter_", "mp_rank_"))) for p in root.iterdir()
    ):
        return Source(root, "megatron", {})
    if ranks is None:
        ranks = rank_folders(root)
    if ranks:
        check_gap(root, ranks)
        files = {r: (newest_in(p, suffixes),) for r, p in ranks.items()}
        return Source(root, "distributed" if len(files) > 1 else "full", files)
    loose = _checkpoint_files(root, suffixes)
    if not loose:
        raise FormatError(f"{root} holds no rank_N folders and no checkpoint files")
    if (root / "config.json").exists():
        weights = [p for p in loose if p.suffix == ".safetensors"] or [p for p in loose if p.name.startswith("pytorch_model")]
        return Source(root, "hf", {0: tuple(weights)})
    return Source(root, "full", {0: tuple(loose)})


class RankReader:
    """The files of one source rank read as one checkpoint (base + LoRA, HF shards)."""

    def __init__(self, paths: tuple[Path, ...]):
        self.paths = paths
        self._readers: list[CheckpointReader] = []
        self._owner: dict[str, CheckpointReader] = {}
        self._tensors: dict[str, TensorInfo] = {}
        try:
            for p in paths:
                self._readers.append(open_reader(p))
            if len(self._readers) == 1:  # the reader's own dict: a header may hold millions of names
                self._tensors = self._readers[0].tensors()
                return
            for r in self._readers:
                for name, info in r.tensors().items():
                    if name in self._owner:
                        raise FormatError(f"tensor {name} appears in both {self._owner[name].path} and {r.path}: loose files "
                                          "are parts of one checkpoint; put per-rank files in rank_0/ ... rank_N/ folders")
                    self._owner[name] = r
                    self._tensors[name] = info
        except BaseException:
            self.close()
            raise

    def _reader(self, name: str) -> CheckpointReader:
        return self._owner[name] if self._owner else self._readers[0]

    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    def array(self, name: str) -> np.ndarray:
        return self._reader(name).array(name)

    def locate(self, name: str, arr: np.ndarray) -> tuple[int, int] | None:
        """Where `arr`, a view of tensor `name`, starts in its file (MappedFile.locate)."""
        locate = getattr(self._reader(name), "locate", None)
        return locate(arr) if locate is not None else None

    def release(self) -> None:
        for r in self._readers:
            r.release()

    def close(self) -> None:
        for r in self._readers:
            r.close()


def read_headers(source: Source) -> dict[int, dict[str, TensorInfo]]:
    """Every source rank's tensor headers (and file sizes, checked by the readers): the
    readers' own dicts, not copies, since a header may hold millions of names."""
    out = {}
    for r in source.ranks:
        reader = source.open(r)
        try:
            out[r] = reader.tensors()
        finally:
            reader.close()
    return out


# -- headers, and the files a conversion may read ---------------------------------------------
_PLAIN = (int, float, str, bool, type(None))


@dataclass(frozen=True)
class FileHeader:
    """What compiling a conversion needs of one source file, without its bytes: its
    tensors and, for torch files, the names of its other entries and Megatron's `args`
    as plain values (headers travel between MPI ranks, so plain data only)."""

    tensors: dict[str, TensorInfo]
    objects: tuple[str, ...] = ()
    args: dict | None = None


def _plain(v) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, (list, tuple)) and all(isinstance(x, _PLAIN) for x in v))


def file_header(path: Path) -> FileHeader:
    """One source file's header: a safetensors / ckpt / torch file, or a torch_dist
    folder's `.metadata` (the whole model, with common.pt's args). A torch file is
    unpickled with its tensors memory-mapped, so only its pickle is read."""
    path = Path(path)
    dist = path.name == METADATA and torch_dist.is_torch_dist(path.parent)  # else a plain DCP folder
    reader = torch_dist.TorchDistReader(path.parent) if dist else open_reader(path)
    try:
        objects = getattr(reader, "objects", {})
        args = torch_dist.common(path.parent).get("args") if dist else objects.get("args")
        plain = {k: v for k, v in vars(args).items() if _plain(v)} if isinstance(args, argparse.Namespace) else None
        return FileHeader(dict(reader.tensors()), tuple(objects), plain)
    finally:
        reader.close()


@dataclass(frozen=True)
class SourceFiles:
    """The files a conversion may read, relative to `root` with their sizes: those this
    machine sees, or under MPI without a shared disk the union of what every rank sees,
    with the headers the ranks that see them read (`headers`). A header not given is
    read from this machine's file, once."""

    root: Path
    kind: str
    sizes: dict[str, int]
    headers: dict[str, FileHeader] = field(default_factory=dict)

    def paths(self) -> list[Path]:
        return [self.root / rel for rel in sorted(self.sizes, key=natural_key)]

    def header(self, path: Path) -> FileHeader:
        rel = str(Path(path).relative_to(self.root))
        if rel not in self.headers:
            self.headers[rel] = file_header(path)
        return self.headers[rel]
