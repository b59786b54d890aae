"""HF -> Megatron -> HF at several TP/PP/EP layouts returns every tensor bit for bit;
Megatron -> Megatron reshards directly; a finished conversion is skipped."""

from __future__ import annotations

import pytest
import torch

from tests.convert_util import hf_tensors, logits, make_hf, megatron_files, run

LAYOUTS = [
    ("llama", dict(model_parallel=1, pipeline_stage=1), {}),
    ("llama", dict(model_parallel=2, pipeline_stage=2), {}),
    ("llama", dict(model_parallel=4, pipeline_stage=1), {"transformer_impl": "local"}),
    ("llama", dict(model_parallel=1, pipeline_stage=4), {"megatron_naming": "legacy"}),
    ("qwen2", dict(model_parallel=2, pipeline_stage=2), {}),
    ("qwen2", dict(model_parallel=2, pipeline_stage=1), {"transformer_impl": "local"}),
    ("qwen3", dict(model_parallel=2, pipeline_stage=2), {}),
    ("qwen3", dict(model_parallel=2, pipeline_stage=2), {"transformer_impl": "local"}),
    ("qwen2_moe", dict(model_parallel=2, pipeline_stage=2, expert_parallel=2), {}),
    ("qwen2_moe", dict(model_parallel=1, pipeline_stage=1, expert_parallel=2), {"transformer_impl": "local"}),
    ("glm4", dict(model_parallel=2, pipeline_stage=2), {}),
    ("glm4", dict(model_parallel=2, pipeline_stage=2), {"transformer_impl": "local"}),
    ("deepseek_v3", dict(model_parallel=2, pipeline_stage=2, expert_parallel=2), {}),
    ("deepseek_v3", dict(model_parallel=2, pipeline_stage=2, expert_parallel=2), {"transformer_impl": "local"}),
    ("deepseek_v3_q_proj", dict(model_parallel=2, pipeline_stage=2, expert_parallel=2), {}),
    ("qwen3_moe", dict(model_parallel=2, pipeline_stage=2, expert_parallel=2), {}),
    ("qwen3_moe", dict(model_parallel=2, pipeline_stage=1, expert_parallel=2), {"transformer_impl": "local"}),
    ("mixtral", dict(model_parallel=2, pipeline_stage=2, expert_parallel=2), {}),
    ("mixtral", dict(model_parallel=1, pipeline_stage=1, expert_parallel=4), {"transformer_impl": "local"}),
    ("gpt2", dict(model_parallel=2, pipeline_stage=2), {}),
    ("gpt2", dict(model_parallel=4, pipeline_stage=1), {"transformer_impl": "local"}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: make_hf(root / f, f) for f in ("llama", "qwen2", "qwen3", "glm4", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v3_q_proj", "mixtral", "gpt2")}


@pytest.mark.parametrize("family,parallel,extra", LAYOUTS, ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}{w}" for k, w in v.items()))
def test_hf_megatron_hf_is_bit_identical(models, tmp_path, family, parallel, extra):
    hf = models[family]
    assert run(load_checkpoint=str(hf), output_format="megatron", parallel_config=parallel,
               output_dir=str(tmp_path / "m"), **extra) == 0
    files = megatron_files(tmp_path / "m" / "transformed_checkpoint")
    assert len(files) == parallel["model_parallel"] * parallel["pipeline_stage"] * parallel.get("expert_parallel", 1)
    assert run(load_checkpoint=str(tmp_path / "m" / "transformed_checkpoint"), output_format="hf",
               reference_hf_dir=str(hf), output_dir=str(tmp_path / "h"), max_shard_size="100KB") == 0
    out = tmp_path / "h" / "transformed_checkpoint"
    a, b = hf_tensors(hf), hf_tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name
    ids = torch.tensor([[1, 7, 42, 99, 3, 120, 5, 8]])
    assert torch.equal(logits(hf, family, ids), logits(out, family, ids))


def test_hf_output_shards_and_index(models, tmp_path):
    import json

    hf = models["llama"]
    assert run(load_checkpoint=str(hf), output_format="megatron", output_dir=str(tmp_path / "m")) == 0
    assert run(load_checkpoint=str(tmp_path / "m" / "transformed_checkpoint"), output_format="hf",
               reference_hf_dir=str(hf), output_dir=str(tmp_path / "h"), max_shard_size="200KB") == 0
    out = tmp_path / "h" / "transformed_checkpoint"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for f in shards:  # each shard within the limit unless a single tensor is larger
        held = [k for k, v in index["weight_map"].items() if v == f]
        size = (out / f).stat().st_size
        assert size <= 200_000 + 4096 or len(held) == 1
    assert (out / "config.json").read_text() == (hf / "config.json").read_text()
    assert (out / "generation_config.json").exists()


def test_tokenizer_files_the_reference_has_are_copied_without_a_false_warning(models, tmp_path, capsys):
    """A transformers 5 / Llama 3 tokenizer is tokenizer.json (+ config, chat template):
    no warning about the files such a model never had; a reference with none is warned about."""
    hf = models["llama"]
    (tmp_path / "ref").mkdir()
    for f in ("config.json", "generation_config.json"):
        (tmp_path / "ref" / f).write_bytes((hf / f).read_bytes())
    run(load_checkpoint=str(hf), output_format="megatron", output_dir=str(tmp_path / "m"))
    capsys.readouterr()
    back = dict(load_checkpoint=str(tmp_path / "m" / "transformed_checkpoint"), output_format="hf",
                reference_hf_dir=str(tmp_path / "ref"))
    run(**back, output_dir=str(tmp_path / "none"))
    assert f"the HF output has no tokenizer files (reference_hf_dir {tmp_path / 'ref'} holds none)" in capsys.readouterr().err
    for f, text in (("tokenizer.json", "{}"), ("tokenizer_config.json", '{"a": 1}'), ("chat_template.jinja", "{{ x }}")):
        (tmp_path / "ref" / f).write_text(text)
    run(**back, output_dir=str(tmp_path / "h"))
    assert "warning" not in capsys.readouterr().err
    out = tmp_path / "h" / "transformed_checkpoint"
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "chat_template.jinja").read_text() == "{{ x }}"
    assert not (out / "tokenizer.model").exists()


@pytest.mark.parametrize("family,src,dst", [
    ("llama", dict(model_parallel=2, pipeline_stage=2), dict(model_parallel=4, pipeline_stage=1)),
    ("qwen2", dict(model_parallel=1, pipeline_stage=2), dict(model_parallel=2, pipeline_stage=1)),
    ("mixtral", dict(model_parallel=2, pipeline_stage=1, expert_parallel=2), dict(model_parallel=1, pipeline_stage=2, expert_parallel=4)),
])
def test_megatron_reshard_equals_direct_conversion(models, tmp_path, family, src, dst):
    """TP2 PP2 -> TP4 PP1 (vocab padding 512 -> 512 or changed) equals HF -> TP4 PP1."""
    hf = models[family]
    assert run(load_checkpoint=str(hf), output_format="megatron", parallel_config=src, output_dir=str(tmp_path / "a")) == 0
    assert run(load_checkpoint=str(tmp_path / "a" / "transformed_checkpoint"), output_format="megatron",
               parallel_config=dst, output_dir=str(tmp_path / "b"), reference_hf_dir=str(hf)) == 0
    assert run(load_checkpoint=str(hf), output_format="megatron", parallel_config=dst, output_dir=str(tmp_path / "c")) == 0
    via, direct = megatron_files(tmp_path / "b" / "transformed_checkpoint"), megatron_files(tmp_path / "c" / "transformed_checkpoint")
    assert sorted(via) == sorted(direct)
    for rank in direct:
        m1, m2 = via[rank]["model"], direct[rank]["model"]
        assert sorted(m1) == sorted(m2), rank
        for k in m2:
            if m2[k] is None:
                assert m1[k] is None
            else:
                assert torch.equal(m1[k].view(torch.int16), m2[k].view(torch.int16)), (rank, k)
        assert vars(via[rank]["args"]) == vars(direct[rank]["args"])


def test_tp_change_that_changes_vocab_padding(models, tmp_path):
    """vocab 300: TP1 pads to 384, TP4 to 512; the reshard repads from the true rows."""
    hf = models["llama"]
    run(load_checkpoint=str(hf), output_format="megatron", output_dir=str(tmp_path / "a"))
    run(load_checkpoint=str(tmp_path / "a" / "transformed_checkpoint"), output_format="megatron",
        parallel_config=dict(model_parallel=4), output_dir=str(tmp_path / "b"))
    files = megatron_files(tmp_path / "b" / "transformed_checkpoint")
    emb = torch.cat([files[f"mp_rank_{t:02d}"]["model"]["embedding.word_embeddings.weight"] for t in range(4)])
    ref = hf_tensors(hf)["model.embed_tokens.weight"]
    assert emb.shape[0] == 512
    assert torch.equal(emb[:300], ref) and torch.equal(emb[300:], ref[-1:].expand(212, -1))


def test_finished_conversion_is_skipped(models, tmp_path, capsys):
    hf = models["qwen2"]
    keys = dict(load_checkpoint=str(hf), output_format="megatron", parallel_config=dict(model_parallel=2), output_dir=str(tmp_path / "m"))
    assert run(**keys) == 0
    pt = tmp_path / "m" / "transformed_checkpoint" / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    stamp = pt.stat().st_mtime_ns
    capsys.readouterr()
    assert run(**keys) == 0
    assert "skipped" in capsys.readouterr().err
    assert pt.stat().st_mtime_ns == stamp
    assert run(**{**keys, "iteration": 7}) == 0  # other settings: converted again
    assert (tmp_path / "m" / "transformed_checkpoint" / "latest_checkpointed_iteration.txt").read_text() == "7"


def test_mindformers_names_round_trip(models, tmp_path):
    """HF -> MindFormers names -> Megatron equals HF -> Megatron; MindFormers -> HF is the identity."""
    from safetensors.torch import load_file

    hf = models["llama"]
    assert run(load_checkpoint=str(hf), output_format="mindformers", use_parallel=False, output_dir=str(tmp_path / "mf")) == 0
    mf_file = tmp_path / "mf" / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors"
    mf = load_file(mf_file)
    src = hf_tensors(hf)
    assert torch.equal(mf["model.layers.1.attention.wq.weight"], src["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(mf["model.layers.0.feed_forward.w3.weight"], src["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(mf["model.tok_embeddings.embedding_weight"], src["model.embed_tokens.weight"])
    assert torch.equal(mf["model.norm_out.weight"], src["model.norm.weight"])
    assert len(mf) == len(src)
    par = dict(model_parallel=2, pipeline_stage=2)
    assert run(load_checkpoint=str(mf_file), output_format="megatron", parallel_config=par, reference_hf_dir=str(hf), output_dir=str(tmp_path / "a")) == 0
    assert run(load_checkpoint=str(hf), output_format="megatron", parallel_config=par, output_dir=str(tmp_path / "b")) == 0
    a, b = megatron_files(tmp_path / "a" / "transformed_checkpoint"), megatron_files(tmp_path / "b" / "transformed_checkpoint")
    for rank in b:
        for k, v in b[rank]["model"].items():
            assert (v is None and a[rank]["model"][k] is None) or torch.equal(v, a[rank]["model"][k]), k
    assert run(load_checkpoint=str(mf_file), output_format="hf", reference_hf_dir=str(hf), output_dir=str(tmp_path / "h")) == 0
    back = hf_tensors(tmp_path / "h" / "transformed_checkpoint")
    assert sorted(back) == sorted(src) and all(torch.equal(back[k], src[k]) for k in src)


def test_example_configs_run(models, tmp_path):
    """configs/hf_to_megatron.yaml then configs/megatron_to_hf.yaml, on a tiny model."""
    from pathlib import Path

    from runner import config
    from runner.dispatch import run_job

    root = Path(__file__).resolve().parent.parent / "configs"
    hf, meg = models["llama"], tmp_path / "m"
    cfg = config.load(root / "hf_to_megatron.yaml", [f"load_checkpoint={hf}", f"output_dir={meg}", "parallel_config.model_parallel=2"])
    assert run_job(cfg, show_progress=False) == 0
    cfg = config.load(root / "megatron_to_hf.yaml", [f"load_checkpoint={meg}/transformed_checkpoint", f"reference_hf_dir={hf}",
                                                     f"output_dir={tmp_path / 'h'}"])
    assert run_job(cfg, show_progress=False) == 0
    a, b = hf_tensors(hf), hf_tensors(tmp_path / "h" / "transformed_checkpoint")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("mindformers_to_megatron.yaml", "megatron_reshard.yaml"):
        assert config.load(root / name).output_format == "megatron"


def test_megatron_optimizer_and_rng_state_are_dropped_with_a_note(models, tmp_path, capsys):
    """Issue 6: a Megatron source's optimizer and rng entries are not converted, and the job says so."""
    mg = tmp_path / "mg"
    assert run(load_checkpoint=str(models["llama"]), output_format="megatron", output_dir=str(mg)) == 0
    for path in (mg / "transformed_checkpoint").glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        doc = torch.load(path, weights_only=False)
        doc["optimizer"] = {"state": {0: {"exp_avg": torch.zeros(3)}}}
        doc["rng_state"] = [{"torch_rng_state": torch.get_rng_state()}]
        torch.save(doc, path)
    capsys.readouterr()
    assert run(load_checkpoint=str(mg / "transformed_checkpoint"), output_format="hf",
               reference_hf_dir=str(models["llama"]), output_dir=str(tmp_path / "back")) == 0
    warning = next(line for line in capsys.readouterr().err.splitlines() if "not converted" in line)
    assert "optimizer" in warning and "rng_state" in warning
    back = hf_tensors(tmp_path / "back/transformed_checkpoint")
    want = hf_tensors(models["llama"])
    assert sorted(back) == sorted(want) and all(torch.equal(back[n], want[n]) for n in want)


def test_verify_compares_hf_and_megatron_folders(models, tmp_path, capsys):
    """`autotrans verify HF MEGATRON` reads the Megatron side under HF names (SPEC 10:
    whatever their formats); a changed Megatron weight is named by its HF name."""
    from runner.cli import main

    mg = tmp_path / "mg"
    assert run(load_checkpoint=str(models["qwen2"]), output_format="megatron", output_dir=str(mg),
               parallel_config={"model_parallel": 2, "pipeline_stage": 2}, verify=True) == 0
    assert "source and output are bit-identical" in capsys.readouterr().out  # verify: true in the job
    folder = mg / "transformed_checkpoint"
    assert main(["verify", str(models["qwen2"]), str(folder)]) == 0
    path = folder / "iter_0000001/mp_rank_01_001/model_optim_rng.pt"
    doc = torch.load(path, weights_only=False)
    key = next(k for k in doc["model"] if k.endswith("linear_fc2.weight"))
    doc["model"][key] = doc["model"][key].clone()
    doc["model"][key][0, 0] += 1
    torch.save(doc, path)
    capsys.readouterr()
    assert main(["verify", str(models["qwen2"]), str(folder)]) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert "differ" in first and "mlp.down_proj.weight" in first, first
