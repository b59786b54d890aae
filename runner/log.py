"""The one way the runner talks to its user: `say` (what happened), `warn` (what the
user should know), `debug` (only with --debug). Everything goes to stderr with the
`autotrans:` prefix; under MPI only rank 0 speaks, so a message appears once."""

from __future__ import annotations

import sys

from runner.errors import message_line

_quiet = False
_debug = False
_held: list[str] | None = None  # warnings kept back while a job prepares (hold)


def configure(*, quiet: bool | None = None, debug: bool | None = None) -> None:
    """quiet: this process holds its tongue (an MPI rank other than 0); debug: --debug."""
    global _quiet, _debug
    if quiet is not None:
        _quiet = quiet
    if debug is not None:
        _debug = debug


def _emit(line: str) -> None:
    """One line, whatever names from files or paths it holds (a newline or a terminal
    escape in them is shown escaped: no fake line, no escape sequence; a long quoted
    name or value is cut: message_line)."""
    if not _quiet:
        print(message_line(line), file=sys.stderr, flush=True)


def hold() -> None:
    """Keep warnings back until `release`, so that when preparing fails its one error
    line comes first and the warnings that led to it follow (SPEC 3)."""
    global _held
    if _held is None:
        _held = []


def release() -> None:
    """Say the warnings held back, and stop holding: the job got going, or failed."""
    global _held
    held, _held = _held or [], None
    for line in held:
        _emit(line)


def count(n: int, noun: str) -> str:
    """"1 file", "2 files": a number with its noun in the agreeing number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def say(msg: str) -> None:
    release()
    _emit(f"autotrans: {msg}")


def warn(msg: str) -> None:
    if _held is not None:
        _held.append(f"autotrans: warning: {msg}")
    else:
        _emit(f"autotrans: warning: {msg}")


def debug(msg: str) -> None:
    if _debug:
        _emit(f"autotrans: debug: {msg}")
