"""Run Megatron-LM's own converter, tools/checkpoint/convert.py, on this CPU-only machine,
for bench/convert_bench.py's side-by-side run. Usage:

    python bench/megatron_lm_convert.py MEGATRON_LM_DIR [convert.py's arguments ...]

MEGATRON_LM_DIR is a checkout of Megatron-LM at core_v0.17.1, the last release whose
convert.py still has the llama_mistral (HF) loader (0.18 moved HF conversion to
Megatron-Bridge). The checkout's own `megatron` package is used, not an installed one.
The converter asks for a GPU and CUDA kernels in a few places that do not change a byte
it writes; each is answered here, as on a CPU:
  - torch.cuda.current_device / synchronize / get_rng_state: "cpu", a no-op, the CPU's
    RNG state (saved beside the weights; the bench ignores it);
  - TransformerEngine's version is asked for but TE is not used with
    --saver-transformer-impl local: report 1.0.0; the loader's check of the transformers
    version (`minor >= 31`) misreads transformers 5.x: skipped;
  - rope fusion and gradient-accumulation fusion (CUDA kernels, training only): off;
    `apply_layernorm_1p` (read by the legacy model the loader builds, no longer an
    argument): False, its default; the GPU generation (only chooses a warning): 9;
  - CUDA_DEVICE_MAX_CONNECTIONS=1, which Megatron asks for with tensor parallelism.
"""

import importlib.metadata
import os
import runpy
import sys

import torch

os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
SOURCE = sys.argv[1]
sys.path[:0] = [os.path.join(SOURCE, "tools", "checkpoint"), SOURCE]

torch.cuda.current_device = lambda: "cpu"
torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
_version = importlib.metadata.version
importlib.metadata.version = lambda name: "1.0.0" if name == "transformer-engine" else _version(name)

import loader_llama_mistral  # noqa: E402  (from the checkout, found through sys.path above)
import megatron.training.arguments as megatron_arguments  # noqa: E402

loader_llama_mistral.verify_transformers_version = lambda: None
_parse_args = megatron_arguments.parse_args


def _cpu_parse_args(*args, **kwargs):
    parsed = _parse_args(*args, **kwargs)
    parsed.apply_rope_fusion = parsed.gradient_accumulation_fusion = False
    parsed.__dict__.setdefault("apply_layernorm_1p", False)
    return parsed


megatron_arguments.parse_args = _cpu_parse_args
megatron_arguments.get_device_arch_version = lambda: 9

sys.argv = [os.path.join(SOURCE, "tools", "checkpoint", "convert.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
