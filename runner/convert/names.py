"""A template's weights under two naming schemes, compiled into row links (runner.
convert.rows): the generic mechanism behind every conversion. Nothing here knows a
model family; the template says which weight of one scheme is which weight (a rename)
or which row blocks of which weights (`fuse`) of the other.

The destination tensors are *logical*: the scheme's names with global layer numbers,
and, with `stack_experts`, one tensor per layer for a weight stored once per expert
(`{expert}` shown as `*`), so that expert parallelism is a dim-0 split. A Megatron
folder then stores them under per-file names (`file_names`): layer numbers local to
the stage, one tensor per local expert."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from runner.convert.model import Model
from runner.convert.rows import Link, Pad, Recipe, backward, forward
from runner.errors import ConfigError, FormatError, LayoutError
from runner.layout import block_grid
from runner.formats.base import TensorInfo
from runner.templates import Env, Template, Weight, evaluate, format_name, instances

STACKED = "*"  # the {expert} of a logical tensor that stacks every expert


@dataclass(frozen=True)
class Tensor:
    """One logical tensor of the destination scheme."""

    weight: Weight
    layer: int | None
    shape: tuple[int, ...]
    experts: int  # experts stacked on dim 0 from one tensor each (0: none)
    stored: tuple[int, ...] | None  # the whole tensor's stored shape, when fused


@dataclass
class NameMap:
    """Source <-> destination links, with every tensor's shape and row dims."""

    template: Template
    env: Env
    scheme: str  # the destination scheme
    links: list[Link] = field(default_factory=list)
    pads: list[Pad] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # destination (logical) tensors
    row_dims: dict[str, int] = field(default_factory=dict)  # of source and destination tensors
    hf_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # source tensors
    tensors: dict[str, Tensor] = field(default_factory=dict)
    vocab: dict[str, str] = field(default_factory=dict)  # padded tensor -> the tensor whose rows it holds
    # tensor stored with `permute` -> the stored row of each of its rows in other schemes
    reordered: dict[str, np.ndarray] = field(default_factory=dict)
    copies: dict[str, str] = field(default_factory=dict)  # source tensor -> the source tensor it is a copy of


def rows_of(shape: tuple[int, ...]) -> int:
    """Rows of a tensor: all dims but the last, flattened (a 1-D tensor's elements)."""
    return math.prod(shape[:row_dims(shape)])


def row_dims(shape: tuple[int, ...]) -> int:
    return max(1, len(shape) - 1)


def stage_of(w: Weight, layer: int | None, pp: int, num_layers: int) -> int:
    """Megatron's pipeline stage of a weight: layers split evenly, embeddings first,
    final norm and output layer last."""
    if w.place == "layer":
        return layer // (num_layers // pp)
    return 0 if w.place in ("embedding", "first") else pp - 1


def scheme_map(model: Model, src: str, dst: str, pp: int = 1, padded_vocab: int | None = None,
               stack_experts: bool = False) -> NameMap:
    """Links from every `src` tensor to the `dst` tensors. `padded_vocab` pads the
    weights marked `pad: vocab`; with `pp` > 1 a tied weight whose stage differs from
    its tie's gets a copy (Megatron-Core's GPTModel)."""
    t, env = model.template, model.env()
    for scheme in (src, dst):
        if scheme not in t.schemes:
            raise ConfigError(f"template {t.name} ({t.path}) has no {scheme!r} names (schemes: {', '.join(t.schemes)})")
    for scheme in (src, dst):
        built = [(w, layers) for w in t.weights_of(scheme) if w.experts == "grouped" or w.kind == "state"
                 for layers in [instances(w, env, scheme)] if layers]
        if built:
            w, layers = built[0]
            raise ConfigError(f"template {t.name}: {format_name(w.names[scheme], env, layers[0])} is a tensor of MindSpore Transformers' training "
                              "graph (grouped experts, training counters), which conversions do not build or read; convert to or from "
                              "the per-expert names its weight loader takes")
    m = NameMap(t, env, dst)
    tied = model.tied
    num_layers = env.int("num_layers")
    experts = model.experts
    for w in t.weights_of(dst):
        origin = w
        if w.tie is not None and tied:
            target = t.role(w.tie)
            if stage_of(w, None, pp, num_layers) == stage_of(target, None, pp, num_layers):
                continue
            origin = target
        for layer in instances(w, env, dst):
            _add(m, w, origin, layer, src, padded_vocab, stack_experts, experts)
    for w in t.weights_of(src):
        if w.tie is not None and tied:
            continue
        for layer in instances(w, env, src):
            for e in range(experts) if w.experts == "each" else [None]:
                name = format_name(w.names[src], env, layer, e)
                if name in m.hf_shapes:
                    continue
                original = _copy_of(m, w, layer, e, src)
                if original is None:
                    raise ConfigError(f"template {t.name} ({t.path}): weight {w.role} has no {dst!r} name and is part of no {dst!r} weight")
                m.copies[name] = original
                m.hf_shapes[name] = env.shape(w.shape)
                m.row_dims[name] = row_dims(m.hf_shapes[name])
    if m.reordered:
        m.links = _reordered(m, m.links)
    return m


def _reorder(m: NameMap, name: str, w: Weight, scheme: str, rows: int) -> None:
    """Record where `name` (weight `w` in `scheme`) stores each of its rows, if `w`
    declares a `permute` there."""
    p = (w.permute or {}).get(scheme)
    if p is None:
        return
    if w.pad is not None:
        raise ConfigError(f"template {m.template.name}: weight {w.role} is padded and reordered; only one is supported")
    view = m.env.shape(p.view)
    if math.prod(view) != rows:
        raise ConfigError(f"template {m.template.name}: weight {w.role}'s permute view {list(view)} holds "
                          f"{math.prod(view)} rows, the tensor has {rows}")
    held = np.arange(rows).reshape(view).transpose(p.order).reshape(-1)  # stored row j is row held[j]
    at = np.empty(rows, np.int64)
    at[held] = np.arange(rows)
    m.reordered[name] = at


def _reordered(m: NameMap, links: list[Link]) -> list[Link]:
    """Links between rows as every scheme orders them, rewritten to the stored rows of
    reordered tensors: each repetition cut into runs that stay consecutive on both
    sides, and runs that repeat at fixed steps joined again into strided links."""
    out = []
    for lk in links:
        a_at, b_at = m.reordered.get(lk.a), m.reordered.get(lk.b)
        if a_at is None and b_at is None:
            out.append(lk)
            continue
        if lk.transpose:
            raise ConfigError(f"template {m.template.name}: {lk.a} is transposed and reordered; only one is supported")
        runs: list[tuple[int, int, int]] = []
        for g in range(lk.times):
            a0, b0 = lk.a_row + g * lk.a_step, lk.b_row + g * lk.b_step
            a = a_at[a0: a0 + lk.count] if a_at is not None else np.arange(a0, a0 + lk.count)
            b = b_at[b0: b0 + lk.count] if b_at is not None else np.arange(b0, b0 + lk.count)
            cuts = [0, *(np.flatnonzero((np.diff(a) != 1) | (np.diff(b) != 1)) + 1).tolist(), lk.count]
            runs += [(int(a[s]), int(b[s]), e - s) for s, e in zip(cuts, cuts[1:])]
        out += _strided(lk, runs)
    return out


def _strided(lk: Link, runs: list[tuple[int, int, int]]) -> list[Link]:
    """`runs` (A row, B row, count) as links like `lk`: consecutive runs of one length
    whose starts move forward by fixed steps, without overlapping, make one strided link
    (a rotary permutation is two per head, not one per row)."""
    out, i = [], 0
    while i < len(runs):
        a, b, n = runs[i]
        j, da, db = i + 1, 0, 0
        if j < len(runs) and runs[j][2] == n and runs[j][0] - a >= n and runs[j][1] - b >= n:
            da, db = runs[j][0] - a, runs[j][1] - b
            while j < len(runs) and runs[j][2] == n and runs[j][0] - runs[j - 1][0] == da and runs[j][1] - runs[j - 1][1] == db:
                j += 1
        out.append(lk._replace(a_row=a, b_row=b, count=n, times=j - i, a_step=da, b_step=db))
        i = j
    return out


def _copy_of(m: NameMap, w: Weight, layer: int | None, expert: int | None, src: str) -> str | None:
    """The `src` tensor that `w` copies there (a fuse of one whole role that `src` also
    names: DeepSeek-V3's MTP embed_tokens), when the destination keeps only the original."""
    if w.fuse is None or len(w.fuse.parts) != 1 or w.fuse.parts[0].rows or w.fuse.parts[0].transpose:
        return None
    part = m.template.role(w.fuse.parts[0].role)
    if src not in part.names:
        return None
    original = format_name(part.names[src], m.env, layer if part.place == "layer" else None, expert)
    return original if original in m.hf_shapes else None


def with_copies(m: NameMap, recipes: dict[str, Recipe]) -> dict[str, Recipe]:
    """Recipes for the source tensors a conversion dropped as copies: their originals'."""
    return {**recipes, **{n: recipes[o] for n, o in m.copies.items() if o in recipes}}


def _add(m: NameMap, w: Weight, origin: Weight, layer: int | None, src: str, padded_vocab: int | None,
         stack: bool, experts: int) -> None:
    env, t = m.env, m.template
    base = env.shape(w.shape)
    if w.pad == "vocab" and padded_vocab is not None:
        base = (padded_vocab, *base[1:])
    per_expert = w.experts == "each" and not stack
    for e in (range(experts) if per_expert else [None]):
        stacked = experts if w.experts == "each" and stack else 0
        name = format_name(w.names[m.scheme], env, layer, STACKED if stacked else e)
        shape = (stacked, *base) if stacked else base
        m.shapes[name] = shape
        m.row_dims[name] = row_dims(shape)
        stored = env.shape(w.stored) if w.stored is not None else None
        m.tensors[name] = Tensor(w, layer, shape, stacked, (stacked, *stored) if stacked and stored else stored)
        _reorder(m, name, w, m.scheme, rows_of(shape))
        primary = origin is w
        if w.pad == "vocab" and padded_vocab is not None:
            m.vocab[name] = name if primary else format_name(origin.names[m.scheme], env, layer)
        renamed = m.scheme in origin.names and src in origin.names
        loop = range(experts) if stacked or (w.experts == "stacked" and not renamed) else [e]
        per = rows_of(shape) // len(loop)
        for k, expert in enumerate(loop):
            filled = _fill(m, w, origin, layer, expert, src, name, k * per, primary)
            if filled != per and not (w.pad == "vocab" and padded_vocab is not None):
                raise ConfigError(f"template {t.name}: weight {w.role} has {per} rows, its {src} sources give {filled}")
            if w.pad == "vocab" and padded_vocab is not None:
                if filled > per:
                    raise LayoutError(f"{name}: vocabulary {filled} is larger than the padded vocabulary {per}")
                src_name = next(lk.a for lk in reversed(m.links) if lk.b == name)
                if per > filled:
                    m.pads.append(Pad(name, filled, per - filled, src_name, filled - 1))


def _fill(m: NameMap, w: Weight, origin: Weight, layer: int | None, expert: int | None, src: str,
          dst: str, at: int, primary: bool) -> int:
    """Link the source rows of one (expert's) destination block; the rows linked."""
    env, t = m.env, m.template
    if src in origin.names:
        name, start, block, total = _source(m, origin, layer, expert, src, None, False, 1)
        m.links.append(Link(name, start, dst, at, block, primary))
        return total
    if origin.fuse is None:  # a part of a weight `src` names fused?
        whole = next((f for f in t.weights_of(src) if f.fuse and any(p.role == origin.role for p in f.fuse.parts)), None)
        if whole is None:
            raise ConfigError(f"template {t.name} ({t.path}): weight {w.role} has no {src!r} name and no fuse to build it from")
        return _cut(m, whole, origin, layer, expert, src, dst, at, primary)
    groups = int(evaluate(origin.fuse.groups, env))
    spans = []
    for p in origin.fuse.parts:
        part = t.role(p.role)
        if src not in part.names:
            raise ConfigError(f"template {t.name} ({t.path}): weight {w.role} is fused from {p.role}, which has no {src!r} name")
        if part.experts == "each" and expert is None:
            raise ConfigError(f"template {t.name}: weight {w.role} is fused from per-expert {p.role} but is not per expert")
        spans.append((*_source(m, part, layer, expert, src, p.rows, p.transpose, groups)[:3], p.transpose))
    period = sum(block for _, _, block, _ in spans)  # rows of one group: a block of each part
    offset = at
    for name, start, block, transpose in spans:  # one strided link per part, however many groups
        m.links.append(Link(name, start, dst, offset, block, primary, transpose, groups, block, period))
        offset += block
    return groups * period


def _cut(m: NameMap, whole: Weight, part: Weight, layer: int | None, expert: int | None, src: str, dst: str, at: int,
         primary: bool) -> int:
    """Link the rows of `part` that `whole` (named in `src`) holds as a fuse part: block g
    of the part is in group g of the whole, after the blocks of the parts before it (the
    inverse of building a fused weight: DeepSeek-V3's q_b_proj cut into MindSpore
    Transformers 1.5's nope and rope projections, per head)."""
    env = m.env
    groups = int(evaluate(whole.fuse.groups, env))
    blocks = [rows_of(env.shape(m.template.role(p.role).shape)) // groups for p in whole.fuse.parts]
    name, _start, _block, total = _source(m, whole, layer, expert, src, None, False, 1)
    if total != groups * sum(blocks) or any(p.rows or p.transpose for p in whole.fuse.parts):
        raise ConfigError(f"template {m.template.name}: weight {whole.role} ({total} rows) is not {groups} groups of "
                          f"whole blocks of its parts, so {part.role} cannot be cut from it")
    k = [p.role for p in whole.fuse.parts].index(part.role)
    m.links.append(Link(name, sum(blocks[:k]), dst, at, blocks[k], primary, False, groups, sum(blocks), blocks[k]))
    return groups * blocks[k]


def _source(m: NameMap, part: Weight, layer: int | None, expert: int | None, src: str, rows: tuple[str, str] | None,
            transpose: bool, groups: int) -> tuple[str, int, int, int]:
    """A source tensor of a destination weight, its shape recorded: (name, first row
    taken, rows per group, the tensor's rows); rows of its transpose with `transpose`."""
    env = m.env
    name = format_name(part.names[src], env, layer, expert if part.experts == "each" else None)
    shape = env.shape(part.stored or part.shape)
    if transpose and len(shape) != 2:
        raise ConfigError(f"template {m.template.name}: weight {part.role} is transposed but is not 2-D")
    m.hf_shapes[name] = shape
    m.row_dims[name] = row_dims(shape)
    _reorder(m, name, part, src, rows_of(shape))
    total = shape[-1] if transpose else rows_of(shape)
    start, count = (int(evaluate(rows[0], env)), int(evaluate(rows[1], env))) if rows else (0, total)
    if count % groups or start + count > total:
        raise ConfigError(f"template {m.template.name}: rows [{start}, {start + count}) of {part.role} ({total} rows) "
                          f"do not split into {groups} groups")
    return name, start, count // groups, total


# -- Megatron files ------------------------------------------------------------------------
def file_names(m: NameMap, logical: str, first_layer: int, local_experts: int) -> list[str]:
    """The names a Megatron file stores a logical tensor under: layer numbers local to
    its stage (`first_layer` is the stage's first), one name per local expert."""
    tensor = m.tensors[logical]
    name = tensor.weight.names[m.scheme]
    layer = tensor.layer - first_layer if tensor.weight.place == "layer" and tensor.layer is not None else tensor.layer
    if tensor.experts:
        return [format_name(name, m.env, layer, j) for j in range(local_experts)]
    return [format_name(name, m.env, layer)]


def extra_state_names(m: NameMap, stage: int, pp: int, local_experts: int) -> list[str]:
    """`_extra_state` keys of a Megatron-Core stage (written as None)."""
    num_layers = m.env.int("num_layers")
    first = stage * (num_layers // pp)
    out = []
    for w in m.template.extra_state:
        if m.scheme not in w.names:
            continue
        for layer in instances(w, m.env, m.scheme):
            if stage_of(w, layer, pp, num_layers) != stage:
                continue
            local = layer - first if w.place == "layer" and layer is not None else layer
            for j in range(local_experts) if w.experts == "each" else [None]:
                out.append(format_name(w.names[m.scheme], m.env, local, j) + "._extra_state")
    return out


def linked_dtype(m: NameMap, name: str, sources: dict[str, TensorInfo]) -> str:
    """The dtype of destination tensor `name`: that of the source tensors it is made of."""
    kinds = {sources[lk.a].dtype for lk in m.links if lk.b == name}
    if len(kinds) != 1:
        raise FormatError(f"the tensors that make {name} have different dtypes ({', '.join(sorted(kinds))})")
    return kinds.pop()


def whole_map(model: Model, scheme: str) -> NameMap:
    """HF -> `scheme` links for whole tensors: a fused weight has its stored shape
    (GLM-4's fc1 [2 * ffn, hidden], not the [2, ffn, hidden] a tensor-parallel split needs;
    the rows are the same)."""
    m = scheme_map(model, "hf", scheme)
    for name, t in m.tensors.items():
        if t.stored is not None:
            m.shapes[name] = t.stored
            m.row_dims[name] = row_dims(t.stored)
    return m


def scale_links(m: NameMap, a_scales: Mapping[str, str], b_scales: Mapping[str, str], present_in_a: bool,
                block: tuple[int, int]) -> tuple[list[Link], dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Links between the FP8 block scales of the HF (A) and the other scheme's (B) tensors,
    from the links between the tensors, and the scales' shapes on each side. The source's
    side (A when `present_in_a`) gives the weights it holds with a scale; the other side's
    names are those its template marks `block_scale`. A row block that does not start
    and end on block boundaries (or at the tensors' ends) would cut a scale apart: refused."""
    br = block[0]
    links = [lk for lk in m.links if present_in_a or lk.primary]
    sa = set(a_scales) if present_in_a else {lk.a for lk in links if lk.b in b_scales}
    sb = {lk.b for lk in links if lk.a in a_scales} if present_in_a else set(b_scales)
    for lk in links:
        if (lk.a in sa) != (lk.b in sb):
            raise FormatError(f"{lk.b} and {lk.a}: one is FP8 with a block scale, the other is not; set dtype: bf16 to dequantize")
    unmarked = sorted((sa - set(a_scales)) | (sb - set(b_scales)))
    if unmarked:
        raise ConfigError(f"{unmarked[0]} would hold FP8 block-scaled rows, but template {m.template.name} does not mark it "
                          "block_scale; set dtype: bf16 to dequantize")
    out, a_shapes, b_shapes = [], {}, {}
    for lk in links:
        if lk.a not in sa:
            continue
        a, b = m.hf_shapes[lk.a], m.shapes[lk.b]
        ends = lk.times == 1 and lk.a_row + lk.count == a[0] and (lk.b_row + lk.count) % b[-2] == 0
        if lk.transpose or len(a) != 2 or (len(b) > 2 and b[-2] % br) or any(x % br for x in (lk.a_row, lk.b_row, lk.a_step, lk.b_step)) \
                or (lk.count % br and not ends):
            raise LayoutError(f"{lk.b}: its rows from {lk.a} ({lk.count} from row {lk.a_row}) cut its {br}-row FP8 blocks "
                              "apart; set dtype: bf16 to dequantize")
        a_shapes[a_scales[lk.a]] = block_grid(a, block)
        b_shapes[b_scales[lk.b]] = (*b[:-2], *block_grid(b[-2:], block))
        out.append(Link(a_scales[lk.a], lk.a_row // br, b_scales[lk.b], lk.b_row // br, -(-lk.count // br), lk.primary,
                        False, lk.times, lk.a_step // br, lk.b_step // br))
    return out, a_shapes, b_shapes


def scheme_tensors(model: Model, scheme: str, hf: dict[str, TensorInfo]) -> tuple[dict[str, TensorInfo], dict[str, Recipe]]:
    """The tensors of `scheme` (MindFormers names: renamed, fused, experts stacked), each
    with its recipe from the whole HF tensors `hf`."""
    m = whole_map(model, scheme)
    infos = {n: TensorInfo(linked_dtype(m, n, hf), shape) for n, shape in m.shapes.items()}
    return infos, forward(m.links, m.pads, hf, infos, m.row_dims)


def hf_tensors(model: Model, scheme: str, held: dict[str, TensorInfo], where: str) -> tuple[dict[str, TensorInfo], dict[str, Recipe]]:
    """The HF tensors a checkpoint named in `scheme` holds, each with its recipe from
    the checkpoint's tensors (`held`, which must be exactly the scheme's)."""
    m = whole_map(model, scheme)
    unknown, missing = sorted(set(held) - set(m.shapes)), sorted(set(m.shapes) - set(held))
    if unknown or missing:
        what = f"holds {unknown[0]}, which is not" if unknown else f"lacks {missing[0]}, which is"
        raise FormatError(f"{where}: the checkpoint {what} a {scheme} name of template {model.family} "
                          f"for this config.json ({len(held)} tensors held, {len(m.shapes)} expected)")
    for n, shape in m.shapes.items():
        if held[n].shape != shape:
            raise FormatError(f"{where}: tensor {n} has shape {list(held[n].shape)}, config.json implies {list(shape)}")
    back = {lk.a: held[lk.b].dtype for lk in m.links if lk.primary}
    infos = {n: TensorInfo(back[m.copies.get(n, n)], shape) for n, shape in m.hf_shapes.items()}
    return infos, with_copies(m, backward(m.links, infos, held, m.row_dims))
