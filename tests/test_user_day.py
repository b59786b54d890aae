"""What users coming from MindSpore Transformers, Megatron-LM and Hugging Face expect
(issue 18): formats read as MindSpore Transformers reads them, messages that name the
right thing, one exit-code rule. Jobs run through the CLI entry point in-process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from runner.cli import main
from runner.formats.mindspore_proto import message
from tests.test_mindspore_formats import ckpt_bytes

W = np.arange(32, dtype=np.float32).reshape(8, 4)
B = np.arange(8, dtype=np.float32) - 3


def job(tmp: Path, **keys) -> Path:
    path = tmp / "job.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
    return path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--no-progress"] if args[0] == "run" else list(args))
    got = capsys.readouterr()
    return code, got.out, got.err


def tp2_strategy(folder: Path, dtype: str = "F32") -> Path:
    """A native 2-rank tensor-parallel strategy for W and B, written by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {"w": {"shape": [8, 4], "dtype": dtype, "stage": 0, "dev_matrix": [2], "tensor_map": [0, -1]},
              "b": {"shape": [8], "dtype": dtype, "stage": 0, "dev_matrix": [2], "tensor_map": [0]}}
    for r in (0, 1):
        (folder / f"ckpt_strategy_rank_{r}.json").write_text(json.dumps(
            {"format": "autotrans-strategy", "version": 1, "rank": r, "stages": [[0, 1]], "params": params}))
    return folder


def ckpt_tensors(path: Path) -> dict[str, np.ndarray]:
    """A MindSpore .ckpt read by protobuf itself (float32 tensors)."""
    c = message("Checkpoint")()
    c.ParseFromString(path.read_bytes())
    return {v.tag: np.frombuffer(v.tensor.tensor_content, np.float32).reshape(list(v.tensor.dims)) for v in c.value}


# -- item 3: load_ckpt_format and the output format of a .ckpt source ---------------------
def test_ckpt_source_without_output_format_stays_ckpt(tmp_path: Path, capsys) -> None:
    (tmp_path / "full.ckpt").write_bytes(ckpt_bytes([("w", W, None), ("b", B, None)]))
    cfg = job(tmp_path, load_checkpoint=str(tmp_path / "full.ckpt"),
              dst_strategy_path_or_dir=str(tp2_strategy(tmp_path / "strategy")), output_dir=str(tmp_path / "out"))
    code, _, err = cli(capsys, "run", str(cfg))
    assert code == 0, err
    out = tmp_path / "out" / "transformed_checkpoint"
    assert sorted(p.name for p in out.rglob("checkpoint_*")) == ["checkpoint_0.ckpt", "checkpoint_1.ckpt"]
    got = ckpt_tensors(out / "rank_1" / "checkpoint_1.ckpt")
    assert np.array_equal(got["w"], W[4:]) and np.array_equal(got["b"], B[4:])


def test_check_only_on_a_ckpt_source_reports_no_format_change(tmp_path: Path, capsys) -> None:
    """auto_trans_ckpt: false on a .ckpt that already has the layout: it matches."""
    (tmp_path / "full.ckpt").write_bytes(ckpt_bytes([("w", W, None), ("b", B, None)]))
    cfg = job(tmp_path, load_checkpoint=str(tmp_path / "full.ckpt"), use_parallel=False, auto_trans_ckpt=False,
              output_dir=str(tmp_path / "out"))
    code, _, err = cli(capsys, "run", str(cfg))
    assert code == 0, err
    assert "already matches" in err and "format" not in err
    assert not (tmp_path / "out").exists()


def test_load_ckpt_format_picks_the_files_mindspore_transformers_reads(tmp_path: Path, capsys) -> None:
    """A rank folder holding both formats: load_ckpt_format chooses, and the output keeps it."""
    rank = tmp_path / "ckpt" / "rank_0"
    rank.mkdir(parents=True)
    save_file({"w": W, "b": B}, str(rank / "llama-9_1.safetensors"))
    (rank / "llama-10_1.ckpt").write_bytes(ckpt_bytes([("w", W + 1, None), ("b", B + 1, None)]))
    cfg = job(tmp_path, load_checkpoint=str(tmp_path / "ckpt"), load_ckpt_format="safetensors", use_parallel=False,
              dtype="fp16", output_dir=str(tmp_path / "out"))
    code, _, err = cli(capsys, "run", str(cfg))
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors"))
    assert np.array_equal(got["w"], W.astype(np.float16))  # the .safetensors file, not the newer .ckpt


def test_load_ckpt_format_the_source_lacks_names_the_key(tmp_path: Path, capsys) -> None:
    save_file({"w": W}, str(tmp_path / "full.safetensors"))
    cfg = job(tmp_path, load_checkpoint=str(tmp_path / "full.safetensors"), load_ckpt_format="ckpt", use_parallel=False,
              output_dir=str(tmp_path / "out"))
    code, _, err = cli(capsys, "run", str(cfg))
    assert code == 2
    assert err.splitlines() == [f"autotrans: error: config key load_ckpt_format: ckpt, but load_checkpoint "
                                f"{tmp_path / 'full.safetensors'} holds .safetensors files; set it to the source's format or leave it out"]


# -- item 8: one exit-code rule (2: bad config or usage, 1: bad or missing input) ----------
@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    from tests.convert_util import make_hf

    return make_hf(tmp_path_factory.mktemp("hf") / "llama", "llama")  # 8 heads, 4 query groups


@pytest.mark.parametrize("command, keys", [
    ("run", {"model": {"arch": "llama"}}),                       # a reshard of the HF weights
    ("run", {"output_format": "megatron"}),                      # a conversion
    ("plan", {"model": {"arch": "llama"}}),
    ("run", {"model": {"arch": "llama"}, "lora": {"adapter": "{adapter}"}}),  # a LoRA merge
])
def test_tensor_parallel_that_does_not_divide_is_exit_2_in_every_job(hf_llama: Path, tmp_path: Path, capsys, command, keys) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{q}.lora_A.weight": np.ones((2, 64), np.float32), f"{q}.lora_B.weight": np.ones((64, 2), np.float32)},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    keys = json.loads(json.dumps(keys).replace("{adapter}", str(adapter)))
    cfg = job(tmp_path, load_checkpoint=str(hf_llama), parallel_config={"model_parallel": 3},
              output_dir=str(tmp_path / "out"), **keys)
    code, _, err = cli(capsys, command, str(cfg))
    assert code == 2, err
    assert "model_parallel" in err and "3" in err and len(err.splitlines()) == 1


def test_tensor_parallel_that_does_not_divide_is_exit_2_in_a_dry_run(tmp_path: Path, capsys) -> None:
    mc = {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "n_kv_heads": 2, "intermediate_size": 64, "vocab_size": 64}
    cfg = job(tmp_path, model={"arch": "llama", "model_config": mc}, parallel_config={"model_parallel": 4},
              output_dir=str(tmp_path / "out"))
    code, _, err = cli(capsys, "strategy", str(cfg))
    assert code == 2 and "n_kv_heads = 2 is not divisible by parallel_config.model_parallel = 4" in err


@pytest.mark.parametrize("keys, phrase", [
    ({"load_checkpoint": "{t}/nope", "use_parallel": False}, "load_checkpoint {t}/nope does not exist"),
    ({"load_checkpoint": "{t}/nope", "output_format": "megatron"}, "load_checkpoint {t}/nope does not exist"),
    ({"load_checkpoint": "{t}/w.safetensors", "use_parallel": False, "lora": {"adapter": "{t}/no_adapter"}},
     "lora.adapter {t}/no_adapter does not exist"),
    ({"preprocess_data": {"input": "{t}/nope.jsonl", "tokenizer": "{t}/tok.json", "output_prefix": "{t}/ds"}},
     "preprocess_data.input: no such file: {t}/nope.jsonl"),
])
def test_missing_input_is_exit_1_in_every_job(tmp_path: Path, capsys, keys: dict, phrase: str) -> None:
    save_file({"w": W}, str(tmp_path / "w.safetensors"))
    (tmp_path / "tok.json").write_text("{}")
    cfg = job(tmp_path, output_dir=str(tmp_path / "out"), **json.loads(json.dumps(keys).replace("{t}", str(tmp_path))))
    code, _, err = cli(capsys, "run", str(cfg))
    assert code == 1, err
    assert err.splitlines() == [f"autotrans: error: {phrase.format(t=tmp_path)}"]


# -- item 7: messages that name the right thing ---------------------------------------------
@pytest.fixture
def dist(tmp_path: Path) -> Path:
    """tmp/ckpt/rank_{0,1} (W and B split in two on dim 0) and tmp/strategy beside it."""
    for r in (0, 1):
        (tmp_path / "ckpt" / f"rank_{r}").mkdir(parents=True)
        save_file({"w": W[4 * r:4 * r + 4], "b": B[4 * r:4 * r + 4]}, str(tmp_path / "ckpt" / f"rank_{r}" / f"ckpt_{r}.safetensors"))
    tp2_strategy(tmp_path / "strategy")
    return tmp_path


def merge(tmp: Path, **keys) -> Path:
    return job(tmp, **{"load_checkpoint": str(tmp / "ckpt"), "src_strategy_path_or_dir": str(tmp / "strategy"),
                       "use_parallel": False, "output_dir": str(tmp / "out"), **keys})


def error_line(capsys, *args: str, code: int = 1) -> str:
    got, _, err = cli(capsys, *args)
    assert got == code, err
    assert len(err.splitlines()) == 1 and err.startswith("autotrans: error: "), err
    return err.strip()[len("autotrans: error: "):]


def test_a_missing_last_rank_folder_is_named_not_blamed_on_the_strategy(dist: Path, capsys) -> None:
    for p in (dist / "ckpt" / "rank_1").iterdir():
        p.unlink()
    (dist / "ckpt" / "rank_1").rmdir()
    assert error_line(capsys, "run", str(merge(dist))) == (
        "the source checkpoint lacks rank folder(s) rank_1: its strategy has 2 ranks, the checkpoint 1; copy in the missing ones")


def test_verify_names_the_checkpoint_that_is_missing(dist: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(dist)
    assert error_line(capsys, "verify", "ckpt", "nowhere") == (
        f"verify: checkpoint B, nowhere (relative to the current folder {dist}), does not exist")


def test_relative_paths_say_what_they_are_relative_to(dist: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(dist)
    assert error_line(capsys, "run", str(merge(dist, load_checkpoint="nope"))) == (
        f"load_checkpoint nope (relative to the current folder {dist}) does not exist")
    assert error_line(capsys, "run", "missing.yaml", code=2) == (
        f"job file missing.yaml (relative to the current folder {dist}) does not exist")
    assert error_line(capsys, "run", str(merge(dist, load_checkpoint=str(dist / "abs")))) == f"load_checkpoint {dist}/abs does not exist"


def test_inspect_a_dataset_file_says_what_it_is(tmp_path: Path, capsys) -> None:
    import struct

    # Megatron's .idx header: magic, version, dtype code (4: int32), sequence count, document count + 1
    (tmp_path / "ds_text_document.idx").write_bytes(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 5, 6))
    (tmp_path / "ds_text_document.bin").write_bytes(bytes(40))
    code, out, err = cli(capsys, "inspect", str(tmp_path / "ds_text_document.bin"))
    assert code == 0, err
    assert out.strip() == (f"Megatron indexed dataset {tmp_path}/ds_text_document.bin + ds_text_document.idx "
                           "(version 1, int32 tokens, 5 sequences, 5 documents); not a checkpoint")


def test_diff_given_checkpoints_says_to_use_verify(dist: Path, capsys) -> None:
    line = error_line(capsys, "diff", str(dist / "ckpt"), str(dist / "strategy"), code=2)
    assert line == (f"{dist}/ckpt is not a strategy file or folder (its strategy may be {dist}/strategy): "
                    "autotrans diff compares layouts; compare checkpoints tensor by tensor with autotrans verify A B")


def test_loose_per_rank_files_hint_rank_folders(dist: Path, capsys) -> None:
    (dist / "loose").mkdir()
    for r in (0, 1):
        (dist / "ckpt" / f"rank_{r}" / f"ckpt_{r}.safetensors").rename(dist / "loose" / f"ckpt_{r}.safetensors")
    line = error_line(capsys, "run", str(merge(dist, load_checkpoint=str(dist / "loose"))))
    assert line.endswith("loose files are parts of one checkpoint; put per-rank files in rank_0/ ... rank_N/ folders")


def test_inspect_knows_a_mindspore_strategy_by_its_content(dist: Path, capsys) -> None:
    """A merged strategy renamed as users do (strategy_8_npus.ckpt) is still a strategy."""
    code, _, err = cli(capsys, "strategy", str(job(dist, dst_strategy_path_or_dir=str(dist / "strategy"),
                                                   strategy_format="mindspore", output_dir=str(dist / "ms"))))
    assert code == 0, err
    renamed = dist / "strategy_8_npus.ckpt"
    (dist / "ms" / "strategy" / "ckpt_strategy_rank_0.ckpt").rename(renamed)
    code, out, err = cli(capsys, "inspect", str(renamed))
    assert code == 0, err
    assert out.splitlines()[0] == "strategy (mindspore): 2 ranks in 1 stage(s): [[0, 1]]"
    assert "  w: shape [-1, -1] ? stage [0] dev_matrix [2] tensor_map [0, -1]" in out.splitlines()


def test_inspect_shows_the_layouts_of_a_strategy_folder_beside_the_checkpoint(dist: Path, capsys) -> None:
    code, out, err = cli(capsys, "inspect", str(dist / "ckpt"))
    assert code == 0, err
    lines = out.splitlines()
    assert f"layouts, from the strategy beside it ({dist}/strategy):" in lines
    assert "  w: shape [8, 4] F32 stage [0] dev_matrix [2] tensor_map [0, -1]" in lines


def test_a_typo_inside_parallel_config_is_warned(dist: Path, capsys) -> None:
    cfg = job(dist, dst_strategy_path_or_dir=str(dist / "strategy"), output_dir=str(dist / "out"),
              parallel_config={"model_paralel": 2, "micro_batch_num": 4, "use_seq_parallel": True})
    code, _, err = cli(capsys, "strategy", str(cfg))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == ["autotrans: warning: config key parallel_config.model_paralel is not one the runner reads and is "
                        "ignored; did you mean parallel_config.model_parallel?"]


def test_the_error_comes_before_the_warnings_that_led_to_it(dist: Path, capsys) -> None:
    cfg = merge(dist, load_checkpoint=str(dist / "nope"), parallel_config={"model_paralel": 2})
    code, _, err = cli(capsys, "run", str(cfg))
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == f"autotrans: error: load_checkpoint {dist}/nope does not exist"
    assert lines[1].startswith("autotrans: warning: config key parallel_config.model_paralel") and len(lines) == 2


def test_sizes_from_config_json_are_named_as_config_json(hf_llama: Path, tmp_path: Path, capsys) -> None:
    cfg = job(tmp_path, load_checkpoint=str(hf_llama), model={"arch": "llama"}, parallel_config={"model_parallel": 16},
              output_dir=str(tmp_path / "out"))
    assert error_line(capsys, "run", str(cfg), code=2) == (
        f"{hf_llama}/config.json's num_attention_heads = 8 is not divisible by parallel_config.model_parallel = 16; "
        "choose a model_parallel that divides it")


@pytest.mark.parametrize("keys", [{"model": {"arch": "llama"}}, {"output_format": "megatron"}])
def test_a_vocab_size_that_disagrees_with_config_json_is_an_error(hf_llama: Path, tmp_path: Path, capsys, keys: dict) -> None:
    model = {**keys.get("model", {}), "model_config": {"vocab_size": 512}}
    cfg = job(tmp_path, load_checkpoint=str(hf_llama), output_dir=str(tmp_path / "out"), **{**keys, "model": model})
    assert error_line(capsys, "run", str(cfg), code=2) == (
        f"model.model_config.vocab_size = 512 disagrees with {hf_llama}/config.json's vocab_size = 300; "
        "the HF folder gives the sizes: leave it out or give the right one")
    assert not (tmp_path / "out" / "transformed_checkpoint").exists()


def test_a_vocab_size_that_disagrees_with_the_checkpoint_is_an_error(hf_llama: Path, tmp_path: Path, capsys) -> None:
    mc = {"num_layers": 4, "hidden_size": 64, "num_heads": 8, "n_kv_heads": 4, "intermediate_size": 96}
    for vocab in (512, 200):  # larger, and smaller (not a padding: HF names)
        cfg = job(tmp_path, load_checkpoint=str(hf_llama / "model.safetensors"), output_dir=str(tmp_path / "out"),
                  model={"arch": "llama", "model_config": {**mc, "vocab_size": vocab}}, parallel_config={"model_parallel": 2})
        assert error_line(capsys, "run", str(cfg), code=2) == (
            f"parameter model.embed_tokens.weight: the checkpoint holds shape [300, 64], but model_config gives [{vocab}, 64]; "
            "check model.model_config")


# -- items 10 and 11 ---------------------------------------------------------------------------
def test_iteration_release_writes_megatron_release_folder(hf_llama: Path, tmp_path: Path, capsys) -> None:
    import torch
    from safetensors.torch import load_file as load_torch

    cfg = job(tmp_path, load_checkpoint=str(hf_llama), output_format="megatron", iteration="release",
              parallel_config={"model_parallel": 2}, output_dir=str(tmp_path / "m"))
    code, _, err = cli(capsys, "run", str(cfg))
    assert code == 0, err
    out = tmp_path / "m" / "transformed_checkpoint"
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert sorted(p.parent.name for p in (out / "release").glob("mp_rank_*/model_optim_rng.pt")) == ["mp_rank_00", "mp_rank_01"]
    head = torch.load(out / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    assert head["iteration"] == 0 and head["args"].iteration == 0  # Megatron loads a release checkpoint as iteration 0
    back = job(tmp_path, load_checkpoint=str(out), output_format="hf", reference_hf_dir=str(hf_llama), output_dir=str(tmp_path / "h"))
    code, _, err = cli(capsys, "run", str(back))
    assert code == 0, err
    got = load_torch(str(tmp_path / "h" / "transformed_checkpoint" / "model-00001-of-00001.safetensors"))
    want = load_torch(str(hf_llama / "model.safetensors"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_iteration_other_words_are_config_errors(tmp_path: Path, capsys) -> None:
    assert error_line(capsys, "run", str(job(tmp_path, load_checkpoint="x", iteration="latest")), code=2) == (
        "config key iteration: expected a number >= 0 or 'release', got 'latest'")


def test_plan_from_native_strategies_before_the_checkpoint_exists(dist: Path, capsys) -> None:
    cfg = merge(dist, load_checkpoint=str(dist / "not_yet"))
    code, out, err = cli(capsys, "plan", str(cfg), "--json")
    assert code == 0, err
    assert err.splitlines() == [f"autotrans: warning: load_checkpoint {dist}/not_yet does not exist yet: planned from the strategies alone"]
    assert json.loads(out)["total"]["write_bytes"] == W.nbytes + B.nbytes


@pytest.fixture(scope="module")
def hf_qwen2(tmp_path_factory) -> Path:
    from tests.convert_util import make_hf

    return make_hf(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2")  # hidden 64, like the Llama above


def q_proj_adapter(folder: Path, trained_on: str) -> Path:
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    folder.mkdir()
    save_file({f"{q}.lora_A.weight": np.full((2, 64), 0.5, np.float32), f"{q}.lora_B.weight": np.full((64, 2), 0.25, np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "base_model_name_or_path": trained_on}))
    return folder


@pytest.mark.parametrize("trained_on, why", [
    ("meta-llama/Llama-3.2-1B", " (base_model_name_or_path), a llama model, but load_checkpoint {base} is a qwen2 model"),
    ("{llama}", ", whose model_type is 'llama', but load_checkpoint {base} has 'qwen2'"),
])
def test_an_adapter_trained_on_another_model_is_refused(hf_qwen2: Path, hf_llama: Path, tmp_path: Path, capsys,
                                                        trained_on: str, why: str) -> None:
    """The shapes fit (q_proj is [64, 64] in both): only the adapter's config tells."""
    named = trained_on.format(llama=hf_llama)
    adapter = q_proj_adapter(tmp_path / "adapter", named)
    cfg = job(tmp_path, load_checkpoint=str(hf_qwen2), use_parallel=False, lora={"adapter": str(adapter)},
              output_dir=str(tmp_path / "out"))
    assert error_line(capsys, "run", str(cfg)) == (
        f"adapter {adapter} was trained on {named}" + why.format(base=hf_qwen2) + "; merge an adapter trained on this model")
    assert not (tmp_path / "out" / "transformed_checkpoint").exists()


def test_an_adapter_trained_on_the_base_family_merges(hf_qwen2: Path, tmp_path: Path, capsys) -> None:
    adapter = q_proj_adapter(tmp_path / "adapter", "Qwen/Qwen2-0.5B")
    cfg = job(tmp_path, load_checkpoint=str(hf_qwen2), use_parallel=False, lora={"adapter": str(adapter)},
              output_dir=str(tmp_path / "out"))
    code, _, err = cli(capsys, "run", str(cfg))
    assert code == 0, err


def test_fp32_merge_and_peft_merge_and_unload_agree_within_fp32_rounding(tmp_path: Path, capsys, monkeypatch) -> None:
    """The relation the README states: ours sums B @ A over the rank in a fixed order,
    PEFT's merge_and_unload in BLAS order; both are within the fp32 error bound of a
    dot product of the exact (float64) merge, and weights without LoRA are bit-identical."""
    import peft
    import torch
    from safetensors.torch import load_file as load_torch

    from tests.test_lora import peft_case, tiny_llama

    r, alpha = 8, 16
    want = peft_case(tmp_path, tiny_llama(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "o_proj", "down_proj"]))
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "run", str(job(tmp_path, load_checkpoint="base_hf", use_parallel=False,
                                                  lora={"adapter": "adapter"}, output_dir="out")))
    assert code == 0, err
    got = load_torch("out/transformed_checkpoint/rank_0/checkpoint_0.safetensors")
    base, adapter = load_torch("base.safetensors"), load_torch("adapter/adapter_model.safetensors")
    merged = 0
    for name, w in base.items():
        a_name = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        if a_name not in adapter:
            assert torch.equal(got[name], want[name]) and torch.equal(got[name], w), name
            continue
        merged += 1
        a, b = adapter[a_name].double(), adapter[a_name.replace("lora_A", "lora_B")].double()
        s = alpha / r
        exact = w.double() + s * (b @ a)
        bound = (r + 2) * 2.0 ** -24 * (w.double().abs() + s * (b.abs() @ a.abs()))
        assert bool(((got[name].double() - exact).abs() <= bound).all()), name
        assert bool(((want[name].double() - exact).abs() <= bound).all()), name
    assert merged == 6  # q_proj, o_proj, down_proj in both layers


# -- item 6: output_dir/strategy belongs to the job ---------------------------------------
def native_strategy(folder: Path, tp: int, pp: int) -> Path:
    """A native strategy of tp * pp ranks, written by hand: w on stage 0, b on the last."""
    folder.mkdir(parents=True, exist_ok=True)
    stages = [list(range(s * tp, (s + 1) * tp)) for s in range(pp)]
    params = {"w": {"shape": [8, 4], "dtype": "F32", "stage": 0, "dev_matrix": [tp], "tensor_map": [0, -1]},
              "b": {"shape": [8], "dtype": "F32", "stage": pp - 1, "dev_matrix": [tp], "tensor_map": [0]}}
    for r in range(tp * pp):
        (folder / f"ckpt_strategy_rank_{r}.json").write_text(json.dumps(
            {"format": "autotrans-strategy", "version": 1, "rank": r, "stages": stages, "params": params}))
    return folder


def dry_run(tmp: Path, capsys, **keys) -> tuple[int, str]:
    code, _, err = cli(capsys, "strategy", str(job(tmp, output_dir=str(tmp / "out"), **keys)))
    return code, err


def listing(tmp: Path) -> list[str]:
    return sorted(p.name for p in (tmp / "out" / "strategy").iterdir())


def test_a_smaller_job_leaves_only_its_own_strategy_files(tmp_path: Path, capsys) -> None:
    code, err = dry_run(tmp_path, capsys, dst_strategy_path_or_dir=str(native_strategy(tmp_path / "s8", 4, 2)))
    assert code == 0, err
    assert listing(tmp_path) == [f"ckpt_strategy_rank_{r}.json" for r in range(8)] + ["merged_ckpt_strategy.json"]
    code, err = dry_run(tmp_path, capsys, dst_strategy_path_or_dir=str(native_strategy(tmp_path / "s4", 4, 1)))
    assert code == 0, err
    assert listing(tmp_path) == [f"ckpt_strategy_rank_{r}.json" for r in range(4)]
    code, out, err = cli(capsys, "inspect", str(tmp_path / "out" / "strategy"))
    assert code == 0, err
    assert out.splitlines()[0].startswith("strategy (native): 4 ranks in 1 stage(s)")


def test_json_then_mindspore_format_leaves_only_ckpt_files(tmp_path: Path, capsys) -> None:
    s = str(native_strategy(tmp_path / "s", 2, 1))
    assert dry_run(tmp_path, capsys, dst_strategy_path_or_dir=s)[0] == 0
    code, err = dry_run(tmp_path, capsys, dst_strategy_path_or_dir=s, strategy_format="mindspore")
    assert code == 0, err
    assert listing(tmp_path) == ["ckpt_strategy_rank_0.ckpt", "ckpt_strategy_rank_1.ckpt"]


def test_a_users_file_in_the_strategy_folder_is_kept_and_refused(tmp_path: Path, capsys) -> None:
    s4 = str(native_strategy(tmp_path / "s4", 4, 1))
    assert dry_run(tmp_path, capsys, dst_strategy_path_or_dir=s4)[0] == 0
    mine = tmp_path / "out" / "strategy" / "notes.txt"
    mine.write_text("mine")
    code, err = dry_run(tmp_path, capsys, dst_strategy_path_or_dir=str(native_strategy(tmp_path / "s2", 2, 1)))
    assert code == 1
    assert err.strip().splitlines() == [f"autotrans: error: {mine.parent} holds files autotrans did not write "
                                        "(notes.txt); move them away or choose another output_dir"]
    assert mine.read_text() == "mine"
    assert listing(tmp_path) == [f"ckpt_strategy_rank_{r}.json" for r in range(4)] + ["notes.txt"]


def test_files_of_an_unrecorded_earlier_run_are_not_removed(tmp_path: Path, capsys) -> None:
    """Strategy files the runner has no record of (written by hand, or before it kept one)
    are someone's: the job refuses and names at most three of them."""
    native_strategy(tmp_path / "out" / "strategy", 4, 1)
    code, err = dry_run(tmp_path, capsys, dst_strategy_path_or_dir=str(native_strategy(tmp_path / "s", 1, 1)))
    assert code == 1
    assert err.strip().endswith("(ckpt_strategy_rank_0.json, ckpt_strategy_rank_1.json, ckpt_strategy_rank_2.json, ...); "
                                "move them away or choose another output_dir")
    assert listing(tmp_path) == [f"ckpt_strategy_rank_{r}.json" for r in range(4)]


def test_a_strategy_record_that_is_not_the_runners_vouches_for_nothing(tmp_path: Path, capsys) -> None:
    """A hand-written strategy file under a name the job writes is kept and refused when
    the record beside the folder does not parse as the runner's own."""
    native_strategy(tmp_path / "out" / "strategy", 1, 1)
    before = (tmp_path / "out" / "strategy" / "ckpt_strategy_rank_0.json").read_bytes()
    (tmp_path / "out" / ".autotrans-strategy-record.json").write_text('{"files": ["ckpt_strategy_rank_0.json"]}')
    code, err = dry_run(tmp_path, capsys, dst_strategy_path_or_dir=str(native_strategy(tmp_path / "s", 1, 1)))
    assert code == 1
    assert err.strip().splitlines()[-1].endswith("(ckpt_strategy_rank_0.json); move them away or choose another output_dir")
    assert (tmp_path / "out" / "strategy" / "ckpt_strategy_rank_0.json").read_bytes() == before


def test_a_recorded_name_replaced_by_a_symlink_is_not_followed(tmp_path: Path, capsys) -> None:
    s4 = str(native_strategy(tmp_path / "s4", 4, 1))
    assert dry_run(tmp_path, capsys, dst_strategy_path_or_dir=s4)[0] == 0
    target = tmp_path / "precious.json"
    target.write_text("keep")
    link = tmp_path / "out" / "strategy" / "ckpt_strategy_rank_3.json"
    link.unlink()
    link.symlink_to(target)
    code, err = dry_run(tmp_path, capsys, dst_strategy_path_or_dir=str(native_strategy(tmp_path / "s2", 2, 1)))
    assert code == 1, err
    assert "(ckpt_strategy_rank_3.json)" in err
    assert target.read_text() == "keep" and link.is_symlink()


# -- items 4 and 9: what verify compared; summaries ---------------------------------------------
def full_w_b(tmp: Path) -> Path:
    save_file({"w": W, "b": B}, str(tmp / "full.safetensors"))
    return tmp / "full.safetensors"


def test_verify_after_a_cast_says_what_it_compared(tmp_path: Path, capsys) -> None:
    src = full_w_b(tmp_path)
    cfg = job(tmp_path, load_checkpoint=str(src), dst_strategy_path_or_dir=str(tp2_strategy(tmp_path / "s16", "F16")),
              dtype="fp16", verify=True,
              output_dir=str(tmp_path / "cast"))
    code, out, err = cli(capsys, "run", str(cfg))
    assert code == 0, err
    assert "autotrans: verify: source and output are equal after casting the source to fp16" in out
    assert "bit-identical" not in out
    got = load_file(str(tmp_path / "cast/transformed_checkpoint/rank_1/checkpoint_1.safetensors"))
    assert got["w"].dtype == np.float16 and np.array_equal(got["w"], W[4:].astype(np.float16))
    plain = job(tmp_path, load_checkpoint=str(src), dst_strategy_path_or_dir=str(tp2_strategy(tmp_path / "s")), verify=True,
                output_dir=str(tmp_path / "plain"))
    code, out, err = cli(capsys, "run", str(plain))
    assert code == 0, err
    assert "autotrans: verify: source and output are bit-identical" in out


def test_a_cast_writes_a_strategy_of_the_cast_dtype(tmp_path: Path, capsys) -> None:
    """A hand-written F32 destination strategy with dtype: fp16: the files are F16, and
    the strategy written beside them says F16 too, so verify (and any loader) agrees."""
    src = full_w_b(tmp_path)
    cfg = job(tmp_path, load_checkpoint=str(src), dst_strategy_path_or_dir=str(tp2_strategy(tmp_path / "s32")),
              dtype="fp16", verify=True, output_dir=str(tmp_path / "out"))
    code, out, err = cli(capsys, "run", str(cfg))
    assert code == 0, err
    assert "equal after casting the source to fp16" in out
    for r in (0, 1):
        written = json.loads((tmp_path / f"out/strategy/ckpt_strategy_rank_{r}.json").read_text())
        got = load_file(str(tmp_path / f"out/transformed_checkpoint/rank_{r}/checkpoint_{r}.safetensors"))
        assert {n: p["dtype"] for n, p in written["params"].items()} == {"w": "F16", "b": "F16"}
        assert {n: a.dtype for n, a in got.items()} == {"w": np.float16, "b": np.float16}
    save_file({"w": W.astype(np.float16), "b": B.astype(np.float16)}, str(tmp_path / "f16.safetensors"))
    code, out, err = cli(capsys, "verify", str(tmp_path / "f16.safetensors"), str(tmp_path / "out/transformed_checkpoint"))
    assert code == 0, out + err  # reassembled with out/strategy, as it says


def test_a_conversion_summary_gives_gb_per_second(hf_llama: Path, tmp_path: Path, capsys) -> None:
    cfg = job(tmp_path, load_checkpoint=str(hf_llama), output_format="megatron", output_dir=str(tmp_path / "m"))
    code, _, err = cli(capsys, "run", str(cfg))
    assert code == 0, err
    assert re.search(r"autotrans: done: \d+ files?, \d+\.\d{3} GB in \d+\.\d\d s \(\d+\.\d\d GB/s\) -> ", err), err


def test_the_progress_bar_counts_in_the_summarys_decimal_units(capsys) -> None:
    """The bar and the summary use one unit system: 2,500,000 bytes are 2.50 MB in both
    (the summary prints bytes / 1e9 GB), not 2.38 binary megabytes."""
    from runner.progress import Progress

    with Progress(2_500_000, tty_only=False) as bar:
        bar.update(2_500_000)
    err = capsys.readouterr().err
    assert "2.50M/2.50M" in err and "2.38M" not in err, err


def test_a_one_file_job_says_1_file(tmp_path: Path, capsys) -> None:
    one = tmp_path / "one"
    one.mkdir()
    params = {"w": {"shape": [8, 4], "dtype": "F32", "stage": 0, "dev_matrix": [1], "tensor_map": [-1, -1]},
              "b": {"shape": [8], "dtype": "F32", "stage": 0, "dev_matrix": [1], "tensor_map": [-1]}}
    (one / "ckpt_strategy_rank_0.json").write_text(json.dumps(
        {"format": "autotrans-strategy", "version": 1, "rank": 0, "stages": [[0]], "params": params}))
    src = tmp_path / "tp2"
    (src / "rank_0").mkdir(parents=True)
    (src / "rank_1").mkdir()
    for r in (0, 1):
        save_file({"w": W[4 * r:4 * r + 4], "b": B[4 * r:4 * r + 4]}, str(src / f"rank_{r}/checkpoint_{r}.safetensors"))
    cfg = job(tmp_path, load_checkpoint=str(src), src_strategy_path_or_dir=str(tp2_strategy(tmp_path / "s")),
              dst_strategy_path_or_dir=str(one), output_dir=str(tmp_path / "out"))
    code, _, err = cli(capsys, "run", str(cfg))
    assert code == 0, err
    written = [p for p in (tmp_path / "out/transformed_checkpoint").rglob("*.safetensors")]
    assert len(written) == 1 and "autotrans: done: 1 file, " in err, err
    assert np.array_equal(load_file(str(written[0]))["w"], W)


def test_a_resumed_run_says_how_many_files_it_kept(tmp_path: Path, capsys) -> None:
    cfg = job(tmp_path, load_checkpoint=str(full_w_b(tmp_path)), dst_strategy_path_or_dir=str(tp2_strategy(tmp_path / "s")),
              output_dir=str(tmp_path / "out"))
    code, _, err = cli(capsys, "run", str(cfg))
    assert code == 0 and "kept" not in err, err
    out = tmp_path / "out/transformed_checkpoint"
    first = out / "rank_0/checkpoint_0.safetensors"
    before = first.stat()
    (out / "autotrans.json").unlink()  # as after a kill: no manifest, one file not yet written
    (out / "rank_1/checkpoint_1.safetensors").unlink()
    code, _, err = cli(capsys, "run", str(cfg))
    assert code == 0, err
    assert "autotrans: done: 2 files, " in err and ", kept 1 file an earlier run proved complete -> " in err, err
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert np.array_equal(load_file(str(out / "rank_1/checkpoint_1.safetensors"))["w"], W[4:])
