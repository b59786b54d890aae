"""FP8 block-scaled weights as DeepSeek-V3's released checkpoints store them: a tiny
DeepSeek-V3 built from a transformers config, its linear weights quantized here with
torch to float8_e4m3fn per 128 x 128 block with a float32 weight_scale_inv (hidden size
200: a partial last block). Oracles: the safetensors library, this file's own torch
dequantization, transformers' DeepseekV3ForCausalLM, megatron-core's GPTModel."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.convert_util import FAMILIES, hf_tensors, legacy_deepseek_v3, make_hf, run
from tests.test_convert_mcore import mcore_cpu  # noqa: F401  (a fixture)

BLOCK = 128
# the projections DeepSeek-V3's released checkpoints store in FP8; norms, embeddings, the
# output head, the router and its bias, and the MTP layer's eh_proj stay as they are
QUANTIZED = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# 16 heads of 16 + 16 dims (rope 16, v 16) and FFNs of 256: tensor-parallel halves are
# whole blocks; hidden 200 and the LoRA ranks leave partial blocks
SIZES = dict(hidden_size=200, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=2, num_attention_heads=16,
             num_key_value_heads=16, q_lora_rank=96, kv_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=16,
             v_head_dim=16, first_k_dense_replace=1)


def quantized(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in QUANTIZED


def quantize(w: torch.Tensor, size: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn per size x size block, and each block's scale (its max magnitude / 448)."""
    rows, cols = w.shape
    grid = (math.ceil(rows / size), math.ceil(cols / size))
    scale = torch.empty(grid, dtype=torch.float32)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = w[i * size:(i + 1) * size, j * size:(j + 1) * size].float()
            s = block.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * size:(i + 1) * size, j * size:(j + 1) * size] = (block / s).to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """fp32 product of each element and its block's scale, rounded once."""
    rows, cols = q.shape
    s = scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return (q.float() * s).to(dtype)


def make_fp8(folder: Path) -> Path:
    """The tiny DeepSeek-V3 (MTP layer included) with its projections in FP8, as released."""
    make_hf(folder, "deepseek_v3", **SIZES)
    tensors = hf_tensors(folder)
    out = {}
    for name, t in tensors.items():
        if quantized(name):
            out[name], out[name + "_scale_inv"] = quantize(t)
        else:
            out[name] = t
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


@pytest.fixture(scope="module")
def fp8_hf(tmp_path_factory) -> Path:
    return make_fp8(tmp_path_factory.mktemp("fp8") / "hf")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def rank_files(out: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted((out / "transformed_checkpoint").glob("rank_*/*.safetensors"), key=lambda p: int(p.parent.name[5:]))
    return [load_file(f) for f in files]


def test_the_fixture_is_what_deepseek_releases(fp8_hf):
    src = hf_tensors(fp8_hf)
    assert src["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert src["model.layers.0.self_attn.q_a_proj.weight_scale_inv"].shape == (1, 2)  # [96, 200]: partial blocks
    assert src["model.layers.2.eh_proj.weight"].dtype == torch.bfloat16
    assert src["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


def test_tensor_parallel_split_and_merge_keep_fp8_and_scales_bit_for_bit(fp8_hf, tmp_path):
    src = hf_tensors(fp8_hf)
    assert run(load_checkpoint=str(fp8_hf), parallel_config={"model_parallel": 2}, output_dir=str(tmp_path / "tp2")) == 0
    ranks = rank_files(tmp_path / "tp2")
    for half, held in enumerate(ranks):
        assert set(held) == set(src)
        # q_b_proj [512, 96] is column parallel: rows 256 * half, its scale's block rows 2 * half
        q_b = "model.layers.1.self_attn.q_b_proj.weight"
        assert same(held[q_b], src[q_b].chunk(2, 0)[half])
        assert same(held[q_b + "_scale_inv"], src[q_b + "_scale_inv"].chunk(2, 0)[half])
        o = "model.layers.2.self_attn.o_proj.weight"  # the MTP layer's, row parallel: columns split
        assert same(held[o], src[o].chunk(2, 1)[half])
        assert same(held[o + "_scale_inv"], src[o + "_scale_inv"].chunk(2, 1)[half])
        kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # replicated
        assert same(held[kv_a], src[kv_a]) and same(held[kv_a + "_scale_inv"], src[kv_a + "_scale_inv"])
    assert run(load_checkpoint=str(tmp_path / "tp2" / "transformed_checkpoint"),
               src_strategy_path_or_dir=str(tmp_path / "tp2" / "strategy"), use_parallel=False, output_dir=str(tmp_path / "one")) == 0
    (merged,) = rank_files(tmp_path / "one")
    assert set(merged) == set(src) and all(same(merged[n], src[n]) for n in src)


def test_a_split_that_cuts_a_block_is_refused_in_one_line(fp8_hf, tmp_path, capsys):
    from runner.errors import LayoutError

    with pytest.raises(LayoutError, match=r"cut its 128-wide FP8 blocks apart.*dtype: bf16"):
        run(load_checkpoint=str(fp8_hf), parallel_config={"model_parallel": 4}, output_dir=str(tmp_path / "tp4"))
    assert not (tmp_path / "tp4" / "transformed_checkpoint").exists()


def test_dtype_bf16_dequantizes_exactly_and_drops_the_scales(fp8_hf, tmp_path):
    src = hf_tensors(fp8_hf)
    assert run(load_checkpoint=str(fp8_hf), parallel_config={"model_parallel": 2}, dtype="bf16", verify=True,
               output_dir=str(tmp_path / "tp2")) == 0  # verify: the output against the source as dequantized
    ranks = rank_files(tmp_path / "tp2")
    weights = {n for n in src if not n.endswith("_scale_inv")}
    for half, held in enumerate(ranks):
        assert set(held) == weights
        for name in ("model.layers.1.self_attn.q_b_proj.weight", "model.layers.0.mlp.gate_proj.weight"):
            want = dequantize(src[name], src[name + "_scale_inv"]).chunk(2, 0)[half]
            assert same(held[name], want), name
        name = "model.layers.0.self_attn.q_a_proj.weight"  # partial blocks on both dims
        assert same(held[name], dequantize(src[name], src[name + "_scale_inv"]))
        bias = "model.layers.1.mlp.gate.e_score_correction_bias"
        assert same(held[bias], src[bias])  # float32, kept by the cast


def test_hf_folder_to_hf_folder_keeps_fp8_and_scales_bit_for_bit(fp8_hf, tmp_path):
    src = hf_tensors(fp8_hf)
    assert run(load_checkpoint=str(fp8_hf), output_format="hf", max_shard_size="300KB", output_dir=str(tmp_path / "h")) == 0
    out = tmp_path / "h" / "transformed_checkpoint"
    assert len(list(out.glob("model-*.safetensors"))) > 1
    got = hf_tensors(out)
    assert set(got) == set(src) and all(same(got[n], src[n]) for n in src)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert index[name] == index[name + "_scale_inv"]  # a scale sits in its weight's file
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [BLOCK, BLOCK]


def test_dequantized_hf_folder_loads_in_transformers_with_the_logits_of_the_dequantized_weights(fp8_hf, tmp_path):
    """dtype: bf16 writes each weight as this file's dequantization gives it, no scales, and a
    config.json without quantization_config, so transformers loads a plain bf16 model."""
    import transformers

    src = hf_tensors(fp8_hf)
    assert run(load_checkpoint=str(fp8_hf), output_format="hf", dtype="bf16", verify=True, output_dir=str(tmp_path / "h")) == 0
    out = tmp_path / "h" / "transformed_checkpoint"
    got = hf_tensors(out)
    want = {n: (dequantize(t, src[n + "_scale_inv"]) if quantized(n) else t) for n, t in src.items() if not n.endswith("_scale_inv")}
    assert set(got) == set(want) and all(same(got[n], want[n]) for n in want)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = torch.tensor([[3, 17, 42, 8, 99, 5]])
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(out).eval()
    assert not any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
    mine = tmp_path / "mine"  # this file's dequantized state dict, saved by the safetensors library
    mine.mkdir()
    save_file(want, str(mine / "model.safetensors"), metadata={"format": "pt"})
    (mine / "config.json").write_text((out / "config.json").read_text())
    reference = transformers.DeepseekV3ForCausalLM.from_pretrained(mine).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_fp8_to_megatron_needs_dtype_bf16(fp8_hf, tmp_path):
    from runner.errors import ConfigError

    with pytest.raises(ConfigError, match="set dtype: bf16 to dequantize"):
        run(load_checkpoint=str(fp8_hf), output_format="megatron", output_dir=str(tmp_path / "m"))


def test_fp8_to_megatron_tp2_with_dtype_bf16_holds_the_dequantized_weights(fp8_hf, tmp_path):
    from tests.convert_util import megatron_files

    src = hf_tensors(fp8_hf)
    assert run(load_checkpoint=str(fp8_hf), output_format="megatron", dtype="bf16", parallel_config={"model_parallel": 2},
               output_dir=str(tmp_path / "m")) == 0
    files = megatron_files(tmp_path / "m" / "transformed_checkpoint")
    q_b = "model.layers.1.self_attn.q_b_proj.weight"
    o = "model.layers.1.self_attn.o_proj.weight"
    for half, folder in enumerate(("mp_rank_00", "mp_rank_01")):
        m = files[folder]["model"]
        assert same(m["decoder.layers.1.self_attention.linear_q_up_proj.weight"], dequantize(src[q_b], src[q_b + "_scale_inv"]).chunk(2, 0)[half])
        assert same(m["decoder.layers.1.self_attention.linear_proj.weight"], dequantize(src[o], src[o + "_scale_inv"]).chunk(2, 1)[half])
        bias = m["decoder.layers.1.mlp.router.expert_bias"]
        assert same(bias, src["model.layers.1.mlp.gate.e_score_correction_bias"])  # float32 kept
    assert run(load_checkpoint=str(tmp_path / "m" / "transformed_checkpoint"), output_format="hf", reference_hf_dir=str(fp8_hf),
               output_dir=str(tmp_path / "h")) == 0
    back = hf_tensors(tmp_path / "h" / "transformed_checkpoint")
    want = {n: (dequantize(t, src[n + "_scale_inv"]) if quantized(n) else t) for n, t in src.items() if not n.endswith("_scale_inv")}
    assert set(back) == set(want) and all(same(back[n], want[n]) for n in want)
    assert "quantization_config" not in json.loads((tmp_path / "h" / "transformed_checkpoint" / "config.json").read_text())


def test_fp8_to_megatron_dequantized_loads_into_gpt_model_with_the_logits_of_the_dequantized_weights(fp8_hf, tmp_path, mcore_cpu,
                                                                                                      monkeypatch):
    """dtype: fp32 dequantizes into a float32 Megatron checkpoint (local spec) that
    megatron-core's GPTModel loads strictly; its logits are transformers' from this file's
    own dequantized state dict."""
    import transformers

    from tests.convert_util import FAMILIES
    from tests.test_convert_mcore import IDS
    from tests.test_families import deepseek_gpt_model, main_model_logits

    src = hf_tensors(fp8_hf)
    assert run(load_checkpoint=str(fp8_hf), output_format="megatron", transformer_impl="local", dtype="fp32",
               output_dir=str(tmp_path / "m")) == 0
    doc = torch.load(tmp_path / "m" / "transformed_checkpoint" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    c = {**FAMILIES["deepseek_v3"], **SIZES}
    model = deepseek_gpt_model(c, doc["args"].padded_vocab_size, monkeypatch)
    result = model.load_state_dict(doc["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    mine = tmp_path / "mine"
    mine.mkdir()
    want = {n: (dequantize(t, src[n + "_scale_inv"], torch.float32) if quantized(n) else t.float())
            for n, t in src.items() if not n.endswith("_scale_inv")}
    save_file(want, str(mine / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((fp8_hf / "config.json").read_text())
    del cfg["quantization_config"]
    (mine / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32", "dtype": "float32"}))
    reference = transformers.DeepseekV3ForCausalLM.from_pretrained(mine, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor(IDS)).logits
    got = main_model_logits(model)[..., : c["vocab_size"]]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def fp8_llama(root: Path, size: int) -> tuple[Path, Path]:
    """A tiny Llama (hidden 72, 2 query groups of 2 heads of 18: partial blocks) whose
    projections are FP8 per size x size block, and a template of its own: the shipped
    llama template with those projections (and MindSpore Transformers' fused w_qkv and
    w_gate_hidden) marked block_scale."""
    import yaml

    from runner.templates import TEMPLATE_DIR

    doc = yaml.safe_load((TEMPLATE_DIR / "llama.yaml").read_text())
    for role in ("q", "k", "v", "w_qkv", "attention_out", "gate", "up", "w_gate_hidden", "down"):
        doc["weights"][role]["block_scale"] = "_scale_inv"
    doc["name"] = "llama_fp8"
    template = root / "llama_fp8.yaml"
    template.write_text(yaml.safe_dump(doc))
    hf = make_hf(root / "hf", "llama", hidden_size=72, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
    out = {}
    for name, t in hf_tensors(hf).items():
        if quantized(name) or name.endswith(("k_proj.weight", "v_proj.weight")):
            out[name], out[name + "_scale_inv"] = quantize(t, size)
        else:
            out[name] = t
    save_file(out, str(hf / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((hf / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [size, size]}
    (hf / "config.json").write_text(json.dumps(cfg))
    return hf, template


def test_mindformers_names_keep_fp8_and_scales_both_ways(tmp_path):
    """Renamed weights keep their scales under the other scheme's names (a template's
    block_scale, nothing else), and come back bit for bit."""
    hf, template = fp8_llama(tmp_path, 16)
    src = hf_tensors(hf)
    model = {"arch": str(template)}
    assert run(load_checkpoint=str(hf), model=model, output_format="mindformers", use_parallel=False, output_dir=str(tmp_path / "mf")) == 0
    mf_file = tmp_path / "mf" / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors"
    mf = load_file(mf_file)
    assert len(mf) == len(src)
    for hf_name, mf_name in (("model.layers.1.self_attn.k_proj.weight", "model.layers.1.attention.wk.weight"),
                             ("model.layers.0.mlp.down_proj.weight", "model.layers.0.feed_forward.w2.weight")):
        assert same(mf[mf_name], src[hf_name]) and same(mf[mf_name + "_scale_inv"], src[hf_name + "_scale_inv"])
    assert run(load_checkpoint=str(mf_file), model=model, output_format="hf", reference_hf_dir=str(hf), output_dir=str(tmp_path / "h")) == 0
    back = hf_tensors(tmp_path / "h" / "transformed_checkpoint")
    assert set(back) == set(src) and all(same(back[n], src[n]) for n in src)
    assert run(load_checkpoint=str(mf_file), model=model, output_format="hf", reference_hf_dir=str(hf), dtype="bf16",
               output_dir=str(tmp_path / "d")) == 0  # dequantized from MindFormers names
    got = hf_tensors(tmp_path / "d" / "transformed_checkpoint")
    name = "model.layers.1.self_attn.q_proj.weight"
    assert name + "_scale_inv" not in got
    rows, cols = src[name].shape
    scale = src[name + "_scale_inv"].repeat_interleave(16, 0)[:rows].repeat_interleave(16, 1)[:, :cols]
    assert same(got[name], (src[name].float() * scale).to(torch.bfloat16))


def test_deepseek_v3_fp8_under_mindformers_names_keeps_the_scales_both_ways(fp8_hf, tmp_path):
    """The released FP8 layout under MindSpore Transformers 1.7's DeepSeek-V3 names (MTP
    layer included): each weight and its scale renamed, FP8 bytes untouched, and back."""
    src = hf_tensors(fp8_hf)
    assert run(load_checkpoint=str(fp8_hf), output_format="mindformers", use_parallel=False, output_dir=str(tmp_path / "mf")) == 0
    mf_file = tmp_path / "mf" / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors"
    mf = load_file(mf_file)
    for hf_name, mf_name in (("model.layers.1.mlp.experts.0.gate_proj.weight", "decoder.layers.1.mlp.experts.0.gating.weight"),
                             ("model.layers.0.self_attn.q_a_proj.weight", "decoder.layers.0.self_attention.linear_q_down_proj.weight"),
                             ("model.layers.2.self_attn.kv_b_proj.weight",
                              "mtp.layers.0.transformer_layer.self_attention.linear_kv_up_proj.weight")):
        assert same(mf[mf_name], src[hf_name]) and same(mf[mf_name + "_scale_inv"], src[hf_name + "_scale_inv"])
    assert same(mf["decoder.layers.1.mlp.router.expert_bias"], src["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert run(load_checkpoint=str(mf_file), output_format="hf", reference_hf_dir=str(fp8_hf), output_dir=str(tmp_path / "h")) == 0
    back = hf_tensors(tmp_path / "h" / "transformed_checkpoint")
    assert set(back) == set(src) and all(same(back[n], src[n]) for n in src)


def test_deepseek_v3_fp8_to_mindformers_legacy_names_needs_dtype_bf16(fp8_hf, tmp_path):
    """MindSpore Transformers 1.5's DeepSeek-V3 names cut q_b_proj, kv_a_proj_with_mqa and
    kv_b_proj into parts no block scale follows (its converter dequantizes): without dtype the
    job is refused in one line; with dtype: bf16 the legacy tensors hold the dequantized weights."""
    from runner.errors import ConfigError

    legacy = dict(output_format="mindformers", use_parallel=False, model={"naming": "mindformers_legacy"})
    with pytest.raises(ConfigError, match=r"attention\.\w+\.weight would hold FP8 block-scaled rows, .*set dtype: bf16") as e:
        run(load_checkpoint=str(fp8_hf), output_dir=str(tmp_path / "fp8"), **legacy)
    assert "\n" not in str(e.value)
    assert run(load_checkpoint=str(fp8_hf), output_dir=str(tmp_path / "mf"), dtype="bf16", **legacy) == 0
    src = hf_tensors(fp8_hf)
    plain = {n: dequantize(t, src[n + "_scale_inv"]) if quantized(n) else t for n, t in src.items() if not n.endswith("_scale_inv")}
    want = legacy_deepseek_v3(plain, {**FAMILIES["deepseek_v3"], **SIZES})
    got = load_file(tmp_path / "mf" / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors")
    assert set(got) == set(want) and all(same(got[n], want[n]) for n in want)


def test_a_mindformers_fuse_that_cuts_blocks_is_refused(tmp_path):
    """qkv_concat's w_gate_hidden interleaves gate and up rows one by one (and w_qkv holds
    each query group's 36 q rows, then k and v): 16-row blocks would be cut."""
    from runner.errors import LayoutError

    hf, template = fp8_llama(tmp_path, 16)
    model = {"arch": str(template), "model_config": {"qkv_concat": True}}
    with pytest.raises(LayoutError, match=r"(w_qkv|w_gate_hidden).*cut its 16-row FP8 blocks apart; set dtype: bf16"):
        run(load_checkpoint=str(hf), model=model, output_format="mindformers", use_parallel=False, output_dir=str(tmp_path / "mf"))


def test_a_cast_of_fp8_weights_with_no_known_scale_is_refused_not_cast(fp8_hf, tmp_path):
    """The safetensors file alone (no config.json, so no template): its FP8 weights are not
    cast plainly, which would drop their scales."""
    from runner.errors import ConfigError

    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((fp8_hf / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="no block scale the model's template names.*set pretrained_model_dir"):
        run(load_checkpoint=str(lone), use_parallel=False, dtype="bf16", output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "transformed_checkpoint").exists()


def test_a_lora_merge_into_fp8_weights_is_refused(fp8_hf, tmp_path):
    from runner.errors import PlanError

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    module = "base_model.model.model.layers.0.self_attn.q_a_proj"
    save_file({f"{module}.lora_A.weight": torch.zeros(2, 200, dtype=torch.bfloat16),
               f"{module}.lora_B.weight": torch.zeros(96, 2, dtype=torch.bfloat16)}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(PlanError, match="q_a_proj.weight is F8_E4M3; dequantize the checkpoint first"):
        run(load_checkpoint=str(fp8_hf), lora={"adapter": str(adapter)}, output_format="hf", output_dir=str(tmp_path / "out"))


def test_plan_counts_the_fp8_bytes_a_dequantizing_job_reads(fp8_hf, tmp_path, capsys):
    """`autotrans plan`: the source's bytes and a merge's reads are the FP8 weights and
    their scales as stored (each read once), the writes the dequantized bf16 tensors."""
    from runner.cli import main

    src = hf_tensors(fp8_hf)
    stored = sum(t.numel() * t.element_size() for t in src.values())
    written = sum(t.numel() * (2 if t.dtype == torch.float8_e4m3fn else t.element_size())
                  for n, t in src.items() if not n.endswith("_scale_inv"))
    job = tmp_path / "job.yaml"
    job.write_text(f"load_checkpoint: {fp8_hf}\nuse_parallel: false\ndtype: bf16\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["plan", str(job), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"]["bytes"] == stored
    assert doc["total"]["read_bytes"] == stored and doc["total"]["write_bytes"] == written


def test_a_distributed_fp8_checkpoint_dequantizes_once_the_job_knows_its_model(fp8_hf, tmp_path):
    """Tensor-parallel FP8 rank files (no config.json) merge dequantized when
    pretrained_model_dir names the HF folder: each scale read from the rank holding it."""
    src = hf_tensors(fp8_hf)
    assert run(load_checkpoint=str(fp8_hf), parallel_config={"model_parallel": 2}, output_dir=str(tmp_path / "tp2")) == 0
    assert run(load_checkpoint=str(tmp_path / "tp2" / "transformed_checkpoint"), src_strategy_path_or_dir=str(tmp_path / "tp2" / "strategy"),
               use_parallel=False, dtype="bf16", pretrained_model_dir=str(fp8_hf), output_dir=str(tmp_path / "one")) == 0
    (merged,) = rank_files(tmp_path / "one")
    want = {n: (dequantize(t, src[n + "_scale_inv"]) if quantized(n) else t) for n, t in src.items() if not n.endswith("_scale_inv")}
    assert set(merged) == set(want) and all(same(merged[n], want[n]) for n in want)
