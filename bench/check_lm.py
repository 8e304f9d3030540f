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
    ap.add_argument("--tiny-gemma2", metavar="DIR", help="also check a random tiny Gemma-2 written to DIR")
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
    ids = torch.tensor(rows, dtype=torch.long)

    layers = [int(x) for x in args.layers.split(",")]
    ref = reference(model, ids, layers, lambda blk: blk.self_attn, lambda blk: blk.mlp)
    ok = compare(args.dump, args.gguf, rows, ref, layers, args.tol) and tok_ok
    print(f"tokenizer identical: {tok_ok}")
    if args.tiny_gemma2:
        ok &= check_tiny_gemma2(args.dump, args.tiny_gemma2, args.tol)
    sys.exit(0 if ok else 1)


KINDS = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"]


def reference(model, ids, layers, attn_out_module, mlp_out_module):
    """Logits and hook activations of a transformers model via forward hooks. attn_out /
    mlp_out are the outputs of the given modules (what is added to the residual)."""
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
        handles.append(attn_out_module(blk).register_forward_hook(attn))
        handles.append(mlp_out_module(blk).register_forward_hook(mlp))
    with torch.no_grad():
        logits = model(ids).logits
    ref["logits"] = logits.reshape(-1, logits.shape[-1]).numpy()
    for h in handles:
        h.remove()
    return ref


def compare(dump, model_path, rows, ref, layers, tol):
    """Run our dump on the same ids and print per-tensor errors; True if all within tol."""
    batch, seq = len(rows), len(rows[0])
    names = [f"blocks.{L}.{k}" for L in layers for k in KINDS]
    with tempfile.TemporaryDirectory() as tmp:
        tj = os.path.join(tmp, "tokens.json")
        with open(tj, "w") as f:
            json.dump([i for r in rows for i in r], f)
        subprocess.check_call([dump, model_path, tmp, tj, str(batch), str(seq), *names])
        worst = 0.0
        for key in ["logits"] + names:
            ours = np.load(os.path.join(tmp, f"{key}.npy"))
            r = ref[key]
            rel = float(np.linalg.norm(ours - r) / np.linalg.norm(r))
            worst = max(worst, rel)
            print(f"{key:28s} rel_err={rel:.2e} max_abs={float(np.abs(ours - r).max()):.2e}")
        ours = np.load(os.path.join(tmp, "logits.npy"))
        agree = float((ours.argmax(-1) == ref["logits"].argmax(-1)).mean())
    print(f"argmax agreement: {agree:.4f}")
    print(f"worst relative error: {worst:.2e} (tolerance {tol:.0e})")
    return worst <= tol


def check_tiny_gemma2(dump, out_dir, tol):
    """A random-weight Gemma-2 (soft-capping, sliding window shorter than the sequence,
    query_pre_attn_scalar != head_dim) saved as safetensors; compare our forward to
    transformers' eager Gemma-2 on it."""
    from tokenizers import Tokenizer, models
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                       query_pre_attn_scalar=24, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                       max_position_embeddings=128, rope_theta=10000.0, attn_implementation="eager")
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms are zero at init: randomise them so (1 + w) matters
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.2)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(300)}
    Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0")).save(os.path.join(out_dir, "tokenizer.json"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (2, 24), generator=g)
    layers = [0, 1, 3]
    ref = reference(model, ids, layers, lambda b: b.post_attention_layernorm,
                    lambda b: b.post_feedforward_layernorm)
    print("tiny Gemma-2 (random weights, safetensors):")
    return compare(dump, out_dir, ids.tolist(), ref, layers, tol)


if __name__ == "__main__":
    main()
