"""`autotrans inspect PATH` and `autotrans diff A B`."""

from __future__ import annotations

from pathlib import Path

from runner import strategy as strat
from runner.errors import FormatError, one_line


def _is_strategy(path: Path) -> bool:
    if path.is_file():
        return path.name.startswith(("ckpt_strategy", "merged_ckpt_strategy")) or path.suffix == ".json"
    return path.is_dir() and any(p.name.startswith(("ckpt_strategy", "merged_ckpt_strategy")) for p in path.iterdir())


def inspect(path: str) -> int:
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{path} does not exist")
    if _is_strategy(p):
        s = strat.load(p)
        print(f"strategy ({s.origin}): {s.world_size} ranks in {len(s.stages)} stage(s): {[list(x) for x in s.stages]}")
        print(f"{len(s.params)} parameters")
        for name in sorted(s.params):
            print(one_line(f"  {name}: {strat.describe(s.params[name])}"))
        return 0
    from runner.job import read_headers
    from runner.source import discover

    src = discover(p)
    if src.kind == "megatron":
        from runner.convert.megatron_dir import describe_folder

        print(describe_folder(p))
        return 0
    headers = read_headers(src)
    formats = sorted({f.suffix for files in src.files.values() for f in files})
    print(f"checkpoint ({src.kind}, {', '.join(formats)}): {len(src.ranks)} rank(s)")
    for r in src.ranks:
        h = headers[r]
        nbytes = sum(t.numel * _size(t.dtype) for t in h.values())
        print(one_line(f"rank {r}: {', '.join(str(f) for f in src.files[r])}: {len(h)} tensors, {nbytes} bytes"))
    names = sorted(set().union(*(h.keys() for h in headers.values())))
    print(f"{len(names)} tensors (shapes as stored on the first rank holding each)")
    for n in names:
        r = next(r for r in src.ranks if n in headers[r])
        t = headers[r][n]
        print(one_line(f"  {n}: {list(t.shape)} {t.dtype}"))
    return 0


def _size(dtype: str) -> int:
    from runner.dtypes import itemsize

    return itemsize(dtype)


def diff(a: str, b: str) -> int:
    sa, sb = strat.load(Path(a)), strat.load(Path(b))
    lines = strat.differences(sa, sb)
    if not lines:
        print(f"autotrans: diff: layouts match ({sa.world_size} ranks, {len(sa.params)} parameters)")
        return 0
    print(f"autotrans: diff: {len(lines)} difference(s)")
    for line in lines:
        print(one_line(f"  {line}"))
    return 1
