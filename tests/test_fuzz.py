"""Fuzzing the readers of untrusted files (issue #8): safetensors headers, native
strategy JSON, MindSpore .ckpt checkpoints and protobuf strategy files, torch zips.
Whatever the bytes, only runner.errors.AutotransError subclasses escape; a file the
reader accepts can be read whole; nothing hangs (each call runs under an alarm far
above its normal time) and a header claiming a huge size allocates nothing like it."""

from __future__ import annotations

import json
import math
import signal
import struct
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from runner import dtypes, strategy as strat, strategy_files
from runner.errors import AutotransError
from runner.formats.base import Entry
from runner.formats.safetensors_io import SafetensorsReader, read_header
from tests import oracle

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)


@contextmanager
def no_hang(seconds: float = 30.0):
    """Fail instead of hanging: a reader stuck in a loop raises here."""
    def alarm(signum, frame):
        raise TimeoutError(f"reader still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def only_our_errors(fn, *args):
    """Run `fn`; an AutotransError is a fine answer to bad bytes, anything else fails."""
    with no_hang():
        try:
            return fn(*args)
        except AutotransError as e:
            assert str(e)
            return None


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` with a few random flips, overwrites, insertions and a possible cut."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "overwrite", "insert", "cut"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(chunk)] = chunk
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos:]
    return bytes(data)


# -- safetensors --------------------------------------------------------------------------
def read_all(r) -> None:
    """Read every tensor's bytes from an opened reader: what it accepted must be real."""
    try:
        for name, info in r.tensors().items():
            a = r.array(name)
            assert a.shape == info.shape and a.nbytes == info.numel * a.itemsize
            a.tobytes()
    finally:
        r.close()


def read_safetensors(path: Path) -> None:
    read_all(SafetensorsReader(path))


def safetensors_seed() -> bytes:
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
              "c": {"dtype": "I64", "shape": [], "data_offsets": [32, 40]}}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(range(40))


@FUZZ
@given(data=st.data())
def test_safetensors_reader_mutated_files(scratch: Path, data) -> None:
    path = scratch / "m.safetensors"
    path.write_bytes(data.draw(mutated(safetensors_seed())))
    only_our_errors(read_safetensors, path)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=6), JSON, max_size=4) | JSON, tail=st.binary(max_size=64))
def test_safetensors_reader_random_headers(scratch: Path, header, tail: bytes) -> None:
    raw = json.dumps(header).encode()
    path = scratch / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + tail)
    only_our_errors(read_safetensors, path)


@FUZZ
@given(entries=st.dictionaries(st.text(min_size=1, max_size=4), st.tuples(
    st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "I64", "BOOL", "F8_E4M3", "X"]),
    st.lists(st.integers(-1, 2**62), max_size=3), st.integers(-8, 200), st.integers(-8, 200)), max_size=4),
    tail=st.integers(0, 200))
def test_safetensors_reader_plausible_headers(scratch: Path, entries, tail: int) -> None:
    header = {n: {"dtype": d, "shape": s, "data_offsets": [b, e]} for n, (d, s, b, e) in entries.items()}
    raw = json.dumps(header).encode()
    path = scratch / "p.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(tail))
    only_our_errors(read_safetensors, path)


@pytest.mark.parametrize("claim", [2**63, 2**40, 100 * 2**20, 5000])
def test_huge_header_claim_allocates_nothing(scratch: Path, claim: int) -> None:
    path = scratch / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", claim) + b"{}" * 100)
    tracemalloc.start()
    try:
        with pytest.raises(AutotransError, match="header length"):
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_deeply_nested_header_is_a_format_error(scratch: Path) -> None:
    raw = b"[" * 200_000 + b"]" * 200_000
    path = scratch / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(AutotransError, match="header"):
        read_header(path)


# the safetensors library's dtypes and element sizes in bits (its Dtype enum)
LIB_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
            "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
            "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
MISTAKES = ["shape", "offsets", "meta", "extra", "dup", "tail", "drop", "nan", "negzero", "surrogate"]


@st.composite
def near_valid_header(draw) -> tuple[bytes, int]:
    """(raw header JSON, data length): a valid safetensors header, or one with a single mistake."""
    pairs, pos = [], 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(LIB_BITS)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = math.prod(shape) * LIB_BITS[dtype] // 8
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
        pairs.append([f"t{i}", entry])
    meta = draw(st.none() | st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
    if meta is not None or draw(st.booleans()):
        pairs.insert(0, ["__metadata__", meta])
    mistake = draw(st.sampled_from([None, None, *MISTAKES]))
    tensors = [e for k, e in pairs if k != "__metadata__"]
    target = draw(st.sampled_from(tensors)) if tensors else {}
    if mistake == "shape" and target:
        target["shape"] = [*target["shape"], draw(st.sampled_from([-1, True, 1.0, 2**64, "2", None, [1]]))]
    elif mistake == "offsets" and target:
        b, e = target["data_offsets"]
        target["data_offsets"] = draw(st.sampled_from([[b + 1, e + 1], [b, e - 1], [b - 1, e], [b], [b, e, e], [False, e], [b, float(e)]]))
    elif mistake == "meta":
        pairs.insert(0, ["__metadata__", draw(st.sampled_from([{"k": 1}, {"k": None}, {"k": []}, [], "text", 0]))])
    elif mistake == "extra" and target:
        depth = draw(st.integers(120, 130))
        target["z"] = json.loads("[" * depth + "]" * depth) if depth < 128 else {"x": draw(JSON)}
    elif mistake == "drop" and target:
        del target[draw(st.sampled_from(sorted(target)))]
    elif mistake == "dup" and pairs:
        pairs.append(list(draw(st.sampled_from(pairs))))
    elif mistake == "surrogate" and pairs:
        pairs[-1][0] += "\ud800"
    text = {"nan": "NaN", "negzero": "-0"}.get(mistake or "")
    raw = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    if text and tensors:  # spliced in as raw JSON text, which json.dumps would not write
        raw = raw.replace('"shape": [', f'"shape": [{text}, ', 1)
    return raw.encode("utf-8", "surrogatepass"), pos + (draw(st.integers(1, 3)) if mistake == "tail" else 0)


def library_accepts(data: bytes) -> bool:
    from safetensors import SafetensorError, deserialize

    try:
        deserialize(data)
    except SafetensorError:
        return False
    return True


def we_accept(path: Path) -> bool:
    with no_hang():
        try:
            read_header(path)
        except AutotransError:
            return False
    return True


def plain(data: bytes) -> bool:
    """No duplicate JSON keys and only dtypes autotrans supports: autotrans refuses
    more than the library only where one of these fails."""
    found = []

    def pairs(kv: list) -> dict:
        found.append(len({k for k, _ in kv}) == len(kv) and all(v in dtypes.ITEMSIZE for k, v in kv if k == "dtype"))
        return dict(kv)
    try:
        json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]], object_pairs_hook=pairs)
    except (ValueError, RecursionError, struct.error):
        pass
    return all(found)


def same_verdict(path: Path, data: bytes) -> None:
    """Whatever the safetensors library refuses, autotrans refuses; what it accepts,
    autotrans accepts unless the header is not `plain`."""
    path.write_bytes(data)
    ours, theirs = we_accept(path), library_accepts(data)
    assert ours == theirs or (not ours and not plain(data)), (ours, theirs, data[:300])


@FUZZ
@given(case=near_valid_header())
def test_safetensors_header_verdict_equals_the_library(scratch: Path, case) -> None:
    raw, data_len = case
    same_verdict(scratch / "v.safetensors", struct.pack("<Q", len(raw)) + raw + bytes(data_len))


@FUZZ
@given(data=st.data())
def test_safetensors_mutated_file_verdict_equals_the_library(scratch: Path, data) -> None:
    same_verdict(scratch / "mv.safetensors", data.draw(mutated(safetensors_seed())))


# -- native strategy files ----------------------------------------------------------------
VALID = oracle.strategy([[0, 1], [2, 3]], {
    "w": oracle.param((4, 6), "BF16", stage=0, dev_matrix=[2], tensor_map=[0, -1]),
    "v": oracle.param((6, 4), "F32", stage=[0, 1], dev_matrix=[1, 2], tensor_map=[-1, [0]], opt_shard=1),
    "s": oracle.param((), "I64", stage=1, dev_matrix=[2], tensor_map=[]),
})


def use_strategy(doc) -> None:
    """Parse, validate, and walk every rank's boxes, as a job would."""
    s = strat.parse_native(doc, "fuzz.json")
    s.validate()
    for r in s.ranks:
        for name in s.params_of_rank(r):
            s.box(name, r)
    strat.parse_native(json.loads(json.dumps(s.to_json())), "again.json")


@FUZZ
@given(doc=JSON)
def test_strategy_reader_random_json(doc) -> None:
    only_our_errors(use_strategy, doc)


@FUZZ
@given(where=st.sampled_from(["top", "param"]), key=st.sampled_from(
    ["format", "version", "stages", "params", "shape", "dtype", "stage", "dev_matrix", "tensor_map", "opt_shard",
     "opt_shard_step", "stored_shape"]), value=JSON, name=st.sampled_from(["w", "v", "s"]))
def test_strategy_reader_one_field_replaced(where: str, key: str, value, name: str) -> None:
    doc = json.loads(json.dumps(VALID))
    target = doc if where == "top" else doc["params"][name]
    target[key] = value
    only_our_errors(use_strategy, doc)


@FUZZ
@given(data=st.data())
def test_strategy_file_mutated_bytes(scratch: Path, data) -> None:
    path = scratch / "merged_ckpt_strategy.json"
    path.write_bytes(data.draw(mutated(json.dumps(VALID).encode())))
    only_our_errors(lambda: strategy_files.load(path).validate())


def test_deeply_nested_strategy_json_is_a_format_error(scratch: Path) -> None:
    path = scratch / "deep" / "s.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(AutotransError):
        strategy_files.load(path)


# -- MindSpore .ckpt and protobuf strategy files ------------------------------------------
def ckpt_seed() -> bytes:
    from runner.formats.mindspore_ckpt import layout

    entries = [Entry("w", "F32", (2, 3)), Entry("b", "F16", (4,)), Entry("step", "I32", ())]
    lay = layout(entries)
    buf = bytearray(lay.size)
    for offset, piece in lay.pieces:
        buf[offset:offset + len(piece)] = piece
    for e in entries:
        n = int(np.prod(e.shape, dtype=np.int64)) * {"F32": 4, "F16": 2, "I32": 4}[e.dtype]
        for offset, length in lay.tensor_runs(e.name, n):
            buf[offset:offset + length] = bytes(range(1, length + 1))
    return bytes(buf)


def read_ckpt(path: Path) -> None:
    from runner.formats.mindspore_ckpt import CkptReader

    read_all(CkptReader(path))


def test_ckpt_seed_is_readable(scratch: Path) -> None:
    path = scratch / "seed.ckpt"
    path.write_bytes(ckpt_seed())
    read_ckpt(path)


@FUZZ
@given(data=st.data())
def test_ckpt_reader_mutated_files(scratch: Path, data) -> None:
    path = scratch / "m.ckpt"
    path.write_bytes(data.draw(mutated(ckpt_seed())))
    only_our_errors(read_ckpt, path)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_ckpt_reader_random_bytes(scratch: Path, raw: bytes) -> None:
    path = scratch / "r.ckpt"
    path.write_bytes(raw)
    only_our_errors(read_ckpt, path)


def test_ckpt_record_claiming_huge_length_allocates_nothing(scratch: Path) -> None:
    path = scratch / "claim.ckpt"
    path.write_bytes(b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\x7f" + bytes(100))  # a record of 2**63 bytes
    tracemalloc.start()
    try:
        with pytest.raises(AutotransError):
            read_ckpt(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def ms_strategy_seed(scratch: Path) -> bytes:
    from runner.formats.mindspore_strategy import write_rank_file

    s = strat.parse_native(VALID, "valid")
    return write_rank_file(s, 2, scratch / "ms_seed").read_bytes()


def read_ms_strategy(path: Path) -> None:
    from runner.formats import mindspore_strategy

    s = mindspore_strategy.load([path], str(path))
    for r in s.ranks:
        for name in s.params_of_rank(r):
            s.params[name].holders()


@FUZZ
@given(data=st.data())
def test_mindspore_strategy_reader_mutated_files(scratch: Path, data) -> None:
    seed = ms_strategy_seed(scratch)
    path = scratch / "m" / "ckpt_strategy_rank_0.ckpt"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data.draw(mutated(seed)))
    only_our_errors(read_ms_strategy, path)


@FUZZ
@given(raw=st.binary(min_size=1, max_size=200))
def test_mindspore_strategy_reader_random_bytes(scratch: Path, raw: bytes) -> None:
    path = scratch / "r" / "ckpt_strategy_rank_0.ckpt"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(raw)
    only_our_errors(read_ms_strategy, path)


# -- torch zip checkpoints ----------------------------------------------------------------
def torch_seed(scratch: Path) -> bytes:
    import torch

    path = scratch / "seed.pt"
    torch.save({"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
                "iteration": 3}, path)
    return path.read_bytes()


def read_torch(path: Path) -> None:
    from runner.formats.torch_pt import TorchReader

    read_all(TorchReader(path))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_torch_reader_mutated_files(scratch: Path, data) -> None:
    seed = torch_seed(scratch)
    path = scratch / "m.pt"
    path.write_bytes(data.draw(mutated(seed)))
    only_our_errors(read_torch, path)


def test_torch_zip_of_a_version_zipfile_lacks_is_a_format_error(scratch: Path) -> None:
    """A central-directory entry that needs zip version 6.4 (zipfile raises
    NotImplementedError, found by the fuzz test above) is a corrupt file, not an internal error."""
    raw = bytearray(torch_seed(scratch))
    at = raw.find(b"PK\x01\x02")
    raw[at + 6:at + 8] = struct.pack("<H", 64)  # version needed to extract
    path = scratch / "v64.pt"
    path.write_bytes(bytes(raw))
    with no_hang(), pytest.raises(AutotransError, match="cannot read torch checkpoint .*zip file version 6.4"):
        read_torch(path)


# -- numbers a corrupt file can make huge ---------------------------------------------------
@pytest.mark.parametrize("stages", [[[10**18]], [[0], [2**62]], [[-1, 0]]])
def test_native_strategy_huge_rank_numbers(stages) -> None:
    doc = json.loads(json.dumps(VALID))
    doc["stages"] = stages
    with no_hang(), pytest.raises(AutotransError):
        use_strategy(doc)


def test_huge_numbers_in_json_are_format_errors(scratch: Path) -> None:
    digits = "9" * 5000  # beyond Python's int-from-string limit
    path = scratch / "digits" / "s.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(VALID).replace('"version": 1', f'"version": {digits}'))
    with no_hang(), pytest.raises(AutotransError):
        strategy_files.load(path)
    raw = ('{"a": {"dtype": "F32", "shape": [%s], "data_offsets": [0, 4]}}' % digits).encode()
    path = scratch / "digits.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with no_hang(), pytest.raises(AutotransError):
        read_header(path)


@pytest.mark.parametrize("dev_matrix,stage", [((2**25, 2**25), 0), ((2,), 2**31 - 1), ((2**20, 2), 0)])
def test_mindspore_strategy_huge_numbers(scratch: Path, dev_matrix, stage) -> None:
    """A device count or stage number no cluster has is refused, not enumerated."""
    from runner.formats import mindspore_strategy
    from runner.formats.mindspore_proto import message

    doc = message("ParallelStrategyMap")(current_stage=0)
    doc.parallel_strategy_item.add(node_name="n").parallel_strategys.stage = stage
    layouts = doc.parallel_layout_item.add(param_name="w").parallel_layouts
    layouts.field, layouts.opt_weight_shard_step, layouts.opt_weight_shard_size = 0, 0, 0
    layouts.dev_matrix.add(dim=list(dev_matrix))
    layouts.tensor_map.add(dim=[0, -1])
    path = scratch / "huge" / f"ckpt_strategy_rank_{stage}_{len(dev_matrix)}.ckpt"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(doc.SerializeToString())
    with no_hang(), pytest.raises(AutotransError):
        mindspore_strategy.load([path], str(path))


@pytest.mark.parametrize("depth", [124, 125, 126, 127])
def test_nesting_inside_a_tensor_entry_has_the_library_limit(tmp_path, depth):
    """The boundary hypothesis once found: arrays nested in an unknown key of a tensor's
    entry are accepted exactly as deep as the library accepts them."""
    header = ('{"t0":{"dtype":"BF16","shape":[],"data_offsets":[0,2],"z":' + "[" * depth + "]" * depth + "}}").encode()
    same_verdict(tmp_path / "deep.safetensors", struct.pack("<Q", len(header)) + header + b"\x00\x00")
