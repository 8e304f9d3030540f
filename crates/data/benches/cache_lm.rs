//! Activation caching throughput with the default model (SmolLM2-135M, Q4_1 GGUF).
//!
//! `cargo bench -p saelab-data --bench cache_lm -- [tokens] [layer]` (defaults 16384 tokens,
//! layer 3 resid_post, corpus `default`, ctx 128, 8 rows per forward, bf16). Prints tokens/s
//! and what the filters dropped.

use saelab_data::cache::{cache_activations, CacheOptions};
use saelab_data::corpus::load_corpus;
use saelab_data::store::Dtype;
use saelab_lm::{HookKind, HookPoint, Hooks, Model};
use std::time::Instant;

fn main() {
    // As `saelab` runs (see saelab_core::malloc); SAELAB_SYSTEM_MALLOC=1 for glibc's default.
    saelab_core::malloc::keep_freed_memory();
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let tokens = args.first().copied().unwrap_or(16384);
    let layer = args.get(1).copied().unwrap_or(3) as usize;
    let model = Model::load(&saelab_core::assets::ensure_model().unwrap()).unwrap();
    let t = Instant::now();
    let ds = load_corpus("default").unwrap();
    println!(
        "corpus default: {} documents, {} bytes, loaded in {:.2} s",
        ds.len(),
        ds.total_bytes(),
        t.elapsed().as_secs_f64()
    );
    let dir = std::env::temp_dir().join(format!("saelab-bench-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = CacheOptions {
        tokens,
        dtype: Dtype::Bf16,
        progress: true,
        ..CacheOptions::new(HookPoint::new(layer, HookKind::ResidPost))
    };
    let t = Instant::now();
    let m = cache_activations(&model, &ds, &opts, &dir).unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "cached {} positions at {} in {secs:.2} s: {:.0} tokens/s ({} rayon threads)",
        m.positions,
        m.hook,
        m.positions as f64 / secs,
        rayon::current_num_threads()
    );
    println!(
        "stored {} rows; dropped {} special, {} norm outliers (> {} x median {:.3})",
        m.total_rows,
        m.filters.dropped_special,
        m.filters.dropped_outliers,
        m.filters.norm_outlier_factor.unwrap_or(f32::NAN),
        m.filters.norm_median.unwrap_or(f32::NAN)
    );
    // Where the time goes: tokenisation alone and the early-stopped forward alone.
    let t = Instant::now();
    let mut n_tok = 0usize;
    for d in &ds.docs {
        n_tok += model.tokenizer().encode(&d.text).unwrap().len();
        if n_tok as u64 >= tokens {
            break;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "tokenise only: {n_tok} tokens in {secs:.2} s ({:.0} tokens/s)",
        n_tok as f64 / secs
    );
    let ids: Vec<u32> = (0..8 * 128)
        .map(|i| 1000 + (i * 7919 % 20000) as u32)
        .collect();
    let hp = HookPoint::new(layer, HookKind::ResidPost);
    let t = Instant::now();
    let reps = 4;
    for _ in 0..reps {
        let mut hooks = Hooks::new().capture(hp).logits(false);
        std::hint::black_box(model.forward(&ids, 8, 128, &mut hooks).unwrap());
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "forward only (8 x 128, stop after layer {layer}): {:.0} tokens/s",
        (reps * 8 * 128) as f64 / secs
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
