"""torch `.pt` / `.bin` files (SPEC 4): unpickled with `weights_only=True` plus an
allow-list of the harmless classes real checkpoints hold, and memory-mapped.

Megatron-LM's `model_optim_rng.pt` holds an `argparse.Namespace`, numpy RNG state,
enums inside `args` (`exit_signal = signal.SIGTERM` since core 0.16, Megatron's own
enums) and TransformerEngine `_extra_state` buffers (BytesIO, bytes or uint8 tensors).
The Namespace, SimpleNamespace, paths, numpy arrays and BytesIO are rebuilt for real;
signals become their plain int; classes from the modules in `INERT_MODULES` become
inert placeholders that record their arguments and never call anything. Any other
global (os.system, builtins.eval, ...) is refused before it runs."""

from __future__ import annotations

import argparse
import io
import threading
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from runner import dtypes
from runner.errors import FormatError, cause, clipped, name_list
from runner.formats.base import TensorInfo

# Modules whose classes and enums may appear inside Megatron's `args` and optimizer
# state: never executed, replaced by placeholders.
INERT_MODULES = ("megatron.", "transformer_engine.", "apex.", "torch.distributed.", "torch.optim.", "enum.")


class Inert:
    """Stands in for a class or function the runner does not load: keeps what the
    pickle passed to it, calls nothing."""

    _qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self._qualname}{self.args!r}>"


def _placeholder(qualname: str) -> type:
    return type(f"Inert[{qualname}]", (Inert,), {"_qualname": qualname})


def _real_globals() -> list[tuple[Any, str]]:
    """Harmless classes rebuilt for real, under every name numpy 1 and 2 pickle them as."""
    entries: list[tuple[Any, str]] = [(argparse.Namespace, "argparse.Namespace"), (io.BytesIO, "_io.BytesIO")]
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        entries.append((multiarray._reconstruct, f"{mod}._reconstruct"))
        entries.append((multiarray.scalar, f"{mod}.scalar"))
    entries += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            entries.append((cls, f"numpy.dtypes.{name}"))
    return entries


def _megatron_globals() -> list[tuple[Any, str]]:
    """What Megatron-LM core 0.16+ puts in `args` beyond the basics (the harmless
    classes megatron-core itself registers as safe): SimpleNamespace, PosixPath and
    `signal.Signals`. Python pickles a signal as a call `Signals(15)` (3.11) or as the
    global `signal.SIGTERM`; both are read as the plain int."""
    import pathlib
    import signal
    import types

    return ([(types.SimpleNamespace, "types.SimpleNamespace"), (pathlib.PosixPath, "pathlib.PosixPath"), (int, "signal.Signals")]
            + [(int(v), f"signal.{k}") for k, v in signal.Signals.__members__.items()])


# torch's safe_globals list is process-wide, not per thread: one load at a time, so that
# writer threads reading rank files never see each other's allow-list
_LOAD_LOCK = threading.Lock()


def load(path: Path) -> Any:
    """Unpickle a torch file without running code from it; tensors stay memory-mapped."""
    import torch

    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise FormatError(f"{path}: not a torch zip checkpoint (legacy torch.save files are not supported; re-save it with torch >= 1.6)")
    check_zip(path)
    real = _real_globals() + _megatron_globals()
    known = {name for _, name in real}
    try:
        unknown = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if g not in known]
    except Exception as e:  # a corrupt zip or pickle stream
        raise FormatError(f"{path}: cannot read torch checkpoint ({cause(e)})") from None
    refused = sorted(g for g in unknown if not g.startswith(INERT_MODULES))
    if refused:
        raise FormatError(f"{path}: refused to load: its pickle calls {name_list([clipped(g) for g in refused])}, which could run code; "
                          "only tensors, argparse.Namespace, numpy arrays and Megatron/TransformerEngine classes are accepted")
    allowed = real + [(_placeholder(g), g) for g in unknown]
    try:
        with _LOAD_LOCK, torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch.load of damaged bytes raises anything (TypeError, KeyError, ...)
        raise FormatError(f"{path}: cannot load torch checkpoint ({type(e).__name__}: {cause(e)})") from None


def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, leaf) for every leaf of nested dicts, in order; other containers are
    leaves. Iterative: a hostile file may nest dicts thousands deep."""
    stack = [(prefix, obj)]
    while stack:
        name, o = stack.pop()
        if isinstance(o, dict):
            stack += reversed([(f"{name}{k}.", v) for k, v in o.items()])
        else:
            yield name[:-1], o


def check_zip(path: Path) -> None:
    """Every member stored uncompressed within the file, as torch.save writes them: what
    loading costs is then bounded by the file's bytes (a zip bomb is refused unread)."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:  # NotImplementedError: a zip version or method it lacks
        raise FormatError(f"{path}: cannot read torch checkpoint ({cause(e)})") from None
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED or m.file_size != m.compress_size or m.header_offset + m.file_size > size:
            raise FormatError(f"{path}: member {m.filename!r} is compressed or claims {m.file_size} bytes past the file's "
                              f"{size}; torch.save never writes that; the file is corrupt or hostile")


def check_view(path: Path, name: str, t: Any) -> None:
    """A tensor lies inside its storage and no two of its elements share bytes: a
    stride-0 or overlapping view would make a few stored bytes read as gigabytes."""
    shape, stride, numel = tuple(t.shape), t.stride(), t.numel()
    reach = 1  # elements spanned by the dims checked so far
    for n, st in sorted(((n, st) for n, st in zip(shape, stride) if n > 1), key=lambda d: d[1]):
        if st < reach:
            raise FormatError(f"{path}: tensor {name!r} is a view whose elements overlap (shape {list(shape)}, "
                              f"strides {list(stride)}); the file is corrupt or hostile")
        reach += st * (n - 1)
    end = (t.storage_offset() + reach) * t.element_size()
    if numel and end > t.untyped_storage().nbytes():
        raise FormatError(f"{path}: tensor {name!r} reaches byte {end} of a {t.untyped_storage().nbytes()}-byte storage; "
                          "the file is corrupt or hostile")


class TorchReader:
    """A torch file's tensors, by dotted name through nested dicts (`model` dicts
    included); non-tensor entries are kept in `objects`."""

    def __init__(self, path: Path):
        import torch

        self.path = Path(path)
        self._tensors: dict[str, Any] = {}
        self.objects: dict[str, Any] = {}
        root = load(self.path)
        for name, leaf in flatten(root if isinstance(root, dict) else {"": root}):
            if isinstance(leaf, torch.Tensor):
                check_view(self.path, name, leaf)
                self._tensors[name] = leaf
            else:
                self.objects[name] = leaf
        self._infos = {n: TensorInfo(dtypes.from_torch(t.dtype), tuple(t.shape)) for n, t in self._tensors.items()}

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def array(self, name: str) -> np.ndarray:
        """The tensor's bits as numpy, a view of the mapped file when it is contiguous."""
        import torch

        t = self._tensors[name]
        if not t.is_contiguous():
            t = t.contiguous()
        size = dtypes.itemsize(self._infos[name].dtype)
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
        return t.view(bits).numpy().view(dtypes.bits_dtype(self._infos[name].dtype))

    def release(self) -> None:
        """torch owns the mapping; its clean file pages are reclaimable page cache."""

    def close(self) -> None:
        self._tensors.clear()
        self.objects.clear()
