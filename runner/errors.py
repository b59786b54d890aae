"""The tool's own error types. Each carries the exit code the CLI returns (SPEC 3)."""

import errno
import os
import re


class AutotransError(Exception):
    """A failure the user can act on; its message is one clear line."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, ended as Ctrl-C ends a job (temporaries removed on the way
    out); the exit code is 128 + the signal number (SPEC 3)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class ConfigError(AutotransError):
    """Bad usage or a bad job file (exit 2)."""

    exit_code = 2


class FormatError(AutotransError):
    """A checkpoint or strategy file that cannot be read as what it claims to be."""


class LayoutError(AutotransError):
    """A strategy whose layout is impossible or disagrees with the checkpoint."""


class PlanError(AutotransError):
    """The transform plan failed validation; nothing was written."""


def name_list(names: list[str], most: int = 5) -> str:
    """Names for an error or warning line: the first `most`, then how many more."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def shown(path: object) -> str:
    """A path for a message: a relative one says what it is relative to."""
    p = str(path)
    return p if os.path.isabs(p) else f"{p} (relative to the current folder {os.getcwd()})"


def one_line(msg: str) -> str:
    """`msg` with control characters escaped: names from hostile files may hold
    newlines or terminal escapes, and an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)


SHOWN = 80  # at most this many characters of a file's content appear in a message
# A quoted run in a message: a name or value from a file, as repr() quotes it.
_QUOTED = re.compile(r"""(?<!\w)(?:'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*")""")


def message_line(msg: str) -> str:
    """An error, warning or status line as printed: one line (one_line), and each quoted
    name or value longer than SHOWN characters cut to its first and last characters,
    so a file's content is never echoed at length (a 10 KB token, a key, a secret)."""
    return _QUOTED.sub(_cut_quoted, one_line(msg))


def _cut_quoted(m: re.Match) -> str:
    text = m.group()
    return f"{text[0]}{clipped(text[1:-1])}{text[0]}"


def clipped(name: str) -> str:
    """A name from a file for a message: whole up to SHOWN characters, else its first
    and last characters (long parameter names differ at their ends)."""
    return name if len(name) <= SHOWN else f"{name[:SHOWN - 30]}...{name[-27:]}"


def cause(e: BaseException | str) -> str:
    """A third-party parser's message (json, YAML, OmegaConf, torch, protobuf,
    tokenizers) for our error line: its first line, at most SHOWN characters, since
    such messages may quote the file's content."""
    text = str(e).strip()
    if not text:
        return type(e).__name__ if isinstance(e, BaseException) else ""
    first = one_line(text.splitlines()[0])
    return first if len(first) <= SHOWN else first[:SHOWN - 3] + "..."


def excerpt(data: bytes | str, limit: int = 80) -> str:
    """At most `limit` characters of a file's content, escaped, for an error message:
    a file may be a link to a secret or to /dev/zero."""
    shown = repr(data[:limit])
    return shown[:limit] + ("..." if len(shown) > limit or len(data) > limit else "")


def disk_error(e: OSError, path: object, verb: str = "write") -> AutotransError:
    """One actionable line for a failed file operation: disk full, no permission, other."""
    if e.errno == errno.ENOSPC:
        return AutotransError(f"disk full while writing {path}; free space there and run the job again (it resumes)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AutotransError(f"cannot {verb} {path}: {e.strerror}; check its permissions (output_dir must be writable)")
    return AutotransError(f"cannot {verb} {path}: {e.strerror or e}")
