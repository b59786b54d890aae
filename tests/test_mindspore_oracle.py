"""autotrans against MindSpore itself: strategy files made with MindSpore's own protobuf
classes, checkpoints made and transformed by MindSpore (`transform_checkpoints`,
`transform_checkpoint_by_rank`), and every output tensor compared bit for bit with what
autotrans writes for the same job. Runs only where `import mindspore` works."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore.train import checkpoint_pb2, node_strategy_pb2  # noqa: E402

from runner.cli import main  # noqa: E402
from tests.mindspore_files import write_strategy as write_ms_strategy  # noqa: E402

H, V, F = 32, 64, 64  # hidden, vocab, ffn: small, every dim divisible by 8

# name -> (shape, dtype); layers 0 and 1 split across pipeline stages in the pp cases
WEIGHTS = {
    "model.embed.weight": ((V, H), "bf16"),
    "model.layers.0.wq.weight": ((H, H), "bf16"),
    "model.layers.0.wo.weight": ((H, H), "bf16"),
    "model.layers.0.w1.weight": ((F, H), "bf16"),
    "model.layers.0.norm.weight": ((H,), "f32"),
    "model.layers.1.wq.weight": ((H, H), "bf16"),
    "model.layers.1.w2.weight": ((H, F), "f16"),
    "model.norm_out.weight": ((H,), "f32"),
    "lm_head.weight": ((V, H), "bf16"),
}
# entries no strategy names: copied whole to every rank by both tools
EXTRAS = {"global_step": np.array([7], np.int32), "scale_sense": np.array(1024.0, np.float32)}


def split(kind: str, mp_axis: int = 0):
    """tensor_map of a weight for a Megatron-style split over device axis `mp_axis`."""
    return {"col": [mp_axis, -1], "row": [-1, mp_axis], "vocab": [mp_axis, -1], "rep": None}[kind]


KINDS = {
    "model.embed.weight": "vocab", "model.layers.0.wq.weight": "col", "model.layers.0.wo.weight": "row",
    "model.layers.0.w1.weight": "col", "model.layers.0.norm.weight": "rep", "model.layers.1.wq.weight": "col",
    "model.layers.1.w2.weight": "row", "model.norm_out.weight": "rep", "lm_head.weight": "col",
}
STAGE_OF = {n: (0 if n.startswith(("model.embed", "model.layers.0")) else 1) for n in WEIGHTS}


def full_weights() -> dict[str, np.ndarray]:
    """float32 values exactly representable in every dtype used (no rounding anywhere)."""
    rng = np.random.default_rng(5)
    out = {}
    for name, (shape, _) in WEIGHTS.items():
        out[name] = (rng.integers(-512, 512, size=shape) / 64).astype(np.float32)
    return out


def save_full(folder: Path) -> Path:
    ms_types = {"bf16": ms.bfloat16, "f16": ms.float16, "f32": ms.float32}
    items = [{"name": n, "data": ms.Tensor(a).astype(ms_types[WEIGHTS[n][1]])} for n, a in full_weights().items()]
    items += [{"name": n, "data": ms.Tensor(a)} for n, a in EXTRAS.items()]
    path = folder / "rank_0" / "full.ckpt"
    path.parent.mkdir(parents=True)
    ms.save_checkpoint(items, str(path))
    return path


def write_strategy(path: Path, stage: int, layouts: dict) -> None:
    write_ms_strategy(path, node_strategy_pb2.ParallelStrategyMap, stage, layouts)


def layouts(dp: int, mp: int, names, opt: dict | None = None, multi_axis: tuple = ()) -> dict:
    """dev_matrix [dp, mp]: mp is device axis 0, dp axis 1. `opt`: name -> shard size
    (-1 = all replicas); `multi_axis`: names whose dim 0 is split over dp then mp."""
    out = {}
    for n in names:
        ndim = len(WEIGHTS[n][0])
        tmap = split(KINDS[n]) or [-1] * ndim
        if n in multi_axis:
            tmap = [[1, 0]] + [-1] * (ndim - 1)
        size = (opt or {}).get(n, 0)
        # MindSpore's step: device-rank stride of the opt group = mp when dim 0's
        # replicas are the dp ranks, 1 when every device holds the same slice
        step = 0 if not size else (1 if tmap == [-1] * ndim else mp)
        out[n] = ([dp, mp], tmap, size, step)
    if "model.layers.0.wq.weight" in out:  # an optimizer state the checkpoint lacks: skipped
        out["adam_m.model.layers.0.wq.weight"] = out["model.layers.0.wq.weight"]
    return out


def strategy_files(folder: Path, dp: int, mp: int, pp: int, **kw) -> tuple[Path, Path]:
    """Per-stage files in `folder`/stages and MindSpore's merge of them; (dir, merged)."""
    stages = folder / "stages"
    for s in range(pp):
        names = [n for n in WEIGHTS if pp == 1 or STAGE_OF[n] == s]
        write_strategy(stages / f"ckpt_strategy_rank_{s * dp * mp}.ckpt", s, layouts(dp, mp, names, **kw))
    merged = folder / "merged_ckpt_strategy.ckpt"
    ms.merge_pipeline_strategys(str(stages), str(merged))
    return stages, merged


def tensors_of(path: Path) -> dict[str, tuple[tuple, str, bytes]]:
    """tag -> (dims, type, content bytes), chunks joined, parsed by MindSpore's own classes."""
    c = checkpoint_pb2.Checkpoint()
    c.ParseFromString(path.read_bytes())
    out: dict[str, tuple] = {}
    for v in c.value:
        t = v.tensor
        prev = out.get(v.tag, ((), "", b""))
        out[v.tag] = (tuple(t.dims), t.tensor_type, prev[2] + t.tensor_content)
    return out


def run_autotrans(tmp: Path, **keys) -> Path:
    out = tmp / "autotrans"
    job = tmp / "job.yaml"
    job.write_text("".join(f"{k}: {v}\n" for k, v in {"output_dir": out, "output_format": "ckpt", **keys}.items()))
    assert main(["run", str(job), "--no-progress"]) == 0
    return out / "transformed_checkpoint"


def assert_same(ours: Path, theirs: Path, ranks: int, same_order: bool = True) -> None:
    """Every tensor identical; with `same_order`, the files identical byte for byte (both
    keep the source checkpoint's tensor order; MindSpore orders a pipeline-staged source
    by its merged strategy file instead, which it builds in directory-listing order)."""
    for r in range(ranks):
        (mine,) = (ours / f"rank_{r}").glob("*.ckpt")
        (ref,) = (theirs / f"rank_{r}").glob("*.ckpt")
        a, b = tensors_of(mine), tensors_of(ref)
        assert sorted(a) == sorted(b), f"rank {r}: names differ"
        for name in b:
            assert a[name] == b[name], f"rank {r}: tensor {name} differs"
        if same_order:
            assert mine.read_bytes() == ref.read_bytes(), f"rank {r}: same tensors, but the files differ"


def distributed_source(tmp: Path, merged: Path) -> Path:
    """A distributed checkpoint made by MindSpore from the full one."""
    save_full(tmp / "full")
    src = tmp / "src"
    ms.transform_checkpoints(str(tmp / "full"), str(src), "checkpoint_", None, str(merged))
    return src


CASES = {
    # name: (src (dp, mp, pp, kw), dst (dp, mp, pp, kw))
    "dp2mp2_to_mp4": ((2, 2, 1, {}), (1, 4, 1, {})),
    "dp2mp2_opt_to_dp1mp2": ((2, 2, 1, {"opt": {"model.layers.0.wq.weight": 2, "model.layers.0.norm.weight": -1,
                                                   "model.embed.weight": 2}}), (1, 2, 1, {})),
    "mp2_to_dp2mp2_opt": ((1, 2, 1, {}), (2, 2, 1, {"opt": {"model.layers.0.w1.weight": -1, "model.norm_out.weight": 4,
                                                             "lm_head.weight": 2}})),
    "dp4mp2_opt2_to_dp2mp2": ((4, 2, 1, {"opt": {"model.layers.0.wq.weight": 2, "model.layers.1.w2.weight": 4,
                                                    "model.norm_out.weight": 2}}), (2, 2, 1, {})),
    "multi_axis_to_mp2": ((2, 2, 1, {"multi_axis": ("model.layers.0.w1.weight", "lm_head.weight")}), (1, 2, 1, {})),
    "pp2mp2_to_mp4": ((1, 2, 2, {}), (1, 4, 1, {})),
    "mp4_to_pp2dp2": ((1, 4, 1, {}), (2, 1, 2, {})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_distributed_to_distributed(tmp_path: Path, case: str) -> None:
    (sdp, smp, spp, skw), (ddp, dmp, dpp, dkw) = CASES[case]
    src_dir, src_merged = strategy_files(tmp_path / "src_strategy", sdp, smp, spp, **skw)
    dst_dir, dst_merged = strategy_files(tmp_path / "dst_strategy", ddp, dmp, dpp, **dkw)
    src = distributed_source(tmp_path, src_merged)
    theirs = tmp_path / "mindspore"
    ms.transform_checkpoints(str(src), str(theirs), "checkpoint_", str(src_merged), str(dst_merged))
    # autotrans reads the per-stage files (merging them itself) for the source
    ours = run_autotrans(tmp_path, load_checkpoint=src, src_strategy_path_or_dir=src_dir,
                         dst_strategy_path_or_dir=dst_merged)
    assert_same(ours, theirs, ddp * dmp * dpp, same_order=spp == 1)


def test_full_to_distributed_and_strategy_files_mindspore_reads(tmp_path: Path) -> None:
    _, merged = strategy_files(tmp_path / "dst_strategy", 2, 2, 2, opt={"model.layers.0.wq.weight": 2})
    save_full(tmp_path / "full")
    theirs = tmp_path / "mindspore"
    ms.transform_checkpoints(str(tmp_path / "full"), str(theirs), "checkpoint_", None, str(merged))
    ours = run_autotrans(tmp_path, load_checkpoint=tmp_path / "full" / "rank_0" / "full.ckpt",
                         dst_strategy_path_or_dir=merged, strategy_format="mindspore")
    assert_same(ours, theirs, 8)
    # the strategy files autotrans wrote drive MindSpore to the same result
    again = tmp_path / "mindspore_again"
    ms.transform_checkpoints(str(tmp_path / "full"), str(again), "checkpoint_", None,
                             str(tmp_path / "autotrans" / "strategy" / "merged_ckpt_strategy.ckpt"))
    assert_same(ours, again, 8)


def test_distributed_to_full(tmp_path: Path) -> None:
    _, merged = strategy_files(tmp_path / "src_strategy", 2, 2, 1, opt={"model.layers.0.wq.weight": 2})
    src = distributed_source(tmp_path, merged)
    theirs = tmp_path / "mindspore"
    ms.transform_checkpoints(str(src), str(theirs), "checkpoint_", str(merged), None)
    ours = run_autotrans(tmp_path, load_checkpoint=src, src_strategy_path_or_dir=merged, use_parallel="false")
    assert_same(ours, theirs, 1)


def test_transform_checkpoint_by_rank(tmp_path: Path) -> None:
    _, src_merged = strategy_files(tmp_path / "src_strategy", 2, 2, 1)
    _, dst_merged = strategy_files(tmp_path / "dst_strategy", 2, 2, 1, opt={"model.layers.1.wq.weight": -1})
    src = distributed_source(tmp_path, src_merged)
    ours = run_autotrans(tmp_path, load_checkpoint=src, src_strategy_path_or_dir=src_merged,
                         dst_strategy_path_or_dir=dst_merged)
    files = {r: str(next((src / f"rank_{r}").glob("*.ckpt"))) for r in range(4)}
    for rank in range(4):
        needed = ms.rank_list_for_transform(rank, str(src_merged), str(dst_merged))
        out = tmp_path / "by_rank" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"
        out.parent.mkdir(parents=True)
        ms.transform_checkpoint_by_rank(rank, {r: files[r] for r in needed}, str(out), str(src_merged), str(dst_merged))
    assert_same(ours, tmp_path / "by_rank", 4)


def test_writer_bytes_equal_save_checkpoint_including_chunked_tensors(tmp_path: Path, monkeypatch) -> None:
    """Same tensors in the same order: autotrans' .ckpt file equals MindSpore's byte for
    byte, also when tensors are cut into chunks (chunk size shrunk on both sides)."""
    from mindspore.train import serialization

    from runner.formats import mindspore_ckpt

    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)  # KB: 1 KiB records
    monkeypatch.setattr(mindspore_ckpt, "CHUNK_BYTES", 1024)
    w = full_weights()
    order = ["model.embed.weight", "model.layers.0.norm.weight", "model.layers.1.w2.weight"]
    ref = tmp_path / "ref.ckpt"
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(w[n])} for n in order]
                       + [{"name": "scale_sense", "data": ms.Tensor(EXTRAS["scale_sense"])}], str(ref))
    src = tmp_path / "src.safetensors"
    from safetensors.numpy import save_file

    save_file({"scale_sense": EXTRAS["scale_sense"], **{n: w[n] for n in order}}, str(src))
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(f"load_checkpoint: {src}\noutput_dir: {out}\noutput_format: ckpt\nuse_parallel: false\n")
    assert main(["run", str(job), "--no-progress"]) == 0
    mine = out / "transformed_checkpoint" / "rank_0" / "checkpoint_0.ckpt"
    assert mine.read_bytes() == ref.read_bytes()
    assert sum(1 for _ in checkpoint_pb2.Checkpoint.FromString(ref.read_bytes()).value) > 4  # chunks were cut
    loaded = ms.load_checkpoint(str(mine))
    np.testing.assert_array_equal(loaded["model.embed.weight"].asnumpy(), w["model.embed.weight"])
    shutil.rmtree(out)
