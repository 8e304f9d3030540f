#!/usr/bin/env python3
"""GEMM GFLOP/s of numpy (and torch f32 and bf16, if installed) on the shapes of
crates/core/benches/gemm.rs, as the reference peak for saelab's kernel.

Run: python3 bench/gemm_peers.py [--threads 2] [--secs 1.0]
Thread counts are fixed through the BLAS environment variables before numpy loads.
Each cell is the best (median) of repeated runs after one warm-up, like the Rust bench.
"""
import argparse
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--secs", type=float, default=1.0)
args = ap.parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(args.threads)

import numpy as np  # noqa: E402  (after the thread variables)

# (name, m, k, n, b_transposed): b_transposed means B = W.T for a row-major [n, k] W.
SHAPES = [
    ("sae-enc d576 (B row-major)", 2048, 576, 16384, False),
    ("sae-enc d576 (B = W^T)", 2048, 576, 16384, True),
    ("sae-enc d2304 (B row-major)", 2048, 2304, 16384, False),
    ("sae-enc d2304 (B = W^T)", 2048, 2304, 16384, True),
    ("lm q/o proj 576->576", 1024, 576, 576, True),
    ("lm k/v proj 576->192", 1024, 576, 192, True),
    ("lm gate/up 576->1536", 1024, 576, 1536, True),
    ("lm down 1536->576", 1024, 1536, 576, True),
    ("lm head 576->49152", 1024, 576, 49152, True),
    ("attn QK^T 128x64x128", 128, 64, 128, True),
    ("attn PV 128x128x64", 128, 128, 64, False),
]


def time_it(f):
    f()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < args.secs and len(times) < 10000):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[0], times[len(times) // 2]


def cell(flops, t):
    return f"{flops / t[0] / 1e9:7.1f} ({flops / t[1] / 1e9:6.1f})"


def main():
    peers = [("numpy", None)]
    try:
        import torch

        torch.set_num_threads(args.threads)
        peers.append(("torch", torch))
        peers.append(("torch bf16", torch))
    except ImportError:
        torch = None
    cfg = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
    blas = cfg.get("Build Dependencies", {}).get("blas", {}) if isinstance(cfg, dict) else {}
    print(f"numpy {np.__version__} (BLAS: {blas.get('name', '?')} {blas.get('version', '')}), threads={args.threads}"
          + (f"; torch {torch.__version__}" if torch else "; torch not installed"))
    print("GFLOP/s, best (median) of repeated runs")
    print(f"{'shape':<52}" + "".join(f"{p:>17}" for p, _ in peers))
    rng = np.random.default_rng(1)
    for name, m, k, n, bt in SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k) if bt else (k, n), dtype=np.float32)
        b = w.T if bt else w
        c = np.empty((m, n), dtype=np.float32)
        flops = 2.0 * m * n * k
        row = f"{name + f' [{m}x{k}]x[{k}x{n}]':<52}"
        row += f"{cell(flops, time_it(lambda: np.matmul(a, b, out=c))):>17}"
        if torch is not None:
            ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
            row += f"{cell(flops, time_it(lambda: torch.matmul(ta, tb, out=tc))):>17}"
            # bf16 A and B, bf16 output (oneDNN's AMX kernels where the CPU has AMX).
            ha, hb = ta.bfloat16(), tb.bfloat16()
            hc = torch.empty((m, n), dtype=torch.bfloat16)
            row += f"{cell(flops, time_it(lambda: torch.matmul(ha, hb, out=hc))):>17}"
        print(row, flush=True)


if __name__ == "__main__":
    sys.exit(main())
