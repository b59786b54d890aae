"""PyTorch distributed checkpoints and Megatron's torch_dist, read without a process
group. Artefacts come from the real tools on the CPU: torch.distributed.checkpoint.save,
and megatron-core's dist_checkpointing.save from a GPTModel under gloo (TP1 and TP2).
Oracles: torch's own dcp_to_torch_save, and the HF weights and transformers' logits
of the model the checkpoint was made from."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runner.errors import FormatError
from runner.formats.dcp import DcpReader
from runner.layout import Box
from tests.convert_util import FAMILIES, hf_tensors, logits, make_hf, run
from tests.test_convert_mcore import IDS, forward, gpt_from_args, mcore_cpu  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent

# megatron-core's own save of a GPTModel (local spec) holding a torch-format rank file,
# on every rank of a TP x PP x EP layout (EP carved out of data parallelism); a file, not
# `-c`: the async writer's helper process re-imports the main module.
SAVE_WORKER = """
import os, sys, torch, torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state as ps
from megatron.core.tensor_parallel import random as mrandom
from tests.test_convert_mcore import cpu_patches, gpt_from_args

if __name__ == "__main__":
    rank, world, tp, pp, ep = (int(a) for a in sys.argv[1:6])
    port, src, out, eps = sys.argv[6], sys.argv[7], sys.argv[8], float(sys.argv[9])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ps.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
    for obj, name, value in cpu_patches(mrandom):
        setattr(obj, name, value)
    torch.cuda.synchronize = lambda *a, **k: None  # the writer syncs the (absent) GPU
    stage = ps.get_pipeline_model_parallel_rank()
    folder = f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}" + (f"_{stage:03d}" if pp > 1 else "") \\
        + (f"_{ps.get_expert_model_parallel_rank():03d}" if ep > 1 else "")
    doc = torch.load(f"{src}/iter_0000001/{folder}/model_optim_rng.pt", weights_only=False)
    model = gpt_from_args(doc["args"], eps, pipeline=pp, pre_process=stage == 0, post_process=stage == pp - 1)
    model.load_state_dict(doc["model"], strict=True)
    state = {"args": doc["args"], "checkpoint_version": 3.0, "iteration": 1, "model": model.sharded_state_dict()}
    os.makedirs(f"{out}/iter_0000001", exist_ok=True)
    dist_checkpointing.save(state, f"{out}/iter_0000001")
    if rank == 0:
        open(f"{out}/latest_checkpointed_iteration.txt", "w").write("1")
    dist.destroy_process_group()
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _megatron_save(tmp: Path, hf: Path, family: str, tp: int = 1, pp: int = 1, ep: int = 1):
    """Start megatron-core saving `hf`'s model (converted to torch format at TP x PP x EP
    by autotrans, loaded strictly by each rank) as a torch_dist folder: (folder, processes)."""
    name = f"{family}_tp{tp}pp{pp}ep{ep}"
    assert run(load_checkpoint=str(hf), output_format="megatron", transformer_impl="local", output_dir=str(tmp / f"torch_{name}"),
               parallel_config={"model_parallel": tp, "pipeline_stage": pp, "expert_parallel": ep}) == 0
    worker = tmp / "save_worker.py"
    worker.write_text(SAVE_WORKER)
    port, world, out = _port(), tp * pp * ep, tmp / f"dist_{name}"
    eps = FAMILIES[family]["rms_norm_eps"]
    return out, [subprocess.Popen([sys.executable, str(worker), *map(str, (r, world, tp, pp, ep, port)),
                                   str(tmp / f"torch_{name}" / "transformed_checkpoint"), str(out), str(eps)],
                                  cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]


def _wait(procs) -> None:
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def torch_dist(tmp_path_factory):
    """{tp: torch_dist folder} saved by megatron-core at TP1 and TP2 from one tiny Llama
    (GQA, untied), and that model's HF folder."""
    tmp = tmp_path_factory.mktemp("torch_dist")
    hf = make_hf(tmp / "hf", "llama", dtype=torch.float32)
    started = {tp: _megatron_save(tmp, hf, "llama", tp=tp) for tp in (1, 2)}
    for _, procs in started.values():
        _wait(procs)
    return {tp: folder for tp, (folder, _) in started.items()}, hf


@pytest.fixture(scope="module")
def torch_dist_pp_moe(tmp_path_factory):
    """torch_dist folders megatron-core saved from a tiny Llama at pipeline parallel 2 and
    from a tiny Mixtral (4 experts) at expert parallel 2: {name: (folder, HF folder)}."""
    tmp = tmp_path_factory.mktemp("torch_dist_pp_moe")
    hfs = {"pp2": make_hf(tmp / "llama", "llama", dtype=torch.float32), "moe": make_hf(tmp / "mixtral", "mixtral", dtype=torch.float32)}
    started = {"pp2": _megatron_save(tmp, hfs["pp2"], "llama", pp=2), "moe": _megatron_save(tmp, hfs["moe"], "mixtral", ep=2)}
    for _, procs in started.values():
        _wait(procs)
    return {k: (folder, hfs[k]) for k, (folder, _) in started.items()}


def _reference(folder: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, tmp / "reference.pt")
    flat: dict = {}

    def walk(node, prefix: str) -> None:  # DCP flattens nested dicts with dots
        for k, v in node.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.__setitem__(prefix + k, v)

    walk(torch.load(tmp / "reference.pt", weights_only=False), "")
    return flat


def assert_is_hf_model(out: Path, hf: Path, family: str = "llama") -> None:
    """`out` holds `hf`'s weights bit for bit and gives transformers' logits."""
    got, want = hf_tensors(out), hf_tensors(hf)
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    ids = torch.tensor([[1, 7, 42, 99, 3, 120, 5]])
    assert torch.equal(logits(out, family, ids), logits(hf, family, ids))


def _bits(t: torch.Tensor) -> np.ndarray:
    size = t.element_size()
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]).numpy().view(f"u{size}")


def _assert_reads_like_torch(reader: DcpReader, reference: dict) -> None:
    """Whole tensors and an off-grid box of each equal torch's own reassembly."""
    tensors = {n: t for n, t in reference.items() if isinstance(t, torch.Tensor)}
    assert sorted(reader.tensors()) == sorted(tensors)
    for name, t in tensors.items():
        want = _bits(t)
        assert reader.tensors()[name].shape == tuple(t.shape)
        assert np.array_equal(reader.array(name), want), name
        box = Box(tuple(s // 3 for s in t.shape), tuple(max(1, s // 2) for s in t.shape))
        assert np.array_equal(reader.region(name, box), want[box.slices()]), name


def test_dcp_save_reads_like_dcp_to_torch_save(tmp_path):
    """A plain DCP folder (no process group): dtypes, a non-contiguous tensor, nested
    keys and a non-tensor entry."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    state = {"model": {"w": torch.randn(6, 10, dtype=torch.bfloat16), "t": torch.randn(8, 5).t(),
                       "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4), "s": torch.tensor(3.5)},
             "step": 7}
    dcp.save(state, checkpoint_id=str(tmp_path / "ck"))
    reader = DcpReader(tmp_path / "ck")
    try:
        _assert_reads_like_torch(reader, _reference(tmp_path / "ck", tmp_path))
        assert sorted(reader.index.objects) == ["step"]
    finally:
        reader.close()


def test_plain_dcp_folder_is_a_full_checkpoint_source(tmp_path):
    """A torchtitan-style DCP folder (weights under `model.`) is read as one full
    checkpoint: a job writes its tensors, names as stored, equal to dcp_to_torch_save's."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    torch.manual_seed(0)
    state = {"model": {"tok_embeddings.weight": torch.randn(50, 8, dtype=torch.bfloat16),
                       "layers.0.attention.wq.weight": torch.randn(8, 8, dtype=torch.bfloat16),
                       "norm.weight": torch.randn(8)}}
    dcp.save(state, checkpoint_id=str(tmp_path / "ck"))
    assert run(load_checkpoint=str(tmp_path / "ck"), use_parallel=False, output_dir=str(tmp_path / "out")) == 0
    got = load_file(tmp_path / "out" / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors")
    want = _reference(tmp_path / "ck", tmp_path)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_torch_dist_chunks_read_like_dcp_to_torch_save(tmp_path, torch_dist):
    """Megatron's TP2 save: every tensor in several chunks over two ranks' files (fc1's
    gate and up halves apart), read back as torch reassembles them."""
    folders, _ = torch_dist
    reader = DcpReader(folders[2] / "iter_0000001")
    try:
        assert max(len(t.chunks) for t in reader.index.tensors.values()) > 2
        _assert_reads_like_torch(reader, _reference(folders[2] / "iter_0000001", tmp_path))
    finally:
        reader.close()


@pytest.mark.parametrize("tp", [1, 2])
def test_torch_dist_to_hf_is_the_original_model(tmp_path, torch_dist, tp):
    folders, hf = torch_dist
    assert run(load_checkpoint=str(folders[tp]), output_format="hf", reference_hf_dir=str(hf), output_dir=str(tmp_path / "o")) == 0
    assert_is_hf_model(tmp_path / "o" / "transformed_checkpoint", hf)


@pytest.mark.parametrize("name,family", [("pp2", "llama"), ("moe", "mixtral")])
def test_torch_dist_pp2_and_moe_to_hf_is_the_original_model(tmp_path, torch_dist_pp_moe, name, family):
    """megatron-core's saves at pipeline parallel 2 (each stage's layers at their global
    numbers) and of a Mixtral at expert parallel 2 (experts on a second stacked axis)
    convert to HF bit for bit."""
    folder, hf = torch_dist_pp_moe[name]
    assert run(load_checkpoint=str(folder), output_format="hf", reference_hf_dir=str(hf), output_dir=str(tmp_path / "o")) == 0
    assert_is_hf_model(tmp_path / "o" / "transformed_checkpoint", hf, family)


def test_torch_dist_reshards_to_torch_format_and_verifies(tmp_path, torch_dist):
    """torch_dist (saved at TP2; local-spec norms under TransformerEngine's names, as
    Megatron-Core saves them) -> torch-format TP1 PP2 holds the same model (verify
    compares both under HF names), and the iteration folder itself is a source."""
    from runner.verify import Checkpoint, compare

    folders, hf = torch_dist
    assert run(load_checkpoint=str(folders[2] / "iter_0000001"), output_format="megatron",
               parallel_config={"pipeline_stage": 2}, output_dir=str(tmp_path / "m")) == 0
    out = tmp_path / "m" / "transformed_checkpoint"
    assert sorted(p.name for p in (out / "iter_0000001").iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    assert compare(Checkpoint.open(hf), Checkpoint.open(out), None) == []


def test_metadata_pickle_that_would_run_code_is_refused(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    marker = tmp_path / "ran"
    with open(bad / ".metadata", "wb") as f:
        pickle.dump(type("Evil", (), {"__reduce__": lambda self: (os.system, (f"touch {marker}",))})(), f)
    with pytest.raises(FormatError, match="refused.*posix.system|refused.*os.system"):
        DcpReader(bad)
    assert not marker.exists()


def test_torch_dist_missing_data_file_is_one_clear_error(tmp_path, torch_dist):
    import shutil

    folders, _ = torch_dist
    broken = tmp_path / "broken"
    shutil.copytree(folders[2], broken)
    next((broken / "iter_0000001").glob("__1_*.distcp")).unlink()
    with pytest.raises(FormatError, match=r"names data file '__1_\d\.distcp', which is missing"):
        reader = DcpReader(broken / "iter_0000001")
        for name in reader.tensors():
            reader.array(name)


@pytest.mark.parametrize("family,parallel,arg", [("llama", "model_parallel", "tensor_model_parallel_size"),
                                                 ("mixtral", "expert_parallel", "expert_model_parallel_size")])
def test_hf_to_torch_dist_loads_with_megatron_core_at_another_layout(tmp_path, mcore_cpu, monkeypatch, family, parallel, arg):
    """HF -> torch_dist written for TP2 (a dense Llama) or EP2 (a Mixtral: experts on a
    second stacked axis); megatron-core's own dist_checkpointing.load fills a TP1 EP1
    GPTModel's sharded_state_dict (strict), which gives transformers' logits."""
    import argparse

    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core import dist_checkpointing

    from runner.verify import Checkpoint, compare

    monkeypatch.setattr(moe_utils, "te_general_gemm", None, raising=False)  # its router reads this TransformerEngine hook
    hf = make_hf(tmp_path / "hf", family, dtype=torch.float32)
    assert run(load_checkpoint=str(hf), output_format="megatron", megatron_format="torch_dist", transformer_impl="local",
               parallel_config={parallel: 2}, output_dir=str(tmp_path / "m")) == 0
    root = tmp_path / "m" / "transformed_checkpoint"
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "1"
    folder = root / "iter_0000001"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    common = torch.load(folder / "common.pt", weights_only=False)
    assert getattr(common["args"], arg) == 2 and common["iteration"] == 1
    args = argparse.Namespace(**{**vars(common["args"]), arg: 1})
    model = gpt_from_args(args, FAMILIES[family]["rms_norm_eps"])
    state = dist_checkpointing.load(model.sharded_state_dict(), str(folder))
    assert state.pop("checkpoint_version") == 3.0 and state.pop("iteration") == 1 and state.pop("args") is not None
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    want = logits(hf, family, torch.tensor(IDS))
    assert compare(Checkpoint.open(hf), Checkpoint.open(root), None) == []  # and it reads back as the HF model
    torch.testing.assert_close(forward(model)[..., : FAMILIES[family]["vocab_size"]], want, rtol=1e-4, atol=1e-5)


# megatron-core's own load of a torch_dist folder into one stage of a 2-stage pipeline
# (gloo world of 2); the stages chained through a file: stage 0's output is stage 1's input.
PP_LOAD_WORKER = """
import sys, torch, torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state as ps
from megatron.core.tensor_parallel import random as mrandom
from tests.test_convert_mcore import cpu_patches, forward, gpt_from_args

if __name__ == "__main__":
    rank, port, folder, out, eps = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ps.initialize_model_parallel(1, 2)
    for obj, name, value in cpu_patches(mrandom):
        setattr(obj, name, value)
    args = torch.load(f"{folder}/common.pt", weights_only=False)["args"]
    model = gpt_from_args(args, eps, pipeline=2, pre_process=rank == 0, post_process=rank == 1)
    state = dist_checkpointing.load(model.sharded_state_dict(), folder)
    result = model.load_state_dict({k: v for k, v in state.items() if k not in ("args", "checkpoint_version", "iteration")}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    if rank == 0:
        torch.save(forward(model), out + ".stage0")
    dist.barrier()
    if rank == 1:
        model.set_input_tensor(torch.load(out + ".stage0"))
        torch.save(forward(model), out)
    dist.destroy_process_group()
"""


def test_hf_to_torch_dist_loads_into_a_pipeline_of_two_stages(tmp_path):
    """HF -> torch_dist written at TP1 PP1; megatron-core loads it into the two stages of a
    PP2 GPTModel (each stage strict, its layers at their global numbers in the folder),
    and the chained stages give transformers' logits."""
    hf = make_hf(tmp_path / "hf", "llama", dtype=torch.float32)
    assert run(load_checkpoint=str(hf), output_format="megatron", megatron_format="torch_dist", transformer_impl="local",
               output_dir=str(tmp_path / "m")) == 0
    worker = tmp_path / "load_worker.py"
    worker.write_text(PP_LOAD_WORKER)
    port, out = _port(), tmp_path / "logits.pt"
    folder = tmp_path / "m" / "transformed_checkpoint" / "iter_0000001"
    _wait([subprocess.Popen([sys.executable, str(worker), str(r), str(port), str(folder), str(out),
                             str(FAMILIES["llama"]["rms_norm_eps"])], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)])
    want = logits(hf, "llama", torch.tensor(IDS))
    torch.testing.assert_close(torch.load(out)[..., : FAMILIES["llama"]["vocab_size"]], want, rtol=1e-4, atol=1e-5)


# torchtitan's Llama 3 names for HF's, per layer and outside the layers
_TITAN_LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
                "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
                "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
_TITAN_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}


def _torchtitan_weights(hf: Path) -> dict[str, torch.Tensor]:
    """The HF model's weights as torchtitan's Llama 3 holds them (its state_dict_adapter's
    from_hf, written here with torch ops): its names, and q / k rows in Meta's rotary
    layout, HF's two half-head blocks interleaved row by row within each head."""
    c = FAMILIES["llama"]
    head_dim = c["hidden_size"] // c["num_attention_heads"]

    def meta(w: torch.Tensor, heads: int) -> torch.Tensor:
        return w.view(heads, 2, head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape).clone()

    out = {}
    for name, t in hf_tensors(hf).items():
        if name in _TITAN_TOP:
            out[_TITAN_TOP[name]] = t
            continue
        layer, rest = name[len("model.layers."):].split(".", 1)
        module = rest[: -len(".weight")]
        if module == "self_attn.q_proj":
            t = meta(t, c["num_attention_heads"])
        elif module == "self_attn.k_proj":
            t = meta(t, c["num_key_value_heads"])
        out[f"layers.{layer}.{_TITAN_LAYER[module]}.weight"] = t
    return out


@pytest.fixture(scope="module")
def titan(tmp_path_factory):
    """A tiny Llama's HF folder and torchtitan-style DCP folders of its weights saved by
    torch.distributed.checkpoint.save with AdamW-like optimizer state and a step counter:
    {"nested": model weights under `model.` (torchtitan before it flattened them),
    "flat": at the top level (torchtitan now)}."""
    import torch.distributed.checkpoint as dcp

    tmp = tmp_path_factory.mktemp("titan")
    hf = make_hf(tmp / "hf", "llama", dtype=torch.float32)
    weights = _torchtitan_weights(hf)
    optim = {"state": {n: {"exp_avg": torch.zeros_like(t)} for n, t in list(weights.items())[:3]}}
    folders = {"nested": tmp / "nested", "flat": tmp / "flat"}
    dcp.save({"model": weights, "optimizer": optim, "train_state": {"step": 10}}, checkpoint_id=str(folders["nested"]))
    dcp.save({**weights, "optimizer": optim, "train_state": {"step": 10}}, checkpoint_id=str(folders["flat"]))
    return folders, hf


def test_torchtitan_dcp_to_mindformers_names_and_back(tmp_path, titan):
    """DCP (torchtitan) -> MindFormers names -> HF: the HF weights bit for bit."""
    folders, hf = titan
    assert run(load_checkpoint=str(folders["flat"]), output_format="mindformers", use_parallel=False,
               reference_hf_dir=str(hf), output_dir=str(tmp_path / "mf")) == 0
    mf = tmp_path / "mf" / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors"
    assert run(load_checkpoint=str(mf), output_format="hf", reference_hf_dir=str(hf), output_dir=str(tmp_path / "o")) == 0
    assert_is_hf_model(tmp_path / "o" / "transformed_checkpoint", hf)


def test_torchtitan_dcp_with_tied_output_copy_to_hf(tmp_path):
    """Tied embeddings: torchtitan's state holds output.weight beside tok_embeddings (one
    tensor under both names); the HF model written has the tied weights only."""
    import torch.distributed.checkpoint as dcp

    hf = make_hf(tmp_path / "hf", "llama", dtype=torch.float32, tie_word_embeddings=True)
    weights = _torchtitan_weights(hf)
    assert "output.weight" not in weights  # transformers saves the tied table once
    weights["output.weight"] = weights["tok_embeddings.weight"]
    dcp.save({"model": weights}, checkpoint_id=str(tmp_path / "ck"))
    assert run(load_checkpoint=str(tmp_path / "ck"), output_format="hf", reference_hf_dir=str(hf),
               output_dir=str(tmp_path / "o")) == 0
    assert_is_hf_model(tmp_path / "o" / "transformed_checkpoint", hf)


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_torchtitan_dcp_to_hf_is_the_original_model(tmp_path, titan, layout, capsys):
    """DCP (torchtitan names, Meta's rotary rows) -> HF gives back the HF weights bit for
    bit and transformers' logits; the optimizer state is left out with a warning; and the
    folder reads as torch's own dcp_to_torch_save reassembles it."""
    folders, hf = titan
    reader = DcpReader(folders[layout])
    try:
        _assert_reads_like_torch(reader, _reference(folders[layout], tmp_path))
    finally:
        reader.close()
    assert run(load_checkpoint=str(folders[layout]), output_format="hf", reference_hf_dir=str(hf),
               output_dir=str(tmp_path / "o")) == 0
    assert "optimizer" in capsys.readouterr().err
    assert_is_hf_model(tmp_path / "o" / "transformed_checkpoint", hf)


def test_torchtitan_dcp_to_megatron_loads_in_gpt_model(tmp_path, titan, mcore_cpu):
    """DCP (torchtitan) -> Megatron torch format (local spec): megatron-core's GPTModel
    loads it strictly and gives transformers' logits."""
    folders, hf = titan
    assert run(load_checkpoint=str(folders["nested"]), output_format="megatron", transformer_impl="local",
               reference_hf_dir=str(hf), output_dir=str(tmp_path / "m")) == 0
    doc = torch.load(tmp_path / "m" / "transformed_checkpoint" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt",
                     weights_only=False)
    model = gpt_from_args(doc["args"], FAMILIES["llama"]["rms_norm_eps"])
    result = model.load_state_dict(doc["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    want = logits(hf, "llama", torch.tensor(IDS))
    torch.testing.assert_close(forward(model)[..., : FAMILIES["llama"]["vocab_size"]], want, rtol=1e-4, atol=1e-5)


def test_torch_dist_output_split_over_mpi_ranks(tmp_path, mcore_cpu):
    """HF -> torch_dist cut into several .distcp files (max_shard_size): under mpiexec -n 2
    and -n 3 every rank writes its share of them (the manifest says who wrote what), the
    bytes are those of one process, and megatron-core's dist_checkpointing.load fills a
    GPTModel from the folder, which gives transformers' logits."""
    from megatron.core import dist_checkpointing

    from runner.cli import main as cli_main
    from tests.test_mpi import autotrans, job_file, mpirun, outputs

    hf = make_hf(tmp_path / "hf", "llama", dtype=torch.float32)
    keys = {"load_checkpoint": str(hf), "output_format": "megatron", "megatron_format": "torch_dist",
            "transformer_impl": "local", "max_shard_size": "60KB"}
    one = tmp_path / "one"
    assert cli_main(["run", str(job_file(tmp_path, "one", keys | {"output_dir": str(one)})), "--no-progress"]) == 0
    folder = one / "transformed_checkpoint" / "iter_0000001"
    data = sorted(p.name for p in folder.glob("*.distcp"))
    assert len(data) > 3 and not (folder / ".metadata").stat().st_size == 0
    for n in (2, 3):
        out = tmp_path / f"mpi{n}"
        proc = mpirun(["-n", n, *autotrans(job_file(tmp_path, out.name, keys | {"output_dir": str(out)}))], timeout=180)
        assert proc.returncode == 0, proc.stderr
        assert outputs(out) == outputs(one)
        files = json.loads((out / "transformed_checkpoint" / "autotrans.json").read_text())["files"]
        assert {f["mpi_rank"] for f in files if f["path"].endswith(".distcp")} == set(range(n))
    common = torch.load(folder / "common.pt", weights_only=False)
    model = gpt_from_args(common["args"], FAMILIES["llama"]["rms_norm_eps"])
    state = dist_checkpointing.load(model.sharded_state_dict(), str(folder))
    for key in ("checkpoint_version", "iteration", "args"):
        state.pop(key)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    want = logits(hf, "llama", torch.tensor(IDS))
    torch.testing.assert_close(forward(model)[..., : FAMILIES["llama"]["vocab_size"]], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("zip64", [False, True])
def test_written_archives_load_with_torch_and_are_deterministic(tmp_path, monkeypatch, zip64):
    """The chunk archives autotrans writes load with torch.load (weights_only) as the
    tensors they hold, twice the same bytes, of the size announced before writing; with
    the ZIP64 threshold lowered, every record takes the ZIP64 form and torch reads it."""
    import io

    from runner.formats import torch_archive

    if zip64:
        monkeypatch.setattr(torch_archive, "LIMIT", 100)
    torch.manual_seed(0)
    for t in (torch.randn(37, 64).to(torch.bfloat16), torch.randn(1, 5, 3), torch.randn(()).half()):
        bits = _bits(t).reshape(t.shape)
        dtype = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}[t.dtype]
        first, second = io.BytesIO(), io.BytesIO()
        torch_archive.write_tensor(first, bits, dtype)
        torch_archive.write_tensor(second, bits, dtype)
        assert first.getvalue() == second.getvalue()
        assert len(first.getvalue()) == torch_archive.tensor_size(dtype, tuple(t.shape))
        got = torch.load(io.BytesIO(first.getvalue()), weights_only=True)
        assert got.dtype == t.dtype and torch.equal(got, t)
    assert torch.load(io.BytesIO(torch_archive.object_archive({"a": [None]})), weights_only=True) == {"a": [None]}


def _megatron_logits(root: Path, eps: float) -> torch.Tensor:
    """Logits of megatron-core's GPTModel (local layer spec, TP1) holding a Megatron
    output: a torch_dist folder through dist_checkpointing.load, or each pipeline stage's
    rank file; every load strict."""
    import argparse

    from megatron.core import dist_checkpointing

    folder = root / "iter_0000001"
    if (folder / "metadata.json").exists():
        args = torch.load(folder / "common.pt", weights_only=False)["args"]
        model = gpt_from_args(argparse.Namespace(**{**vars(args), "tensor_model_parallel_size": 1}), eps)
        state = dist_checkpointing.load(model.sharded_state_dict(), str(folder))
        stages = [(model, {k: v for k, v in state.items() if k not in ("args", "checkpoint_version", "iteration")})]
    else:
        docs = [torch.load(p, weights_only=False) for p in sorted(folder.glob("mp_rank_*/model_optim_rng.pt"))]
        a = docs[0]["args"]
        assert a.tensor_model_parallel_size == 1 and a.transformer_impl == "local"
        stage_args = argparse.Namespace(**{**vars(a), "num_layers": a.num_layers // len(docs)})
        stages = [(gpt_from_args(stage_args, eps, pre_process=i == 0, post_process=i == len(docs) - 1), d["model"])
                  for i, d in enumerate(docs)]
    hidden = None
    for model, state in stages:
        result = model.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        if hidden is not None:
            model.set_input_tensor(hidden)
        hidden = forward(model)
    return hidden


@pytest.mark.parametrize("steps", [
    [{"transformer_impl": "transformer_engine", "parallel_config": {"model_parallel": 2}}, {"transformer_impl": "local"}],
    [{"transformer_impl": "local", "parallel_config": {"model_parallel": 2}}, {"transformer_impl": "local", "megatron_format": "torch_dist"}],
    [{"megatron_format": "torch_dist", "parallel_config": {"model_parallel": 2}},
     {"transformer_impl": "local", "parallel_config": {"pipeline_stage": 2}}],
    [{"transformer_impl": "local", "parallel_config": {"pipeline_stage": 2}}, {"megatron_format": "torch_dist"},
     {"transformer_impl": "local", "parallel_config": {"model_parallel": 2}}, {"transformer_impl": "local"}],
], ids=["te-tp2>local", "local-tp2>dist-local", "dist-te-tp2>local-pp2", "local-pp2>dist-te>local-tp2>local"])
def test_megatron_to_megatron_across_layer_specs_loads_in_gpt_model(tmp_path, mcore_cpu, steps):
    """Megatron -> Megatron between layer specs (TransformerEngine's fused norm names and
    the local spec's), torch format and torch_dist, and TP / PP: the last output loads
    strictly into megatron-core's GPTModel at its own spec and gives transformers' logits,
    and it holds the HF model bit for bit."""
    from runner.verify import Checkpoint, compare

    hf = make_hf(tmp_path / "hf", "llama", dtype=torch.float32)
    src = hf
    for i, keys in enumerate(steps):
        assert run(load_checkpoint=str(src), output_format="megatron", output_dir=str(tmp_path / f"s{i}"), **keys) == 0
        src = tmp_path / f"s{i}" / "transformed_checkpoint"
    got = _megatron_logits(src, FAMILIES["llama"]["rms_norm_eps"])
    want = logits(hf, "llama", torch.tensor(IDS))
    torch.testing.assert_close(got[..., : FAMILIES["llama"]["vocab_size"]], want, rtol=1e-4, atol=1e-5)
    assert compare(Checkpoint.open(hf), Checkpoint.open(src), None) == []
