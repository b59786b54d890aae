"""MindSpore bench: the 1.08 GB bf16 bench model as MindSpore .ckpt files, 2-way -> 4-way
model parallel with MindSpore protobuf strategy files, .ckpt out.

Compares, in one session and on the same (page-cached) source bytes:
  cp         `cp -r` of the source, then `sync` (the storage floor)
  mindspore  mindspore.transform_checkpoints, then `sync` (skipped without MindSpore)
  autotrans  `autotrans run` (one process; it fsyncs its outputs itself)
the methods taking turns run by run, checks that both tools wrote bit-identical
tensors, and prints the table of bench/reshard.py and the ratios MindSpore / autotrans.

  python bench/mindspore_bench.py [--runs 5] [--ms-python /venv/bin/python] [--dir /tmp/autotrans-msbench]
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from bench_util import alternating, bench_inputs, du, print_table, python, write_tp_checkpoint, write_tp_strategy

MINDSPORE = """
import sys, mindspore as ms
ms.transform_checkpoints(sys.argv[1], sys.argv[2], "checkpoint_", sys.argv[3], sys.argv[4])
"""


def build(root: Path) -> None:
    """A 2-way .ckpt checkpoint (converted by autotrans from the shared safetensors bench
    model) and MindSpore strategy files for 2 and 4 ways."""
    from runner import strategy_files
    from runner.formats.mindspore_strategy import write_rank_file

    st = root / "st"
    write_tp_checkpoint(st, 2)
    write_tp_strategy(st, 4)
    for tp in (2, 4):
        write_rank_file(strategy_files.load(st / f"strategy_tp{tp}"), 0, root / f"ms_strategy_tp{tp}")
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
        "--ms-python", default=python(), help="a Python that has MindSpore (e.g. a virtual environment's)"))
    ckpt, size = root / "ckpt", du(root / "ckpt")
    src_s, dst_s = root / "ms_strategy_tp2" / "ckpt_strategy_rank_0.ckpt", root / "ms_strategy_tp4" / "ckpt_strategy_rank_0.ckpt"
    out, ms_out = root / "out", root / "ms_out"
    job = root / "job.yaml"
    job.write_text(f"load_checkpoint: {ckpt}\nsrc_strategy_path_or_dir: {src_s}\ndst_strategy_path_or_dir: {dst_s}\n"
                   f"output_dir: {out}\noutput_format: ckpt\n")

    def clean() -> None:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ms_out, ignore_errors=True)
        os.sync()  # no run pays for another's writeback

    methods = {"cp -r + sync": lambda: ["sh", "-c", f"cp -r {ckpt} {out} && sync"],
               "autotrans": lambda: [python(), "-m", "runner", "run", str(job), "--no-progress"]}
    has_ms = subprocess.run([args.ms_python, "-c", "import mindspore"], capture_output=True).returncode == 0
    if has_ms:
        methods["MindSpore transform_checkpoints + sync"] = lambda: [
            "sh", "-c", f"{args.ms_python} -c '{MINDSPORE}' {ckpt} {ms_out} {src_s} {dst_s} && sync"]
    results = alternating(methods, args.runs, clean)
    if has_ms:
        subprocess.run(methods["autotrans"](), check=True, capture_output=True)
        subprocess.run(methods["MindSpore transform_checkpoints + sync"](), check=True, capture_output=True)
        identical = same_tensors(out / "transformed_checkpoint", ms_out, 4)
    print(f"\nsource {size / 1e9:.2f} GB bf16 .ckpt (2-way model parallel) -> 4-way .ckpt; "
          f"median of {args.runs} alternating runs\n")
    print_table(results)
    if has_ms:
        ours, theirs = results["autotrans"][0], results["MindSpore transform_checkpoints + sync"][0]
        print(f"\nMindSpore / autotrans: {theirs.wall / ours.wall:.1f}x the time, {theirs.rss / ours.rss:.1f}x the peak RSS; "
              f"outputs bit-identical: {'yes' if identical else 'NO'}")
    clean()


if __name__ == "__main__":
    main()
