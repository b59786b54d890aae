"""Megatron-LM checkpoint folders (SPEC 4 and 6): `latest_checkpointed_iteration.txt`,
`iter_NNNNNNN/` or `release/`, and either one `mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`
per (tensor, pipeline, expert) rank holding `args`, `checkpoint_version`, `iteration`
and `model` (torch format), or a `torch_dist` distributed checkpoint, read as one rank
file of the whole model (runner.formats.torch_dist).

Reading exposes each rank file's weights under logical names (runner.convert.names,
from the template), so the core planner reshards them like any distributed checkpoint.
Writing assembles a rank's tensors in a temporary safetensors file with the core
executor, then torch.saves tensors that are views of that file's mapping: the
pickle is the only thing built in memory."""

from __future__ import annotations

import argparse
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runner import dtypes
from runner.convert.megatron_layout import MegatronLayout, detect
from runner.convert.model import Model, candidates, megatron_config
from runner.convert.names import STACKED
from runner.durable import DurableFile, signals_held, temp_path, write_bytes
from runner.errors import ConfigError, FormatError, excerpt, one_line
from runner.execute import SlicePool, WrittenFile, write_file
from runner.formats import torch_dist
from runner.formats.base import TensorInfo
from runner.formats.dcp import METADATA
from runner.formats.safetensors_io import SafetensorsFormat, SafetensorsReader
from runner.formats.torch_pt import TorchReader
from runner.outputs import file_crc32
from runner.plan import FilePlan
from runner.source import FileHeader, Source, SourceFiles, discover, natural_key

ITER_FILE = "latest_checkpointed_iteration.txt"
CKPT = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_RANK = re.compile(r"mp_rank_(\d+)(?:_(\d+))?(?:_(\d+))?")
# Top-level entries of a rank file that describe it rather than hold training state.
_HEAD = ("args", "checkpoint_version", "iteration", "model")


def is_weight(name: str) -> bool:
    """A model weight of a rank file: under `model.`, not a module's `_extra_state`
    (TransformerEngine stores those as BytesIO, bytes or uint8 tensors)."""
    return name.startswith("model.") and not name.endswith("._extra_state")


def checkpoint_dir(root: Path) -> Path:
    """The folder holding the mp_rank_* folders: `root` itself, the iteration named by
    latest_checkpointed_iteration.txt, else the newest iter_* folder, else release/."""
    root = Path(root)
    if any(_RANK.fullmatch(p.name) for p in root.iterdir() if p.is_dir()) or torch_dist.is_torch_dist(root):
        return root
    marker = root / ITER_FILE
    if os.path.lexists(marker):
        text = read_marker(marker)
        folder = root / ("release" if text == "release" else f"iter_{int(text):07d}")
        if not folder.is_dir():
            raise FormatError(f"{marker} names iteration {text}, but {folder} does not exist")
        return folder
    iters = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_")), key=lambda p: natural_key(p.name))
    if iters:
        return iters[-1]
    if (root / "release").is_dir():
        return root / "release"
    raise FormatError(f"{root}: no mp_rank_* folders, iter_* folders or release/ folder; not a Megatron checkpoint")


def read_marker(marker: Path) -> str:
    """latest_checkpointed_iteration.txt: an iteration number or `release`. At most 64
    bytes are read (it may be a link to /dev/zero) and at most 80 characters shown."""
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block
        try:
            raw = os.read(fd, 65)
        finally:
            os.close(fd)
    except OSError as e:
        raise FormatError(f"{marker}: cannot read: {e.strerror}") from None
    text = raw.strip()
    if len(raw) > 64 or not (text == b"release" or re.fullmatch(rb"[0-9]{1,12}", text)):
        raise FormatError(f"{marker} holds {excerpt(raw)}, not an iteration number or 'release'")
    return text.decode()


def rank_files(root: Path) -> list[Path]:
    """The rank files of a Megatron folder on this machine: every mp_rank_*/model_optim_rng.pt
    of its checkpoint folder, or a torch_dist folder's `.metadata`."""
    ckdir = checkpoint_dir(root)
    if torch_dist.is_torch_dist(ckdir):
        return [ckdir / METADATA]
    return [p / CKPT for p in ckdir.iterdir() if _RANK.fullmatch(p.name) and p.is_dir() and (p / CKPT).is_file()]


def source_files(root: Path) -> SourceFiles:
    """A conversion's source files on this machine (runner.source.SourceFiles): a Megatron
    folder's rank files, else the checkpoint files of rank 0 (an HF folder's shards)."""
    root = Path(root)
    if not root.exists():
        return SourceFiles(root, "", {})
    try:
        src = discover(root)
    except FormatError:
        if (root / "config.json").is_file():  # an HF folder whose shards are all on other nodes
            return SourceFiles(root, "hf", {})
        raise
    paths = rank_files(root) if src.kind == "megatron" else src.files.get(0, ())
    return SourceFiles(root, src.kind, {str(p.relative_to(root)): p.stat().st_size for p in paths})


def open_rank_file(path: Path):
    """A rank file's reader: `model_optim_rng.pt`, or a torch_dist folder's `.metadata`
    (the whole model as one rank file)."""
    if Path(path).name == METADATA:
        return torch_dist.TorchDistReader(Path(path).parent)
    return TorchReader(path)


def _args_of(path: Path, header: FileHeader) -> argparse.Namespace:
    if header.args is None:
        raise FormatError(f"{path}: no argparse.Namespace `args` entry; not a Megatron checkpoint")
    return argparse.Namespace(**header.args)


_PARALLEL = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")
# sizes the conversion builds names, lists and index arrays from
_WIDTHS = ("hidden_size", "ffn_hidden_size", "moe_ffn_hidden_size", "kv_channels", "padded_vocab_size",
           "vocab_size", "true_vocab_size", "make_vocab_size_divisible_by")
_COUNTS = ("num_attention_heads", "num_query_groups", "moe_router_topk")


def _size(args: argparse.Namespace, key: str, path: Path, limit: int) -> int | None:
    v = getattr(args, key, None)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise FormatError(f"{path}: Megatron args {key} is {v!r} ({type(v).__name__}); expected a positive integer")
    if v > limit:
        raise FormatError(f"{path}: Megatron args {key} {v} is more than its files can hold (at most {limit}); the args are corrupt")
    return v


def check_args(args: argparse.Namespace, path: Path, tensors: dict[str, TensorInfo], rank_folders: int | None) -> MegatronLayout:
    """The parallel layout, after checking every size the conversion uses: positive
    integers no larger than the files on disk can back (a size is never trusted
    before it is allocated). `rank_folders`: the mp_rank_* folders found; None for a
    torch_dist folder, whose tensors have their global shapes."""
    tp, pp, ep = (_size(args, k, path, rank_folders or 1 << 16) or 1 for k in _PARALLEL)
    etp = _size(args, "expert_tensor_parallel_size", path, rank_folders or 1 << 16) if getattr(args, "num_experts", None) else None
    lay = MegatronLayout(tp, pp, ep, etp or 0)
    if lay.etp_problem():
        raise FormatError(f"{path}: Megatron args expert_tensor_parallel_size {lay.etp_problem()}")
    if rank_folders is not None and lay.world_size > rank_folders:
        raise FormatError(f"{path}: args say TP {tp} PP {pp} EP {ep} ({lay.world_size} rank files), "
                          f"but the folder holds {rank_folders} mp_rank_* folder(s)")
    if rank_folders is None:
        tp = pp = ep = 1
    widest = max((d for t in tensors.values() for d in t.shape), default=1)
    for key in _WIDTHS:  # a width is at most TP times the widest dim of a rank file's tensor
        _size(args, key, path, widest * tp)
    hidden = _size(args, "hidden_size", path, widest * tp) or widest * tp
    for key in _COUNTS:
        _size(args, key, path, hidden)
    _size(args, "num_layers", path, max(len(tensors), 1) * pp)  # each layer has tensors in stage 0's file
    _size(args, "num_experts", path, max(len(tensors), widest) * ep)
    _size(args, "max_position_embeddings", path, 1 << 40)
    for key in ("norm_epsilon", "rotary_base"):
        v = getattr(args, key, None)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            raise FormatError(f"{path}: Megatron args {key} is {v!r}; expected a number")
    return lay


@dataclass
class MegatronFolder:
    """A Megatron checkpoint: where its files are, its layout, args, and the weight
    names of its first file (which say the template and naming scheme)."""

    root: Path
    ckdir: Path
    layout: MegatronLayout
    files: dict[int, Path]
    args: argparse.Namespace
    first_names: frozenset[str]
    fmt: str = "torch"  # or "torch_dist"

    @staticmethod
    def open(root: Path, files: SourceFiles | None = None) -> "MegatronFolder":
        """`files`: the rank files the job may read (default: those on this machine;
        under MPI, what every rank sees), whose headers say the layout."""
        root = Path(root)
        files = files or source_files(root)
        ckdir = checkpoint_dir(root)
        if torch_dist.is_torch_dist(ckdir):  # global shapes, whatever the parallel settings it was saved with:
            path = ckdir / METADATA             # one logical rank (TP 1, PP 1, EP 1), served from the chunks
            header = files.header(path)
            args = _args_of(path, header)
            check_args(args, path, header.tensors, None)
            weights = frozenset(n[len("model."):] for n in header.tensors if is_weight(n))
            return MegatronFolder(root, ckdir, MegatronLayout(1, 1, 1), {0: path}, args, weights, "torch_dist")
        found = {p.parent.name: p for p in files.paths() if p.parent.parent == ckdir}
        if not found:
            raise FormatError(f"{ckdir}: no mp_rank_* folders")
        first = found[min(found, key=natural_key)]
        header = files.header(first)
        args = _args_of(first, header)
        lay = check_args(args, first, header.tensors, len(found))
        ranks = {r: ckdir / lay.folder(r) / CKPT for r in range(lay.world_size)}
        missing = [str(p.relative_to(ckdir)) for p in ranks.values() if p not in found.values()]
        if missing:
            raise FormatError(f"{ckdir}: args say TP {lay.tp} PP {lay.pp} EP {lay.ep}, but {', '.join(missing[:4])} "
                              f"{'is' if len(missing) == 1 else 'are'} missing ({len(missing)} of {lay.world_size})")
        weights = frozenset(n[len("model."):] for n in header.tensors if is_weight(n))
        return MegatronFolder(root, ckdir, lay, ranks, args, weights)

    @property
    def iteration(self) -> str:
        return self.ckdir.name

    def padded_vocab(self) -> int | None:
        return getattr(self.args, "padded_vocab_size", None)

    def local_experts(self) -> int:
        return (getattr(self.args, "num_experts", None) or 0) // self.layout.ep


def rank_infos(path: Path, held: dict[str, TensorInfo], names: dict[str, tuple[str, ...]]) -> dict[str, TensorInfo]:
    """A rank file's weights under logical names (stacked experts: one tensor per local
    expert in the file); every weight the file holds must have a name, and every name
    its weights."""
    stored = {f for fs in names.values() for f in fs}
    unknown = sorted(n for n in held if is_weight(n) and n not in stored)
    if unknown:
        raise FormatError(f"{path}: weights with no conversion map: {', '.join(unknown[:5])}"
                          f"{f' and {len(unknown) - 5} more' if len(unknown) > 5 else ''}")
    infos: dict[str, TensorInfo] = {}
    for logical, fs in names.items():
        missing = [f for f in fs if f not in held]
        if missing:
            raise FormatError(f"{path}: lacks {missing[0]} (the model's sizes and layer spec say it should hold it)")
        first = held[fs[0]]
        infos[logical] = TensorInfo(first.dtype, (len(fs), *first.shape)) if STACKED in logical else first
    return infos


def dropped(header: FileHeader) -> list[str]:
    """What a rank file holds besides the model (optimizer, rng_state, opt_param_scheduler,
    num_floating_point_operations_so_far, ...): not converted."""
    return sorted({n.split(".")[0] for n in [*header.tensors, *header.objects]} - set(_HEAD))


class MegatronRankReader:
    """One rank file's weights under logical names (CheckpointReader). Stacked experts
    are the one copy it makes: the file holds one tensor per local expert."""

    def __init__(self, path: Path, names: dict[str, tuple[str, ...]]):
        self.path = Path(path)
        self._reader = open_rank_file(path)
        self._names = names
        self._infos = rank_infos(self.path, self._reader.tensors(), names)

    def tensors(self) -> dict[str, TensorInfo]:
        return self._infos

    def array(self, name: str) -> np.ndarray:
        fs = self._names[name]
        if STACKED not in name:
            return self._reader.array(fs[0])
        return np.stack([self._reader.array(f) for f in fs])  # one tensor per local expert

    def release(self) -> None:
        self._reader.release()

    def close(self) -> None:
        self._reader.close()


@dataclass(frozen=True)
class MegatronSource(Source):
    """A Megatron folder as a distributed source: rank r's file read under logical names."""

    names: dict[int, dict[str, tuple[str, ...]]] = field(default_factory=dict)

    def open(self, rank: int) -> MegatronRankReader:  # type: ignore[override]
        return MegatronRankReader(self.files[rank][0], self.names[rank])


# -- writing ------------------------------------------------------------------------------
def megatron_args(model: Model, lay: MegatronLayout, padded_vocab: int, divisible_by: int, impl: str, naming: str,
                  dtype: str, iteration: int) -> argparse.Namespace:
    """The `args` Megatron's load_checkpoint reads and checks: sizes and parallel
    settings, plus the template's `megatron_args` (normalization, swiglu, ...)."""
    import torch

    env = model.env()
    experts = model.experts
    heads, kv_heads, ffn = env.int("num_heads"), env.int("n_kv_heads"), env.int("intermediate_size")
    positions = env.int("max_position_embeddings")
    return argparse.Namespace(
        num_layers=model.num_layers, hidden_size=env.int("hidden_size"), ffn_hidden_size=ffn,
        num_attention_heads=heads, kv_channels=env.int("head_dim"),
        group_query_attention=kv_heads != heads, num_query_groups=kv_heads,
        max_position_embeddings=positions, seq_length=positions, rotary_base=env.get("rope_theta"),
        rotary_percent=env.get("partial_rotary_factor", 1.0),
        make_vocab_size_divisible_by=divisible_by, padded_vocab_size=padded_vocab, vocab_size=model.vocab,
        true_vocab_size=model.vocab, vocab_file=None, tokenizer_type=None, norm_epsilon=env.get("norm_eps"),
        untie_embeddings_and_output_weights=not model.tied,
        num_experts=experts or None, moe_router_topk=env.int("num_experts_per_tok") if experts else 2,
        moe_ffn_hidden_size=env.int("moe_intermediate_size" if "moe_intermediate_size" in env else "intermediate_size") if experts else None,
        moe_shared_expert_intermediate_size=env.int("shared_expert_intermediate_size") if "shared_expert_intermediate_size" in env else None,
        moe_grouped_gemm=False,
        **model.template.megatron_args,
        tensor_model_parallel_size=lay.tp, pipeline_model_parallel_size=lay.pp, expert_model_parallel_size=lay.ep,
        expert_tensor_parallel_size=lay.etp_size,
        virtual_pipeline_model_parallel_size=None, sequence_parallel=False,
        transformer_impl=impl, use_mcore_models=naming == "core", use_legacy_models=naming == "legacy",
        bf16=dtype == "BF16", fp16=dtype == "F16", params_dtype=dtypes.torch_dtype(dtype) if dtype in ("BF16", "F16") else torch.float32,
        iteration=iteration, consumed_train_samples=0, consumed_valid_samples=0,
    )


_WARNINGS = threading.Lock()  # warnings.catch_warnings swaps process-wide state: one thread at a time


def write_rank(fp: FilePlan, pool: SlicePool, path: Path, names: dict[str, tuple[str, ...]], extra_state: list[str],
               head: dict, legacy: bool) -> WrittenFile:
    """Write one `model_optim_rng.pt` atomically: `head` (args, checkpoint_version,
    iteration) plus `model`, whose tensors are views of a temporary safetensors file."""
    import torch

    staging = temp_path(path, ".tensors")  # a temporary, named as every other one
    reader = None
    try:  # from before the staging file exists: an interrupt right after it is renamed into place removes it too
        write_file(fp, pool, SafetensorsFormat(), staging)
        reader = SafetensorsReader(staging)
        model: dict = {}
        with _WARNINGS, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only mapping: torch warns, never writes
            for t in fp.tensors:
                bits = reader.array(t.name)
                parts = list(bits) if STACKED in t.name else [bits]  # one tensor per local expert
                for fname, part in zip(names[t.name], parts):
                    model[fname] = torch.from_numpy(part).view(dtypes.torch_dtype(t.out_dtype))
        model.update({n: None for n in extra_state})
        doc = {**head, "model": nest_legacy(model) if legacy else model}
        with DurableFile(path) as out, signals_held():
            torch.save(doc, out.stream())
        del model, doc
    finally:
        if reader is not None:
            reader.close()
        staging.unlink(missing_ok=True)
    return WrittenFile(path, path.stat().st_size, file_crc32(path))


def nest_legacy(flat: dict) -> dict:
    """Legacy checkpoints nest `language_model` by module: embedding, encoder (flat
    keys below it), output_layer."""
    out: dict = {}
    for name, value in flat.items():
        if not name.startswith("language_model."):
            out[name] = value
            continue
        rest = name[len("language_model."):]
        lm = out.setdefault("language_model", {})
        if rest.startswith("encoder."):
            lm.setdefault("encoder", {})[rest[len("encoder."):]] = value
        else:
            node = lm
            *path, leaf = rest.split(".")
            for key in path:
                node = node.setdefault(key, {})
            node[leaf] = value
    return out


def iteration_folder(iteration: int | str) -> str:
    """`iter_NNNNNNN`, or `release` for a release checkpoint (as Megatron names them)."""
    return "release" if iteration == "release" else f"iter_{iteration:07d}"


def write_iteration_marker(folder: Path, iteration: int | str) -> Path:
    path = folder / ITER_FILE
    write_bytes(path, f"{iteration}".encode())
    return path


def _naming(mf: MegatronFolder) -> str:
    """The template and naming scheme whose names the first rank file holds."""
    where = str(mf.files[0])
    try:
        model, scheme = detect(megatron_config(mf.args, where), candidates(None, None), mf.layout, mf.first_names, where)
    except (ConfigError, FormatError) as e:
        return f"names of no template: {e}"
    return f"template {model.family}, {scheme} names"


def describe_folder(path: Path) -> str:
    """`autotrans inspect` of a Megatron folder: layout, naming, sizes, files."""
    mf = MegatronFolder.open(Path(path))
    a = mf.args
    layout = f"TP {mf.layout.tp} PP {mf.layout.pp} EP {mf.layout.ep}, {mf.layout.world_size} rank file(s)"
    if mf.fmt == "torch_dist":
        layout = (f"torch_dist saved at TP {getattr(a, 'tensor_model_parallel_size', '?')} PP {getattr(a, 'pipeline_model_parallel_size', '?')}, "
                  "global shapes read as one rank")
    lines = [
        f"megatron checkpoint {mf.ckdir} ({_naming(mf)}): {layout}",
        f"model: {getattr(a, 'num_layers', '?')} layers, hidden {getattr(a, 'hidden_size', '?')}, "
        f"ffn {getattr(a, 'ffn_hidden_size', '?')}, heads {getattr(a, 'num_attention_heads', '?')}, "
        f"query groups {getattr(a, 'num_query_groups', None) or getattr(a, 'num_attention_heads', '?')}, "
        f"padded vocab {getattr(a, 'padded_vocab_size', '?')}, experts {getattr(a, 'num_experts', None) or 0}",
    ]
    for r, p in mf.files.items():
        reader = open_rank_file(p)
        try:
            infos = {n: t for n, t in reader.tensors().items() if is_weight(n)}
            nbytes = sum(math.prod(t.shape) * dtypes.itemsize(t.dtype) for t in infos.values())
            lines.append(f"rank {r}: {p.relative_to(mf.ckdir)}: {len(infos)} tensors, {nbytes} bytes")
            if r == 0:
                lines += [f"  {n[len('model.'):]}: {list(t.shape)} {t.dtype}" for n, t in sorted(infos.items(), key=lambda x: natural_key(x[0]))]
        finally:
            reader.close()
    return "\n".join(one_line(line) for line in lines)  # names and paths from files: no fake lines
