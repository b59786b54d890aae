"""Element types by their safetensors names. Copies move raw bits, so each type maps to
an unsigned integer of its size for numpy; torch is imported only for casts."""

from __future__ import annotations

import numpy as np

from runner.errors import FormatError

ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
    "STR": 4,  # a MindSpore .ckpt string entry (append_dict): numpy's UTF-32 code units, moved as bits
}
STRING = "STR"  # only a .ckpt file holds it; safetensors has no such dtype

_BITS = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}

# Real numpy types, for math (LoRA) and for tests; BF16 has none.
NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8"),
}

# Job option `dtype` -> safetensors name.
CAST_NAMES: dict[str, str] = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}


def is_float(dtype: str) -> bool:
    return dtype.startswith(("F", "BF"))


def cast_dtype(dtype: str, cast_to: str | None, keep: tuple[str, ...] = ()) -> str:
    """The output type of a `dtype` tensor when the job casts to `cast_to`: floats
    are cast, integers and bools never, nor a tensor whose template keeps `dtype`."""
    return cast_to if cast_to and is_float(dtype) and dtype not in keep else dtype


def itemsize(dtype: str) -> int:
    try:
        return ITEMSIZE[dtype]
    except KeyError:
        raise FormatError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(ITEMSIZE))}") from None


def bits_dtype(dtype: str) -> np.dtype:
    """The unsigned numpy type used to copy elements of `dtype` bit for bit."""
    return _BITS[itemsize(dtype)]


def torch_dtype(dtype: str):  # -> torch.dtype; torch imported lazily
    import torch

    table = {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
        "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32,
        "I64": torch.int64, "F64": torch.float64, "U16": torch.uint16, "U32": torch.uint32,
        "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }
    try:
        return table[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype!r} has no torch equivalent") from None


def from_torch(tdtype) -> str:
    """safetensors name of a torch dtype."""
    import torch

    table = {
        torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
        torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32",
        torch.int64: "I64", torch.float64: "F64", torch.uint16: "U16", torch.uint32: "U32",
        torch.uint64: "U64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    }
    try:
        return table[tdtype]
    except KeyError:
        raise FormatError(f"torch dtype {tdtype} is not supported") from None


def cast(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert elements stored as raw bits of type `src` to raw bits of type `dst`
    (round to nearest even, as torch does)."""
    if src == dst:
        return bits
    import torch

    if not (bits.flags.c_contiguous and bits.flags.writeable):  # torch wants its own writable buffer
        bits = np.array(bits, order="C")
    t = torch.from_numpy(bits).view(torch_dtype(src))
    out = t.to(torch_dtype(dst))
    return out.view(_torch_bits(itemsize(dst))).numpy().view(bits_dtype(dst))


def _torch_bits(size: int):
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
