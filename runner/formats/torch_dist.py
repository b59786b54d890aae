"""Megatron's `torch_dist` checkpoint folder (SPEC 4): `iter_NNNNNNN/` holding a DCP
checkpoint (`.metadata`, `__R_S.distcp`), `common.pt` (args, checkpoint_version,
iteration, unpickled with the torch allow-list) and `metadata.json`
(`{"sharded_backend": "torch_dist", ...}`).

Megatron-Core saves each transformer layer's tensors stacked along a leading layer
axis (`decoder.layers.self_attention.linear_qkv.weight` is [num_layers, ...], global
layer numbers) at their global, tensor-parallel-merged shapes, and local-spec norms
under TransformerEngine's names. The reader shows them as a single torch-format rank
file holding the whole model: `model.decoder.layers.{i}.…` per layer, each a box of
the stacked DCP tensor, so the torch-format naming reads them unchanged.

Writing is the reverse: whole per-layer tensors become chunks (layer index on the leading
axis) of the stacked tensors, each chunk one torch.save archive (runner.formats.
torch_archive: deterministic bytes, sizes known in advance) appended to a .distcp file;
several files can be written apart (by MPI ranks), and `.metadata` (DCP's own
dataclasses), `common.pt` and `metadata.json` follow from what each file holds.
Megatron-Core's dist_checkpointing.load then cuts whatever boxes its TP / PP needs."""

from __future__ import annotations

import itertools
import json
import re
import pickle  # .metadata must be the pickle torch's DCP loader reads; our own records stay JSON
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from runner import dtypes
from runner.durable import DurableFile, write_bytes
from runner.errors import FormatError, cause
from runner.formats import torch_archive
from runner.formats.base import TensorInfo
from runner.formats.dcp import METADATA, DcpReader
from runner.formats.torch_pt import load
from runner.layout import Box

COMMON = "common.pt"
META_JSON = "metadata.json"
METADATA_FILES = (COMMON, META_JSON, METADATA)  # what write_metadata writes
LAYERS = "decoder.layers."
# DCP entries that are training state, not model weights (Megatron-LM's save).
_TRAINING_STATE = ("optimizer.", "rng_state", "rerun_state_machine_state", "opt_param_scheduler")


# An MoE layer's experts (SequentialMLP): `experts.local_experts.{j}.` in a rank file,
# `experts.experts.` with the global expert number on a second stacked axis in torch_dist.
_LOCAL_EXPERT = re.compile(r"(.*\.experts\.)local_experts\.(\d+)\.(.*)")
_EXPERTS = ".experts.experts."


# Megatron-Core's local layer spec saves its norms under TransformerEngine's fused names
# (its sharded_state_dict_keys_map), an MoE layer's pre-MLP norm too, though that layer
# has no linear_fc1: read back there as pre_mlp_layernorm, as the TransformerEngine spec
# names it.
_LOCAL_SPEC_KEYS = {".input_layernorm.": ".self_attention.linear_qkv.layer_norm_",
                    ".pre_mlp_layernorm.": ".mlp.linear_fc1.layer_norm_"}


def local_spec_key(name: str) -> str:
    """The key Megatron-Core's local layer spec saves a torch-format name under."""
    for local, fused in _LOCAL_SPEC_KEYS.items():
        name = name.replace(local, fused)
    return name


def stacked(name: str) -> tuple[str, tuple[int, ...]]:
    """torch-format name (global layer and expert numbers) -> (torch_dist key, leading
    indices: the layer, and the expert for an expert's weight)."""
    if not name.startswith(LAYERS):
        return name, ()
    layer, rest = name[len(LAYERS):].split(".", 1)
    m = _LOCAL_EXPERT.fullmatch(rest)
    if m:
        return f"{LAYERS}{m[1]}experts.{m[3]}", (int(layer), int(m[2]))
    return LAYERS + rest, (int(layer),)


def unstacked(key: str, lead: tuple[int, ...]) -> str:
    """The inverse of stacked()."""
    rest = key[len(LAYERS):]
    if len(lead) == 2:
        rest = rest.replace(_EXPERTS[1:], f"experts.local_experts.{lead[1]}.", 1)
    return f"{LAYERS}{lead[0]}.{rest}"


def stacked_axes(key: str) -> int:
    """Leading stacked axes of a torch_dist key: layers, and experts."""
    return 0 if not key.startswith(LAYERS) else 2 if _EXPERTS in "." + key[len(LAYERS):] else 1


def is_torch_dist(folder: Path) -> bool:
    return (Path(folder) / META_JSON).is_file() and (Path(folder) / METADATA).is_file()


def backend(folder: Path) -> str:
    """metadata.json's sharded_backend; torch_dist is the one read."""
    path = Path(folder) / META_JSON
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read ({cause(e)})") from None
    name = doc.get("sharded_backend") if isinstance(doc, dict) else None
    if name != "torch_dist":
        raise FormatError(f"{path}: sharded_backend {name!r}; only Megatron's torch_dist distributed checkpoints are read")
    return name


def common(folder: Path) -> dict[str, Any]:
    """common.pt: args, checkpoint_version, iteration (same allow-list as rank files)."""
    path = Path(folder) / COMMON
    if not path.is_file():
        raise FormatError(f"{folder}: no {COMMON}; not a complete torch_dist checkpoint")
    doc = load(path)
    if not isinstance(doc, dict):
        raise FormatError(f"{path}: holds {type(doc).__name__}, not a dict")
    return doc


class TorchDistReader:
    """A torch_dist folder seen as one torch-format rank file of the whole model
    (CheckpointReader): weights under `model.` with per-layer names; any box of
    them read from the chunks it overlaps."""

    def __init__(self, folder: Path):
        self.path = Path(folder)
        backend(self.path)
        self._dcp = DcpReader(self.path)
        # torch-format name -> (DCP key, leading indices into the stacked tensor)
        self._where: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._infos: dict[str, TensorInfo] = {}
        self.objects: dict[str, Any] = {}
        for key, t in self._dcp.index.tensors.items():
            if key.startswith(_TRAINING_STATE):
                self._add(key, key, ())
            else:
                axes = stacked_axes(key)
                if len(t.shape) < axes:
                    raise FormatError(f"{self.path}: {key} has no {('layer', 'expert')[len(t.shape)]} axis")
                for lead in itertools.product(*(range(n) for n in t.shape[:axes])):
                    self._add("model." + (unstacked(key, lead) if lead else key), key, lead)
        fused = _LOCAL_SPEC_KEYS[".pre_mlp_layernorm."]
        for name in [n for n in self._where if fused in n]:
            if name[: name.index(fused)] + ".mlp.linear_fc1.weight" not in self._where:
                self._where[name.replace(fused, ".pre_mlp_layernorm.")] = self._where.pop(name)
                self._infos[name.replace(fused, ".pre_mlp_layernorm.")] = self._infos.pop(name)
        for key in self._dcp.index.objects:
            if not key.split("/")[0].endswith("._extra_state"):  # TransformerEngine's FP8 state: not weights
                self.objects[key.split(".")[0].split("/")[0]] = None

    def _add(self, name: str, key: str, lead: tuple[int, ...]) -> None:
        t = self._dcp.index.tensors[key]
        self._where[name] = (key, lead)
        self._infos[name] = TensorInfo(t.dtype, t.shape[len(lead):])

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def region(self, name: str, box: Box) -> np.ndarray:
        key, lead = self._where[name]
        bits = self._dcp.region(key, Box(lead + box.offsets, (1,) * len(lead) + box.sizes))
        return bits.reshape(box.sizes)

    def array(self, name: str) -> np.ndarray:
        shape = self._infos[name].shape
        return self.region(name, Box((0,) * len(shape), shape))

    def release(self) -> None:
        self._dcp.release()

    def close(self) -> None:
        self._dcp.close()


def data_file(k: int) -> str:
    """The k-th .distcp file of a folder autotrans writes."""
    return f"__{k}_0.distcp"


def write_data(path: Path, tensors: Iterable[tuple[str, np.ndarray, str]], objects: list[str]) -> None:
    """Write one .distcp file: `tensors` yields (torch-format name, raw bits shaped as
    stored, dtype) one at a time, each appended as its own archive (a chunk of its stacked
    tensor); then `objects` (module `_extra_state` names), each saved as None, as
    Megatron-Core's local linears hold it."""
    with DurableFile(path) as out:
        f = out.stream()
        for name, bits, dtype in tensors:
            lead = stacked(name)[1]
            torch_archive.write_tensor(f, bits.reshape((1,) * len(lead) + bits.shape), dtype)
        for _ in objects:
            f.write(_NONE)


_NONE = torch_archive.object_archive([None])  # Megatron-Core saves each object as a one-item list


def write_metadata(folder: Path, files: list[list[tuple[str, str, tuple[int, ...]]]], objects: list[str],
                   axes: tuple[int, int], head: dict) -> list[Path]:
    """`.metadata`, `common.pt` (`head`) and `metadata.json` of a folder whose k-th .distcp
    file holds `files[k]`, (torch-format name, dtype, stored shape) in order, whole
    per-layer (per-expert) tensors as chunks of the stacked tensors, whose leading axes
    count `axes` (layers, experts), and file 0 then `objects`: every chunk's byte range
    follows from the archive sizes."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)

    folder = Path(folder)
    entries: dict[str, Any] = {}
    storage: dict = {}
    for k, items in enumerate(files):
        at = 0
        for name, dtype, shape in items:
            key, lead = stacked(name)
            entry = entries.setdefault(key, TensorStorageMetadata(TensorProperties(dtype=dtypes.torch_dtype(dtype)),
                                                                  torch.Size(axes[:len(lead)] + shape), []))
            offsets = torch.Size(lead + (0,) * len(shape))
            entry.chunks.append(ChunkStorageMetadata(offsets, torch.Size((1,) * len(lead) + shape)))
            size = torch_archive.tensor_size(dtype, (1,) * len(lead) + shape)
            storage[MetadataIndex(key, offsets)] = _StorageInfo(data_file(k), at, size)
            at += size
        for name in objects if k == 0 else ():
            key, lead = stacked(name)
            fqn = f"{key}/shard_{'.'.join(map(str, lead))}_{'.'.join(map(str, axes[:len(lead)]))}"  # ShardedObject.unique_key
            entries[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = _StorageInfo(data_file(k), at, len(_NONE))
            at += len(_NONE)
    write_bytes(folder / COMMON, torch_archive.object_archive(head))
    write_bytes(folder / META_JSON, json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                "common_backend": "torch", "common_backend_version": 1}).encode())
    write_bytes(folder / METADATA, pickle.dumps(Metadata(state_dict_metadata=entries, storage_data=storage), protocol=2))
    return [folder / n for n in METADATA_FILES]
