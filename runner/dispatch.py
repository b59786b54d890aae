"""Which kind of job a config asks for, and where it runs."""

from __future__ import annotations

from runner.config import JobConfig


def run_job(cfg: JobConfig, show_progress: bool = True) -> int:
    """Run the job a config describes; the process exit code."""
    if cfg.preprocess_data is not None:
        from runner.preprocess import run_preprocess

        run_preprocess(cfg.preprocess_data, show_progress=show_progress)
        return 0
    from runner.convert import wants_conversion

    if wants_conversion(cfg):  # HF / Megatron / MindFormers (SPEC 6)
        from runner.convert.job import run_conversion

        return run_conversion(cfg, show_progress)
    from runner.job import run

    return run(cfg, show_progress)
