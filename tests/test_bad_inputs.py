"""Bad inputs (issue #8, SPEC 3 "Exit codes"): each gives one clear line, exit 1 or 2,
and writes no output file. Run through the CLI entry point in-process (runner.cli.main,
the function the console script calls) so that every case is fast; a few cases also run
as a real subprocess. Damaged files are built byte by byte here, not by the code under
test."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from runner.cli import main
from tests import oracle

SPECS = {"w": ((8, 4), "F32"), "b": ((8,), "F32"), "e": ((4, 4), "F16")}


def tp2() -> dict:
    return oracle.strategy([[0, 1]], {
        "w": oracle.param((8, 4), "F32", dev_matrix=[2], tensor_map=[0, -1]),
        "b": oracle.param((8,), "F32", dev_matrix=[2], tensor_map=[0]),
        "e": oracle.param((4, 4), "F16", dev_matrix=[2]),
    })


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    """A 2-rank tensor-parallel checkpoint (tmp/ckpt/rank_N) with its strategy (tmp/strategy)."""
    full = oracle.random_full(SPECS, seed=3)
    save_file(full, str(tmp_path / "full.safetensors"))
    oracle.write_distributed(full, tp2(), tmp_path)
    return tmp_path


def job(tmp: Path, **keys) -> Path:
    path = tmp / "job.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
    return path


def merge_job(tmp: Path, **extra) -> Path:
    keys = {"load_checkpoint": str(tmp / "ckpt"), "src_strategy_path_or_dir": str(tmp / "strategy"),
            "use_parallel": False, "output_dir": str(tmp / "out")}
    return job(tmp, **{**keys, **extra})


def fails(capsys, args: list[str], code: int, *phrases: str) -> str:
    """Run the CLI; assert the exit code, exactly one line on stderr holding `phrases`,
    and no traceback. Returns the line."""
    got = main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert got == code, captured.err
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith("autotrans: error: "), line
    for p in phrases:
        assert p in line, (p, line)
    assert "Traceback" not in captured.err and "internal error" not in line
    return line


def run_fails(capsys, tmp: Path, cfg: Path, code: int, *phrases: str) -> str:
    line = fails(capsys, ["run", str(cfg), "--no-progress"], code, *phrases)
    tc = tmp / "out" / "transformed_checkpoint"
    written = [p for p in tc.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".ckpt")] if tc.exists() else []
    assert written == [], written
    return line


def rank_file(tmp: Path, r: int) -> Path:
    return tmp / "ckpt" / f"rank_{r}" / f"ckpt_{r}.safetensors"


def raw_safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# -- source folders -------------------------------------------------------------------------
def test_missing_rank_folder(dist: Path, capsys) -> None:
    oracle.write_distributed(oracle.random_full(SPECS), oracle.strategy([[0, 1, 2]], {
        n: oracle.param(s, d, dev_matrix=[3]) for n, (s, d) in SPECS.items()}), dist / "three")
    for p in (dist / "three" / "ckpt" / "rank_1").iterdir():
        p.unlink()
    (dist / "three" / "ckpt" / "rank_1").rmdir()
    cfg = merge_job(dist, load_checkpoint=str(dist / "three" / "ckpt"), src_strategy_path_or_dir=str(dist / "three" / "strategy"))
    run_fails(capsys, dist, cfg, 1, "rank_1", "missing")


def test_empty_rank_folder(dist: Path, capsys) -> None:
    rank_file(dist, 1).unlink()
    run_fails(capsys, dist, merge_job(dist), 1, "rank_1", "holds no checkpoint file")


def test_path_that_does_not_exist(dist: Path, capsys) -> None:
    run_fails(capsys, dist, merge_job(dist, load_checkpoint=str(dist / "nope")), 1, str(dist / "nope"), "does not exist")
    run_fails(capsys, dist, merge_job(dist, src_strategy_path_or_dir=str(dist / "nostrat")), 1, "nostrat", "does not exist")
    fails(capsys, ["run", str(dist / "missing.yaml")], 2, "missing.yaml", "does not exist")
    fails(capsys, ["inspect", str(dist / "nope")], 1, "does not exist")


# -- damaged safetensors files --------------------------------------------------------------
def test_truncated_safetensors(dist: Path, capsys) -> None:
    path = rank_file(dist, 1)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    run_fails(capsys, dist, merge_job(dist), 1, str(path), "truncated")
    path.write_bytes(data[:5])
    run_fails(capsys, dist, merge_job(dist), 1, str(path), "truncated")
    path.write_bytes(data[:40])  # inside the header
    run_fails(capsys, dist, merge_job(dist), 1, str(path), "truncated")


def test_corrupt_header_json(dist: Path, capsys) -> None:
    path = rank_file(dist, 0)
    data = bytearray(path.read_bytes())
    data[8:14] = b"{oops:"
    path.write_bytes(bytes(data))
    run_fails(capsys, dist, merge_job(dist), 1, str(path), "corrupt safetensors header JSON")
    path.write_bytes(raw_safetensors([1, 2], b""))  # JSON, but not an object
    run_fails(capsys, dist, merge_job(dist), 1, str(path), "corrupt safetensors header")
    path.write_bytes(raw_safetensors({"w": {"dtype": "F32", "shape": "4x4"}}, b""))
    run_fails(capsys, dist, merge_job(dist), 1, str(path), "corrupt header entry", "'w'")


def test_header_offsets_out_of_bounds_or_overlapping(dist: Path, capsys) -> None:
    path = rank_file(dist, 0)
    data = bytes(64)
    path.write_bytes(raw_safetensors({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
                                      "b": {"dtype": "F32", "shape": [4], "data_offsets": [48, 64]}}, data))
    run_fails(capsys, dist, merge_job(dist), 1, str(path), "overlap", "'b'", "'w'")
    path.write_bytes(raw_safetensors({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [16, 80]}}, data))
    run_fails(capsys, dist, merge_job(dist), 1, str(path), "'w'", "outside the data")
    path.write_bytes(raw_safetensors({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}, data))
    run_fails(capsys, dist, merge_job(dist), 1, str(path), "'w'", "needs 64")


W4 = '"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}'


@pytest.mark.parametrize("header,phrase", [
    ('{"w":{"dtype":"F32","shape":[true,4],"data_offsets":[0,16]}}', "corrupt header entry"),
    ('{"w\\ud800":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', "lone surrogate"),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', "appears twice"),
    ('{"__metadata__":{"format":1},' + W4 + "}", "__metadata__"),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', "belong to no tensor"),
    ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "belong to no tensor"),
    ('{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16],"x":NaN}}', "NaN"),
])
def test_safetensors_headers_the_library_refuses(dist: Path, capsys, header: str, phrase: str) -> None:
    """Headers the safetensors library refuses (its verdict checked on the same bytes):
    one line naming the file, exit 1."""
    from safetensors import SafetensorError, deserialize

    data = struct.pack("<Q", len(header)) + header.encode() + bytes(16)
    with pytest.raises(SafetensorError):
        deserialize(data)
    path = rank_file(dist, 0)
    path.write_bytes(data)
    run_fails(capsys, dist, merge_job(dist), 1, str(path), phrase)
    fails(capsys, ["inspect", str(path)], 1, phrase)


def test_unknown_dtype(dist: Path, capsys) -> None:
    path = rank_file(dist, 0)
    path.write_bytes(raw_safetensors({"w": {"dtype": "F128", "shape": [4, 4], "data_offsets": [0, 64]}}, bytes(64)))
    run_fails(capsys, dist, merge_job(dist), 1, str(path), "unknown dtype", "F128")


# -- checkpoint vs strategy -----------------------------------------------------------------
def test_shape_disagrees_with_strategy(dist: Path, capsys) -> None:
    full = oracle.random_full(SPECS, seed=3)
    shard = oracle.shard(full, tp2(), 1)
    shard["w"] = shard["w"][:, :2].contiguous()  # [4, 2] where the layout gives [4, 4]
    save_file(shard, str(rank_file(dist, 1)))
    run_fails(capsys, dist, merge_job(dist), 1, "parameter w", "rank 1", "[4, 2]", "[4, 4]")


def test_strategy_names_parameter_checkpoint_lacks_and_reverse(dist: Path, capsys) -> None:
    s = tp2()
    s["params"]["ghost"] = oracle.param((2,), "F32", dev_matrix=[2])
    oracle.write_strategy(s, dist / "s_extra")
    run_fails(capsys, dist, merge_job(dist, src_strategy_path_or_dir=str(dist / "s_extra")), 1,
              "in the source strategy but not the checkpoint", "ghost")
    s = tp2()
    del s["params"]["e"]
    oracle.write_strategy(s, dist / "s_fewer")
    run_fails(capsys, dist, merge_job(dist, src_strategy_path_or_dir=str(dist / "s_fewer")), 1,
              "in the checkpoint but not the source strategy", "e")


def bad_strategy(dist: Path, capsys, edit: dict, *phrases: str) -> None:
    s = tp2()
    s["params"]["w"].update(edit)
    oracle.write_strategy(s, dist / "bad")
    cfg = merge_job(dist, src_strategy_path_or_dir=str(dist / "bad"))
    run_fails(capsys, dist, cfg, 1, "parameter w", *phrases)


def test_dev_matrix_product_not_rank_count(dist: Path, capsys) -> None:
    bad_strategy(dist, capsys, {"dev_matrix": [2, 2], "tensor_map": [1, -1]}, "dev_matrix [2, 2]", "4 devices", "2 ranks")


def test_tensor_map_names_missing_axis(dist: Path, capsys) -> None:
    bad_strategy(dist, capsys, {"tensor_map": [3, -1]}, "device axis 3")


def test_split_does_not_divide(dist: Path, capsys) -> None:
    bad_strategy(dist, capsys, {"shape": [7, 4]}, "dim 0 of size 7", "2 equal parts")


def test_negative_stored_shape(dist: Path, capsys) -> None:
    """[-4, -4] holds the local box's 16 elements by product, and no reader could read it."""
    bad_strategy(dist, capsys, {"stored_shape": [-4, -4]}, "stored_shape [-4, -4]", "positive")


# -- other formats --------------------------------------------------------------------------
class _Payload:
    """Pickles as a call to os.system: loading it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2, 2), "evil": _Payload(marker)}, tmp_path / "model.pt")
    cfg = job(tmp_path, load_checkpoint=str(tmp_path / "model.pt"), use_parallel=False, output_dir=str(tmp_path / "out"))
    run_fails(capsys, tmp_path, cfg, 1, "model.pt", "refused", "system")
    fails(capsys, ["inspect", str(tmp_path / "model.pt")], 1, "refused")
    assert not marker.exists()
    # the same in a real process, exactly as a user runs it
    proc = subprocess.run([sys.executable, "-m", "runner", "inspect", str(tmp_path / "model.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "refused" in proc.stderr.splitlines()[0], proc.stderr
    assert not marker.exists()


def test_corrupt_torch_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04" + os.urandom(200))
    cfg = job(tmp_path, load_checkpoint=str(tmp_path / "model.pt"), use_parallel=False, output_dir=str(tmp_path / "out"))
    run_fails(capsys, tmp_path, cfg, 1, "model.pt")


def pt_job(tmp: Path, pt: Path) -> Path:
    return job(tmp, load_checkpoint=str(pt), use_parallel=False, output_dir=str(tmp / "out"))


def test_torch_stride0_view_claiming_gigabytes(tmp_path: Path) -> None:
    """A 1 KB file whose tensor is a stride-0 view claiming [24000, 24000] float32 (2.3 GB):
    one line, exit 1, within 200 MB, nothing written."""
    from tests.limited import one_line, run_limited

    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1).as_strided((24000, 24000), (0, 0)), "b": torch.ones(3)}, pt)
    assert pt.stat().st_size < 4096
    one_line(run_limited(["inspect", str(pt)], 200 << 20), 1, "'w'", "overlap")
    one_line(run_limited(["run", str(pt_job(tmp_path, pt)), "--no-progress"], 200 << 20), 1, "'w'", "overlap")
    assert not (tmp_path / "out" / "transformed_checkpoint").exists() or not list((tmp_path / "out").rglob("*.safetensors"))


def test_torch_overlapping_view_is_refused(tmp_path: Path, capsys) -> None:
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.arange(10.0).as_strided((5, 4), (1, 1))}, pt)  # rows share elements
    run_fails(capsys, tmp_path, pt_job(tmp_path, pt), 1, "'w'", "overlap")


def test_torch_zip_bomb(tmp_path: Path) -> None:
    """A .pt whose pickle member is deflated from 300 MB to well under 1 MB: refused before
    anything is decompressed (one line, exit 1, within 100 MB)."""
    import zipfile

    from tests.limited import one_line, run_limited

    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(4)}, good)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w") as z:
        for m in src.infolist():
            if not m.filename.endswith("data.pkl"):
                z.writestr(m, src.read(m))
                continue
            info = zipfile.ZipInfo(m.filename)
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                f.write(src.read(m))  # the real pickle, then 300 MB the unpickler never reaches
                for _ in range(300):
                    f.write(bytes(1 << 20))
    assert bomb.stat().st_size < 1 << 20
    one_line(run_limited(["inspect", str(bomb)], 100 << 20), 1, "data.pkl", "compressed")
    one_line(run_limited(["run", str(pt_job(tmp_path, bomb)), "--no-progress"], 100 << 20), 1, "data.pkl", "compressed")


def test_torch_dicts_nested_2000_deep(tmp_path: Path, capsys) -> None:
    """Read without recursion: the tensor is found under its 2,000-part name."""
    doc: dict = {"w": torch.arange(6.0).reshape(2, 3)}
    for _ in range(2000):
        doc = {"a": doc}
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # torch.save itself recurses
    try:
        torch.save(doc, tmp_path / "deep.pt")
    finally:
        sys.setrecursionlimit(old)
    assert main(["inspect", str(tmp_path / "deep.pt")]) == 0
    out = capsys.readouterr().out
    assert "a." * 2000 + "w: [2, 3] F32" in out


@pytest.mark.parametrize("content,phrase", [
    (b"\xd9\x5e\x3a\x7f" + bytes(60), "encrypted"),  # MindSpore's AES-GCM magic
    (b"\x0a\xff\xff\xff\xff\x0f" + bytes(10), "corrupt"),  # a record claiming 4 GB
    (b"garbage, not protobuf", "not a MindSpore checkpoint"),
])
def test_encrypted_or_corrupt_ckpt(tmp_path: Path, capsys, content: bytes, phrase: str) -> None:
    (tmp_path / "model.ckpt").write_bytes(content)
    cfg = job(tmp_path, load_checkpoint=str(tmp_path / "model.ckpt"), use_parallel=False, output_dir=str(tmp_path / "out"))
    run_fails(capsys, tmp_path, cfg, 1, "model.ckpt", phrase)


def metadata_budget(path: Path) -> int:
    """What listing a file whose bytes are nearly all metadata may cost beyond start-up:
    8 MB for what `inspect` imports, and 6 times the file's size, which covers the file's
    mapping (1x) and the names and entries parsed from it (measured: under 5x; before the
    readers were made compact, 8x for a safetensors header and 11x for a .ckpt)."""
    return (8 << 20) + 6 * path.stat().st_size


def test_ckpt_of_many_tiny_records_reads_in_bounded_memory(tmp_path: Path) -> None:
    """200,000 one-byte tensors (4.9 MB): inspect lists them all within metadata_budget."""
    from tests.limited import run_limited

    def varint(n: int) -> bytes:
        out = bytearray()
        while n > 0x7F:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        return bytes(out + bytes([n]))

    def field(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    tensor = b"\x08\x01" + field(2, b"UInt8") + field(3, b"\x07")  # dims [1], UInt8, one byte
    path = tmp_path / "many.ckpt"
    path.write_bytes(b"".join(field(1, field(1, f"t{i}".encode()) + field(2, tensor)) for i in range(200_000)))
    proc = run_limited(["inspect", str(path)], metadata_budget(path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "200000 tensors" in proc.stdout and "  t199999: [1] U8" in proc.stdout


def test_safetensors_header_of_many_tensors_reads_in_bounded_memory(tmp_path: Path) -> None:
    """An 11 MB header of 100,000 one-byte tensors: inspect lists them all within
    metadata_budget (the header is parsed once, each entry kept as a shared TensorInfo
    and its byte range, not as the dicts and lists JSON gives)."""
    from tests.limited import run_limited

    n = 100_000
    header = {f"model.layers.{i}.some_long_parameter_name.weight": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]}
              for i in range(n)}
    path = tmp_path / "big.safetensors"
    path.write_bytes(raw_safetensors(header, bytes(n)))
    proc = run_limited(["inspect", str(path)], metadata_budget(path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{n} tensors" in proc.stdout and f"  model.layers.{n - 1}.some_long_parameter_name.weight: [1] U8" in proc.stdout


def test_corrupt_mindspore_strategy(dist: Path, capsys) -> None:
    (dist / "ms").mkdir()
    (dist / "ms" / "ckpt_strategy_rank_0.ckpt").write_bytes(b"\xff\xff\xff garbage")
    run_fails(capsys, dist, merge_job(dist, src_strategy_path_or_dir=str(dist / "ms")), 1, "ckpt_strategy_rank_0.ckpt")


# -- Megatron folders ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def megatron_tp2(tmp_path_factory) -> Path:
    """A Megatron TP2 checkpoint (root with latest_checkpointed_iteration.txt and iter_*/)."""
    from tests.convert_util import make_hf, run

    root = tmp_path_factory.mktemp("megatron")
    assert run(load_checkpoint=str(make_hf(root / "hf", "qwen2")), output_format="megatron",
               parallel_config={"model_parallel": 2}, output_dir=str(root / "m")) == 0
    return root / "m" / "transformed_checkpoint"


def megatron_copy(src: Path, dst: Path, **args) -> Path:
    """A copy of `src` whose first rank file's args have `args` set (plain torch: test data)."""
    import shutil

    shutil.copytree(src, dst)
    first = sorted(dst.glob("iter_*/mp_rank_00/model_optim_rng.pt"))[0]
    doc = torch.load(first, weights_only=False)
    for k, v in args.items():
        setattr(doc["args"], k, v)
    torch.save(doc, first)
    return dst


@pytest.mark.parametrize("key,value", [
    ("tensor_model_parallel_size", "2"), ("tensor_model_parallel_size", 2.0), ("tensor_model_parallel_size", -3),
    ("tensor_model_parallel_size", True), ("pipeline_model_parallel_size", 0), ("hidden_size", "64"),
    ("num_attention_heads", -1), ("num_layers", 2.5), ("norm_epsilon", "tiny"),
])
def test_megatron_args_that_are_not_positive_ints(megatron_tp2: Path, tmp_path: Path, capsys, key: str, value) -> None:
    folder = megatron_copy(megatron_tp2, tmp_path / "m", **{key: value})
    fails(capsys, ["inspect", str(folder)], 1, "Megatron args", key)
    cfg = job(tmp_path, load_checkpoint=str(folder), output_format="hf", output_dir=str(tmp_path / "out"))
    run_fails(capsys, tmp_path, cfg, 1, "Megatron args", key)


@pytest.mark.parametrize("key", ["tensor_model_parallel_size", "expert_model_parallel_size", "hidden_size", "num_layers",
                                 "num_query_groups", "padded_vocab_size", "num_experts"])
def test_megatron_args_claiming_huge_sizes(megatron_tp2: Path, tmp_path: Path, key: str) -> None:
    """10^9 in any size: one line and exit 1, within 300 MB more than start-up needs."""
    from tests.limited import one_line, run_limited

    folder = megatron_copy(megatron_tp2, tmp_path / "m", **{key: 10**9})
    cfg = job(tmp_path, load_checkpoint=str(folder), output_format="hf", output_dir=str(tmp_path / "out"))
    one_line(run_limited(["run", str(cfg), "--no-progress"], 300 << 20), 1, key)


@pytest.mark.parametrize("content", ["9" * 5000, "\u00b2", "12 13", "-1", "release\nrelease", "\x00" * 10, ""])
def test_megatron_marker_file_that_is_not_an_iteration(megatron_tp2: Path, tmp_path: Path, capsys, content: str) -> None:
    import shutil

    shutil.copytree(megatron_tp2, tmp_path / "m")
    marker = tmp_path / "m" / "latest_checkpointed_iteration.txt"
    marker.write_text(content)
    line = fails(capsys, ["inspect", str(tmp_path / "m")], 1, "latest_checkpointed_iteration.txt", "not an iteration number")
    assert len(line) < len(str(marker)) + 150, line


@pytest.mark.parametrize("target", ["/dev/zero", "/etc/passwd"])
def test_megatron_marker_linked_to_a_device_or_a_secret(megatron_tp2: Path, tmp_path: Path, target: str) -> None:
    """At most 64 bytes are read and at most 80 characters shown, within 100 MB of memory."""
    import shutil

    from tests.limited import one_line, run_limited

    shutil.copytree(megatron_tp2, tmp_path / "m")
    marker = tmp_path / "m" / "latest_checkpointed_iteration.txt"
    marker.unlink()
    marker.symlink_to(target)
    line = one_line(run_limited(["inspect", str(tmp_path / "m")], 100 << 20, timeout=60), 1, "not an iteration number")
    assert len(line) < len(str(marker)) + 150, line
    lines = Path(target).read_text().splitlines() if target == "/etc/passwd" else []
    assert not any(x in line for x in lines[1:] if x), line


# -- the job file ---------------------------------------------------------------------------
def test_yaml_misspelled_key_and_wrong_type(dist: Path, capsys) -> None:
    fails(capsys, ["run", str(merge_job(dist, auto_trans_ckp=True))], 2, "auto_trans_ckp", "did you mean auto_trans_ckpt")
    fails(capsys, ["run", str(merge_job(dist, use_parallel="no way"))], 2, "use_parallel", "expected bool")
    fails(capsys, ["run", str(merge_job(dist, transform_process_num="two"))], 2, "transform_process_num", "expected int")
    fails(capsys, ["run", str(merge_job(dist)), "parallel_config.model_parallel=x"], 2, "parallel_config.model_parallel")
    (dist / "broken.yaml").write_text("load_checkpoint: [unclosed\n")
    fails(capsys, ["run", str(dist / "broken.yaml")], 2, "broken.yaml", "line")


def test_job_file_with_nul_byte_or_unclosed_override(dist: Path, capsys) -> None:
    cfg = merge_job(dist)
    (dist / "nul.yaml").write_bytes(cfg.read_bytes().replace(b"ckpt", b"ck\x00pt", 1))
    fails(capsys, ["run", str(dist / "nul.yaml")], 2, "nul.yaml", "cannot parse YAML")
    fails(capsys, ["run", str(cfg), "load_checkpoint=[1,2"], 2, "load_checkpoint=[1,2", "cannot parse")


@pytest.mark.parametrize("size", ["1" + "0" * 400 + "GB", "99999999999999999999TB", 2**70])
def test_max_shard_size_too_big(megatron_tp2: Path, tmp_path: Path, capsys, size) -> None:
    cfg = job(tmp_path, load_checkpoint=str(megatron_tp2), output_format="hf", output_dir=str(tmp_path / "out"),
              max_shard_size=size)
    fails(capsys, ["run", str(cfg), "--no-progress"], 2, "max_shard_size", "too large")


# -- replicas and names ---------------------------------------------------------------------
def test_replicated_copies_that_disagree_are_found_by_verify(dist: Path, capsys) -> None:
    """A transform reads each piece from one holder; `verify` (and `verify: true`) compares
    every replicated copy with the first and names the parameter and ranks."""
    full = oracle.random_full(SPECS, seed=3)
    shard = oracle.shard(full, tp2(), 1)
    shard["e"] = shard["e"].clone()
    shard["e"][2, 3] += 1  # e is replicated on ranks 0 and 1
    save_file(shard, str(rank_file(dist, 1)))
    assert main(["run", str(merge_job(dist, verify=True)), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "parameter e: replicas on source ranks 0 and 1 disagree" in out, out
    assert main(["verify", str(dist / "ckpt"), str(dist / "full.safetensors"), "--strategy-a", str(dist / "strategy")]) == 1
    assert "parameter e: replicas on source ranks 0 and 1 disagree" in capsys.readouterr().out
    # agreeing replicas pass
    save_file(oracle.shard(full, tp2(), 1), str(rank_file(dist, 1)))
    assert main(["verify", str(dist / "ckpt"), str(dist / "full.safetensors"), "--strategy-a", str(dist / "strategy")]) == 0
    assert "bit-identical" in capsys.readouterr().out


HOSTILE = ["../../escape", "/abs/name", "a/b\\c", "nul\x00byte", ".."]


def read_names(path: Path) -> set[str]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return set(json.loads(data[8:8 + n])) - {"__metadata__"}


def test_parameter_names_with_path_parts_are_data_not_paths(tmp_path: Path, capsys) -> None:
    """Tensor names never become paths: names with '..', '/', '\\' or NUL are carried
    through as data, and every file the job writes is inside output_dir."""
    rng = np.random.default_rng(0)
    arrays = {n: rng.standard_normal((4, 2)).astype(np.float32) for n in HOSTILE}
    header, data = {}, b""
    for n, a in arrays.items():
        header[n] = {"dtype": "F32", "shape": [4, 2], "data_offsets": [len(data), len(data) + a.nbytes]}
        data += a.tobytes()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "full.safetensors").write_bytes(raw_safetensors(header, data))
    dst = oracle.strategy([[0, 1]], {n: oracle.param((4, 2), "F32", dev_matrix=[2], tensor_map=[0, -1]) for n in HOSTILE})
    oracle.write_strategy(dst, tmp_path / "dst")
    before = {p for p in tmp_path.rglob("*")}
    cfg = job(tmp_path, load_checkpoint=str(tmp_path / "src" / "full.safetensors"),
              dst_strategy_path_or_dir=str(tmp_path / "dst"), output_dir=str(tmp_path / "out"))
    assert main(["run", str(cfg), "--no-progress"]) == 0, capsys.readouterr().err
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(tmp_path / "out") for p in new if p != cfg), new
    assert not Path("/abs").exists()
    for r in (0, 1):
        path = tmp_path / "out" / "transformed_checkpoint" / f"rank_{r}" / f"checkpoint_{r}.safetensors"
        assert read_names(path) == set(HOSTILE)
        from safetensors.numpy import load_file
        got = load_file(str(path))
        for n, a in arrays.items():
            assert np.array_equal(got[n], a[2 * r:2 * r + 2])


@pytest.mark.parametrize("prefix", ["../evil_", "/tmp/evil_", "sub/dir_", "nul\x00_", "a\\b"])
def test_prefix_that_would_leave_the_rank_folder_is_refused(dist: Path, capsys, prefix: str) -> None:
    """`prefix` is the one job string that becomes part of an output file name."""
    fails(capsys, ["run", str(merge_job(dist, prefix=prefix))], 2, "prefix")


def test_rank_count_disagrees_with_strategy(dist: Path, capsys) -> None:
    """A third rank folder the 2-rank strategy does not know is not silently ignored."""
    import shutil

    shutil.copytree(dist / "ckpt" / "rank_1", dist / "ckpt" / "rank_2")
    run_fails(capsys, dist, merge_job(dist), 1, "3 rank(s)", "strategy has 2")


def test_huge_rank_folder_number(dist: Path, capsys) -> None:
    """A stray rank_99999999999 folder is a gap to report, not a range to enumerate."""
    (dist / "ckpt" / "rank_99999999999").mkdir()
    run_fails(capsys, dist, merge_job(dist), 1, "rank_2, rank_3", "missing", "found 3 of 100000000000")


def test_hostile_name_in_an_error_stays_one_line(dist: Path, capsys) -> None:
    """Names come from files; a newline or terminal escape in one is printed escaped."""
    s = tp2()
    s["params"]["evil\nname\x1b[2J"] = oracle.param((2,), "F32", dev_matrix=[2])
    oracle.write_strategy(s, dist / "s_evil")
    line = run_fails(capsys, dist, merge_job(dist, src_strategy_path_or_dir=str(dist / "s_evil")), 1,
                     "in the source strategy but not the checkpoint")
    assert "evil\\nname\\x1b[2J" in line


EVIL = "evil\x1b[2J\nautotrans: done: 0 files\r"


def test_names_from_files_are_escaped_in_inspect_diff_and_verify(tmp_path: Path, capsys) -> None:
    """A tensor name holding a newline, a carriage return and a terminal escape never
    reaches the terminal raw: no fake lines, no escape sequences."""
    def st(path: Path, value: float) -> Path:
        arr = np.full((2,), value, np.float32)
        header = {EVIL: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
        path.write_bytes(raw_safetensors(header, arr.tobytes()))
        return path

    a, b = st(tmp_path / "a.safetensors", 1.0), st(tmp_path / "b.safetensors", 2.0)
    s1 = oracle.strategy([[0]], {EVIL: oracle.param((2,), "F32")})
    s2 = oracle.strategy([[0]], {EVIL: oracle.param((2,), "F16")})
    oracle.write_strategy(s1, tmp_path / "s1")
    oracle.write_strategy(s2, tmp_path / "s2")
    for args, code in ((["inspect", str(a)], 0), (["verify", str(a), str(b)], 1),
                       (["diff", str(tmp_path / "s1"), str(tmp_path / "s2")], 1), (["inspect", str(tmp_path / "s1")], 0)):
        assert main(args) == code, args
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\r" not in out, (args, out)
        assert not any(line.startswith("autotrans: done") for line in out.splitlines()), (args, out)
        assert "evil\\x1b[2J\\nautotrans: done: 0 files\\r" in out, (args, out)


@pytest.mark.parametrize("value", [0, -5, "soon", True, float("nan"), float("inf")])
def test_mpi_timeout_must_be_a_positive_number_of_seconds(value) -> None:
    from runner.config import from_mapping
    from runner.errors import ConfigError

    with pytest.raises(ConfigError, match="config key mpi_timeout") as e:
        from_mapping({"mpi_timeout": value})
    assert e.value.exit_code == 2


def test_names_and_paths_are_escaped_in_warnings_and_the_done_line(tmp_path: Path, capsys) -> None:
    """A source folder and an output_dir whose names hold a terminal escape, a newline
    and a fake closing line: the warning naming the source and the closing `done` line
    stay one line each, with no escape sequence."""
    from tests.convert_util import make_hf

    evil = "m\x1b[2J\nautotrans: done: 0 files\r"
    hf = make_hf(tmp_path / evil, "qwen2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf / name).unlink(missing_ok=True)  # so the run warns, naming the source folder
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({"load_checkpoint": str(hf), "output_format": "hf", "output_dir": str(tmp_path / f"out{evil}")}))
    capsys.readouterr()
    assert main(["run", str(cfg), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err, err
    lines = err.splitlines()
    assert [line.split(":")[1] for line in lines] == [" warning", " done"], lines
    assert "m\\x1b[2J\\nautotrans: done: 0 files\\r" in lines[0] and lines[1].endswith("m\\x1b[2J\\nautotrans: done: 0 files\\r/transformed_checkpoint"), lines


def test_running_out_of_memory_is_one_line(tmp_path: Path) -> None:
    """A 22 MB safetensors header read with 60 MB to spare: exit 1 with one line saying
    memory ran out, not an internal error."""
    from tests.limited import one_line, run_limited

    n = 200_000
    header = {f"model.layers.{i}.some_long_parameter_name.weight": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]}
              for i in range(n)}
    path = tmp_path / "big.safetensors"
    path.write_bytes(raw_safetensors(header, bytes(n)))
    one_line(run_limited(["inspect", str(path)], 60 << 20), 1, "out of memory")


_LONG = "x" * 10_000  # a 10 KB token in a hostile file


def _hostile_yaml(tmp: Path, text: str, source: Path | None = None) -> list[str]:
    (tmp / "job.yaml").write_text(f"load_checkpoint: {source or tmp}\noutput_dir: {tmp / 'out'}\n{text}\n")
    return ["run", str(tmp / "job.yaml"), "--no-progress"]


def _hostile_hf_config(tmp: Path) -> list[str]:
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text(json.dumps({"model_type": _LONG}))
    save_file({"w": torch.ones(2)}, str(tmp / "hf" / "model.safetensors"))
    return _hostile_yaml(tmp, "use_parallel: false\noutput_format: megatron", source=tmp / "hf")


def _hostile_pickle(tmp: Path) -> list[str]:
    import zipfile

    torch.save({"w": torch.ones(2)}, tmp / "good.pt")
    with zipfile.ZipFile(tmp / "good.pt") as src, zipfile.ZipFile(tmp / "bad.pt", "w") as z:
        for m in src.infolist():  # the pickle calls a global with a 10 KB module name
            z.writestr(m, b"\x80\x02c" + _LONG.encode() + b"\nsystem\n)R." if m.filename.endswith("data.pkl") else src.read(m))
    return ["inspect", str(tmp / "bad.pt")]


def _hostile_safetensors(tmp: Path) -> list[str]:
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    raw = f'{{"{_LONG}":{entry},"{_LONG}":{entry}}}'.encode()  # a 10 KB key, twice
    (tmp / "dup.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    return ["inspect", str(tmp / "dup.safetensors")]


@pytest.mark.parametrize("hostile,code", [
    (lambda tmp: _hostile_yaml(tmp, f"prefix: ${{{_LONG}}}"), 2),  # OmegaConf quotes the interpolation key
    (lambda tmp: _hostile_yaml(tmp, f"use_parallel: {_LONG}"), 2),  # a wrongly typed value
    (lambda tmp: _hostile_yaml(tmp, "")[:2] + [f"dtype={_LONG}", "--no-progress"], 2),  # an override
    (_hostile_hf_config, 1),  # config.json's model_type
    (_hostile_pickle, 1),  # a pickle global's name
    (_hostile_safetensors, 1),  # a duplicate header key
], ids=["yaml-interpolation", "yaml-value", "override", "hf-config", "pickle-global", "safetensors-key"])
def test_file_content_is_never_echoed_beyond_80_characters(tmp_path: Path, capsys, hostile, code: int) -> None:
    """Parsers' messages and our own quote what a file holds; the printed line holds at
    most 80 characters of it, and is one line with the exit code of a bad file or job."""
    line = fails(capsys, hostile(tmp_path), code)
    assert "x" * 81 not in line and "x" * 50 in line, line
