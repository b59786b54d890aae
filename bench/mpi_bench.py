"""MPI benchmark: the 1.08 GB bf16 bench model from 2-way to 4-way model parallel, as one
process and as 2 MPI ranks (mpiexec on this machine), with and without a shared disk.

  shared disk     both ranks see both source rank folders; each writes its share
  no shared disk  rank r sees only source rank_r (its own folder of symlinks), so half
                  of every destination file's slices travel between the ranks over MPI

Also `cp -r` + `sync` of the source (the storage floor). Prints a markdown table of
median wall times, ratios and peak RSS (the largest single process of the run), and
checks that every MPI output is byte-identical to the single-process one.

  python bench/mpi_bench.py [--runs 3] [--dir /tmp/autotrans-bench]
"""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

from bench_util import du, median_run, python, reshard_inputs


def main() -> None:
    args, root = reshard_inputs()
    runs = args.runs
    ckpt = root / "ckpt"
    for r in (0, 1):  # rank r's own view of the source: only rank_r
        view = root / f"node{r}"
        view.mkdir(exist_ok=True)
        if not (view / f"rank_{r}").exists():
            (view / f"rank_{r}").symlink_to(ckpt / f"rank_{r}")
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise SystemExit("mpiexec not found: pip install mpich mpi4py")

    def job(name: str, load: str) -> Path:
        path = root / f"{name}.yaml"
        path.write_text(f"load_checkpoint: {load}\nsrc_strategy_path_or_dir: {root / 'strategy_tp2'}\n"
                        f"dst_strategy_path_or_dir: {root / 'strategy_tp4'}\noutput_dir: {root / name}\n")
        return path

    jobs = {
        "autotrans, 1 process": ([], job("out_1", str(ckpt))),
        "autotrans, 2 MPI ranks, shared disk": ([mpiexec, "-n", "2"], job("out_2", str(ckpt))),
        "autotrans, 2 MPI ranks, no shared disk": ([mpiexec, "-n", "2"], job("out_2n", str(root / "node${oc.env:PMI_RANK}"))),
    }
    def clean(name: str):
        return lambda: shutil.rmtree(root / name, ignore_errors=True)

    rows = [("cp -r + sync", *median_run(lambda: ["sh", "-c", f"cp -r {ckpt} {root / 'out_cp'} && sync"], runs, clean("out_cp")))]
    for name, (launcher, path) in jobs.items():
        rows.append((name, *median_run(lambda: [*launcher, python(), "-m", "runner", "run", str(path), "--no-progress"],
                                       runs, clean(path.stem))))
    same = identical(root / "out_1", [root / "out_2", root / "out_2n"])
    print(f"\nsource {du(ckpt) / 1e9:.2f} GB bf16 (2-way model parallel) -> 4-way; median of {runs} runs; "
          f"{os.cpu_count()} CPUs; MPI outputs byte-identical to one process: {'yes' if same else 'NO'}\n")
    print("| run | wall s | x (cp -r + sync) | x (1 process) | peak RSS MB |")
    print("|---|---|---|---|---|")
    cp, one = rows[0][1], rows[1][1]
    for name, t, rss in rows:
        print(f"| {name} | {t:.2f} | {t / cp:.2f} | {t / one:.2f} | {rss / 1e6:.0f} |")
    for name in ("out_cp", "out_1", "out_2", "out_2n"):
        clean(name)()


def identical(ref: Path, others: list[Path]) -> bool:
    """Every checkpoint and strategy file of `ref` has the same bytes in the others (the
    last runs of the median, still on disk)."""
    files = [p.relative_to(ref) for p in ref.rglob("*") if p.is_file() and (p.suffix == ".safetensors" or p.parent.name == "strategy")]
    return all(filecmp.cmp(ref / f, o / f, shallow=False) for o in others for f in files)


if __name__ == "__main__":
    main()
