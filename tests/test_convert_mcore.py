"""Oracle: the TP1 PP1 and TP2 outputs of a tiny Llama load with strict=True into
Megatron-Core's GPTModel (local layer spec, built on the CPU), and its logits match
transformers' on the HF model it came from."""

from __future__ import annotations

import contextlib
from functools import partial
import socket

import pytest
import torch

from tests.convert_util import FAMILIES, logits, make_hf, run


@pytest.fixture
def mcore_cpu(monkeypatch):
    """A one-process gloo group and the small patches that let GPTModel run on the CPU:
    torch.cuda.current_device, and the CUDA RNG tracker's fork (used by dropout)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    for obj, name, value in cpu_patches(mrandom):
        monkeypatch.setattr(obj, name, value)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def cpu_patches(mrandom) -> list:
    """(object, attribute, value): what lets GPTModel run on the CPU."""
    return [(torch.cuda, "current_device", lambda: "cpu"),
            (mrandom.CudaRNGStatesTracker, "fork", lambda self, *a, **k: contextlib.nullcontext())]


def gpt_from_args(a, rms_eps: float, pipeline: int = 1, config: dict | None = None, **kw):
    """Megatron-Core's GPTModel (local layer spec) for a checkpoint's args; one stage of
    `pipeline` under a pipeline-parallel group; MoE layers (routed experts, top-k then
    softmax as Mixtral) when the args have experts; `config` adds or overrides
    TransformerConfig fields, `kw` GPTModel arguments."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    if a.swiglu:
        activation = torch.nn.functional.silu
    else:  # GPT-2: the tanh approximation (openai_gelu) or the exact GELU
        activation = partial(torch.nn.functional.gelu, approximate="tanh" if a.openai_gelu else "none")
    experts = getattr(a, "num_experts", None)
    moe = dict(num_moe_experts=experts, moe_ffn_hidden_size=a.moe_ffn_hidden_size, moe_router_topk=a.moe_router_topk,
               moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather",
               expert_model_parallel_size=a.expert_model_parallel_size) if experts else {}
    cfg = TransformerConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads, num_query_groups=a.num_query_groups, kv_channels=a.kv_channels,
        normalization=a.normalization, layernorm_epsilon=rms_eps, gated_linear_unit=a.swiglu,
        activation_func=activation, add_bias_linear=a.add_bias_linear, add_qkv_bias=a.add_qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, qk_layernorm=getattr(a, "qk_layernorm", False),
        params_dtype=torch.float32, use_cpu_initialization=True, tensor_model_parallel_size=a.tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline, pipeline_dtype=torch.float32, **{**moe, **(config or {})},
    )
    rope = {"rotary_base": int(a.rotary_base)} if a.position_embedding_type == "rope" else {}
    spec = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False, qk_layernorm=getattr(a, "qk_layernorm", False))
    return GPTModel(cfg, spec,
                    vocab_size=a.padded_vocab_size, max_sequence_length=a.max_position_embeddings,
                    position_embedding_type=a.position_embedding_type,
                    share_embeddings_and_output_weights=not a.untie_embeddings_and_output_weights, **rope, **kw)


IDS = [[1, 7, 42, 99, 3, 120, 5, 8, 149, 0]]  # within every test family's vocabulary


def forward(model):
    ids = torch.tensor(IDS)
    causal = torch.triu(torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool), diagonal=1)  # True = masked
    model.eval()
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None], causal)


def test_gpt_model_loads_strict_and_matches_transformers(tmp_path, mcore_cpu):
    hf = make_hf(tmp_path / "hf", "llama", dtype=torch.float32)
    assert run(load_checkpoint=str(hf), output_format="megatron", transformer_impl="local", output_dir=str(tmp_path / "m")) == 0
    doc = torch.load(tmp_path / "m" / "transformed_checkpoint" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    a, c = doc["args"], FAMILIES["llama"]
    model = gpt_from_args(a, c["rms_norm_eps"])
    assert sorted(doc["model"]) == sorted(model.state_dict())  # _extra_state entries (output layer's too) as GPTModel has them
    result = model.load_state_dict(doc["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    got = forward(model)
    want = logits(hf, "llama", torch.tensor(IDS))
    assert got.shape[-1] == a.padded_vocab_size
    # same weights, different kernels (fused QKV, batched SwiGLU): fp32 rounding only
    torch.testing.assert_close(got[..., : c["vocab_size"]], want, rtol=1e-4, atol=1e-5)
    assert torch.argmax(got[..., : c["vocab_size"]], -1).tolist() == torch.argmax(want, -1).tolist()


def test_gpt2_loads_strict_and_matches_transformers(tmp_path, mcore_cpu):
    """GPT-2 (learned absolute positions, LayerNorm with bias, biases on every linear,
    GELU, Conv1D weights transposed, tied and padded vocabulary) in GPTModel."""
    hf = make_hf(tmp_path / "hf", "gpt2", dtype=torch.float32)
    assert run(load_checkpoint=str(hf), output_format="megatron", transformer_impl="local", output_dir=str(tmp_path / "m")) == 0
    doc = torch.load(tmp_path / "m" / "transformed_checkpoint" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    a = doc["args"]
    model = gpt_from_args(a, a.norm_epsilon)
    assert sorted(doc["model"]) == sorted(model.state_dict())
    result = model.load_state_dict(doc["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    got = forward(model)
    want = logits(hf, "gpt2", torch.tensor(IDS))
    assert got.shape[-1] == a.padded_vocab_size > FAMILIES["gpt2"]["vocab_size"]
    torch.testing.assert_close(got[..., : FAMILIES["gpt2"]["vocab_size"]], want, rtol=1e-4, atol=1e-5)


TP_WORKER = """
import sys, torch, torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mrandom
from tests.test_convert_mcore import cpu_patches, forward, gpt_from_args
rank, port, ckpt, out, eps = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
parallel_state.initialize_model_parallel(2, 1)
for obj, name, value in cpu_patches(mrandom):
    setattr(obj, name, value)
doc = torch.load(f"{ckpt}/iter_0000001/mp_rank_{rank:02d}/model_optim_rng.pt", weights_only=False)
model = gpt_from_args(doc["args"], eps, parallel_output=False)
result = model.load_state_dict(doc["model"], strict=True)
assert not result.missing_keys and not result.unexpected_keys, result
got = forward(model)
if rank == 0:
    torch.save(got, out)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # GQA + untied; qkv bias + tied embeddings; q/k norms
def test_tensor_parallel_2_loads_strict_per_rank_and_matches_transformers(tmp_path, family):
    """The TP2 output in a real 2-process tensor-parallel GPTModel (gloo on the CPU):
    each rank loads its own file strictly, and the gathered logits equal transformers'."""
    import subprocess
    import sys
    from pathlib import Path

    hf = make_hf(tmp_path / "hf", family, dtype=torch.float32)
    out = tmp_path / "m" / "transformed_checkpoint"
    assert run(load_checkpoint=str(hf), output_format="megatron", transformer_impl="local",
               parallel_config={"model_parallel": 2}, output_dir=str(tmp_path / "m")) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    eps = FAMILIES[family]["rms_norm_eps"]
    root = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, "-c", TP_WORKER, str(r), str(port), str(out), str(tmp_path / "logits.pt"), str(eps)],
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    want = logits(hf, family, torch.tensor(IDS))
    vocab = FAMILIES[family]["vocab_size"]
    torch.testing.assert_close(got[..., :vocab], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # untied; tied (the last stage holds its own copy); q/k norms
def test_pipeline_stages_load_strict_and_chain_to_transformers_logits(tmp_path, mcore_cpu, family):
    """The TP1 PP2 output: each stage file loads strictly into its stage of GPTModel
    (first: embeddings + its layers; last: its layers, final norm, output layer; layer
    numbers local to the stage), and the stages chained give transformers' logits."""
    import argparse

    hf = make_hf(tmp_path / "hf", family, dtype=torch.float32)
    assert run(load_checkpoint=str(hf), output_format="megatron", transformer_impl="local",
               parallel_config={"pipeline_stage": 2}, output_dir=str(tmp_path / "m")) == 0
    folder = tmp_path / "m" / "transformed_checkpoint" / "iter_0000001"
    docs = [torch.load(folder / f"mp_rank_00_{pp:03d}" / "model_optim_rng.pt", weights_only=False) for pp in range(2)]
    a, c = docs[0]["args"], FAMILIES[family]
    per_stage = a.num_layers // 2
    stages = []
    for pp, doc in enumerate(docs):
        stage_args = argparse.Namespace(**{**vars(a), "num_layers": per_stage})
        model = gpt_from_args(stage_args, c["rms_norm_eps"], pre_process=pp == 0, post_process=pp == 1)
        assert sorted(doc["model"]) == sorted(model.state_dict()), pp
        result = model.load_state_dict(doc["model"], strict=True)
        assert not result.missing_keys and not result.unexpected_keys, (pp, result)
        stages.append(model)
    ids = torch.tensor(IDS)
    hidden = forward(stages[0])
    stages[1].set_input_tensor(hidden)
    got = forward(stages[1])
    want = logits(hf, family, ids)
    torch.testing.assert_close(got[..., : c["vocab_size"]], want, rtol=1e-4, atol=1e-5)
