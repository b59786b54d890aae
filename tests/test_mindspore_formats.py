"""MindSpore .ckpt checkpoints and protobuf strategy files without MindSpore: files are
built by the tests with protobuf from the message schemas (MindSpore's field numbers),
expected tensors come from numpy slicing written here, following MindSpore's layout
rules (dev_matrix row-major rank coordinates; tensor_map axis k = dev dim len-1-k;
optimizer shard over the innermost replica coordinates)."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from runner.cli import main
from runner.errors import FormatError, LayoutError
from runner.formats import mindspore_ckpt
from runner.formats.mindspore_ckpt import CkptReader
from runner.formats.mindspore_proto import message
from runner.formats import mindspore_strategy as mss
from tests.mindspore_files import write_strategy as write_ms_strategy

MS_NAMES = {np.dtype(np.float32): "Float32", np.dtype(np.float16): "Float16", np.dtype(np.float64): "Float64",
            np.dtype(np.int8): "Int8", np.dtype(np.int16): "Int16", np.dtype(np.int32): "Int32",
            np.dtype(np.int64): "Int64", np.dtype(np.uint8): "UInt8", np.dtype(np.uint16): "UInt16",
            np.dtype(np.uint32): "UInt32", np.dtype(np.uint64): "UInt64", np.dtype(np.bool_): "Bool"}


def ckpt_bytes(tensors: list[tuple[str, np.ndarray, str | None]], chunk: int | None = None) -> bytes:
    """A Checkpoint message; each (name, array, MindSpore type or None = from numpy).
    `chunk`: cut tensor bytes into records of at most this many bytes, as MindSpore does."""
    out = b""
    for name, a, ttype in tensors:
        raw = np.ascontiguousarray(a).tobytes()
        pieces = [raw[i:i + chunk] for i in range(0, len(raw), chunk)] if chunk else [raw]
        for piece in pieces:
            c = message("Checkpoint")()
            v = c.value.add(tag=name)
            v.tensor.dims.extend(a.shape)
            v.tensor.tensor_type = ttype or MS_NAMES[a.dtype]
            v.tensor.tensor_content = piece
            out += c.SerializeToString()
    return out


def parse_ckpt(path: Path) -> dict[str, tuple[list[int], str, bytes, int]]:
    """tag -> (dims, type, joined content, number of records), by protobuf itself."""
    c = message("Checkpoint")()
    c.ParseFromString(path.read_bytes())
    out: dict[str, tuple] = {}
    for v in c.value:
        _, _, raw, n = out.get(v.tag, (None, None, b"", 0))
        out[v.tag] = (list(v.tensor.dims), v.tensor.tensor_type, raw + v.tensor.tensor_content, n + 1)
    return out


# -- the .ckpt reader -----------------------------------------------------------------------
def test_reader_every_dtype_scalars_and_zero_copy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {f"t_{dt.name}": (rng.integers(0, 100, size=(3, 5)).astype(dt) if dt != np.bool_ else rng.integers(0, 2, size=(3, 5)).astype(bool))
              for dt in MS_NAMES}
    bf16_bits = rng.integers(0, 1 << 16, size=(4, 2)).astype(np.uint16)
    tensors = [(n, a, None) for n, a in arrays.items()]
    tensors += [("bf16", bf16_bits, "BFloat16"), ("step", np.array(9, np.int64), None)]
    path = tmp_path / "a.ckpt"
    path.write_bytes(ckpt_bytes(tensors) + ckpt_bytes([("dims0", np.array([3.5], np.float32), None)]).replace(
        b"\x08\x01", b"\x08\x00", 1))  # MindSpore's scalar convention: dims [0] with one element
    r = CkptReader(path)
    info = r.tensors()
    assert info["bf16"].dtype == "BF16" and info["bf16"].shape == (4, 2)
    assert info["step"].shape == () and info["step"].dtype == "I64"
    assert info["dims0"].shape == () and r.array("dims0").view(np.float32) == np.float32(3.5)
    expect_names = {"Float32": "F32", "Float16": "F16", "Float64": "F64", "Int8": "I8", "Int16": "I16", "Int32": "I32",
                    "Int64": "I64", "UInt8": "U8", "UInt16": "U16", "UInt32": "U32", "UInt64": "U64", "Bool": "BOOL"}
    for name, a in arrays.items():
        assert info[name].dtype == expect_names[MS_NAMES[a.dtype]]
        got = r.array(name)
        assert got.shape == a.shape and not got.flags.owndata  # a view of the mapped file
        assert got.tobytes() == a.tobytes()
    assert np.array_equal(r.array("bf16"), bf16_bits)
    r.close()


def test_reader_joins_chunks_cut_mid_row(tmp_path: Path) -> None:
    a = np.arange(7 * 10, dtype=np.float32).reshape(7, 10)
    path = tmp_path / "c.ckpt"
    path.write_bytes(ckpt_bytes([("x", np.ones(3, np.int32), None), ("big", a, None), ("y", np.zeros(2, np.int8), None)], chunk=64))
    r = CkptReader(path)
    assert r.tensors()["big"].shape == (7, 10)
    assert np.array_equal(r.array("big").view(np.float32), a)
    assert np.array_equal(r.array("y"), np.zeros(2, np.uint8))
    r.close()


def test_crc_trailer_checked(tmp_path: Path) -> None:
    body = ckpt_bytes([("w", np.arange(12, dtype=np.float32), None)])
    good = tmp_path / "good.ckpt"
    good.write_bytes(body + b"crc_num" + zlib.crc32(body).to_bytes(10, "big"))
    assert CkptReader(good).tensors()["w"].shape == (12,)
    bad = tmp_path / "bad.ckpt"
    flipped = bytearray(body)
    flipped[-3] ^= 1
    bad.write_bytes(bytes(flipped) + b"crc_num" + zlib.crc32(body).to_bytes(10, "big"))
    with pytest.raises(FormatError, match="crc32 check failed"):
        CkptReader(bad)


@pytest.mark.parametrize("damage, message_part", [
    (lambda b: b[: len(b) - 5], "truncated"),
    (lambda b: b[:3], "truncated"),
    (lambda b: b"\xd8\x5e\x3a\x7f" + b[4:], "encrypted"),
    (lambda b: b"PK\x03\x04" + b[4:], "not a MindSpore checkpoint"),
    (lambda b: b + ckpt_bytes([("a", np.zeros(2, np.float32), None)]), "appears twice"),
    (lambda b: b.replace(b"Float32", b"Float99"), "Float99"),
])
def test_damaged_files_are_one_line_errors(tmp_path: Path, damage, message_part: str) -> None:
    body = ckpt_bytes([("a", np.zeros(4, np.float32), None), ("b", np.ones(3, np.int64), None)])
    path = tmp_path / "x.ckpt"
    path.write_bytes(damage(body))
    with pytest.raises(FormatError, match=message_part) as e:
        CkptReader(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_wrong_content_size_is_an_error(tmp_path: Path) -> None:
    c = message("Checkpoint")()
    v = c.value.add(tag="w")
    v.tensor.dims.extend([4, 4])
    v.tensor.tensor_type = "Float32"
    v.tensor.tensor_content = b"\0" * 60
    path = tmp_path / "w.ckpt"
    path.write_bytes(c.SerializeToString())
    with pytest.raises(FormatError, match="holds 60 bytes"):
        CkptReader(path)


# -- the .ckpt writer, through jobs ---------------------------------------------------------
def run_job(tmp: Path, **keys) -> Path:
    out = tmp / "out"
    job = tmp / "job.yaml"
    job.write_text("".join(f"{k}: {v}\n" for k, v in {"output_dir": out, **keys}.items()))
    assert main(["run", str(job), "--no-progress"]) == 0
    return out


def test_safetensors_to_ckpt_with_chunked_tensor(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(mindspore_ckpt, "CHUNK_BYTES", 100)  # 64 floats per row: cut mid-row
    rng = np.random.default_rng(1)
    full = {"big": rng.standard_normal((5, 64)).astype(np.float32), "small": np.arange(6, dtype=np.int16),
            "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32)}
    save_file(full, str(tmp_path / "full.safetensors"))
    out = run_job(tmp_path, load_checkpoint=tmp_path / "full.safetensors", use_parallel="false", output_format="ckpt")
    path = out / "transformed_checkpoint" / "rank_0" / "checkpoint_0.ckpt"
    parsed = parse_ckpt(path)
    assert parsed["big"][:2] == ([5, 64], "Float32") and parsed["big"][3] == math.ceil(5 * 64 * 4 / 100)
    for name, a in full.items():
        dims, _, raw, _ = parsed[name]
        assert dims == list(a.shape) and raw == a.tobytes()
    assert parsed["small"][1] == "Int16" and parsed["scalar"][0] == []
    r = CkptReader(path)  # and our reader reads what we wrote
    assert np.array_equal(r.array("big").view(np.float32), full["big"])
    r.close()


# -- MindSpore strategy files ---------------------------------------------------------------
def ms_layout(dev, tmap, opt=0, step=0):
    return (list(dev), tmap, opt, step)


def write_strategy(path: Path, stage: int | None, layouts: dict, merged: bool = False) -> None:
    write_ms_strategy(path, message("ParallelStrategyMap"), stage, layouts, merged)


def ms_slice(full: np.ndarray, dev, tmap, opt: int, position: int) -> np.ndarray:
    """The slice MindSpore gives the rank at `position` of its stage (test's own model)."""
    coords = np.unravel_index(position, dev)
    axes = [t if isinstance(t, list) else ([] if t == -1 else [t]) for t in tmap]
    used = {len(dev) - 1 - k for a in axes for k in a}
    index = []
    for a in axes:
        i = 0
        for k in a:
            i = i * dev[len(dev) - 1 - k] + coords[len(dev) - 1 - k]
        index.append(i)
    parts = [math.prod(dev[len(dev) - 1 - k] for k in a) for a in axes]
    if opt == -1:
        opt = math.prod(dev) // math.prod(parts)
    if opt > 1:
        q = 0
        for d in range(len(dev)):
            if d not in used:
                q = q * dev[d] + coords[d]
        index[0] = index[0] * opt + q % opt
        parts[0] *= opt
    sl = tuple(slice(i * (s // p), (i + 1) * (s // p)) for i, s, p in zip(index, full.shape, parts))
    return full[sl]


RNG = np.random.default_rng(3)
FULL = {
    "emb": RNG.standard_normal((16, 8)).astype(np.float32),
    "wq": RNG.standard_normal((8, 8)).astype(np.float16),
    "wo": RNG.standard_normal((8, 16)).astype(np.float32),
    "norm": RNG.standard_normal((8,)).astype(np.float32),
    "head": RNG.integers(-9, 9, size=(16, 8)).astype(np.int32),
}
# two stages of [dp 2, mp 2] devices: emb, wq in stage 0; wo, norm, head in stage 1
PP_LAYOUTS = {
    0: {"emb": ms_layout([2, 2], [0, -1], 2, 2), "wq": ms_layout([2, 2], [[1, 0], -1]),
        "adam_m.wq": ms_layout([2, 2], [[1, 0], -1])},
    1: {"wo": ms_layout([2, 2], [-1, 0]), "norm": ms_layout([2, 2], [-1], -1, 1), "head": ms_layout([2, 2], [-1, 1])},
}


def write_distributed_ckpt(folder: Path, layouts_by_stage: dict, extras: dict) -> None:
    for stage, lays in layouts_by_stage.items():
        for pos in range(4):
            rank = stage * 4 + pos
            tensors = [(n, ms_slice(FULL[n], dev, tmap, opt, pos), None) for n, (dev, tmap, opt, _) in lays.items() if n in FULL]
            tensors += [(n, a, None) for n, a in extras.items()]
            path = folder / f"rank_{rank}" / f"net-{rank}_3.ckpt"
            path.parent.mkdir(parents=True)
            path.write_bytes(ckpt_bytes(tensors))
            (folder / f"rank_{rank}" / f"net-{rank}_1.ckpt").write_bytes(b"older step: never read")


def test_per_stage_and_merged_files_read_the_same(tmp_path: Path) -> None:
    for s, lays in PP_LAYOUTS.items():
        write_strategy(tmp_path / "stages" / f"ckpt_strategy_rank_{s * 4}.ckpt", s, lays)
    write_strategy(tmp_path / "merged.ckpt", None, {f"{s}-{n}": l for s, lays in PP_LAYOUTS.items() for n, l in lays.items()}, merged=True)
    a = mss.load(sorted((tmp_path / "stages").iterdir()), "stages")
    b = mss.load([tmp_path / "merged.ckpt"], "merged")
    assert a.stages == b.stages == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert a.params == b.params and a.origin == "mindspore"
    assert a.params["wq"].tensor_map == ((1, 0), ()) and a.params["emb"].opt_shard == 2
    assert a.params["norm"].opt_shard == 4 and a.params["head"].stages == (1,)


def test_missing_stage_and_disagreeing_files_are_errors(tmp_path: Path) -> None:
    write_strategy(tmp_path / "s1.ckpt", 1, PP_LAYOUTS[1])
    with pytest.raises(FormatError, match=r"not \[0\]"):
        mss.load([tmp_path / "s1.ckpt"], "x")
    write_strategy(tmp_path / "a.ckpt", 0, {"w": ms_layout([4], [0, -1])})
    write_strategy(tmp_path / "b.ckpt", 0, {"w": ms_layout([4], [-1, 0])})
    with pytest.raises(LayoutError, match="disagree on parameter w"):
        mss.load([tmp_path / "a.ckpt", tmp_path / "b.ckpt"], "x")
    (tmp_path / "junk.ckpt").write_bytes(b"\xff\xff\xff")
    with pytest.raises(FormatError, match="not a MindSpore protobuf strategy"):
        mss.load([tmp_path / "junk.ckpt"], "x")


def test_a_file_without_strategy_items_is_stage_0(tmp_path: Path) -> None:
    write_strategy(tmp_path / "s.ckpt", None, {"w": ms_layout([2], [0, -1])})
    s = mss.load([tmp_path / "s.ckpt"], "s")
    assert s.stages == ((0, 1),) and s.params["w"].stages == (0,)


def test_fill_shapes_names_the_parameter_on_disagreement(tmp_path: Path) -> None:
    write_strategy(tmp_path / "s.ckpt", 0, {"w": ms_layout([2], [0, -1])})
    s = mss.load([tmp_path / "s.ckpt"], "s")
    from runner.formats.base import TensorInfo

    filled = mss.fill_shapes(s, {0: {"w": TensorInfo("F32", (3, 5))}, 1: {"w": TensorInfo("F32", (3, 5))}})
    assert filled.params["w"].shape == (6, 5) and filled.params["w"].dtype == "F32"
    with pytest.raises(LayoutError, match="parameter w"):
        mss.fill_shapes(s, {0: {"w": TensorInfo("F32", (3, 5))}, 1: {"w": TensorInfo("F32", (4, 5))}})


def test_distributed_ckpt_pipeline_to_full_safetensors(tmp_path: Path, capfd) -> None:
    """.ckpt in (2 stages, dp x mp, opt shard, multi-axis, extras, optimizer state the
    checkpoint lacks) -> one safetensors file: equals the full tensors."""
    extras = {"global_step": np.array([5], np.int32)}
    write_distributed_ckpt(tmp_path / "src", PP_LAYOUTS, extras)
    for s, lays in PP_LAYOUTS.items():
        write_strategy(tmp_path / "strategy" / f"ckpt_strategy_rank_{s * 4}.ckpt", s, lays)
    out = run_job(tmp_path, load_checkpoint=tmp_path / "src", src_strategy_path_or_dir=tmp_path / "strategy",
                  use_parallel="false", output_format="safetensors")
    got = load_file(str(out / "transformed_checkpoint" / "rank_0" / "checkpoint_0.safetensors"))
    assert sorted(got) == sorted([*FULL, *extras])
    for name, a in {**FULL, **extras}.items():
        assert got[name].dtype == a.dtype and np.array_equal(got[name], a), name
    err = capfd.readouterr().err
    assert "adam_m.wq" in err and "global_step" in err


def str_record(tag: str, text: str) -> bytes:
    """A string as mindspore.save_checkpoint stores an append_dict str: dims [0], tensor_type
    "str", tensor_content numpy's bytes of np.array(text) (serialization._exec_save)."""
    c = message("Checkpoint")()
    v = c.value.add(tag=tag)
    v.tensor.dims.append(0)
    v.tensor.tensor_type = "str"
    v.tensor.tensor_content = np.array(text).tobytes()
    return c.SerializeToString()


def test_string_entries_are_carried_through_ckpt_jobs(tmp_path: Path, capsys) -> None:
    """A distributed .ckpt whose rank files hold an append_dict string: merged into one
    .ckpt, then split again by a MindSpore strategy, every output file holds the record
    exactly as MindSpore wrote it; a safetensors output refuses it in one line."""
    text = "llama2_7b, épreuve ✓"
    write_distributed_ckpt(tmp_path / "src", PP_LAYOUTS, {"global_step": np.array([5], np.int32)})
    for f in (tmp_path / "src").glob("rank_*/net-*_3.ckpt"):
        f.write_bytes(f.read_bytes() + str_record("model_name", text))
    for s, lays in PP_LAYOUTS.items():
        write_strategy(tmp_path / "strategy" / f"ckpt_strategy_rank_{s * 4}.ckpt", s, lays)
    want = ([0], "str", np.array(text).tobytes(), 1)
    (tmp_path / "merge").mkdir()
    (tmp_path / "split").mkdir()
    merged = run_job(tmp_path / "merge", load_checkpoint=tmp_path / "src", src_strategy_path_or_dir=tmp_path / "strategy",
                     use_parallel="false")
    parsed = parse_ckpt(merged / "transformed_checkpoint" / "rank_0" / "checkpoint_0.ckpt")
    assert parsed["model_name"] == want
    assert np.frombuffer(parsed["model_name"][2], f"<U{len(text)}")[0] == text
    for name, a in FULL.items():
        assert np.array_equal(np.frombuffer(parsed[name][2], a.dtype).reshape(a.shape), a), name
    dst = tmp_path / "dst" / "merged.ckpt"
    write_strategy(dst, None, {f"{s}-{n}": l for s, lays in PP_LAYOUTS.items() for n, l in lays.items()}, merged=True)
    split = run_job(tmp_path / "split", load_checkpoint=merged / "transformed_checkpoint" / "rank_0" / "checkpoint_0.ckpt",
                    dst_strategy_path_or_dir=dst)
    for rank in range(8):
        assert parse_ckpt(split / "transformed_checkpoint" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt")["model_name"] == want
    (tmp_path / "st").mkdir()
    job = tmp_path / "st" / "job.yaml"
    job.write_text(f"load_checkpoint: {tmp_path / 'src'}\nsrc_strategy_path_or_dir: {tmp_path / 'strategy'}\n"
                   f"use_parallel: false\noutput_format: safetensors\noutput_dir: {tmp_path / 'st' / 'out'}\n")
    capsys.readouterr()
    assert main(["run", str(job), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "model_name is a MindSpore string entry, which safetensors cannot hold; use output_format: ckpt" in err


def test_full_safetensors_to_distributed_ckpt_with_mindspore_strategy(tmp_path: Path) -> None:
    """safetensors in -> .ckpt per rank with a MindSpore destination strategy; the strategy
    files written (strategy_format: mindspore) read back as the same layouts."""
    extras = {"global_step": np.array([5], np.int32)}
    save_file({**FULL, **extras}, str(tmp_path / "full.safetensors"))
    write_strategy(tmp_path / "dst" / "merged.ckpt", None,
                   {f"{s}-{n}": l for s, lays in PP_LAYOUTS.items() for n, l in lays.items()}, merged=True)
    out = run_job(tmp_path, load_checkpoint=tmp_path / "full.safetensors", dst_strategy_path_or_dir=tmp_path / "dst" / "merged.ckpt",
                  output_format="ckpt", strategy_format="mindspore")
    for stage, lays in PP_LAYOUTS.items():
        for pos in range(4):
            rank = stage * 4 + pos
            parsed = parse_ckpt(out / "transformed_checkpoint" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt")
            want = {n: ms_slice(FULL[n], dev, tmap, opt, pos) for n, (dev, tmap, opt, _) in lays.items() if n in FULL}
            assert sorted(parsed) == sorted([*want, *extras])
            for name, a in {**want, **extras}.items():
                assert parsed[name][0] == list(a.shape) and parsed[name][2] == a.tobytes(), (rank, name)
    written = mss.load(sorted((out / "strategy").iterdir()), "written")
    original = mss.load([tmp_path / "dst" / "merged.ckpt"], "original")
    assert set(written.params) == set(original.params) - {"adam_m.wq"}
    for name, p in written.params.items():
        assert (p.dev_matrix, p.tensor_map, p.opt_shard, p.stages) == (
            original.params[name].dev_matrix, original.params[name].tensor_map, original.params[name].opt_shard,
            original.params[name].stages)
    doc = message("ParallelStrategyMap")()
    doc.ParseFromString((out / "strategy" / "ckpt_strategy_rank_0.ckpt").read_bytes())
    emb = next(i.parallel_layouts for i in doc.parallel_layout_item if i.param_name == "emb")
    # MindSpore checks that the step is the device stride of the replicas (mp = 2 here)
    assert (emb.opt_weight_shard_size, emb.opt_weight_shard_step) == (2, 2)
    assert doc.parallel_strategy_item[0].parallel_strategys.stage == 0


def test_ckpt_reshard_with_json_strategy_written_and_inspect(tmp_path: Path, capsys) -> None:
    """.ckpt distributed in -> .ckpt resharded out; `inspect` and `diff` read the files."""
    write_distributed_ckpt(tmp_path / "src", PP_LAYOUTS, {})
    for s, lays in PP_LAYOUTS.items():
        write_strategy(tmp_path / "strategy" / f"ckpt_strategy_rank_{s * 4}.ckpt", s, lays)
    dst = {0: {n: ms_layout([1, 4], [-1] * FULL[n].ndim) for n in FULL}}
    dst[0]["wo"] = ms_layout([1, 4], [-1, 0])
    write_strategy(tmp_path / "dst" / "s.ckpt", 0, dst[0])
    out = run_job(tmp_path, load_checkpoint=tmp_path / "src", src_strategy_path_or_dir=tmp_path / "strategy",
                  dst_strategy_path_or_dir=tmp_path / "dst", output_format="ckpt")
    for pos in range(4):
        r = CkptReader(out / "transformed_checkpoint" / f"rank_{pos}" / f"checkpoint_{pos}.ckpt")
        for n, (dev, tmap, opt, _) in dst[0].items():
            want = ms_slice(FULL[n], dev, tmap, opt, pos)
            assert r.array(n).tobytes() == want.tobytes() and r.tensors()[n].shape == want.shape
        r.close()
    assert main(["inspect", str(tmp_path / "strategy")]) == 0
    assert "wq: shape [-1, -1] ? stage [0] dev_matrix [2, 2]" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "src")]) == 0
    assert "checkpoint (distributed, .ckpt): 8 rank(s)" in capsys.readouterr().out
    assert main(["diff", str(tmp_path / "strategy"), str(tmp_path / "dst")]) == 1
