"""The protobuf schemas of MindSpore's `node_strategy.proto` (strategy files) and
`checkpoint.proto` (.ckpt files), built at runtime from descriptors: no protoc, no
generated code, no MindSpore. Field names and numbers are MindSpore's (proto2).

A private descriptor pool keeps these classes apart from MindSpore's own, so both can
live in one process (the oracle tests import MindSpore)."""

from __future__ import annotations

from functools import lru_cache

# (name, number, label, type, message type) per field; labels and types as in
# google.protobuf.descriptor_pb2.FieldDescriptorProto.
_REQ, _OPT, _REP = "LABEL_REQUIRED", "LABEL_OPTIONAL", "LABEL_REPEATED"

_STRATEGY_MESSAGES = {
    "ParallelStrategy": [("dim", 1, _REP, "TYPE_UINT32", None)],
    "ParallelStrategys": [("stage", 1, _REQ, "TYPE_UINT32", None),
                          ("parallel_strategy", 2, _REP, "TYPE_MESSAGE", "ParallelStrategy")],
    "ParallelStrategyItem": [("node_name", 1, _REQ, "TYPE_STRING", None),
                             ("parallel_strategys", 2, _REQ, "TYPE_MESSAGE", "ParallelStrategys")],
    "DevMatrix": [("dim", 1, _REP, "TYPE_UINT32", None)],
    "TensorMap": [("dim", 1, _REP, "TYPE_INT32", None)],
    "ParamSplitShape": [("dim", 1, _REP, "TYPE_INT64", None)],
    "IndicesOffset": [("dim", 1, _REP, "TYPE_INT64", None)],
    "ParallelLayouts": [("dev_matrix", 1, _REP, "TYPE_MESSAGE", "DevMatrix"),
                        ("tensor_map", 2, _REP, "TYPE_MESSAGE", "TensorMap"),
                        ("param_split_shape", 3, _REP, "TYPE_MESSAGE", "ParamSplitShape"),
                        ("indices_offset", 4, _REP, "TYPE_MESSAGE", "IndicesOffset"),
                        ("field", 5, _REQ, "TYPE_INT32", None),
                        ("opt_weight_shard_step", 6, _REQ, "TYPE_INT32", None),
                        ("opt_weight_shard_size", 7, _REQ, "TYPE_INT32", None)],
    "ParallelLayoutItem": [("param_name", 1, _REQ, "TYPE_STRING", None),
                           ("parallel_layouts", 2, _REQ, "TYPE_MESSAGE", "ParallelLayouts")],
    "ParallelGroupRanks": [("dim", 1, _REP, "TYPE_UINT32", None)],
    "ParallelGroupItem": [("group_name", 1, _REQ, "TYPE_STRING", None),
                          ("parallel_group_ranks", 2, _REQ, "TYPE_MESSAGE", "ParallelGroupRanks")],
    "ParallelGroupMap": [("parallel_group_item", 1, _REP, "TYPE_MESSAGE", "ParallelGroupItem"),
                         ("ckpt_restore_rank_list", 2, _REQ, "TYPE_MESSAGE", "ParallelGroupRanks")],
    "ParallelStrategyMap": [("current_stage", 1, _REQ, "TYPE_UINT32", None),
                            ("parallel_strategy_item", 2, _REP, "TYPE_MESSAGE", "ParallelStrategyItem"),
                            ("parallel_layout_item", 3, _REP, "TYPE_MESSAGE", "ParallelLayoutItem")],
}

_CHECKPOINT_MESSAGES = {
    "TensorProto": [("dims", 1, _REP, "TYPE_INT64", None),
                    ("tensor_type", 2, _REQ, "TYPE_STRING", None),
                    ("tensor_content", 3, _REQ, "TYPE_BYTES", None)],
    "MapTensorProto": [("tensor", 1, _REP, "TYPE_MESSAGE", "TensorProto")],
    "Checkpoint": [("value", 1, _REP, "TYPE_MESSAGE", "Checkpoint.Value")],
}
# Checkpoint.Value is nested, with a oneof {tensor, maptensor}.
_VALUE_FIELDS = [("tag", 1, _REQ, "TYPE_STRING", None),
                 ("tensor", 2, _OPT, "TYPE_MESSAGE", "TensorProto"),
                 ("maptensor", 3, _OPT, "TYPE_MESSAGE", "MapTensorProto")]


def _add_fields(msg, fields, package: str) -> None:
    from google.protobuf import descriptor_pb2 as d

    for name, number, label, ftype, type_name in fields:
        f = msg.field.add(name=name, number=number,
                          label=d.FieldDescriptorProto.Label.Value(label),
                          type=d.FieldDescriptorProto.Type.Value(ftype))
        if type_name:
            f.type_name = f".{package}.{type_name}" if package else f".{type_name}"


@lru_cache(maxsize=None)
def _classes() -> dict:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    strategy = descriptor_pb2.FileDescriptorProto(name="node_strategy.proto", package="mindspore.straspb", syntax="proto2")
    for name, fields in _STRATEGY_MESSAGES.items():
        _add_fields(strategy.message_type.add(name=name), fields, strategy.package)
    ckpt = descriptor_pb2.FileDescriptorProto(name="checkpoint.proto", syntax="proto2")
    for name, fields in _CHECKPOINT_MESSAGES.items():
        msg = ckpt.message_type.add(name=name)
        _add_fields(msg, fields, "")
        if name == "Checkpoint":
            value = msg.nested_type.add(name="Value")
            _add_fields(value, _VALUE_FIELDS, "")
            value.oneof_decl.add(name="value")
            for f in value.field[1:]:
                f.oneof_index = 0
    pool.Add(strategy)
    pool.Add(ckpt)
    out = {}
    for name in _STRATEGY_MESSAGES:
        out[name] = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"mindspore.straspb.{name}"))
    for name in _CHECKPOINT_MESSAGES:
        out[name] = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
    return out


def message(name: str):
    """The message class `name` (e.g. "ParallelStrategyMap", "Checkpoint")."""
    return _classes()[name]
