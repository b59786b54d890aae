"""LoRA merge benchmark: the 1.08 GB bf16 bench model plus a PEFT adapter (r=16 on every
linear layer of every block) merged into one full safetensors file.

Compares, in one session and on the same (page-cached) source bytes:
  cp         `cp` of the base file, then `sync` (the storage floor)
  naive      load base and adapter whole, W = bf16(fp32(W) + s * B @ A), save, sync
  autotrans  `autotrans run` (full base + adapter -> full), and from the 2-way model
             parallel base (rank_N/ + strategy) + adapter -> full
Prints a markdown table of median wall times, ratios to cp and peak RSS.

  python bench/lora_merge.py [--runs 3] [--dir /tmp/autotrans-bench-lora]
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench_util import bench_inputs, du, llama_weights, median_run, print_ratios, python, write_tp_checkpoint

RANK, ALPHA = 16, 32

NAIVE = r"""
import os, sys, torch
from safetensors.torch import load_file, save_file
base, adapter, out = sys.argv[1:4]
w = load_file(base)
lora = load_file(adapter)
s = float(sys.argv[4])
for n in list(w):
    m = "base_model.model." + n.removesuffix(".weight")
    if m + ".lora_A.weight" in lora:
        delta = lora[m + ".lora_B.weight"].float() @ lora[m + ".lora_A.weight"].float()
        w[n] = (w[n].float() + s * delta).to(w[n].dtype)
os.makedirs(os.path.dirname(out), exist_ok=True)
save_file(w, out)
os.sync()
"""


def write_inputs(root: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    ckpt, _strategy = write_tp_checkpoint(root, 2)
    shards = [load_file(str(ckpt / f"rank_{r}/checkpoint_{r}.safetensors")) for r in range(2)]
    splits = {n: s for n, (_shape, s) in llama_weights().items()}
    full = {n: torch.cat([sh[n] for sh in shards], 0 if s == "column" else 1) if s != "none" else shards[0][n]
            for n, s in splits.items()}
    save_file(full, str(root / "base.safetensors"))
    g = torch.Generator().manual_seed(1)
    lora = {}
    for n, t in full.items():
        if ".layers." in n and t.dim() == 2:
            m = "base_model.model." + n.removesuffix(".weight")
            lora[m + ".lora_A.weight"] = torch.randn(RANK, t.shape[1], generator=g) * 0.01
            lora[m + ".lora_B.weight"] = torch.randn(t.shape[0], RANK, generator=g) * 0.01
    (root / "adapter").mkdir(exist_ok=True)
    save_file(lora, str(root / "adapter/adapter_model.safetensors"))
    (root / "adapter/adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA}))


def main() -> None:
    args, root = bench_inputs("/tmp/autotrans-bench-lora", "adapter/adapter_config.json", lambda r, a: write_inputs(r))
    out = root / "out"
    base = root / "base.safetensors"
    job = root / "job.yaml"
    job.write_text(f"load_checkpoint: {base}\nuse_parallel: false\noutput_dir: {out}\nlora:\n  adapter: {root / 'adapter'}\n")

    def clean() -> None:
        shutil.rmtree(out, ignore_errors=True)

    rows = [
        ("cp + sync", lambda: ["sh", "-c", f"mkdir -p {out} && cp {base} {out}/ && sync"]),
        ("naive load-merge-save", lambda: [python(), "-c", NAIVE, str(base), str(root / "adapter/adapter_model.safetensors"),
                                           str(out / "merged.safetensors"), str(ALPHA / RANK)]),
        ("autotrans full + adapter", lambda: ["autotrans", "run", str(job), "--no-progress"]),
        ("autotrans tp2 + adapter", lambda: ["autotrans", "run", str(job), f"load_checkpoint={root / 'ckpt'}",
                                             f"src_strategy_path_or_dir={root / 'strategy_tp2'}", "--no-progress"]),
    ]
    results = [(name, *median_run(cmd, args.runs, clean)) for name, cmd in rows]
    floor = results[0][1]
    print(f"\nbase {base.stat().st_size / 1e9:.2f} GB bf16, adapter r={RANK} on {7 * 8} linear layers "
          f"({du(root / 'adapter') / 1e6:.1f} MB fp32); median of {args.runs} run(s)\n")
    print_ratios(results, floor, "cp + sync")
    clean()


if __name__ == "__main__":
    main()
