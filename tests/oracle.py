"""An independent model of SPEC 5's layout semantics, for tests only.

Written from the SPEC text without runner code: a rank's position in its stage list is
unravelled row-major over dev_matrix; tensor_map[i] = k splits dim i over device dim
len-1-k (several axes: first listed outermost); opt_shard further splits dim 0 among
the replica group (ranks of the stage whose tensor-parallel slice is the same), taking
consecutive members, or every opt_shard_step-th. Also builds checkpoints and native
strategy files the way a user would, with torch slicing and safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "I64": torch.int64}


def param(shape, dtype="F32", stage=0, dev_matrix=(1,), tensor_map=None, opt_shard=1, step=1, stored_shape=None) -> dict:
    tm = list(tensor_map) if tensor_map is not None else [-1] * len(shape)
    d = {"shape": list(shape), "dtype": dtype, "stage": stage, "dev_matrix": list(dev_matrix),
         "tensor_map": tm, "opt_shard": opt_shard, "stored_shape": stored_shape}
    if step != 1:
        d["opt_shard_step"] = step
    return d


def strategy(stages, params: dict) -> dict:
    return {"format": "autotrans-strategy", "version": 1, "stages": [list(s) for s in stages], "params": params}


def _axes(entry) -> list[int]:
    if isinstance(entry, list):
        return entry
    return [] if entry == -1 else [entry]


def _stages_of(p: dict) -> list[int]:
    return p["stage"] if isinstance(p["stage"], list) else [p["stage"]]


def tp_slice(p: dict, coords: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, stop) per dim before optimizer sharding."""
    dev = p["dev_matrix"]
    out = []
    for i, size in enumerate(p["shape"]):
        index, parts = 0, 1
        for k in _axes(p["tensor_map"][i]):
            d = len(dev) - 1 - k
            index = index * dev[d] + coords[d]
            parts *= dev[d]
        step = size // parts
        out.append((index * step, index * step + step))
    return out


def rank_slices(strat: dict, name: str, rank: int) -> tuple[slice, ...] | None:
    """The slice of the global tensor `name` that `rank` holds, or None."""
    p = strat["params"][name]
    stage = next(s for s, ranks in enumerate(strat["stages"]) if rank in ranks)
    if stage not in _stages_of(p):
        return None
    ranks = strat["stages"][stage]
    coords_of = {r: tuple(int(c) for c in np.unravel_index(pos, p["dev_matrix"])) for pos, r in enumerate(ranks)}
    mine = tp_slice(p, coords_of[rank])
    if p.get("opt_shard", 1) > 1:
        group = [r for r in ranks if tp_slice(p, coords_of[r]) == mine]  # replica group, in stage order
        q = group.index(rank)
        n, step = p["opt_shard"], p.get("opt_shard_step", 1)
        j = (q // step) % n
        lo, hi = mine[0]
        rows = (hi - lo) // n
        mine[0] = (lo + j * rows, lo + (j + 1) * rows)
    return tuple(slice(a, b) for a, b in mine)


def world(strat: dict) -> list[int]:
    return sorted(r for s in strat["stages"] for r in s)


def shard(full: dict[str, torch.Tensor], strat: dict, rank: int) -> dict[str, torch.Tensor]:
    """What `rank`'s file holds, by slicing the full tensors."""
    out = {}
    for name in strat["params"]:
        sl = rank_slices(strat, name, rank)
        if sl is not None:
            t = full[name][sl].contiguous()
            stored = strat["params"][name].get("stored_shape")
            out[name] = t.reshape(stored) if stored else t
    return out


def write_distributed(full: dict[str, torch.Tensor], strat: dict, root: Path, prefix: str = "ckpt_") -> Path:
    """A rank_N/ checkpoint folder plus its per-rank strategy files."""
    ckpt, sdir = root / "ckpt", root / "strategy"
    sdir.mkdir(parents=True, exist_ok=True)
    stage_of = {r: s for s, ranks in enumerate(strat["stages"]) for r in ranks}
    for r in world(strat):
        (ckpt / f"rank_{r}").mkdir(parents=True, exist_ok=True)
        save_file(shard(full, strat, r), str(ckpt / f"rank_{r}" / f"{prefix}{r}.safetensors"))
        mine = {n: p for n, p in strat["params"].items() if stage_of[r] in _stages_of(p)}
        doc = {**strategy(strat["stages"], mine), "rank": r}
        (sdir / f"ckpt_strategy_rank_{r}.json").write_text(json.dumps(doc))
    return ckpt


def write_strategy(strat: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "merged_ckpt_strategy.json").write_text(json.dumps(strat))
    return folder


def random_full(specs: dict[str, tuple[tuple[int, ...], str]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype) in specs.items():
        if dtype.startswith("I"):
            out[name] = torch.randint(-1000, 1000, shape, generator=g, dtype=DTYPES[dtype])
        else:
            out[name] = torch.randn(shape, generator=g, dtype=torch.float32).to(DTYPES[dtype])
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (NaN-safe, -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous(), b.contiguous()
    return bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8))) if a.numel() else True


def check_output(out_dir: Path, full: dict[str, torch.Tensor], strat: dict, prefix: str = "checkpoint_") -> int:
    """Assert every destination rank file holds exactly its slices; returns files checked."""
    for r in world(strat):
        path = out_dir / f"rank_{r}" / f"{prefix}{r}.safetensors"
        got = load_file(str(path))
        want = shard(full, strat, r)
        assert sorted(got) == sorted(want), (r, sorted(got), sorted(want))
        for name, t in want.items():
            assert same_bits(got[name], t), f"rank {r} tensor {name} differs"
    return len(world(strat))
