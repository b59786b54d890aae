"""Reshard benchmark: the bench model from 2-way to 4-way model parallel (--size 1gb:
1.08 GB; --size 6.6gb: 7.0 GB, MindFormers names).

Compares, in one session and on the same (page-cached) source bytes, runs alternating:
  cp      `cp -r` of the source, then `sync` (the storage floor: outputs must be durable)
  naive   load every shard whole, concatenate, split, save, sync (the usual converter script)
  autotrans  `autotrans run` (one process), also with transform_process_num=auto
Every run starts after a `sync`, so that none pays for the writeback of another.
Prints a markdown table of median wall, user and system times, ratios to cp + sync and
peak RSS, then every run's wall time (the noise of a shared machine).

  python bench/reshard.py [--size 1gb|6.6gb] [--runs 5] [--no-naive] [--dir /tmp/autotrans-bench-SIZE]
"""

from __future__ import annotations

import os
import shutil

from bench_util import SIZES, alternating, du, llama_weights, print_table, python, reshard_inputs

NAIVE = r"""
import sys, torch
from safetensors.torch import load_file, save_file
src, dst, splits = sys.argv[1], sys.argv[2], eval(sys.argv[3])
shards = [load_file(f"{src}/rank_{r}/checkpoint_{r}.safetensors") for r in range(2)]
full = {}
for n in list(shards[0]):
    s, parts = splits[n], [sh.pop(n) for sh in shards]
    full[n] = torch.cat(parts, dim=0 if s == "column" else 1) if s != "none" else parts[0]
import os
for r in range(4):
    out = {n: (t.chunk(4, 0 if splits[n] == "column" else 1)[r].contiguous() if splits[n] != "none" else t) for n, t in full.items()}
    os.makedirs(f"{dst}/rank_{r}", exist_ok=True)
    save_file(out, f"{dst}/rank_{r}/checkpoint_{r}.safetensors")
os.sync()
"""


def main() -> None:
    args, root = reshard_inputs()
    ckpt, size = root / "ckpt", du(root / "ckpt")
    weights = llama_weights(**SIZES[args.size])
    splits = {n: s for n, (_shape, s) in weights.items()}
    out = root / "out"
    job = root / "job.yaml"
    job.write_text(f"load_checkpoint: {ckpt}\nsrc_strategy_path_or_dir: {root / 'strategy_tp2'}\n"
                   f"dst_strategy_path_or_dir: {root / 'strategy_tp4'}\noutput_dir: {out}\n")

    def clean() -> None:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()

    autotrans = [python(), "-m", "runner", "run", str(job), "--no-progress"]
    methods = {
        "cp -r + sync": lambda: ["sh", "-c", f"cp -r {ckpt} {out} && sync"],
        "naive load-concat-split-save": lambda: [python(), "-c", NAIVE, str(ckpt), str(out), repr(splits)],
        "autotrans": lambda: autotrans,
        f"autotrans, transform_process_num=auto ({len(os.sched_getaffinity(0))})": lambda: [*autotrans, "transform_process_num=auto"],
    }
    if args.no_naive:
        del methods["naive load-concat-split-save"]
    results = alternating(methods, args.runs, clean)
    largest = max(2 * s[0] * (s[1] if len(s) > 1 else 1) for s, _ in weights.values())
    print(f"\nsource {size / 1e9:.2f} GB bf16 (2-way model parallel) -> 4-way; median of {args.runs} alternating runs; "
          f"largest tensor {largest / 1e6:.0f} MB\n")
    print_table(results)
    clean()


if __name__ == "__main__":
    main()
