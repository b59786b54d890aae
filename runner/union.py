"""The source checkpoint as the union of what every MPI rank sees (SPEC 9).

Without a shared disk each node holds only some of the source's rank folders, and
`load_checkpoint` may resolve to a different local path on each node. Every rank
describes what it sees relative to its own `load_checkpoint`; the union is the source
(a gap is judged on the union), and each source rank is served by one rank that sees it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from runner.errors import ConfigError, FormatError
from runner.source import Source, check_gap, discover, newest_in, rank_folders

# What one rank sees: the source's kind ("" when nothing), and per source rank its
# files as (path relative to load_checkpoint, size).
View = tuple[str, dict[int, list[tuple[str, int]]]]


def local_view(root: Path) -> View:
    if not root.exists():
        return "", {}
    folders = rank_folders(root) if root.is_dir() else {}
    if folders:
        kind, files = "distributed", {r: (newest_in(p),) for r, p in folders.items()}
    else:
        src = discover(root)
        kind, files = src.kind, src.files
    return kind, {r: [(str(p.relative_to(root)), p.stat().st_size) for p in ps] for r, ps in files.items()}


@dataclass(frozen=True)
class Union:
    source: Source
    seers: dict[int, tuple[int, ...]]  # source rank -> the MPI ranks that see its files

    def server(self, src_rank: int) -> int:
        """The MPI rank that reads a source rank's headers and serves its slices; spread
        over the ranks that see it."""
        s = self.seers[src_rank]
        return s[src_rank % len(s)]


def union_source(root: Path, views: list[View], shared_disk: str | bool) -> Union:
    """Join every MPI rank's view (index = MPI rank) into one source."""
    kind = _one_kind(root, [k for k, _ in views])
    files: dict[int, list[tuple[str, int]]] = {}
    seers: dict[int, list[int]] = {}
    for mpi_rank, (_kind, seen) in enumerate(views):
        for s, entries in seen.items():
            if s in files and files[s] != entries:
                raise FormatError(f"source rank {s} under {root} differs between MPI ranks {seers[s][0]} and {mpi_rank} "
                                  f"({_show(files[s])} vs {_show(entries)}); every node must hold the same files")
            files.setdefault(s, entries)
            seers.setdefault(s, []).append(mpi_rank)
    _check_shared(root, [set(seen) for _k, seen in views], set(files), shared_disk)
    if kind == "distributed":
        check_gap(root, files)
        if len(files) == 1:
            kind = "full"
    source = Source(root, kind, {s: tuple(root / rel for rel, _ in entries) for s, entries in sorted(files.items())})
    return Union(source, {s: tuple(r) for s, r in seers.items()})


# What one rank sees of a conversion's source: its kind ("" when nothing) and its files,
# path relative to load_checkpoint -> size.
FileView = tuple[str, dict[str, int]]


@dataclass(frozen=True)
class FileUnion:
    """A conversion's source files as the union of what the ranks see (SPEC 9)."""

    kind: str
    sizes: dict[str, int]  # relative path -> size
    seers: dict[str, tuple[int, ...]]  # relative path -> the MPI ranks that see it

    @cached_property
    def _index(self) -> dict[str, int]:
        return {rel: i for i, rel in enumerate(self.sizes)}

    def server(self, rel: str) -> int:
        """The MPI rank that reads this file's header: spread over the ranks that see it."""
        s = self.seers[rel]
        return s[self._index[rel] % len(s)]

    def by_rank(self, source: Source) -> Union:
        """The union per source rank of the compiled job: the ranks that see all its files."""
        seers = {}
        for r, paths in source.files.items():
            common = set.intersection(*(set(self.seers[str(p.relative_to(source.root))]) for p in paths))
            if not common:
                raise FormatError(f"no MPI rank sees all of {', '.join(str(p) for p in paths)}; "
                                  "give some node every file of each source rank")
            seers[r] = tuple(sorted(common))
        return Union(source, seers)


def union_files(root: Path, views: list[FileView], shared_disk: str | bool) -> FileUnion:
    """Join every MPI rank's view of a conversion's source (index = MPI rank)."""
    kind = _one_kind(root, [k for k, _ in views])
    sizes: dict[str, int] = {}
    seers: dict[str, list[int]] = {}
    for mpi_rank, (_kind, seen) in enumerate(views):
        for rel, size in seen.items():
            if sizes.setdefault(rel, size) != size:
                raise FormatError(f"{root / rel} differs between MPI ranks {seers[rel][0]} and {mpi_rank} "
                                  f"({sizes[rel]} vs {size} bytes); every node must hold the same files")
            seers.setdefault(rel, []).append(mpi_rank)
    _check_shared(root, [set(seen) for _k, seen in views], set(sizes), shared_disk)
    return FileUnion(kind, dict(sorted(sizes.items())), {rel: tuple(r) for rel, r in sorted(seers.items())})


def _one_kind(root: Path, kinds: list[str]) -> str:
    found = {k for k in kinds if k}
    if not found:
        raise FormatError(f"load_checkpoint {root} does not exist on any MPI rank")
    if len(found) > 1:
        raise FormatError(f"load_checkpoint {root} is a different kind of checkpoint on different MPI ranks "
                          f"({', '.join(sorted(found))}); give every node the same checkpoint, or parts of it")
    return found.pop()


def _check_shared(root: Path, seen: list[set], every: set, shared_disk: str | bool) -> None:
    if shared_disk is True:
        blind = [r for r, s in enumerate(seen) if s != every]
        if blind:
            raise ConfigError(f"shared_disk: true, but MPI ranks {blind} do not see every source file under {root}; "
                              "set shared_disk: auto (or false) to move slices between nodes")


def _show(entries: list[tuple[str, int]]) -> str:
    return ", ".join(f"{rel} ({size} bytes)" for rel, size in entries)
