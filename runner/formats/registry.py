"""File formats by extension."""

from __future__ import annotations

from pathlib import Path

from runner.errors import ConfigError, FormatError
from runner.formats.base import CheckpointReader, FileFormat

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def open_reader(path: Path) -> CheckpointReader:
    """Open a checkpoint file for header-only metadata and slice reads."""
    if Path(path).name == ".metadata":  # a PyTorch distributed checkpoint (DCP) folder
        from runner.formats.dcp import DcpReader

        return DcpReader(Path(path).parent)
    suffix = Path(path).suffix
    if suffix == ".safetensors":
        from runner.formats.safetensors_io import SafetensorsReader

        return SafetensorsReader(path)
    if suffix == ".ckpt":
        from runner.formats.mindspore_ckpt import CkptReader

        return CkptReader(path)
    if suffix in (".pt", ".bin"):
        from runner.formats.torch_pt import TorchReader

        return TorchReader(path)
    raise FormatError(f"{path}: unknown checkpoint format (expected one of {', '.join(CHECKPOINT_SUFFIXES)})")


def output_format(name: str) -> FileFormat:
    """The writer for a job's per-rank files: `safetensors`/`mindformers` or `ckpt`."""
    if name in ("safetensors", "mindformers"):
        from runner.formats.safetensors_io import SafetensorsFormat

        return SafetensorsFormat()
    if name == "ckpt":
        from runner.formats.mindspore_ckpt import CkptFormat

        return CkptFormat()
    raise ConfigError(f"output_format {name!r} has no per-rank file writer")
