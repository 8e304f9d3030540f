#!/usr/bin/env python3
"""SAELens interoperability check for saelab's SAE folders, in both directions.

1. saelab -> SAELens: every SAE folder (trained here with `saelab train` on a store, or
   given with --sae) is loaded with `sae_lens.SAE.load_from_disk`; its `encode` / `decode`
   on random inputs are compared with a float64 NumPy re-implementation of saelab's
   inference rule (crates/sae/src/model.rs: pre = (x - b_dec?) W_enc + b_enc; standard:
   ReLU; topk: top-k of pre, kept if > 0; jumprelu: pre where pre > threshold and > 0;
   decode = codes W_dec + b_dec), read straight from the safetensors file. Reports the
   max abs differences and the fraction of rows whose active-latent sets are identical.
2. SAELens -> saelab: the SAE loaded by SAELens is written back with `sae.save_model(path)`;
   the tensors are compared with the originals (max abs diff), then `saelab eval --evals
   core` is run on the original folder and on the SAELens-written folder and every
   numeric field of the two result JSONs is compared (same activations, so identical
   numbers mean saelab's loader read the SAELens file exactly as its own). --skip-eval
   skips this part (it runs the language model).

Usage (venv with sae-lens, safetensors):
  python bench/saelens_compat.py --saelab target/release/saelab --store STORE --work /tmp/compat \
      --model /path/SmolLM2-135M-Instruct.Q4_1.gguf [--archs topk,standard,batchtopk] [--json out.json]
  python bench/saelens_compat.py --saelab ... --sae SAE_DIR --work /tmp/compat --model ...
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from safetensors.numpy import load_file

# How each saelab training architecture is saved (SAELens `architecture`).
TRAIN_SETS = {
    "topk": ['architecture="topk"', "k=16"],
    "standard": ['architecture="standard"', "l1_coeff=0.1", "l1_warmup_steps=5"],
    "batchtopk": ['architecture="batchtopk"', "k=16"],
}


def run(cmd, env=None):
    print("+ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-4000:]}")
    return p.stdout


def reference(cfg, w, x):
    """saelab's inference rule in float64 NumPy: (codes [n, F] dense, reconstruction)."""
    x = x.astype(np.float64)
    w_enc, b_enc, w_dec, b_dec = (w[n].astype(np.float64) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    arch = cfg.get("architecture", "standard")
    apply = cfg.get("apply_b_dec_to_input", arch != "jumprelu")
    pre = (x - b_dec if apply else x) @ w_enc + b_enc
    if arch == "standard":
        acts = np.maximum(pre, 0.0)
    elif arch == "topk":
        k = int(cfg["k"])
        idx = np.argpartition(-pre, k - 1, axis=1)[:, :k]
        acts = np.zeros_like(pre)
        rows = np.arange(len(pre))[:, None]
        acts[rows, idx] = np.maximum(pre[rows, idx], 0.0)
    elif arch == "jumprelu":
        th = w["threshold"].astype(np.float64)
        acts = np.where((pre > th) & (pre > 0), pre, 0.0)
    else:
        raise SystemExit(f"architecture {arch!r} not covered by this check")
    return acts, acts @ w_dec + b_dec


def random_inputs(w, d_in, rows, seed):
    """Random rows of two kinds (half each): b_dec + isotropic Gaussian of norm ~12 x the
    mean decoder-row norm, and b_dec + a random sparse combination of 32 decoder rows
    (coefficients |N(0, 1)| * 2 + 2 * max(threshold, 0.25)) + small noise, so that latents
    fire for every architecture, JumpReLU thresholds included."""
    g = np.random.default_rng(seed)
    f = w["W_dec"].shape[0]
    n1 = rows // 2
    scale = float(np.linalg.norm(w["W_dec"], axis=1).mean()) * 12.0
    x1 = w["b_dec"][None, :] + g.standard_normal((n1, d_in)) * scale / np.sqrt(d_in)
    th = float(np.max(w["threshold"])) if "threshold" in w else 0.0
    z = np.zeros((rows - n1, f))
    for r in range(rows - n1):
        idx = g.choice(f, size=min(32, f), replace=False)
        z[r, idx] = np.abs(g.standard_normal(len(idx))) * 2.0 + 2.0 * max(th, 0.25)
    x2 = w["b_dec"][None, :] + z @ w["W_dec"] + 0.1 * g.standard_normal((rows - n1, d_in))
    return np.concatenate([x1, x2]).astype(np.float32)


def numeric_leaves(obj, prefix=""):
    if isinstance(obj, bool):
        return {}
    if isinstance(obj, (int, float)):
        return {prefix: float(obj)}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(numeric_leaves(v, f"{prefix}[{i}]"))
    return out


def load_eval_jsons(d):
    res = {}
    for p in sorted(glob.glob(os.path.join(d, "**", "*.json"), recursive=True)):
        with open(p) as f:
            res[os.path.relpath(p, d)] = json.load(f)
    return res


def check_folder(name, sae_dir, a, x):
    from sae_lens import SAE

    with open(os.path.join(sae_dir, "cfg.json")) as f:
        cfg = json.load(f)
    w = load_file(os.path.join(sae_dir, "sae_weights.safetensors"))
    out = dict(name=name, folder=sae_dir, architecture=cfg.get("architecture"), d_in=cfg["d_in"], d_sae=cfg["d_sae"])

    sae = SAE.load_from_disk(sae_dir, device="cpu")
    out["sae_lens_class"] = type(sae).__name__
    with torch.no_grad():
        xt = torch.from_numpy(x)
        feats = sae.encode(xt).numpy().astype(np.float64)
        recon_sl = sae.decode(sae.encode(xt)).numpy().astype(np.float64)
    ref_acts, ref_recon = reference(cfg, w, x)
    out["random_rows"] = len(x)
    out["encode_max_abs_diff"] = float(np.abs(feats - ref_acts).max())
    out["encode_max_abs_value"] = float(np.abs(ref_acts).max())
    out["decode_max_abs_diff"] = float(np.abs(recon_sl - ref_recon).max())
    out["decode_max_abs_value"] = float(np.abs(ref_recon).max())
    out["active_sets_identical_fraction"] = float(((feats > 0) == (ref_acts > 0)).all(1).mean())
    out["mean_l0_sae_lens"] = float((feats > 0).sum(1).mean())
    out["mean_l0_reference"] = float((ref_acts > 0).sum(1).mean())

    # What SAELens kept of saelab's metadata. SAELens 6 treats a cfg.json without
    # metadata.sae_lens_version as a pre-6.0 config, whose metadata fields are top-level.
    meta = sae.cfg.metadata.to_dict() if hasattr(sae.cfg.metadata, "to_dict") else dict(sae.cfg.metadata)
    out["metadata_after_sae_lens_load"] = {k: v for k, v in meta.items()}
    want_hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    out["hook_name_kept_by_sae_lens"] = meta.get("hook_name") == want_hook
    if want_hook and meta.get("hook_name") != want_hook:
        # A SAELens-trained SAE carries its hook; give the loaded one its hook back so the
        # folder SAELens writes is what a SAELens user would hand to saelab.
        sae.cfg.metadata.hook_name = want_hook
        sae.cfg.metadata.model_name = (cfg.get("metadata") or {}).get("model_name")
        out["hook_name_restored_before_save"] = want_hook

    # SAELens -> disk -> saelab.
    rt = os.path.join(a.work, f"{name}-saved-by-sae_lens")
    if os.path.exists(rt):
        shutil.rmtree(rt)
    sae.save_model(rt)
    w2 = load_file(os.path.join(rt, "sae_weights.safetensors"))
    out["saved_tensors"] = sorted(w2)
    out["saved_tensor_max_abs_diff"] = {
        k: float(np.abs(w2[k].astype(np.float64) - w[k].astype(np.float64)).max()) if k in w2 else None for k in sorted(w)
    }
    with open(os.path.join(rt, "cfg.json")) as f:
        cfg2 = json.load(f)
    out["saved_cfg_architecture"] = cfg2.get("architecture")
    if not a.skip_eval:
        evals = {}
        for tag, d in (("original", sae_dir), ("sae_lens_saved", rt)):
            od = os.path.join(a.work, f"{name}-eval-{tag}")
            if tag == "original" and a.reuse_evals and glob.glob(os.path.join(od, "**", "*.json"), recursive=True):
                evals[tag] = load_eval_jsons(od)
                continue
            if os.path.exists(od):
                shutil.rmtree(od)
            cmd = [a.saelab, "eval", "--sae", d, "--evals", "core", "--model", a.model, "--out", od]
            if a.cache_dir:
                cmd += ["--cache-dir", a.cache_dir]
            run(cmd, env=dict(os.environ, RAYON_NUM_THREADS=str(a.threads)))
            evals[tag] = load_eval_jsons(od)
        la = {f"{f}:{k}": v for f, j in evals["original"].items() for k, v in numeric_leaves(j).items()}
        lb = {f"{f}:{k}": v for f, j in evals["sae_lens_saved"].items() for k, v in numeric_leaves(j).items()}
        common = sorted(set(la) & set(lb))
        # Timing / date fields differ between two runs by nature; everything else must not.
        skip = ("time", "date", "seconds", "elapsed")
        compared = [k for k in common if not any(s in k.lower() for s in skip)]
        diffs = {k: abs(la[k] - lb[k]) for k in compared if not (np.isnan(la[k]) and np.isnan(lb[k]))}
        out["saelab_eval_core"] = dict(
            files=sorted(evals["original"]),
            numeric_fields_compared=len(diffs),
            fields_only_in_one=len(set(la) ^ set(lb)),
            max_abs_diff=max(diffs.values()) if diffs else None,
            differing_fields={k: [la[k], lb[k]] for k, v in diffs.items() if v > 0},
            sample={k: la[k] for k in compared if "explained_variance" in k or "l0" in k.lower() or "mse" in k.lower()},
        )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--saelab", default="target/release/saelab")
    ap.add_argument("--work", required=True)
    ap.add_argument("--sae", action="append", default=[], help="existing saelab SAE folder(s) to check")
    ap.add_argument("--store", help="activation store to train tiny SAEs on (when no --sae)")
    ap.add_argument("--archs", default="topk,standard,batchtopk", help="tiny SAEs to train: " + ",".join(TRAIN_SETS))
    ap.add_argument("--d-sae", type=int, default=1024)
    ap.add_argument("--train-tokens", type=int, default=20480)
    ap.add_argument("--model", default="default", help="model for `saelab eval` (a .gguf path or `default`)")
    ap.add_argument("--hook", default="blocks.14.hook_resid_post", help="hook of --store (written into the tiny SAEs' metadata)")
    ap.add_argument("--cache-dir", help="saelab eval activation cache directory")
    ap.add_argument("--reuse-evals", action="store_true", help="reuse an existing `saelab eval` output of the original folder")
    ap.add_argument("--skip-eval", action="store_true", help="skip the `saelab eval --evals core` round trip")
    ap.add_argument("--rows", type=int, default=512, help="random input rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)

    folders = [(os.path.basename(os.path.normpath(p)), p) for p in a.sae]
    if not folders:
        if not a.store:
            raise SystemExit("give --sae FOLDER or --store STORE")
        for arch in [s.strip() for s in a.archs.split(",") if s.strip()]:
            if arch not in TRAIN_SETS:
                raise SystemExit(f"unknown arch {arch!r}; choose from {', '.join(TRAIN_SETS)}")
            d = os.path.join(a.work, f"tiny-{arch}")
            cmd = [a.saelab, "train", "--store", a.store, "--out", d, "--overwrite"]
            for s in TRAIN_SETS[arch] + [
                f"d_sae={a.d_sae}",
                f"total_tokens={a.train_tokens}",
                "batch_size=1024",
                "warmup_steps=5",
                "threshold_start_step=5",
                "checkpoint_every=0",
                "hist_every=0",
                f'metadata.hook_name="{a.hook}"',
                'metadata.model_name="SmolLM2-135M-Instruct"',
            ]:
                cmd += ["--set", s]
            run(cmd, env=dict(os.environ, RAYON_NUM_THREADS=str(a.threads)))
            folders.append((f"tiny-{arch}", d))

    results = dict(command=" ".join(sys.argv), checks=[])
    import sae_lens

    results["sae_lens"] = getattr(sae_lens, "__version__", "?")
    for name, d in folders:
        with open(os.path.join(d, "cfg.json")) as f:
            d_in = int(json.load(f)["d_in"])
        w = load_file(os.path.join(d, "sae_weights.safetensors"))
        x = random_inputs(w, d_in, a.rows, a.seed)
        r = check_folder(name, d, a, x)
        print(json.dumps(r, indent=1), flush=True)
        results["checks"].append(r)
    print("\n| SAE | architecture | SAELens class | encode max abs diff | decode max abs diff | same active sets | L0 | saved tensors max abs diff | saelab eval core: fields equal |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for r in results["checks"]:
        st = max(v for v in r["saved_tensor_max_abs_diff"].values() if v is not None)
        ev = r.get("saelab_eval_core")
        evs = "skipped" if ev is None else f"{ev['numeric_fields_compared'] - len(ev['differing_fields'])}/{ev['numeric_fields_compared']} (max abs diff {ev['max_abs_diff']:.3g})"
        print(
            f"| {r['name']} | {r['architecture']} | {r['sae_lens_class']} | {r['encode_max_abs_diff']:.3g} | "
            f"{r['decode_max_abs_diff']:.3g} | {r['active_sets_identical_fraction']:.4f} | {r['mean_l0_reference']:.1f} | {st:.3g} | {evs} |"
        )
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
