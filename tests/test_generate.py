"""Strategy generation from strategies/*.yaml (issue 3).

The oracle for every rank's box is written here from the numbering rules (stage-major,
then data parallel, then tensor parallel fastest; experts over an expert-parallel
group carved out of data parallel; optimizer shard over the replicas), never from
the code under test. Round trips go through the CLI and compare bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from runner import cli, config
from runner.errors import AutotransError, ConfigError, LayoutError
from runner.generate import generate, layer_stages

LLAMA_MC = {"num_layers": 4, "hidden_size": 32, "num_heads": 4, "n_kv_heads": 2, "intermediate_size": 48, "vocab_size": 64}
MIXTRAL_MC = {**LLAMA_MC, "num_experts": 4}

# Independent description of MindSpore Transformers' names: suffix -> (split, tp dim, stacked experts)
# Its norms and embeddings are declared parallel_optimizer=False.
NO_OPT = ("attention_norm.weight", "ffn_norm.weight", "model.norm_out.weight", "model.tok_embeddings.embedding_weight")
MF_ROLES = {
    "attention.wq.weight": ("tp", 0, False), "attention.wk.weight": ("tp", 0, False),
    "attention.wv.weight": ("tp", 0, False), "attention.wo.weight": ("tp", 1, False),
    "feed_forward.w1.weight": ("tp", 0, False), "feed_forward.w3.weight": ("tp", 0, False),
    "feed_forward.w2.weight": ("tp", 1, False),
    "feed_forward.ffn.w1.weight": ("tp", 1, True), "feed_forward.ffn.w3.weight": ("tp", 1, True),
    "feed_forward.ffn.w2.weight": ("tp", 2, True),
    "feed_forward.router.dense.weight": ("rep", None, False),
    "attention_norm.weight": ("rep", None, False), "ffn_norm.weight": ("rep", None, False),
    "model.norm_out.weight": ("rep", None, False),
    "model.tok_embeddings.embedding_weight": ("vocab", 0, False), "lm_head.weight": ("vocab", 0, False),
}


def job(**raw) -> config.JobConfig:
    return config.from_mapping(raw)


def dry(arch: str, mc: dict, threshold: int = 0, **pc) -> config.JobConfig:
    """A dry run; the parallel optimizer's size threshold (KB) defaults to 0 here, so
    that the tiny test weights are sharded where MindSpore would shard large ones."""
    return job(only_save_strategy=True, model={"arch": arch, "model_config": mc, "naming": "mindformers"}, parallel_config=pc,
               parallel={"parallel_optimizer_config": {"parallel_optimizer_threshold": threshold}})


def role(name: str) -> tuple[str, int | None, bool]:
    for suffix, r in MF_ROLES.items():
        if name.endswith(suffix):
            return r
    raise KeyError(name)


def oracle_box(name, shape, rank, *, dp, tp, pp, ep, layers, vocab_emb_dp, opt):
    """(offsets, sizes) rank `rank` holds, or None when its stage does not hold `name`."""
    per = dp * tp
    stage, pos = divmod(rank, per)
    d, t = divmod(pos, tp)
    if ".layers." in name:
        want = int(name.split(".layers.")[1].split(".")[0]) // (layers // pp)
    elif "norm_out" in name or "lm_head" in name:
        want = pp - 1
    else:
        want = 0
    if stage != want:
        return None
    kind, dim, stacked = role(name)
    offsets, sizes = [0] * len(shape), list(shape)
    split = kind == "tp" or (kind == "vocab" and not vocab_emb_dp)
    if split and tp > 1:
        sizes[dim] //= tp
        offsets[dim] = t * sizes[dim]
    if stacked:
        sizes[0] //= ep
        offsets[0] = (d % ep) * sizes[0]
        replica, replicas = d // ep, dp // ep
    elif split and tp > 1:
        replica, replicas = d, dp
    else:
        replica, replicas = pos, per
    if opt and replicas > 1 and sizes[0] % replicas == 0 and not name.endswith(NO_OPT):
        sizes[0] //= replicas
        offsets[0] += replica * sizes[0]
    return tuple(offsets), tuple(sizes)


COMBOS = [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 1, 1), (1, 4, 1, 1), (2, 2, 2, 1), (1, 2, 4, 1),
          (2, 2, 1, 2), (4, 1, 2, 2), (4, 2, 1, 4), (4, 1, 1, 4), (2, 4, 2, 2)]


@pytest.mark.parametrize("opt", [False, True])
@pytest.mark.parametrize("vocab_emb_dp", [True, False])
@pytest.mark.parametrize("dp,tp,pp,ep", COMBOS)
def test_every_rank_box_matches_oracle(dp, tp, pp, ep, vocab_emb_dp, opt):
    arch, mc = ("mixtral", MIXTRAL_MC) if ep > 1 or dp % 2 == 0 else ("llama", LLAMA_MC)
    mc = {**mc, "n_kv_heads": max(tp, 2)}
    s = generate(dry(arch, mc, data_parallel=dp, model_parallel=tp, pipeline_stage=pp, expert_parallel=ep,
                     vocab_emb_dp=vocab_emb_dp, optimizer_shard=opt), None)
    s.validate()
    assert s.world_size == dp * tp * pp
    assert s.stages == tuple(tuple(range(i * dp * tp, (i + 1) * dp * tp)) for i in range(pp))
    layers = mc["num_layers"]
    expected_names = 3 + layers * (9 if arch == "llama" else 10)
    assert len(s.params) == expected_names
    for name, p in s.params.items():
        for rank in range(s.world_size):
            want = oracle_box(name, p.shape, rank, dp=dp, tp=tp, pp=pp, ep=ep, layers=layers, vocab_emb_dp=vocab_emb_dp, opt=opt)
            box = s.box(name, rank)
            got = None if box is None else (box.offsets, box.sizes)
            assert got == want, (name, rank)


def test_shapes_follow_model_config():
    s = generate(dry("mixtral", MIXTRAL_MC), None)
    h, f, v, e = 32, 48, 64, 4
    assert s.params["model.layers.1.attention.wq.weight"].shape == (h, h)
    assert s.params["model.layers.1.attention.wk.weight"].shape == (2 * h // 4, h)
    assert s.params["model.layers.1.feed_forward.ffn.w2.weight"].shape == (e, h, f)
    assert s.params["model.layers.1.feed_forward.router.dense.weight"].shape == (e, h)
    assert s.params["lm_head.weight"].shape == (v, h)


def test_mindformers_llama_intermediate_size_default():
    # LlamaConfig: 4h -> int(2*4h/3) -> rounded up to multiple_of
    mc = {k: v for k, v in LLAMA_MC.items() if k != "intermediate_size"} | {"hidden_size": 4096, "num_heads": 32, "n_kv_heads": 8}
    s = generate(dry("llama", mc), None)
    assert s.params["model.layers.0.feed_forward.w1.weight"].shape == (11008, 4096)
    mc["ffn_dim_multiplier"] = 1.3
    mc["multiple_of"] = 1024
    s = generate(dry("llama", mc), None)  # Llama 3 8B: 14336
    assert s.params["model.layers.0.feed_forward.w1.weight"].shape == (14336, 4096)


@pytest.mark.parametrize("num_layers,pp,offset,interleave,expected", [
    (4, 2, 0, 1, [0, 0, 1, 1]),
    (10, 4, [1, 1, 0, 0], 1, [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]),
    (10, 4, [0, 0, 1, 1], 1, [0, 0, 1, 1, 2, 2, 2, 3, 3, 3]),
    (9, 2, [-1, 2], 1, [0, 0, 0, 1, 1, 1, 1, 1, 1]),
    (8, 2, 0, 2, [0, 0, 1, 1, 0, 0, 1, 1]),
    (7, 2, [[1, 1], [1, 0]], 2, [0, 0, 1, 1, 0, 0, 1]),
])
def test_layer_stages_follow_mindformers_offset(num_layers, pp, offset, interleave, expected):
    assert layer_stages(num_layers, pp, offset, interleave) == expected


def test_offset_places_layers_on_stages():
    mc = {**LLAMA_MC, "num_layers": 5, "offset": [0, 1]}
    s = generate(dry("llama", mc, pipeline_stage=2), None)
    assert [s.params[f"model.layers.{i}.attention.wq.weight"].stages for i in range(5)] == [(0,), (0,), (1,), (1,), (1,)]
    assert s.params["model.tok_embeddings.embedding_weight"].stages == (0,)
    assert s.params["lm_head.weight"].stages == (1,)


def test_tied_embeddings_on_first_and_last_stage():
    s = generate(dry("llama", {**LLAMA_MC, "tie_word_embeddings": True}, pipeline_stage=2, model_parallel=2, vocab_emb_dp=False), None)
    assert "lm_head.weight" not in s.params
    emb = s.params["model.tok_embeddings.embedding_weight"]
    assert emb.stages == (0, 1)
    assert s.box("model.tok_embeddings.embedding_weight", 3).offsets == (32, 0)  # last stage, tp rank 1


@pytest.mark.parametrize("mc,pc,message", [
    ({**LLAMA_MC, "num_layers": 5}, {"pipeline_stage": 2}, "num_layers 5 is not divisible by pipeline_stage 2: set model_config.offset"),
    ({**LLAMA_MC, "num_layers": 5, "offset": [1, 1]}, {"pipeline_stage": 2}, "model_config.offset [1, 1] adds up to 2, but must add up to num_layers 5 % 2 = 1"),
    ({**LLAMA_MC, "num_heads": 6, "hidden_size": 48}, {"model_parallel": 4}, "model_config.num_heads = 6 is not divisible by parallel_config.model_parallel = 4"),
    (LLAMA_MC, {"model_parallel": 4}, "model_config.n_kv_heads = 2 is not divisible by parallel_config.model_parallel = 4"),
    ({**LLAMA_MC, "vocab_size": 66, "n_kv_heads": 4}, {"model_parallel": 4, "vocab_emb_dp": False}, "the vocabulary (66) is not divisible by model_parallel 4"),
])
def test_one_line_errors(mc, pc, message):
    with pytest.raises(AutotransError) as e:
        generate(dry("llama", mc, **pc), None)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_experts_not_divisible_by_expert_parallel():
    with pytest.raises(ConfigError, match="model_config.num_experts = 4 is not divisible by parallel_config.expert_parallel = 8"):
        generate(dry("mixtral", MIXTRAL_MC, data_parallel=8, expert_parallel=8), None)


def test_per_expert_names_refuse_expert_parallel():
    cfg = job(only_save_strategy=True, model={"arch": "mixtral", "model_config": MIXTRAL_MC, "naming": "hf"},
              parallel_config={"data_parallel": 2, "expert_parallel": 2})
    with pytest.raises(ConfigError, match="block_sparse_moe.experts.0.w1.weight: experts stored one tensor each cannot be split over expert_parallel 2"):
        generate(cfg, None)


def test_mindformers_training_yaml_picks_qwen2_and_mixtral():
    qwen = generate(job(model={"arch": {"type": "LlamaForCausalLM"}, "model_config": {**LLAMA_MC, "qkv_has_bias": True}}), None)
    assert "model.layers.0.attention.wq.bias" in qwen.params
    moe = generate(job(model={"arch": {"type": "LlamaForCausalLM"}, "model_config": {**LLAMA_MC, "expert_num": 4}}), None)
    assert moe.params["model.layers.0.feed_forward.ffn.w1.weight"].shape == (4, 48, 32)
    # MindSpore Transformers' Mixtral YAMLs keep expert_num in a top-level moe_config
    moe = generate(job(model={"arch": {"type": "LlamaForCausalLM"}, "model_config": LLAMA_MC}, moe_config={"expert_num": 4}), None)
    assert moe.params["model.layers.0.feed_forward.ffn.w1.weight"].shape == (4, 48, 32)


def test_unknown_arch_and_scheme_errors():
    with pytest.raises(ConfigError, match="no template for 'bert'"):
        generate(job(model={"arch": "bert", "model_config": LLAMA_MC}), None)
    with pytest.raises(ConfigError, match="template gpt has no 'torchtitan' names"):
        generate(job(model={"arch": "gpt", "model_config": LLAMA_MC, "naming": "torchtitan"}), None)


# -- with a checkpoint: names, shapes and dtypes from it; round trips through the CLI ------------
def rng_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def run_cli(*argv: str) -> int:
    return cli.main(["run", "--no-progress", *argv])


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def round_trip(tmp_path: Path, source: Path, model: dict, pc: dict, full_file: Path) -> None:
    """full -> generated layout -> full (use_parallel: false), then `autotrans verify`."""
    job_file = write_yaml(tmp_path / "split.yaml", {"load_checkpoint": str(source), "output_dir": str(tmp_path / "split"),
                                                    "model": model, "parallel_config": pc, "verify": True})
    assert run_cli(str(job_file)) == 0
    strategy = tmp_path / "split" / "strategy"
    assert run_cli(str(job_file), f"load_checkpoint={tmp_path / 'split' / 'transformed_checkpoint'}",
                   f"src_strategy_path_or_dir={strategy}", "use_parallel=false", f"output_dir={tmp_path / 'merged'}") == 0
    merged = tmp_path / "merged" / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors"
    assert cli.main(["verify", str(full_file), str(merged)]) == 0
    a, b = load_file(str(full_file)), load_file(str(merged))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)


def hf_model(kind: str, folder: Path) -> Path:
    import transformers
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**small, tie_word_embeddings=False))
    elif kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**small, num_local_experts=4))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=16))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind,pc", [
    ("llama", {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 2, "vocab_emb_dp": False, "optimizer_shard": True}),
    ("qwen2", {"data_parallel": 1, "model_parallel": 2, "pipeline_stage": 2}),
    ("mixtral", {"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 2, "vocab_emb_dp": False}),
    ("gpt", {"data_parallel": 1, "model_parallel": 4, "pipeline_stage": 2, "vocab_emb_dp": False}),
])
def test_hf_round_trip_through_cli(tmp_path, kind, pc):
    folder = hf_model(kind, tmp_path / "hf")
    hf_config = json.loads((folder / "config.json").read_text())  # HF key names
    full = folder / "model.safetensors"
    round_trip(tmp_path, full, {"arch": hf_config["architectures"][0], "model_config": hf_config}, pc, full)


def test_sizes_from_the_hf_folder_config_json(tmp_path):
    folder = hf_model("qwen2", tmp_path / "hf")
    job = _prepare({"load_checkpoint": str(folder), "model": {"arch": "qwen2"},
                    "parallel_config": {"model_parallel": 2, "pipeline_stage": 2}})
    assert job.dst.params["model.layers.3.self_attn.k_proj.bias"].shape == (16,)
    assert job.dst.params["model.layers.3.self_attn.k_proj.bias"].stages == (1,)
    assert job.dst.box("model.layers.3.self_attn.k_proj.bias", 3).offsets == (8,)


def test_gpt2_fused_qkv_is_split_per_projection(tmp_path):
    """Each tensor-parallel rank stores [q_shard | k_shard | v_shard] of HF GPT-2's c_attn."""
    folder = hf_model("gpt", tmp_path / "hf")
    job_file = write_yaml(tmp_path / "j.yaml", {"load_checkpoint": str(folder / "model.safetensors"), "output_dir": str(tmp_path / "o"),
                                                "model": {"arch": "gpt", "model_config": json.loads((folder / "config.json").read_text())},
                                                "parallel_config": {"model_parallel": 2}})
    assert run_cli(str(job_file)) == 0
    full = load_file(str(folder / "model.safetensors"))["transformer.h.1.attn.c_attn.weight"]  # [32, 96]
    for t in range(2):
        got = load_file(str(tmp_path / "o" / "transformed_checkpoint" / f"rank_{t}" / f"checkpoint_{t}.safetensors"))
        want = np.concatenate([full[:, j * 32 + t * 16: j * 32 + (t + 1) * 16] for j in range(3)], axis=1)
        assert np.array_equal(got["transformer.h.1.attn.c_attn.weight"], want)


def megatron_llama_shapes(tied: bool = False) -> dict[str, tuple[int, ...]]:
    h, f, v, q = 32, 48, 64, (4 + 2 * 2) * 8
    out = {"embedding.word_embeddings.weight": (v, h), "decoder.final_layernorm.weight": (h,)}
    if not tied:
        out["output_layer.weight"] = (v, h)
    for i in range(4):
        p = f"decoder.layers.{i}."
        out |= {p + "self_attention.linear_qkv.layer_norm_weight": (h,), p + "self_attention.linear_qkv.weight": (q, h),
                p + "self_attention.linear_proj.weight": (h, h), p + "mlp.linear_fc1.layer_norm_weight": (h,),
                p + "mlp.linear_fc1.weight": (2 * f, h), p + "mlp.linear_fc2.weight": (h, f)}
    return out


def test_megatron_names_fc1_stored_per_rank_as_gate_up(tmp_path):
    tensors = rng_tensors(megatron_llama_shapes())
    save_file(tensors, str(tmp_path / "full.safetensors"))
    model = {"arch": "llama", "model_config": LLAMA_MC}
    pc = {"model_parallel": 2, "pipeline_stage": 2, "vocab_emb_dp": False}
    round_trip(tmp_path, tmp_path / "full.safetensors", model, pc, tmp_path / "full.safetensors")
    fc1 = tensors["decoder.layers.3.mlp.linear_fc1.weight"]
    for t in range(2):
        rank = 2 + t  # stage 1 holds layers 2 and 3
        got = load_file(str(tmp_path / "split" / "transformed_checkpoint" / f"rank_{rank}" / f"checkpoint_{rank}.safetensors"))
        want = np.concatenate([fc1[t * 24:(t + 1) * 24], fc1[48 + t * 24: 48 + (t + 1) * 24]])
        assert np.array_equal(got["decoder.layers.3.mlp.linear_fc1.weight"], want)
    strategy = json.loads((tmp_path / "split" / "strategy" / "ckpt_strategy_rank_2.json").read_text())
    assert strategy["params"]["decoder.layers.3.mlp.linear_fc1.weight"]["stored_shape"] == [48, 32]


def test_mindformers_stacked_experts_split_over_expert_parallel(tmp_path):
    h, f, v, e = 32, 48, 64, 4
    shapes = {"model.tok_embeddings.embedding_weight": (v, h), "model.norm_out.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(4):
        p = f"model.layers.{i}."
        shapes |= {p + "attention_norm.weight": (h,), p + "ffn_norm.weight": (h,), p + "attention.wq.weight": (h, h),
                   p + "attention.wk.weight": (16, h), p + "attention.wv.weight": (16, h), p + "attention.wo.weight": (h, h),
                   p + "feed_forward.router.dense.weight": (e, h), p + "feed_forward.ffn.w1.weight": (e, f, h),
                   p + "feed_forward.ffn.w3.weight": (e, f, h), p + "feed_forward.ffn.w2.weight": (e, h, f)}
    tensors = rng_tensors(shapes, seed=1)
    save_file(tensors, str(tmp_path / "full.safetensors"))
    pc = {"data_parallel": 2, "model_parallel": 2, "expert_parallel": 2, "optimizer_shard": True}
    round_trip(tmp_path, tmp_path / "full.safetensors", {"arch": "mixtral", "model_config": MIXTRAL_MC}, pc, tmp_path / "full.safetensors")
    w2 = tensors["model.layers.0.feed_forward.ffn.w2.weight"]
    # rank 3: dp index 1 -> expert group 1, tp 1; one replica per expert group, so no opt shard
    got = load_file(str(tmp_path / "split" / "transformed_checkpoint" / "rank_3" / "checkpoint_3.safetensors"))
    assert np.array_equal(got["model.layers.0.feed_forward.ffn.w2.weight"], w2[2:4, :, 24:48])


def test_checkpoint_names_must_match_template(tmp_path):
    shapes = megatron_llama_shapes()
    extra = rng_tensors({**shapes, "decoder.layers.0.self_attention.core_attention.foo": (3,)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    base = {"output_dir": str(tmp_path / "o"), "model": {"arch": "llama", "model_config": LLAMA_MC}}
    with pytest.raises(LayoutError, match=r"checkpoint weight decoder\.layers\.0\.self_attention\.core_attention\.foo is not in template llama \(megatron names\)"):
        _prepare({**base, "load_checkpoint": str(tmp_path / "extra.safetensors")})
    missing = rng_tensors({k: s for k, s in shapes.items() if k != "decoder.layers.2.mlp.linear_fc2.weight"})
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(LayoutError, match=r"expects weight decoder\.layers\.2\.mlp\.linear_fc2\.weight, which the checkpoint lacks"):
        _prepare({**base, "load_checkpoint": str(tmp_path / "missing.safetensors")})
    tied = rng_tensors(megatron_llama_shapes(tied=True))
    save_file(tied, str(tmp_path / "tied.safetensors"))
    with pytest.raises(LayoutError, match="expects weight output_layer.weight.*tie_word_embeddings"):
        _prepare({**base, "load_checkpoint": str(tmp_path / "tied.safetensors")})


def test_generated_dtype_from_checkpoint_and_cast(tmp_path):
    tensors = {k: v.astype(np.float16) for k, v in rng_tensors(megatron_llama_shapes()).items()}
    save_file(tensors, str(tmp_path / "full.safetensors"))
    base = {"load_checkpoint": str(tmp_path / "full.safetensors"), "model": {"arch": "llama", "model_config": LLAMA_MC}}
    assert {p.dtype for p in _prepare(base).dst.params.values()} == {"F16"}
    assert {p.dtype for p in _prepare({**base, "dtype": "fp32"}).dst.params.values()} == {"F32"}
    nockpt = generate(job(model={"arch": "llama", "model_config": {**LLAMA_MC, "param_init_type": "bfloat16"}}), None)
    assert {p.dtype for p in nockpt.params.values()} == {"BF16"}


def _prepare(raw: dict):
    from runner.job import prepare

    return prepare(config.from_mapping(raw))


# -- strategy-only dry runs -----------------------------------------------------------------------
def test_dry_run_writes_spec_paths_without_checkpoint(tmp_path):
    cfg = Path(__file__).resolve().parent.parent / "configs" / "strategy_only_16.yaml"
    out = tmp_path / "out"
    assert cli.main(["strategy", "--no-progress", str(cfg), f"output_dir={out}"]) == 0
    files = sorted(p.name for p in (out / "strategy").iterdir())
    assert files == sorted([f"ckpt_strategy_rank_{r}.json" for r in range(16)] + ["merged_ckpt_strategy.json"])
    assert not (out / "transformed_checkpoint").exists()
    merged = json.loads((out / "strategy" / "merged_ckpt_strategy.json").read_text())
    assert merged["stages"] == [list(range(8)), list(range(8, 16))] and "rank" not in merged
    r9 = json.loads((out / "strategy" / "ckpt_strategy_rank_9.json").read_text())
    assert r9["rank"] == 9 and set(r9["params"]) < set(merged["params"])
    assert "model.layers.0.attention.wq.weight" not in r9["params"]  # layer 0 lives on stage 0
    last = max(int(n.split(".")[2]) for n in merged["params"] if n.startswith("model.layers."))
    p = r9["params"][f"model.layers.{last}.attention.wq.weight"]
    assert p["dev_matrix"] == [2, 4] and p["tensor_map"] == [0, -1] and p["stage"] == 1


def test_hf_folder_without_model_section_takes_the_architecture_from_config_json(tmp_path):
    folder = hf_model("qwen2", tmp_path / "hf")
    out = tmp_path / "out"
    job_file = write_yaml(tmp_path / "j.yaml", {"load_checkpoint": str(folder), "output_dir": str(out),
                                                "parallel_config": {"model_parallel": 2}})
    assert run_cli(str(job_file)) == 0
    full = load_file(str(folder / "model.safetensors"))
    for t in range(2):
        got = load_file(str(out / "transformed_checkpoint" / f"rank_{t}" / f"checkpoint_{t}.safetensors"))
        assert got.keys() == full.keys()
        assert np.array_equal(got["model.layers.1.self_attn.k_proj.bias"], full["model.layers.1.self_attn.k_proj.bias"][t * 8:(t + 1) * 8])
        assert np.array_equal(got["model.layers.1.mlp.down_proj.weight"], full["model.layers.1.mlp.down_proj.weight"][:, t * 24:(t + 1) * 24])


def test_optimizer_states_in_the_source_follow_their_weight(tmp_path):
    shapes = megatron_llama_shapes()
    tensors = rng_tensors(shapes)
    tensors |= {f"{pre}.{n}": v for n, v in rng_tensors(shapes, seed=2).items() for pre in ("adam_m", "adam_v")}
    save_file(tensors, str(tmp_path / "full.safetensors"))
    job = _prepare({"load_checkpoint": str(tmp_path / "full.safetensors"), "model": {"arch": "llama", "model_config": LLAMA_MC},
                    "parallel_config": {"data_parallel": 2, "model_parallel": 2, "optimizer_shard": True},
                    "parallel": {"parallel_optimizer_config": {"parallel_optimizer_threshold": 0}}})
    assert set(job.dst.params) == set(tensors)
    for name in shapes:
        for rank in range(4):
            assert job.dst.box("adam_m." + name, rank) == job.dst.box(name, rank)
