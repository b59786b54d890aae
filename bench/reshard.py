"""Reshard benchmark: the 1.08 GB bf16 bench model from 2-way to 4-way model parallel.

Compares, in one session and on the same (page-cached) source bytes:
  cp      `cp -r` of the source, then `sync` (the storage floor: outputs must be durable)
  cp-only `cp -r` alone
  naive   load every shard whole, concatenate, split, save (the usual converter script)
  autotrans  `autotrans run` (one process), also with transform_process_num=2
Prints a markdown table of median wall times, ratios to cp and peak RSS.

  python bench/reshard.py [--runs 3] [--dir /tmp/autotrans-bench]
"""

from __future__ import annotations

import shutil

from bench_util import du, llama_weights, median_run, print_ratios, python, reshard_inputs

NAIVE = r"""
import sys, torch
from safetensors.torch import load_file, save_file
src, dst, splits = sys.argv[1], sys.argv[2], eval(sys.argv[3])
shards = [load_file(f"{src}/rank_{r}/checkpoint_{r}.safetensors") for r in range(2)]
full = {}
for n in shards[0]:
    s = splits[n]
    full[n] = torch.cat([sh[n] for sh in shards], dim=0 if s == "column" else 1) if s != "none" else shards[0][n]
del shards
import os
for r in range(4):
    out = {n: (t.chunk(4, 0 if splits[n] == "column" else 1)[r].contiguous() if splits[n] != "none" else t) for n, t in full.items()}
    os.makedirs(f"{dst}/rank_{r}", exist_ok=True)
    save_file(out, f"{dst}/rank_{r}/checkpoint_{r}.safetensors")
os.sync()
"""


def main() -> None:
    runs, root = reshard_inputs()
    ckpt, size = root / "ckpt", du(root / "ckpt")
    splits = {n: s for n, (_shape, s) in llama_weights().items()}
    out = root / "out"
    job = root / "job.yaml"
    job.write_text(f"load_checkpoint: {ckpt}\nsrc_strategy_path_or_dir: {root / 'strategy_tp2'}\n"
                   f"dst_strategy_path_or_dir: {root / 'strategy_tp4'}\noutput_dir: {out}\n")

    def clean() -> None:
        shutil.rmtree(out, ignore_errors=True)

    rows = []
    cp_sync = median_run(lambda: ["sh", "-c", f"cp -r {ckpt} {out} && sync"], runs, clean)
    rows.append(("cp -r + sync", *cp_sync))
    rows.append(("cp -r", *median_run(lambda: ["cp", "-r", str(ckpt), str(out)], runs, clean)))
    rows.append(("naive load-concat-split-save", *median_run(lambda: [python(), "-c", NAIVE, str(ckpt), str(out), repr(splits)], runs, clean)))
    rows.append(("autotrans", *median_run(lambda: [python(), "-m", "runner", "run", str(job), "--no-progress"], runs, clean)))
    rows.append(("autotrans, 2 workers", *median_run(
        lambda: [python(), "-m", "runner", "run", str(job), "transform_process_num=2", "--no-progress"], runs, clean)))
    largest = max(2 * s[0] * (s[1] if len(s) > 1 else 1) for s, _ in llama_weights().values())
    print(f"\nsource {size / 1e9:.2f} GB bf16 (2-way model parallel) -> 4-way; median of {runs} runs; "
          f"largest tensor {largest / 1e6:.0f} MB\n")
    print_ratios(rows, cp_sync[0])
    clean()


if __name__ == "__main__":
    main()
