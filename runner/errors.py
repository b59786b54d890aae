"""The tool's own error types. Each carries the exit code the CLI returns (SPEC 3)."""


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
