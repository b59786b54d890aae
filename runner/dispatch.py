"""Which kind of job a config asks for, and where it runs."""

from __future__ import annotations

from runner.config import JobConfig


def run_job(cfg: JobConfig, show_progress: bool = True) -> int:
    """Run the job a config describes; the process exit code."""
    if cfg.preprocess_data is not None:
        from runner.preprocess import run_preprocess

        run_preprocess(cfg.preprocess_data, show_progress=show_progress)
        return 0
    from runner.job import run

    return run(cfg, show_progress)
