//! GEMM throughput on the shapes saelab actually runs (SAE encoder, SmolLM2 projections,
//! per-head attention), in GFLOP/s, for saelab's kernel, `matrixmultiply` and — with
//! `--features bench-peers` — the `gemm` crate. Also measures the machine's FMA peak
//! (a register-only FMA loop on 1 and on all rayon threads) so results can be read as a
//! fraction of peak.
//!
//! Run: `cargo bench -p saelab-core --bench gemm [--features bench-peers] [-- FILTER]`
//! (FILTER keeps shapes whose name contains it). Each cell is the best of repeated runs
//! lasting >= `SAELAB_BENCH_SECS` seconds (default 1.0) after one warm-up run; best-of is
//! what survives interference from other processes on a small machine, the median is
//! printed next to it.

use half::bf16;
use saelab_core::gemm::{
    amx::{self, gemm_bf16_products, PackedBf16},
    gemm, gemm_bf16b, gemm_bf16b_serial, gemm_serial, kernel_name, BfMatRef, MatMut, MatRef,
};
use saelab_core::rng::Rng;
use std::time::Instant;

/// How B is stored: `RowMajor` is `[k x n]`; `Transposed` is the `W^T` view of a
/// row-major `[n x k]` matrix (weights stored `[out, in]`, encoder stored latent-major).
#[derive(Clone, Copy, PartialEq)]
enum BLayout {
    RowMajor,
    Transposed,
}

struct Shape {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    b: BLayout,
    /// Per-head attention GEMMs are called from already-parallel code: time them serially.
    serial_only: bool,
}

const fn shape(
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    b: BLayout,
    serial_only: bool,
) -> Shape {
    Shape {
        name,
        m,
        k,
        n,
        b,
        serial_only,
    }
}

use BLayout::{RowMajor as RM, Transposed as TR};

const SHAPES: &[Shape] = &[
    shape("sae-enc d576 (B row-major)", 2048, 576, 16384, RM, false),
    shape("sae-enc d576 (B = W^T)", 2048, 576, 16384, TR, false),
    shape("sae-enc d2304 (B row-major)", 2048, 2304, 16384, RM, false),
    shape("sae-enc d2304 (B = W^T)", 2048, 2304, 16384, TR, false),
    shape("lm q/o proj 576->576", 1024, 576, 576, TR, false),
    shape("lm k/v proj 576->192", 1024, 576, 192, TR, false),
    shape("lm gate/up 576->1536", 1024, 576, 1536, TR, false),
    shape("lm down 1536->576", 1024, 1536, 576, TR, false),
    shape("lm head 576->49152", 1024, 576, 49152, TR, false),
    shape("attn QK^T 128x64x128", 128, 64, 128, TR, true),
    shape("attn PV 128x128x64", 128, 128, 64, RM, true),
];

fn bench_secs() -> f64 {
    std::env::var("SAELAB_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// On-CPU time of the calling thread in seconds (`/proc/thread-self/schedstat`, ns),
/// for `SAELAB_BENCH_CPUTIME=1`: when other processes share the cores, the on-CPU time
/// of a single-threaded call is a steadier tuning signal than wall time.
fn thread_cpu_secs() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns * 1e-9)
}

/// Returns (best, median) seconds per call.
fn time_it(f: impl FnMut()) -> (f64, f64) {
    time_it_mode(f, false)
}

/// Like [`time_it`]; with `cpu_time` and `SAELAB_BENCH_CPUTIME=1` set, measures the
/// calling thread's on-CPU time instead of wall time (single-threaded calls only).
fn time_it_mode(mut f: impl FnMut(), cpu_time: bool) -> (f64, f64) {
    let use_cpu = cpu_time
        && std::env::var_os("SAELAB_BENCH_CPUTIME").is_some()
        && thread_cpu_secs().is_some();
    let now = || {
        if use_cpu {
            thread_cpu_secs().unwrap_or(0.0)
        } else {
            0.0
        }
    };
    f();
    let budget = bench_secs();
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < 3 || (start.elapsed().as_secs_f64() < budget && times.len() < 10_000) {
        let (t, c) = (Instant::now(), now());
        f();
        times.push(if use_cpu {
            now() - c
        } else {
            t.elapsed().as_secs_f64()
        });
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (times[0], times[times.len() / 2])
}

fn cell(flops: f64, t: (f64, f64)) -> String {
    format!("{:7.1} ({:6.1})", flops / t.0 / 1e9, flops / t.1 / 1e9)
}

/// Core clock and FMA throughput from two register-only loops, each timed as the best
/// of many ~1 ms runs (short runs catch time slices free of other processes):
/// one dependent FMA chain (4-cycle latency on Skylake/Cascade Lake) gives the clock;
/// 24 independent chains give FMA instructions per cycle (1 or 2 512-bit FMA units).
/// Returns (GHz, zmm FMAs per cycle, 1-thread GFLOP/s, all-threads GFLOP/s).
#[cfg(target_arch = "x86_64")]
fn fma_peak(threads: usize) -> Option<(f64, f64, f64, f64)> {
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    if !std::arch::is_x86_feature_detected!("avx512f") {
        return None;
    }
    #[target_feature(enable = "avx512f")]
    unsafe fn chains<const N: usize>(iters: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); N];
        let x = _mm512_set1_ps(0.999_999);
        let y = _mm512_set1_ps(1e-7);
        for _ in 0..iters / 100 {
            for _ in 0..100 {
                for a in acc.iter_mut() {
                    *a = _mm512_fmadd_ps(*a, x, y);
                }
            }
            // Opaque every 100 steps: keeps the chains live without a per-step spill.
            std::hint::black_box(&mut acc);
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }
    const FMA_LATENCY: f64 = 4.0;
    let lat_iters = 300_000;
    let (t, _) = time_it(|| {
        std::hint::black_box(unsafe { chains::<1>(lat_iters) });
    });
    let ghz = lat_iters as f64 * FMA_LATENCY / t / 1e9;
    let thr_iters = 100_000;
    let fmas = thr_iters as f64 * 24.0;
    let (t1, _) = time_it(|| {
        std::hint::black_box(unsafe { chains::<24>(thr_iters) });
    });
    let (tn, _) = time_it(|| {
        let r: f32 = (0..threads)
            .into_par_iter()
            .map(|_| unsafe { chains::<24>(thr_iters) })
            .sum();
        std::hint::black_box(r);
    });
    let per_cycle = fmas / t1 / (ghz * 1e9);
    Some((
        ghz,
        per_cycle,
        fmas * 32.0 / t1 / 1e9,
        fmas * 32.0 * threads as f64 / tn / 1e9,
    ))
}

fn main() {
    // As `saelab` runs (see saelab_core::malloc); SAELAB_SYSTEM_MALLOC=1 for glibc's default.
    saelab_core::malloc::keep_freed_memory();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without
    // it, and a multi-minute benchmark has no place in a test run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("gemm bench: run with `cargo bench -p saelab-core --bench gemm`; skipping");
        return;
    }
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let threads = rayon::current_num_threads();
    println!(
        "saelab kernel: {}; AMX bf16 tiles: {}; rayon threads: {threads}",
        kernel_name(),
        if amx::available() {
            "yes"
        } else {
            "no (f32 fallback)"
        }
    );
    #[cfg(target_arch = "x86_64")]
    if filter.is_none() || filter.as_deref() == Some("peak") {
        if let Some((ghz, per_cycle, p1, pn)) = fma_peak(threads) {
            println!(
                "clock (FMA latency chain): {ghz:.2} GHz; zmm FMAs/cycle/core: {per_cycle:.2}; \
                 FMA peak: 1 thread {p1:.1} GFLOP/s, {threads} threads {pn:.1} GFLOP/s"
            );
        }
    }
    println!("GFLOP/s, best (median) of repeated runs");
    print!(
        "{:<52} {:>16} {:>16} {:>16} {:>16} {:>16}",
        "shape [m x k] x [k x n]",
        "saelab",
        "saelab serial",
        "saelab bf16 B",
        "bf16 products",
        "matrixmultiply"
    );
    #[cfg(feature = "bench-peers")]
    print!(" {:>16}", "gemm 0.19");
    println!();
    // Ad-hoc shape for tuning: SAELAB_BENCH_SHAPE=m,k,n[,t] (t: B = W^T view).
    if let Ok(spec) = std::env::var("SAELAB_BENCH_SHAPE") {
        let parts: Vec<&str> = spec.split(',').collect();
        let dim = |i: usize| {
            parts
                .get(i)
                .and_then(|x| x.trim().parse().ok())
                .unwrap_or(256)
        };
        let b = if parts.get(3).map(|x| x.trim()) == Some("t") {
            BLayout::Transposed
        } else {
            BLayout::RowMajor
        };
        run_shape(&shape("custom", dim(0), dim(1), dim(2), b, false));
        return;
    }
    for s in SHAPES {
        if let Some(f) = &filter {
            if !s.name.contains(f.as_str()) {
                continue;
            }
        }
        run_shape(s);
    }
}

fn run_shape(s: &Shape) {
    let (m, k, n) = (s.m, s.k, s.n);
    let mut rng = Rng::new(1);
    let mut a = vec![0f32; m * k];
    let mut b = vec![0f32; k * n];
    rng.fill_normal(&mut a, 1.0);
    rng.fill_normal(&mut b, 1.0);
    let mut c = vec![0f32; m * n];
    let av = MatRef::row_major(&a, m, k);
    let bv = match s.b {
        BLayout::RowMajor => MatRef::row_major(&b, k, n),
        BLayout::Transposed => MatRef::row_major(&b, n, k).t(),
    };
    let flops = 2.0 * (m * n * k) as f64;

    let par = if s.serial_only {
        "-".to_string()
    } else {
        cell(
            flops,
            time_it(|| gemm(1.0, av, bv, 0.0, MatMut::row_major(&mut c, m, n))),
        )
    };
    let ser = cell(
        flops,
        time_it_mode(
            || gemm_serial(1.0, av, bv, 0.0, MatMut::row_major(&mut c, m, n)),
            true,
        ),
    );
    // matrixmultiply threads itself (MATMUL_NUM_THREADS, default: physical cores).
    let mm = cell(
        flops,
        time_it(|| unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                av.data.as_ptr(),
                av.rs,
                av.cs,
                bv.data.as_ptr(),
                bv.rs,
                bv.cs,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        }),
    );
    // The same B stored as bf16 (weights kept in bf16), widened while packing.
    let b16: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
    let bv16 = match s.b {
        BLayout::RowMajor => BfMatRef::row_major(&b16, k, n),
        BLayout::Transposed => BfMatRef::row_major(&b16, n, k).t(),
    };
    let bf = cell(
        flops,
        time_it(|| {
            let cm = MatMut::row_major(&mut c, m, n);
            if s.serial_only {
                gemm_bf16b_serial(1.0, av, bv16, 0.0, cm)
            } else {
                gemm_bf16b(1.0, av, bv16, 0.0, cm)
            }
        }),
    );
    // bf16 A and B, f32 sums (AMX tiles where available); B packed once, as weights are.
    let packed = PackedBf16::pack(bv);
    let amx = cell(
        flops,
        time_it(|| gemm_bf16_products(av, &packed, false, MatMut::row_major(&mut c, m, n))),
    );
    print!(
        "{:<52} {:>16} {:>16} {:>16} {:>16} {:>16}",
        format!("{} [{m}x{k}]x[{k}x{n}]", s.name),
        par,
        ser,
        bf,
        amx,
        mm
    );
    #[cfg(feature = "bench-peers")]
    {
        let par = if s.serial_only {
            gemm_crate::Parallelism::None
        } else {
            gemm_crate::Parallelism::Rayon(0)
        };
        let g = cell(
            flops,
            time_it(|| unsafe {
                gemm_crate::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    av.data.as_ptr(),
                    av.cs,
                    av.rs,
                    bv.data.as_ptr(),
                    bv.cs,
                    bv.rs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                )
            }),
        );
        print!(" {g:>16}");
    }
    println!();
}
