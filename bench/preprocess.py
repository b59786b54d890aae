"""Preprocess benchmark: jsonl -> Megatron indexed dataset, documents/s and MB/s at 1 and 2 workers.

Generates a synthetic jsonl (default 64 MB of Zipf-distributed pseudo-words), trains a
32k byte-level BPE tokenizer on a sample of it, then times `autotrans run
configs/preprocess.yaml` once per worker count (median wall time of --runs, start-up
included; peak RSS of the largest process). Reference in the same session: the
tokenizer alone (one process encoding every text, no JSON, no output). Nothing is
asserted; the markdown table goes to stdout and to bench/RESULTS-preprocess.md.

  python bench/preprocess.py [--mb 64] [--workers 1 2] [--runs 3] [--dir /tmp/autotrans-bench-preprocess]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import random
import subprocess
from pathlib import Path

from bench_util import median_run, python

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS-preprocess.md"


def make_jsonl(path: Path, megabytes: int, seed: int = 0) -> int:
    """Write documents of 50-1500 words until the file holds `megabytes` MB; returns the count."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(20_000)]
    weights = [1 / (rank + 1) for rank in range(len(words))]  # Zipf, as natural text
    count, size = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1_000_000:
            text = " ".join(rng.choices(words, weights, k=rng.randint(50, 1500)))
            line = json.dumps({"id": count, "text": text}) + "\n"
            f.write(line)
            size += len(line)
            count += 1
    return count


def train_tokenizer(jsonl: Path, out: Path, sample_docs: int = 2000) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with open(jsonl, encoding="utf-8") as f:
        sample = [json.loads(line)["text"] for line, _ in zip(f, range(sample_docs))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=32_000, special_tokens=["<|endoftext|>"], show_progress=False))
    tok.save(str(out))
    return out


TOKENIZER_ALONE = r"""
import json, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread, as the job runs it
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
with open(sys.argv[1], encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for line in f]
start = time.perf_counter()
for text in texts:
    tok.encode(text, add_special_tokens=False)
print(time.perf_counter() - start)
"""


def tokenizer_alone(jsonl: Path, tokenizer: Path) -> float:
    """Seconds for a fresh process to encode every text: the ceiling for one worker."""
    out = subprocess.run([python(), "-c", TOKENIZER_ALONE, str(jsonl), str(tokenizer)], check=True, capture_output=True, text=True)
    return float(out.stdout)


def job_command(jsonl: Path, tokenizer: Path, workers: int, prefix: Path) -> list[str]:
    overrides = {"input": jsonl, "tokenizer": tokenizer, "workers": workers, "output_prefix": prefix}
    return [python(), "-m", "runner", "run", str(REPO / "configs" / "preprocess.yaml"), *(f"preprocess_data.{k}={v}" for k, v in overrides.items())]


def row(label: str, documents: int, megabytes: float, seconds: float, rss: str) -> str:
    return f"| {label} | {seconds:.2f} | {documents / seconds:,.0f} | {megabytes / seconds:.2f} | {rss} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=64, help="size of the synthetic jsonl in MB")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/autotrans-bench-preprocess"))
    args = ap.parse_args()

    args.dir.mkdir(parents=True, exist_ok=True)
    jsonl = args.dir / f"synthetic_{args.mb}mb.jsonl"
    documents = make_jsonl(jsonl, args.mb)
    megabytes = jsonl.stat().st_size / 1e6
    tokenizer = train_tokenizer(jsonl, args.dir / "tokenizer.json")
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"{jsonl}: {documents:,} documents, {megabytes:.1f} MB; byte-level BPE tokenizer, 32,000 tokens", flush=True)

    lines = ["| run | s | documents/s | MB/s | peak RSS |", "|---|---|---|---|---|"]
    outputs, times = [], {}
    for workers in args.workers:
        prefix = args.dir / f"workers{workers}" / "synthetic"
        times[workers], rss = median_run(lambda: job_command(jsonl, tokenizer, workers, prefix), args.runs)
        lines.append(row(f"`autotrans run`, workers={workers}", documents, megabytes, times[workers], f"{rss / 2**20:.0f} MB"))
        outputs.append([Path(f"{prefix}_text_document{ext}") for ext in (".bin", ".idx")])
    identical = all(filecmp.cmp(a, b, shallow=False) for files in outputs[1:] for a, b in zip(outputs[0], files))
    ceiling = tokenizer_alone(jsonl, tokenizer)
    lines.append(row("tokenizer alone, 1 process (ceiling for workers=1)", documents, megabytes, ceiling, "-"))

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), platform.processor())
    report = "\n".join([
        "# Bench: dataset preprocessing (jsonl -> Megatron indexed dataset)",
        "",
        f"`python bench/preprocess.py --mb {args.mb} --runs {args.runs}`: {documents:,} documents, {megabytes:.1f} MB "
        f"(MB = 10^6 bytes of jsonl), on {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}; "
        f"load average {load} at the start. Median wall time of {args.runs} runs, start-up included; "
        "peak RSS of the largest process.",
        "",
        *lines,
        "",
        f"Outputs byte-identical across worker counts: {'yes' if identical else 'NO'}.",
        "",
        f"workers=1 runs at {ceiling / times[args.workers[0]]:.0%} of the tokenizer's own speed (the rest: "
        "start-up, JSON parsing, writing). More workers gain only what idle CPUs give: on a shared "
        "machine the load average above says how many were already busy.",
        "",
    ])
    print(report)
    RESULTS.write_text(report)


if __name__ == "__main__":
    main()
