"""Conversion jobs (SPEC 6): HF / MindFormers / Megatron sources to Megatron, HF or
MindFormers outputs, through the core planner and executor.

The source is seen either as HF-named tensors (an HF folder, or a MindFormers file
renamed) or as Megatron logical tensors laid out over its ranks. A Megatron output
plans from a source strategy over the destination's logical tensors: a full one
served by recipes from HF tensors, or the source's own Megatron layout (resharded
directly; only vocab tensors whose padding changes go through a recipe). HF and
MindFormers outputs are whole tensors served by recipes from either side."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from runner import dtypes, fp8, lora as lora_merge, plan as planner
from runner.config import JobConfig, from_mapping
from runner.convert import hf_dir, rows
from runner.convert.megatron_dir import (CHECKPOINT_VERSION, CKPT, ITER_FILE, MegatronFolder, MegatronSource, dropped, is_weight,
                                         iteration_folder, megatron_args, rank_infos, source_files, write_iteration_marker,
                                         write_rank)
from runner.convert.megatron_layout import MegatronLayout, detect, megatron_map, scheme_of
from runner.convert.model import Model, candidates, hf_config, megatron_config, read_hf_config
from runner.convert.names import NameMap, hf_tensors, linked_dtype, row_dims, scale_links, scheme_map, scheme_tensors, whole_map, with_copies
from runner.errors import ConfigError, FormatError, name_list
from runner.execute import LocalPool, SlicePool, WrittenFile, tensor_bits, write_file
from runner.formats import torch_dist
from runner.formats.base import TensorInfo
from runner.formats.dcp import METADATA, model_entries
from runner.formats.safetensors_io import SafetensorsFormat
from runner.job import destination_strategy
from runner.layout import Box, ParamLayout
from runner.log import warn
from runner.outputs import file_crc32
from runner.plan import FilePlan, ReadItem
from runner.source import Source, SourceFiles, discover
from runner.strategy import Strategy
from runner.templates import BLOCK, block_scaled, config_json_names, format_name, hf_config as hf_config_of, kept_dtypes, weight_block
from runner.units import Compiled, Unit, protected_paths

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
    shard_of: dict[str, int] = field(default_factory=dict)  # tensor name -> the source rank (file) holding it
    scales: dict[str, str] = field(default_factory=dict)  # FP8 weight -> its block scale, passed through
    dequant: fp8.Dequant | None = None  # FP8 weights a cast dequantizes as they are read
    block: tuple[int, int] = BLOCK  # of the FP8 block scales

    @staticmethod
    def open(cfg: JobConfig, files: SourceFiles) -> "HFInput":
        """Each checkpoint file (an HF shard) is a source rank of its own, so that under
        MPI each is read by a node that holds it; reads name rank 0 and go to the file
        holding the tensor (ByName)."""
        shards = files.paths()
        if not shards:
            discover(files.root)  # says it holds no checkpoint files
        held: dict[str, TensorInfo] = {}
        shard_of: dict[str, int] = {}
        for i, path in enumerate(shards):
            for name, info in files.header(path).tensors.items():
                if name in shard_of:
                    raise FormatError(f"tensor {name} appears in both {shards[shard_of[name]]} and {path}: loose files "
                                      "are parts of one checkpoint; put per-rank files in rank_0/ ... rank_N/ folders")
                held[name], shard_of[name] = info, i
        source = Source(files.root, files.kind, {i: (p,) for i, p in enumerate(shards)})
        if shards and shards[0].name == METADATA:
            inp = HFInput._open_dcp(cfg, source, held)
            inp.shard_of = shard_of
            return inp
        merge = None
        if cfg.lora is not None:
            merge, _, base = lora_merge.prepare(cfg.lora, cfg.model, Strategy.full(held), {0: held}, source.root)
            held = base[0]
        inp = HFInput._open(cfg, source, held)
        inp.lora, inp.shard_of = merge, shard_of
        return inp

    @staticmethod
    def _open(cfg: JobConfig, source: Source, held: dict[str, TensorInfo]) -> "HFInput":
        arch = (cfg.model or {}).get("arch")
        if source.kind != "hf":
            if not cfg.reference_hf_dir:
                raise ConfigError(f"{source.root} is neither an HF folder (config.json + weights) nor a Megatron folder; "
                                  "for a MindFormers or torchtitan (DCP) checkpoint set reference_hf_dir to the model's "
                                  "HF folder (its config.json)")
            _, spec = read_hf_config(Path(cfg.reference_hf_dir), arch)
            spec = spec.with_job(cfg.model)
            scheme = _scheme_of(spec, held, source.root)
            if spec.tied:  # the output layer's tied copy some trainers save (torchtitan's output.weight)
                copies = {format_name(w.names[scheme], spec.env()) for w in spec.template.weights_of(scheme) if w.tie}
                held = {n: t for n, t in held.items() if n not in copies}
            block = weight_block(hf_config_of(Path(cfg.reference_hf_dir)))
            held, dequant, mf_scales = _fp8(cfg, held, block_scaled(spec.template, spec.env(), scheme), block)
            weights = {n: t for n, t in held.items() if n not in set(mf_scales.values())}
            infos, built = hf_tensors(spec, scheme, weights, str(source.root))
            scales = {}
            if mf_scales:  # the HF weights' scales from the MindFormers ones
                marked = block_scaled(spec.template, spec.env(), "hf")
                links, a_shapes, b_shapes = scale_links(whole_map(spec, scheme), marked, mf_scales, False, block)
                scale_infos = {lk.a: TensorInfo(held[lk.b].dtype, a_shapes[lk.a]) for lk in links}
                built.update(rows.backward(links, scale_infos, {n: held[n] for n in b_shapes}, {n: 1 for n in a_shapes}))
                scales = {w: marked[w] for w in infos if marked.get(w) in scale_infos}
                infos = {k: v for n, t in infos.items() for k, v in ((n, t), *(((scales[n], scale_infos[scales[n]]),) if n in scales else ()))}
            return HFInput(source, spec, infos, held, built, Path(cfg.reference_hf_dir), scales=scales, dequant=dequant, block=block)
        doc, spec = read_hf_config(source.root, arch)
        config_json_names(doc, (cfg.model or {}).get("model_config") or {}, source.root / "config.json")  # they must agree
        reference = Path(cfg.reference_hf_dir) if cfg.reference_hf_dir else source.root
        block = weight_block(doc)
        held, dequant, scales = _fp8(cfg, held, block_scaled(spec.template, spec.env(), "hf"), block)
        return HFInput(source, spec, held, held, {}, reference, scales=scales, dequant=dequant, block=block)

    @staticmethod
    def _open_dcp(cfg: JobConfig, source: Source, held: dict[str, TensorInfo]) -> "HFInput":
        """A PyTorch DCP folder (torchtitan's): its model weights, under the names of the
        template scheme they match; training state is left out with a warning."""
        if cfg.lora is not None:
            raise ConfigError("lora: a merge reads HF folders and safetensors / ckpt checkpoints; convert the DCP checkpoint to HF first, then merge")
        model, dropped = model_entries(list(held))
        if dropped:
            warn(f"{', '.join(dropped)} in {source.root} {'is' if len(dropped) == 1 else 'are'} not converted: only the model's weights are")
        inp = HFInput._open(cfg, source, {n: held[stored] for n, stored in model.items()})
        return HFInput(source, inp.spec, inp.infos, held, rows.renamed(inp.built, model), inp.reference)

    def check(self, nmap: NameMap) -> None:
        """Every source tensor is mapped and has the shape the config implies."""
        held = {n for n in self.infos if not n.endswith(_IGNORABLE)} - set(self.scales.values())
        if self.spec.tied:
            held.discard("lm_head.weight")  # a tied copy some savers keep
        unmapped, missing = sorted(held - set(nmap.hf_shapes)), sorted(set(nmap.hf_shapes) - held)
        if unmapped or missing:
            parts = [f"not in the {self.spec.family} map: {name_list(unmapped)}"] if unmapped else []
            parts += [f"missing from the checkpoint: {name_list(missing)}"] if missing else []
            raise FormatError(f"{self.source.root}: tensors do not match config.json; " + "; ".join(parts))
        for n, shape in nmap.hf_shapes.items():
            if self.infos[n].shape != shape:
                raise FormatError(f"{self.source.root}: tensor {n} has shape {list(self.infos[n].shape)}, config.json implies {list(shape)}")

    def pool(self, recipes: dict[str, rows.Recipe], base: SlicePool) -> rows.RecipePool:
        """Recipes over whole tensors as the files name them, read from `base` (LoRA merged
        as they are read)."""
        recipes = rows.compose(recipes, self.built)  # read the files' own tensors
        whole = WholeTensors(fp8.wrap(lora_merge.wrap(ByName(base, self.shard_of), self.lora), self.dequant), self.held)
        return rows.RecipePool(recipes, whole, owned=whole)

    kind = "hf"

    def digest_doc(self) -> dict:
        doc = {"hf": {n: [t.dtype, list(t.shape)] for n, t in sorted(self.infos.items())}}
        doc.update({"dequant": self.dequant.describe()} if self.dequant else {})
        return {**doc, "lora": self.lora.describe()} if self.lora else doc



def _fp8(cfg: JobConfig, held: dict[str, TensorInfo], marked: dict[str, str],
         block: tuple[int, int]) -> tuple[dict[str, TensorInfo], fp8.Dequant | None, dict[str, str]]:
    """The tensors as the conversion reads them, the dequantization when the job casts
    FP8 weights, and otherwise the FP8 weights with their scales (of the `marked` names)."""
    scales = fp8.pairs(marked, held)
    if not cfg.dtype or not any(t.dtype in fp8.FP8 for t in held.values()):
        return held, None, scales
    dequant, _, seen = fp8.dequantize(Strategy.full(held), {0: held}, scales, block, dtypes.CAST_NAMES[cfg.dtype])
    return seen[0], dequant, {}


class ByName:
    """Reads of an HF folder as one rank 0, each sent to the source rank (file) that holds
    its tensor."""

    def __init__(self, pool, shard_of: dict[str, int]):
        self.pool, self.shard_of = pool, shard_of

    def region(self, read: ReadItem):
        return self.pool.region(replace(read, src_rank=self.shard_of[read.src_name]))

    def release(self) -> None:
        self.pool.release()

    def close(self) -> None:
        self.pool.close()


def _scheme_of(spec: Model, held: dict[str, TensorInfo], root: Path) -> str:
    """The template scheme, other than HF's and Megatron's, holding most of the names of a
    checkpoint (MindFormers, torchtitan); the first such scheme when none holds any, so
    that the error names what is missing."""
    t = spec.template
    schemes = [s for s in t.schemes if s != "hf" and not s.startswith("megatron")]
    if not schemes:
        raise ConfigError(f"template {spec.family} has no names but HF's and Megatron's; {root} is not an HF folder")
    found = []
    for s in schemes:
        try:
            found.append((len(set(held) & set(scheme_map(spec, "hf", s).shapes)), s))
        except ConfigError:  # a scheme the template does not complete for this config
            found.append((0, s))
    best = max(found, key=lambda f: f[0])
    return best[1] if best[0] else schemes[0]


class WholeTensors:
    """Whole tensors, as the files name them, from a SlicePool (with LoRA adapters merged,
    runner.lora); keeps the last one, since consecutive reads come from the same tensor
    (q, k, v of one layer)."""

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
    def open(cfg: JobConfig, files: SourceFiles) -> "MegatronInput":
        if cfg.lora is not None:
            raise ConfigError("lora: a merge reads HF folders and safetensors / ckpt checkpoints; convert the Megatron checkpoint to HF first, then merge")
        root = files.root
        mf = MegatronFolder.open(root, files)
        reference = Path(cfg.reference_hf_dir) if cfg.reference_hf_dir else None
        arch = (cfg.model or {}).get("arch")
        ref_spec = read_hf_config(reference, arch)[1] if reference else None
        config = megatron_config(mf.args, str(mf.files[0]), ref_spec.vocab if ref_spec else None)
        config = {**(ref_spec.config if ref_spec else {}), **config}  # what args lack (MLA's ranks) from config.json
        spec, scheme = detect(config, candidates(arch, ref_spec), mf.layout, mf.first_names, str(mf.files[0]))
        lay = mf.layout
        padded = mf.padded_vocab() or spec.padded_vocab(getattr(mf.args, "make_vocab_size_divisible_by", 128) or 128, lay.tp)
        mm = megatron_map(spec, scheme, lay, padded)
        nmap = mm.nmap
        dtypes_of = _megatron_dtypes(mf, mm, files)
        infos = _infos(nmap.shapes, lambda n: dtypes_of[n])
        s = mm.strategy(infos)
        names = {r: {n: tuple("model." + f for f in fs) for n, fs in mm.file_names(r, s.params_of_rank(r)).items()} for r in s.ranks}
        source = MegatronSource(Path(root), "megatron", {r: (p,) for r, p in mf.files.items()}, names)
        for r in s.ranks:  # every rank file's weights, checked before anything is written
            rank_infos(mf.files[r], files.header(mf.files[r]).tensors, names[r])
        extra = dropped(files.header(mf.files[s.ranks[0]]))
        if extra:
            warn(f"{', '.join(extra)} in {mf.files[s.ranks[0]].parent.name}/ and its sibling rank files "
                 "are not converted: only the model's weights are")
        return MegatronInput(mf, spec, scheme, nmap, infos, s, source, reference)

    def pool(self, recipes: dict[str, rows.Recipe], base: SlicePool) -> rows.RecipePool:
        """Recipes over whole logical tensors; other reads straight from the rank files."""
        asm = Assembler(self.strategy, base)
        return rows.RecipePool(recipes, asm, inner=asm.pool, owned=asm)

    kind = "megatron"

    def digest_doc(self) -> dict:
        return {"megatron": self.strategy.to_json(), "scheme": self.scheme}


def _megatron_dtypes(mf: MegatronFolder, mm, files: SourceFiles) -> dict[str, str]:
    """Each logical tensor's dtype as its stage's first rank file stores it (DeepSeek-V3's
    router bias stays float32 beside bfloat16 weights); a tensor not found there (a
    torch_dist folder) takes the dtype the weights of the first file share. Read from
    the files' headers (under MPI, what the nodes holding them read)."""
    found: dict[str, str] = {}
    for stage in range(mm.layout.pp):
        rank = mm.layout.rank(0, stage, 0)
        if rank not in mf.files:
            continue
        held = {n: t.dtype for n, t in files.header(mf.files[rank]).tensors.items() if is_weight(n)}
        for n, fs in mm.file_names(rank, mm.stage_tensors(stage)).items():
            if "model." + fs[0] in held:
                found[n] = held["model." + fs[0]]
    if len(found) == len(mm.nmap.shapes):
        return found
    kinds = {t.dtype for n, t in files.header(mf.files[0]).tensors.items() if is_weight(n)}
    if len(kinds) != 1:
        raise FormatError(f"{mf.files[0]}: weights of several dtypes ({', '.join(sorted(kinds))}); expected one")
    common = kinds.pop()
    return {n: found.get(n, common) for n in mm.nmap.shapes}


class Assembler:
    """Whole logical tensors reassembled from a Megatron source's ranks; keeps the last
    one, since HF tensors are written in the order their sources come (q, k and v from
    one QKV tensor, gate and up from one fc1)."""

    def __init__(self, s: Strategy, pool: SlicePool):
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
@dataclass(frozen=True)
class Target:
    """What a conversion writes (runner.compile.Compiled's output side): its units (rank
    files or HF shards), each unit's plan and writer, and the finishing steps."""

    dst: Strategy  # written to output_dir/strategy
    units: tuple[Unit, ...]
    plan: Callable[[Unit], FilePlan]
    write: Callable[[Unit, FilePlan, SlicePool, Path, Callable[[int], None]], WrittenFile]
    wrap: Callable[[SlicePool], SlicePool]  # base pool -> the pool the plans read (recipes)
    doc: dict
    finish: Callable[[Path], list[Path]] = lambda out: []
    finish_paths: tuple[str, ...] = ()  # what `finish` writes, relative to the output folder
    finish_reads: tuple[Path, ...] = ()  # what it copies


def megatron_target(cfg: JobConfig, src: HFInput | MegatronInput) -> Target:
    pc = cfg.parallel_config
    spec = src.spec
    lay = MegatronLayout(pc.model_parallel, pc.pipeline_stage, pc.expert_parallel, pc.expert_tensor_parallel if spec.experts else 0)
    padded = spec.padded_vocab(cfg.make_vocab_size_divisible_by, lay.tp)
    dist = cfg.megatron_format == "torch_dist"
    if dist and cfg.megatron_naming == "legacy":
        raise ConfigError("megatron_format: torch_dist needs Megatron-Core names (megatron_naming: core); Megatron-LM's "
                          "legacy models do not use distributed checkpoints")
    # torch_dist holds whole tensors (its loader cuts them for any TP / PP / EP), under the
    # keys the layer spec saves them as
    mm = megatron_map(spec, scheme_of(cfg.megatron_naming, cfg.transformer_impl), MegatronLayout(1, 1, 1) if dist else lay, padded)
    nmap = mm.nmap
    cast_to = dtypes.CAST_NAMES[cfg.dtype] if cfg.dtype else None
    if isinstance(src, HFInput):
        if src.scales:
            raise ConfigError(f"{src.source.root} holds FP8 block-scaled weights ({next(iter(src.scales.values()))}, ...), whose "
                              "scales Megatron checkpoints do not carry: set dtype: bf16 to dequantize them")
        src.check(nmap)
        infos = _infos(nmap.shapes, lambda n: linked_dtype(nmap, n, src.infos))
        recipes = rows.forward(nmap.links, nmap.pads, src.infos, infos, nmap.row_dims)
        plan_src = Strategy.full(infos)
        wrap = lambda base: src.pool(recipes, base)  # noqa: E731
    else:
        infos = _infos(nmap.shapes, lambda n: next(iter(src.infos.values())).dtype)
        plan_src, wrap = _reshard_source(src, infos, nmap)
    dst = mm.strategy(infos).cast(cast_to, kept_dtypes(spec.template, spec.env()))  # as the files hold them, written beside them
    planner.check_compatible(plan_src, dst, cast_to)
    out_dtype = dtypes.cast_dtype(next(iter(infos.values())).dtype, cast_to)
    step = 0 if cfg.iteration == "release" else cfg.iteration  # Megatron loads a release checkpoint as iteration 0
    args = megatron_args(spec, lay, padded, cfg.make_vocab_size_divisible_by, cfg.transformer_impl,
                         cfg.megatron_naming, out_dtype, step)
    head = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": step}
    if dist:
        objects = [n for n in mm.extra_state(0) if n.startswith(torch_dist.LAYERS)]
        return _torch_dist_target(cfg, mm, plan_src, dst, wrap, objects, head, spec.experts)

    def write(unit: Unit, fp: FilePlan, pool: SlicePool, path: Path, on_bytes: Callable[[int], None]) -> WrittenFile:
        names = mm.file_names(unit.key, [t.name for t in fp.tensors])
        written = write_rank(fp, pool, path, names, mm.extra_state(unit.key), head, cfg.megatron_naming == "legacy")
        on_bytes(fp.write_bytes)
        return written

    units = tuple(Unit(r, f"{iteration_folder(cfg.iteration)}/{lay.folder(r)}/{CKPT}", dst.rank_bytes(r), dst.stage_of(r))
                  for r in dst.ranks)
    doc = {"to": "megatron", "dst": dst.to_json(), "padded_vocab": padded}
    return Target(dst, units, lambda u: planner.plan_rank(plan_src, dst, u.key), write, wrap, doc,
                  finish=lambda out: [write_iteration_marker(out, cfg.iteration)], finish_paths=(ITER_FILE,))


def _torch_dist_target(cfg: JobConfig, mm, plan_src: Strategy, dst: Strategy, wrap, objects: list[str], head: dict,
                       experts: int) -> Target:
    """One unit per .distcp file, consecutive whole tensors cut at `max_shard_size`, so
    MPI ranks share the writing; the finishing step writes `.metadata` (every chunk's
    byte range follows from the plan), common.pt and metadata.json."""
    order = list(dst.params)
    out_infos = {n: TensorInfo(dst.params[n].dtype, dst.params[n].shape) for n in order}
    files = hf_dir.shard(order, out_infos, hf_dir.parse_size(cfg.max_shard_size))
    folder = iteration_folder(cfg.iteration)

    def plan(unit: Unit) -> FilePlan:
        names = files[unit.key]
        return planner.plan_rank(plan_src.with_params({n: plan_src.params[n] for n in names}),
                                 dst.with_params({n: dst.params[n] for n in names}), 0)

    def keys(fp: FilePlan) -> dict[str, list[str]]:
        names = mm.file_names(0, [t.name for t in fp.tensors])
        if cfg.transformer_impl == "local":
            names = {n: [torch_dist.local_spec_key(f) for f in fs] for n, fs in names.items()}
        return names

    def stored(fp: FilePlan) -> list[tuple[str, str, tuple[int, ...]]]:
        """Each tensor's chunks in file order: one per tensor, one per expert of a tensor
        that stacks experts."""
        names = keys(fp)
        return [(name, t.out_dtype, tuple(t.stored_shape[1:] if stacks(t) else t.stored_shape))
                for t in fp.tensors for name in names[t.name]]

    def stacks(t) -> bool:
        return mm.nmap.tensors[t.name].experts > 0

    def write(unit: Unit, fp: FilePlan, pool: SlicePool, path: Path, on_bytes: Callable[[int], None]) -> WrittenFile:
        names = keys(fp)

        def tensors():
            for t in fp.tensors:
                bits = tensor_bits(t, pool).reshape(t.stored_shape)
                for j, name in enumerate(names[t.name]):
                    yield name, bits[j] if stacks(t) else bits, t.out_dtype
                pool.release()
                on_bytes(t.write_bytes)

        torch_dist.write_data(path, tensors(), objects if unit.key == 0 else [])
        return WrittenFile(path, path.stat().st_size, file_crc32(path))

    def finish(out: Path) -> list[Path]:
        contents = [stored(plan(u)) for u in units]
        axes = (mm.nmap.env.int("num_layers"), max(1, experts))
        return [*torch_dist.write_metadata(out / folder, contents, objects, axes, head),
                write_iteration_marker(out, cfg.iteration)]

    units = tuple(Unit(k, f"{folder}/{torch_dist.data_file(k)}", sum(out_infos[n].numel * dtypes.itemsize(out_infos[n].dtype) for n in names))
                  for k, names in enumerate(files))
    return Target(dst, units, plan, write, wrap, {"to": "megatron torch_dist", "dst": dst.to_json(), "files": files}, finish,
                  (*(f"{folder}/{n}" for n in torch_dist.METADATA_FILES), ITER_FILE))


def _reshard_source(src: MegatronInput, infos: dict[str, TensorInfo], nmap: NameMap):
    """Megatron to Megatron: tensors whose shape is unchanged are read straight from the
    source layout; vocab tensors whose padding changes (or a tied output layer copy the
    source lacks), and tensors another layer spec names differently (the norms), are
    rebuilt by a recipe from the source's logical tensors."""
    direct = {n: p for n, p in src.strategy.params.items() if n in infos and p.shape == infos[n].shape}
    links, pads = [], []
    vocab = src.spec.vocab
    by_role = {(t.weight.role, t.layer): n for n, t in src.nmap.tensors.items()}
    for n in sorted(set(infos) - set(direct)):
        renamed = by_role.get((nmap.tensors[n].weight.role, nmap.tensors[n].layer))
        if n not in nmap.vocab and renamed is not None and src.infos[renamed].shape == infos[n].shape:
            links.append(rows.Link(renamed, 0, n, 0, infos[n].shape[0]))
            continue
        if n not in nmap.vocab:
            raise FormatError(f"{n}: the source has shape {list(src.infos[n].shape) if n in src.infos else 'none'}, the destination needs {list(infos[n].shape)}")
        origin = n if n in src.infos else nmap.vocab[n]
        links.append(rows.Link(origin, 0, n, 0, vocab))
        if infos[n].shape[0] > vocab:
            pads.append(rows.Pad(n, vocab, infos[n].shape[0] - vocab, origin, vocab - 1))
    recipes = rows.forward(links, pads, src.infos, {n: infos[n] for n in infos if n not in direct}, {})
    params = dict(direct)
    params.update({n: ParamLayout.replicated(infos[n].shape, infos[n].dtype) for n in recipes})
    return Strategy(src.strategy.stages, params, "native"), lambda base: src.pool(recipes, base)


def megatron_hf_recipes(src: MegatronInput) -> tuple[dict[str, TensorInfo], dict[str, rows.Recipe]]:
    """HF tensors (by HF name) and how to build each from the Megatron logical tensors."""
    linked = {lk.a: src.infos[lk.b].dtype for lk in src.nmap.links if lk.primary}
    infos = _infos(src.nmap.hf_shapes, lambda n: linked[src.nmap.copies.get(n, n)])
    return infos, with_copies(src.nmap, rows.backward(src.nmap.links, infos, src.infos, src.nmap.row_dims))


def megatron_as_hf(path: Path) -> tuple[dict[str, TensorInfo], Callable[[], rows.RecipePool]]:
    """A Megatron folder seen as whole tensors under HF names (`autotrans verify`):
    the tensors, and a pool factory serving them."""
    src = MegatronInput.open(from_mapping({"load_checkpoint": str(path), "output_format": "hf"}), source_files(Path(path)))
    infos, recipes = megatron_hf_recipes(src)
    return infos, lambda: src.pool(recipes, LocalPool(src.source))


def _whole_unit_plan(infos: dict[str, TensorInfo], out_infos: dict[str, TensorInfo]) -> FilePlan:
    return planner.plan_rank(Strategy.full(infos), Strategy.full({n: out_infos[n] for n in infos}), 0)


def hf_target(cfg: JobConfig, src: HFInput | MegatronInput) -> Target:
    """HF folder (shards + index) or MindFormers files (rank layout of the core job)."""
    spec = src.spec
    if isinstance(src, HFInput):
        nmap = scheme_map(spec, "hf", "hf")
        src.check(nmap)
        # each FP8 weight's scale right after it, as released checkpoints order them
        names = [m for n in nmap.hf_shapes for m in (n, *([src.scales[n]] if n in src.scales else []))]
        infos = {n: src.infos[n] for n in names}
        recipes = {n: rows.Recipe(t.shape, t.dtype, 1, (rows.Block(n, 0, t.shape[0]),)) for n, t in infos.items()}
    else:
        nmap = src.nmap
        infos, recipes = megatron_hf_recipes(src)
        names = list(nmap.hf_shapes)
    cast_to = dtypes.CAST_NAMES[cfg.dtype] if cfg.dtype else None
    if cfg.output_format == "mindformers":
        return _mindformers_target(cfg, src, infos, recipes, cast_to)
    keep = kept_dtypes(spec.template, spec.env())
    out_infos = {n: TensorInfo(dtypes.cast_dtype(infos[n].dtype, cast_to, keep.get(n, ())), infos[n].shape) for n in names}
    shards = hf_dir.shard(names, out_infos, hf_dir.parse_size(cfg.max_shard_size))

    def write(unit: Unit, fp: FilePlan, pool: SlicePool, path: Path, on_bytes: Callable[[int], None]) -> WrittenFile:
        return write_file(fp, pool, SafetensorsFormat(), path, on_bytes)

    config = hf_config(spec, next(iter(out_infos.values())).dtype)
    copies = hf_dir.reference_files(src.reference, config)  # known up front: the job's record lists them

    def finish(out: Path) -> list[Path]:
        index = hf_dir.write_index(out, shards, out_infos)
        unquantized = not (isinstance(src, HFInput) and src.scales)
        return [index, *hf_dir.copy_reference(out, src.reference, config, copies, unquantized)]

    units = tuple(Unit(i, hf_dir.shard_name(i, len(shards)), sum(out_infos[n].numel * dtypes.itemsize(out_infos[n].dtype) for n in shard))
                  for i, shard in enumerate(shards))
    doc = {"to": "hf", "shards": shards, "reference": bool(src.reference)}  # no path: ranks on other nodes compare it
    return Target(Strategy.full(out_infos), units, lambda u: _whole_unit_plan({n: infos[n] for n in shards[u.key]}, out_infos),
                  write, lambda base: src.pool(recipes, base), doc, finish, (hf_dir.INDEX, *copies),
                  tuple(src.reference / n for n in copies if src.reference and (src.reference / n).exists()))


def _mindformers_target(cfg: JobConfig, src: HFInput | MegatronInput, infos: dict[str, TensorInfo],
                        recipes: dict[str, rows.Recipe], cast_to: str | None) -> Target:
    spec = src.spec.with_job(cfg.model)
    scheme = _mindformers_scheme(cfg, spec)
    mf, to_mf = scheme_tensors(spec, scheme, infos)
    if isinstance(src, HFInput) and src.scales:
        mf, to_mf = _with_scales(spec, scheme, infos, mf, to_mf, src.scales, src.block)
    mf_recipes = rows.compose(to_mf, recipes)
    full = Strategy.full(mf)
    dst, full = destination_strategy(cfg, full)
    planner.check_compatible(full, dst, cast_to)

    def write(unit: Unit, fp: FilePlan, pool: SlicePool, path: Path, on_bytes: Callable[[int], None]) -> WrittenFile:
        return write_file(fp, pool, SafetensorsFormat(), path, on_bytes)

    units = tuple(Unit(r, f"rank_{r}/{cfg.prefix}{r}.safetensors", dst.rank_bytes(r), dst.stage_of(r)) for r in dst.ranks)
    return Target(dst, units, lambda u: planner.plan_rank(full, dst, u.key), write,
                  lambda base: src.pool(mf_recipes, base), {"to": "mindformers", "dst": dst.to_json()})


def _mindformers_scheme(cfg: JobConfig, spec: Model) -> str:
    """The MindFormers names written: model.naming (a template's other MindFormers names,
    such as DeepSeek-V3's mindformers_legacy), else the template's `mindformers`."""
    naming = (cfg.model or {}).get("naming") or "mindformers"
    if not naming.startswith("mindformers") or naming not in spec.template.schemes:
        schemes = [s for s in spec.template.schemes if s.startswith("mindformers")]
        raise ConfigError(f"config key model.naming: output_format mindformers writes template {spec.family}'s "
                          f"{' or '.join(schemes) or 'MindFormers'} names, not {naming!r}")
    return naming


def _with_scales(spec: Model, scheme: str, hf: dict[str, TensorInfo], mf: dict[str, TensorInfo], to_mf: dict[str, rows.Recipe],
                 scales: dict[str, str], block: tuple[int, int]) -> tuple[dict[str, TensorInfo], dict[str, rows.Recipe]]:
    """MindFormers tensors with the FP8 block scales of those built from scaled HF
    weights (each after its weight), and their recipes."""
    marked = block_scaled(spec.template, spec.env(), scheme)
    links, a_shapes, b_shapes = scale_links(whole_map(spec, scheme), scales, marked, True, block)
    dtype_of = {lk.b: hf[lk.a].dtype for lk in links}
    out = {n: TensorInfo(dtype_of[n], shape) for n, shape in b_shapes.items()}
    recipes = rows.forward(links, [], {n: hf[n] for n in a_shapes}, out, {n: row_dims(shape) for n, shape in b_shapes.items()})
    ordered = {}
    for n, t in mf.items():
        ordered[n] = t
        if marked.get(n) in out:
            ordered[marked[n]] = out[marked[n]]
    return ordered, {**to_mf, **recipes}


# -- compiling ------------------------------------------------------------------------------
def open_input(cfg: JobConfig, files: SourceFiles | None = None) -> HFInput | MegatronInput:
    """`files`: the source files the job may read (default: those on this machine)."""
    root = Path(cfg.load_checkpoint)
    files = files or source_files(root)
    if not files.kind:
        discover(root)  # says it does not exist
    if files.kind == "megatron":
        return MegatronInput.open(cfg, files)
    return HFInput.open(cfg, files)


def compile_conversion(cfg: JobConfig, files: SourceFiles | None = None) -> Compiled:
    """A conversion as runner.run runs every job: its units, plans, writers, pool.
    `files`: the source files it may read (runner.open_input)."""
    if not cfg.load_checkpoint:
        raise ConfigError("config key load_checkpoint is required")
    src = open_input(cfg, files)
    if cfg.output_format == "megatron":
        target = megatron_target(cfg, src)
    elif cfg.output_format in ("hf", "mindformers"):
        target = hf_target(cfg, src)
    else:
        raise ConfigError("a Megatron checkpoint converts to output_format megatron, hf or mindformers"
                          + (f", not {cfg.output_format!r}" if cfg.output_format else "; set output_format"))
    content = {"src": src.digest_doc(), "spec": src.spec.to_json(), "target": target.doc, "options": cfg.options(),
               "parallel": asdict(cfg.parallel_config)}
    source = src.source
    lora_files = tuple(src.lora.files) if isinstance(src, HFInput) and src.lora else ()
    nbytes = sum(t.numel * dtypes.itemsize(t.dtype) for t in src.infos.values())
    return Compiled(
        cfg, "conversion", source, target.dst, target.units, content,
        plan=lambda unit, prefer: target.plan(unit), write=target.write, wrap=target.wrap,
        changes=(f"format: {src.kind} -> {cfg.output_format}",),
        finish=target.finish, finish_paths=target.finish_paths, finish_reads=target.finish_reads, extra_files=lora_files, whole_source=True, source_bytes=nbytes,
        protected=tuple(protected_paths(cfg)), dequant=src.dequant if isinstance(src, HFInput) else None,
    )
