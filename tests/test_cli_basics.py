"""The CLI's contract outside any job: fast start-up, exit codes, config errors,
and a README whose test command is the one CI runs."""

from __future__ import annotations

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
