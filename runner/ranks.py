"""Gaps in rank and stage numbers. The numbers come from folder names and strategy
files, so a corrupt one can be huge: never enumerate up to the largest."""

from __future__ import annotations

from typing import Iterable


def gaps(present: Iterable[int], most: int = 5) -> list[int]:
    """The first `most` numbers of 0..max(present) that `present` lacks."""
    out: list[int] = []
    expect = 0
    for n in sorted(set(present)):
        while expect < n and len(out) < most:
            out.append(expect)
            expect += 1
        if len(out) >= most:
            break
        expect = max(expect, n + 1)
    return out
