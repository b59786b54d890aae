"""One engine (issue 13, SPEC 3, 6, 9, 10): conversions are jobs like any other. Under
mpiexec every rank writes its share of a conversion's files (with or without a shared
disk) and the bytes equal one process; `autotrans plan` plans conversions and LoRA
merges with the reshard schema, its write_bytes counted here by independent readers
(torch.load, and safetensors headers parsed as JSON); strategy_format: mindspore
applies to conversions; every job's manifest lists files, crc32, MPI rank and sources."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

from runner.cli import main as cli_main
from tests.convert_util import make_hf
from tests.test_mpi import autotrans, job_file, mpirun

MANIFEST = "autotrans.json"
PROGRESS = ".autotrans-progress"
SHARD = "100KB"  # the tiny Llama (~320 KB of bf16) in 4 HF shards


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """An HF model, and one-process conversions HF -> Megatron TP2 PP2 -> HF."""
    root = tmp_path_factory.mktemp("engine")
    hf = make_hf(root / "hf", "llama")
    m = {"root": root, "hf": hf, "jobs": {
        "to_megatron": {"load_checkpoint": str(hf), "output_format": "megatron",
                        "parallel_config": {"model_parallel": 2, "pipeline_stage": 2}},
        "to_hf": {"load_checkpoint": str(root / "one_to_megatron/transformed_checkpoint"), "output_format": "hf",
                  "reference_hf_dir": str(hf), "max_shard_size": SHARD},
    }}
    for name in ("to_megatron", "to_hf"):
        out = root / f"one_{name}"
        assert cli_main(["run", str(job_file(root, f"one_{name}", m["jobs"][name] | {"output_dir": str(out)})),
                         "--no-progress"]) == 0
        m[name] = out
    return m


def unit_files(out: Path) -> dict[str, bytes]:
    """Every file of transformed_checkpoint/ but the manifest and progress records."""
    tc = out / "transformed_checkpoint"
    return {str(p.relative_to(tc)): p.read_bytes() for p in sorted(tc.rglob("*"))
            if p.is_file() and p.name != MANIFEST and PROGRESS not in p.parts}


def manifest(out: Path) -> dict:
    return json.loads((out / "transformed_checkpoint" / MANIFEST).read_text())


def weight_files(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k.endswith((".pt", ".safetensors"))}


# -- (a) MPI: every rank writes, bytes equal one process ---------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", ["to_megatron", "to_hf"])
def test_conversion_split_over_mpi_ranks(models, name, n):
    root = models["root"]
    out = root / f"mpi_{name}_{n}"
    proc = mpirun(["-n", n, *autotrans(job_file(root, out.name, models["jobs"][name] | {"output_dir": str(out)}))],
                  timeout=180)
    assert proc.returncode == 0, proc.stderr
    ref = unit_files(models[name])
    assert len(weight_files(ref)) == 4
    assert unit_files(out) == ref
    files = manifest(out)["files"]
    writers = {f["path"]: f["mpi_rank"] for f in files}
    assert {writers[p] for p in weight_files(ref)} == set(range(n))  # every rank wrote weights
    strip = lambda fs: [{k: v for k, v in f.items() if k != "mpi_rank"} for f in fs]  # noqa: E731
    assert strip(files) == strip(manifest(models[name])["files"])
    assert proc.stderr.count("autotrans: done:") == 1


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["to_megatron", "to_hf"])
def test_conversion_over_mpi_without_shared_disk(models, name):
    """3 ranks as 3 nodes: each its own copy of the inputs (at its own path) and its own
    output_dir; each folder holds the files its rank wrote plus the finishing files, and
    together they are the one-process output."""
    root = models["root"] / f"nodes_{name}"
    keys = dict(models["jobs"][name])
    for r in range(3):
        node = root / f"node{r}"
        shutil.copytree(models["hf"], node / "hf")
        if name == "to_hf":
            shutil.copytree(models["to_megatron"] / "transformed_checkpoint", node / "mg",
                            ignore=shutil.ignore_patterns(MANIFEST, PROGRESS))
    base = str(root / "node${oc.env:PMI_RANK}")
    keys["load_checkpoint"] = base + ("/mg" if name == "to_hf" else "/hf")
    if name == "to_hf":
        keys["reference_hf_dir"] = base + "/hf"
    job = job_file(root, "job", keys | {"output_dir": base + "/out", "shared_disk": False})
    proc = mpirun(["-n", 3, *autotrans(job)], timeout=180)
    assert proc.returncode == 0, proc.stderr
    ref = unit_files(models[name])
    union: dict[str, bytes] = {}
    for r in range(3):
        got = unit_files(root / f"node{r}/out")
        weights = weight_files(got)
        assert weights, f"rank {r} wrote no weights"
        assert {f["mpi_rank"] for f in manifest(root / f"node{r}/out")["files"]} == {r}
        assert {k: v for k, v in got.items() if k not in weights} == {k: v for k, v in ref.items() if k not in weight_files(ref)}
        assert not set(weights) & set(union)
        union |= weights
    assert union == weight_files(ref)


def split_copy(src: Path, dst: Path, parts: list[Path], keep: list[int]) -> Path:
    """A copy of folder `src` holding of its weight files `parts` only those numbered in
    `keep` (every other file, config and markers, is copied whole)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(MANIFEST, PROGRESS))
    for i, part in enumerate(parts):
        if i not in keep:
            target = dst / part.relative_to(src)
            shutil.rmtree(target.parent) if target.name == "model_optim_rng.pt" else target.unlink()
    return dst


# which of the 4 weight files each rank's node holds: n=2 disjoint, n=3 with an overlap and
# a node that holds none (only config.json, or the iteration folder)
SPLITS = {2: [[0, 2], [1, 3]], 3: [[0, 1, 3], [], [2, 3]]}


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name", ["to_megatron", "to_hf"])
def test_conversion_over_mpi_with_the_source_split_over_nodes(models, name, n):
    """No shared disk, each node holding only part of the source (SPEC 9: the source is
    the union of what the ranks see): HF shards, or Megatron mp_rank_* folders, spread
    over the ranks' own load_checkpoint folders (${oc.env:PMI_RANK}); slices another
    node holds travel over MPI. One output folder: the bytes equal one process reading
    the whole source, and every rank wrote weights."""
    root = models["root"] / f"split_{name}_{n}"
    if name == "to_megatron":  # the 4-shard HF folder the one-process Megatron -> HF run wrote
        whole = models["to_hf"] / "transformed_checkpoint"
        parts = sorted(whole.glob("*.safetensors"))
    else:
        whole = models["to_megatron"] / "transformed_checkpoint"
        parts = sorted(whole.rglob("model_optim_rng.pt"))
    assert len(parts) == 4
    for r, keep in enumerate(SPLITS[n]):
        split_copy(whole, root / f"node{r}", parts, keep)
    keys = models["jobs"][name] | {"load_checkpoint": str(root / "node${oc.env:PMI_RANK}"), "shared_disk": False}
    one, out = root / "one", root / "out"
    assert cli_main(["run", str(job_file(root, "one", keys | {"load_checkpoint": str(whole), "output_dir": str(one)})),
                     "--no-progress"]) == 0
    proc = mpirun(["-n", n, *autotrans(job_file(root, "job", keys | {"output_dir": str(out)}))], timeout=180)
    assert proc.returncode == 0, proc.stderr
    ref = unit_files(one)
    assert len(weight_files(ref)) == 4
    assert unit_files(out) == ref
    if name == "to_hf":
        assert ref == unit_files(models["to_hf"])  # what the whole Megatron folder gave
    writers = {f["path"]: f["mpi_rank"] for f in manifest(out)["files"]}
    assert {writers[p] for p in weight_files(ref)} == set(range(n))


def test_an_hf_folder_without_weights_is_one_line(models, capsys):
    """A node may hold only config.json of an HF source under MPI; one process given such
    a folder is told it holds no checkpoint files (exit 1)."""
    root = models["root"] / "no_weights"
    root.mkdir()
    shutil.copy(models["hf"] / "config.json", root / "config.json")
    job = job_file(models["root"], "no_weights", {"load_checkpoint": str(root), "output_format": "megatron",
                                                  "output_dir": str(models["root"] / "no_weights_out")})
    capsys.readouterr()
    assert cli_main(["run", str(job), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip() == f"autotrans: error: {root} holds no rank_N folders and no checkpoint files"


def test_conversion_split_over_local_workers(models):
    """transform_process_num: local workers take shares of a conversion's units too."""
    root = models["root"]
    out = root / "workers"
    keys = models["jobs"]["to_megatron"] | {"transform_process_num": 2, "output_dir": str(out)}
    assert cli_main(["run", str(job_file(root, "workers", keys)), "--no-progress"]) == 0
    assert unit_files(out) == unit_files(models["to_megatron"])


# -- (b) plan covers conversions and LoRA merges ------------------------------------------------
def pt_payload(path: Path) -> int:
    """Tensor bytes in a Megatron rank file, read by torch.load."""
    model = torch.load(path, weights_only=False)["model"]
    return sum(t.numel() * t.element_size() for t in model.values() if isinstance(t, torch.Tensor))


def safetensors_payload(path: Path) -> int:
    """Tensor bytes in a safetensors file: its JSON header's data offsets."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def payload(out: Path) -> tuple[int, int]:
    """(files, tensor bytes) of the weight files of a finished job."""
    files = [p for p in (out / "transformed_checkpoint").rglob("*") if p.suffix in (".pt", ".safetensors")]
    return len(files), sum(pt_payload(p) if p.suffix == ".pt" else safetensors_payload(p) for p in files)


def plan_json(capsys, job: Path) -> dict:
    capsys.readouterr()
    assert cli_main(["plan", str(job), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def adapter(models) -> Path:
    """A PEFT LoRA adapter for the tiny Llama, every factor non-zero."""
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(models["hf"])
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
    folder = models["root"] / "adapter"
    pm.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("case", ["to_megatron", "to_hf", "to_mindformers", "lora_to_hf", "lora_to_megatron"])
def test_plan_covers_conversions(models, adapter, case, capsys):
    root = models["root"]
    keys = {
        "to_megatron": models["jobs"]["to_megatron"],
        "to_hf": models["jobs"]["to_hf"],
        "to_mindformers": {"load_checkpoint": str(models["hf"]), "output_format": "mindformers",
                           "model": {"arch": "llama"}, "parallel_config": {"model_parallel": 2}},
        "lora_to_hf": {"load_checkpoint": str(models["hf"]), "output_format": "hf", "lora": {"adapter": str(adapter)},
                       "max_shard_size": SHARD},
        "lora_to_megatron": {"load_checkpoint": str(models["hf"]), "output_format": "megatron", "dtype": "fp32",
                             "lora": {"adapter": str(adapter)}, "parallel_config": {"pipeline_stage": 2}},
    }[case]
    out = root / f"plan_{case}"
    job = job_file(root, f"plan_{case}", keys | {"output_dir": str(out)})
    doc = plan_json(capsys, job)
    assert not out.exists()  # planning writes nothing
    reshard = plan_json(capsys, job_file(root, f"plan_reshard_{case}", {"load_checkpoint": str(models["hf"]),
                                                                         "use_parallel": False, "dtype": "fp32",
                                                                         "output_dir": str(root / "r")}))
    assert set(doc) == set(reshard) and set(doc["total"]) == set(reshard["total"])
    assert set(doc["ranks"][0]) == set(reshard["ranks"][0]) and set(doc["source"]) == set(reshard["source"])
    assert doc["kind"] == "conversion" and reshard["kind"] == "reshard"
    assert cli_main(["run", str(job), "--no-progress"]) == 0
    files, nbytes = payload(out)
    assert doc["total"]["files"] == files >= 2
    assert doc["total"]["write_bytes"] == nbytes == sum(r["write_bytes"] for r in doc["ranks"])


# -- (c) strategy_format, the same in every job -------------------------------------------------
def test_conversion_writes_mindspore_strategy_files(models):
    from runner.formats.mindspore_proto import message

    root = models["root"]
    out = root / "ms_strategy"
    keys = models["jobs"]["to_megatron"] | {"strategy_format": "mindspore", "output_dir": str(out)}
    assert cli_main(["run", str(job_file(root, "ms_strategy", keys)), "--no-progress"]) == 0
    names = sorted(p.name for p in (out / "strategy").iterdir())
    assert names == [f"ckpt_strategy_rank_{r}.ckpt" for r in range(4)] + ["merged_ckpt_strategy.ckpt"]
    for r in range(4):
        doc = message("ParallelStrategyMap")()
        doc.ParseFromString((out / "strategy" / f"ckpt_strategy_rank_{r}.ckpt").read_bytes())
        stage = doc.parallel_strategy_item[0].parallel_strategys.stage
        assert stage == r // 2
        layouts = {i.param_name: i.parallel_layouts for i in doc.parallel_layout_item}
        assert layouts, r
        first = "embedding.word_embeddings.weight" if stage == 0 else "output_layer.weight"
        lay = layouts[first]  # vocab-parallel over TP 2: rows on the device axis of size 2
        dev, tmap = list(lay.dev_matrix[0].dim), list(lay.tensor_map[0].dim)
        assert tmap[1] == -1 and dev[len(dev) - 1 - tmap[0]] == 2, (dev, tmap)
    assert unit_files(out) == unit_files(models["to_megatron"])  # the strategy format changes no weight byte


@pytest.mark.parametrize("fmt", ["megatron", "hf", "mindformers"])
def test_a_conversion_with_a_cast_writes_strategies_of_the_cast_dtype(models, fmt):
    """dtype means the same in every kind of job (issue 13, 2c): the bf16 model cast to
    fp32 gives fp32 weight files (read by torch.load and safetensors) and strategy files
    that say F32, as a reshard's do."""
    from safetensors import safe_open

    root = models["root"]
    out = root / f"cast_{fmt}"
    keys = {"load_checkpoint": str(models["hf"]), "output_format": fmt, "dtype": "fp32", "output_dir": str(out)}
    assert cli_main(["run", str(job_file(root, out.name, keys | ({"use_parallel": False} if fmt == "mindformers" else {}))),
                     "--no-progress"]) == 0
    kinds = set()
    for path in (out / "transformed_checkpoint").rglob("*"):
        if path.suffix == ".pt":
            kinds |= {t.dtype for t in torch.load(path, weights_only=False)["model"].values() if isinstance(t, torch.Tensor)}
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                kinds |= {f.get_tensor(k).dtype for k in f.keys()}
    assert kinds == {torch.float32}
    for path in (out / "strategy").iterdir():
        assert {p["dtype"] for p in json.loads(path.read_text())["params"].values()} == {"F32"}, path.name


# -- (d) the manifest of every kind of job ------------------------------------------------------
def check_manifest(out: Path, sources: list[Path]) -> None:
    doc = manifest(out)
    tc = out / "transformed_checkpoint"
    assert {"source", "strategies", "elapsed_s", "files", "source_files"} <= set(doc)
    assert sorted(f["path"] for f in doc["files"]) == sorted(unit_files(out))
    for f in doc["files"]:
        data = (tc / f["path"]).read_bytes()
        assert (f["bytes"], f["crc32"], f["mpi_rank"]) == (len(data), zlib.crc32(data), 0), f["path"]
    stamps = {Path(s["path"]).name: (s["size"], s["mtime_ns"]) for s in doc["source_files"]}
    assert stamps == {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sources}
    assert doc["strategies"]["written"] == sorted(p.name for p in (out / "strategy").iterdir())


def test_manifest_of_conversion_and_reshard(models, adapter):
    root = models["root"]
    check_manifest(models["to_megatron"], sorted(models["hf"].glob("*.safetensors")))
    reference = sorted(models["hf"].glob("*.json"))  # config.json, generation_config.json: read by the finishing steps
    check_manifest(models["to_hf"], sorted((models["to_megatron"] / "transformed_checkpoint").rglob("*.pt")) + reference)
    out = root / "manifest_reshard"
    keys = {"load_checkpoint": str(models["hf"]), "use_parallel": False, "dtype": "fp32", "output_dir": str(out),
            "lora": {"adapter": str(adapter)}}
    assert cli_main(["run", str(job_file(root, "manifest_reshard", keys)), "--no-progress"]) == 0
    check_manifest(out, sorted(models["hf"].glob("*.safetensors")) + sorted(adapter.glob("*.safetensors")))


def test_changed_source_reruns_a_finished_conversion(models, capsys):
    """Source stamps are part of every job's digest: a finished job whose source file
    changed (mtime) is not complete and runs again (SPEC 3)."""
    root = models["root"]
    src = root / "stamped_hf"
    shutil.copytree(models["hf"], src)
    job = job_file(root, "stamped", {"load_checkpoint": str(src), "output_format": "hf", "output_dir": str(root / "stamped")})
    assert cli_main(["run", str(job), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["run", str(job), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "nothing to do" in err and "debug:" not in err
    weights = next(src.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cli_main(["run", str(job), "--no-progress", "--debug"]) == 0
    err = capsys.readouterr().err
    assert "done:" in err and "autotrans: debug: compiled a conversion: 1 unit(s)" in err  # --debug speaks
