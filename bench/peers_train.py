#!/usr/bin/env python3
"""Train the same SAE with saelab and with its Python peers on the same activations, and
compare training speed and held-out quality with one evaluation routine.

Peers (PyTorch, CPU, f32, `torch.set_num_threads(--threads)`):
  dl_topk        dictionary_learning 0.1.0 `TopKTrainer` + `AutoEncoderTopK`; each step is
                 one call of `trainer.update(step, x)` (forward, AuxK bookkeeping, backward,
                 parallel-gradient removal, grad-norm clip 1.0, Adam, LR schedule,
                 decoder renormalisation; step 0 also computes the geometric median b_dec).
  sparsify       EleutherAI sparsify 1.3.3 `SparseCoder` (fused TopK encoder with its sparse
                 backward, embedding_bag decoder since SPARSIFY_DISABLE_TRITON=1) driven by
                 a minimal loop copying the SAE part of `sparsify.trainer.Trainer.fit`:
                 b_dec = batch mean at step 0, decoder renormalisation before the forward,
                 dead mask from tokens-since-fired, `fvu + auxk_alpha * auxk` loss with the
                 batch's total variance, backward, `remove_gradient_parallel_to_decoder_
                 directions`, `torch.optim.Adam` (the fallback sparsify itself uses without
                 bitsandbytes), LR scheduler, tokens-since-fired update. The language-model
                 forward and hook plumbing of `fit` are not part of it (activations are
                 cached here).
  sparsify_bf16  the same loop with the forward under `torch.autocast("cpu", bfloat16)`.
  dl_standard    dictionary_learning `StandardTrainer` + `AutoEncoder` (ReLU + L1).
  saelab         `saelab train` run as a subprocess on a store holding only the training
                 rows; its own printed tokens/s (training loop incl. its batch reads from the
                 memory-mapped store, excl. start-up and the final save) is reported, plus the
                 subprocess wall time and CPU time.
  saelab_bf16    the same with `encoder_precision="bf16"`: TopK latents selected from bf16
                 products (AMX tiles where the CPU has them), chosen values recomputed in f32.
  saelab_standard_bf16  the standard SAE with `dense_precision="bf16"` (dense GEMMs as
                 bf16 products with f32 sums).

Common settings: the same training rows, the same number of tokens (steps x batch), Adam
(0.9, 0.999), LR = 2e-4 / sqrt(F / 2^14) for TopK (1e-3 for standard), linear warm-up of
--warmup steps then constant (no decay), unit-norm decoder, AuxK 1/32 with a dead threshold
of 10M tokens (never reached in short runs), no activation normalisation, seed --seed.

Speed: for Python peers, every step is timed with perf_counter around the update only
("step" tokens/s), and separately the batch gather from the in-RAM training tensor
("loop" tokens/s = tokens / (update + gather time)); CPU time (process_time) is also
reported because the machine may be shared. The headline comparison uses "loop" for the
peers and saelab's own tokens/s (both: all steps, incl. step 0 and the data reads).

Quality (same Python code for every SAE, on the held-out last --holdout fraction of rows of
the store, never trained on): FVE = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (sums in
f64), L0 = mean number of nonzero latents per row, dead fraction = latents that never fire
on the held-out rows.

--synthetic D (speed only): random Gaussian activations with a low-rank structure (rank
64 signal + isotropic noise) of width D, written as a saelab store so saelab reads the same
rows; no quality numbers are reported for it.

Usage (venv with torch, dictionary-learning, eai-sparsify, safetensors, xxhash):
  SPARSIFY_DISABLE_TRITON=1 python bench/peers_train.py --store STORE --saelab target/release/saelab \
      --work /tmp/peers --tokens 204800 --d-sae 16384 --k 40 --batch 2048 --warmup 10 \
      --peers saelab,dl_topk,sparsify --json out.json --md out.md
"""
import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

TOPK_PEERS = ("dl_topk", "sparsify", "sparsify_bf16", "saelab", "saelab_bf16")
STANDARD_PEERS = ("dl_standard", "saelab_standard", "saelab_standard_bf16")
ALL_PEERS = TOPK_PEERS + STANDARD_PEERS


# --------------------------------------------------------------------------------------
# saelab activation store (see crates/data/src/store.rs): manifest.json + raw shards.
# --------------------------------------------------------------------------------------


class Store:
    """Read-only view of a saelab activation store via numpy memory maps."""

    def __init__(self, path):
        self.path = path
        mpath = os.path.join(path, "manifest.json")
        try:
            with open(mpath) as f:
                self.manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"cannot read activation store manifest {mpath}: {e}")
        m = self.manifest
        if m.get("format") != "saelab-activations":
            raise SystemExit(f"{mpath}: format {m.get('format')!r} is not 'saelab-activations'")
        self.d = int(m["d_model"])
        self.dtype = m["dtype"]
        np_dtype = {"f32": np.float32, "bf16": np.uint16, "f16": np.float16}.get(self.dtype)
        if np_dtype is None:
            raise SystemExit(f"{mpath}: unknown dtype {self.dtype!r}")
        self.shards = []
        self.starts = [0]
        for s in m["shards"]:
            p = os.path.join(path, s["file"])
            rows = int(s["rows"])
            want = rows * self.d * np.dtype(np_dtype).itemsize
            have = os.path.getsize(p) if os.path.exists(p) else -1
            if have != want:
                raise SystemExit(f"{p}: {have} bytes, manifest says {rows} rows ({want} bytes)")
            self.shards.append(np.memmap(p, dtype=np_dtype, mode="r", shape=(rows, self.d)))
            self.starts.append(self.starts[-1] + rows)
        self.rows = self.starts[-1]

    def _decode(self, a):
        if self.dtype == "bf16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)

    def read(self, start, end):
        """Rows [start, end) as a fresh float32 array."""
        out = np.empty((end - start, self.d), dtype=np.float32)
        pos = start
        for i, sh in enumerate(self.shards):
            lo, hi = self.starts[i], self.starts[i + 1]
            if hi <= pos or lo >= end:
                continue
            a, b = max(pos, lo), min(end, hi)
            out[a - start : b - start] = self._decode(sh[a - lo : b - lo])
            pos = b
        return out


def _xxh64_hex(data):
    import xxhash

    return format(xxhash.xxh64(data, seed=0).intdigest(), "016x")


def _write_file(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_train_split(src, dst, n_train):
    """A store in `dst` holding rows [0, n_train) of `src`: complete shards are symlinked,
    the boundary shard is rewritten truncated (with its own checksums)."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    m = json.loads(json.dumps(src.manifest))
    shards = []
    last_end_position = 0
    for i, s in enumerate(src.manifest["shards"]):
        lo, hi = src.starts[i], src.starts[i + 1]
        if lo >= n_train:
            break
        files = (s["file"], s["tokens_file"], s["positions_file"])
        if hi <= n_train:
            for fn in files:
                os.symlink(os.path.abspath(os.path.join(src.path, fn)), os.path.join(dst, fn))
            shards.append(dict(s))
            last_end_position = int(s["end_position"])
            continue
        keep = n_train - lo
        row_bytes = src.d * (4 if src.dtype == "f32" else 2)
        with open(os.path.join(src.path, s["file"]), "rb") as f:
            act = f.read(keep * row_bytes)
        with open(os.path.join(src.path, s["tokens_file"]), "rb") as f:
            tok = f.read(keep * 4)
        with open(os.path.join(src.path, s["positions_file"]), "rb") as f:
            pos = f.read(keep * 8)
        for fn, data in zip(files, (act, tok, pos)):
            _write_file(os.path.join(dst, fn), data)
        t = dict(s)
        t.update(
            rows=keep,
            xxh64=_xxh64_hex(act),
            tokens_xxh64=_xxh64_hex(tok),
            positions_xxh64=_xxh64_hex(pos),
            end_position=int(np.frombuffer(pos, dtype="<u8")[-1]) + 1,
        )
        shards.append(t)
        last_end_position = t["end_position"]
    m["shards"] = shards
    m["total_rows"] = n_train
    m["positions"] = last_end_position
    m["complete"] = True
    m.setdefault("source", {})
    if isinstance(m["source"], dict):
        m["source"]["peers_train_split"] = f"rows [0, {n_train}) of {os.path.abspath(src.path)}"
    _write_file(os.path.join(dst, "manifest.json"), json.dumps(m, indent=2).encode())


def synthetic_rows(n, d, rank, seed):
    """Low-rank Gaussian activations: z @ A (rank `rank`, per-direction scales decaying
    like 1/sqrt(i)) + 0.1-scaled isotropic noise + a fixed offset. Speed tests only."""
    g = np.random.default_rng(seed)
    a = g.standard_normal((rank, d)).astype(np.float32) / math.sqrt(d)
    scales = (1.0 / np.sqrt(np.arange(1, rank + 1))).astype(np.float32)
    offset = g.standard_normal(d).astype(np.float32) * 0.5
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 8192):
        e = min(n, s + 8192)
        z = g.standard_normal((e - s, rank)).astype(np.float32) * scales
        out[s:e] = z @ a * math.sqrt(d) + 0.1 * g.standard_normal((e - s, d)).astype(np.float32) + offset
    return out


def write_synthetic_store(dst, x, shard_rows=1 << 16):
    """Write `x` (float32 rows) as a saelab store (same layout as `saelab cache`)."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    n, d = x.shape
    shards = []
    for i, s in enumerate(range(0, n, shard_rows)):
        e = min(n, s + shard_rows)
        act = np.ascontiguousarray(x[s:e], dtype="<f4").tobytes()
        tok = np.zeros(e - s, dtype="<u4").tobytes()
        pos = np.arange(s, e, dtype="<u8").tobytes()
        names = (f"shard-{i:05d}.act", f"tokens-{i:05d}.u32", f"positions-{i:05d}.u64")
        for fn, data in zip(names, (act, tok, pos)):
            _write_file(os.path.join(dst, fn), data)
        shards.append(
            dict(
                file=names[0],
                tokens_file=names[1],
                rows=e - s,
                xxh64=_xxh64_hex(act),
                tokens_xxh64=_xxh64_hex(tok),
                positions_file=names[2],
                positions_xxh64=_xxh64_hex(pos),
                end_position=e,
            )
        )
    m = dict(
        format="saelab-activations",
        version=1,
        model="synthetic-low-rank-gaussian",
        hook="synthetic",
        d_model=d,
        dtype="f32",
        ctx_len=128,
        shard_rows=shard_rows,
        total_rows=n,
        positions=n,
        complete=True,
        filters=dict(
            dropped_token_ids=[],
            norm_outlier_factor=None,
            norm_median=None,
            dropped_special=0,
            dropped_outliers=0,
            skipped_padding=0,
        ),
        source=dict(generator="bench/peers_train.py synthetic_rows"),
        shards=shards,
    )
    _write_file(os.path.join(dst, "manifest.json"), json.dumps(m, indent=2).encode())


# --------------------------------------------------------------------------------------
# Evaluation: one routine for every SAE, from plain weight tensors.
# --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(p, x_eval, chunk=2048):
    """p: dict(W_enc [d,F], b_enc [F], W_dec [F,d], b_dec [d], kind 'topk'|'relu'|'jumprelu',
    k, threshold [F] or None, apply_b_dec_to_input bool)."""
    w_enc, b_enc, w_dec, b_dec = (p[n].float() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    n, d = x_eval.shape
    f = w_enc.shape[1]
    mean = x_eval.double().mean(0)
    sse = 0.0
    sst = 0.0
    l0 = 0.0
    fired = torch.zeros(f, dtype=torch.bool)
    for s in range(0, n, chunk):
        x = x_eval[s : s + chunk]
        xin = x - b_dec if p["apply_b_dec_to_input"] else x
        pre = xin @ w_enc + b_enc
        if p["kind"] == "topk":
            v, i = torch.relu(pre).topk(p["k"], dim=-1)
            acts = torch.zeros_like(pre).scatter_(-1, i, v)
        elif p["kind"] == "relu":
            acts = torch.relu(pre)
        elif p["kind"] == "jumprelu":
            acts = torch.relu(pre) * (pre > p["threshold"])
        else:
            raise ValueError(p["kind"])
        x_hat = acts @ w_dec + b_dec
        nz = acts > 0
        l0 += float(nz.sum())
        fired |= nz.any(0)
        sse += float((x - x_hat).double().pow(2).sum())
        sst += float((x.double() - mean).pow(2).sum())
    return dict(
        fve=1.0 - sse / sst,
        mse_per_row=sse / n,
        l0=l0 / n,
        dead_fraction=float((~fired).sum()) / f,
        eval_rows=n,
    )


def saelab_params(out_dir):
    from safetensors.numpy import load_file

    with open(os.path.join(out_dir, "cfg.json")) as f:
        cfg = json.load(f)
    t = {k: torch.from_numpy(v.astype(np.float32)) for k, v in load_file(os.path.join(out_dir, "sae_weights.safetensors")).items()}
    arch = cfg.get("architecture", "standard")
    kind = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu"}.get(arch)
    if kind is None:
        raise SystemExit(f"{out_dir}/cfg.json: architecture {arch!r} not handled by this benchmark")
    k = cfg.get("k")
    if k is None and isinstance(cfg.get("activation_fn_kwargs"), dict):
        k = cfg["activation_fn_kwargs"].get("k")
    return dict(
        W_enc=t["W_enc"],
        b_enc=t["b_enc"],
        W_dec=t["W_dec"],
        b_dec=t["b_dec"],
        kind=kind,
        k=int(k) if k is not None else None,
        threshold=t.get("threshold"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", kind != "jumprelu")),
    )


# --------------------------------------------------------------------------------------
# Training loops.
# --------------------------------------------------------------------------------------


class Batches:
    """Shuffled batches of the in-RAM training tensor; a fresh permutation per epoch."""

    def __init__(self, x, batch, seed):
        self.x = x
        self.batch = batch
        self.g = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(len(x), generator=self.g)
        self.pos = 0

    def next(self):
        if self.pos + self.batch > len(self.x):
            self.perm = torch.randperm(len(self.x), generator=self.g)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return self.x.index_select(0, idx)


def timed_loop(steps, batches, update, profile=False):
    """Run `update(step, x)` for every step; time the update and the batch gather apart.
    With `profile`, step 1 runs under torch.profiler (its top operators are returned; the
    profiler's overhead is then part of that step's time)."""
    t_step = []
    t_gather = 0.0
    top_ops = None
    c0 = time.process_time()
    w0 = time.perf_counter()
    last = None
    for step in range(steps):
        t = time.perf_counter()
        x = batches.next()
        t_gather += time.perf_counter() - t
        if profile and step == 1:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as tprofile

            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                last = update(step, x)
                t_step.append(time.perf_counter() - t)
            ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
            top_ops = [dict(op=e.key, self_cpu_s=e.self_cpu_time_total / 1e6, calls=e.count) for e in ev]
            continue
        t = time.perf_counter()
        last = update(step, x)
        t_step.append(time.perf_counter() - t)
    wall = time.perf_counter() - w0
    cpu = time.process_time() - c0
    tokens = steps * batches.batch
    # Steady state: without step 0 (geometric-median / mean b_dec initialisation).
    steady = t_step[1:] if len(t_step) > 1 else t_step
    return dict(
        profile_step1_top_ops=top_ops,
        steps=steps,
        tokens=tokens,
        step_seconds=sum(t_step),
        gather_seconds=t_gather,
        loop_wall_seconds=wall,
        cpu_seconds=cpu,
        tokens_per_s_step=tokens / sum(t_step),
        tokens_per_s_loop=tokens / (sum(t_step) + t_gather),
        tokens_per_s_steady_step=len(steady) * batches.batch / sum(steady),
        median_step_ms=float(np.median(t_step)) * 1e3,
        first_step_ms=t_step[0] * 1e3,
        tokens_per_cpu_s=tokens / cpu,
        last_loss=float(last) if last is not None else None,
    )


def topk_lr(f):
    return 2e-4 / math.sqrt(f / 2**14)


def train_dl_topk(x_train, a, steps):
    from dictionary_learning.trainers.top_k import TopKTrainer

    torch.manual_seed(a.seed)
    tr = TopKTrainer(
        steps=steps,
        activation_dim=x_train.shape[1],
        dict_size=a.d_sae,
        k=a.k,
        layer=14,
        lm_name="SmolLM2-135M-Instruct",
        lr=topk_lr(a.d_sae),
        auxk_alpha=1 / 32,
        warmup_steps=a.warmup,
        decay_start=None,
        seed=a.seed,
        device="cpu",
    )
    timing = timed_loop(steps, Batches(x_train, a.batch, a.seed), tr.update, a.profile)
    ae = tr.ae
    params = dict(
        W_enc=ae.encoder.weight.detach().T.contiguous(),
        b_enc=ae.encoder.bias.detach(),
        W_dec=ae.decoder.weight.detach().T.contiguous(),
        b_dec=ae.b_dec.detach(),
        kind="topk",
        k=a.k,
        threshold=None,
        apply_b_dec_to_input=True,
    )
    return timing, params


def train_dl_standard(x_train, a, steps):
    from dictionary_learning.trainers.standard import StandardTrainer

    torch.manual_seed(a.seed)
    tr = StandardTrainer(
        steps=steps,
        activation_dim=x_train.shape[1],
        dict_size=a.d_sae,
        layer=14,
        lm_name="SmolLM2-135M-Instruct",
        lr=1e-3,
        l1_penalty=a.l1_coeff,
        warmup_steps=a.warmup,
        sparsity_warmup_steps=a.l1_warmup,
        decay_start=None,
        seed=a.seed,
        device="cpu",
    )
    timing = timed_loop(steps, Batches(x_train, a.batch, a.seed), tr.update, a.profile)
    ae = tr.ae
    params = dict(
        W_enc=ae.encoder.weight.detach().T.contiguous(),
        b_enc=ae.encoder.bias.detach(),
        W_dec=ae.decoder.weight.detach().T.contiguous(),
        b_dec=ae.bias.detach(),
        kind="relu",
        k=None,
        threshold=None,
        apply_b_dec_to_input=True,
    )
    return timing, params


def train_sparsify(x_train, a, steps, bf16):
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    torch.manual_seed(a.seed)
    d = x_train.shape[1]
    sae = SparseCoder(d, SparseCoderConfig(num_latents=a.d_sae, k=a.k), device="cpu", dtype=torch.float32)
    adam = torch.optim.Adam(sae.parameters(), lr=topk_lr(a.d_sae), betas=(0.9, 0.999))
    # Linear warm-up then constant, like the other two (sparsify's own trainer decays
    # linearly to 0 over the run: --sparsify-own-schedule).
    if a.sparsify_own_schedule:
        from transformers import get_linear_schedule_with_warmup

        sched = get_linear_schedule_with_warmup(adam, a.warmup, steps)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(adam, lambda s: min(1.0, (s + 1) / a.warmup) if a.warmup > 0 else 1.0)
    auxk_alpha = 1 / 32
    dead_threshold = 10_000_000
    since_fired = torch.zeros(a.d_sae, dtype=torch.long)
    did_fire = torch.zeros(a.d_sae, dtype=torch.bool)

    def update(step, x):
        if step == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > dead_threshold
        total_variance = (x - x.mean(0)).pow(2).sum()
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        else:
            out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + auxk_alpha * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        adam.step()
        adam.zero_grad()
        sched.step()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()
        return loss.item()

    timing = timed_loop(steps, Batches(x_train, a.batch, a.seed), update, a.profile)
    params = dict(
        W_enc=sae.encoder.weight.detach().T.contiguous(),
        b_enc=sae.encoder.bias.detach(),
        W_dec=sae.W_dec.detach(),
        b_dec=sae.b_dec.detach(),
        kind="topk",
        k=a.k,
        threshold=None,
        apply_b_dec_to_input=True,
    )
    return timing, params


def run_saelab(train_store, out_dir, a, steps, standard, bf16=False):
    sets = [
        f"d_sae={a.d_sae}",
        f"total_tokens={steps * a.batch}",
        f"batch_size={a.batch}",
        f"warmup_steps={a.warmup}",
        f"seed={a.seed}",
        "checkpoint_every=0",
        "hist_every=0",
    ]
    if standard:
        # dictionary_learning's AutoEncoder starts b_dec at zero (saelab's default is the
        # geometric median of the first batch, as for TopK): match it.
        sets += [
            'architecture="standard"',
            f"l1_coeff={a.l1_coeff}",
            f"l1_warmup_steps={a.l1_warmup}",
            "lr=0.001",
            'b_dec_init="zeros"',
        ]
        if bf16:
            # The dense GEMMs as bf16 products with f32 sums (AMX where available).
            sets += ['dense_precision="bf16"']
    else:
        sets += ['architecture="topk"', f"k={a.k}", f"lr={topk_lr(a.d_sae)}"]
        if bf16:
            # Latents selected from bf16 products (AMX tiles where the CPU has them), the
            # chosen values recomputed in f32.
            sets += ['encoder_precision="bf16"']
    cmd = [a.saelab, "train", "--store", train_store, "--out", out_dir, "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    print("+ RAYON_NUM_THREADS=%d %s" % (a.threads, " ".join(cmd)), flush=True)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - w0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"saelab train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if "tokens/s" in ln]
    if not line:
        raise SystemExit(f"saelab train printed no tokens/s line:\n{proc.stdout}")
    print("  saelab: " + line[-1], flush=True)
    # "<dir>: S steps, T tokens, W s (R tokens/s)"
    text = line[-1].rsplit(": ", 1)[-1] if ": " in line[-1] else line[-1]
    parts = text.replace("(", "").replace(")", "").replace(",", "").split()
    steps, tokens, tps = int(parts[0]), int(parts[2]), float(parts[6])
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    timing = dict(
        steps=steps,
        tokens=tokens,
        loop_wall_seconds=tokens / tps,
        tokens_per_s_loop=tps,
        subprocess_wall_seconds=wall,
        cpu_seconds=cpu,
        tokens_per_cpu_s=tokens / cpu,
        printed=line[-1],
    )
    return timing, saelab_params(out_dir)


# --------------------------------------------------------------------------------------


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(res):
    lines = []
    for group, names in (("TopK", TOPK_PEERS), ("ReLU + L1 (standard)", STANDARD_PEERS)):
        rows = [(n, res["runs"][n]) for n in names if n in res["runs"]]
        if not rows:
            continue
        lines.append(f"**{group}**, d_in {res['d_in']}, F {res['d_sae']}, B {res['batch']}:\n")
        lines.append(
            "| trainer | steps | tokens/s (loop) | tokens/s (update only) | tokens/s (update, excl. step 0) "
            "| tokens/CPU-s | FVE (held-out) | L0 | dead frac |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, r in rows:
            t, q = r["timing"], r.get("quality") or {}
            lines.append(
                f"| {n} | {t['steps']} | {fmt(t.get('tokens_per_s_loop'), '.0f')} | {fmt(t.get('tokens_per_s_step'), '.0f')} | "
                f"{fmt(t.get('tokens_per_s_steady_step'), '.0f')} | "
                f"{fmt(t.get('tokens_per_cpu_s'), '.0f')} | {fmt(q.get('fve'), '.4f')} | {fmt(q.get('l0'), '.1f')} | "
                f"{fmt(q.get('dead_fraction'), '.4f')} |"
            )
        lines.append("")
    for k, v in res.get("ratios", {}).items():
        lines.append(f"- {k}: {v:.3f}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", help="saelab activation store (from `saelab cache`)")
    ap.add_argument("--synthetic", type=int, default=0, metavar="D", help="speed only: synthetic low-rank Gaussian rows of width D")
    ap.add_argument("--saelab", default="target/release/saelab", help="saelab binary")
    ap.add_argument("--work", required=True, help="scratch directory (split store, saelab outputs)")
    ap.add_argument("--peers", default="saelab,dl_topk,sparsify", help="comma list of " + ",".join(ALL_PEERS))
    ap.add_argument("--holdout", type=float, default=0.1, help="fraction of the store's last rows held out")
    ap.add_argument("--max-eval-rows", type=int, default=0, help="cap the held-out rows evaluated (0 = all)")
    ap.add_argument("--tokens", type=int, default=204800)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=40)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--l1-coeff", type=float, default=0.1, help="standard SAE L1 coefficient (both trainers)")
    ap.add_argument("--l1-warmup", type=int, default=10, help="standard SAE L1 warm-up steps (both trainers)")
    ap.add_argument("--sparsify-own-schedule", action="store_true", help="sparsify: linear decay to 0 as its trainer")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps-for", action="append", default=[], metavar="PEER=STEPS", help="speed runs: train PEER for STEPS steps instead of tokens/batch (then its quality is not comparable; use --no-eval)")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation (speed runs)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler on step 1 of the Python peers (top operators into the JSON)")
    ap.add_argument("--json", help="write results JSON here")
    ap.add_argument("--md", help="write the markdown table here")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    peers = [p.strip() for p in a.peers.split(",") if p.strip()]
    for p in peers:
        if p not in ALL_PEERS:
            raise SystemExit(f"unknown peer {p!r}; choose from {', '.join(ALL_PEERS)}")
    os.makedirs(a.work, exist_ok=True)
    steps_for = {}
    for item in a.steps_for:
        name, _, v = item.partition("=")
        if name not in ALL_PEERS or not v.isdigit() or int(v) < 1:
            raise SystemExit(f"--steps-for {item!r}: expected PEER=STEPS with PEER in {', '.join(ALL_PEERS)}")
        steps_for[name] = int(v)
    if a.tokens % a.batch:
        raise SystemExit("--tokens must be a multiple of --batch")

    if a.synthetic:
        x_train_np = synthetic_rows(a.tokens, a.synthetic, 64, a.seed)
        x_eval = None
        train_store = os.path.join(a.work, f"synthetic-{a.synthetic}")
        if any(p.startswith("saelab") for p in peers):
            write_synthetic_store(train_store, x_train_np)
        source = f"synthetic low-rank Gaussian, d {a.synthetic}, {a.tokens} rows (speed only)"
    else:
        if not a.store:
            raise SystemExit("--store or --synthetic is required")
        st = Store(a.store)
        n_eval = int(round(st.rows * a.holdout))
        n_train = st.rows - n_eval
        if n_train < a.batch or n_eval < 1:
            raise SystemExit(f"{a.store}: {st.rows} rows are too few for a {a.holdout} hold-out")
        t = time.perf_counter()
        x_train_np = st.read(0, n_train)
        e0 = n_train if not a.max_eval_rows else max(n_train, st.rows - a.max_eval_rows)
        x_eval = torch.from_numpy(st.read(e0, st.rows))
        print(f"loaded {n_train} train + {len(x_eval)} held-out rows of d {st.d} in {time.perf_counter() - t:.1f} s", flush=True)
        train_store = os.path.join(a.work, "train-split")
        if any(p.startswith("saelab") for p in peers):
            write_train_split(st, train_store, n_train)
        source = f"{os.path.abspath(a.store)} ({st.manifest.get('model')}, {st.manifest.get('hook')}): train rows [0, {n_train}), held-out rows [{e0}, {st.rows})"
        if n_train < a.tokens:
            print(f"note: {a.tokens} tokens > {n_train} training rows: every trainer loops over them", flush=True)
    x_train = torch.from_numpy(x_train_np)
    d_in = x_train.shape[1]

    res = dict(
        source=source,
        d_in=d_in,
        d_sae=a.d_sae,
        k=a.k,
        batch=a.batch,
        tokens=a.tokens,
        warmup=a.warmup,
        threads=a.threads,
        torch=torch.__version__,
        speed_only=bool(a.synthetic),
        steps_for=steps_for,
        command=" ".join(sys.argv),
        runs={},
    )
    for p in peers:
        steps = steps_for.get(p, a.tokens // a.batch)
        print(f"== {p}: {steps} steps", flush=True)
        if p == "dl_topk":
            timing, params = train_dl_topk(x_train, a, steps)
        elif p == "dl_standard":
            timing, params = train_dl_standard(x_train, a, steps)
        elif p in ("sparsify", "sparsify_bf16"):
            timing, params = train_sparsify(x_train, a, steps, bf16=p.endswith("bf16"))
        else:
            timing, params = run_saelab(train_store, os.path.join(a.work, p), a, steps,
                                        standard=p.startswith("saelab_standard"), bf16=p.endswith("bf16"))
        quality = evaluate(params, x_eval) if x_eval is not None and not a.no_eval else None
        res["runs"][p] = dict(timing=timing, quality=quality)
        print(json.dumps(res["runs"][p]), flush=True)
        del params
        write_outputs(res, a)  # after every run, so an interrupted benchmark keeps its results

    ratios = {}
    for group, ours in ((TOPK_PEERS, "saelab"), (TOPK_PEERS, "saelab_bf16"), (STANDARD_PEERS, "saelab_standard"),
                         (STANDARD_PEERS, "saelab_standard_bf16")):
        if ours not in res["runs"]:
            continue
        others = [n for n in group if not n.startswith("saelab") and n in res["runs"]]
        if not others:
            continue
        best = max(others, key=lambda n: res["runs"][n]["timing"]["tokens_per_s_loop"])
        ratios[f"{ours} tokens/s / best peer ({best}) tokens/s (loop)"] = (
            res["runs"][ours]["timing"]["tokens_per_s_loop"] / res["runs"][best]["timing"]["tokens_per_s_loop"]
        )
        best_cpu = max(others, key=lambda n: res["runs"][n]["timing"]["tokens_per_cpu_s"])
        ratios[f"{ours} tokens/CPU-s / best peer ({best_cpu})"] = (
            res["runs"][ours]["timing"]["tokens_per_cpu_s"] / res["runs"][best_cpu]["timing"]["tokens_per_cpu_s"]
        )
        if all(res["runs"][n]["quality"] for n in others + [ours]):
            bq = max(others, key=lambda n: res["runs"][n]["quality"]["fve"])
            ratios[f"{ours} FVE / best peer FVE ({bq})"] = res["runs"][ours]["quality"]["fve"] / res["runs"][bq]["quality"]["fve"]
    res["ratios"] = ratios
    print(markdown(res))
    write_outputs(res, a)


def write_outputs(res, a):
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(res, f, indent=2)
        os.replace(a.json + ".tmp", a.json)
    if a.md:
        with open(a.md + ".tmp", "w") as f:
            f.write(markdown(res))
        os.replace(a.md + ".tmp", a.md)


if __name__ == "__main__":
    main()
