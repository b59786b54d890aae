"""Run the CLI in a child process whose address space is capped (RLIMIT_AS) at what
it uses after start-up plus a budget: a reader that allocates from a number a file
claims fails there (MemoryError, or the kernel refusing the mapping) instead of
passing on a machine with memory to spare."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import resource, sys
import numpy, torch  # imported before the cap: what the commands import anyway
from runner.cli import main
with open("/proc/self/status") as f:
    used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + int(sys.argv[1]), resource.RLIM_INFINITY))
sys.exit(main(sys.argv[2:]))
"""


def run_limited(argv: list[str], budget: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """`autotrans argv...` with at most `budget` bytes of address space beyond start-up."""
    return subprocess.run([sys.executable, "-c", _CHILD, str(budget), *argv], capture_output=True, text=True, timeout=timeout)


def one_line(proc: subprocess.CompletedProcess, code: int, *phrases: str) -> str:
    """Assert exit `code` and exactly one stderr line, an error holding `phrases`."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith("autotrans: error: ") and "internal error" not in lines[0], lines[0]
    for p in phrases:
        assert p in lines[0], (p, lines[0])
    return lines[0]
