"""Which kind of job a config asks for, and where it runs."""

from __future__ import annotations

from runner.config import JobConfig
from runner.job import without_placeholder
from runner.launch import launched_size
from runner.log import count, say
from runner.mpi import run_mpi
from runner.preprocess import run_preprocess
from runner.run import run


def run_job(cfg: JobConfig, show_progress: bool = True) -> int:
    """Run the job a config describes; the process exit code."""
    if cfg.preprocess_data is not None:
        done = run_preprocess(cfg.preprocess_data, show_progress=show_progress, mpi_timeout=cfg.mpi_timeout)
        secs = max(done["seconds"], 1e-9)
        say(f"done: {count(done['documents'], 'document')}, {count(done['tokens'], 'token')}, {done['bytes_in'] / 1e6:.1f} MB in "
            f"{done['seconds']:.2f} s ({done['documents'] / secs:.0f} documents/s, {done['bytes_in'] / 1e6 / secs:.2f} MB/s)"
            + (f", {count(done['skipped_lines'], 'bad line')} skipped" if done["skipped_lines"] else "")
            + f" -> {', '.join(done['files'])}")
        return 0
    cfg = without_placeholder(cfg)
    if launched_size() > 1:  # under mpiexec: every rank takes its share (SPEC 9)
        return run_mpi(cfg, show_progress)
    return run(cfg, show_progress)

