"""Dataset preprocessing (SPEC 8). Oracles: tokenizers and sentencepiece models trained here
(nothing downloaded), tokenizing directly, and megatron-core's own IndexedDataset (reader)
and IndexedDatasetBuilder (writer)."""

from __future__ import annotations

import json
import os
import re
import random
import shutil
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from runner import preprocess
from runner.errors import ConfigError, FormatError
from runner.preprocess import token_dtype, run_preprocess, validate_section

REPO = Path(__file__).resolve().parents[1]
_WORDS = ["model", "token", "layer", "shard", "tensor", "pipeline", "data", "rank", "mesh", "grad", "λόγος", "数据", "模型", "训练", "并行"]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) + rng.choice(["", "s", ",", ".", "!"]) for _ in range(words))


def _corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [_text(rng, rng.randint(1, 40)) for _ in range(n)]


@pytest.fixture(scope="module")
def megatron():
    """megatron-core's reader and writer (the test extra), imported once: it takes seconds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no TransformerEngine / Apex here: irrelevant to datasets
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A BPE tokenizer.json trained here, with tokenizer_config.json naming its eos token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_corpus(500), trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<eos>"], show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<eos>"}}))
    return SimpleNamespace(path=folder / "tokenizer.json", encode=lambda t: tok.encode(t, add_special_tokens=False).ids,
                           eos=tok.token_to_id("<eos>"), vocab_size=tok.get_vocab_size())


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    """A unigram sentencepiece tokenizer.model trained here."""
    import sentencepiece

    prefix = tmp_path_factory.mktemp("sp") / "tokenizer"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(500)), model_prefix=str(prefix), vocab_size=50, character_coverage=1.0, minloglevel=2
    )
    proc = sentencepiece.SentencePieceProcessor(model_file=str(prefix) + ".model")
    return SimpleNamespace(path=Path(str(prefix) + ".model"), encode=proc.encode_as_ids, eos=proc.eos_id())


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """A WordLevel tokenizer.json with 70,000 words: ids need int32."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    lines = (" ".join(f"w{i}" for i in range(j, j + 1000)) for j in range(0, 70_000, 1000))
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(vocab_size=80_000, special_tokens=["<unk>"], show_progress=False))
    path = tmp_path_factory.mktemp("wordlevel") / "tokenizer.json"
    tok.save(str(path))
    return SimpleNamespace(path=path, encode=lambda t: tok.encode(t, add_special_tokens=False).ids, eos=None, vocab_size=tok.get_vocab_size())


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _run(**section) -> dict:
    return run_preprocess(validate_section(section), show_progress=False)


def _expected(encode, value, eod=None) -> tuple[list[int], list[int]]:
    """Megatron's preprocess_data.py, written out: (document tokens, sequence lengths)."""
    sentences = [value] if isinstance(value, str) else value
    seqs = [ids for ids in map(encode, sentences) if ids]
    if seqs and eod is not None:
        seqs[-1] = seqs[-1] + [eod]
    return [t for s in seqs for t in s], [len(s) for s in seqs]


def _read_back(megatron, prefix) -> tuple[list[list[int]], list[list[int]], np.dtype]:
    """Per document, its tokens and sequence lengths, as Megatron's IndexedDataset reads them."""
    ds = megatron.IndexedDataset(str(prefix))
    bounds = ds.document_indices
    docs = [[int(t) for i in range(a, b) for t in ds[i]] for a, b in zip(bounds[:-1], bounds[1:])]
    lengths = [[int(n) for n in ds.sequence_lengths[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]
    return docs, lengths, np.dtype(ds.index.dtype)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------- reading back


def test_several_keys_read_back_by_megatron_equal_direct_tokenization(tmp_path, bpe, megatron):
    texts = _corpus(60, seed=1)
    records = [{"text": t, "title": [t[:12], "", t[-9:]] if i % 3 else t[:20], "id": i} for i, t in enumerate(texts)]
    records[5]["text"] = ""  # an empty document stays a document, with no sequence (as Megatron)
    _write_jsonl(tmp_path / "in.jsonl", records)
    summary = _run(input=str(tmp_path / "in.jsonl"), tokenizer=str(bpe.path), json_keys=["text", "title"], output_prefix=str(tmp_path / "out" / "ds"))

    assert summary["documents"] == len(records)
    for key in ("text", "title"):
        docs, lengths, dtype = _read_back(megatron, tmp_path / "out" / f"ds_{key}_document")
        expected = [_expected(bpe.encode, r[key]) for r in records]
        assert docs == [tokens for tokens, _ in expected]
        assert lengths == [lens for _, lens in expected]
        assert dtype == np.uint16
    assert summary["tokens"] == sum(len(_expected(bpe.encode, r[k])[0]) for r in records for k in ("text", "title"))


def test_sentencepiece_append_eod_read_back(tmp_path, sp, megatron):
    texts = _corpus(40, seed=2) + [""]
    _write_jsonl(tmp_path / "in.jsonl", [{"content": t} for t in texts])
    _run(input=str(tmp_path / "in.jsonl"), tokenizer=str(sp.path), json_keys="content", append_eod=True, output_prefix=str(tmp_path / "ds"))

    docs, _, dtype = _read_back(megatron, tmp_path / "ds_content_document")
    assert docs == [sp.encode(t) + [sp.eos] if t else [] for t in texts]
    assert dtype == np.uint16


def test_large_vocab_is_stored_as_int32(tmp_path, big_vocab, megatron):
    texts = ["w1 w65600 w69999", "w42 w70000 w300"]  # w70000 is unknown: <unk>
    _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    _run(input=str(tmp_path / "in.jsonl"), tokenizer=str(big_vocab.path), output_prefix=str(tmp_path / "ds"))

    docs, _, dtype = _read_back(megatron, tmp_path / "ds_text_document")
    assert dtype == np.int32
    assert docs == [big_vocab.encode(t) for t in texts]
    assert max(max(d) for d in docs) > 65535


@pytest.mark.parametrize("vocab_size", [1, 1000, 65499, 65500, 65535, 65536, 250_000])
def test_dtype_follows_megatron(vocab_size, megatron):
    assert token_dtype(vocab_size) == np.dtype(megatron.DType.optimal_dtype(vocab_size))


@pytest.mark.parametrize("tokenizer, append_eod", [("bpe", True), ("bpe", False), ("big_vocab", False)])
def test_files_equal_megatron_builder_byte_for_byte(tmp_path, request, megatron, tokenizer, append_eod):
    tok = request.getfixturevalue(tokenizer)
    rng = random.Random(3)
    if tokenizer == "big_vocab":
        values = [" ".join(f"w{rng.randrange(70_000)}" for _ in range(rng.randint(0, 30))) for _ in range(50)]
    else:
        values = [rng.choice([t, [t, "", t[:7]], [], ""]) for t in _corpus(50, seed=4)]
    _write_jsonl(tmp_path / "in.jsonl", [{"text": v} for v in values])
    _run(input=str(tmp_path / "in.jsonl"), tokenizer=str(tok.path), append_eod=append_eod, output_prefix=str(tmp_path / "ours" / "ds"))

    (tmp_path / "megatron").mkdir()
    prefix = str(tmp_path / "megatron" / "ds_text_document")
    builder = megatron.IndexedDatasetBuilder(prefix + ".bin", dtype=megatron.DType.optimal_dtype(tok.vocab_size))
    for v in values:
        tokens, lengths = _expected(tok.encode, v, tok.eos if append_eod else None)
        builder.add_document(np.array(tokens, dtype=np.int64), lengths)
    builder.finalize(prefix + ".idx")
    assert _files(tmp_path / "ours") == _files(tmp_path / "megatron")


# ---------------------------------------------------------------------------- inputs, workers


def test_glob_reads_files_in_natural_order(tmp_path, bpe, megatron):
    for n in (10, 2, 1):
        _write_jsonl(tmp_path / f"part_{n}.jsonl", [{"text": f"rank {n}"}, {"text": "data " * n}])
    _run(input=str(tmp_path / "part_*.jsonl"), tokenizer=str(bpe.path), output_prefix=str(tmp_path / "out" / "ds"))

    docs, _, _ = _read_back(megatron, tmp_path / "out" / "ds_text_document")
    assert docs == [bpe.encode(t) for n in (1, 2, 10) for t in (f"rank {n}", "data " * n)]


def test_two_workers_write_the_same_bytes_as_one(tmp_path, bpe, monkeypatch):
    monkeypatch.setattr(preprocess, "CHUNK_BYTES", 2048)  # many blocks, many in flight
    for part in range(2):
        texts = _corpus(600, seed=10 + part)
        _write_jsonl(tmp_path / f"in_{part}.jsonl", [{"text": t, "title": t[:15]} for t in texts])
    outputs = {}
    for workers in (1, 2):
        summary = _run(input=str(tmp_path / "in_*.jsonl"), tokenizer=str(bpe.path), json_keys=["text", "title"], workers=workers,
                       append_eod=True, output_prefix=str(tmp_path / f"w{workers}" / "ds"))
        assert summary["documents"] == 1200
        outputs[workers] = _files(tmp_path / f"w{workers}")
    assert len(outputs[1]) == 4
    assert outputs[1] == outputs[2]


def test_memory_stays_flat_as_the_input_grows(tmp_path, bpe, monkeypatch):
    """Streaming: the peak of Python allocations does not follow the input size, as it would
    with the index held in lists (Megatron's builder: about 50 bytes per document)."""
    monkeypatch.setattr(preprocess, "CHUNK_BYTES", 16 << 10)  # small blocks and pointer chunks:
    monkeypatch.setattr(preprocess._DatasetWriter, "_CHUNK", 1024)  # the constant part is small
    peaks = []
    for n in (1000, 10_000, 40_000):  # the first run imports what the job needs
        path = tmp_path / f"in_{n}.jsonl"
        path.write_text('{"text": "data rank"}\n' * n)
        tracemalloc.start()
        _run(input=str(path), tokenizer=str(bpe.path), output_prefix=str(tmp_path / f"out_{n}" / "ds"))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[2] < peaks[1] + 100_000  # 30,000 more documents: under 4 bytes each


# ---------------------------------------------------------------------------- bad lines, atomic output


def _bad_input(tmp_path: Path) -> Path:
    lines = [
        b'{"text": "data rank"}',
        b'{"text": "model',  # 2: invalid JSON
        b"",  # 3: blank, not a document and not an error
        b'{"title": "no text"}',  # 4: no key
        b'{"text": 7}',  # 5: not text
        b'["text"]',  # 6: not an object
        b'{"text": ["a", 1]}',  # 7: not a list of strings
        b"\xff",  # 8: not UTF-8
        b'{"text": "a \\ud800 b"}',  # 9: a lone surrogate: valid JSON, but not text
        b'{"text": "token shard"}',
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_line_fails_naming_file_and_line(tmp_path, bpe, workers):
    path = _bad_input(tmp_path)
    with pytest.raises(FormatError) as err:
        _run(input=str(path), tokenizer=str(bpe.path), workers=workers, output_prefix=str(tmp_path / "out" / "ds"))
    message = str(err.value)
    assert message.startswith(f"{path}:2: invalid JSON")
    assert "preprocess_data.on_bad_line=skip" in message and "\n" not in message
    assert list((tmp_path / "out").iterdir()) == []  # no output, no temporary file left


def test_bad_lines_skipped_and_reported_with_line_numbers(tmp_path, bpe, megatron, capsys):
    path = _bad_input(tmp_path)
    summary = _run(input=str(path), tokenizer=str(bpe.path), on_bad_line="skip", output_prefix=str(tmp_path / "ds"))

    warning = "autotrans: warning: "
    reported = [line[len(warning):] for line in capsys.readouterr().err.splitlines() if line.startswith(warning)]
    assert [m.split(": skipped")[0] for m in reported] == [f"{path}:{n}" for n in (2, 4, 5, 6, 7, 8, 9)]
    assert "no key 'text'" in reported[1] and "holds a number" in reported[2] and "got an array" in reported[3]
    assert reported[0].endswith("invalid JSON (Unterminated string starting at: column 10)")
    assert "not UTF-8 (invalid start byte at byte 1)" in reported[5] and "not valid Unicode" in reported[6]
    assert summary["skipped_lines"] == 7 and summary["documents"] == 2
    docs, _, _ = _read_back(megatron, tmp_path / "ds_text_document")
    assert docs == [bpe.encode("data rank"), bpe.encode("token shard")]


def test_missing_output_folders_are_created_and_no_temporaries_remain(tmp_path, bpe):
    _write_jsonl(tmp_path / "in.jsonl", [{"text": "data"}])
    summary = _run(input=str(tmp_path / "in.jsonl"), tokenizer=str(bpe.path), output_prefix=str(tmp_path / "a" / "b" / "c"))
    names = sorted(p.name for p in (tmp_path / "a" / "b").iterdir())
    assert names == ["c_text_document.bin", "c_text_document.idx"]
    assert sorted(Path(f).name for f in summary["files"]) == names


# ---------------------------------------------------------------------------- configuration and errors


def test_defaults_and_normalisation():
    cfg = validate_section(OmegaConf.create({"input": "a.jsonl", "tokenizer": "t.model", "output_prefix": "out/x"}))
    assert (cfg.json_keys, cfg.workers, cfg.append_eod, cfg.on_bad_line, cfg.eod_token) == (("text",), 1, False, "fail", None)
    cfg = validate_section(OmegaConf.create({"input": "a", "tokenizer": "t", "output_prefix": "o", "json_keys": ["content", "title"]}))
    assert cfg.json_keys == ("content", "title")
    assert validate_section({"input": "a", "tokenizer": "t", "output_prefix": "o", "json_keys": "key0 key1"}).json_keys == ("key0", "key1")


@pytest.mark.parametrize("change, message", [
    ({"json_key": ["text"]}, "preprocess_data.json_key: unknown key; did you mean preprocess_data.json_keys?"),
    ({"frobnicate": 1}, "preprocess_data.frobnicate: unknown key; known keys: input, json_keys,"),
    ({"workers": "2"}, "preprocess_data.workers: expected an integer >= 1 (tokenizing processes), got '2'"),
    ({"workers": True}, "preprocess_data.workers: expected an integer >= 1"),
    ({"workers": 0}, "preprocess_data.workers: expected an integer >= 1"),
    ({"append_eod": "yes"}, "preprocess_data.append_eod: expected true or false, got 'yes'"),
    ({"on_bad_line": "ignore"}, "preprocess_data.on_bad_line: expected fail or skip, got 'ignore'"),
    ({"json_keys": ["text", "text"]}, "preprocess_data.json_keys: expected a list of distinct JSON keys"),
    ({"json_keys": []}, "preprocess_data.json_keys: expected a list of distinct JSON keys"),
    ({"json_keys": ["a/b"]}, "preprocess_data.json_keys: expected a list of distinct JSON keys without '/'"),
    ({"tokenizer": None}, "preprocess_data.tokenizer: expected the path of a tokenizers tokenizer.json"),
    ({"input": None, "tokeniser": "t"}, "preprocess_data.tokeniser: unknown key; did you mean preprocess_data.tokenizer?"),
])
def test_config_errors_name_the_key(change, message):
    section = {"input": "a.jsonl", "tokenizer": "t.json", "output_prefix": "o", **change}
    with pytest.raises(ConfigError) as err:
        validate_section(section)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_missing_required_key_and_non_mapping():
    with pytest.raises(ConfigError, match=r"^preprocess_data\.output_prefix: required key is missing; expected a path prefix"):
        validate_section({"input": "a", "tokenizer": "t"})
    with pytest.raises(ConfigError, match=r"^preprocess_data: expected a mapping of keys"):
        validate_section(None)


def test_input_and_tokenizer_errors(tmp_path, bpe, sp):
    data = _write_jsonl(tmp_path / "in.jsonl", [{"text": "data"}])
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "tokenizer.json").write_text("{not json")
    (garbage / "tokenizer.model").write_bytes(b"\x00\x01not a model")
    lone = tmp_path / "lone"  # a tokenizer.json without tokenizer_config.json: no eos token known
    lone.mkdir()
    (lone / "tokenizer.json").write_bytes(bpe.path.read_bytes())
    ok = {"input": str(data), "tokenizer": str(bpe.path), "output_prefix": str(tmp_path / "out" / "ds")}
    cases = [
        (FormatError, {"input": str(tmp_path / "*.json")}, f"preprocess_data.input: no file matches {tmp_path}/*.json"),
        (FormatError, {"input": str(tmp_path / "nope.jsonl")}, f"preprocess_data.input: no such file: {tmp_path}/nope.jsonl"),
        (ConfigError, {"input": str(tmp_path)}, f"preprocess_data.input: {tmp_path} is a folder"),
        (FormatError, {"tokenizer": str(tmp_path / "t.model")}, f"preprocess_data.tokenizer: no such file: {tmp_path}/t.model"),
        (FormatError, {"tokenizer": str(garbage / "tokenizer.json")}, f"{garbage}/tokenizer.json: not a readable tokenizers tokenizer.json"),
        (FormatError, {"tokenizer": str(garbage / "tokenizer.model")}, f"{garbage}/tokenizer.model: not a readable sentencepiece model"),
        (ConfigError, {"tokenizer": str(lone), "append_eod": True}, f"preprocess_data.append_eod: {lone}/tokenizer.json names no end-of-sequence token; set preprocess_data.eod_token"),
        (ConfigError, {"append_eod": True, "eod_token": "<eot>"}, f"preprocess_data.eod_token: '<eot>' is not a token of {bpe.path}"),
        (FormatError, {"json_keys": ["text", "title"], "on_bad_line": "skip"}, f"{data}: no tokens for key 'text' in 0 documents"),
    ]
    for error, change, message in cases:
        with pytest.raises(error) as err:
            _run(**{**ok, **change})
        assert str(err.value).startswith(message), str(err.value)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_eod_token_option_and_model_folder(tmp_path, bpe, megatron):
    _write_jsonl(tmp_path / "in.jsonl", [{"text": "data rank"}])
    _run(input=str(tmp_path / "in.jsonl"), tokenizer=str(bpe.path.parent), append_eod=True, eod_token="<unk>", output_prefix=str(tmp_path / "ds"))
    docs, _, _ = _read_back(megatron, tmp_path / "ds_text_document")
    assert docs == [bpe.encode("data rank") + [0]]


# ---------------------------------------------------------------------------- example job file, start-up


def test_example_job_file_runs_with_overrides_and_environment(tmp_path, bpe, megatron, monkeypatch):
    _write_jsonl(tmp_path / "in.jsonl", [{"content": "model data", "title": "rank"}])
    monkeypatch.setenv("JSON_KEYS", "content title")
    monkeypatch.setenv("WORKERS", "2")
    job = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "preprocess.yaml"), OmegaConf.from_dotlist([
        f"preprocess_data.input={tmp_path}/in.jsonl", f"preprocess_data.tokenizer={bpe.path}", f"preprocess_data.output_prefix={tmp_path}/out/ds",
    ]))
    cfg = validate_section(job.preprocess_data)
    assert (cfg.json_keys, cfg.workers, cfg.append_eod) == (("content", "title"), 2, False)
    run_preprocess(cfg, show_progress=False)
    assert _read_back(megatron, tmp_path / "out" / "ds_title_document")[0] == [bpe.encode("rank")]


def test_import_loads_no_heavy_module():
    code = "import sys, runner.preprocess; print(sorted({'torch', 'megatron', 'tokenizers', 'sentencepiece', 'tqdm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_runs_the_example_job_and_prints_a_summary(tmp_path, bpe, megatron):
    """`autotrans run configs/preprocess.yaml key=value ...` end to end, as a user runs it."""
    docs = [{"text": "model data parallel"}, {"text": "rank"}, {"text": "data"}]
    _write_jsonl(tmp_path / "in.jsonl", docs)
    r = subprocess.run([sys.executable, "-m", "runner", "run", str(REPO / "configs" / "preprocess.yaml"),
                        f"preprocess_data.input={tmp_path}/in.jsonl", f"preprocess_data.tokenizer={bpe.path}",
                        f"preprocess_data.output_prefix={tmp_path}/new/ds", "preprocess_data.json_keys=[text]",
                        "preprocess_data.workers=1", "--no-progress"],
                       cwd=tmp_path, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k not in ("INPUT", "JSON_KEYS", "WORKERS")})
    assert r.returncode == 0, r.stderr
    summary = r.stderr.strip().splitlines()[-1]
    assert summary.startswith("autotrans: done: 3 documents,") and "documents/s" in summary, summary
    assert _read_back(megatron, tmp_path / "new" / "ds_text_document")[0] == [bpe.encode(d["text"]) for d in docs]


# ---------------------------------------------------------------------------- under MPI (SPEC 9)


def test_shares_cover_the_input_once_and_start_at_line_starts(tmp_path):
    """However many parts, the shares are consecutive, cover every byte of every file once,
    and each starts where a line starts (checked on the bytes, not with the code's own cuts)."""
    rng = random.Random(3)
    contents = [b"", b"one line without newline", b"a\nbb\n" * 50, b"x" * 5000 + b"\n" + b"y\n" * 3, b"\n\n\n", b"z" * 300]
    files = []
    for i, data in enumerate(contents + [bytes(rng.choice(b"ab\n") for _ in range(2000)) for _ in range(3)]):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(data)
    sizes = [p.stat().st_size for p in files]
    for parts in range(1, 8):
        covered = []
        for part in range(parts):
            covered += [(s.file_no, s.start, s.end) for s in preprocess._spans(files, sizes, part, parts)]
        whole = [(f, 0, n) for f, n in enumerate(sizes) if n]
        joined = []  # consecutive spans of one file joined, to compare with whole files
        for f, a, b in covered:
            assert a < b and (a == 0 or files[f].read_bytes()[a - 1:a] == b"\n"), (parts, f, a)
            if joined and joined[-1][0] == f and joined[-1][2] == a:
                joined[-1] = (f, joined[-1][1], b)
            else:
                joined.append((f, a, b))
        assert joined == whole, parts


def _launch(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "launch.sh"), *map(str, args), "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _mixed_inputs(folder: Path) -> str:
    """Three files of a glob: one ends without a newline, one is empty; documents of any size."""
    folder.mkdir()
    texts = _corpus(1500, seed=5)
    _write_jsonl(folder / "part_1.jsonl", [{"text": t, "title": t[:12]} for t in texts[:900]])
    (folder / "part_2.jsonl").write_text("")
    (folder / "part_10.jsonl").write_text("\n".join(json.dumps({"text": [t, ""], "title": t[-7:]}) for t in texts[900:]))
    return str(folder / "part_*.jsonl")


@pytest.mark.parametrize("ranks", [2, 3])
def test_launch_splits_the_input_over_ranks_with_the_bytes_of_one_process(tmp_path, bpe, megatron, ranks):
    """`./launch.sh -n N configs/preprocess.yaml ...`: each rank tokenizes its share, rank 0
    joins them; the files equal one process's byte for byte and Megatron reads them back."""
    pattern = _mixed_inputs(tmp_path / "in")
    keys = [f"preprocess_data.input={pattern}", f"preprocess_data.tokenizer={bpe.path}", "preprocess_data.json_keys=[text,title]",
            "preprocess_data.append_eod=true", "preprocess_data.workers=1"]
    one = _run(input=pattern, tokenizer=str(bpe.path), json_keys=["text", "title"], append_eod=True, output_prefix=str(tmp_path / "one" / "ds"))
    proc = _launch("-n", ranks, REPO / "configs" / "preprocess.yaml", *keys, f"preprocess_data.output_prefix={tmp_path}/mpi/ds")
    assert proc.returncode == 0, proc.stderr
    assert _files(tmp_path / "mpi") == _files(tmp_path / "one")  # no temporary part left beside them either
    done = [line for line in proc.stderr.splitlines() if line.startswith("autotrans: done: ")]
    assert len(done) == 1 and done[0].startswith(f"autotrans: done: {one['documents']} documents, {one['tokens']} tokens"), proc.stderr
    texts = _corpus(1500, seed=5)
    docs, _, _ = _read_back(megatron, tmp_path / "mpi" / "ds_text_document")
    assert docs == [bpe.encode(t) + [bpe.eos] for t in texts]
    titles, _, _ = _read_back(megatron, tmp_path / "mpi" / "ds_title_document")
    assert titles == [bpe.encode(t[:12]) + [bpe.eos] for t in texts[:900]] + [bpe.encode(t[-7:]) + [bpe.eos] for t in texts[900:]]


def test_a_stopped_rank_ends_preprocessing_after_mpi_timeout(tmp_path, bpe):
    """Rank 1 is stopped (SIGSTOP) when it starts tokenizing its share: after mpi_timeout
    seconds the job ends on every rank (the run's timeout: 60 s), exit 1, one line naming
    it, and no output file under its final name."""
    from tests.test_mpi import autotrans, errors, hooked, mpirun

    path = _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in _corpus(400, seed=7)])
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"mpi_timeout": 5, "preprocess_data": {
        "input": str(path), "tokenizer": str(bpe.path), "output_prefix": str(tmp_path / "out" / "ds")}}))
    proc = mpirun(["-n", 1, *autotrans(job), ":", "-n", 1, *hooked(tmp_path, "stop", "runner.preprocess:_tokenize_share", job)])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert errors(proc.stderr) == ["MPI rank 1 of 2 made no progress for 5 s (mpi_timeout); ending the job on every rank"], proc.stderr
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix in (".bin", ".idx")]  # temporaries only, as after any kill


def test_bad_lines_under_mpi_are_named_by_their_line_in_the_file(tmp_path, bpe):
    """A bad line in rank 1's share is named with its line number in the whole file, once."""
    lines = [json.dumps({"text": t}) for t in _corpus(400, seed=6)]
    lines[300], lines[350] = '{"text": 5}', "not json"
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    common = [REPO / "configs" / "preprocess.yaml", f"preprocess_data.input={path}", f"preprocess_data.tokenizer={bpe.path}",
              "preprocess_data.json_keys=[text]", "preprocess_data.workers=1"]
    proc = _launch("-n", 2, *common, f"preprocess_data.output_prefix={tmp_path}/fail/ds")
    assert proc.returncode == 1
    said = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(said) == 1 and said[0].startswith("autotrans: error: tokenize failed on MPI rank 1 of 2: "), proc.stderr
    assert said[0].endswith(f"{path}:301: key 'text' holds a number; expected a string or a list of strings; fix the line or set preprocess_data.on_bad_line=skip")
    assert not (tmp_path / "fail").exists() or list((tmp_path / "fail").iterdir()) == []
    proc = _launch("-n", 2, *common, "preprocess_data.on_bad_line=skip", f"preprocess_data.output_prefix={tmp_path}/skip/ds")
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if ": skipped: " in line]
    assert [w.split(": skipped: ")[0][-len(str(path)) - 4:] for w in warned] == [f"{path}:301", f"{path}:351"], proc.stderr
    assert "autotrans: done: 398 documents," in proc.stderr and "2 bad lines skipped" in proc.stderr


def test_ranks_that_see_different_input_fail_with_one_line(tmp_path, bpe):
    for rank, n in ((0, 3), (1, 4)):
        _write_jsonl(tmp_path / f"in_{rank}.jsonl", [{"text": "data"}] * n)
    proc = _launch("-n", 2, REPO / "configs" / "preprocess.yaml", f"preprocess_data.input={tmp_path}/in_${{oc.env:PMI_RANK}}.jsonl",
                   f"preprocess_data.tokenizer={bpe.path}", f"preprocess_data.output_prefix={tmp_path}/out/ds", "preprocess_data.json_keys=[text]")
    assert proc.returncode == 1
    said = [line for line in proc.stderr.splitlines() if "error" in line]
    sizes = [(tmp_path / f"in_{rank}.jsonl").stat().st_size for rank in (0, 1)]
    assert said == [f"autotrans: error: tokenize failed on MPI rank 1 of 2: preprocess_data.input: this rank sees 1 file(s), {sizes[1]} bytes, "
                    f"and MPI rank 0 sees 1, {sizes[0]} bytes; every rank must see the same input files (a shared disk)"], proc.stderr


MEMORY_PROBE = """
import sys, tracemalloc
from runner import preprocess
from runner.preprocess import run_preprocess, validate_section
preprocess.CHUNK_BYTES = 16 << 10  # small blocks, pointer chunks and transfers: the constant part is small
preprocess._DatasetWriter._CHUNK = 1024
preprocess._TRANSFER_BYTES = 16 << 10
tracemalloc.start()
run_preprocess(validate_section({"input": sys.argv[1], "tokenizer": sys.argv[2], "output_prefix": sys.argv[3]}), show_progress=False)
print("peak", tracemalloc.get_traced_memory()[1], flush=True)  # before mpi4py finalizes MPI at exit
"""


def test_memory_per_rank_stays_flat_as_the_input_grows(tmp_path, bpe):
    """Under MPI, too, no rank's peak of Python allocations follows the input size: the
    shares stream through the tokenizer, and the parts travel to rank 0 in chunks."""
    mpiexec = shutil.which("mpiexec")
    probe = tmp_path / "probe.py"
    probe.write_text(MEMORY_PROBE)
    peaks = {}
    for n in (10_000, 40_000):
        path = tmp_path / f"in_{n}.jsonl"
        path.write_text('{"text": "data rank model"}\n' * n)
        proc = subprocess.run([mpiexec, "-n", "2", sys.executable, probe, path, bpe.path, tmp_path / f"out_{n}" / "ds"],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr
        # both ranks print through mpiexec, which may join their lines: find every report
        peaks[n] = [int(v) for v in re.findall(r"peak (\d+)", proc.stdout)]
        assert len(peaks[n]) == 2
    assert max(peaks[40_000]) < max(peaks[10_000]) + 150_000  # 30,000 more documents: under 5 bytes each


def test_an_output_that_is_an_input_is_refused(tmp_path, bpe):
    """An earlier run's output given as this run's input (a glob that matched it, with
    bad lines skipped) would be replaced by the output: refused, exit 2, file unchanged."""
    from runner.errors import ConfigError

    _write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in _corpus(5)])
    _run(input=str(tmp_path / "in.jsonl"), tokenizer=str(bpe.path), output_prefix=str(tmp_path / "ds"))
    earlier = tmp_path / "ds_text_document.bin"
    before = (earlier.read_bytes(), earlier.stat().st_mtime_ns, earlier.stat().st_ino)
    with pytest.raises(ConfigError, match="overlaps the job's input") as e:
        _run(input=str(tmp_path / "ds_*.bin"), tokenizer=str(bpe.path), on_bad_line="skip", output_prefix=str(tmp_path / "ds"))
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert (earlier.read_bytes(), earlier.stat().st_mtime_ns, earlier.stat().st_ino) == before
