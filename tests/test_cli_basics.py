"""The CLI's contract outside any job: fast start-up, exit codes, config errors,
and a README whose test command is the one CI runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_imports_no_heavy_module() -> None:
    code = ("import sys; from runner.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'google.protobuf', 'mpi4py', 'omegaconf', 'numpy') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_help_lists_every_command() -> None:
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("run", "strategy", "plan", "diff", "inspect", "verify"):
        assert cmd in r.stdout


def test_usage_errors_exit_2() -> None:
    assert run().returncode == 2
    assert run("nosuchcommand").returncode == 2
    r = run("run", "/nonexistent/job.yaml")
    assert r.returncode == 2 and r.stderr.startswith("autotrans: error: job file /nonexistent/job.yaml does not exist")


@pytest.mark.parametrize("yaml_text, override, message", [
    ("auto_trans_ckp: true\n", None, "config key auto_trans_ckp is unknown; did you mean auto_trans_ckpt?"),
    ("load_checkpoint: x\n", "use_parallel=maybe", "config key use_parallel: expected bool, got str 'maybe'"),
    ("parallel_config: {model_parallel: two}\n", None, "config key parallel_config.model_parallel: expected int"),
    ("output_format: onnx\n", None, "config key output_format: 'onnx' is not one of"),
    ("lora: {adaptor: x}\n", None, "config key lora.adaptor is unknown; did you mean lora.adapter?"),
    ("load_checkpoint: [1, 2\n", None, "cannot parse YAML"),
])
def test_config_mistakes_name_the_key(tmp_path: Path, yaml_text: str, override, message: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml_text)
    r = run("run", str(job), *([override] if override else []))
    assert r.returncode == 2, r.stderr
    first = r.stderr.splitlines()[0]
    assert message in first
    assert "Traceback" not in r.stderr


def test_training_yaml_keys_are_ignored(tmp_path: Path) -> None:
    """A MindSpore Transformers training YAML's own sections are not taken for typos."""
    from runner.config import from_mapping

    cfg = from_mapping({
        "seed": 0, "run_mode": "train", "output_dir": "./output", "load_checkpoint": "", "auto_trans_ckpt": False,
        "only_save_strategy": False, "resume_training": False, "use_parallel": True,
        "context": {"mode": 0, "device_target": "Ascend"}, "parallel": {"enable_parallel_optimizer": True},
        "parallel_config": {"data_parallel": 2, "model_parallel": 4, "pipeline_stage": 2, "use_seq_parallel": False,
                            "micro_batch_num": 16, "vocab_emb_dp": True, "gradient_aggregation_group": 4},
        "runner_config": {"epochs": 2}, "optimizer": {"type": "AdamW"}, "trainer": {"type": "CausalLanguageModelingTrainer"},
        "model": {"model_config": {"type": "LlamaConfig", "num_layers": 4}, "arch": {"type": "LlamaForCausalLM"}},
        "callbacks": [], "recompute_config": {}, "profile": False, "layer_scale": False, "metric": {},
    })
    assert cfg.parallel_config.model_parallel == 4 and cfg.parallel_config.optimizer_shard is True
    assert cfg.auto_trans_ckpt is False


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    blocks = readme.split("```bash\n")
    commands = [b.split("\n```")[0].strip() for b in blocks[1:3]]
    assert "autotrans run configs/demo.yaml" in commands[0]
    assert "pytest" in commands[1] and commands[1] in ci


# ---------------------------------------------------------------------------- flags, help, usage


def test_flags_stand_anywhere_on_the_line(tmp_path: Path) -> None:
    """--debug, --no-progress and --json after the config or between overrides (SPEC 3)."""
    for n, line in enumerate([("run", "configs/demo.yaml", f"output_dir={tmp_path}/a", "--debug"),
                              ("run", "configs/demo.yaml", "--no-progress", f"output_dir={tmp_path}/b"),
                              ("--no-progress", "run", "configs/demo.yaml", f"output_dir={tmp_path}/c", "--debug")]):
        r = run(*line)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "abc"[n] / "transformed_checkpoint/autotrans.json").is_file()
    r = run("plan", "--json", "configs/demo.yaml", f"output_dir={tmp_path}/d", "--debug")
    assert r.returncode == 0 and json.loads(r.stdout)["format"] == "autotrans-plan", r.stderr
    missing = run("run", str(tmp_path / "none.yaml"), "--debug")  # --debug at the end still gives the traceback
    assert missing.returncode == 2 and "Traceback" in missing.stderr
    assert missing.stderr.strip().splitlines()[-1] == f"autotrans: error: job file {tmp_path}/none.yaml does not exist"
    r = run("inspect", "configs/demo/checkpoint", "--json")
    assert r.returncode == 2 and r.stderr.strip().endswith("autotrans: error: --json is an option of autotrans plan")


def test_run_help_lists_the_job_keys_with_their_defaults() -> None:
    r = run("run", "--help")
    assert r.returncode == 0
    assert r.stdout.startswith("usage: autotrans run CONFIG.yaml [key=value ...] [--debug] [--no-progress]")
    listed = {line.split()[0]: " ".join(line.split()[1:]) for line in r.stdout.split("with their defaults:\n")[1].splitlines()}
    assert listed["output_dir"] == "./output" and listed["auto_trans_ckpt"] == "true" and listed["prefix"] == "checkpoint_"
    assert listed["strategy_format"] == "json (one of: json, mindspore)"
    assert listed["parallel_config.model_parallel"] == "1" and listed["parallel_config.vocab_emb_dp"] == "true"
    assert listed["lora.scaling"] == "null" and listed["lora.adapter"] == "''"
    assert listed["preprocess_data.json_keys"] == "[text]" and listed["preprocess_data.input"].startswith("required: a jsonl file")
    from runner.config import TOP_KEYS

    for key in set(TOP_KEYS) - {"parallel_config", "parallel", "moe_config", "model", "lora", "preprocess_data"}:
        assert key in listed, key  # every key the runner reads is there


def test_run_without_a_config_says_what_to_give() -> None:
    r = run("run")
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["usage: autotrans run CONFIG.yaml [key=value ...]",
                                     "autotrans run: error: give a job file (autotrans run --help lists the job keys)"]


def test_broken_pipe_ends_quietly() -> None:
    """`autotrans plan job | head`: the reader goes away; no error, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "runner", "plan", "configs/demo.yaml"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # closed before the job prints anything
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and stderr == ""


def test_mpi_job_file_mistake_is_said_once(tmp_path: Path) -> None:
    """Under mpiexec every rank reads the job file; its mistake is one line for the job."""
    job = tmp_path / "job.yaml"
    job.write_text("auto_trans_ckp: true\n")
    r = subprocess.run([shutil.which("mpiexec"), "-n", "2", sys.executable, "-m", "runner", "run", str(job)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["autotrans: error: read the job file failed on MPI rank 0 of 2 (and on 1 more): "
                                     "config key auto_trans_ckp is unknown; did you mean auto_trans_ckpt?"], r.stderr
