"""Megatron's parallel layout as a native Strategy over the logical tensors, so the
core planner reshards between Megatron layouts (and from full HF tensors) directly.

Ranks: stage-major, then expert-parallel rank, tensor-parallel rank fastest; each
stage's dev_matrix is [ep, tp] (data parallelism does not change the files). Column
parallel: word embeddings, output layer, QKV, fc1 (dim 1 of [2, ffn, hidden]); row
parallel: linear_proj, fc2; experts split over EP on dim 0; the rest replicated."""

from __future__ import annotations

from dataclasses import dataclass

from runner.convert import megatron_names as mn
from runner.errors import ConfigError
from runner.formats.base import TensorInfo
from runner.layout import ParamLayout
from runner.strategy import Strategy

TP_AXIS, EP_AXIS = (0,), (1,)


@dataclass(frozen=True)
class MegatronLayout:
    tp: int
    pp: int
    ep: int = 1

    @property
    def per_stage(self) -> int:
        return self.tp * self.ep

    @property
    def world_size(self) -> int:
        return self.per_stage * self.pp

    def rank(self, tp: int, pp: int, ep: int) -> int:
        return pp * self.per_stage + ep * self.tp + tp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp, pp, ep) of a rank."""
        pp, pos = divmod(rank, self.per_stage)
        ep, tp = divmod(pos, self.tp)
        return tp, pp, ep

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

    def check(self, num_layers: int, kv_heads: int, experts: int) -> None:
        if num_layers % self.pp:
            raise ConfigError(f"parallel_config.pipeline_stage {self.pp} does not divide the {num_layers} layers")
        if kv_heads % self.tp:
            raise ConfigError(f"parallel_config.model_parallel {self.tp} does not divide the {kv_heads} query groups")
        if self.ep > 1 and (not experts or experts % self.ep):
            raise ConfigError(f"parallel_config.expert_parallel {self.ep} does not divide the {experts} experts")


def param_layout(name: str, shape: tuple[int, ...], dtype: str, lay: MegatronLayout, num_layers: int) -> ParamLayout:
    """Layout of one logical tensor."""
    last = lay.pp - 1
    parts = mn.split_layer(name)
    if name == mn.EMBEDDING:
        stage = 0
    elif name in (mn.OUTPUT, mn.FINAL_NORM):
        stage = last
    elif parts is not None:
        stage = parts[0] // (num_layers // lay.pp)
    else:
        raise ConfigError(f"no Megatron layout for tensor {name}")
    rest = parts[1] if parts else name
    tmap: list[tuple[int, ...]] = [()] * len(shape)
    stored = None
    if name in (mn.EMBEDDING, mn.OUTPUT) or rest.startswith("self_attention.linear_qkv."):
        tmap[0] = TP_AXIS
    elif rest in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        tmap[1] = TP_AXIS
    elif rest == "mlp.linear_fc1.weight":  # [2, ffn, hidden] -> [gate_shard; up_shard]
        tmap[1] = TP_AXIS
        stored = (2 * shape[1] // lay.tp, shape[2])
    elif rest == mn.EXPERT_FC1:  # [experts, 2, ffn, hidden]
        tmap[0], tmap[2] = EP_AXIS, TP_AXIS
        stored = (shape[0] // lay.ep, 2 * shape[2] // lay.tp, shape[3])
    elif rest == mn.EXPERT_FC2:  # [experts, hidden, ffn]
        tmap[0], tmap[2] = EP_AXIS, TP_AXIS
    return ParamLayout(tuple(shape), dtype, (stage,), (lay.ep, lay.tp), tuple(tmap), stored_shape=stored)


def strategy(infos: dict[str, TensorInfo], lay: MegatronLayout, num_layers: int) -> Strategy:
    stages = tuple(tuple(range(s * lay.per_stage, (s + 1) * lay.per_stage)) for s in range(lay.pp))
    params = {n: param_layout(n, t.shape, t.dtype, lay, num_layers) for n, t in infos.items()}
    out = Strategy(stages, params, "native")
    out.validate()
    return out
