#!/usr/bin/env python3
"""Cross-check saelab-lm's forward against an independent implementation.

The reference is Hugging Face transformers loading the same GGUF file
(AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) dequantises to f32) running in
PyTorch f32. Our side is the `dump` example of crates/lm, which writes logits and hook
activations as .npy for the same token ids.

Requires: pip install torch transformers gguf numpy
Usage:
  cargo build --release -p saelab-lm --example dump
  python3 bench/check_lm.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf \
      --dump target/release/examples/dump [--layers 0,15,29] [--batch 2]

Prints, per tensor, the relative Frobenius error ||ours - ref|| / ||ref|| and the max
absolute difference, plus tokenizer agreement; exits non-zero if any relative error is
above --tol (default 1e-3).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a screw press adapted from wine making. Within "
    "fifty years, presses operated in more than two hundred European cities, and the price of books "
    "fell sharply, which helped spread literacy, scientific ideas and religious debate.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])  # 0 1 1 2 3 5 8 13 21 34\nCafé crème costs 3.50 € — naïve!",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--dump", required=True, help="path to the built dump example binary")
    ap.add_argument("--layers", default="0,7,15,29")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    torch.set_num_threads(2)

    d, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()

    # Tokenizer agreement on the test texts.
    tok_ok = True
    rows = []
    for t in TEXTS:
        ref_ids = tok.encode(t, add_special_tokens=False)
        ours = json.loads(subprocess.check_output([args.dump, args.gguf, "--encode", t]))
        same = ours == ref_ids
        tok_ok &= same
        print(f"tokenizer: {len(ref_ids)} ids, identical={same}")
        rows.append(ref_ids[: args.seq])
    if min(len(r) for r in rows) < args.seq:
        sys.exit(f"texts shorter than --seq {args.seq}")
    batch = len(rows)
    ids = torch.tensor(rows, dtype=torch.long)

    layers = [int(x) for x in args.layers.split(",")]
    kinds = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"]
    ref = {}
    handles = []
    for L in layers:
        blk = model.model.layers[L]

        def pre(mod, a, kw, L=L):
            hs = a[0] if a else kw["hidden_states"]
            ref[f"blocks.{L}.hook_resid_pre"] = hs.detach().reshape(-1, hs.shape[-1]).numpy().copy()

        def post(mod, a, kw, out, L=L):
            o = out[0] if isinstance(out, tuple) else out
            ref[f"blocks.{L}.hook_resid_post"] = o.detach().reshape(-1, o.shape[-1]).numpy().copy()

        def attn(mod, a, out, L=L):
            o = out[0] if isinstance(out, tuple) else out
            ref[f"blocks.{L}.hook_attn_out"] = o.detach().reshape(-1, o.shape[-1]).numpy().copy()

        def mlp(mod, a, out, L=L):
            ref[f"blocks.{L}.hook_mlp_out"] = out.detach().reshape(-1, out.shape[-1]).numpy().copy()

        handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(blk.register_forward_hook(post, with_kwargs=True))
        handles.append(blk.self_attn.register_forward_hook(attn))
        handles.append(blk.mlp.register_forward_hook(mlp))
    with torch.no_grad():
        logits = model(ids).logits.reshape(batch * args.seq, -1).numpy()
    ref["logits"] = logits

    names = [f"blocks.{L}.{k}" for L in layers for k in kinds]
    with tempfile.TemporaryDirectory() as tmp:
        tj = os.path.join(tmp, "tokens.json")
        with open(tj, "w") as f:
            json.dump([i for r in rows for i in r], f)
        subprocess.check_call([args.dump, args.gguf, tmp, tj, str(batch), str(args.seq), *names])
        worst = 0.0
        for key in ["logits"] + names:
            ours = np.load(os.path.join(tmp, f"{key}.npy"))
            r = ref[key]
            rel = float(np.linalg.norm(ours - r) / np.linalg.norm(r))
            worst = max(worst, rel)
            print(f"{key:28s} rel_err={rel:.2e} max_abs={float(np.abs(ours - r).max()):.2e}")
        agree = float((ours_argmax := np.load(os.path.join(tmp, "logits.npy")).argmax(-1)).size and
                      (ours_argmax == logits.argmax(-1)).mean())
    print(f"argmax agreement: {agree:.4f}")
    print(f"worst relative error: {worst:.2e} (tolerance {args.tol:.0e}); tokenizer identical: {tok_ok}")
    if worst > args.tol or not tok_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
