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
axis) of the stacked tensors, each chunk one torch.save archive appended to a .distcp
file, then `.metadata` (DCP's own dataclasses), `common.pt` and `metadata.json`.
Megatron-Core's dist_checkpointing.load then cuts whatever boxes its TP / PP needs."""

from __future__ import annotations

import io
import json
import pickle  # .metadata must be the pickle torch's DCP loader reads; our own records stay JSON
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from runner.durable import DurableFile, make_folder, signals_held, write_bytes
from runner.errors import FormatError
from runner.formats.base import TensorInfo
from runner.formats.dcp import METADATA, DcpReader
from runner.formats.torch_pt import load
from runner.layout import Box

COMMON = "common.pt"
META_JSON = "metadata.json"
DATA = "__0_0.distcp"
DATA_FILES = (DATA, COMMON, META_JSON)  # what write_folder writes besides .metadata
LAYERS = "decoder.layers."
# DCP entries that are training state, not model weights (Megatron-LM's save).
_TRAINING_STATE = ("optimizer.", "rng_state", "rerun_state_machine_state", "opt_param_scheduler")


def stacked(name: str) -> tuple[str, tuple[int, ...]]:
    """torch-format name (global layer number) -> (torch_dist key, leading indices)."""
    if name.startswith(LAYERS):
        layer, rest = name[len(LAYERS):].split(".", 1)
        return LAYERS + rest, (int(layer),)
    return name, ()


def is_torch_dist(folder: Path) -> bool:
    return (Path(folder) / META_JSON).is_file() and (Path(folder) / METADATA).is_file()


def backend(folder: Path) -> str:
    """metadata.json's sharded_backend; torch_dist is the one read."""
    path = Path(folder) / META_JSON
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read ({e})") from None
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
            elif key.startswith(LAYERS):
                if not t.shape:
                    raise FormatError(f"{self.path}: {key} has no layer axis")
                for i in range(t.shape[0]):  # the inverse of stacked()
                    self._add(f"model.{LAYERS}{i}.{key[len(LAYERS):]}", key, (i,))
            else:
                self._add("model." + key, key, ())
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


def _durable(path: Path, write: Callable[[Any], None]) -> None:
    with DurableFile(path) as out:
        write(out.stream())


def write_folder(folder: Path, tensors: Iterable[tuple[str, Any]], num_layers: int, objects: list[str], head: dict) -> Path:
    """Write a torch_dist iteration folder: `tensors` yields (torch-format name, torch
    tensor) one at a time, whole; `objects` are module `_extra_state` names (saved as
    None, as Megatron-Core's local linears hold it); `head` goes to common.pt. Returns the
    path of `.metadata`, written last."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)

    folder = make_folder(folder)
    data = DATA
    entries: dict[str, Any] = {}
    storage: dict = {}

    def write_data(f) -> None:
        for name, t in tensors:
            key, lead = stacked(name)
            size = torch.Size((num_layers,) * len(lead) + tuple(t.shape))
            offsets = torch.Size(lead + (0,) * t.dim())
            entry = entries.setdefault(key, TensorStorageMetadata(TensorProperties(dtype=t.dtype), size, []))
            entry.chunks.append(ChunkStorageMetadata(offsets, torch.Size((1,) * len(lead) + tuple(t.shape))))
            start = f.tell()
            with signals_held():  # an interrupt inside torch.save would come out as its RuntimeError
                torch.save(t.reshape(entry.chunks[-1].sizes), f)
            storage[MetadataIndex(key, offsets)] = _StorageInfo(data, start, f.tell() - start)
        for name in objects:
            key, lead = stacked(name)
            fqn = f"{key}/shard_{'_'.join(str(i) for i in lead)}{'_' if lead else ''}{'_'.join(str(num_layers) for _ in lead)}"
            blob = io.BytesIO()
            torch.save([None], blob)  # Megatron-Core saves each object as a one-item list
            start = f.tell()
            f.write(blob.getvalue())
            entries[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = _StorageInfo(data, start, f.tell() - start)

    _durable(folder / data, write_data)
    def write_common(f) -> None:
        with signals_held():
            torch.save(head, f)

    _durable(folder / COMMON, write_common)
    write_bytes(folder / META_JSON, json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                "common_backend": "torch", "common_backend_version": 1}).encode())
    path = folder / METADATA
    _durable(path, lambda f: pickle.dump(Metadata(state_dict_metadata=entries, storage_data=storage), f))
    return path
