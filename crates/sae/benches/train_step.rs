//! Tokens per second of one TopK training step (F 16384, k 40, B 2048) at d_in 576 and
//! 2304 on synthetic structured activations, and the share of the step taken by its
//! floor, the dense encoder GEMM `[B, d_in] x [d_in, F]`.
//!
//! Run: `cargo bench -p saelab-sae --bench train_step` (optional args: d_in values, and
//! `standard` for a ReLU + L1 step instead: its codes are dense early in training, so
//! it shows the dense-kernel path; `SAELAB_DENSE_FROM=2` forces the sparse kernels), and
//! `bf16` for bf16 products (`encoder_precision = "bf16"` for TopK, `dense_precision =
//! "bf16"` with `standard`).

mod common;

use saelab_core::gemm::{gemm, MatMut, MatRef};
use saelab_sae::config::{Architecture, MatmulPrecision, TrainConfig};
use saelab_sae::synth::sparse_mixture;
use saelab_sae::trainer::{TrainHooks, TrainSae, W_ENC};
use std::time::Instant;

fn main() {
    // As `saelab` runs (see saelab_core::malloc); SAELAB_SYSTEM_MALLOC=1 for glibc's default.
    saelab_core::malloc::keep_freed_memory();
    let standard = std::env::args().any(|a| a == "standard");
    let precision = if std::env::args().any(|a| a == "bf16") {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    };
    let (f, k, b) = common::SHAPE;
    for d in common::dims() {
        let steps = if d >= 2000 { 4 } else { 8 };
        let x = sparse_mixture(b * (steps + 2), d, 4096, 40, 0.05, 7);
        let cfg = TrainConfig {
            architecture: if standard {
                Architecture::Standard
            } else {
                Architecture::Topk
            },
            l1_coeff: standard.then_some(0.04),
            d_sae: f,
            k,
            batch_size: b,
            total_tokens: (b * 1000) as u64,
            // Make AuxK active (some latents dead) so its cost is included.
            dead_tokens: (b * 2) as u64,
            encoder_block_rows: std::env::var("SAE_BLOCK_ROWS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2048),
            // `bf16`: the TopK selection, or a standard SAE's dense GEMMs.
            encoder_precision: if standard {
                MatmulPrecision::F32
            } else {
                precision
            },
            dense_precision: if standard {
                precision
            } else {
                MatmulPrecision::F32
            },
            ..Default::default()
        };
        let mut sae = TrainSae::new(&cfg, d, 1000).unwrap();
        let mut hooks = TrainHooks::default();
        for s in 0..2 {
            sae.train_step(&x[s * b * d..(s + 1) * b * d], &mut hooks)
                .unwrap();
        }
        sae.profile = Some(Vec::new());
        let t = Instant::now();
        let mut last = None;
        for s in 2..steps + 2 {
            last = Some(
                sae.train_step(&x[s * b * d..(s + 1) * b * d], &mut hooks)
                    .unwrap(),
            );
        }
        let step_s = t.elapsed().as_secs_f64() / steps as f64;
        let phases = sae.profile.take().unwrap();
        // The floor: the dense encoder GEMM alone, same shapes and layout.
        let mut pre = vec![0f32; b * f];
        let w = &sae.tensors[W_ENC].p;
        let xs = &x[..b * d];
        gemm(
            1.0,
            MatRef::row_major(xs, b, d),
            MatRef::row_major(w, f, d).t(),
            0.0,
            MatMut::row_major(&mut pre, b, f),
        );
        let reps = 3;
        let t = Instant::now();
        for _ in 0..reps {
            gemm(
                1.0,
                MatRef::row_major(xs, b, d),
                MatRef::row_major(w, f, d).t(),
                0.0,
                MatMut::row_major(&mut pre, b, f),
            );
        }
        let gemm_s = t.elapsed().as_secs_f64() / reps as f64;
        let flops = 2.0 * (b * d * f) as f64;
        let m = last.unwrap();
        println!(
            "{} d_in {d:5} F {f} k {k} B {b}: step {:.1} ms, {:.0} tokens/s; encoder GEMM {:.1} ms ({:.1} GFLOP/s) = {:.0}% of the step; l0 {:.1} dead {:.3} auxk {:.4}",
            if standard { "standard" } else { "topk" },
            step_s * 1e3,
            b as f64 / step_s,
            gemm_s * 1e3,
            flops / gemm_s / 1e9,
            100.0 * gemm_s / step_s,
            m.l0,
            m.dead_fraction,
            m.auxk
        );
        for (name, secs) in phases {
            println!("    {name:45} {:8.1} ms/step", secs * 1e3 / steps as f64);
        }
    }
}
