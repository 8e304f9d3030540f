//! Portable microkernel (plain Rust, auto-vectorised): the single-threaded path on CPUs
//! without AVX-512, so `gemm_serial` never spawns threads on any machine. On x86-64 with
//! AVX2 + FMA the same body is compiled a second time with those features enabled (and
//! fused multiply-adds), which is what every x86-64 CPU since 2013 runs. The
//! multithreaded fallback stays `matrixmultiply`.

use super::driver::Kernel;

pub(crate) struct Portable;

// 6 x 16: 12 accumulators of 8 lanes with AVX2 (the classic Haswell tile).
const MR: usize = 6;
const NR: usize = 16;

impl Kernel for Portable {
    const MR: usize = MR;
    const NR: usize = NR;
    const KC: usize = 256;
    const MC: usize = 72;
    const NC: usize = 2048;

    unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
        mr: usize,
        nr: usize,
        alpha: f32,
        beta: f32,
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return kernel_avx2_fma(kc, a, b, c, rsc, csc, mr, nr, alpha, beta);
        }
        kernel_body::<false>(kc, a, b, c, rsc, csc, mr, nr, alpha, beta)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx2_fma(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    mr: usize,
    nr: usize,
    alpha: f32,
    beta: f32,
) {
    kernel_body::<true>(kc, a, b, c, rsc, csc, mr, nr, alpha, beta)
}

/// The tile loop. `FMA` selects `mul_add` (one rounding, a single instruction when the
/// caller enables the `fma` feature) — without that feature `mul_add` would be a libm
/// call, so the baseline build uses a separate multiply and add.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_body<const FMA: bool>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    mr: usize,
    nr: usize,
    alpha: f32,
    beta: f32,
) {
    let a = std::slice::from_raw_parts(a, kc * MR);
    let b = std::slice::from_raw_parts(b, kc * NR);
    let mut acc = [[0f32; NR]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for (row, &ai) in acc.iter_mut().zip(ap) {
            for (x, &bj) in row.iter_mut().zip(bp) {
                *x = if FMA {
                    ai.mul_add(bj, *x)
                } else {
                    *x + ai * bj
                };
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(mr) {
        for (j, &x) in row.iter().enumerate().take(nr) {
            let cp = c.offset(i as isize * rsc + j as isize * csc);
            *cp = if beta == 0.0 {
                alpha * x
            } else {
                alpha * x + beta * *cp
            };
        }
    }
}

/// The baseline (no AVX2/FMA) body as its own kernel, so tests on AVX2 machines still
/// exercise it.
#[cfg(test)]
pub(crate) struct PortableBaseline;

#[cfg(test)]
impl Kernel for PortableBaseline {
    const MR: usize = MR;
    const NR: usize = NR;
    const KC: usize = 256;
    const MC: usize = 72;
    const NC: usize = 2048;

    unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
        mr: usize,
        nr: usize,
        alpha: f32,
        beta: f32,
    ) {
        kernel_body::<false>(kc, a, b, c, rsc, csc, mr, nr, alpha, beta)
    }
}
