"""Conversions between ecosystems (SPEC 6): HF, Megatron-LM and MindFormers names,
reversible permutations between them, and their folder formats."""

from __future__ import annotations

from pathlib import Path


def wants_conversion(cfg) -> bool:
    """True when a job converts between ecosystems rather than only re-laying out: an
    HF, Megatron or MindFormers output, or a Megatron source. An HF folder with a
    safetensors or ckpt output is a plain reshard under its own names (the core's)."""
    if not cfg.load_checkpoint or cfg.preprocess_data is not None:
        return False
    if cfg.output_format in ("megatron", "hf", "mindformers"):
        return True
    from runner.source import discover

    path = Path(cfg.load_checkpoint)  # one not there yet is no conversion: the job says it is missing
    return path.exists() and discover(path).kind == "megatron"
