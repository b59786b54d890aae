"""MPI runs (SPEC 9): `mpiexec -n 2/3/4` on one machine gives the same bytes as one
process, for split, reshard and merge, with and without a disk shared by the ranks;
a failing or killed rank ends every rank. The checkpoints and strategies are built here
with numpy; expected tensors come from numpy slicing written in this file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from runner.cli import main as cli_main

# The test extra installs the mpich wheel: its mpiexec is on PATH or beside python; a
# missing one fails the tests rather than skipping them.
MPIEXEC = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
pytestmark = [pytest.mark.mpi]

H, F, V, LAYERS = 16, 32, 64, 2
COL, ROW, REP = "col", "row", "rep"


def weights() -> dict[str, tuple[tuple[int, ...], str, int]]:
    """name -> (shape, split, pipeline stage of a 2-stage layout)."""
    w = {"embed.weight": ((V, H), COL, 0), "lm_head.weight": ((V, H), COL, 1), "norm.weight": ((H,), REP, 1)}
    for i in range(LAYERS):
        w |= {f"layers.{i}.wq.weight": ((H, H), COL, i), f"layers.{i}.wo.weight": ((H, H), ROW, i),
              f"layers.{i}.w1.weight": ((F, H), COL, i), f"layers.{i}.w2.weight": ((H, F), ROW, i),
              f"layers.{i}.norm.weight": ((H,), REP, i)}
    return w


def full_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {n: rng.standard_normal(shape).astype(np.float32) for n, (shape, _s, _st) in weights().items()}


def piece(t: np.ndarray, split: str, k: int, tp: int) -> np.ndarray:
    """The oracle: tensor-parallel slice k of tp (column = dim 0, row = dim 1)."""
    if split == COL:
        n = t.shape[0] // tp
        return t[k * n:(k + 1) * n]
    if split == ROW:
        n = t.shape[1] // tp
        return t[:, k * n:(k + 1) * n]
    return t


def layout(tp: int, pp: int) -> tuple[list[list[int]], dict[str, tuple[int, int]]]:
    """Ranks stage-major, tp fastest: stages, and rank -> (stage, tp index)."""
    stages = [list(range(s * tp, (s + 1) * tp)) for s in range(pp)]
    return stages, {r: (s, k) for s, ranks in enumerate(stages) for k, r in enumerate(ranks)}


def strategy_doc(tp: int, pp: int) -> dict:
    maps = {COL: [0, -1], ROW: [-1, 0]}
    params = {n: {"shape": list(shape), "dtype": "F32", "stage": st if pp > 1 else 0, "dev_matrix": [tp],
                  "tensor_map": maps.get(split, [-1] * len(shape))} for n, (shape, split, st) in weights().items()}
    return {"format": "autotrans-strategy", "version": 1, "stages": layout(tp, pp)[0], "params": params}


def expected_rank(full: dict, tp: int, pp: int, rank: int) -> dict[str, np.ndarray]:
    stage, k = layout(tp, pp)[1][rank]
    return {n: piece(full[n], split, k, tp) for n, (_shape, split, st) in weights().items() if pp == 1 or st == stage}


def write_strategy(folder: Path, tp: int, pp: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "merged_ckpt_strategy.json").write_text(json.dumps(strategy_doc(tp, pp)))
    return folder


def write_distributed(root: Path, full: dict, tp: int, pp: int, ranks=None) -> Path:
    """rank_N/checkpoint_N.safetensors for `ranks` (default all) of a tp x pp layout."""
    for r in ranks if ranks is not None else range(tp * pp):
        (root / f"rank_{r}").mkdir(parents=True, exist_ok=True)
        save_file({n: np.ascontiguousarray(a) for n, a in expected_rank(full, tp, pp, r).items()},
                  str(root / f"rank_{r}" / f"checkpoint_{r}.safetensors"))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Sources (full, tp4, tp2 x pp2), destination strategies, and single-process results."""
    root = tmp_path_factory.mktemp("mpi")
    full = full_tensors()
    save_file(full, str(root / "full.safetensors"))
    w = {"root": root, "full": full, "ref": {}}
    w["tp4"] = write_distributed(root / "tp4", full, 4, 1)
    w["tp2pp2"] = write_distributed(root / "tp2pp2", full, 2, 2)
    for tp, pp in ((4, 1), (2, 2)):
        write_strategy(root / f"s_tp{tp}pp{pp}", tp, pp)
    return w


JOBS = {  # name: (job keys, destination tp, pp or None for a merge)
    "split": ({"load_checkpoint": "full.safetensors", "dst_strategy_path_or_dir": "s_tp2pp2"}, (2, 2)),
    "reshard": ({"load_checkpoint": "tp2pp2", "src_strategy_path_or_dir": "s_tp2pp2",
                 "dst_strategy_path_or_dir": "s_tp4pp1"}, (4, 1)),
    "merge": ({"load_checkpoint": "tp2pp2", "src_strategy_path_or_dir": "s_tp2pp2", "use_parallel": False}, None),
}


def job_file(root: Path, name: str, keys: dict) -> Path:
    body = {k: (str(root / v) if k.endswith(("checkpoint", "_dir")) and isinstance(v, str) else v) for k, v in keys.items()}
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def mpirun(cmd: list, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MPIEXEC, *map(str, cmd)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, start_new_session=True)  # its own group: Ctrl-C tests signal it


def autotrans(*args) -> list:
    return [sys.executable, "-m", "runner", "run", *args, "--no-progress"]


def outputs(out: Path) -> dict[str, bytes]:
    """Every checkpoint and strategy file's bytes, and the manifest's file list (the rest
    of it holds times; progress records hold the stamps of the files each rank read)."""
    got = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
           if p.is_file() and p.name != "autotrans.json" and ".autotrans-progress" not in p.parts}
    files = json.loads((out / "transformed_checkpoint/autotrans.json").read_text())["files"]
    got["files"] = json.dumps([{k: v for k, v in f.items() if k != "mpi_rank"} for f in files]).encode()  # who wrote it varies
    return got


def reference(world: dict, name: str) -> dict[str, bytes]:
    """The single-process run, checked against numpy slicing of the full tensors."""
    if name not in world["ref"]:
        keys, dst = JOBS[name]
        root = world["root"]
        out = root / f"ref_{name}"
        assert cli_main(["run", str(job_file(root, f"ref_{name}", keys | {"output_dir": str(out)})), "--no-progress"]) == 0
        ckpt = out / "transformed_checkpoint"
        if dst is None:
            want = {0: world["full"]}
        else:
            want = {r: expected_rank(world["full"], *dst, r) for r in range(dst[0] * dst[1])}
        for r, tensors in want.items():
            got = load_file(str(ckpt / f"rank_{r}" / f"checkpoint_{r}.safetensors"))
            assert sorted(got) == sorted(tensors)
            for n, t in tensors.items():
                np.testing.assert_array_equal(got[n], t, err_msg=f"rank {r} {n}")
        world["ref"][name] = outputs(out)
    return world["ref"][name]


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("name", list(JOBS))
def test_mpi_matches_single_process(world, name, n):
    root = world["root"]
    keys, _dst = JOBS[name]
    out = root / f"mpi_{name}_{n}"
    proc = mpirun(["-n", n, *autotrans(job_file(root, out.name, keys | {"output_dir": str(out)}))])
    assert proc.returncode == 0, proc.stderr
    assert outputs(out) == reference(world, name)
    assert proc.stderr.count("autotrans: done:") == 1  # one summary, from rank 0


def test_no_shared_disk_two_nodes(world):
    """2 'nodes' x 2 ranks, each node with its own copy of the job's inputs holding only
    some source rank folders and its own output_dir: tp4 -> tp2 x pp2 by rank."""
    root = world["root"] / "nodes2"
    for node, ranks in ((0, [0, 2]), (1, [1, 3])):
        write_distributed(root / f"node{node}/ckpt", world["full"], 4, 1, ranks)
        write_strategy(root / f"node{node}/src", 4, 1)
        write_strategy(root / f"node{node}/dst", 2, 2)
    base = str(root / "node${oc.env:NODE}")
    job = job_file(root, "job", {"load_checkpoint": base + "/ckpt", "src_strategy_path_or_dir": base + "/src",
                                 "dst_strategy_path_or_dir": base + "/dst", "output_dir": base + "/out",
                                 "transform_by_rank": True})
    proc = mpirun(["-n", 2, "-env", "NODE", 0, *autotrans(job), ":", "-n", 2, "-env", "NODE", 1, *autotrans(job)])
    assert proc.returncode == 0, proc.stderr
    want = world["full"]
    for node, ranks in ((0, [0, 1]), (1, [2, 3])):
        ckpt = root / f"node{node}/out/transformed_checkpoint"
        assert sorted(p.name for p in ckpt.glob("rank_*")) == [f"rank_{r}" for r in ranks]
        for r in ranks:
            got = load_file(str(ckpt / f"rank_{r}/checkpoint_{r}.safetensors"))
            exp = expected_rank(want, 2, 2, r)
            assert sorted(got) == sorted(exp)
            for n, t in exp.items():
                np.testing.assert_array_equal(got[n], t, err_msg=f"rank {r} {n}")
        manifest = json.loads((ckpt / "autotrans.json").read_text())
        assert [f["path"] for f in manifest["files"]] == [f"rank_{r}/checkpoint_{r}.safetensors" for r in ranks]
        strategies = sorted(p.name for p in (root / f"node{node}/out/strategy").iterdir())
        assert strategies == [f"ckpt_strategy_rank_{r}.json" for r in ranks] + ["merged_ckpt_strategy.json"]


def test_no_shared_disk_merge_into_one_folder(world):
    """3 ranks, each seeing its own folder (${oc.env:PMI_RANK}) with some source ranks,
    one overlapping; the full checkpoint is written to one shared output_dir."""
    root = world["root"] / "ranks3"
    for mpi_rank, ranks in ((0, [0]), (1, [1, 2]), (2, [3, 0])):
        write_distributed(root / f"r{mpi_rank}", world["full"], 2, 2, ranks)
    out = root / "out"
    job = job_file(root, "job", {"load_checkpoint": str(root / "r${oc.env:PMI_RANK}"), "shared_disk": False,
                                 "src_strategy_path_or_dir": str(world["root"] / "s_tp2pp2"),
                                 "use_parallel": False, "output_dir": str(out)})
    proc = mpirun(["-n", 3, *autotrans(job)])
    assert proc.returncode == 0, proc.stderr
    assert outputs(out) == reference(world, "merge")


def test_strategy_dry_run(world):
    """only_save_strategy under MPI: rank r writes rank r's file, rank 0 the merged one."""
    root = world["root"]
    ref, out = root / "dry_ref", root / "dry_mpi"
    keys = {"load_checkpoint": "full.safetensors", "dst_strategy_path_or_dir": "s_tp2pp2", "only_save_strategy": True}
    assert cli_main(["run", str(job_file(root, "dry_ref", keys | {"output_dir": str(ref)})), "--no-progress"]) == 0
    proc = mpirun(["-n", 4, *autotrans(job_file(root, "dry_mpi", keys | {"output_dir": str(out)}))])
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (out / "strategy").iterdir())
    assert names == [f"ckpt_strategy_rank_{r}.json" for r in range(4)] + ["merged_ckpt_strategy.json"]
    for name in names:
        assert (out / "strategy" / name).read_bytes() == (ref / "strategy" / name).read_bytes(), name
    assert not (out / "transformed_checkpoint").exists()



def test_strategy_dry_run_replaces_an_earlier_jobs_files(world):
    """A json dry run, then a mindspore one under MPI: one rank per output folder removes
    the earlier job's files (several ranks removing them would race and fail)."""
    root = world["root"]
    out = root / "dry_twice"
    keys = {"load_checkpoint": "full.safetensors", "dst_strategy_path_or_dir": "s_tp2pp2",
            "only_save_strategy": True, "output_dir": str(out)}
    assert cli_main(["run", str(job_file(root, "dry_json", keys)), "--no-progress"]) == 0
    proc = mpirun(["-n", 4, *autotrans(job_file(root, "dry_ms", keys | {"strategy_format": "mindspore"}))])
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (out / "strategy").iterdir())
    assert names == [f"ckpt_strategy_rank_{r}.ckpt" for r in range(4)] + ["merged_ckpt_strategy.ckpt"]

def errors(stderr: str) -> list[str]:
    """The error messages of all ranks (mpiexec may interleave a line and its newline)."""
    return [m.strip() for m in stderr.split("autotrans: error: ")[1:]]


def test_bad_header_on_one_rank_fails_everywhere(world):
    root = world["root"] / "bad"
    for mpi_rank, ranks in ((0, [0, 1]), (1, [2]), (2, [3])):
        write_distributed(root / f"r{mpi_rank}", world["full"], 2, 2, ranks)
    with open(root / "r2/rank_3/checkpoint_3.safetensors", "r+b") as f:
        f.write((1 << 40).to_bytes(8, "little"))  # header length far past the end
    job = job_file(root, "job", {"load_checkpoint": str(root / "r${oc.env:PMI_RANK}"), "use_parallel": False,
                                 "src_strategy_path_or_dir": str(world["root"] / "s_tp2pp2"), "output_dir": str(root / "out")})
    proc = mpirun(["-n", 3, *autotrans(job)])
    assert proc.returncode == 1, proc.stderr
    said = errors(proc.stderr)
    assert len(said) == 1, proc.stderr  # one line for the job (SPEC 3), said by rank 0
    assert said[0].startswith("read source headers failed on MPI rank 2 of 3: ") and "checkpoint_3.safetensors" in said[0]
    assert not (root / "out/transformed_checkpoint").exists()


def test_an_output_dir_in_use_refuses_the_mpi_job_on_every_rank(world, tmp_path):
    """Under MPI the lock of output_dir is taken by the rank that claims it: while another
    process holds it, the job ends on every rank with one line naming the holder, exit 1,
    nothing written; once it is free, the job runs."""
    from tests.test_reliability import HOLD

    out = tmp_path / "out"
    job = job_file(world["root"], "held", JOBS["reshard"][0] | {"output_dir": str(out)})
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in out.iterdir())
        proc = mpirun(["-n", 2, *autotrans(job)])
        assert proc.returncode == 1, proc.stderr
        said = errors(proc.stderr)
        assert len(said) == 1 and f"pid {holder.pid} " in said[0] and "in use by another autotrans run" in said[0], proc.stderr
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        holder.kill()
        holder.wait()
    again = mpirun(["-n", 2, *autotrans(job)])
    assert again.returncode == 0, again.stderr
    assert outputs(out) == reference(world, "reshard")


HOOK = """
import importlib, os, signal, sys, time
from runner.errors import AutotransError
from runner.cli import main

def hook(*args, **kwargs):
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[1] == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    if sys.argv[1] == "ctrl-c":  # as a terminal's Ctrl-C: SIGINT to mpiexec's process group; it passes it on
        proxy = os.getppid()
        with open(f"/proc/{proxy}/stat") as f:
            mpiexec = int(f.read().rsplit(")", 1)[1].split()[1])
        os.killpg(os.getpgid(mpiexec), signal.SIGINT)
        time.sleep(30)
    raise AutotransError("injected failure while writing")

module, name = sys.argv[2].split(":")  # the function whose call is the moment to act
setattr(importlib.import_module(module), name, hook)
sys.exit(main(sys.argv[3:]))
"""


def hooked(tmp_path: Path, what: str, target: str, job: Path) -> list:
    """The command of a rank that runs `job` and dies, stops, is interrupted or fails (`what`)
    when it calls `target` ("module:function")."""
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    return [sys.executable, hook, what, target, *autotrans(job)[3:]]


def hooked_run(world, tmp_path: Path, what: str, **keys) -> tuple[subprocess.CompletedProcess, Path, float]:
    """Reshard on 3 ranks without a shared disk (so ranks serve each other) where rank 1
    dies, stops or fails when it starts writing."""
    root = tmp_path / what
    for mpi_rank, ranks in ((0, [0]), (1, [1, 2]), (2, [3])):
        write_distributed(root / f"r{mpi_rank}", world["full"], 2, 2, ranks)
    out = root / "out"
    job = job_file(root, "job", {"load_checkpoint": str(root / "r${oc.env:PMI_RANK}"), "output_dir": str(out),
                                 "src_strategy_path_or_dir": str(world["root"] / "s_tp2pp2"),
                                 "dst_strategy_path_or_dir": str(world["root"] / "s_tp4pp1"), **keys})
    start = time.monotonic()
    proc = mpirun(["-n", 1, *autotrans(job), ":", "-n", 1, *hooked(tmp_path, what, "runner.compile:write_file", job), ":",
                   "-n", 1, *autotrans(job)], timeout=60)
    return proc, out, time.monotonic() - start


def test_failure_while_writing_on_one_rank(world, tmp_path):
    proc, out, _ = hooked_run(world, tmp_path, "fail")
    assert proc.returncode == 1, proc.stderr
    said = errors(proc.stderr)
    assert len(said) == 1, proc.stderr
    assert said[0] == "transform failed on MPI rank 1 of 3: injected failure while writing"
    assert not (out / "transformed_checkpoint/autotrans.json").exists()


def test_killed_rank_ends_the_job(world, tmp_path):
    proc, out, elapsed = hooked_run(world, tmp_path, "kill")  # subprocess.run's timeout: 60 s
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr  # mpiexec's own report goes to stdout
    assert "signal 9" in said or "KILLED" in said.upper(), said
    assert not (out / "transformed_checkpoint/autotrans.json").exists()
    again = mpirun(["-n", 3, *autotrans(out.parent / "job.yaml")])  # the same job, nobody killed: it resumes
    assert again.returncode == 0, again.stderr
    assert outputs(out) == reference(world, "reshard")


def test_a_stopped_rank_ends_the_job_after_mpi_timeout(world, tmp_path):
    """Rank 1 is stopped (SIGSTOP) when it starts writing: after mpi_timeout seconds the
    job ends on every rank (subprocess.run's timeout: 60 s), exit 1, one line naming it."""
    proc, out, _ = hooked_run(world, tmp_path, "stop", mpi_timeout=5)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert errors(proc.stderr) == ["MPI rank 1 of 3 made no progress for 5 s (mpi_timeout); ending the job on every rank"], proc.stderr
    assert not (out / "transformed_checkpoint/autotrans.json").exists()


def test_ctrl_c_under_mpi_is_one_line_then_resume(world, tmp_path):
    """Ctrl-C reaches mpiexec and every rank while rank 1 writes: one line for the job
    (rank 0's), no "internal error" and no MPI_Abort report, exit 130; the same job again
    finishes with the single-process bytes."""
    proc, out, _ = hooked_run(world, tmp_path, "ctrl-c")
    assert proc.returncode == 130, proc.stdout + proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("autotrans")]
    assert ours == ["autotrans: interrupted (SIGINT); run the same job again to resume"], proc.stderr
    assert "MPI_Abort" not in proc.stdout + proc.stderr and "internal error" not in proc.stderr
    assert not (out / "transformed_checkpoint/autotrans.json").exists()
    again = mpirun(["-n", 3, *autotrans(out.parent / "job.yaml")])
    assert again.returncode == 0, again.stderr
    assert outputs(out) == reference(world, "reshard")


def test_transform_by_rank_needs_matching_worlds(world):
    root = world["root"]
    keys = JOBS["split"][0] | {"transform_by_rank": True, "output_dir": str(root / "byrank")}
    proc = mpirun(["-n", 2, *autotrans(job_file(root, "byrank", keys))])
    assert proc.returncode == 2, proc.stderr
    assert "transform_by_rank: the destination has 4 ranks but MPI runs 2" in proc.stderr


def test_ranks_must_run_the_same_job(world):
    root = world["root"]
    job = job_file(root, "odd", {"load_checkpoint": str(root / "full.safetensors"), "output_dir": str(root / "odd_out"),
                                 "dst_strategy_path_or_dir": str(root / "s_tp${oc.env:LAYOUT}")})
    proc = mpirun(["-n", 1, "-env", "LAYOUT", "2pp2", *autotrans(job), ":", "-n", 1, "-env", "LAYOUT", "4pp1", *autotrans(job)])
    assert proc.returncode == 2, proc.stderr
    assert "MPI ranks [1] run a different job than rank 0" in proc.stderr


def test_launched_size_reads_the_launcher_environment():
    from runner.launch import launched_size

    assert launched_size({}) == 1
    assert launched_size({"PMI_SIZE": "4", "PMI_RANK": "2"}) == 4
    assert launched_size({"OMPI_COMM_WORLD_SIZE": "3"}) == 3
    assert launched_size({"MPI_LOCALNRANKS": "1", "PMI_SIZE": "2"}) == 2  # one rank here, two in all


def test_single_process_does_not_import_mpi(world):
    root = world["root"]
    job = job_file(root, "plain", JOBS["split"][0] | {"output_dir": str(root / "plain_out")})
    code = f"import sys; from runner.cli import main; main(['run', {str(job)!r}, '--no-progress']); print('mpi4py' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


LAUNCH = Path(__file__).resolve().parent.parent / "launch.sh"


def test_launch_sh_runs_the_job(world):
    root = world["root"]
    keys, _dst = JOBS["reshard"]
    out = root / "launched"
    proc = subprocess.run([str(LAUNCH), "-n", "2", job_file(root, "launched", keys), f"output_dir={out}", "--no-progress"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert outputs(out) == reference(world, "reshard")


def dry_launch(tmp_path: Path, version: str, *args: str) -> str:
    """launch.sh's mpiexec command line for a launcher whose --version says `version`."""
    fake = tmp_path / "mpiexec"
    fake.write_text(f"#!/bin/sh\necho '{version}'\n")
    fake.chmod(0o755)
    proc = subprocess.run([str(LAUNCH), *args, "--dry-run", "job.yaml", "a.b=1"], capture_output=True, text=True,
                          env={**os.environ, "MPIEXEC": str(fake), "AUTOTRANS_MARK": "1"}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_launch_sh_hydra_command(tmp_path):
    cmd = dry_launch(tmp_path, "HYDRA build details:", "-n", "8", "--hosts", "h1,h2")
    assert r"-n 8 -hosts h1:4\,h2:4 -genvall " in cmd
    assert cmd.rstrip().endswith("-m runner run job.yaml a.b=1")
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("h1:8\nh2:8\n")
    assert f"-n 16 -f {hostfile} -genvall " in dry_launch(tmp_path, "HYDRA", "-n", "16", "--hostfile", str(hostfile))


def test_launch_sh_open_mpi_command(tmp_path):
    cmd = dry_launch(tmp_path, "mpiexec (Open MPI) 4.1.5", "-n", "3", "--hosts", "h1,h2:1")
    assert r"--host h1:2\,h2:1" in cmd
    assert "-x AUTOTRANS_MARK" in cmd and "-x PATH" in cmd  # the environment is forwarded
    assert "-genvall" not in cmd


def test_launch_sh_refuses_bad_usage():
    for args in (["-n", "0", "job.yaml"], ["--bogus", "job.yaml"], ["-n", "2"], ["--hostfile", "/nonexistent", "job.yaml"]):
        proc = subprocess.run([str(LAUNCH), *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and proc.stderr.startswith("launch.sh: "), (args, proc.stderr)


NSEXEC = """#!/bin/sh
# hydra's "ssh": skip its options, run the command in the host's network namespace
while [ "${{1#-}}" != "$1" ]; do shift; done
host=$1; shift
case $host in {a_ip}) ns={a} ;; {b_ip}) ns={b} ;; *) echo "no namespace for $host" >&2; exit 1 ;; esac
exec ip netns exec "$ns" sh -c "$*"
"""


@pytest.fixture
def two_hosts(tmp_path):
    """Two network namespaces joined by a veth pair, as two hosts (needs root and
    iproute2, as CI has; a machine without them fails here, saying so)."""
    tag = f"{os.getpid() % 100000}"
    a, b, va, vb = f"atA{tag}", f"atB{tag}", f"va{tag}", f"vb{tag}"
    a_ip, b_ip = "10.78.0.1", "10.78.0.2"
    setup = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
             ["ip", "link", "add", va, "type", "veth", "peer", "name", vb],
             ["ip", "link", "set", va, "netns", a], ["ip", "link", "set", vb, "netns", b],
             ["ip", "-n", a, "addr", "add", f"{a_ip}/24", "dev", va], ["ip", "-n", b, "addr", "add", f"{b_ip}/24", "dev", vb],
             ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"],
             ["ip", "-n", a, "link", "set", va, "up"], ["ip", "-n", b, "link", "set", vb, "up"]]
    try:
        for cmd in setup:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            assert proc.returncode == 0, f"network namespaces need root and iproute2: {' '.join(cmd)}: {proc.stderr.strip()}"
        script = tmp_path / "nsexec.sh"
        script.write_text(NSEXEC.format(a=a, b=b, a_ip=a_ip, b_ip=b_ip))
        script.chmod(0o755)
        yield {"ns": a, "hosts": f"{a_ip},{b_ip}", "mpi": f"-launcher ssh -launcher-exec {script} -iface {va}"}
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_two_hosts_in_network_namespaces(world, two_hosts):
    """Two MPI ranks on two 'hosts' that reach each other only over a veth link, each
    seeing half of the source: the reshard needs slices from the other host."""
    root = world["root"] / "netns"
    for mpi_rank, ranks in ((0, [0, 1]), (1, [2, 3])):
        write_distributed(root / f"host{mpi_rank}", world["full"], 2, 2, ranks)
    keys, _dst = JOBS["reshard"]
    out = root / "out"
    job = job_file(root, "job", keys | {"load_checkpoint": str(root / "host${oc.env:PMI_RANK}"),
                                        "src_strategy_path_or_dir": str(world["root"] / "s_tp2pp2"),
                                        "dst_strategy_path_or_dir": str(world["root"] / "s_tp4pp1"), "output_dir": str(out)})
    mpiexec = ["ip", "netns", "exec", two_hosts["ns"], MPIEXEC, "-n", "2", "-hosts", two_hosts["hosts"].replace(",", ":1,") + ":1",
               *two_hosts["mpi"].split()]
    where = "import subprocess; print(subprocess.run(['ip', '-4', '-o', 'addr'], capture_output=True, text=True).stdout)"
    addrs = subprocess.run([*mpiexec, sys.executable, "-c", where], capture_output=True, text=True, timeout=60).stdout
    assert all(addrs.count(ip + "/24") == 1 for ip in two_hosts["hosts"].split(",")), addrs  # one rank per host
    proc = subprocess.run(["ip", "netns", "exec", two_hosts["ns"], str(LAUNCH), "-n", "2", "--hosts", two_hosts["hosts"],
                           "--mpi", two_hosts["mpi"], str(job), "--no-progress"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert outputs(out) == reference(world, "reshard")


def test_conversion_under_mpi_equals_one_process(tmp_path):
    """An HF -> Megatron conversion launched with mpiexec writes the same bytes as a
    single-process run (tests/test_one_engine.py: every rank writes its share)."""
    from tests.convert_util import make_hf

    hf = make_hf(tmp_path / "hf", "llama")
    keys = {"load_checkpoint": str(hf), "output_format": "megatron", "parallel_config": {"model_parallel": 2, "pipeline_stage": 2}}
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli_main(["run", str(job_file(tmp_path, "one", keys | {"output_dir": str(one)})), "--no-progress"]) == 0
    proc = mpirun(["-n", 2, *autotrans(job_file(tmp_path, "two", keys | {"output_dir": str(two)}))])
    assert proc.returncode == 0, proc.stderr
    files = lambda out: {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "transformed_checkpoint").rglob("*.pt"))}
    assert len(files(one)) == 4 and files(one) == files(two)
