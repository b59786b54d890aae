"""HF Llama 2/3, Mistral and Qwen2 <-> Megatron's global logical tensors.

Logical tensors carry Megatron-Core names with global layer numbers (runner.convert.
megatron_names turns them into each file's names):
  linear_qkv [ng * (nh/ng + 2) * hd, hidden]: per query group g, its nh/ng query heads,
      then its key head, then its value head (so a dim-0 TP split gives whole groups);
  linear_fc1 [2, ffn, hidden]: gate then up, split on dim 1 by TP and stored as
      [gate_shard; up_shard] on each rank;
  word embeddings / output layer [padded_vocab, hidden], padded with copies of the
      last row as Megatron's converter does."""

from __future__ import annotations

from dataclasses import dataclass, field

from runner.convert import megatron_names as mn
from runner.convert.model import ModelSpec
from runner.convert.rows import Link, Pad


@dataclass
class NameMap:
    """HF <-> logical links, plus the logical tensors' shapes and row dims."""

    links: list[Link] = field(default_factory=list)
    pads: list[Pad] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    row_dims: dict[str, int] = field(default_factory=dict)
    hf_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def rename(self, hf: str, logical: str, shape: tuple[int, ...]) -> None:
        self.tensor(logical, shape)
        self.hf_shapes[hf] = shape
        self.links.append(Link(hf, 0, logical, 0, shape[0]))

    def tensor(self, logical: str, shape: tuple[int, ...], row_dims: int = 1) -> None:
        self.shapes[logical] = shape
        self.row_dims[logical] = row_dims

    def link(self, hf: str, hf_shape: tuple[int, ...], logical: str, at_row: int, primary: bool = True) -> None:
        self.hf_shapes[hf] = hf_shape
        self.links.append(Link(hf, 0, logical, at_row, hf_shape[0], primary))


def attention(m: NameMap, spec: ModelSpec, i: int) -> None:
    """q, k, v fused per query group; o_proj; the input norm."""
    p = f"model.layers.{i}.self_attn"
    h, hd, ng = spec.hidden, spec.head_dim, spec.kv_heads
    qpg = spec.heads // ng
    qkv = mn.layer(i, "self_attention.linear_qkv.weight")
    m.tensor(qkv, (spec.qkv_rows, h))
    kinds = [("weight", qkv, (h,))]
    if spec.qkv_bias:
        bias = mn.layer(i, "self_attention.linear_qkv.bias")
        m.tensor(bias, (spec.qkv_rows,))
        kinds.append(("bias", bias, ()))
    for kind, logical, cols in kinds:
        for name, heads in (("q_proj", spec.heads), ("k_proj", ng), ("v_proj", ng)):
            m.hf_shapes[f"{p}.{name}.{kind}"] = (heads * hd, *cols)
        for g in range(ng):
            base = g * (qpg + 2) * hd
            m.links.append(Link(f"{p}.q_proj.{kind}", g * qpg * hd, logical, base, qpg * hd))
            m.links.append(Link(f"{p}.k_proj.{kind}", g * hd, logical, base + qpg * hd, hd))
            m.links.append(Link(f"{p}.v_proj.{kind}", g * hd, logical, base + (qpg + 1) * hd, hd))
    m.rename(f"{p}.o_proj.weight", mn.layer(i, "self_attention.linear_proj.weight"), (h, spec.heads * hd))
    m.rename(f"model.layers.{i}.input_layernorm.weight", mn.layer(i, "input_layernorm.weight"), (h,))
    m.rename(f"model.layers.{i}.post_attention_layernorm.weight", mn.layer(i, "pre_mlp_layernorm.weight"), (h,))


def swiglu(m: NameMap, hf_gate: str, hf_up: str, hf_down: str, fc1: str, fc2: str, spec: ModelSpec,
           expert: int | None = None, experts: int = 1) -> None:
    """SwiGLU MLP: fc1 [.., 2, ffn, hidden] from gate and up; fc2 [.., hidden, ffn]."""
    h, f = spec.hidden, spec.ffn
    lead = () if expert is None else (experts,)
    e = expert or 0
    m.tensor(fc1, (*lead, 2, f, h), row_dims=len(lead) + 2)
    m.tensor(fc2, (*lead, h, f), row_dims=len(lead) + 1)
    m.link(hf_gate, (f, h), fc1, (2 * e) * f)
    m.link(hf_up, (f, h), fc1, (2 * e + 1) * f)
    m.link(hf_down, (h, f), fc2, e * h)


def vocab(m: NameMap, hf: str, logical: str, spec: ModelSpec, padded: int, primary: bool = True) -> None:
    m.tensor(logical, (padded, spec.hidden))
    m.link(hf, (spec.vocab, spec.hidden), logical, 0, primary)
    if padded > spec.vocab:
        m.pads.append(Pad(logical, spec.vocab, padded - spec.vocab, hf, spec.vocab - 1))


def name_map(spec: ModelSpec, padded_vocab: int, pp: int, mlp=None) -> NameMap:
    """The whole model's map. `pp` matters for a tied output layer: with PP > 1 the last
    stage holds a copy of the embeddings (Megatron-Core's GPTModel)."""
    m = NameMap()
    vocab(m, "model.embed_tokens.weight", mn.EMBEDDING, spec, padded_vocab)
    for i in range(spec.num_layers):
        attention(m, spec, i)
        if mlp is not None:
            mlp(m, spec, i)
        else:
            p = f"model.layers.{i}.mlp"
            swiglu(m, f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight",
                   mn.layer(i, "mlp.linear_fc1.weight"), mn.layer(i, "mlp.linear_fc2.weight"), spec)
    m.rename("model.norm.weight", mn.FINAL_NORM, (spec.hidden,))
    if not spec.tied:
        vocab(m, "lm_head.weight", mn.OUTPUT, spec, padded_vocab)
    elif pp > 1:
        vocab(m, "model.embed_tokens.weight", mn.OUTPUT, spec, padded_vocab, primary=False)
    return m
