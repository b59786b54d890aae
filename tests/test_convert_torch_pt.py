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
