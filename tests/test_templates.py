"""Templates are the one place that knows a family: a family template written here (not
from strategies/) drives HF -> Megatron -> HF bit for bit, and a template with an unknown
key or a bad value is refused with one line naming the file and the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runner.errors import ConfigError
from runner.templates import load_file
from tests.convert_util import hf_tensors, make_hf, megatron_files, run

ROOT = Path(__file__).resolve().parent.parent

# Qwen3 as a user would describe it: Llama's layout plus per-head q and k norms. Not a
# shipped template: the file name and family name are the test's own.
MY_FAMILY = """
name: my_family
architectures: [Qwen3ForCausalLM]
schemes: [hf, megatron, megatron_local]
defaults:
  head_dim: hidden_size // num_heads
  tie_word_embeddings: 0
divisible:
  - [n_kv_heads, model_parallel]
weights:
  embedding:
    names: {hf: model.embed_tokens.weight, megatron: embedding.word_embeddings.weight, megatron_local: embedding.word_embeddings.weight}
    shape: [vocab_size, hidden_size]
    split: vocab
    place: embedding
    pad: vocab
  attention_norm:
    names: {hf: "model.layers.{layer}.input_layernorm.weight",
            megatron: "decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight",
            megatron_local: "decoder.layers.{layer}.input_layernorm.weight"}
    shape: [hidden_size]
  q: {names: {hf: "model.layers.{layer}.self_attn.q_proj.weight"}, shape: [num_heads * head_dim, hidden_size], split: column}
  k: {names: {hf: "model.layers.{layer}.self_attn.k_proj.weight"}, shape: [n_kv_heads * head_dim, hidden_size], split: column}
  v: {names: {hf: "model.layers.{layer}.self_attn.v_proj.weight"}, shape: [n_kv_heads * head_dim, hidden_size], split: column}
  qkv:
    names: {megatron: "decoder.layers.{layer}.self_attention.linear_qkv.weight",
            megatron_local: "decoder.layers.{layer}.self_attention.linear_qkv.weight"}
    shape: [(num_heads + 2 * n_kv_heads) * head_dim, hidden_size]
    split: column
    fuse: {parts: [q, k, v], groups: n_kv_heads}
  q_norm:
    names: {hf: "model.layers.{layer}.self_attn.q_norm.weight", megatron: "decoder.layers.{layer}.self_attention.q_layernorm.weight",
            megatron_local: "decoder.layers.{layer}.self_attention.q_layernorm.weight"}
    shape: [head_dim]
  k_norm:
    names: {hf: "model.layers.{layer}.self_attn.k_norm.weight", megatron: "decoder.layers.{layer}.self_attention.k_layernorm.weight",
            megatron_local: "decoder.layers.{layer}.self_attention.k_layernorm.weight"}
    shape: [head_dim]
  attention_out:
    names: {hf: "model.layers.{layer}.self_attn.o_proj.weight", megatron: "decoder.layers.{layer}.self_attention.linear_proj.weight",
            megatron_local: "decoder.layers.{layer}.self_attention.linear_proj.weight"}
    shape: [hidden_size, num_heads * head_dim]
    split: row
  ffn_norm:
    names: {hf: "model.layers.{layer}.post_attention_layernorm.weight", megatron: "decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight",
            megatron_local: "decoder.layers.{layer}.pre_mlp_layernorm.weight"}
    shape: [hidden_size]
  gate: {names: {hf: "model.layers.{layer}.mlp.gate_proj.weight"}, shape: [intermediate_size, hidden_size], split: column}
  up: {names: {hf: "model.layers.{layer}.mlp.up_proj.weight"}, shape: [intermediate_size, hidden_size], split: column}
  fc1:
    names: {megatron: "decoder.layers.{layer}.mlp.linear_fc1.weight", megatron_local: "decoder.layers.{layer}.mlp.linear_fc1.weight"}
    shape: [2, intermediate_size, hidden_size]
    stored: [2 * intermediate_size, hidden_size]
    split: column
    dim: 1
    fuse: {parts: [gate, up]}
  down:
    names: {hf: "model.layers.{layer}.mlp.down_proj.weight", megatron: "decoder.layers.{layer}.mlp.linear_fc2.weight",
            megatron_local: "decoder.layers.{layer}.mlp.linear_fc2.weight"}
    shape: [hidden_size, intermediate_size]
    split: row
  final_norm:
    names: {hf: model.norm.weight, megatron: decoder.final_layernorm.weight, megatron_local: decoder.final_layernorm.weight}
    shape: [hidden_size]
    place: last
  output:
    names: {hf: lm_head.weight, megatron: output_layer.weight, megatron_local: output_layer.weight}
    shape: [vocab_size, hidden_size]
    split: vocab
    place: output
    tie: embedding
    pad: vocab
megatron_args: {normalization: RMSNorm, swiglu: true, qk_layernorm: true}
"""


@pytest.mark.parametrize("parallel,impl", [(dict(model_parallel=2, pipeline_stage=2), "transformer_engine"),
                                           (dict(model_parallel=2, pipeline_stage=1), "local")])
def test_own_template_drives_hf_megatron_hf(tmp_path, parallel, impl):
    template = tmp_path / "my_model.yaml"
    template.write_text(MY_FAMILY)
    hf = make_hf(tmp_path / "hf", "qwen3")
    model = {"arch": str(template)}
    assert run(load_checkpoint=str(hf), output_format="megatron", parallel_config=parallel, transformer_impl=impl,
               model=model, output_dir=str(tmp_path / "m")) == 0
    src = hf_tensors(hf)
    files = megatron_files(tmp_path / "m" / "transformed_checkpoint")
    tp, pp = parallel["model_parallel"], parallel["pipeline_stage"]
    assert len(files) == tp * pp
    # the template's q_norm name and its fused QKV, checked with torch slicing
    last = files["mp_rank_01" + ("_001" if pp > 1 else "")]["model"]
    local = 4 // pp - 1
    assert torch.equal(last[f"decoder.layers.{local}.self_attention.q_layernorm.weight"], src["model.layers.3.self_attn.q_norm.weight"])
    p = "model.layers.3.self_attn."
    qkv = torch.cat([src[p + "q_proj.weight"].reshape(2, 32, 64), src[p + "k_proj.weight"].reshape(2, 16, 64),
                     src[p + "v_proj.weight"].reshape(2, 16, 64)], dim=1).reshape(-1, 64)
    assert torch.equal(last[f"decoder.layers.{local}.self_attention.linear_qkv.weight"], qkv.chunk(2)[1])
    assert run(load_checkpoint=str(tmp_path / "m" / "transformed_checkpoint"), output_format="hf", model=model,
               reference_hf_dir=str(hf), output_dir=str(tmp_path / "h")) == 0
    back = hf_tensors(tmp_path / "h" / "transformed_checkpoint")
    assert sorted(back) == sorted(src)
    for name in src:
        assert back[name].dtype == src[name].dtype and torch.equal(back[name].view(torch.int16), src[name].view(torch.int16)), name


def test_gpt2_conv1d_weights_become_megatron_rows(tmp_path):
    """gpt.yaml's transposed parts: Megatron's qkv is c_attn transposed, interleaved per
    head; fc1 / fc2 / linear_proj are c_fc / c_proj transposed (torch slicing here)."""
    hf = make_hf(tmp_path / "hf", "gpt2")
    assert run(load_checkpoint=str(hf), output_format="megatron", parallel_config=dict(model_parallel=2),
               output_dir=str(tmp_path / "m")) == 0
    src = hf_tensors(hf)
    files = megatron_files(tmp_path / "m" / "transformed_checkpoint")
    heads, h = 4, 64
    p, m = "transformer.h.2.", "decoder.layers.2."
    q, k, v = src[p + "attn.c_attn.weight"].T.reshape(3, heads, h // heads, h)
    qkv = torch.stack([q, k, v], 1).reshape(3 * h, h)  # [q_0; k_0; v_0; q_1; ...]
    qb, kb, vb = src[p + "attn.c_attn.bias"].reshape(3, heads, h // heads)
    bias = torch.stack([qb, kb, vb], 1).reshape(3 * h)
    for tp, name in enumerate(("mp_rank_00", "mp_rank_01")):
        model = files[name]["model"]
        assert torch.equal(model[m + "self_attention.linear_qkv.weight"], qkv.chunk(2)[tp])
        assert torch.equal(model[m + "self_attention.linear_qkv.bias"], bias.chunk(2)[tp])
        assert torch.equal(model[m + "mlp.linear_fc1.weight"], src[p + "mlp.c_fc.weight"].T.chunk(2)[tp])
        assert torch.equal(model[m + "mlp.linear_fc2.weight"], src[p + "mlp.c_proj.weight"].T.chunk(2, 1)[tp])
        assert torch.equal(model[m + "self_attention.linear_proj.weight"], src[p + "attn.c_proj.weight"].T.chunk(2, 1)[tp])
        assert torch.equal(model["embedding.position_embeddings.weight"], src["transformer.wpe.weight"])
    args = files["mp_rank_00"]["args"]
    assert (args.normalization, args.position_embedding_type, args.add_bias_linear, args.swiglu) == ("LayerNorm", "learned_absolute", True, False)
    # `autotrans inspect` names the template and scheme the checkpoint's names match
    r = subprocess.run([sys.executable, "-m", "runner", "inspect", str(tmp_path / "m" / "transformed_checkpoint")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "(template gpt, megatron names)" in r.stdout.splitlines()[0], r.stdout + r.stderr


@pytest.mark.parametrize("edit,key", [
    (("    split: column\n    fuse: {parts: [q, k, v]", "    splt: column\n    fuse: {parts: [q, k, v]"), "weights.qkv.splt"),
    (("    split: row\n  ffn_norm", "    split: rows\n  ffn_norm"), "weights.attention_out.split"),
    (("    pad: vocab\n  attention_norm", "    pad: vocabulary\n  attention_norm"), "weights.embedding.pad"),
    (("fuse: {parts: [gate, up]}", "fuse: {parts: [gate, upp]}"), "weights.fc1.fuse"),
    (("divisible:", "divisable:"), "divisable"),
    (("    shape: [head_dim]\n  k_norm", "    shape: head_dim\n  k_norm"), "weights.q_norm.shape"),
    (("    split: row\n  ffn_norm", "    split: row\n    permute: {hf: {view: [num_heads, 2], order: [0, 0]}}\n  ffn_norm"),
     "weights.attention_out.permute.hf.order"),
    # grouped experts are split over expert parallel only
    (("    split: row\n  ffn_norm", "    split: row\n    experts: grouped\n  ffn_norm"), "weights.attention_out.split"),
])
def test_bad_template_is_one_line_naming_file_and_key(tmp_path, edit, key):
    path = tmp_path / "bad.yaml"
    assert MY_FAMILY.count(edit[0]) == 1
    path.write_text(MY_FAMILY.replace(*edit))
    with pytest.raises(ConfigError) as e:
        load_file(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and f"key {key}:" in msg, msg


def test_bad_template_exits_2_from_the_cli(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(MY_FAMILY.replace("    split: row\n  ffn_norm", "    splt: row\n  ffn_norm"))
    job = tmp_path / "job.yaml"
    job.write_text(f"only_save_strategy: true\noutput_dir: {tmp_path / 'out'}\nmodel:\n  arch: {path}\n"
                   "  model_config: {num_layers: 2, hidden_size: 32, num_heads: 4, n_kv_heads: 2, intermediate_size: 48, vocab_size: 64}\n")
    r = subprocess.run([sys.executable, "-m", "runner", "run", str(job)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "key weights.attention_out.splt:" in lines[0], r.stderr


def test_shipped_templates_load():
    for name in ("llama", "qwen2", "mixtral", "gpt"):
        t = load_file(ROOT / "strategies" / f"{name}.yaml")
        assert t.weights and set(w for weight in t.weights for w in weight.names) <= set(t.schemes)
