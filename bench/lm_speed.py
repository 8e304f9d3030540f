#!/usr/bin/env python3
"""PyTorch f32 (or bf16, `--dtype bfloat16`) baseline for the saelab-lm forward benchmark (crates/lm/benches/forward.rs).

Loads the same GGUF with transformers (dequantised to f32), runs the token ids the Rust
bench wrote (8 x 128 Brown-corpus tokens) on 2 threads: the full forward with logits, and
the forward stopped after layer 15 (the layers after it are removed, as an extraction
pipeline would do; no logits).

Requires: pip install torch transformers gguf accelerate
Usage:
  cargo bench -p saelab-lm --bench forward     # writes target/lm_bench_tokens.json
  python3 bench/lm_speed.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf \
      [--tokens target/lm_bench_tokens.json] [--iters 5]
"""
import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def timed(fn, iters):
    """Median wall time and mean process CPU time (all threads) per call. CPU time is
    reported because the benchmark machine is shared with other jobs."""
    fn()
    times = []
    c0 = time.process_time()
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), (time.process_time() - c0) / iters


def report(name, t, n):
    wall, cpu = t
    print(f"{name:42s} {wall * 1e3:8.1f} ms  {n / wall:8.0f} tok/s  | CPU {cpu * 1e3:8.1f} ms/iter  {n / cpu:8.0f} tok/CPU-s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--tokens", default=os.path.join(os.path.dirname(__file__), "..", "target", "lm_bench_tokens.json"))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="bfloat16: the whole model in bf16 (oneDNN's AMX kernels where the CPU has AMX)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d, name = os.path.split(os.path.abspath(args.gguf))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=getattr(torch, args.dtype)).eval()
    ids = torch.tensor(json.load(open(args.tokens)), dtype=torch.long).reshape(8, 128)
    n = ids.numel()
    print(f"torch {torch.__version__}, {args.dtype}, threads {torch.get_num_threads()}, batch 8 x seq 128")

    with torch.inference_mode():
        t = timed(lambda: model(ids, use_cache=False), args.iters)
        report("full forward + logits", t, n)
        # Stop after layer L: keep layers 0..L, run the decoder body only (no norm, no head).
        layers = model.model.layers
        model.model.layers = layers[: args.layer + 1]
        model.config.num_hidden_layers = args.layer + 1
        out = {}

        def grab(mod, a, o):
            out["x"] = o[0] if isinstance(o, tuple) else o

        h = model.model.layers[args.layer].register_forward_hook(grab)
        t = timed(lambda: model.model(ids, use_cache=False), args.iters)
        h.remove()
        model.model.layers = layers
        report(f"extract blocks.{args.layer}.hook_resid_post (stop)", t, n)


if __name__ == "__main__":
    main()
