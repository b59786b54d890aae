"""PyTorch distributed checkpoints (DCP, SPEC 4): a folder with `.metadata` and
`*.distcp` files, as torch.distributed.checkpoint's FileSystemWriter writes them
(Megatron-Core's torch_dist, torchtitan, FSDP2). Read without a process group.

`.metadata` is a pickle of DCP's metadata dataclasses; only those classes (and
torch.Size, dtypes) are accepted, anything else is refused before it runs. It gives,
per tensor, its global shape and dtype and the chunks saved (global offsets and sizes),
and per chunk where its bytes are: (file, offset, length). A chunk's bytes are one
torch.save zip archive holding one tensor; its pickle is read with a second allow-list
(tensor rebuild, storage classes) to find the storage record, its dtype, offset and
strides, so the chunk is a view of the mapped file. Reads of any box of a tensor copy
only the overlapping parts of the chunks it touches."""

from __future__ import annotations

import io
import pickle  # DCP's .metadata is a pickle by torch's format: read only through the allow-listed unpicklers below
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runner import dtypes
from runner.errors import FormatError, cause
from runner.formats.base import MappedFile, TensorInfo
from runner.layout import Box, intersect

METADATA = ".metadata"
_DCP = "torch.distributed.checkpoint."
# Every class DCP's FileSystemWriter pickles into .metadata (Megatron-Core adds its
# save plans: SavePlan, WriteItem, ...). Dataclasses and one enum, rebuilt for real.
_METADATA_CLASSES = {
    _DCP + "metadata": ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"),
    _DCP + "planner": ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem", "LoadItemType"),
    _DCP + "filesystem": ("_StorageInfo",),
    "torch.serialization": ("_get_layout",),
    "torch": ("Size",),
    "pathlib": ("PosixPath", "PurePosixPath"),  # StorageMeta.checkpoint_id as the writer was given it
}


def _torch_dtype(name: str) -> Any:
    import torch

    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else None


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path: Path):
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and _torch_dtype(name) is not None:
            return _torch_dtype(name)
        raise FormatError(f"{self.path}: refused to load: its pickle calls {module}.{name}, which is not one of "
                          "DCP's metadata classes")


@dataclass(frozen=True)
class Chunk:
    """One saved chunk of a tensor: its global box and where its bytes are."""

    box: Box
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class DcpTensor:
    dtype: str  # runner.dtypes name
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class DcpIndex:
    """What .metadata says: tensors with their chunks, and the byte items (pickled
    objects such as Megatron's `_extra_state`) by name."""

    tensors: dict[str, DcpTensor]
    objects: dict[str, Chunk]


def read_index(folder: Path) -> DcpIndex:
    """Parse `folder/.metadata`, check every tensor's chunks tile it exactly."""
    path = Path(folder) / METADATA
    if not path.is_file():
        raise FormatError(f"{folder}: no {METADATA} file; not a PyTorch distributed checkpoint")
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, path).load()
    except FormatError:
        raise
    except Exception as e:  # a damaged pickle raises anything
        raise FormatError(f"{path}: cannot read DCP metadata ({type(e).__name__}: {e})") from None
    storage = getattr(md, "storage_data", None)
    entries = getattr(md, "state_dict_metadata", None)
    if not isinstance(storage, dict) or not isinstance(entries, dict):
        raise FormatError(f"{path}: not DCP metadata (no state_dict_metadata / storage_data)")
    where: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    for index, info in storage.items():
        if getattr(info, "transform_descriptors", None):
            raise FormatError(f"{path}: {index.fqn} is stored with transforms {list(info.transform_descriptors)} "
                              "(compression or other extensions), which are not supported")
        where[(index.fqn, tuple(index.offset) if index.offset is not None else None)] = info
    tensors: dict[str, DcpTensor] = {}
    objects: dict[str, Chunk] = {}
    for fqn, entry in entries.items():
        if type(entry).__name__ == "BytesStorageMetadata":
            info = where.get((fqn, None))
            if info is not None:
                objects[fqn] = Chunk(Box((), ()), info.relative_path, info.offset, info.length)
            continue
        dtype = dtypes.from_torch(entry.properties.dtype)
        shape = tuple(int(d) for d in entry.size)
        chunks = []
        for c in entry.chunks:
            offsets = tuple(int(o) for o in c.offsets)
            info = where.get((fqn, offsets))
            if info is None:
                raise FormatError(f"{path}: chunk {list(offsets)} of {fqn} has no storage entry")
            chunks.append(Chunk(Box(offsets, tuple(int(s) for s in c.sizes)), info.relative_path, info.offset, info.length))
        _check_cover(path, fqn, shape, chunks)
        tensors[fqn] = DcpTensor(dtype, shape, tuple(chunks))
    return DcpIndex(tensors, objects)


# Top-level entries of a training checkpoint that are not model weights (torchtitan's).
TRAINING_STATE = ("optimizer", "lr_scheduler", "dataloader", "train_state")


def model_entries(names: list[str]) -> tuple[dict[str, str], list[str]]:
    """A DCP checkpoint's model weights, {name in the model: stored name}: those under
    `model.` (the prefix dropped) when there are any, as torchtitan saved them before it
    flattened the model's state, else every entry but training state; and the top-level
    keys of the entries left out."""
    prefixed = any(n.startswith("model.") for n in names)
    model = {n[len("model."):] if prefixed else n: n for n in names
             if (n.startswith("model.") if prefixed else n.split(".")[0] not in TRAINING_STATE)}
    kept = set(model.values())
    return model, sorted({n.split(".")[0] for n in names if n not in kept})


def _check_cover(path: Path, fqn: str, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
    whole = Box((0,) * len(shape), shape)
    total = 0
    for i, c in enumerate(chunks):
        if len(c.box.sizes) != len(shape) or intersect(c.box, whole) != c.box:
            raise FormatError(f"{path}: chunk {list(c.box.offsets)} {list(c.box.sizes)} of {fqn} lies outside its shape {list(shape)}")
        if any(intersect(c.box, o.box) is not None and o.box.numel > 0 for o in chunks[:i]):
            raise FormatError(f"{path}: chunks of {fqn} overlap")
        total += c.box.numel
    if total != whole.numel:
        raise FormatError(f"{path}: the chunks of {fqn} cover {total} of its {whole.numel} elements")


# -- one chunk's torch.save archive --------------------------------------------------------
class _Window(io.RawIOBase):
    """A read-only file-like view of bytes [start, start + length) of a mapping."""

    def __init__(self, buf: memoryview, start: int, length: int):
        self._buf, self._start, self._len, self._pos = buf, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._len + pos}[whence]
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        b[:n] = self._buf[self._start + self._pos:self._start + self._pos + n]
        self._pos += n
        return n


@dataclass(frozen=True)
class _Stored:
    key: str
    dtype: str
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _TensorUnpickler(pickle.Unpickler):
    """The pickle of a torch.save'd tensor: a rebuild call over one storage record.
    Records what it describes; builds no tensor and calls nothing else."""

    def __init__(self, f, where: str):
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name.endswith("Storage"):
            import torch

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # legacy storage classes warn when touched
                dtype = getattr(getattr(torch, name, None), "dtype", None)
            if isinstance(dtype, torch.dtype):
                return dtype
        raise FormatError(f"{self.where}: refused: the chunk's pickle calls {module}.{name}; a DCP chunk holds one tensor")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise FormatError(f"{self.where}: unexpected storage reference {pid!r}")
        return pid[1], str(pid[2])


def _rebuild(storage: tuple, storage_offset: int, size: tuple, stride: tuple, *_: Any) -> _Stored:
    dtype, key = storage
    return _Stored(key, dtypes.from_torch(dtype), int(storage_offset), tuple(size), tuple(stride))


def _local_header_size(buf: memoryview, at: int) -> int:
    """Bytes of a zip local file header at `at` (fixed part + name + extra field)."""
    sig, = struct.unpack_from("<I", buf, at)
    if sig != 0x04034B50:
        raise FormatError("bad zip local header")
    name_len, extra_len = struct.unpack_from("<HH", buf, at + 26)
    return 30 + name_len + extra_len


class DcpReader:
    """A DCP folder's tensors (CheckpointReader-like) with reads of any global box."""

    def __init__(self, folder: Path, index: DcpIndex | None = None):
        self.path = Path(folder)
        self.index = index or read_index(self.path)
        self._files: dict[str, MappedFile] = {}
        self._views: dict[Chunk, np.ndarray] = {}
        self._infos = {n: TensorInfo(t.dtype, t.shape) for n, t in self.index.tensors.items()}

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def _mapped(self, name: str) -> MappedFile:
        if name not in self._files:
            path = self.path / name
            if Path(name).name != name or not path.is_file():
                raise FormatError(f"{self.path}: {METADATA} names data file {name!r}, which is missing")
            self._files[name] = MappedFile(path)
        return self._files[name]

    def chunk(self, name: str, c: Chunk) -> np.ndarray:
        """The chunk's elements as raw bits, a view of the mapped .distcp file."""
        if c in self._views:
            return self._views[c]
        mf = self._mapped(c.file)
        where = f"{mf.path} (bytes {c.offset}..{c.offset + c.length}, {name})"
        if c.offset < 0 or c.offset + c.length > mf.size or mf._mm is None:
            raise FormatError(f"{where}: beyond the end of the file ({mf.size} bytes)")
        buf = memoryview(mf._mm)
        try:
            z = zipfile.ZipFile(_Window(buf, c.offset, c.length))
            members = {i.filename: i for i in z.infolist()}
            pkl = next((m for m in members if m.endswith("/data.pkl")), None)
            if pkl is None:
                raise FormatError(f"{where}: not a torch.save archive (DCP's safetensors serialization is not supported)")
            prefix = pkl[: -len("data.pkl")]
            if prefix + "byteorder" in members and z.read(prefix + "byteorder") != b"little":
                raise FormatError(f"{where}: big-endian tensor data is not supported")
            stored = _TensorUnpickler(io.BytesIO(z.read(pkl)), where).load()
            record = members.get(f"{prefix}data/{stored.key}") if isinstance(stored, _Stored) else None
        except (zipfile.BadZipFile, NotImplementedError) as e:  # NotImplementedError: a zip version or method it lacks
            raise FormatError(f"{where}: not a torch.save archive ({cause(e)})") from None
        if record is None or record.compress_type != zipfile.ZIP_STORED:
            raise FormatError(f"{where}: no uncompressed storage record for its tensor")
        if stored.dtype != self.index.tensors[name].dtype or stored.shape != c.box.sizes:
            raise FormatError(f"{where}: holds {stored.dtype} {list(stored.shape)}, the metadata says "
                              f"{self.index.tensors[name].dtype} {list(c.box.sizes)}")
        item = dtypes.itemsize(stored.dtype)
        start = c.offset + record.header_offset + _local_header_size(buf, c.offset + record.header_offset)
        span = (sum((n - 1) * s for n, s in zip(stored.shape, stored.stride)) + 1) if all(stored.shape) else 0
        if stored.storage_offset < 0 or (stored.storage_offset + span) * item > record.file_size:
            raise FormatError(f"{where}: the tensor lies outside its storage record")
        view = np.ndarray(stored.shape, dtypes.bits_dtype(stored.dtype), buffer=buf,
                          offset=start + stored.storage_offset * item, strides=tuple(s * item for s in stored.stride))
        self._views = {c: view}  # only the last chunk stays referenced
        return view

    def region(self, name: str, box: Box) -> np.ndarray:
        """Elements `box` (global coordinates) of tensor `name` as raw bits; a view of
        the file when one chunk holds the whole box, else copied from each chunk."""
        t = self.index.tensors[name]
        parts = [(c, o) for c in t.chunks if (o := intersect(c.box, box)) is not None]
        if len(parts) == 1 and parts[0][1] == box:
            c = parts[0][0]
            return self.chunk(name, c)[box.slices(c.box)]
        out = np.empty(box.sizes, dtypes.bits_dtype(t.dtype))
        for c, o in parts:
            out[o.slices(box)] = self.chunk(name, c)[o.slices(c.box)]
            self.release()
        return out

    def array(self, name: str) -> np.ndarray:
        t = self.index.tensors[name]
        return self.region(name, Box((0,) * len(t.shape), t.shape))

    def object_bytes(self, name: str) -> bytes:
        """A byte item's raw bytes (a pickled object; not unpickled here)."""
        c = self.index.objects[name]
        mf = self._mapped(c.file)
        if c.offset < 0 or c.offset + c.length > mf.size or mf._mm is None:
            raise FormatError(f"{mf.path}: item {name} lies beyond the end of the file")
        return bytes(mf._mm[c.offset:c.offset + c.length])

    def release(self) -> None:
        for mf in self._files.values():
            mf.release()

    def close(self) -> None:
        self._views.clear()
        for mf in self._files.values():
            mf.close()
        self._files.clear()
