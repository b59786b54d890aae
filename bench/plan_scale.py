"""Bench: `autotrans plan` for a Llama-3.1-405B-shaped model at cluster scale (issue #10).

Writes native strategy files (one per rank, plus merged) for the source layout
dp 1 x tp 8 x pp 16 (128 ranks) and two destinations, dp 8 x tp 8 x pp 16 (1024 ranks)
and dp 4 x tp 16 x pp 8 (512 ranks), then times `autotrans plan` in a subprocess:
wall time including interpreter start-up and strategy loading, and the child's peak RSS.
No checkpoint is needed: native strategies carry shapes and dtypes.

    python bench/plan_scale.py [--workdir DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Llama-3.1-405B: hidden 16384, 126 layers, ffn 53248, vocab 128256, 128 heads, 8 kv heads.
HIDDEN, LAYERS, FFN, VOCAB, HEADS, KV_HEADS = 16384, 126, 53248, 128256, 128, 8
HEAD_DIM = HIDDEN // HEADS


def stage_layers(layers: int, stages: int) -> list[int]:
    """Layers per stage. When they do not divide, the first and last stages (which also
    hold the embedding and the output layer) take one layer fewer first, then the
    next stages in order: for 126 over 16, 7 + 14 x 8 + 7; over 8, 15 + 6 x 16 + 15."""
    base, extra = divmod(layers, stages)
    if not extra:
        return [base] * stages
    counts = [base + 1] * stages
    short = stages - extra  # stages that hold `base` layers
    order = [0, stages - 1] + [i for i in range(1, stages - 1)]
    for i in order[:short]:
        counts[i] = base
    return counts


def llama_params(dp: int, tp: int, pp: int) -> dict[str, dict]:
    """Native strategy entries, MindSpore Transformers' Llama names and splits:
    dev_matrix [dp, tp]; column-parallel wq/wk/wv/w1/w3 and lm_head split dim 0 over tp
    (tensor_map 0), row-parallel wo/w2 split dim 1, embedding (vocab_emb_dp) and norms
    replicated."""
    dev = [dp, tp]

    def p(shape, stage, tmap):
        return {"shape": list(shape), "dtype": "BF16", "stage": stage, "dev_matrix": dev,
                "tensor_map": tmap, "opt_shard": 1, "stored_shape": None}

    col, row, rep1, rep2 = [0, -1], [-1, 0], [-1], [-1, -1]
    out = {"model.tok_embeddings.embedding_weight": p((VOCAB, HIDDEN), 0, rep2)}
    layer = 0
    for stage, count in enumerate(stage_layers(LAYERS, pp)):
        for _ in range(count):
            pre = f"model.layers.{layer}."
            out[pre + "attention.wq.weight"] = p((HEADS * HEAD_DIM, HIDDEN), stage, col)
            out[pre + "attention.wk.weight"] = p((KV_HEADS * HEAD_DIM, HIDDEN), stage, col)
            out[pre + "attention.wv.weight"] = p((KV_HEADS * HEAD_DIM, HIDDEN), stage, col)
            out[pre + "attention.wo.weight"] = p((HIDDEN, HEADS * HEAD_DIM), stage, row)
            out[pre + "feed_forward.w1.weight"] = p((FFN, HIDDEN), stage, col)
            out[pre + "feed_forward.w3.weight"] = p((FFN, HIDDEN), stage, col)
            out[pre + "feed_forward.w2.weight"] = p((HIDDEN, FFN), stage, row)
            out[pre + "attention_norm.weight"] = p((HIDDEN,), stage, rep1)
            out[pre + "ffn_norm.weight"] = p((HIDDEN,), stage, rep1)
            layer += 1
    out["model.norm_out.weight"] = p((HIDDEN,), pp - 1, rep1)
    out["lm_head.weight"] = p((VOCAB, HIDDEN), pp - 1, col)
    return out


def write_strategy(folder: Path, dp: int, tp: int, pp: int) -> None:
    """One file per rank (the parameters of its stage) plus the merged file."""
    folder.mkdir(parents=True, exist_ok=True)
    per_stage = dp * tp
    stages = [list(range(s * per_stage, (s + 1) * per_stage)) for s in range(pp)]
    params = llama_params(dp, tp, pp)
    head = {"format": "autotrans-strategy", "version": 1}
    by_stage: dict[int, dict] = {s: {} for s in range(pp)}
    for name, d in params.items():
        by_stage[d["stage"]][name] = d
    for s, ranks in enumerate(stages):
        for r in ranks:
            doc = {**head, "rank": r, "stages": stages, "params": by_stage[s]}
            (folder / f"ckpt_strategy_rank_{r}.json").write_text(json.dumps(doc))
    (folder / "merged_ckpt_strategy.json").write_text(json.dumps({**head, "stages": stages, "params": params}))


def time_plan(job: Path, out: Path, args: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one `autotrans plan` child process.
    CPU time is reported too because the wall time moves with other load on the machine."""
    cmd = [sys.executable, "-m", "runner", "plan", str(job), *args]
    start = time.perf_counter()
    # a fresh fork per run, so RUSAGE_CHILDREN's max RSS is this child's (children only grow it)
    pid = os.fork()
    if pid == 0:
        with open(out, "wb") as f:
            os.dup2(f.fileno(), 1)
        os.execv(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="", help="where strategies go (default: a temporary folder)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="plan_scale_"))
    layouts = {"src_dp1_tp8_pp16": (1, 8, 16), "dst_dp8_tp8_pp16": (8, 8, 16), "dst_dp4_tp16_pp8": (4, 16, 8)}
    t0 = time.perf_counter()
    for name, (dp, tp, pp) in layouts.items():
        if not (work / name / "merged_ckpt_strategy.json").exists():
            write_strategy(work / name, dp, tp, pp)
    print(f"strategies in {work} ({time.perf_counter() - t0:.1f} s to write); stage layers "
          f"pp16 {stage_layers(LAYERS, 16)}, pp8 {stage_layers(LAYERS, 8)}")
    print(f"{'case':<26}{'mode':<6}{'wall s median':>14}{'min':>7}{'CPU s':>7}{'peak RSS MB':>13}{'write TB':>10}{'amp':>6}")
    for dst in ("dst_dp8_tp8_pp16", "dst_dp4_tp16_pp8"):
        job = work / f"job_{dst}.yaml"
        job.write_text(f"src_strategy_path_or_dir: {work / 'src_dp1_tp8_pp16'}\n"
                       f"dst_strategy_path_or_dir: {work / dst}\noutput_dir: {work / 'out'}\n")
        for mode, extra in (("text", []), ("json", ["--json"])):
            out = work / f"plan_{dst}.{mode}"
            runs = [time_plan(job, out, extra) for _ in range(args.repeat)]
            walls = [w for w, _, _ in runs]
            cpu = statistics.median(c for _, c, _ in runs)
            rss = max(r for _, _, r in runs)
            total = json.loads(out.read_text())["total"] if mode == "json" else None
            tb = f"{total['write_bytes'] / 1e12:.3f}" if total else ""
            amp = f"{total['read_amplification']:.2f}" if total else ""
            label = f"128 -> {dst[4:]}"
            print(f"{label:<26}{mode:<6}{statistics.median(walls):>14.2f}{min(walls):>7.2f}{cpu:>7.2f}{rss:>13.0f}{tb:>10}{amp:>6}")


if __name__ == "__main__":
    main()
