"""HF Mixtral <-> Megatron-Core MoE: the router, and the experts stacked into one
logical tensor per layer ([experts, 2, ffn, hidden] and [experts, hidden, ffn]) so
that expert parallelism is a dim-0 split; each file holds its local experts."""

from __future__ import annotations

from runner.convert import megatron_names as mn
from runner.convert.llama import NameMap, name_map as dense_map, swiglu
from runner.convert.model import ModelSpec


def moe_mlp(m: NameMap, spec: ModelSpec, i: int) -> None:
    p = f"model.layers.{i}.block_sparse_moe"
    m.rename(f"{p}.gate.weight", mn.layer(i, "mlp.router.weight"), (spec.experts, spec.hidden))
    for e in range(spec.experts):
        swiglu(m, f"{p}.experts.{e}.w1.weight", f"{p}.experts.{e}.w3.weight", f"{p}.experts.{e}.w2.weight",
               mn.layer(i, mn.EXPERT_FC1), mn.layer(i, mn.EXPERT_FC2), spec, e, spec.experts)


def name_map(spec: ModelSpec, padded_vocab: int, pp: int) -> NameMap:
    return dense_map(spec, padded_vocab, pp, mlp=moe_mlp)
