"""Shared pieces of the benchmarks: the bench model, timed child processes, reporting.

The bench model is Llama-shaped, bf16, untied. Two sizes (--size):
  1gb    hidden 2048, 8 layers, ffn 5632, vocab 32000, HF names (1.08 GB)
  6.6gb  hidden 4096, 16 layers, ffn 11008, vocab 32000, MindFormers names (7.0 GB = 6.5 GiB)
Times are medians of several runs in the same session, the methods alternating run by
run so that load from other users spreads over all of them; peak RSS is the child's
ru_maxrss, as /usr/bin/time reports it. Children run with Python's bytecode cache on, as
an installed package runs (an environment with PYTHONDONTWRITEBYTECODE would otherwise
recompile autotrans's modules at every start), and the cache is filled first."""

from __future__ import annotations

import compileall
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HIDDEN, LAYERS, FFN, VOCAB = 2048, 8, 5632, 32000
SIZES = {"1gb": {"layers": LAYERS, "hidden": HIDDEN, "ffn": FFN, "names": "hf"},
         "6.6gb": {"layers": 16, "hidden": 4096, "ffn": 11008, "names": "mindformers"}}
# HF name part -> MindFormers name part (MindSpore Transformers' Llama)
_MINDFORMERS = {"model.embed_tokens.weight": "model.tok_embeddings.embedding_weight", "model.norm.weight": "model.norm_out.weight",
                "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
                "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}


def llama_weights(layers: int = LAYERS, hidden: int = HIDDEN, ffn: int = FFN, vocab: int = VOCAB,
                  names: str = "hf") -> dict[str, tuple[tuple[int, int] | tuple[int], str]]:
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
    if names == "mindformers":
        w = {_mindformers(n): v for n, v in w.items()}
    return w


def _mindformers(name: str) -> str:
    for hf, mf in _MINDFORMERS.items():
        name = name.replace(hf, mf)
    return name


def tp_strategy(weights: dict, tp: int, dtype: str = "BF16") -> dict:
    maps = {"column": [0, -1], "row": [-1, 0]}
    params = {n: {"shape": list(s), "dtype": dtype, "stage": 0, "dev_matrix": [tp],
                  "tensor_map": maps.get(split, [-1] * len(s))} for n, (s, split) in weights.items()}
    return {"format": "autotrans-strategy", "version": 1, "stages": [list(range(tp))], "params": params}


def write_tp_checkpoint(root: Path, tp: int, seed: int = 0, size: str = "1gb") -> tuple[Path, Path]:
    """A tp-way safetensors checkpoint (rank_N/) and its strategy. Each tensor is made
    once (torch randn, bf16) and its shards appended to the rank files, so memory stays
    at one tensor whatever the model size."""
    import torch

    weights = llama_weights(**SIZES[size])
    shards = {n: [s if split == "none" else tuple(d // tp if i == (0 if split == "column" else 1) else d for i, d in enumerate(s))
                  for _ in range(tp)] for n, (s, split) in weights.items()}
    ckpt = root / "ckpt"
    files = []
    for r in range(tp):
        (ckpt / f"rank_{r}").mkdir(parents=True, exist_ok=True)
        files.append(open(ckpt / f"rank_{r}" / f"checkpoint_{r}.safetensors", "wb"))
        files[r].write(_safetensors_header({n: s[r] for n, s in shards.items()}))
    g = torch.Generator().manual_seed(seed)
    for name, (shape, split) in weights.items():
        t = (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        parts = [t] * tp if split == "none" else t.chunk(tp, 0 if split == "column" else 1)
        for f, part in zip(files, parts):
            f.write(part.contiguous().view(torch.int16).numpy().tobytes())
    for f in files:
        f.close()
    return ckpt, write_tp_strategy(root, tp, size)


def _safetensors_header(shapes: dict[str, tuple[int, ...]]) -> bytes:
    """The framing of a bf16 safetensors file holding `shapes` in this order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_tp_strategy(root: Path, tp: int, size: str = "1gb") -> Path:
    sdir = root / f"strategy_tp{tp}"
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / "merged_ckpt_strategy.json").write_text(json.dumps(tp_strategy(llama_weights(**SIZES[size]), tp)))
    return sdir


def bench_inputs(default_dir: str, marker: str, build, extra=lambda ap: None):
    """Parse --runs and --dir (plus `extra(ap)` options), and build the bench's inputs
    under --dir with `build(root, args)` unless `marker` shows an earlier run built them.
    `default_dir` may name option values: "/tmp/bench-{size}"."""
    import argparse
    import shutil

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir")
    extra(ap)
    args = ap.parse_args()
    root = Path(args.dir or default_dir.format(**vars(args)))
    if not (root / marker).exists():
        shutil.rmtree(root, ignore_errors=True)
        print("building the bench inputs ...", flush=True)
        build(root, args)
    return args, root


def reshard_inputs():
    """The options of the reshard benches (--size among them), and the bench checkpoint
    (2-way, with its strategy and a 4-way one) under --dir, built on first use."""
    args, root = bench_inputs("/tmp/autotrans-bench-{size}", "ckpt/rank_1", lambda r, a: write_tp_checkpoint(r, 2, size=a.size),
                              lambda ap: (ap.add_argument("--size", choices=SIZES, default="1gb"),
                                          ap.add_argument("--no-naive", action="store_true", help="skip the slow naive method")))
    write_tp_strategy(root, 4, args.size)
    return args, root


@dataclass(frozen=True)
class Stats:
    """One command's figures: wall, user and system seconds, peak RSS bytes."""

    wall: float
    user: float
    sys: float
    rss: int


# the children's environment: bytecode cached, as after any install
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def cache_bytecode() -> None:
    """Compile autotrans's modules once, so that no measured run pays for it."""
    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "runner"), quiet=1)


def timed(cmd: list[str], cwd: Path | None = None) -> Stats:
    """The figures of one run of a command; raises if it fails.

    Measured by /usr/bin/time (a small process): a child forked from this Python would
    inherit this process's RSS high-water mark across exec."""
    with tempfile.NamedTemporaryFile("r") as rec:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", rec.name, *cmd], cwd=cwd, env=_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
        user, sys_, rss = rec.read().split()[-3:]
        return Stats(elapsed, float(user), float(sys_), int(rss) * 1024)


def alternating(methods: dict[str, Callable[[], list[str]]], runs: int, before=None) -> dict[str, tuple[Stats, list[float]]]:
    """Each method run `runs` times, taking turns (A B C A B C ...), `before()` ahead of
    every run: name -> (medians of wall, user and system time with the max peak RSS,
    the wall times in run order, to show the noise)."""
    cache_bytecode()
    seen: dict[str, list[Stats]] = {name: [] for name in methods}
    for _ in range(runs):
        for name, make_cmd in methods.items():
            if before is not None:
                before()
            seen[name].append(timed(make_cmd()))
    return {name: (Stats(statistics.median(s.wall for s in got), statistics.median(s.user for s in got),
                         statistics.median(s.sys for s in got), max(s.rss for s in got)), [s.wall for s in got])
            for name, got in seen.items()}


def median_run(make_cmd, runs: int, before=None) -> tuple[float, int]:
    """Median wall time and max peak RSS over `runs` runs; `before()` resets state."""
    stats, _ = alternating({"": make_cmd}, runs, before)[""]
    return stats.wall, stats.rss


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


def print_table(results: dict[str, tuple[Stats, list[float]]], floor_name: str = "cp -r + sync") -> None:
    """The markdown table of `alternating`'s results (ratios to `floor_name`), then the
    wall time of every run, to show the noise."""
    floor = results[floor_name][0]
    print(f"| method | wall s | x ({floor_name}) | user + sys s | sys s | x sys | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (s, _) in results.items():
        print(f"| {name} | {s.wall:.2f} | {s.wall / floor.wall:.2f} | {s.user + s.sys:.2f} | {s.sys:.2f} | "
              f"{s.sys / max(floor.sys, 1e-9):.2f} | {s.rss / 1e6:.0f} |")
    print("\nwall s of every run, in order:")
    for name, (_, walls) in results.items():
        print(f"  {name}: {' '.join(f'{w:.2f}' for w in walls)}")
