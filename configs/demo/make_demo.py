"""Rebuild the demo's source checkpoint: a tiny Llama-shaped model (4 layers, hidden 128,
GQA 4 heads / 2 kv heads, SwiGLU 352, vocab 1024, BF16, HF names) saved 2-way tensor
(model) parallel as Megatron lays it out (vocab-parallel embeddings), with its native
autotrans strategy. Deterministic: a seeded numpy RNG, no framework needed.

    python configs/demo/make_demo.py        # writes configs/demo/checkpoint/ and configs/demo/strategy/
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 2024
LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, TP = 4, 128, 4, 2, 352, 1024, 2
HEAD_DIM = HIDDEN // HEADS


def weights() -> dict[str, tuple[tuple[int, ...], int | None]]:
    """name -> (global shape, tensor-parallel split dim or None)."""
    out = {"model.embed_tokens.weight": ((VOCAB, HIDDEN), 0), "model.norm.weight": ((HIDDEN,), None),
           "lm_head.weight": ((VOCAB, HIDDEN), 0)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": ((HIDDEN,), None),
            p + "self_attn.q_proj.weight": ((HEADS * HEAD_DIM, HIDDEN), 0),
            p + "self_attn.k_proj.weight": ((KV_HEADS * HEAD_DIM, HIDDEN), 0),
            p + "self_attn.v_proj.weight": ((KV_HEADS * HEAD_DIM, HIDDEN), 0),
            p + "self_attn.o_proj.weight": ((HIDDEN, HEADS * HEAD_DIM), 1),
            p + "post_attention_layernorm.weight": ((HIDDEN,), None),
            p + "mlp.gate_proj.weight": ((FFN, HIDDEN), 0),
            p + "mlp.up_proj.weight": ((FFN, HIDDEN), 0),
            p + "mlp.down_proj.weight": ((HIDDEN, FFN), 1),
        }
    return out


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for name in sorted(tensors):
        n = tensors[name].nbytes
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name]).tobytes())


def main() -> None:
    rng = np.random.default_rng(SEED)
    specs = weights()
    full = {}
    for n, (shape, _dim) in specs.items():
        r = rng.standard_normal(shape)
        full[n] = to_bf16_bits(1 + 0.1 * r if "norm" in n else 0.02 * r)
    for rank in range(TP):
        part = {n: np.split(full[n], TP, axis=dim)[rank] if dim is not None else full[n] for n, (_s, dim) in specs.items()}
        write_safetensors(HERE / "checkpoint" / f"rank_{rank}" / f"checkpoint_{rank}.safetensors", part)
        params = {n: {"shape": list(shape), "dtype": "BF16", "stage": 0, "dev_matrix": [1, TP],
                      "tensor_map": [0 if d == dim else -1 for d in range(len(shape))], "opt_shard": 1, "stored_shape": None}
                  for n, (shape, dim) in sorted(specs.items())}
        doc = {"format": "autotrans-strategy", "version": 1, "rank": rank, "stages": [list(range(TP))], "params": params}
        out = HERE / "strategy" / f"ckpt_strategy_rank_{rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {HERE / 'checkpoint'} ({TP} ranks) and {HERE / 'strategy'}")


if __name__ == "__main__":
    main()
