//! Activation store throughput: write, verify, sequential and shuffled reads.
//!
//! `cargo bench -p saelab-data --bench store_io -- [rows] [d_model]` (defaults 262144 x 576,
//! i.e. 2^18 rows of SmolLM2-135M's width). Prints one line per measurement. The store
//! is written to the system temp directory and removed afterwards; reads are served from
//! the page cache (the file was just written), which is the regime of a store that fits
//! in RAM.

use saelab_core::rng::Rng;
use saelab_core::source::ActivationSource;
use saelab_data::store::{
    ActivationStore, Dtype, ReadFilter, SequentialReader, ShuffleOptions, ShuffledReader,
    StoreSpec, StoreWriter,
};
use std::sync::Arc;
use std::time::Instant;

fn drain(src: &mut dyn ActivationSource, batch: usize) -> (usize, f64) {
    let d = src.d_in();
    let mut buf = vec![0f32; batch * d];
    let t = Instant::now();
    let mut n = 0;
    let mut check = 0f64;
    loop {
        let k = src.next_batch(batch, &mut buf).unwrap();
        if k == 0 {
            break;
        }
        check += buf[0] as f64;
        n += k;
    }
    std::hint::black_box(check);
    (n, t.elapsed().as_secs_f64())
}

fn main() {
    // As `saelab` runs (see saelab_core::malloc); SAELAB_SYSTEM_MALLOC=1 for glibc's default.
    saelab_core::malloc::keep_freed_memory();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = args.first().copied().unwrap_or(1 << 18);
    let d = args.get(1).copied().unwrap_or(576);
    println!(
        "store_io: {rows} rows x d_model {d}, batch 4096 rows, {} rayon threads",
        rayon::current_num_threads()
    );
    let mut r = Rng::new(1);
    let mut data = vec![0f32; 4096 * d];
    r.fill_normal(&mut data, 1.0);
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let dir = std::env::temp_dir().join(format!(
            "saelab-bench-store-{}-{}",
            dtype.name(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = StoreSpec {
            model: "bench".into(),
            hook: "blocks.0.hook_resid_post".into(),
            d_model: d,
            dtype,
            ctx_len: 128,
            shard_rows: 1 << 16,
            dropped_token_ids: vec![],
            norm_outlier_factor: None,
            source: serde_json::json!({}),
        };
        let t = Instant::now();
        let mut w = StoreWriter::open(&dir, spec).unwrap();
        for i in 0..rows {
            let k = i % 4096;
            w.push(&data[k * d..(k + 1) * d], i as u32).unwrap();
        }
        w.finish().unwrap();
        let secs = t.elapsed().as_secs_f64();
        let bytes = (rows * d * dtype.bytes()) as f64;
        println!(
            "{:>5} write      {:>10.0} rows/s  {:>6.2} GB/s (incl. fsync)",
            dtype.name(),
            rows as f64 / secs,
            bytes / secs / 1e9
        );
        let store = Arc::new(ActivationStore::open(&dir).unwrap());
        let t = Instant::now();
        store.verify().unwrap();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{:>5} verify     {:>10.0} rows/s  {:>6.2} GB/s (XXH64)",
            dtype.name(),
            rows as f64 / secs,
            bytes / secs / 1e9
        );
        let (n, secs) = drain(
            &mut SequentialReader::new(store.clone(), &ReadFilter::default()),
            4096,
        );
        println!(
            "{:>5} sequential {:>10.0} rows/s  {:>6.2} GB/s decoded f32",
            dtype.name(),
            n as f64 / secs,
            (n * d * 4) as f64 / secs / 1e9
        );
        for (label, window) in [
            ("shuffled (one window)", None),
            ("shuffled (window 2^17)", Some(1 << 17)),
        ] {
            let opts = ShuffleOptions {
                seed: 0,
                epochs: 1,
                window_rows: window,
                filter: ReadFilter::default(),
            };
            let t0 = Instant::now();
            let mut src = ShuffledReader::new(store.clone(), opts);
            let setup = t0.elapsed().as_secs_f64();
            let (n, secs) = drain(&mut src, 4096);
            println!(
                "{:>5} {label} {:>10.0} rows/s  {:>6.2} GB/s decoded f32 (setup {setup:.3} s)",
                dtype.name(),
                n as f64 / secs,
                (n * d * 4) as f64 / secs / 1e9
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
