//! AVX-512 microkernel: an `MR x (16 * NV)` tile of C held in `MR * NV` zmm accumulators.
//!
//! Per depth step the kernel loads `NV` vectors of the packed B row and broadcasts `MR`
//! packed A values, issuing `MR * NV` independent FMAs — with 14 x 2 that is 28
//! accumulators (of 32 zmm registers), enough independent chains to cover the 4-cycle
//! FMA latency on both FMA ports, and 16 loads per 28 FMAs (well under 2 loads/cycle).
//! Only the tile store depends on C's layout: unit column stride uses masked vector
//! loads/stores (edge tiles included), anything else goes through a small stack tile.

use super::driver::{BfView, Kernel, View};
use std::arch::x86_64::*;

/// The AVX-512 kernel family: `MR` rows by `NV` 16-lane vectors.
pub(crate) struct Avx512<const MR: usize, const NV: usize>;

/// The instance `gemm` uses. 12 x 32, 6 x 64 and 8 x 48 measured the same in cache on
/// the development machine (all ~122 GFLOP/s single-threaded on 336 x 256 x 512 in an
/// interleaved A/B run); 14 x 32 streams the fewest B bytes from L2 per FMA.
pub(crate) type Avx512Main = Avx512<14, 2>;

impl<const MR: usize, const NV: usize> Kernel for Avx512<MR, NV> {
    const MR: usize = MR;
    const NR: usize = 16 * NV;
    // A micro-panel 14 x 256 x 4 B = 14 KiB in L1 (32 KiB); B block 256 x 512 x 4 B =
    // 512 KiB in L2 (1 MiB); A block up to 3584 x 256 x 4 B = 3.5 MiB in L3.
    const KC: usize = 256;
    const MC: usize = 14 * 256;
    const NC: usize = 512;

    #[inline]
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
        // Short bottom tiles (m not a multiple of MR, e.g. 128 = 9 x 14 + 2 rows of the
        // attention GEMMs) run a kernel with fewer rows over the same packed panel
        // instead of paying for a full MR-row tile.
        match mr {
            _ if mr >= MR || MR <= 4 => {
                kernel_impl::<MR, NV, MR>(kc, a, b, c, rsc, csc, mr, nr, alpha, beta)
            }
            1..=2 => kernel_impl::<2, NV, MR>(kc, a, b, c, rsc, csc, mr, nr, alpha, beta),
            3..=4 => kernel_impl::<4, NV, MR>(kc, a, b, c, rsc, csc, mr, nr, alpha, beta),
            5..=7 if MR > 7 => kernel_impl::<7, NV, MR>(kc, a, b, c, rsc, csc, mr, nr, alpha, beta),
            8..=10 if MR > 10 => {
                kernel_impl::<10, NV, MR>(kc, a, b, c, rsc, csc, mr, nr, alpha, beta)
            }
            _ => kernel_impl::<MR, NV, MR>(kc, a, b, c, rsc, csc, mr, nr, alpha, beta),
        }
    }

    unsafe fn pack_b(dst: *mut f32, b: View, pc: usize, kc: usize, j0: usize, nc: usize) {
        pack_b_avx512::<NV>(dst, b, pc, kc, j0, nc)
    }

    unsafe fn pack_a(dst: *mut f32, a: View, i0: usize, mc: usize, pc: usize, kc: usize) {
        pack_a_avx512::<MR>(dst, a, i0, mc, pc, kc)
    }

    unsafe fn pack_b_bf16(dst: *mut f32, b: BfView, pc: usize, kc: usize, j0: usize, nc: usize) {
        // The masked 16-bit loads need AVX-512 BW (present on every AVX-512 CPU but
        // Knights Landing/Mill); without it the portable widening path is used.
        if std::arch::is_x86_feature_detected!("avx512bw") {
            pack_b_bf16_avx512::<NV>(dst, b, pc, kc, j0, nc)
        } else {
            super::driver::pack_b_bf16_generic(16 * NV, dst, b, pc, kc, j0, nc)
        }
    }
}

/// `MR` rows are computed (`mr <= MR` stored); `AS` is the packed A panel's height, i.e.
/// the stride between depth steps, which exceeds `MR` for the short-tile variants.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_impl<const MR: usize, const NV: usize, const AS: usize>(
    kc: usize,
    mut a: *const f32,
    mut b: *const f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    mr: usize,
    nr: usize,
    alpha: f32,
    beta: f32,
) {
    // Warm the C tile while the depth loop runs (its first touch is after ~kc*MR/2 cycles).
    for i in 0..MR {
        if i < mr {
            let row = c.offset(i as isize * rsc) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(row);
            if csc == 1 && NV > 1 {
                _mm_prefetch::<_MM_HINT_T0>(row.add(64 * (NV - 1)));
            }
        }
    }
    // The strided-C spill tile below holds 64 columns.
    const { assert!(NV <= 4) };
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let mut p = 0;
    // Unrolled by 2 so loop overhead is amortised; packed panels are 64-byte aligned.
    while p + 2 <= kc {
        step::<MR, NV>(&mut acc, a, b);
        step::<MR, NV>(&mut acc, a.add(AS), b.add(16 * NV));
        a = a.add(2 * AS);
        b = b.add(32 * NV);
        p += 2;
    }
    if p < kc {
        step::<MR, NV>(&mut acc, a, b);
    }

    let va = _mm512_set1_ps(alpha);
    if csc == 1 {
        let mut masks = [0u16; NV];
        for (v, mask) in masks.iter_mut().enumerate() {
            let lanes = nr.saturating_sub(16 * v).min(16);
            *mask = if lanes == 16 {
                0xFFFF
            } else {
                ((1u32 << lanes) - 1) as u16
            };
        }
        let vb = _mm512_set1_ps(beta);
        for (i, row) in acc.iter().enumerate() {
            if i < mr {
                let cp = c.offset(i as isize * rsc);
                for v in 0..NV {
                    let mut r = _mm512_mul_ps(row[v], va);
                    if beta != 0.0 {
                        let old = _mm512_maskz_loadu_ps(masks[v], cp.add(16 * v));
                        r = _mm512_fmadd_ps(old, vb, r);
                    }
                    _mm512_mask_storeu_ps(cp.add(16 * v), masks[v], r);
                }
            }
        }
    } else {
        // Strided C (e.g. a transposed output view): spill the tile, update element-wise.
        let mut tile = [[0f32; 64]; MR];
        for (trow, row) in tile.iter_mut().zip(acc.iter()) {
            for (v, x) in row.iter().enumerate() {
                _mm512_storeu_ps(trow.as_mut_ptr().add(16 * v), *x);
            }
        }
        for (i, trow) in tile.iter().enumerate().take(mr) {
            for (j, &x) in trow.iter().enumerate().take(nr) {
                let cp = c.offset(i as isize * rsc + j as isize * csc);
                *cp = if beta == 0.0 {
                    alpha * x
                } else {
                    alpha * x + beta * *cp
                };
            }
        }
    }
}

#[inline(always)]
unsafe fn step<const MR: usize, const NV: usize>(
    acc: &mut [[__m512; NV]; MR],
    a: *const f32,
    b: *const f32,
) {
    let mut bv = [_mm512_setzero_ps(); NV];
    for (v, x) in bv.iter_mut().enumerate() {
        *x = _mm512_load_ps(b.add(16 * v));
    }
    for (i, row) in acc.iter_mut().enumerate() {
        let ai = _mm512_set1_ps(*a.add(i));
        for v in 0..NV {
            row[v] = _mm512_fmadd_ps(ai, bv[v], row[v]);
        }
    }
}

/// B packing with full-width vector copies for row-major B and 16 x 16 in-register
/// transposes for column-major B (the `W^T` view of `[out, in]` weights), which would
/// otherwise cost a scalar strided load per element — as much as the multiply itself for
/// the small attention GEMMs.
#[target_feature(enable = "avx512f")]
unsafe fn pack_b_avx512<const NV: usize>(
    dst: *mut f32,
    b: View,
    pc: usize,
    kc: usize,
    j0: usize,
    nc: usize,
) {
    let nr = 16 * NV;
    let panels = nc.div_ceil(nr);
    for jp in 0..panels {
        let jb = j0 + jp * nr;
        let w = nr.min(nc - jp * nr);
        let d = dst.add(jp * kc * nr);
        if b.cs == 1 {
            let mut masks = [0u16; NV];
            for (v, mask) in masks.iter_mut().enumerate() {
                let lanes = w.saturating_sub(16 * v).min(16);
                *mask = if lanes == 16 {
                    0xFFFF
                } else {
                    ((1u32 << lanes) - 1) as u16
                };
            }
            for p in 0..kc {
                let src = b.at(pc + p, jb);
                for (v, &mask) in masks.iter().enumerate() {
                    let x = _mm512_maskz_loadu_ps(mask, src.add(16 * v));
                    _mm512_store_ps(d.add(p * nr + 16 * v), x);
                }
            }
        } else if b.rs == 1 {
            // Column j of B is contiguous: load 16 columns x 16 depths, transpose, store rows.
            for v in 0..NV {
                let jv = jb + 16 * v;
                let cols = w.saturating_sub(16 * v).min(16);
                let mut p = 0;
                while p < kc {
                    let depth = 16.min(kc - p);
                    let lmask = if depth == 16 {
                        0xFFFF
                    } else {
                        ((1u32 << depth) - 1) as u16
                    };
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (jj, x) in r.iter_mut().enumerate().take(cols) {
                        *x = _mm512_maskz_loadu_ps(lmask, b.at(pc + p, jv + jj));
                    }
                    transpose16(&mut r);
                    for (pp, x) in r.iter().enumerate().take(depth) {
                        _mm512_store_ps(d.add((p + pp) * nr + 16 * v), *x);
                    }
                    p += 16;
                }
            }
        } else {
            super::driver::pack_b_generic(nr, d, b, pc, kc, jb, w);
        }
    }
}

/// A packing. Row-major A (unit column stride, the usual activation layout) needs a
/// transpose into `kc x MR` panels: 16 depths of up to 16 rows are loaded as vectors,
/// transposed in registers and stored as `MR`-wide masked rows. Column-contiguous A is a
/// straight copy and goes through the generic path.
#[target_feature(enable = "avx512f")]
unsafe fn pack_a_avx512<const MR: usize>(
    dst: *mut f32,
    a: View,
    i0: usize,
    mc: usize,
    pc: usize,
    kc: usize,
) {
    if a.cs != 1 || MR > 16 {
        super::driver::pack_a_generic(MR, dst, a, i0, mc, pc, kc);
        return;
    }
    let panels = mc.div_ceil(MR);
    let store_mask = ((1u32 << MR) - 1) as u16;
    for ip in 0..panels {
        let ib = i0 + ip * MR;
        let h = MR.min(mc - ip * MR);
        let d = dst.add(ip * kc * MR);
        let mut p = 0;
        while p < kc {
            let depth = 16.min(kc - p);
            let lmask = if depth == 16 {
                0xFFFF
            } else {
                ((1u32 << depth) - 1) as u16
            };
            // Rows past `h` stay zero: they pad the last panel.
            let mut r = [_mm512_setzero_ps(); 16];
            for (ii, x) in r.iter_mut().enumerate().take(h) {
                *x = _mm512_maskz_loadu_ps(lmask, a.at(ib + ii, pc + p));
            }
            transpose16(&mut r);
            for (pp, x) in r.iter().enumerate().take(depth) {
                _mm512_mask_storeu_ps(d.add((p + pp) * MR), store_mask, *x);
            }
            p += 16;
        }
    }
}

/// In-place transpose of a 16 x 16 f32 block held in 16 zmm registers.
#[inline(always)]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    // Stage 1: interleave pairs of rows at 32-bit granularity.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // Stage 2: 64-bit granularity.
    for i in 0..4 {
        let (a0, a1, b0, b1) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(
            _mm512_castps_pd(a0),
            _mm512_castps_pd(b0),
        ));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(
            _mm512_castps_pd(a0),
            _mm512_castps_pd(b0),
        ));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(
            _mm512_castps_pd(a1),
            _mm512_castps_pd(b1),
        ));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(
            _mm512_castps_pd(a1),
            _mm512_castps_pd(b1),
        ));
    }
    // Stage 3: 128-bit lanes between groups of 4 rows.
    for i in 0..4 {
        let (x, y) = (r[i], r[i + 4]);
        t[i] = _mm512_shuffle_f32x4::<0x88>(x, y);
        t[i + 4] = _mm512_shuffle_f32x4::<0xDD>(x, y);
        let (x, y) = (r[i + 8], r[i + 12]);
        t[i + 8] = _mm512_shuffle_f32x4::<0x88>(x, y);
        t[i + 12] = _mm512_shuffle_f32x4::<0xDD>(x, y);
    }
    // Stage 4: 128-bit lanes between the two halves.
    for i in 0..8 {
        r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[i + 8]);
        r[i + 8] = _mm512_shuffle_f32x4::<0xDD>(t[i], t[i + 8]);
    }
}

/// Widen 16 bf16 values (as a 256-bit integer vector) to f32.
#[inline(always)]
unsafe fn bf16x16_to_f32(x: __m256i) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(x)))
}

/// Masked load of up to 16 bf16 values (lanes outside `mask` read as 0.0).
#[inline(always)]
unsafe fn load_bf16x16(p: *const u16, mask: u16) -> __m512 {
    let x = if mask == 0xFFFF {
        _mm256_loadu_si256(p as *const __m256i)
    } else {
        _mm256_maskz_loadu_epi16(mask, p as *const i16)
    };
    bf16x16_to_f32(x)
}

/// bf16 B packing: the f32 packing paths with the load widened (row-major: vector
/// widening copy; column-contiguous `W^T` view: widen then 16 x 16 transpose).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn pack_b_bf16_avx512<const NV: usize>(
    dst: *mut f32,
    b: BfView,
    pc: usize,
    kc: usize,
    j0: usize,
    nc: usize,
) {
    let nr = 16 * NV;
    let panels = nc.div_ceil(nr);
    for jp in 0..panels {
        let jb = j0 + jp * nr;
        let w = nr.min(nc - jp * nr);
        let d = dst.add(jp * kc * nr);
        if b.cs == 1 {
            let mut masks = [0u16; NV];
            for (v, mask) in masks.iter_mut().enumerate() {
                let lanes = w.saturating_sub(16 * v).min(16);
                *mask = if lanes == 16 {
                    0xFFFF
                } else {
                    ((1u32 << lanes) - 1) as u16
                };
            }
            for p in 0..kc {
                let src = b.at(pc + p, jb);
                for (v, &mask) in masks.iter().enumerate() {
                    _mm512_store_ps(d.add(p * nr + 16 * v), load_bf16x16(src.add(16 * v), mask));
                }
            }
        } else if b.rs == 1 {
            for v in 0..NV {
                let jv = jb + 16 * v;
                let cols = w.saturating_sub(16 * v).min(16);
                let mut p = 0;
                while p < kc {
                    let depth = 16.min(kc - p);
                    let lmask = if depth == 16 {
                        0xFFFF
                    } else {
                        ((1u32 << depth) - 1) as u16
                    };
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (jj, x) in r.iter_mut().enumerate().take(cols) {
                        *x = load_bf16x16(b.at(pc + p, jv + jj), lmask);
                    }
                    transpose16(&mut r);
                    for (pp, x) in r.iter().enumerate().take(depth) {
                        _mm512_store_ps(d.add((p + pp) * nr + 16 * v), *x);
                    }
                    p += 16;
                }
            }
        } else {
            super::driver::pack_b_bf16_generic(nr, d, b, pc, kc, jb, w);
        }
    }
}
