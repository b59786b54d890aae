"""The Python API for training scripts (SPEC 3, `auto_trans_ckpt`):

    from runner.api import checkpoint_for_rank

    path = checkpoint_for_rank("train.yaml", rank)   # then load `path` on this rank

Every rank of a training job may call it at once. The first to take the lock file
`output_dir/.autotrans.lock` runs the transform; the others wait on the lock, then
find the finished output (its manifest) and return at once. Without a shared disk
each node transforms into its own `output_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from runner import config
from runner.errors import AutotransError, ConfigError
from runner.job import needs_change
from runner.outputs import OutputFolder, lock_output
from runner.run import LocalWorld, run

RANK_VARIABLES = ("RANK_ID", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def checkpoint_for_rank(cfg: str | Path | Mapping[str, Any] | config.JobConfig, rank: int | None = None,
                        overrides: list[str] = ()) -> Path:
    """The checkpoint file destination rank `rank` should load: the source's own file
    when it already has the destination layout and format, else the transformed one
    (transformed first, once, if needed). `rank` defaults to RANK_ID / RANK from the
    environment, else 0. Raises AutotransError (exit_code 2 for a bad config)."""
    cfg = _config(cfg, overrides)
    rank = _rank(rank)
    if cfg.only_save_strategy:
        raise ConfigError("only_save_strategy is set: a dry run writes strategies and no checkpoint to load")
    world = LocalWorld()
    compiled = world.compile(cfg)
    job = compiled.job
    if job is None:
        raise ConfigError("checkpoint_for_rank returns per-rank checkpoint files; this job converts between ecosystems: run `autotrans run`")
    if rank not in job.dst.ranks:
        raise ConfigError(f"rank {rank} is not a destination rank (the layout has ranks 0..{job.dst.world_size - 1})")
    if not needs_change(job):
        return _source_file(job, rank)
    if not cfg.auto_trans_ckpt:
        raise AutotransError(f"{cfg.load_checkpoint} does not match the destination layout and auto_trans_ckpt is false; set auto_trans_ckpt: true")
    release = lock_output(cfg.output_path, wait=True)  # blocks until the transforming rank is done
    try:
        if not OutputFolder(job.out_dir, world.digest(compiled)).is_complete():
            code = run(cfg, show_progress=False)
            if code != 0:
                raise AutotransError(f"transforming {cfg.load_checkpoint} failed (exit code {code}); run `autotrans run` on the config for details")
    finally:
        release()
    path = job.out_path(rank if cfg.use_parallel else 0)
    if not path.is_file():
        raise AutotransError(f"{path} is missing after the transform; remove {job.out_dir} and run again")
    return path


def _config(cfg: Any, overrides: list[str]) -> config.JobConfig:
    if isinstance(cfg, config.JobConfig):
        return cfg
    if isinstance(cfg, (str, Path)):
        return config.load(cfg, list(overrides))
    if isinstance(cfg, Mapping):
        if overrides:
            from omegaconf import OmegaConf

            merged = OmegaConf.merge(OmegaConf.create(dict(cfg)), OmegaConf.from_dotlist(list(overrides)))
            cfg = OmegaConf.to_container(merged, resolve=True)
        return config.from_mapping(cfg)
    raise ConfigError(f"config: expected a path, a mapping or a JobConfig, got {type(cfg).__name__}")


def _rank(rank: int | None) -> int:
    if rank is not None:
        return rank
    for var in RANK_VARIABLES:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _source_file(job, rank: int) -> Path:
    """The source's own file for `rank` (its folder when it spans several files)."""
    files = job.source.files[rank if len(job.source.files) > 1 else 0]
    return files[0] if len(files) == 1 else job.source.root


