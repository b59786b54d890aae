"""Shared pieces of the benchmarks: the bench model, timed child processes, reporting.

The bench model is Llama-shaped, bf16, untied: hidden 2048, 8 layers, ffn 5632,
vocab 32000 (1.08 GB). Times are medians of several runs in the same session; peak RSS
is the child's ru_maxrss (os.wait4), so every figure is comparable within one run."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, LAYERS, FFN, VOCAB = 2048, 8, 5632, 32000


def llama_weights(layers: int = LAYERS, hidden: int = HIDDEN, ffn: int = FFN, vocab: int = VOCAB) -> dict[str, tuple[tuple[int, int] | tuple[int], str]]:
    """name -> (shape, split) with split in column / row / none (Megatron's TP rules)."""
    w = {"model.embed_tokens.weight": ((vocab, hidden), "column"), "model.norm.weight": ((hidden,), "none"),
         "lm_head.weight": ((vocab, hidden), "column")}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj"):
            w[p + f"self_attn.{n}.weight"] = ((hidden, hidden), "column")
        w[p + "self_attn.o_proj.weight"] = ((hidden, hidden), "row")
        w[p + "mlp.gate_proj.weight"] = ((ffn, hidden), "column")
        w[p + "mlp.up_proj.weight"] = ((ffn, hidden), "column")
        w[p + "mlp.down_proj.weight"] = ((hidden, ffn), "row")
        w[p + "input_layernorm.weight"] = ((hidden,), "none")
        w[p + "post_attention_layernorm.weight"] = ((hidden,), "none")
    return w


def tp_strategy(weights: dict, tp: int, dtype: str = "BF16") -> dict:
    maps = {"column": [0, -1], "row": [-1, 0]}
    params = {n: {"shape": list(s), "dtype": dtype, "stage": 0, "dev_matrix": [tp],
                  "tensor_map": maps.get(split, [-1] * len(s))} for n, (s, split) in weights.items()}
    return {"format": "autotrans-strategy", "version": 1, "stages": [list(range(tp))], "params": params}


def write_tp_checkpoint(root: Path, tp: int, seed: int = 0) -> tuple[Path, Path]:
    """A tp-way safetensors checkpoint (rank_N/) and its strategy, sliced with torch."""
    import torch
    from safetensors.torch import save_file

    weights = llama_weights()
    g = torch.Generator().manual_seed(seed)
    shards: list[dict] = [{} for _ in range(tp)]
    for name, (shape, split) in weights.items():
        t = (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        for r in range(tp):
            if split == "column":
                shards[r][name] = t.chunk(tp, 0)[r].contiguous()
            elif split == "row":
                shards[r][name] = t.chunk(tp, 1)[r].contiguous()
            else:
                shards[r][name] = t
    ckpt = root / "ckpt"
    for r, shard in enumerate(shards):
        (ckpt / f"rank_{r}").mkdir(parents=True, exist_ok=True)
        save_file(shard, str(ckpt / f"rank_{r}" / f"checkpoint_{r}.safetensors"))
    return ckpt, write_tp_strategy(root, tp)


def write_tp_strategy(root: Path, tp: int) -> Path:
    sdir = root / f"strategy_tp{tp}"
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / "merged_ckpt_strategy.json").write_text(json.dumps(tp_strategy(llama_weights(), tp)))
    return sdir


def bench_inputs(default_dir: str, marker: str, build, extra=lambda ap: None):
    """Parse --runs and --dir (plus `extra(ap)` options), and build the bench's inputs
    under --dir with `build(root)` unless `marker` shows an earlier run built them."""
    import argparse
    import shutil

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=default_dir)
    extra(ap)
    args = ap.parse_args()
    root = Path(args.dir)
    if not (root / marker).exists():
        shutil.rmtree(root, ignore_errors=True)
        print("building the bench inputs ...", flush=True)
        build(root)
    return args, root


def reshard_inputs() -> tuple[int, Path]:
    """The options of the reshard benches, and the bench checkpoint (2-way, with its
    strategy and a 4-way one) under --dir, built on first use."""
    args, root = bench_inputs("/tmp/autotrans-bench", "ckpt/rank_1", lambda r: write_tp_checkpoint(r, 2))
    write_tp_strategy(root, 4)
    return args.runs, root


def timed(cmd: list[str], cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command; raises if it fails.

    Measured by /usr/bin/time (a small process): a child forked from this Python would
    inherit this process's RSS high-water mark across exec."""
    with tempfile.NamedTemporaryFile("r") as rec:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rec.name, *cmd], cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
        return elapsed, int(rec.read().split()[-1]) * 1024


def median_run(make_cmd, runs: int, before=None) -> tuple[float, int]:
    """Median wall time and max peak RSS over `runs` runs; `before()` resets state."""
    times, peaks = [], []
    for _ in range(runs):
        if before is not None:
            before()
        t, rss = timed(make_cmd())
        times.append(t)
        peaks.append(rss)
    return statistics.median(times), max(peaks)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def python() -> str:
    return sys.executable


def print_ratios(rows: list[tuple[str, float, int]], floor: float, floor_name: str = "cp -r + sync") -> None:
    """A markdown table: method, median wall s, ratio to the floor, peak RSS MB."""
    print(f"| method | wall s | x ({floor_name}) | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for name, t, rss in rows:
        print(f"| {name} | {t:.2f} | {t / floor:.2f} | {rss / 1e6:.0f} |")
