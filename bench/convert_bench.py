"""Conversion benchmark (issue 6): HF -> Megatron TP2 PP2 -> HF (and -> TP4 PP1) on a
Llama-shaped bf16 GQA model of 1.2 GB (bench_util's shapes, 10 layers), with the peak memory of each run, to show that conversion
streams: peak private memory is bounded by a few tensors, not by the model.

With --megatron-lm DIR (a Megatron-LM checkout at core_v0.17.1), HF -> Megatron TP2 PP2
(local layer spec) runs side by side with Megatron-LM's own tools/checkpoint/convert.py
(llama_mistral loader, core saver; see bench/megatron_lm_convert.py), the two taking turns
for --runs runs each, and the two outputs are compared tensor by tensor.

The floor of HF -> Megatron is torch.save of the tensors it wrote, fsynced (Megatron's
files are pickles: their bytes come from torch.save). Memory is sampled from /proc/PID/status every 10 ms in the child: RssAnon (private
memory: what streaming bounds) and VmRSS (also counts mapped file pages, which are
reclaimable page cache), summed over the process and its children (convert.py
runs its loader and saver as two processes); user + sys counts the children too. The naive baseline loads the whole HF model with
safetensors, fuses QKV/fc1 with torch and torch.saves one TP1 file.

    python bench/convert_bench.py [--keep DIR]
    python bench/convert_bench.py --megatron-lm DIR [--megatron-python PY] [--runs 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import FFN, HIDDEN, LAYERS, VOCAB, du, llama_weights  # noqa: E402

HEADS, KV_HEADS = 16, 4
BENCH_LAYERS = LAYERS + 2  # GQA shrinks k/v: two more layers keep the model over 1 GB (PP2 needs an even count)

NAIVE = """
import sys, torch
from safetensors.torch import load_file
sd = load_file(sys.argv[1] + "/model.safetensors")
L, H, NG = {layers}, {heads}, {kv}
hd = sd["model.layers.0.self_attn.q_proj.weight"].shape[1] // H
out = {{"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"], "output_layer.weight": sd["lm_head.weight"],
       "decoder.final_layernorm.weight": sd["model.norm.weight"]}}
for i in range(L):
    p, g = f"model.layers.{{i}}.", f"decoder.layers.{{i}}."
    q, k, v = (sd[p + f"self_attn.{{n}}_proj.weight"] for n in "qkv")
    out[g + "self_attention.linear_qkv.weight"] = torch.cat([q.view(NG, -1, q.shape[1]), k.view(NG, hd, -1), v.view(NG, hd, -1)], 1).reshape(-1, q.shape[1])
    out[g + "self_attention.linear_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
    out[g + "mlp.linear_fc1.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
    out[g + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"]
    out[g + "self_attention.linear_qkv.layer_norm_weight"] = sd[p + "input_layernorm.weight"]
    out[g + "mlp.linear_fc1.layer_norm_weight"] = sd[p + "post_attention_layernorm.weight"]
torch.save({{"model": out, "checkpoint_version": 3.0}}, sys.argv[2])
"""

# The floor of a conversion to Megatron's torch files: torch.save of the very tensors the
# conversion wrote (mapped from its output, so no copy is made before the save), each file
# fsynced, as autotrans does.
SAVE_FLOOR = """
import os, sys, torch
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for f in sorted(src.rglob("*.pt")):
    sd = torch.load(f, mmap=True, weights_only=False)
    out = dst / f.relative_to(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out)
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""


def make_model(folder: Path) -> None:
    """The bench model as an HF folder (one safetensors file + config.json)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shapes = llama_weights(layers=BENCH_LAYERS)
    for i in range(BENCH_LAYERS):  # GQA: 4 query groups of 128-wide heads
        for n in ("k_proj", "v_proj"):
            shapes[f"model.layers.{i}.self_attn.{n}.weight"] = ((KV_HEADS * HIDDEN // HEADS, HIDDEN), "column")
    tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, (s, _) in shapes.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": BENCH_LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
        "max_position_embeddings": 4096}))
    write_tokenizer(folder)


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer of the bench vocabulary (Megatron-LM's loader builds one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def _tree(pid: int) -> list[int]:
    """A process and its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in children.read_text().split()]
            except OSError:
                pass
    return found


def measured(cmd: list[str]) -> tuple[float, float, int, int]:
    """Wall seconds, user + sys seconds, peak RssAnon and peak VmRSS (bytes, summed over
    the process tree) of a command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "VmRSS": 0}

    def sample() -> None:
        while proc.poll() is None:
            now = dict.fromkeys(peak, 0)
            for pid in _tree(proc.pid):
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        key, _, value = line.partition(":")
                        if key in now:
                            now[key] += int(value.split()[0]) * 1024
                except (OSError, ValueError):
                    pass
            for key in peak:
                peak[key] = max(peak[key], now[key])
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    _, err = proc.communicate()
    t.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, peak["RssAnon"], peak["VmRSS"]


def work_folder(doc: str, prefix: str, more_options=None) -> tuple[Path, Path, argparse.Namespace]:
    """The bench's work folder (--keep, else a temporary one), the bench model's HF
    folder in it (built on first use) and the parsed options (`more_options(parser)`
    adds the bench's own)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    if more_options is not None:
        more_options(ap)
    opts = ap.parse_args()
    root = Path(opts.keep or tempfile.mkdtemp(prefix=prefix))
    hf = root / "hf"
    if not (hf / "tokenizer.json").exists():
        make_model(hf)
    return root, hf, opts


def job(path: Path, **keys) -> Path:
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in keys.items()) + "\n")
    return path


def main() -> None:
    root, hf, opts = work_folder(__doc__, "convert_bench_", lambda ap: (
        ap.add_argument("--megatron-lm", help="a Megatron-LM checkout (core_v0.17.1): run its convert.py side by side"),
        ap.add_argument("--megatron-python", default=sys.executable, help="the Python to run convert.py with (needs triton)"),
        ap.add_argument("--runs", type=int, default=5, help="runs of each tool, taking turns (with --megatron-lm)")))
    if opts.megatron_lm:
        versus_megatron_lm(root, hf, opts)
        return
    size = du(hf)
    exe = [sys.executable, "-m", "runner", "run"]
    rows = []
    to_meg = job(root / "to_megatron.yaml", load_checkpoint=str(hf), output_format="megatron", output_dir=str(root / "meg"),
                 parallel_config={"model_parallel": 2, "pipeline_stage": 2})
    to_hf = job(root / "to_hf.yaml", load_checkpoint=str(root / "meg" / "transformed_checkpoint"), output_format="hf",
                reference_hf_dir=str(hf), output_dir=str(root / "back"))
    to_tp4 = job(root / "to_tp4.yaml", load_checkpoint=str(root / "meg" / "transformed_checkpoint"), output_format="megatron",
                 output_dir=str(root / "tp4"), parallel_config={"model_parallel": 4})
    for label, cfg in (("HF -> Megatron TP2 PP2", to_meg), ("Megatron TP2 PP2 -> HF", to_hf), ("Megatron TP2 PP2 -> TP4 PP1", to_tp4)):
        rows.append((label, *measured([*exe, str(cfg), "--no-progress"])))
    rows.insert(1, ("floor: torch.save of the same tensors (TP2 PP2 files)",
                    *measured([sys.executable, "-c", SAVE_FLOOR, str(root / "meg" / "transformed_checkpoint"), str(root / "floor")])))
    naive = root / "naive.py"
    naive.write_text(NAIVE.format(layers=BENCH_LAYERS, heads=HEADS, kv=KV_HEADS))
    rows.append(("naive HF -> Megatron TP1 (load all, torch.save)", *measured([sys.executable, str(naive), str(hf), str(root / "naive.pt")])))
    print(f"model: {size / 1e9:.2f} GB bf16 (hidden {HIDDEN}, {BENCH_LAYERS} layers, ffn {FFN}, vocab {VOCAB}); largest tensor "
          f"{VOCAB * HIDDEN * 2 / 1e6:.0f} MB")
    report(rows, "round trip", hf, root / "back" / "transformed_checkpoint")


def versus_megatron_lm(root: Path, hf: Path, opts: argparse.Namespace) -> None:
    """HF -> Megatron TP2 PP2 (local spec) by autotrans and by Megatron-LM's convert.py,
    taking turns, each run after its output is removed and the page cache synced; then
    the medians and the tensor-by-tensor comparison of the two outputs."""
    ours, theirs = root / "peer_autotrans", root / "peer_megatron_lm"
    cfg = job(root / "peer_autotrans.yaml", load_checkpoint=str(hf), output_format="megatron", transformer_impl="local",
              output_dir=str(ours), parallel_config={"model_parallel": 2, "pipeline_stage": 2})
    launcher = str(Path(__file__).resolve().parent / "megatron_lm_convert.py")
    methods = {
        "autotrans": (ours, [sys.executable, "-m", "runner", "run", str(cfg), "--no-progress"]),
        "Megatron-LM convert.py": (theirs, [opts.megatron_python, launcher, opts.megatron_lm, "--model-type", "GPT",
                                            "--loader", "llama_mistral", "--checkpoint-type", "hf", "--model-size", "llama3",
                                            "--load-dir", str(hf), "--tokenizer-model", str(hf), "--saver", "core",
                                            "--saver-transformer-impl", "local", "--save-dir", str(theirs), "--bf16",
                                            "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]),
    }
    seen: dict[str, list[tuple[float, float, int, int]]] = {name: [] for name in methods}
    for _ in range(opts.runs):
        for name, (out, cmd) in methods.items():
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            seen[name].append(measured(cmd))
    print(f"model: {du(hf) / 1e9:.2f} GB bf16 ({BENCH_LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, {KV_HEADS} query groups), "
          f"HF -> Megatron TP2 PP2, local layer spec; medians of {opts.runs} runs each, taking turns")
    floor = statistics.median(r[0] for r in seen["autotrans"])
    print("| tool | wall s | x (autotrans) | user + sys s | peak RssAnon MB | peak VmRSS MB |\n|---|---:|---:|---:|---:|---:|")
    for name, runs in seen.items():
        wall = statistics.median(r[0] for r in runs)
        print(f"| {name} | {wall:.2f} | {wall / floor:.2f} | {statistics.median(r[1] for r in runs):.2f} | "
              f"{max(r[2] for r in runs) / 1e6:.0f} | {max(r[3] for r in runs) / 1e6:.0f} |")
    for name, runs in seen.items():
        print(f"  {name} wall s of every run: {' '.join(f'{r[0]:.2f}' for r in runs)}")
    print(same_megatron_tensors(ours / "transformed_checkpoint", theirs))


def same_megatron_tensors(a: Path, b: Path) -> str:
    """Whether two Megatron torch checkpoints hold the same files and, in each, the same
    tensor names with bit-identical values and dtypes."""
    import torch

    files_a = {f.parent.name: f for f in a.glob("iter_*/mp_rank_*/model_optim_rng.pt")}
    files_b = {f.parent.name: f for f in b.glob("iter_*/mp_rank_*/model_optim_rng.pt")}
    if set(files_a) != set(files_b):
        return f"different rank files: {sorted(files_a)} vs {sorted(files_b)}"
    count = 0
    for rank, fa in sorted(files_a.items()):
        ta, tb = ({k: v for k, v in torch.load(f, weights_only=False, mmap=True)["model"].items() if isinstance(v, torch.Tensor)}
                  for f in (fa, files_b[rank]))
        if set(ta) != set(tb):
            return f"{rank}: different tensor names: {sorted(set(ta) ^ set(tb))[:4]}"
        differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
        if differ:
            return f"{rank}: {len(differ)} tensors differ, e.g. {differ[0]}"
        count += len(ta)
    return f"outputs: {len(files_a)} rank files, {count} tensors, all bit-identical (names, dtypes, values)"


def report(rows: list[tuple[str, float, float, int, int]], what: str, original: Path, back: Path) -> None:
    """The measured runs as a table, then whether `back` verifies against `original`."""
    check = subprocess.run([sys.executable, "-m", "runner", "verify", str(original), str(back)], capture_output=True, text=True)
    print("| run | time s | user + sys s | peak RssAnon MB | peak VmRSS MB |\n|---|---|---|---|---|")
    for label, t, cpu, anon, rss in rows:
        print(f"| {label} | {t:.1f} | {cpu:.1f} | {anon / 1e6:.0f} | {rss / 1e6:.0f} |")
    print(f"{what}: {check.stdout.strip() or check.stderr.strip()}")


if __name__ == "__main__":
    main()
