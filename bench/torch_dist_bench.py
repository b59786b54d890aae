"""torch_dist benchmark (issue 15): Megatron torch_dist -> HF with autotrans against
megatron-core's own `dist_checkpointing.load` of the same folder, on the 1.2 GB bf16
Llama-shaped bench model of convert_bench.

The torch_dist folder is written by megatron-core itself: HF -> Megatron TP2 (local layer
spec, autotrans), then each TP rank's file loaded into a GPTModel under gloo on the CPU and
saved with `dist_checkpointing.save`. megatron-core's load builds the GPTModel (bf16, TP1,
no weight init) in one gloo process and fills its sharded_state_dict from the folder:
what Megatron needs to read a torch_dist checkpoint. Memory is sampled as in
convert_bench (RssAnon: private memory; VmRSS: also mapped file pages).

    python bench/torch_dist_bench.py [--keep DIR]
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import du  # noqa: E402
from convert_bench import BENCH_LAYERS, HEADS, KV_HEADS, job, measured, report, work_folder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# The GPTModel of the bench model's args, on the CPU (bf16, no init: weights are loaded).
MODEL = """
import contextlib, os, sys, time, torch, torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import random as mrandom
from megatron.core.transformer.transformer_config import TransformerConfig


def gpt(a, tp):
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *x, **k: None
    mrandom.CudaRNGStatesTracker.fork = lambda self, *x, **k: contextlib.nullcontext()
    cfg = TransformerConfig(num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=a.ffn_hidden_size,
                            num_attention_heads=a.num_attention_heads, num_query_groups=a.num_query_groups,
                            kv_channels=a.kv_channels, normalization="RMSNorm", gated_linear_unit=True,
                            activation_func=torch.nn.functional.silu, add_bias_linear=False, bf16=True,
                            params_dtype=torch.bfloat16, use_cpu_initialization=True, perform_initialization=False,
                            tensor_model_parallel_size=tp)
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=a.padded_vocab_size, max_sequence_length=4096,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    return model.to(torch.bfloat16)  # the torch norm fallback keeps fp32 weights otherwise


def start(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(world, 1)
"""

SAVE = MODEL + """
if __name__ == "__main__":
    rank, port, src, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    start(rank, 2, port)
    doc = torch.load(f"{src}/iter_0000001/mp_rank_{rank:02d}/model_optim_rng.pt", weights_only=False)
    model = gpt(doc["args"], 2)
    model.load_state_dict(doc["model"], strict=True)
    os.makedirs(f"{out}/iter_0000001", exist_ok=True)
    dist_checkpointing.save({"args": doc["args"], "checkpoint_version": 3.0, "iteration": 1,
                             "model": model.sharded_state_dict()}, f"{out}/iter_0000001")
    if rank == 0:
        open(f"{out}/latest_checkpointed_iteration.txt", "w").write("1")
"""

LOAD = MODEL + """
if __name__ == "__main__":
    port, folder = sys.argv[1], sys.argv[2]
    start(0, 1, port)
    args = torch.load(f"{folder}/iter_0000001/common.pt", weights_only=False)["args"]
    model = gpt(args, 1)
    t = time.perf_counter()
    state = dist_checkpointing.load(model.sharded_state_dict(), f"{folder}/iter_0000001")
    model.load_state_dict(state, strict=False)
    print(f"load {time.perf_counter() - t:.2f}", file=sys.stderr)
"""


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_torch_dist(root: Path, hf: Path) -> Path:
    out = root / "dist"
    if (out / "latest_checkpointed_iteration.txt").exists():
        return out
    subprocess.run([sys.executable, "-m", "runner", "run", str(job(root / "to_tp2.yaml", load_checkpoint=str(hf), output_format="megatron",
                    transformer_impl="local", output_dir=str(root / "tp2"), parallel_config={"model_parallel": 2})), "--no-progress"],
                   check=True, cwd=ROOT)
    (root / "save.py").write_text(SAVE)
    p = port()
    procs = [subprocess.Popen([sys.executable, str(root / "save.py"), str(r), str(p), str(root / "tp2" / "transformed_checkpoint"), str(out)])
             for r in range(2)]
    if any(proc.wait() != 0 for proc in procs):
        raise SystemExit("megatron-core's dist_checkpointing.save failed")
    return out


def main() -> None:
    root, hf, _ = work_folder(__doc__, "torch_dist_bench_")
    folder = make_torch_dist(root, hf)
    (root / "load.py").write_text(LOAD)
    to_hf = job(root / "to_hf.yaml", load_checkpoint=str(folder), output_format="hf", reference_hf_dir=str(hf), output_dir=str(root / "back"))
    rows = [("autotrans torch_dist -> HF", *measured([sys.executable, "-m", "runner", "run", str(to_hf), "--no-progress"])),
            ("megatron-core dist_checkpointing.load into GPTModel (TP1)", *measured([sys.executable, str(root / "load.py"), str(port()), str(folder)]))]
    print(f"model: {du(hf) / 1e9:.2f} GB bf16 ({BENCH_LAYERS} layers, {HEADS} heads, {KV_HEADS} query groups); "
          f"torch_dist folder {du(folder) / 1e9:.2f} GB saved at TP2")
    report(rows, "torch_dist -> HF vs the original", hf, root / "back" / "transformed_checkpoint")


if __name__ == "__main__":
    main()
