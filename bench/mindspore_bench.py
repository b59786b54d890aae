"""MindSpore bench: the 1.08 GB bf16 bench model as MindSpore .ckpt files, 2-way -> 4-way
model parallel with MindSpore protobuf strategy files, .ckpt out.

Compares, in one session and on the same (page-cached) source bytes:
  cp         `cp -r` of the source, then `sync` (the storage floor)
  mindspore  mindspore.transform_checkpoints, then `sync` (skipped if MindSpore is absent)
  autotrans  `autotrans run` (one process; it fsyncs its outputs itself)
checks that both tools wrote bit-identical tensors, and prints a markdown table of
median wall times, peak RSS and the ratios MindSpore / autotrans.

  python bench/mindspore_bench.py [--runs 3] [--ms-runs 1] [--dir /tmp/autotrans-msbench]
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

from bench_util import bench_inputs, du, median_run, python, write_tp_checkpoint, write_tp_strategy

MINDSPORE = """
import sys, mindspore as ms
ms.transform_checkpoints(sys.argv[1], sys.argv[2], "checkpoint_", sys.argv[3], sys.argv[4])
"""


def build(root: Path) -> None:
    """A 2-way .ckpt checkpoint (converted by autotrans from the shared safetensors bench
    model) and MindSpore strategy files for 2 and 4 ways."""
    from runner import strategy as strat
    from runner.formats.mindspore_strategy import write_rank_file

    st = root / "st"
    write_tp_checkpoint(st, 2)
    write_tp_strategy(st, 4)
    for tp in (2, 4):
        write_rank_file(strat.load(st / f"strategy_tp{tp}"), 0, root / f"ms_strategy_tp{tp}")
    job = root / "to_ckpt.yaml"
    job.write_text(f"load_checkpoint: {st / 'ckpt'}\nsrc_strategy_path_or_dir: {st / 'strategy_tp2'}\n"
                   f"dst_strategy_path_or_dir: {root / 'ms_strategy_tp2'}\noutput_dir: {root / 'conv'}\noutput_format: ckpt\n")
    subprocess.run([python(), "-m", "runner", "run", str(job), "--no-progress"], check=True)
    (root / "conv" / "transformed_checkpoint").rename(root / "ckpt")
    (root / "ckpt" / "autotrans.json").unlink(missing_ok=True)
    for p in (root / "ckpt").glob("*"):
        if p.is_file():
            p.unlink()
    shutil.rmtree(root / "conv")
    shutil.rmtree(st)


def same_tensors(a: Path, b: Path, ranks: int) -> bool:
    from runner.formats.mindspore_ckpt import CkptReader

    for r in range(ranks):
        (fa,), (fb,) = list((a / f"rank_{r}").glob("*.ckpt")), list((b / f"rank_{r}").glob("*.ckpt"))
        ra, rb = CkptReader(fa), CkptReader(fb)
        try:
            if ra.tensors() != rb.tensors():
                return False
            for name in ra.tensors():
                if ra.array(name).tobytes() != rb.array(name).tobytes():
                    return False
                ra.release()
                rb.release()
        finally:
            ra.close()
            rb.close()
    return True


def main() -> None:
    args, root = bench_inputs("/tmp/autotrans-msbench", "ckpt/rank_1", lambda r, a: build(r), lambda ap: ap.add_argument(
        "--ms-runs", type=int, default=1, help="MindSpore takes ~30 s a run"))
    ckpt, size = root / "ckpt", du(root / "ckpt")
    src_s, dst_s = root / "ms_strategy_tp2" / "ckpt_strategy_rank_0.ckpt", root / "ms_strategy_tp4" / "ckpt_strategy_rank_0.ckpt"
    out, ms_out = root / "out", root / "ms_out"
    job = root / "job.yaml"
    job.write_text(f"load_checkpoint: {ckpt}\nsrc_strategy_path_or_dir: {src_s}\ndst_strategy_path_or_dir: {dst_s}\n"
                   f"output_dir: {out}\noutput_format: ckpt\n")

    def clean() -> None:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ms_out, ignore_errors=True)

    rows = [("cp -r + sync", *median_run(lambda: ["sh", "-c", f"cp -r {ckpt} {out} && sync"], args.runs, clean))]
    ours = median_run(lambda: [python(), "-m", "runner", "run", str(job), "--no-progress"], args.runs, clean)
    rows.append(("autotrans", *ours))
    has_ms = importlib.util.find_spec("mindspore") is not None
    if has_ms:
        clean()
        theirs = median_run(lambda: ["sh", "-c", f"{python()} -c '{MINDSPORE}' {ckpt} {ms_out} {src_s} {dst_s} && sync"],
                            args.ms_runs, lambda: shutil.rmtree(ms_out, ignore_errors=True))
        rows.append(("MindSpore transform_checkpoints + sync", *theirs))
        subprocess.run([python(), "-m", "runner", "run", str(job), "--no-progress"], check=True, capture_output=True)
        identical = same_tensors(out / "transformed_checkpoint", ms_out, 4)
    print(f"\nsource {size / 1e9:.2f} GB bf16 .ckpt (2-way model parallel) -> 4-way .ckpt; "
          f"median of {args.runs} runs ({args.ms_runs} for MindSpore)\n")
    print("| method | wall s | peak RSS MB |")
    print("|---|---|---|")
    for name, t, rss in rows:
        print(f"| {name} | {t:.2f} | {rss / 1e6:.0f} |")
    if has_ms:
        print(f"\nMindSpore / autotrans: {theirs[0] / ours[0]:.1f}x the time, {theirs[1] / ours[1]:.1f}x the peak RSS; "
              f"outputs bit-identical: {'yes' if identical else 'NO'}")
    clean()


if __name__ == "__main__":
    main()
