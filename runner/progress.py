"""One progress bar with bytes done and rate (tqdm), or nothing when disabled."""

from __future__ import annotations

import sys

from runner import log


class Progress:
    def __init__(self, total: int, enabled: bool = True, desc: str = "transform", tty_only: bool = True):
        log.release()  # warnings from preparing go above the bar
        self._bar = None
        if enabled:
            from tqdm import tqdm

            # decimal units (kB, MB, GB), as in the closing summary;
            # disable=None: no bar when stderr is not a terminal (logs, CI); under mpiexec
            # stderr is always a pipe to the launcher, which may well show a terminal
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc,
                             file=sys.stderr, disable=None if tty_only else False, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self._bar is not None and n:
            self._bar.update(n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
