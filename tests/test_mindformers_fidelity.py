"""MindSpore Transformers' own training YAMLs (tests/fixtures/ms_yaml: verbatim copies,
origin and commit noted in the first line of each) give the layouts MindSpore Transformers would build for them.

Every expected name, shape, dtype and box is computed here from MindSpore Transformers'
and MindSpore's rules, written out independently of the templates:
- LlamaFeedForward's size: hidden = 4 * dim; times (ffn_dim_multiplier + 0.01) when set;
  int(2 * hidden / 3); rounded up to multiple_of.
- qkv_concat: attention.w_qkv [hidden + 2 * kv_dim, hidden] and feed_forward.w_gate_hidden
  [2 * ffn, hidden], split over model parallel on dim 0 like wq and w1.
- Shared-expert MoE (LlamaFeedForwardWithMoE): routed_experts.ffn.w1/w2/w3 [E, ...] over
  expert parallel, routed_experts.router.dense, shared_experts.w1/w2/w3 of
  intermediate_size * shared_expert_num, shared_experts_gate [1, hidden].
- Weights are sharded ((dp * cp, 1), (mp, 1)): replicated over data x context parallel.
- The parallel optimizer splits dim 0 of a slice over its replicas (or
  optimizer_weight_shard_size consecutive ones) unless the parameter is declared
  parallel_optimizer=False (norms, embeddings, biases), is smaller than
  parallel_optimizer_threshold KB, or dim 0 does not divide.
- Dtypes: norms layernorm_compute_type, embeddings embedding_init_type (GPT-2: float32),
  routers router_dense_type, the rest param_init_type; AdamW states float32.
- MindSpore Transformers 1.7's MoE layer (FFNGroupedGEMM, TopKRouter): experts.weight1
  [experts * hidden, 2 * ffn] and experts.weight2 [experts * ffn, hidden] in params_dtype,
  sharded (ep, None) over its MoE device matrix (dp * tp * cp / ep, ep), ep the fastest
  axis; router.weight [experts, hidden] in params_dtype, whole on every rank; router.fi_accu
  [experts], float32, parallel_optimizer=False and not trained (no optimizer states).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import cli, config
from runner.errors import ConfigError
from runner.generate import generate, layer_stages

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ms_yaml"
DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


def fixture(name: str, *overrides: str) -> config.JobConfig:
    return config.load(FIXTURES / f"{name}.yaml", ["only_save_strategy=true", *overrides])


def mf_ffn(dim: int, multiplier: float | None, multiple_of: int) -> int:
    hidden = 4 * dim
    if multiplier is not None:
        hidden = int((multiplier + 0.01) * hidden)
    hidden = int(2 * hidden / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ms_box(shape, rank, *, dp, mp, cp=1, split_dim=None, opt=False, opt_size=-1):
    """(offsets, sizes) of a dense weight on `rank` (its stage's position), from
    MindSpore's rules: ranks [dp * cp, mp] with mp fastest; the weight split on
    `split_dim` over mp; the parallel optimizer over the replicas."""
    d, t = divmod(rank, mp)
    offsets, sizes = [0] * len(shape), list(shape)
    if split_dim is not None and mp > 1:
        sizes[split_dim] //= mp
        offsets[split_dim] = t * sizes[split_dim]
        replica, replicas = d, dp * cp
    else:
        replica, replicas = rank, dp * cp * mp
    n = replicas if opt_size == -1 else opt_size
    if opt and n > 1 and replicas % n == 0 and sizes[0] % n == 0:
        sizes[0] //= n
        offsets[0] += (replica % n) * sizes[0]
    return tuple(offsets), tuple(sizes)


def box(s, name, rank):
    b = s.box(name, rank)
    return None if b is None else (b.offsets, b.sizes)


def big_enough(shape, dtype, threshold_kb=64) -> bool:
    n = 1
    for x in shape:
        n *= x
    return n * ITEMSIZE[dtype] / 1024 >= threshold_kb


# -- Llama 3.1 70B: the FFN formula, stages, dtypes, AdamW states --------------------------------
def test_llama3_1_70b_ffn_size_stages_and_optimizer_states():
    s = generate(fixture("llama3_1_70b_finetune"), None)
    ffn = mf_ffn(8192, 1.3, 256)
    assert ffn == 28672  # Llama-3.1-70B's published intermediate_size
    p = "model.layers.79."
    assert s.params[p + "feed_forward.w1.weight"].shape == (ffn, 8192)
    assert s.params[p + "feed_forward.w2.weight"].shape == (8192, ffn)
    assert s.params[p + "attention.wk.weight"].shape == (8 * 128, 8192)
    assert s.world_size == 1 * 8 * 8
    assert s.params[p + "attention.wq.weight"].stages == (7,)  # 80 layers, 10 per stage
    assert s.params["model.layers.9.attention.wq.weight"].stages == (0,)
    for rank in (56, 63):  # stage 7, model-parallel ranks 0 and 7
        assert box(s, p + "feed_forward.w1.weight", rank) == ms_box((ffn, 8192), rank - 56, dp=1, mp=8, split_dim=0)
        assert box(s, p + "feed_forward.w2.weight", rank) == ms_box((8192, ffn), rank - 56, dp=1, mp=8, split_dim=1)
    # vocab_emb_dp: False splits the embedding and lm_head over model parallel
    assert box(s, "model.tok_embeddings.embedding_weight", 3) == ms_box((128256, 8192), 3, dp=1, mp=8, split_dim=0)
    # AdamW: adam_m / adam_v beside every weight, float32, with the weight's layout
    weights = [n for n in s.params if not n.startswith("adam_")]
    assert {n for n in s.params if n.startswith("adam_")} == {f"{pre}.{n}" for n in weights for pre in ("adam_m", "adam_v")}
    for n in weights:
        assert s.params["adam_m." + n].dtype == "F32"
        assert box(s, "adam_v." + n, 60) == box(s, n, 60)


# -- Qwen2-57B-A14B: shared-expert MoE ------------------------------------------------------------
def test_qwen2_57b_shared_experts_names_sizes_and_boxes():
    s = generate(fixture("qwen2_57b_finetune"), None)
    h, ffn, experts, shared, kv = 3584, 2560, 64, 8, 4 * 128
    dp, ep, mp = 4, 4, 4
    p = "model.layers.27.feed_forward."
    want = {
        "routed_experts.ffn.w1.weight": (experts, ffn, h), "routed_experts.ffn.w3.weight": (experts, ffn, h),
        "routed_experts.ffn.w2.weight": (experts, h, ffn), "routed_experts.router.dense.weight": (experts, h),
        "shared_experts.w1.weight": (ffn * shared, h), "shared_experts.w3.weight": (ffn * shared, h),
        "shared_experts.w2.weight": (h, ffn * shared), "shared_experts_gate.weight": (1, h),
    }
    layer = {n[len(p):]: q.shape for n, q in s.params.items() if n.startswith(p)}
    assert layer == want
    assert "model.layers.27.feed_forward.w1.weight" not in s.params
    assert s.params["model.layers.27.attention.wk.bias"].shape == (kv,)
    assert s.world_size == dp * mp * 2
    for pos in range(dp * mp):
        rank = 16 + pos  # layer 27 is on stage 1
        d, t = divmod(pos, mp)
        # experts over expert parallel (carved from data parallel), ffn over model parallel;
        # one replica per expert group, so the parallel optimizer leaves them whole
        per = experts // ep
        assert box(s, p + "routed_experts.ffn.w1.weight", rank) == ((d % ep * per, t * ffn // mp, 0), (per, ffn // mp, h))
        assert box(s, p + "routed_experts.ffn.w2.weight", rank) == ((d % ep * per, 0, t * ffn // mp), (per, h, ffn // mp))
        # the shared expert is a dense FFN; parallel optimizer on (enable_parallel_optimizer, 64 KB)
        assert box(s, p + "shared_experts.w1.weight", rank) == ms_box((ffn * shared, h), pos, dp=dp, mp=mp, split_dim=0, opt=True)
        assert box(s, p + "routed_experts.router.dense.weight", rank) == ms_box((experts, h), pos, dp=dp, mp=mp, opt=True)
        # 14 KB: under the threshold
        assert not big_enough((1, h), "F32")
        assert box(s, p + "shared_experts_gate.weight", rank) == ms_box((1, h), pos, dp=dp, mp=mp)
        # norms and biases are declared parallel_optimizer=False
        assert box(s, "model.layers.27.ffn_norm.weight", rank) == ms_box((h,), pos, dp=dp, mp=mp)
        assert box(s, "model.layers.27.attention.wk.bias", rank) == ms_box((kv,), pos, dp=dp, mp=mp, split_dim=0)
    assert s.params[p + "routed_experts.router.dense.weight"].dtype == DTYPE["float32"]  # router_dense_type


# -- Qwen2.5-72B: qkv_concat --------------------------------------------------------------------
def test_qwen2_5_72b_qkv_concat_stores_w_qkv_and_w_gate_hidden():
    s = generate(fixture("qwen2_5_72b_finetune"), None)
    h, heads, kv_heads, head_dim, ffn, mp = 8192, 64, 8, 128, 29568, 8
    kv_dim = kv_heads * head_dim
    p = "model.layers.0."
    layer = {n[len(p):]: q.shape for n, q in s.params.items() if n.startswith(p)}
    assert layer == {
        "attention_norm.weight": (h,), "ffn_norm.weight": (h,),
        "attention.w_qkv.weight": (h + 2 * kv_dim, h), "attention.w_qkv.bias": (h + 2 * kv_dim,),
        "attention.wo.weight": (h, h),
        "feed_forward.w_gate_hidden.weight": (2 * ffn, h), "feed_forward.w2.weight": (h, ffn),
    }
    # each model-parallel rank holds whole query groups: its forward reshapes its rows to
    # (kv_heads / mp, (heads / kv_heads + 2) * head_dim)
    rows = (h + 2 * kv_dim) // mp
    assert rows == (kv_heads // mp) * (heads // kv_heads + 2) * head_dim
    for t in range(mp):
        assert box(s, p + "attention.w_qkv.weight", t) == ((t * rows, 0), (rows, h))
        assert box(s, p + "feed_forward.w_gate_hidden.weight", t) == ((t * 2 * ffn // mp, 0), (2 * ffn // mp, h))
    # layernorm_compute_type: bfloat16 makes the norms bfloat16; weights param_init_type
    assert s.params[p + "attention_norm.weight"].dtype == DTYPE["bfloat16"]
    assert s.params["model.norm_out.weight"].dtype == DTYPE["bfloat16"]
    assert s.params[p + "attention.w_qkv.weight"].dtype == DTYPE["float32"]


# -- Mixtral 8x7B: experts over expert parallel, parallel optimizer over data parallel --------------
def test_mixtral_8x7b_experts_dtypes_and_optimizer_shard():
    s = generate(fixture("mixtral_8x7b_finetune"), None)
    h, ffn, experts, dp = 4096, 14336, 8, 8
    p = "model.layers.31."
    assert s.params[p + "feed_forward.ffn.w1.weight"].shape == (experts, ffn, h)
    for rank in (8, 13):  # stage 1
        pos = rank - 8
        assert box(s, p + "feed_forward.ffn.w1.weight", rank) == ((pos, 0, 0), (1, ffn, h))
        assert box(s, p + "attention.wq.weight", rank) == ms_box((h, h), pos, dp=dp, mp=1, opt=True)
        assert box(s, "model.tok_embeddings.embedding_weight", pos) == ms_box((32000, h), pos, dp=dp, mp=1)
    assert s.params[p + "attention.wq.weight"].dtype == DTYPE["float16"]
    assert s.params[p + "attention_norm.weight"].dtype == DTYPE["float32"]
    assert s.params[p + "feed_forward.router.dense.weight"].dtype == DTYPE["float32"]
    assert s.params["model.tok_embeddings.embedding_weight"].dtype == DTYPE["float16"]  # embedding_init_type unset


# -- GPT-2 13B: MindSpore Transformers' backbone names ----------------------------------------------
def test_gpt2_13b_backbone_names_layouts_and_dtypes():
    s = generate(fixture("gpt2_13b"), None)
    h, ffn, dp, mp = 5120, 4 * 5120, 4, 8
    b = "backbone.blocks.39."
    layer = {n[len(b):]: (q.shape, q.dtype) for n, q in s.params.items() if n.startswith(b)}
    f16, f32 = DTYPE["float16"], DTYPE["float32"]
    assert layer == {
        "layernorm1.gamma": ((h,), f32), "layernorm1.beta": ((h,), f32),
        "layernorm2.gamma": ((h,), f32), "layernorm2.beta": ((h,), f32),
        "attention.dense1.weight": ((h, h), f16), "attention.dense1.bias": ((h,), f16),
        "attention.dense2.weight": ((h, h), f16), "attention.dense2.bias": ((h,), f16),
        "attention.dense3.weight": ((h, h), f16), "attention.dense3.bias": ((h,), f16),
        "attention.projection.weight": ((h, h), f16), "attention.projection.bias": ((h,), f16),
        "output.mapping.weight": ((h, ffn), f16), "output.mapping.bias": ((ffn,), f16),
        "output.projection.weight": ((ffn, h), f16), "output.projection.bias": ((h,), f16),
    }
    top = {n: (q.shape, q.dtype) for n, q in s.params.items() if n.startswith("backbone.") and ".blocks." not in n}
    assert top == {"backbone.embedding.word_embedding.embedding_table": ((50257, h), f32),
                   "backbone.embedding.position_embedding.embedding_table": ((2048, h), f32),
                   "backbone.layernorm.gamma": ((h,), f32), "backbone.layernorm.beta": ((h,), f32)}
    for pos in (0, 5, 31):
        # dense1..3 shard (mp, 1) on [out, in]; projection (mp, 1) and mapping (1, mp) on [in, out]
        assert box(s, b + "attention.dense1.weight", pos) == ms_box((h, h), pos, dp=dp, mp=mp, split_dim=0, opt=True)
        assert box(s, b + "attention.projection.weight", pos) == ms_box((h, h), pos, dp=dp, mp=mp, split_dim=0, opt=True)
        assert box(s, b + "output.mapping.weight", pos) == ms_box((h, ffn), pos, dp=dp, mp=mp, split_dim=1, opt=True)
        assert box(s, b + "output.projection.weight", pos) == ms_box((ffn, h), pos, dp=dp, mp=mp, split_dim=0, opt=True)
        assert box(s, b + "attention.projection.bias", pos) == ms_box((h,), pos, dp=dp, mp=mp)
    # FusedAdamWeightDecay keeps adam_m / adam_v
    assert s.params["adam_v." + b + "output.mapping.weight"].dtype == f32


# -- parallel optimizer settings and context parallel ----------------------------------------------
@pytest.mark.parametrize("size,threshold", [(-1, 64), (2, 64), (4, 64), (3, 64), (-1, 10 ** 9)])
def test_optimizer_weight_shard_size_and_threshold(size, threshold):
    cfg = fixture("mixtral_8x7b_finetune", f"parallel.parallel_optimizer_config.optimizer_weight_shard_size={size}",
                  f"parallel.parallel_optimizer_config.parallel_optimizer_threshold={threshold}")
    s = generate(cfg, None)
    h = 4096
    on = big_enough((h, h), "F16", threshold)
    for pos in range(8):
        assert box(s, "model.layers.0.attention.wq.weight", pos) == ms_box((h, h), pos, dp=8, mp=1, opt=on, opt_size=size)


def test_context_parallel_multiplies_ranks_and_replicas():
    cfg = fixture("llama3_1_70b_finetune", "parallel_config.data_parallel=2", "parallel_config.context_parallel=2",
                  "parallel_config.model_parallel=2", "parallel_config.pipeline_stage=2", "parallel_config.vocab_emb_dp=true")
    assert cfg.parallel_config.world_size == 2 * 2 * 2 * 2
    s = generate(cfg, None)
    assert s.world_size == 16 and s.stages == (tuple(range(8)), tuple(range(8, 16)))
    wq = s.params["model.layers.0.attention.wq.weight"]
    assert wq.dev_matrix == (2 * 2, 2)  # MindSpore's ((dp * cp, 1), (mp, 1))
    for pos in range(8):
        assert box(s, "model.layers.0.attention.wq.weight", pos) == ms_box((8192, 8192), pos, dp=2, cp=2, mp=2, split_dim=0, opt=True)
    with pytest.raises(Exception, match="context_parallel"):
        generate(fixture("llama3_1_70b_finetune", "parallel_config.context_parallel=2"), None)


def test_parallel_optimizer_config_values_are_checked():
    with pytest.raises(ConfigError, match="parallel.parallel_optimizer_config.optimizer_weight_shard_size"):
        fixture("mixtral_8x7b_finetune", "parallel.parallel_optimizer_config.optimizer_weight_shard_size=0")
    cfg = fixture("mixtral_8x7b_finetune", "parallel.parallel_optimizer_config.parallel_optimizer_threshold=-1")
    assert cfg.parallel_config.parallel_optimizer_threshold == 64  # MindSpore's default


# -- what the templates do not model is refused, naming the key ------------------------------------
@pytest.mark.parametrize("name,override,key", [
    ("mixtral_8x7b_finetune", "model.model_config.qkv_concat=true", "model.model_config.qkv_concat"),
    ("qwen2_57b_finetune", "moe_config.use_gmm=true", "moe_config.use_gmm"),
    ("qwen2_57b_finetune", "moe_config.balance_via_topk_bias=true", "moe_config.balance_via_topk_bias"),
    ("llama3_1_70b_finetune", "model.model_config.use_3d_tensor_parallel=true", "model.model_config.use_3d_tensor_parallel"),
    ("llama3_1_70b_finetune", "moe_config.shared_expert_num=2", "moe_config.shared_expert_num"),
    # TopKRouter's expert_bias / expert_load, not in the Qwen3-MoE template
    ("qwen3_30b_a3b_pretrain_v1_7", "model.model_config.moe_router_enable_expert_bias=true", "model.model_config.moe_router_enable_expert_bias"),
])
def test_unmodelled_layout_keys_are_errors_naming_the_key(name, override, key):
    with pytest.raises(ConfigError) as e:
        generate(fixture(name, override), None)
    assert str(e.value).startswith(key + ":") and "\n" not in str(e.value)


# -- dry runs of shipped YAMLs ----------------------------------------------------------------------
def test_placeholder_load_checkpoint_is_a_warning_in_a_dry_run(tmp_path, capsys):
    job = FIXTURES / "qwen2_5_72b_finetune.yaml"
    out = tmp_path / "out"
    args = ["run", "--no-progress", str(job), "load_checkpoint=/path/to/ckpt", f"output_dir={out}"]
    assert cli.main([*args, "only_save_strategy=true"]) == 0
    assert "load_checkpoint /path/to/ckpt does not exist" in capsys.readouterr().err
    assert len(list((out / "strategy").glob("ckpt_strategy_rank_*.json"))) == 64
    assert cli.main(args) == 1  # a real transform still needs the checkpoint


def test_deepseek_v3_offset_counts_the_mtp_layer():
    # DeepSeek-V3's pretrain YAML: 61 layers + mtp_depth 1 over 16 stages, offset [1]*15 + [-1]
    stages = layer_stages(61 + 1, 16, [1] * 15 + [-1])
    assert [stages.count(s) for s in range(16)] == [4] * 15 + [2]
    assert stages[60] == stages[61] == 15  # the last layer and the MTP layer


def test_parallel_config_typo_is_a_warning(capsys):
    cfg = fixture("mixtral_8x7b_finetune", "parallel_config.expert_paralel=2")
    assert cfg.parallel_config.expert_parallel == 8
    assert "parallel_config.expert_paralel is not one the runner reads and is ignored; did you mean parallel_config.expert_parallel?" in capsys.readouterr().err


# -- MindSpore Transformers 1.7: no model.arch, HF key names, mcore names -------------------------
def test_qwen3_v1_7_yaml_mcore_names_sizes_and_layout():
    cfg = fixture("qwen3_32b_pretrain_v1_7")
    s = generate(cfg, None)
    h, heads, kv, hd, ffn, mp, pp, vocab = 5120, 64, 8, 128, 25600, 4, 4, 151936
    assert s.world_size == mp * pp
    p = "decoder.layers.63."
    layer = {n[len(p):]: q.shape for n, q in s.params.items() if n.startswith(p)}
    assert layer == {
        "input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": ((heads + 2 * kv) * hd, h),  # qkv_concat: True
        "self_attention.q_layernorm.weight": (hd,), "self_attention.k_layernorm.weight": (hd,),
        "self_attention.linear_proj.weight": (h, heads * hd),
        "mlp.linear_fc1.weight": (2 * ffn, h), "mlp.linear_fc2.weight": (h, ffn),
    }
    # offset [-1, -1, 1, 1] over 64 layers: 15, 15, 17, 17
    stages = [s.params[f"decoder.layers.{i}.input_layernorm.weight"].stages[0] for i in range(64)]
    assert [stages.count(k) for k in range(pp)] == [15, 15, 17, 17]
    for t in range(mp):
        rank = 12 + t  # layer 63 on the last stage
        assert box(s, p + "self_attention.linear_qkv.weight", rank) == ms_box(((heads + 2 * kv) * hd, h), t, dp=1, mp=mp, split_dim=0)
        assert box(s, p + "mlp.linear_fc2.weight", rank) == ms_box((h, ffn), t, dp=1, mp=mp, split_dim=1)
        # the mcore models' defaults: vocab_emb_dp False, the output layer column-parallel
        assert box(s, "embedding.word_embeddings.weight", t) == ms_box((vocab, h), t, dp=1, mp=mp, split_dim=0)
        assert box(s, "output_layer.weight", rank) == ms_box((vocab, h), t, dp=1, mp=mp, split_dim=0)
    assert s.params["adam_m." + p + "mlp.linear_fc1.weight"].dtype == DTYPE["float32"]


def ms_moe_box(shape, rank, *, stage_size, ep, opt=False):
    """(offsets, sizes) of a grouped expert weight on `rank` (its stage's position), from
    MindSpore Transformers' MoE layout: device matrix (stage_size / ep, ep), dim 0 split over
    ep (the fastest axis); the parallel optimizer over the ranks holding the same rows."""
    e, replica = rank % ep, rank // ep
    rows = shape[0] // ep
    offsets, sizes = [e * rows, 0], [rows, shape[1]]
    replicas = stage_size // ep
    if opt and replicas > 1 and sizes[0] % replicas == 0:
        sizes[0] //= replicas
        offsets[0] += replica * sizes[0]
    return tuple(offsets), tuple(sizes)


def flat_box(s, name, rank):
    """A rank's box of a parameter as its stored 2-D tensor: the strategy may view the
    last dim as several (weight1's [.., 2, ffn]); those must be whole."""
    b = s.box(name, rank)
    assert all(o == 0 for o in b.offsets[1:]) and tuple(b.sizes[1:]) == s.params[name].shape[1:]
    n = 1
    for x in b.sizes[1:]:
        n *= x
    return (b.offsets[0], 0), (b.sizes[0], n)


@pytest.mark.parametrize("dp,ep,opt,dtype", [(1, 4, False, "float32"), (2, 4, True, "bfloat16"), (2, 8, True, "float32")])
def test_qwen3_moe_v1_7_yaml_grouped_experts_names_sizes_dtypes_and_layout(dp, ep, opt, dtype):
    """The shipped pretrain YAML (dp 1, mp 4, pp 4, ep 4), and with data parallel, the
    parallel optimizer and bfloat16 parameters."""
    cfg = fixture("qwen3_30b_a3b_pretrain_v1_7", f"parallel_config.data_parallel={dp}", f"parallel_config.expert_parallel={ep}",
                  f"parallel.enable_parallel_optimizer={str(opt).lower()}", f"model.model_config.params_dtype={dtype}")
    s = generate(cfg, None)
    h, heads, kv, hd, ffn, experts, mp, pp, vocab = 2048, 32, 4, 128, 768, 128, 4, 4, 151936
    stage_size = dp * mp
    assert s.world_size == stage_size * pp
    p = "decoder.layers.47."
    layer = {n[len(p):]: q for n, q in s.params.items() if n.startswith(p)}
    stored = {n: (q.shape[0], q.shape[1] * (q.shape[2] if len(q.shape) > 2 else 1)) if len(q.shape) > 1 else q.shape
              for n, q in layer.items()}
    assert stored == {
        "input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": ((heads + 2 * kv) * hd, h),  # the training graph's, per query group
        "self_attention.q_layernorm.weight": (hd,), "self_attention.k_layernorm.weight": (hd,),
        "self_attention.linear_proj.weight": (h, heads * hd),
        "mlp.router.weight": (experts, h), "mlp.router.fi_accu": (experts,),
        "mlp.experts.weight1": (experts * h, 2 * ffn), "mlp.experts.weight2": (experts * ffn, h),
    }
    want_dtype = {n: DTYPE[dtype] for n in stored}
    want_dtype["mlp.router.fi_accu"] = DTYPE["float32"]
    assert {n: q.dtype for n, q in layer.items()} == want_dtype
    # every weight has AdamW's states, float32; the router's load counter is not trained
    assert "adam_m." + p + "mlp.router.fi_accu" not in s.params
    assert s.params["adam_v." + p + "mlp.experts.weight1"].dtype == DTYPE["float32"]
    last = 3 * stage_size  # layer 47 is on the last stage (48 layers, offset 0)
    for pos in range(stage_size):
        rank = last + pos
        for w in ("weight1", "weight2"):
            name = p + "mlp.experts." + w
            assert flat_box(s, name, rank) == ms_moe_box(stored["mlp.experts." + w], pos, stage_size=stage_size, ep=ep, opt=opt)
            assert s.params[name].stored() == flat_box(s, name, rank)[1]
        assert box(s, p + "mlp.router.weight", rank) == ms_box((experts, h), pos, dp=dp, mp=mp, opt=opt)
        assert box(s, p + "mlp.router.fi_accu", rank) == ((0,), (experts,))
        assert box(s, p + "self_attention.linear_qkv.weight", rank) == ms_box(
            ((heads + 2 * kv) * hd, h), pos, dp=dp, mp=mp, split_dim=0, opt=opt)


def test_qwen3_moe_v1_7_expert_parallel_must_divide_data_times_model_parallel():
    with pytest.raises(ConfigError, match="expert_parallel = 8 must divide data_parallel x model_parallel = 4"):
        generate(fixture("qwen3_30b_a3b_pretrain_v1_7", "parallel_config.expert_parallel=8"), None)


# -- shipped YAMLs whose layout autotrans does not build: one line saying why ---------------------
@pytest.mark.parametrize("name,reason", [
    # GLM-4-9B in MindSpore Transformers is the ChatGLM2 architecture, which has no template
    ("glm4_9b_finetune_v1_7", "no template for 'ChatGLM2ForConditionalGeneration'"),
])
def test_shipped_yamls_of_unbuilt_layouts_are_refused_in_one_line(name, reason):
    with pytest.raises(ConfigError) as e:
        generate(fixture(name), None)
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_v1_7_embedding_stays_whole_when_model_parallel_does_not_divide_the_vocabulary():
    # MindSpore Transformers 1.7's VocabParallelEmbedding: split over tp when tp divides the
    # vocabulary, else whole on every rank (tied embeddings: no output layer of its own)
    cfg = fixture("qwen3_32b_pretrain_v1_7", "model.model_config.vocab_size=151937", "model.model_config.tie_word_embeddings=true")
    s = generate(cfg, None)
    assert "output_layer.weight" not in s.params
    for rank in range(4):
        assert box(s, "embedding.word_embeddings.weight", rank) == ((0, 0), (151937, 5120))
    divisible = generate(fixture("qwen3_32b_pretrain_v1_7", "model.model_config.tie_word_embeddings=true"), None)
    assert box(divisible, "embedding.word_embeddings.weight", 1) == ms_box((151936, 5120), 1, dp=1, mp=4, split_dim=0)
    with pytest.raises(ConfigError, match="embedding_weight: the vocabulary .128257. is not divisible"):  # legacy models refuse it
        generate(fixture("llama3_1_70b_finetune", "model.model_config.vocab_size=128257", "parallel_config.vocab_emb_dp=false"), None)
