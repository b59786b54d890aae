"""torch .pt files: Megatron's harmless classes load (Namespace, numpy RNG state,
enums as inert placeholders, TransformerEngine BytesIO extra state); a pickle that
would run code is refused and never runs."""

from __future__ import annotations

import argparse
import enum
import io
import os
import sys
import types

import numpy as np
import pytest
import torch

from runner.errors import FormatError
from runner.formats.torch_pt import Inert, TorchReader


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.fixture
def megatron_like(tmp_path, monkeypatch):
    mod = types.ModuleType("megatron.autotrans_test.enums")

    class FakeKind(enum.Enum):
        encoder_or_decoder = 1

    FakeKind.__module__ = "megatron.autotrans_test.enums"
    FakeKind.__qualname__ = "FakeKind"
    mod.FakeKind = FakeKind
    monkeypatch.setitem(sys.modules, "megatron.autotrans_test.enums", mod)
    w = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    doc = {
        "args": argparse.Namespace(num_layers=2, model_type=FakeKind.encoder_or_decoder, params_dtype=torch.bfloat16),
        "checkpoint_version": 3.0, "iteration": 9,
        "model": {"decoder.layers.0.mlp.linear_fc2.weight": w, "decoder.layers.0.mlp.linear_fc2._extra_state": io.BytesIO(b"te")},
        "rng_state": [{"np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}],
    }
    torch.save(doc, tmp_path / "model_optim_rng.pt")
    monkeypatch.delitem(sys.modules, "megatron.autotrans_test.enums")  # the reader must not need the class
    return tmp_path / "model_optim_rng.pt", w


def test_megatron_file_loads_with_inert_enums(megatron_like):
    path, w = megatron_like
    r = TorchReader(path)
    assert r.tensors() == {"model.decoder.layers.0.mlp.linear_fc2.weight": r.tensors()["model.decoder.layers.0.mlp.linear_fc2.weight"]}
    info = r.tensors()["model.decoder.layers.0.mlp.linear_fc2.weight"]
    assert (info.dtype, info.shape) == ("BF16", (3, 4))
    bits = r.array("model.decoder.layers.0.mlp.linear_fc2.weight")
    assert np.array_equal(bits, w.view(torch.int16).numpy().view(np.uint16))
    args = r.objects["args"]
    assert isinstance(args, argparse.Namespace) and args.num_layers == 2
    assert isinstance(args.model_type, Inert) and args.model_type.args == (1,)
    assert r.objects["iteration"] == 9
    r.close()


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "PWNED"
    evil = _Payload(marker) if payload == "system" else _Eval()
    torch.save({"model": {"w": torch.zeros(2)}, "x": evil}, tmp_path / "evil.pt")
    with pytest.raises(FormatError, match="refused to load.*(system|eval)"):
        TorchReader(tmp_path / "evil.pt")
    assert not marker.exists()


def test_hostile_megatron_folder_fails_cleanly(tmp_path, capsys):
    from runner.cli import main

    marker = tmp_path / "PWNED"
    rank = tmp_path / "ckpt" / "iter_0000001" / "mp_rank_00"
    rank.mkdir(parents=True)
    torch.save({"args": _Payload(marker), "model": {}}, rank / "model_optim_rng.pt")
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("1")
    job = tmp_path / "job.yaml"
    job.write_text(f"load_checkpoint: {tmp_path / 'ckpt'}\noutput_format: hf\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["run", str(job), "--no-progress"]) == 1
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()


def _as_megatron_lm_saves(path, step: int) -> None:
    """Rewrite a rank file the way Megatron-LM core 0.16 saves it: args with
    exit_signal = signal.SIGTERM and Megatron's own enums, TransformerEngine
    `_extra_state` as BytesIO, bytes and uint8 tensors, RNG, optimizer and scheduler
    state, num_floating_point_operations_so_far and the rerun state machine."""
    import random
    import signal

    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    doc = torch.load(path, weights_only=False)
    a = doc["args"]
    a.exit_signal, a.exit_signal_handler = signal.SIGTERM, True
    a.attention_backend, a.model_type = AttnBackend.auto, ModelType.encoder_or_decoder
    a.main_grads_dtype, a.exp_avg_dtype = torch.float32, torch.float32
    extra = sorted(k for k in doc["model"] if k.endswith("._extra_state"))
    for i, k in enumerate(extra):
        doc["model"][k] = [io.BytesIO(b"te state"), b"te state", torch.frombuffer(bytearray(b"te state"), dtype=torch.uint8)][i % 3]
    weights = [v for v in doc["model"].values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    params = [torch.nn.Parameter(w.float().clone()) for w in weights]
    opt = torch.optim.Adam(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    doc.update(
        iteration=step, num_floating_point_operations_so_far=1.5e15,
        optimizer={"optimizer": opt.state_dict(), "param_scheduler_step": step},
        opt_param_scheduler={"max_lr": 3e-4, "num_steps": step * 8},
        rng_state=[{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                    "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
                    "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}],
        rerun_state_machine={"mode": "disabled", "rerun_requested": False},
    )
    torch.save(doc, path)


def test_megatron_lm_0_16_files_convert_to_hf_bit_for_bit(tmp_path):
    """A TP2 checkpoint whose rank files hold what Megatron-LM core 0.16 writes
    (signal.SIGTERM in args, ...) converts back to the HF weights it came from; the
    training state it also holds is named in a warning."""
    import glob
    import subprocess
    from pathlib import Path

    from tests.convert_util import hf_tensors, make_hf, run

    hf = make_hf(tmp_path / "hf", "llama")
    assert run(load_checkpoint=str(hf), output_format="megatron", parallel_config={"model_parallel": 2},
               output_dir=str(tmp_path / "m")) == 0
    ckpt = tmp_path / "m" / "transformed_checkpoint"
    for f in glob.glob(str(ckpt / "iter_*" / "mp_rank_*" / "model_optim_rng.pt")):
        _as_megatron_lm_saves(f, 1)
    # a fresh process: importing megatron-core (as the rewrite did) registers its classes with torch
    job = tmp_path / "job.yaml"
    job.write_text(f"load_checkpoint: {ckpt}\noutput_format: hf\nreference_hf_dir: {hf}\noutput_dir: {tmp_path / 'h'}\n")
    done = subprocess.run([sys.executable, "-m", "runner", "run", str(job), "--no-progress"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    err = done.stderr
    for entry in ("num_floating_point_operations_so_far", "optimizer", "opt_param_scheduler", "rerun_state_machine", "rng_state"):
        assert entry in err
    a, b = hf_tensors(hf), hf_tensors(tmp_path / "h" / "transformed_checkpoint")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name


READ_ARGS = """
import sys
from runner.formats.torch_pt import TorchReader
a = TorchReader(sys.argv[1]).objects["args"]
assert "megatron" not in sys.modules
print(type(a.exit_signal).__name__, a.exit_signal, type(a.extra).__name__, type(a.save).__name__, type(a.attention_backend).__name__)
"""


def test_megatron_args_read_in_a_process_without_megatron(tmp_path):
    """Read where megatron-core is not imported (importing it registers its classes as
    safe with torch for the whole process): signals are ints, SimpleNamespace and paths
    are real, Megatron's enums inert."""
    import pathlib
    import signal
    import subprocess

    from megatron.core.transformer.enums import AttnBackend

    args = argparse.Namespace(exit_signal=signal.SIGTERM, extra=types.SimpleNamespace(a=1), save=pathlib.PosixPath("/ckpt"),
                              attention_backend=AttnBackend.auto)
    torch.save({"args": args}, tmp_path / "a.pt")
    root = pathlib.Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", READ_ARGS, str(tmp_path / "a.pt")], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["int", "15", "SimpleNamespace", "PosixPath", "Inert[megatron.core.transformer.enums.AttnBackend]"]
