"""Conversion jobs (SPEC 6): HF / MindFormers / Megatron sources to Megatron, HF or
MindFormers outputs, through the core planner and executor.

The source is seen either as HF-named tensors (an HF folder, or a MindFormers file
renamed) or as Megatron logical tensors laid out over its ranks. A Megatron output
plans from a source strategy over the destination's logical tensors: a full one
served by recipes from HF tensors, or the source's own Megatron layout (resharded
directly; only vocab tensors whose padding changes go through a recipe). HF and
MindFormers outputs are whole tensors served by recipes from either side."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from runner import __version__, dtypes, lora as lora_merge, plan as planner, strategy as strat
from runner.config import JobConfig
from runner.convert import hf_dir, rows
from runner.convert.megatron_dir import MegatronFolder, MegatronSource, is_weight, open_rank_file, megatron_args, write_iteration_marker, write_rank, CHECKPOINT_VERSION, CKPT
from runner.convert.megatron_layout import MegatronLayout, detect, megatron_map, scheme_of
from runner.convert.model import Model, candidates, hf_config, megatron_config, read_hf_config
from runner.convert.names import NameMap, hf_tensors, linked_dtype, scheme_map, scheme_tensors
from runner.errors import ConfigError, FormatError
from runner.execute import LocalPool, WrittenFile, tensor_bits, write_file
from runner.formats.base import TensorInfo
from runner.formats.safetensors_io import SafetensorsFormat
from runner.layout import Box, ParamLayout
from runner.log import say, warn
from runner.plan import ReadItem
from runner.outputs import OutputFolder, check_no_overlap
from runner.source import Source, discover
from runner.strategy import Strategy

TRANSFORMED = "transformed_checkpoint"
STRATEGY_DIR = "strategy"
# HF tensors a conversion may leave behind: rotary tables that models recompute.
_IGNORABLE = (".rotary_emb.inv_freq",)


def _infos(shapes: dict[str, tuple[int, ...]], dtype_of: Callable[[str], str]) -> dict[str, TensorInfo]:
    return {n: TensorInfo(dtype_of(n), s) for n, s in shapes.items()}


# -- sources --------------------------------------------------------------------------------
@dataclass
class HFInput:
    """An HF folder, or a MindFormers checkpoint read under HF names."""

    source: Source
    spec: Model
    infos: dict[str, TensorInfo]  # by HF name
    held: dict[str, TensorInfo]  # as the files name them
    built: dict[str, rows.Recipe]  # HF tensors from the files' (MindFormers names); {}: the files hold HF names
    reference: Path | None
    lora: lora_merge.LoraMerge | None = None  # adapters merged into the weights as they are read

    @staticmethod
    def open(cfg: JobConfig, source: Source) -> "HFInput":
        reader = source.open(0)
        try:
            held = dict(reader.tensors())
        finally:
            reader.close()
        merge = None
        if cfg.lora is not None:
            merge, _, base = lora_merge.prepare(cfg.lora, cfg.model, Strategy.full(held), {0: held})
            held = base[0]
        inp = HFInput._open(cfg, source, held)
        inp.lora = merge
        return inp

    @staticmethod
    def _open(cfg: JobConfig, source: Source, held: dict[str, TensorInfo]) -> "HFInput":
        arch = (cfg.model or {}).get("arch")
        if source.kind != "hf":
            if not cfg.reference_hf_dir:
                raise ConfigError(f"{source.root} is neither an HF folder (config.json + weights) nor a Megatron folder; "
                                  "for a MindFormers checkpoint set reference_hf_dir to the model's HF folder (its config.json)")
            _, spec = read_hf_config(Path(cfg.reference_hf_dir), arch)
            if "mindformers" not in spec.template.schemes:
                raise ConfigError(f"template {spec.family} has no MindFormers names; {source.root} is not an HF folder")
            spec = spec.with_job(cfg.model)
            infos, built = hf_tensors(spec, "mindformers", held, str(source.root))
            return HFInput(source, spec, infos, held, built, Path(cfg.reference_hf_dir))
        _, spec = read_hf_config(source.root, arch)
        reference = Path(cfg.reference_hf_dir) if cfg.reference_hf_dir else source.root
        return HFInput(source, spec, held, held, {}, reference)

    def check(self, nmap: NameMap) -> None:
        """Every source tensor is mapped and has the shape the config implies."""
        held = {n for n in self.infos if not n.endswith(_IGNORABLE)}
        if self.spec.tied:
            held.discard("lm_head.weight")  # a tied copy some savers keep
        unmapped, missing = sorted(held - set(nmap.hf_shapes)), sorted(set(nmap.hf_shapes) - held)
        if unmapped or missing:
            parts = [f"not in the {self.spec.family} map: {planner._names(unmapped)}"] if unmapped else []
            parts += [f"missing from the checkpoint: {planner._names(missing)}"] if missing else []
            raise FormatError(f"{self.source.root}: tensors do not match config.json; " + "; ".join(parts))
        for n, shape in nmap.hf_shapes.items():
            if self.infos[n].shape != shape:
                raise FormatError(f"{self.source.root}: tensor {n} has shape {list(self.infos[n].shape)}, config.json implies {list(shape)}")

    def pool(self, recipes: dict[str, rows.Recipe]) -> rows.RecipePool:
        recipes = rows.compose(recipes, self.built)  # read the files' own tensors
        if self.lora is None:
            reader = self.source.open(0)
            return rows.RecipePool(recipes, reader.array, owned=reader)
        merged = MergedTensors(lora_merge.wrap(LocalPool(self.source), self.lora), self.held)
        return rows.RecipePool(recipes, merged, owned=merged)

    kind = "hf"

    def digest_doc(self) -> dict:
        doc = {"hf": {n: [t.dtype, list(t.shape)] for n, t in sorted(self.infos.items())}}
        return {**doc, "lora": self.lora.describe()} if self.lora else doc

    def files(self) -> list[Path]:
        return list(self.source.files[0]) + (self.lora.files if self.lora else [])


class MergedTensors:
    """Whole HF tensors with their LoRA adapters merged (runner.lora); keeps the last
    one, since consecutive reads come from the same tensor (q, k, v of one layer)."""

    def __init__(self, pool, infos: dict[str, TensorInfo]):
        self.pool, self.infos = pool, infos
        self._last: tuple[str, object] | None = None

    def __call__(self, name: str):
        if self._last is None or self._last[0] != name:
            whole = Box((0,) * len(self.infos[name].shape), self.infos[name].shape)
            self._last = (name, self.pool.region(ReadItem(0, name, whole, whole)))
        return self._last[1]

    def release(self) -> None:
        self.pool.release()

    def close(self) -> None:
        self._last = None
        self.pool.close()


@dataclass
class MegatronInput:
    folder: MegatronFolder
    spec: Model
    scheme: str
    nmap: NameMap
    infos: dict[str, TensorInfo]  # logical
    strategy: Strategy
    source: MegatronSource
    reference: Path | None

    @staticmethod
    def open(cfg: JobConfig, root: Path) -> "MegatronInput":
        if cfg.lora is not None:
            raise ConfigError("lora: a merge reads HF folders and safetensors / ckpt checkpoints; convert the Megatron checkpoint to HF first, then merge")
        mf = MegatronFolder.open(root)
        reference = Path(cfg.reference_hf_dir) if cfg.reference_hf_dir else None
        arch = (cfg.model or {}).get("arch")
        ref_spec = read_hf_config(reference, arch)[1] if reference else None
        config = megatron_config(mf.args, str(mf.files[0]), ref_spec.vocab if ref_spec else None)
        spec, scheme = detect(config, candidates(arch, ref_spec), mf.layout, mf.first_names, str(mf.files[0]))
        lay = mf.layout
        padded = mf.padded_vocab() or spec.padded_vocab(getattr(mf.args, "make_vocab_size_divisible_by", 128) or 128, lay.tp)
        mm = megatron_map(spec, scheme, lay, padded)
        nmap = mm.nmap
        dtype = _megatron_dtype(mf)
        infos = _infos(nmap.shapes, lambda n: dtype)
        s = mm.strategy(infos)
        names = {r: {n: tuple("model." + f for f in fs) for n, fs in mm.file_names(r, s.params_of_rank(r)).items()} for r in s.ranks}
        source = MegatronSource(Path(root), "megatron", {r: (p,) for r, p in mf.files.items()}, names)
        first = source.open(s.ranks[0])
        try:
            if first.dropped:
                warn(f"{', '.join(first.dropped)} in {mf.files[s.ranks[0]].parent.name}/ and its sibling rank files "
                     "are not converted: only the model's weights are")
        finally:
            first.close()
        return MegatronInput(mf, spec, scheme, nmap, infos, s, source, reference)

    def pool(self, recipes: dict[str, rows.Recipe]) -> rows.RecipePool:
        """Recipes over whole logical tensors; other reads straight from the rank files."""
        asm = Assembler(self.strategy, LocalPool(self.source))
        return rows.RecipePool(recipes, asm, inner=asm.pool, owned=asm)

    kind = "megatron"

    def digest_doc(self) -> dict:
        return {"megatron": self.strategy.to_json(), "scheme": self.scheme}

    def files(self) -> list[Path]:
        return list(self.folder.files.values())


def _megatron_dtype(mf: MegatronFolder) -> str:
    r = open_rank_file(mf.files[0])
    try:
        kinds = {t.dtype for n, t in r.tensors().items() if is_weight(n)}
    finally:
        r.close()
    if len(kinds) != 1:
        raise FormatError(f"{mf.files[0]}: weights of several dtypes ({', '.join(sorted(kinds))}); expected one")
    return kinds.pop()


class Assembler:
    """Whole logical tensors reassembled from a Megatron source's ranks; keeps the last
    one, since HF tensors are written in the order their sources come (q, k and v from
    one QKV tensor, gate and up from one fc1)."""

    def __init__(self, s: Strategy, pool: LocalPool):
        self.strategy, self.pool = s, pool
        self._cache: dict[str, object] = {}

    def __call__(self, name: str):
        if name not in self._cache:
            p = self.strategy.params[name]
            full = Strategy(((0,),), {name: p.replicated(p.shape, p.dtype)})
            fp = planner.plan_rank(Strategy(self.strategy.stages, {name: p}), full, 0)
            self._cache.clear()
            self._cache[name] = tensor_bits(fp.tensors[0], self.pool)
        return self._cache[name]

    def release(self) -> None:
        self.pool.release()

    def close(self) -> None:
        self._cache.clear()
        self.pool.close()


# -- targets --------------------------------------------------------------------------------
@dataclass
class Target:
    """What a conversion writes: per output unit (rank file or HF shard), a plan and a path."""

    dst: Strategy  # written to output_dir/strategy
    units: list[int]
    path: Callable[[int], Path]
    write: Callable[[int, object], WrittenFile]  # (unit, pool) -> file
    make_pool: Callable[[], object]
    unit_bytes: Callable[[int], int]
    doc: dict
    finish: Callable[[], None] = lambda: None
    notes: list[str] = field(default_factory=list)


def megatron_target(cfg: JobConfig, src: HFInput | MegatronInput, out: Path) -> Target:
    pc = cfg.parallel_config
    lay = MegatronLayout(pc.model_parallel, pc.pipeline_stage, pc.expert_parallel)
    spec = src.spec
    padded = spec.padded_vocab(cfg.make_vocab_size_divisible_by, lay.tp)
    mm = megatron_map(spec, scheme_of(cfg.megatron_naming, cfg.transformer_impl), lay, padded)
    nmap = mm.nmap
    cast_to = dtypes.CAST_NAMES[cfg.dtype] if cfg.dtype else None
    if isinstance(src, HFInput):
        src.check(nmap)
        infos = _infos(nmap.shapes, lambda n: linked_dtype(nmap, n, src.infos))
        recipes = rows.forward(nmap.links, nmap.pads, src.infos, infos, nmap.row_dims)
        plan_src = Strategy.full(infos)
        make_pool = lambda: src.pool(recipes)  # noqa: E731
    else:
        infos = _infos(nmap.shapes, lambda n: next(iter(src.infos.values())).dtype)
        plan_src, make_pool = _reshard_source(src, infos, nmap)
    dst = mm.strategy(infos)
    planner.check_compatible(plan_src, dst, cast_to)
    out_dtype = dtypes.cast_dtype(next(iter(infos.values())).dtype, cast_to)
    args = megatron_args(spec, lay, padded, cfg.make_vocab_size_divisible_by, cfg.transformer_impl,
                         cfg.megatron_naming, out_dtype, cfg.iteration)
    head = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": cfg.iteration}
    iter_dir = out / f"iter_{cfg.iteration:07d}"

    def path(rank: int) -> Path:
        return iter_dir / lay.folder(rank) / CKPT

    def write(rank: int, pool) -> WrittenFile:
        fp = planner.plan_rank(plan_src, dst, rank, cast_to=cast_to)
        names = mm.file_names(rank, [t.name for t in fp.tensors])
        return write_rank(fp, pool, path(rank), names, mm.extra_state(rank), head, cfg.megatron_naming == "legacy")

    doc = {"to": "megatron", "dst": dst.to_json(), "padded_vocab": padded}
    return Target(dst, dst.ranks, path, write, make_pool, dst.rank_bytes, doc,
                  finish=lambda: write_iteration_marker(out, cfg.iteration))


def _reshard_source(src: MegatronInput, infos: dict[str, TensorInfo], nmap: NameMap):
    """Megatron to Megatron: tensors whose shape is unchanged are read straight from the
    source layout; vocab tensors whose padding changes (or a tied output layer copy the
    source lacks) are rebuilt by a recipe from the source's logical tensors."""
    direct = {n: p for n, p in src.strategy.params.items() if n in infos and p.shape == infos[n].shape}
    links, pads = [], []
    vocab = src.spec.vocab
    for n in sorted(set(infos) - set(direct)):
        if n not in nmap.vocab:
            raise FormatError(f"{n}: the source has shape {list(src.infos[n].shape) if n in src.infos else 'none'}, the destination needs {list(infos[n].shape)}")
        origin = n if n in src.infos else nmap.vocab[n]
        links.append(rows.Link(origin, 0, n, 0, vocab))
        if infos[n].shape[0] > vocab:
            pads.append(rows.Pad(n, vocab, infos[n].shape[0] - vocab, origin, vocab - 1))
    recipes = rows.forward(links, pads, src.infos, {n: infos[n] for n in infos if n not in direct}, {})
    params = dict(direct)
    params.update({n: ParamLayout.replicated(infos[n].shape, infos[n].dtype) for n in recipes})
    return Strategy(src.strategy.stages, params, "native"), lambda: src.pool(recipes)


def megatron_hf_recipes(src: MegatronInput) -> tuple[dict[str, TensorInfo], dict[str, rows.Recipe]]:
    """HF tensors (by HF name) and how to build each from the Megatron logical tensors."""
    dtype = next(iter(src.infos.values())).dtype
    infos = _infos(src.nmap.hf_shapes, lambda n: dtype)
    return infos, rows.backward(src.nmap.links, infos, src.infos, src.nmap.row_dims)


def megatron_as_hf(path: Path) -> tuple[dict[str, TensorInfo], Callable[[], rows.RecipePool]]:
    """A Megatron folder seen as whole tensors under HF names (`autotrans verify`):
    the tensors, and a pool factory serving them."""
    from runner.config import from_mapping

    src = MegatronInput.open(from_mapping({"load_checkpoint": str(path), "output_format": "hf"}), Path(path))
    infos, recipes = megatron_hf_recipes(src)
    return infos, lambda: src.pool(recipes)


def hf_target(cfg: JobConfig, src: HFInput | MegatronInput, out: Path) -> Target:
    """HF folder (shards + index) or MindFormers files (rank layout of the core job)."""
    spec = src.spec
    if isinstance(src, HFInput):
        nmap = scheme_map(spec, "hf", "hf")
        src.check(nmap)
        infos = {n: src.infos[n] for n in nmap.hf_shapes}
        recipes = {n: rows.Recipe(t.shape, t.dtype, 1, (rows.Block(n, 0, t.shape[0]),)) for n, t in infos.items()}
    else:
        nmap = src.nmap
        infos, recipes = megatron_hf_recipes(src)
    cast_to = dtypes.CAST_NAMES[cfg.dtype] if cfg.dtype else None
    if cfg.output_format == "mindformers":
        return _mindformers_target(cfg, src, infos, recipes, cast_to, out)
    names = list(nmap.hf_shapes)
    out_infos = {n: TensorInfo(dtypes.cast_dtype(infos[n].dtype, cast_to), infos[n].shape) for n in names}
    shards = hf_dir.shard(names, out_infos, hf_dir.parse_size(cfg.max_shard_size))
    full = Strategy.full(infos)

    def write(i: int, pool) -> WrittenFile:
        sub = Strategy.full({n: infos[n] for n in shards[i]})
        fp = planner.plan_rank(sub, sub, 0, cast_to=cast_to)
        return write_file(fp, pool, SafetensorsFormat(), out / hf_dir.shard_name(i, len(shards)))

    def finish() -> None:
        hf_dir.write_index(out, shards, out_infos)
        out_dtype = next(iter(out_infos.values())).dtype
        hf_dir.copy_reference(out, src.reference, hf_config(spec, out_dtype))

    doc = {"to": "hf", "shards": shards, "reference": str(src.reference) if src.reference else None}
    return Target(full, list(range(len(shards))), lambda i: out / hf_dir.shard_name(i, len(shards)), write,
                  lambda: src.pool(recipes), lambda i: sum(out_infos[n].numel * dtypes.itemsize(out_infos[n].dtype) for n in shards[i]),
                  doc, finish)


def _mindformers_target(cfg: JobConfig, src: HFInput | MegatronInput, infos: dict[str, TensorInfo],
                        recipes: dict[str, rows.Recipe], cast_to: str | None, out: Path) -> Target:
    from runner.job import destination_strategy

    mf, to_mf = scheme_tensors(src.spec.with_job(cfg.model), "mindformers", infos)
    mf_recipes = rows.compose(to_mf, recipes)
    full = Strategy.full(mf)
    dst, full = destination_strategy(cfg, full)
    planner.check_compatible(full, dst, cast_to)

    def path(rank: int) -> Path:
        return out / f"rank_{rank}" / f"{cfg.prefix}{rank}.safetensors"

    def write(rank: int, pool) -> WrittenFile:
        return write_file(planner.plan_rank(full, dst, rank, cast_to=cast_to), pool, SafetensorsFormat(), path(rank))

    return Target(dst, dst.ranks, path, write, lambda: src.pool(mf_recipes), dst.rank_bytes,
                  {"to": "mindformers", "dst": dst.to_json()})


# -- running --------------------------------------------------------------------------------
def open_input(cfg: JobConfig) -> HFInput | MegatronInput:
    root = Path(cfg.load_checkpoint)
    source = discover(root)
    if source.kind == "megatron":
        return MegatronInput.open(cfg, root)
    return HFInput.open(cfg, source)


def run_conversion(cfg: JobConfig, show_progress: bool = True) -> int:
    """Run a conversion job in this process; the exit code."""
    from runner.progress import Progress

    if not cfg.load_checkpoint:
        raise ConfigError("config key load_checkpoint is required")
    src = open_input(cfg)
    out = cfg.output_path / TRANSFORMED
    if cfg.output_format == "megatron":
        target = megatron_target(cfg, src, out)
    elif cfg.output_format in ("hf", "mindformers"):
        target = hf_target(cfg, src, out)
    else:
        raise ConfigError(f"a Megatron checkpoint converts to output_format megatron, hf or mindformers, not {cfg.output_format!r}")
    protected = [Path(cfg.load_checkpoint)] + ([Path(cfg.reference_hf_dir)] if cfg.reference_hf_dir else [])
    check_no_overlap(cfg.output_path, protected)
    if cfg.only_save_strategy:
        _write_strategies(cfg, target.dst)
        say(f"wrote {target.dst.world_size} strategy file(s) to {cfg.output_path / STRATEGY_DIR}; no weights touched")
        return 0
    if not cfg.auto_trans_ckpt:
        say(f"the source does not match the destination: format conversion to {cfg.output_format}")
        return 1
    doc = {"src": src.digest_doc(), "spec": src.spec.to_json(), "target": target.doc, "options": cfg.options(),
           "parallel": asdict(cfg.parallel_config),
           "stamps": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(src.files())]}  # same source files
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
    folder = OutputFolder(out, digest)
    if folder.is_complete():
        say(f"{out} already holds this conversion's complete output (same source and settings); skipped")
        return 0
    folder.claim()
    _write_strategies(cfg, target.dst)
    start = time.monotonic()
    sources = sorted(src.files())
    written: list[WrittenFile] = []
    with Progress(sum(target.unit_bytes(u) for u in target.units), enabled=show_progress, desc="convert") as progress:
        pool = target.make_pool()
        try:
            for unit in target.units:
                kept = folder.finished(unit, target.path(unit), sources)
                w = kept or target.write(unit, pool)
                if kept is None:
                    folder.record(unit, w, sources)
                progress.update(target.unit_bytes(unit))
                written.append(w)
        finally:
            pool.close()
    target.finish()
    elapsed = time.monotonic() - start
    folder.write_manifest({
        "format": "autotrans-manifest", "version": 1, "autotrans": __version__,
        "source": str(Path(cfg.load_checkpoint).resolve()), "conversion": f"{src.kind} -> {cfg.output_format}",
        "options": cfg.options(), "files": [{"path": str(w.path.relative_to(out)), "bytes": w.size, "crc32": w.crc32} for w in written],
        "bytes_written": sum(w.size for w in written), "elapsed_s": round(elapsed, 3),
    })
    nbytes = sum(w.size for w in written)
    say(f"done: {len(written)} files, {nbytes / 1e9:.3f} GB in {elapsed:.2f} s -> {out}")
    return verify_conversion(cfg, src, out) if cfg.verify else 0


def verify_conversion(cfg: JobConfig, src: HFInput | MegatronInput, out: Path) -> int:
    """`verify: true`: HF and Megatron checkpoints are both read under HF names, so the
    output is compared with the source tensor by tensor. A MindFormers side, or a LoRA
    merge, changes names or values by design: said, not compared."""
    mindformers_side = cfg.output_format == "mindformers" or (isinstance(src, HFInput) and src.source.kind != "hf")
    if mindformers_side or cfg.lora is not None:
        warn("verify: not run; this conversion renames tensors (MindFormers) or merges LoRA, so outputs differ from the source by design")
        return 0
    from runner.verify import Checkpoint, compare, report

    cast_to = dtypes.CAST_NAMES[cfg.dtype] if cfg.dtype else None
    return report(compare(Checkpoint.open(cfg.load_checkpoint), Checkpoint.open(out), cast_to), "source and output")


def _write_strategies(cfg: JobConfig, dst: Strategy) -> None:
    folder = cfg.output_path / STRATEGY_DIR
    for r in dst.ranks:
        strat.write_rank_file(dst, r, folder)
    if len(dst.stages) > 1:
        strat.write_merged_file(dst, folder)
