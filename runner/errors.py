"""The tool's own error types. Each carries the exit code the CLI returns (SPEC 3)."""

import errno
import os


class AutotransError(Exception):
    """A failure the user can act on; its message is one clear line."""

    exit_code = 1


class ConfigError(AutotransError):
    """Bad usage or a bad job file (exit 2)."""

    exit_code = 2


class FormatError(AutotransError):
    """A checkpoint or strategy file that cannot be read as what it claims to be."""


class LayoutError(AutotransError):
    """A strategy whose layout is impossible or disagrees with the checkpoint."""


class PlanError(AutotransError):
    """The transform plan failed validation; nothing was written."""


def shown(path: object) -> str:
    """A path for a message: a relative one says what it is relative to."""
    p = str(path)
    return p if os.path.isabs(p) else f"{p} (relative to the current folder {os.getcwd()})"


def one_line(msg: str) -> str:
    """`msg` with control characters escaped: names from hostile files may hold
    newlines or terminal escapes, and an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)


def disk_error(e: OSError, path: object, verb: str = "write") -> AutotransError:
    """One actionable line for a failed file operation: disk full, no permission, other."""
    if e.errno == errno.ENOSPC:
        return AutotransError(f"disk full while writing {path}; free space there and run the job again (it resumes)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AutotransError(f"cannot {verb} {path}: {e.strerror}; check its permissions (output_dir must be writable)")
    return AutotransError(f"cannot {verb} {path}: {e.strerror or e}")
