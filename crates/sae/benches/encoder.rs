//! The TopK encoder of one batch (B 2048, F 16384, k 40): the encoder GEMM written to a
//! `[B, F]` pre-activation matrix and then a parallel per-row top-k (the unfused path),
//! against [`encoder_topk`], which selects from the GEMM's tiles while they are in cache,
//! in f32 and with its bf16 selection (`encoder_precision = "bf16"`: bf16 products, AMX
//! tiles where the CPU has them, the chosen values recomputed in f32).
//! The two are alternated over several rounds so a change in the machine's speed hits
//! both; the minimum is the time least disturbed by other load.
//!
//! Run: `cargo bench -p saelab-sae --bench encoder` (optional args: d_in values).

mod common;

use rayon::prelude::*;
use saelab_core::gemm::{gemm, MatMut, MatRef};
use saelab_core::rng::Rng;
use saelab_sae::kernels::{encoder_topk, topk_select};
use saelab_sae::MatmulPrecision;
use std::time::Instant;

fn main() {
    // As `saelab` runs (see saelab_core::malloc); SAELAB_SYSTEM_MALLOC=1 for glibc's default.
    saelab_core::malloc::keep_freed_memory();
    let (f, k, b) = common::SHAPE;
    for d in common::dims() {
        let mut r = Rng::new(3);
        let mut x = vec![0f32; b * d];
        let mut w = vec![0f32; f * d];
        r.fill_normal(&mut x, 1.0);
        r.fill_normal(&mut w, (1.0 / d as f32).sqrt());
        let bias = vec![-0.1f32; f];
        let mut pre = vec![0f32; b * f];
        let unfused = |pre: &mut Vec<f32>| -> Vec<Vec<(f32, u32)>> {
            gemm(
                1.0,
                MatRef::row_major(&x, b, d),
                MatRef::row_major(&w, f, d).t(),
                0.0,
                MatMut::row_major(pre, b, f),
            );
            pre.par_chunks_mut(f)
                .map_init(Vec::new, |buf, row| {
                    row.iter_mut().zip(&bias).for_each(|(a, c)| *a += c);
                    topk_select(row, k, 0.0, buf);
                    buf.clone()
                })
                .collect()
        };
        let fused_with = |precision: MatmulPrecision| -> Vec<Vec<(f32, u32)>> {
            encoder_topk(
                &x,
                b,
                MatRef::row_major(&w, f, d).t(),
                &bias,
                k,
                0.0,
                &[],
                0,
                precision,
            )
            .into_iter()
            .map(|r| r.main)
            .collect()
        };
        let fused = || fused_with(MatmulPrecision::F32);
        let bf16 = || fused_with(MatmulPrecision::Bf16);
        assert!(
            unfused(&mut pre) == fused(),
            "the two paths selected differently"
        );
        // How often the bf16 selection differs from the f32 one (near-ties at the k-th).
        let (a, c) = (fused(), bf16());
        let same_rows = a
            .iter()
            .zip(&c)
            .filter(|(p, q)| p.iter().map(|e| e.1).eq(q.iter().map(|e| e.1)))
            .count();
        let same_latents: usize = a
            .iter()
            .zip(&c)
            .map(|(p, q)| p.iter().filter(|e| q.iter().any(|g| g.1 == e.1)).count())
            .sum();
        let total: usize = a.iter().map(Vec::len).sum();
        let reps = if d >= 2000 { 4 } else { 10 };
        let (mut t_u, mut t_f, mut t_b) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            std::hint::black_box(unfused(&mut pre));
            t_u.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            std::hint::black_box(fused());
            t_f.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            std::hint::black_box(bf16());
            t_b.push(t.elapsed().as_secs_f64());
        }
        let gflop = 2.0 * (b * d * f) as f64 / 1e9;
        let stats = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[0], v[v.len() / 2])
        };
        let ((u, um), (fu, fm), (bu, bm)) = (stats(&mut t_u), stats(&mut t_f), stats(&mut t_b));
        println!(
            "d_in {d:5} F {f} k {k} B {b}, {reps} alternated rounds, min (median): \
             GEMM + select {:.1} ({:.1}) ms = {:.0} GFLOP/s; tiled encoder_topk {:.1} ({:.1}) ms \
             = {:.0} GFLOP/s; speed-up {:.2}x ({:.2}x)",
            u * 1e3,
            um * 1e3,
            gflop / u,
            fu * 1e3,
            fm * 1e3,
            gflop / fu,
            u / fu,
            um / fm
        );
        println!(
            "           bf16 selection (AMX tiles: {}; W packed each call) {:.1} ({:.1}) ms = \
             {:.0} GFLOP/s, {:.2}x ({:.2}x) the tiled f32 encoder; same latents as f32: \
             {:.4} of entries, {:.3} of rows identical",
            saelab_core::gemm::amx::available(),
            bu * 1e3,
            bm * 1e3,
            gflop / bu,
            fu / bu,
            fm / bm,
            same_latents as f64 / total as f64,
            same_rows as f64 / a.len() as f64
        );
    }
}
