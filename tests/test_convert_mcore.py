"""Oracle: the TP1 PP1 output of a tiny Llama loads with strict=True into
Megatron-Core's GPTModel (local layer spec, built on the CPU), and its logits match
transformers' on the HF model it came from."""

from __future__ import annotations

import contextlib
import socket

import pytest
import torch

from tests.convert_util import FAMILIES, logits, make_hf, run

pytest.importorskip("megatron.core")


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
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(mrandom.CudaRNGStatesTracker, "fork", lambda self, *a, **k: contextlib.nullcontext())
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def test_gpt_model_loads_strict_and_matches_transformers(tmp_path, mcore_cpu):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    hf = make_hf(tmp_path / "hf", "llama", dtype=torch.float32)
    assert run(load_checkpoint=str(hf), output_format="megatron", transformer_impl="local", output_dir=str(tmp_path / "m")) == 0
    doc = torch.load(tmp_path / "m" / "transformed_checkpoint" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    a, c = doc["args"], FAMILIES["llama"]
    cfg = TransformerConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_attention_heads, num_query_groups=a.num_query_groups, kv_channels=a.kv_channels,
        normalization="RMSNorm", layernorm_epsilon=c["rms_norm_eps"], gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32, use_cpu_initialization=True,
    )
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=a.padded_vocab_size, max_sequence_length=64,
                     position_embedding_type="rope", rotary_base=int(a.rotary_base),
                     share_embeddings_and_output_weights=not a.untie_embeddings_and_output_weights)
    result = model.load_state_dict(doc["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    ids = torch.tensor([[1, 7, 42, 99, 3, 120, 5, 8, 299, 0]])
    causal = torch.triu(torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool), diagonal=1)  # True = masked
    with torch.no_grad():
        got = model(ids, torch.arange(ids.shape[1])[None], causal)
    want = logits(hf, "llama", ids)
    assert got.shape[-1] == a.padded_vocab_size
    # same weights, different kernels (fused QKV, batched SwiGLU): fp32 rounding only
    torch.testing.assert_close(got[..., : c["vocab_size"]], want, rtol=1e-4, atol=1e-5)
    assert torch.argmax(got[..., : c["vocab_size"]], -1).tolist() == torch.argmax(want, -1).tolist()
