"""Megatron's parallel layout as a native Strategy over the logical tensors, so the
core planner reshards between Megatron layouts (and from full HF tensors) directly.

Files: Megatron-LM's torch format is saved by the ranks whose expert-data-parallel rank
is 0, each as mp_rank_{tp}[_{pp}][_{ep}]. Within a stage, rank q has tensor-parallel rank
q % tp and, with expert tensor parallelism etp (default: tp), expert-parallel rank
q // etp and expert-tensor-parallel rank q % etp: the stage's files are the first
etp * ep ranks (tp * ep when etp = tp). Dense weights split over tp, expert weights over
ep (stacked dim 0) and etp. Column and row splits, placement and fused storage come
from the template (runner.convert.names)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from runner.convert.model import Model
from runner.convert.names import NameMap, Tensor, extra_state_names, file_names, scheme_map, stage_of
from runner.errors import ConfigError, FormatError
from runner.formats.base import TensorInfo
from runner.layout import ParamLayout
from runner.strategy import Strategy
from runner.templates import Template, regroup


@dataclass(frozen=True)
class MegatronLayout:
    tp: int
    pp: int
    ep: int = 1
    etp: int = 0  # expert tensor parallel; 0: tp

    @property
    def etp_size(self) -> int:
        return self.etp or self.tp

    @property
    def per_stage(self) -> int:
        return self.etp_size * self.ep if self.etp_size != self.tp else self.tp * self.ep

    @property
    def world_size(self) -> int:
        return self.per_stage * self.pp

    def rank(self, tp: int, pp: int, ep: int) -> int:
        return pp * self.per_stage + ep * self.etp_size + tp % self.etp_size

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp, pp, ep) of a rank."""
        pp, pos = divmod(rank, self.per_stage)
        return pos % self.tp, pp, pos // self.etp_size

    @property
    def dev_matrix(self) -> tuple[int, ...]:
        """A stage's device axes: [ep, tp], or with etp != tp [ep / k, k, etp] (k = tp / etp),
        whose last two axes make the tensor-parallel rank and first two the expert one."""
        if self.etp_size == self.tp:
            return (self.ep, self.tp)
        k = self.tp // self.etp_size
        return (self.ep // k, k, self.etp_size)

    def axes(self, expert: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(the axes a tensor-parallel split uses, the axes of the expert dim)."""
        if self.etp_size == self.tp:
            return (0,), (1,)
        return ((0,) if expert else (1, 0)), (2, 1)

    def folder(self, rank: int) -> str:
        """Megatron's `get_checkpoint_name`: mp_rank_TT[_PPP][_EEE]."""
        tp, pp, ep = self.coords(rank)
        name = f"mp_rank_{tp:02d}"
        if self.pp > 1:
            name += f"_{pp:03d}"
        if self.ep > 1:
            name += f"_{ep:03d}"
        return name

    def layers(self, stage: int, num_layers: int) -> range:
        per = num_layers // self.pp
        return range(stage * per, (stage + 1) * per)

    def check(self, num_layers: int) -> None:
        if num_layers % self.pp:
            raise ConfigError(f"parallel_config.pipeline_stage {self.pp} does not divide the {num_layers} layers")
        if self.etp_problem():
            raise ConfigError(f"parallel_config.expert_tensor_parallel: {self.etp_problem()}")

    def etp_problem(self) -> str | None:
        """Why Megatron's rank files cannot hold this expert tensor parallelism, or None."""
        e = self.etp_size
        if e != self.tp and (self.tp % e or (e * self.ep) % self.tp):
            return (f"{e} must divide the tensor parallelism {self.tp}, and times the expert parallelism {self.ep} "
                    "make a multiple of it (only then do the saved rank files hold every tensor-parallel rank)")
        return None


def stages_of(tensor: Tensor, lay: MegatronLayout, num_layers: int, mtp: bool) -> tuple[int, ...]:
    """The pipeline stages that hold a tensor: its template placement, and the last stage
    too for the embedding when the model has MTP layers (GPTModel builds an embedding on
    the stage of its MTP block)."""
    stage = stage_of(tensor.weight, tensor.layer, lay.pp, num_layers)
    if mtp and tensor.weight.place == "embedding":
        return tuple(sorted({stage, lay.pp - 1}))
    return (stage,)


def has_mtp(nmap: NameMap, num_layers: int) -> bool:
    """Whether the model has layers after the last decoder layer (MTP)."""
    return any(t.layer is not None and t.layer >= num_layers for t in nmap.tensors.values())


def param_layout(name: str, tensor: Tensor, dtype: str, lay: MegatronLayout, num_layers: int, mtp: bool = False) -> ParamLayout:
    """Layout of one logical tensor, from its template weight: column / row / vocab
    splits over TP on the weight's dim, stacked experts over EP on dim 0, and the
    stored shape of each rank's box for fused weights ([gate_shard; up_shard])."""
    w, shape = tensor.weight, tensor.shape
    lead = 1 if tensor.experts else 0
    tmap: list[tuple[int, ...]] = [()] * len(shape)
    tp_axes, ep_axes = lay.axes(bool(tensor.experts))
    if w.split in ("column", "row", "vocab"):
        dim = w.dim + lead
        size, key = (lay.etp_size, "expert_tensor_parallel") if tensor.experts else (lay.tp, "model_parallel")
        if shape[dim] % size:
            raise ConfigError(f"parallel_config.{key} {size} does not divide dim {dim} ({shape[dim]}) of {name}")
        tmap[dim] = tp_axes
    if tensor.experts:
        if tensor.experts % lay.ep:
            raise ConfigError(f"parallel_config.expert_parallel {lay.ep} does not divide the {tensor.experts} experts of {name}")
        tmap[0] = ep_axes
    p = ParamLayout(tuple(shape), dtype, stages_of(tensor, lay, num_layers, mtp), lay.dev_matrix, tuple(tmap))
    if tensor.stored is not None:
        local = regroup(shape, tensor.stored, p.chunk)
        if local is None:
            raise ConfigError(f"{name}: stored shape {list(tensor.stored)} is no row-major merge of {list(shape)}")
        p = replace(p, stored_shape=local)
    return p


def strategy(infos: dict[str, TensorInfo], nmap: NameMap, lay: MegatronLayout) -> Strategy:
    stages = tuple(tuple(range(s * lay.per_stage, (s + 1) * lay.per_stage)) for s in range(lay.pp))
    num_layers = nmap.env.int("num_layers")
    mtp = has_mtp(nmap, num_layers)
    params = {n: param_layout(n, nmap.tensors[n], t.dtype, lay, num_layers, mtp) for n, t in infos.items()}
    out = Strategy(stages, params, "native")
    out.validate()
    return out


# -- the seam conversions use: a template's weights laid out as Megatron files --------------------
SCHEMES = {"transformer_engine": "megatron", "local": "megatron_local"}
LEGACY = "megatron_legacy"


def scheme_of(naming: str, impl: str) -> str:
    """The template scheme of `megatron_naming` / `transformer_impl`."""
    return LEGACY if naming == "legacy" else SCHEMES[impl]


@dataclass(frozen=True)
class MegatronMap:
    """A model's logical tensors under one Megatron scheme and layout: the HF links
    (`nmap`), the strategy, and each rank file's names."""

    nmap: NameMap
    layout: MegatronLayout
    experts: int

    @property
    def scheme(self) -> str:
        return self.nmap.scheme

    def strategy(self, infos: dict[str, TensorInfo]) -> Strategy:
        return strategy(infos, self.nmap, self.layout)

    def stage_tensors(self, stage: int) -> list[str]:
        num_layers = self.nmap.env.int("num_layers")
        mtp = has_mtp(self.nmap, num_layers)
        return [n for n, t in self.nmap.tensors.items() if stage in stages_of(t, self.layout, num_layers, mtp)]

    def file_names(self, rank: int, logical) -> dict[str, tuple[str, ...]]:
        """Logical name -> the names rank `rank`'s file stores it under."""
        stage = self.layout.coords(rank)[1]
        first = self.layout.layers(stage, self.nmap.env.int("num_layers")).start
        local = self.experts // self.layout.ep
        return {n: tuple(file_names(self.nmap, n, first, local)) for n in logical}

    def extra_state(self, rank: int) -> list[str]:
        if self.scheme == LEGACY:
            return []
        return extra_state_names(self.nmap, self.layout.coords(rank)[1], self.layout.pp, self.experts // self.layout.ep)


def megatron_map(model: Model, scheme: str, lay: MegatronLayout, padded_vocab: int | None) -> MegatronMap:
    """The seam between a template and a Megatron folder: check the sizes against the
    layout, and link the model's HF tensors to its logical Megatron tensors."""
    lay.check(model.num_layers)
    env = model.env()
    parallel = {"model_parallel": lay.tp, "pipeline_stage": lay.pp, "expert_parallel": lay.ep, "data_parallel": 1}
    for key, by in model.template.divisible:
        if by in parallel and env.int(key) % parallel[by]:
            raise ConfigError(f"parallel_config.{by} {parallel[by]} does not divide model_config.{key} = {env.int(key)}")
    nmap = scheme_map(model, "hf", scheme, lay.pp, padded_vocab, stack_experts=True)
    return MegatronMap(nmap, lay, model.experts)


def detect(config: dict, templates: list[Template], lay: MegatronLayout, held: frozenset[str], where: str) -> tuple[Model, str]:
    """The template and scheme whose names for rank 0 are exactly the names a Megatron
    checkpoint's first file holds."""
    tried = []
    for t in templates:
        model = Model(t, config)
        for scheme in [*SCHEMES.values(), LEGACY]:
            if scheme not in t.schemes:
                continue
            try:
                mm = megatron_map(model, scheme, lay, None)
                names = mm.file_names(0, mm.stage_tensors(0))
            except ConfigError:
                continue
            want = {f for fs in names.values() for f in fs}
            if want == set(held):
                return model, scheme
            tried.append((len(want ^ set(held)), t.name, scheme, sorted(want - held), sorted(held - want)))
    if not tried:
        raise FormatError(f"{where}: no template ({', '.join(t.name for t in templates)}) fits the checkpoint's sizes")
    _, name, scheme, missing, extra = min(tried)
    detail = (f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which it does not know")
    raise FormatError(f"{where}: the weights match no template; the nearest, {name} ({scheme} names), {detail}; "
                      "set model.arch to the model's template")
