"""Strategy files as MindSpore writes them, built from a ParallelStrategyMap message
class: MindSpore's own (mindspore.train.node_strategy_pb2) or the schema's."""

from __future__ import annotations

from pathlib import Path


def write_strategy(path: Path, strategy_map, stage: int | None, layouts: dict, merged: bool = False) -> None:
    """`layouts`: name -> (dev_matrix, tensor_map, opt_weight_shard_size,
    opt_weight_shard_step); a tensor_map entry that is a list is a dim split over several
    axes (one TensorMap per dim, as MindSpore writes it). `stage` None: no
    parallel_strategy_item; `merged`: names are "{stage}-{name}", as MindSpore's merge."""
    m = strategy_map(current_stage=1 if merged else (stage or 0))
    stages = sorted({int(n.split("-")[0]) for n in layouts}) if merged else ([] if stage is None else [stage])
    for s in stages:
        item = m.parallel_strategy_item.add(node_name=f"Default/network-MatMul-op{s}")
        item.parallel_strategys.stage = s
        item.parallel_strategys.parallel_strategy.add().dim.extend([1, 1])
    for name, (dev, tmap, opt_size, opt_step) in layouts.items():
        pl = m.parallel_layout_item.add(param_name=name).parallel_layouts
        pl.dev_matrix.add().dim.extend(dev)
        if any(isinstance(t, list) for t in tmap):
            for t in tmap:
                pl.tensor_map.add().dim.extend(t if isinstance(t, list) else [t])
        else:
            pl.tensor_map.add().dim.extend(tmap)
        pl.param_split_shape.add()
        pl.indices_offset.add()
        pl.field, pl.opt_weight_shard_size, pl.opt_weight_shard_step = 0, opt_size, opt_step
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(m.SerializeToString())
