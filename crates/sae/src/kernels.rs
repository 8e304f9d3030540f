//! The hot kernels of a training step, written so that everything after the encoder
//! matmul costs O(B * k * d_in) instead of O(B * F * d_in):
//!
//! - [`encoder_topk`]: the TopK encoder without a `[B, F]` pre-activation matrix: the
//!   selection runs on the encoder GEMM's finished tiles while they are in cache
//!   (`saelab_core::gemm::gemm_tiles`). The encoder is stored latent-major `[F, d_in]` so
//!   that its gradient rows are contiguous, and the GEMM reads it as a transposed view.
//! - [`encoder_blocks`]: the encoder GEMM in row blocks handing each biased block to a
//!   selector, for the rules that need the block itself (ReLU, JumpReLU, gated, a gate).
//! - [`TopkStream`] / [`topk_select`]: per-row top-k fed in column chunks, with a running
//!   threshold that skips 16-wide chunks with nothing to keep (one AVX-512 compare each).
//! - [`decode`], [`grad_vals`]: the sparse decoder (gather k rows) and its backward with
//!   respect to the code values (`<dy, W_dec[l]>`).
//! - [`Csc`] + [`accum_rows`]: the transposed (latent-major) view of the active entries,
//!   so the weight gradients `dW[l] += c * src[r]` are computed per latent in parallel
//!   without write conflicts and in a fixed order (bit-reproducible whatever the number
//!   of threads).
//! - [`adam_step`]: a fused Adam over a flat buffer (parallel chunks, auto-vectorised),
//!   which also zeroes the gradient for the next step.
//!
//! Each kernel has a dense or scalar reference in the tests.

use crate::config::MatmulPrecision;
use rayon::prelude::*;
use saelab_core::gemm::amx::{gemm_bf16_products, gemm_tiles_bf16, PackedBf16};
use saelab_core::gemm::{gemm, gemm_tiles, MatMut, MatRef, SyncPtr, Tile};
use std::cmp::Ordering;

/// Rows per rayon task in row-parallel kernels.
const ROW_TASK: usize = 16;
/// Elements per rayon task in flat-buffer kernels (fixed so reductions are reproducible).
const FLAT_CHUNK: usize = 1 << 15;

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    // Pairwise fold of the lanes: fixed order, so the result is reproducible.
    let mut w = 8;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0] + s
}

/// `y += a * x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Descending by value, ascending by index: a total order, so selection is deterministic.
#[inline]
fn desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

fn shrink(buf: &mut Vec<(f32, u32)>, k: usize) -> f32 {
    buf.select_nth_unstable_by(k - 1, desc);
    buf.truncate(k);
    buf[k - 1].0
}

/// The (at most) `k` largest entries of `row` that are strictly greater than `floor`,
/// left in `buf` sorted by index. Ties are broken towards the lower index.
pub fn topk_select(row: &[f32], k: usize, floor: f32, buf: &mut Vec<(f32, u32)>) {
    topk_select_impl(row, None, k, floor, buf)
}

fn topk_select_impl(
    row: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    floor: f32,
    buf: &mut Vec<(f32, u32)>,
) {
    buf.clear();
    let mut run = TopkStream {
        thr: floor,
        buf: std::mem::take(buf),
    };
    run.feed(row, bias, 0, k);
    run.finish(k);
    *buf = run.buf;
}

/// A top-k selection fed a row in column chunks, in increasing column order (the
/// encoder's finished GEMM tiles): `feed` keeps the entries above a running threshold,
/// `finish` leaves the k largest sorted by index. Chunked and whole-row selection give
/// the same result, and so does merging the streams of disjoint column ranges (append
/// the buffers, then `finish`).
#[derive(Clone, Debug)]
pub struct TopkStream {
    /// Entries must be strictly greater than this: the floor, then the k-th largest
    /// value held once k are held (an equal later value loses the tie to the lower index).
    pub thr: f32,
    pub buf: Vec<(f32, u32)>,
}

impl TopkStream {
    pub fn new(floor: f32) -> Self {
        TopkStream {
            thr: floor,
            buf: Vec::new(),
        }
    }

    /// Offer `vals[j] (+ bias[j])` as column `col0 + j`.
    #[inline]
    pub fn feed(&mut self, vals: &[f32], bias: Option<&[f32]>, col0: usize, k: usize) {
        if k == 0 {
            return;
        }
        if let Some(b) = bias {
            assert!(
                b.len() >= vals.len(),
                "TopkStream::feed: bias shorter than the chunk"
            );
        }
        let cap = (2 * k).max(32);
        let n = vals.len();
        let full = n - n % 16;
        let mut c0 = 0;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present; the bias covers the chunk (checked above).
            unsafe { self.feed_chunks_avx512(vals, bias, col0, full, k, cap) };
            c0 = full;
        }
        let mut tmp = [0f32; 16];
        while c0 < full {
            let ch = &vals[c0..c0 + 16];
            match bias {
                Some(b) => {
                    let bc = &b[c0..c0 + 16];
                    for i in 0..16 {
                        tmp[i] = ch[i] + bc[i];
                    }
                }
                None => tmp.copy_from_slice(ch),
            }
            self.offer_chunk(&tmp, 0xFFFF, col0 + c0, k, cap);
            c0 += 16;
        }
        for j in full..n {
            let v = vals[j] + bias.map_or(0.0, |b| b[j]);
            if v > self.thr {
                self.buf.push((v, (col0 + j) as u32));
                if self.buf.len() >= cap {
                    self.thr = shrink(&mut self.buf, k);
                }
            }
        }
    }

    /// Push the lanes of `mask` whose value beats the threshold (columns `col..col + 16`).
    #[inline(always)]
    fn offer_chunk(&mut self, v: &[f32; 16], mask: u16, col: usize, k: usize, cap: usize) {
        let mut pushed = false;
        for (j, &x) in v.iter().enumerate() {
            if mask & (1 << j) != 0 && x > self.thr {
                self.buf.push((x, (col + j) as u32));
                pushed = true;
            }
        }
        if pushed && self.buf.len() >= cap {
            self.thr = shrink(&mut self.buf, k);
        }
    }

    /// The whole 16-lane chunks of [`TopkStream::feed`]: one compare against the running
    /// threshold per chunk, so a chunk with nothing to keep (nearly all of them once k
    /// entries are held) costs a load, an add and a compare.
    ///
    /// # Safety
    /// AVX-512F must be available; `vals` and `bias` (if any) hold at least `full` values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn feed_chunks_avx512(
        &mut self,
        vals: &[f32],
        bias: Option<&[f32]>,
        col0: usize,
        full: usize,
        k: usize,
        cap: usize,
    ) {
        use std::arch::x86_64::*;
        let mut t = _mm512_set1_ps(self.thr);
        let mut tmp = [0f32; 16];
        let mut c0 = 0;
        while c0 < full {
            let mut v = _mm512_loadu_ps(vals.as_ptr().add(c0));
            if let Some(b) = bias {
                v = _mm512_add_ps(v, _mm512_loadu_ps(b.as_ptr().add(c0)));
            }
            let mask = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, t);
            if mask != 0 {
                _mm512_storeu_ps(tmp.as_mut_ptr(), v);
                self.offer_chunk(&tmp, mask, col0 + c0, k, cap);
                t = _mm512_set1_ps(self.thr);
            }
            c0 += 16;
        }
    }

    /// Offer only the absolute columns `cols`, all inside this chunk
    /// (`col0..col0 + vals.len()`), with no threshold (AuxK over the dead latents,
    /// negative values included).
    pub fn feed_subset(
        &mut self,
        vals: &[f32],
        bias: Option<&[f32]>,
        col0: usize,
        cols: &[u32],
        k: usize,
    ) {
        if k == 0 {
            return;
        }
        let cap = (2 * k).max(32);
        for &c in cols {
            let j = c as usize - col0;
            self.buf.push((vals[j] + bias.map_or(0.0, |b| b[j]), c));
            if self.buf.len() >= cap {
                shrink(&mut self.buf, k);
            }
        }
    }

    /// Keep the k largest (ties to the lower index), sorted by index.
    pub fn finish(&mut self, k: usize) {
        keep_topk(&mut self.buf, k);
    }
}

/// Keep the k largest entries of `buf` (ties to the lower index), sorted by index.
pub fn keep_topk(buf: &mut Vec<(f32, u32)>, k: usize) {
    if k == 0 {
        buf.clear();
        return;
    }
    if buf.len() > k {
        shrink(buf, k);
    }
    buf.sort_unstable_by_key(|e| e.1);
}

/// `C = A B + beta C` (`beta` 0 or 1) in f32, or as bf16 products with f32 sums
/// (`saelab_core::gemm::amx`; B is packed on every call, as it changes every step).
pub fn matmul(precision: MatmulPrecision, a: MatRef, b: MatRef, beta: f32, c: MatMut) {
    match precision {
        MatmulPrecision::F32 => gemm(1.0, a, b, beta, c),
        MatmulPrecision::Bf16 => {
            debug_assert!(beta == 0.0 || beta == 1.0);
            gemm_bf16_products(a, &PackedBf16::pack(b), beta != 0.0, c)
        }
    }
}

/// Compute the encoder matmul `x_c [rows, d] . W^T` (W latent-major `[f, d]`) in row blocks
/// of `block_rows`, calling `per_block(first_row, block)` on each `[nb, f]` block
/// (bias not added). The GEMM itself is multithreaded.
pub fn encoder_blocks(
    x_c: &[f32],
    rows: usize,
    d: usize,
    w_lat: &[f32],
    f: usize,
    block_rows: usize,
    pre_buf: &mut Vec<f32>,
    precision: MatmulPrecision,
    mut per_block: impl FnMut(usize, &mut [f32]),
) {
    let br = block_rows.max(1).min(rows.max(1));
    if pre_buf.len() < br * f {
        pre_buf.resize(br * f, 0.0);
    }
    let wt = MatRef::row_major(w_lat, f, d).t();
    // Packed once for all row blocks.
    let packed = (precision == MatmulPrecision::Bf16).then(|| PackedBf16::pack(wt));
    let mut r0 = 0;
    while r0 < rows {
        let nb = br.min(rows - r0);
        let blk = &mut pre_buf[..nb * f];
        let a = MatRef::row_major(&x_c[r0 * d..(r0 + nb) * d], nb, d);
        let c = MatMut::row_major(blk, nb, f);
        match &packed {
            Some(p) => gemm_bf16_products(a, p, false, c),
            None => gemm(1.0, a, wt, 0.0, c),
        }
        per_block(r0, blk);
        r0 += nb;
    }
}

/// One row's selection by [`encoder_topk`]: (value, latent) sorted by latent.
#[derive(Clone, Debug, Default)]
pub struct RowTopk {
    pub main: Vec<(f32, u32)>,
    pub aux: Vec<(f32, u32)>,
}

/// The TopK encoder without its `[rows, F]` pre-activation matrix: per row of
/// `x_c W + bias` (`w` a `[d, f]` view: the trainer's latent-major `[f, d]` encoder
/// transposed, or an SAELens `W_enc`), the `k` largest values above `floor` and,
/// among the columns `aux_cols` (sorted; the dead latents for AuxK), the `k_aux` largest.
/// Each GEMM task selects over its own columns from the finished tiles while they are
/// in cache ([`gemm_tiles`]); the per-task selections are then merged per row. Same
/// result as [`topk_select`] on the full rows of `x_c W^T + bias` (and a sort for AuxK).
#[allow(clippy::too_many_arguments)]
pub fn encoder_topk(
    x_c: &[f32],
    rows: usize,
    w: MatRef,
    bias: &[f32],
    k: usize,
    floor: f32,
    aux_cols: &[u32],
    k_aux: usize,
    precision: MatmulPrecision,
) -> Vec<RowTopk> {
    struct TaskSel {
        row0: usize,
        main: Vec<TopkStream>,
        aux: Vec<TopkStream>,
    }
    let k_aux = if aux_cols.is_empty() { 0 } else { k_aux };
    assert_eq!(bias.len(), w.cols, "encoder_topk: bias length != latents");
    let init = |r: std::ops::Range<usize>, _cols| TaskSel {
        row0: r.start,
        main: vec![TopkStream::new(floor); r.len()],
        aux: vec![TopkStream::new(f32::NEG_INFINITY); if k_aux > 0 { r.len() } else { 0 }],
    };
    let tile = |s: &mut TaskSel, t: &Tile| {
        let b = &bias[t.col0..t.col0 + t.cols];
        let dead = if k_aux > 0 {
            let lo = aux_cols.partition_point(|&c| (c as usize) < t.col0);
            let hi = aux_cols.partition_point(|&c| (c as usize) < t.col0 + t.cols);
            &aux_cols[lo..hi]
        } else {
            &[]
        };
        for i in 0..t.rows {
            let r = t.row0 + i - s.row0;
            s.main[r].feed(t.row(i), Some(b), t.col0, k);
            if !dead.is_empty() {
                s.aux[r].feed_subset(t.row(i), Some(b), t.col0, dead, k_aux);
            }
        }
    };
    let a = MatRef::row_major(x_c, rows, w.rows);
    let states = match precision {
        MatmulPrecision::F32 => gemm_tiles(a, w, &init, &tile),
        MatmulPrecision::Bf16 => gemm_tiles_bf16(a, &PackedBf16::pack(w), &init, &tile),
    };
    let mut out = vec![RowTopk::default(); rows];
    for s in states {
        for (i, m) in s.main.into_iter().enumerate() {
            out[s.row0 + i].main.extend(m.buf);
        }
        for (i, a) in s.aux.into_iter().enumerate() {
            out[s.row0 + i].aux.extend(a.buf);
        }
    }
    let d = w.rows;
    out.par_iter_mut()
        .enumerate()
        .with_min_len(ROW_TASK)
        .for_each(|(r, o)| {
            keep_topk(&mut o.main, k);
            keep_topk(&mut o.aux, k_aux);
            if precision == MatmulPrecision::Bf16 {
                // Chosen from bf16 products; the values used from here on are f32.
                let x = &x_c[r * d..(r + 1) * d];
                for e in o.main.iter_mut().chain(o.aux.iter_mut()) {
                    e.0 = column_dot(x, w, e.1 as usize) + bias[e.1 as usize];
                }
                o.main.retain(|e| e.0 > floor);
            }
        });
    out
}

/// `x . w[:, col]` for a `[d, f]` view (contiguous when `w` is a transposed latent-major
/// encoder).
fn column_dot(x: &[f32], w: MatRef, col: usize) -> f32 {
    if w.rs == 1 {
        dot(x, &w.data[(col as isize * w.cs) as usize..][..x.len()])
    } else {
        x.iter().enumerate().map(|(kk, &v)| v * w.at(kk, col)).sum()
    }
}

/// Pre-activations of one row computed on its own (`x_c_row . W^T + bias`).
pub fn pre_row(x_c_row: &[f32], w_lat: &[f32], bias: &[f32], out: &mut [f32]) {
    let d = x_c_row.len();
    out.par_chunks_mut(256).enumerate().for_each(|(ci, o)| {
        for (j, v) in o.iter_mut().enumerate() {
            let l = ci * 256 + j;
            *v = dot(x_c_row, &w_lat[l * d..(l + 1) * d]) + bias[l];
        }
    });
}

/// Row index of every entry of a CSR layout.
pub fn entry_rows(offsets: &[usize]) -> Vec<u32> {
    let mut out = Vec::with_capacity(*offsets.last().unwrap_or(&0));
    for r in 0..offsets.len().saturating_sub(1) {
        out.extend(std::iter::repeat_n(r as u32, offsets[r + 1] - offsets[r]));
    }
    out
}

/// Split `data` into per-row mutable slices following CSR `offsets`.
fn split_rows<'a, T>(mut data: &'a mut [T], offsets: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    for r in 0..offsets.len().saturating_sub(1) {
        let (a, b) = data.split_at_mut(offsets[r + 1] - offsets[r]);
        out.push(a);
        data = b;
    }
    out
}

/// Sparse decoder: `out[r] = bias + sum_p val[p] * W[idx[p]]` (bias optional = 0).
pub fn decode(
    offsets: &[usize],
    idx: &[u32],
    val: &[f32],
    w: &[f32],
    d: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    out.par_chunks_mut(d)
        .with_min_len(ROW_TASK)
        .enumerate()
        .for_each(|(r, o)| {
            match bias {
                Some(b) => o.copy_from_slice(b),
                None => o.fill(0.0),
            }
            for p in offsets[r]..offsets[r + 1] {
                let l = idx[p] as usize;
                axpy(val[p], &w[l * d..(l + 1) * d], o);
            }
        });
}

/// Backward of the sparse decoder with respect to the code values:
/// `out[p] += <dy_row(r, idx[p]), W[idx[p]]>`, where `dy_row` picks the upstream
/// gradient of row r for that latent (one matrix, or a Matryoshka group's).
pub fn grad_vals(
    offsets: &[usize],
    idx: &[u32],
    w: &[f32],
    d: usize,
    dy: &[f32],
    dy_stride: usize,
    dy_off: &(dyn Fn(u32) -> usize + Sync),
    out: &mut [f32],
) {
    let rows = split_rows(out, offsets);
    rows.into_par_iter()
        .with_min_len(ROW_TASK)
        .enumerate()
        .for_each(|(r, o)| {
            for (j, g) in o.iter_mut().enumerate() {
                let l = idx[offsets[r] + j];
                let off = r * dy_stride + dy_off(l);
                *g += dot(&dy[off..off + d], &w[l as usize * d..(l as usize + 1) * d]);
            }
        });
}

/// Code density (entries / (rows * F)) from which the dense kernels below replace the
/// sparse ones. The sparse kernels cost one decoder-row gather (d floats, from L3 or
/// memory) per entry, the dense ones 2 d FLOPs per (row, latent) at GEMM speed; a
/// ReLU SAE at initialisation fires about half its latents, where the sparse path was
/// ~6x slower than dictionary_learning's dense one. The crossover is measured by
/// `cargo bench -p saelab-sae --bench train_step -- standard` (docs/benchmarks-sae.md),
/// which sets `SAELAB_DENSE_FROM` (read once; for benchmarks) to force either path.
pub const DENSE_FROM: f64 = 1.0 / 16.0;

/// Whether `nnz` entries over `rows x f` are dense enough for the dense kernels.
pub fn dense_pays(nnz: usize, rows: usize, f: usize) -> bool {
    static FROM: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let from = *FROM.get_or_init(|| {
        std::env::var("SAELAB_DENSE_FROM")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DENSE_FROM)
    });
    nnz as f64 >= from * rows as f64 * f as f64
}

/// The `[rows, f]` matrix of the entries (`rows_of[p]`, `lat[p]`, `val[p]`); entries
/// that repeat a (row, latent) are summed.
pub fn densify(rows_of: &[u32], lat: &[u32], val: &[f32], rows: usize, f: usize) -> Vec<f32> {
    let mut m = vec![0f32; rows * f];
    if rows_of.windows(2).all(|w| w[0] <= w[1]) {
        // Entries grouped by row (the usual case): fill rows in parallel.
        m.par_chunks_mut(f)
            .with_min_len(ROW_TASK)
            .enumerate()
            .for_each(|(r, out)| {
                let lo = rows_of.partition_point(|&x| (x as usize) < r);
                let hi = rows_of.partition_point(|&x| (x as usize) <= r);
                for (&l, &v) in lat[lo..hi].iter().zip(&val[lo..hi]) {
                    out[l as usize] += v;
                }
            });
    } else {
        for ((&r, &l), &v) in rows_of.iter().zip(lat).zip(val) {
            m[r as usize * f + l as usize] += v;
        }
    }
    m
}

/// Dense decoder: `out = bias + codes W` with `codes` `[rows, f]`, `W` `[f, d]`.
pub fn decode_dense(
    codes: &[f32],
    rows: usize,
    f: usize,
    w: &[f32],
    d: usize,
    bias: &[f32],
    out: &mut [f32],
    precision: MatmulPrecision,
) {
    out.par_chunks_mut(d).for_each(|o| o.copy_from_slice(bias));
    matmul(
        precision,
        MatRef::row_major(codes, rows, f),
        MatRef::row_major(w, f, d),
        1.0,
        MatMut::row_major(out, rows, d),
    );
}

/// Dense counterpart of [`decoder_backward`] (one upstream matrix `dy` `[rows, d]`):
/// `grad_val[p] += (dy W^T)[rows_of[p], lat[p]]` and `grad_w += codes^T dy`.
#[allow(clippy::too_many_arguments)]
pub fn decoder_backward_dense(
    codes: &[f32],
    rows: usize,
    f: usize,
    rows_of: &[u32],
    lat: &[u32],
    w: &[f32],
    d: usize,
    dy: &[f32],
    grad_w: &mut [f32],
    grad_val: &mut [f32],
    precision: MatmulPrecision,
) {
    let mut g = vec![0f32; rows * f];
    matmul(
        precision,
        MatRef::row_major(dy, rows, d),
        MatRef::row_major(w, f, d).t(),
        0.0,
        MatMut::row_major(&mut g, rows, f),
    );
    for ((gv, &r), &l) in grad_val.iter_mut().zip(rows_of).zip(lat) {
        *gv += g[r as usize * f + l as usize];
    }
    matmul(
        precision,
        MatRef::row_major(codes, rows, f).t(),
        MatRef::row_major(dy, rows, d),
        1.0,
        MatMut::row_major(grad_w, f, d),
    );
}

/// Dense counterpart of [`accum_rows`] (one source matrix `src` `[rows, d]`):
/// `grad += C^T src` with `C` the `[rows, f]` matrix of the coefficients; returns the
/// per-latent sums of the coefficients.
#[allow(clippy::too_many_arguments)]
pub fn accum_rows_dense(
    rows_of: &[u32],
    lat: &[u32],
    coef: &[f32],
    src: &[f32],
    rows: usize,
    f: usize,
    d: usize,
    grad: &mut [f32],
    precision: MatmulPrecision,
) -> Vec<f32> {
    let c = densify(rows_of, lat, coef, rows, f);
    matmul(
        precision,
        MatRef::row_major(&c, rows, f).t(),
        MatRef::row_major(src, rows, d),
        1.0,
        MatMut::row_major(grad, f, d),
    );
    // Column sums in fixed row chunks (reproducible whatever the thread count).
    c.par_chunks(f * 64)
        .map(|block| {
            let mut s = vec![0f32; f];
            for row in block.chunks_exact(f) {
                s.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            s
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(vec![0f32; f], |mut acc, s| {
            acc.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
            acc
        })
}

/// The active entries grouped by latent (compressed sparse columns): the entries of
/// latent `l` are `ent[ptr[l]..ptr[l + 1]]` (indices into the entry arrays), in
/// increasing entry order, with their rows in `rows`.
#[derive(Clone, Debug, Default)]
pub struct Csc {
    pub ptr: Vec<usize>,
    pub ent: Vec<u32>,
    pub rows: Vec<u32>,
}

impl Csc {
    pub fn build(d_sae: usize, entry_rows: &[u32], entry_lat: &[u32]) -> Csc {
        let mut ptr = vec![0usize; d_sae + 1];
        for &l in entry_lat {
            ptr[l as usize + 1] += 1;
        }
        for l in 0..d_sae {
            ptr[l + 1] += ptr[l];
        }
        let mut fill = ptr.clone();
        let n = entry_lat.len();
        let mut ent = vec![0u32; n];
        let mut rows = vec![0u32; n];
        for (p, &l) in entry_lat.iter().enumerate() {
            let q = fill[l as usize];
            ent[q] = p as u32;
            rows[q] = entry_rows[p];
            fill[l as usize] += 1;
        }
        Csc { ptr, ent, rows }
    }

    pub fn touched(&self, l: usize) -> bool {
        self.ptr[l + 1] > self.ptr[l]
    }
}

/// `grad[l] += sum_{entries p of l} coef[p] * src_row(r_p, l)`; returns the per-latent
/// sums of `coef` (the bias gradient when `coef` is d(loss)/d(pre)).
pub fn accum_rows(
    csc: &Csc,
    coef: &[f32],
    src: &[f32],
    src_stride: usize,
    src_off: &(dyn Fn(u32) -> usize + Sync),
    d: usize,
    grad: &mut [f32],
) -> Vec<f32> {
    let f = csc.ptr.len() - 1;
    let mut sums = vec![0f32; f];
    grad.par_chunks_mut(d)
        .zip(sums.par_iter_mut())
        .with_min_len(64)
        .enumerate()
        .for_each(|(l, (g, s))| {
            let off_l = src_off(l as u32);
            for q in csc.ptr[l]..csc.ptr[l + 1] {
                let c = coef[csc.ent[q] as usize];
                *s += c;
                if c != 0.0 {
                    let off = csc.rows[q] as usize * src_stride + off_l;
                    axpy(c, &src[off..off + d], g);
                }
            }
        });
    sums
}

/// The sparse decoder's backward in latent-major order, so each decoder row (and its
/// gradient row) is read once per step instead of once per entry:
/// `grad_val[p] += <dy_row(r_p, l), W[l]>` and `grad_w[l] += val[p] * dy_row(r_p, l)`.
pub fn decoder_backward(
    csc: &Csc,
    val: &[f32],
    w: &[f32],
    d: usize,
    dy: &[f32],
    dy_stride: usize,
    dy_off: &(dyn Fn(u32) -> usize + Sync),
    grad_w: &mut [f32],
    grad_val: &mut [f32],
) {
    assert_eq!(val.len(), grad_val.len());
    let gv = SyncPtr(grad_val.as_mut_ptr());
    grad_w
        .par_chunks_mut(d)
        .zip(w.par_chunks(d))
        .with_min_len(64)
        .enumerate()
        .for_each(|(l, (g, wl))| {
            let off_l = dy_off(l as u32);
            for q in csc.ptr[l]..csc.ptr[l + 1] {
                let p = csc.ent[q] as usize;
                let off = csc.rows[q] as usize * dy_stride + off_l;
                let dyr = &dy[off..off + d];
                // Safety: every entry p belongs to exactly one latent, so tasks write disjoint
                // elements of grad_val, which outlives this call.
                unsafe { *gv.get().add(p) += dot(dyr, wl) };
                let c = val[p];
                if c != 0.0 {
                    axpy(c, dyr, g);
                }
            }
        });
}

/// `out = sum_l coef[l] * W[l]` over latents with non-zero `coef` (W latent-major),
/// reduced in fixed chunks so the result is reproducible.
pub fn weighted_row_sum(w: &[f32], coef: &[f32], d: usize) -> Vec<f32> {
    let chunk = 1024;
    let parts: Vec<Vec<f32>> = coef
        .par_chunks(chunk)
        .enumerate()
        .map(|(ci, cs)| {
            let mut acc = vec![0f32; d];
            for (j, &c) in cs.iter().enumerate() {
                if c != 0.0 {
                    let l = ci * chunk + j;
                    axpy(c, &w[l * d..(l + 1) * d], &mut acc);
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0f32; d];
    for p in parts {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// Sum of squares of the rows of `g` [rows, d] flagged in `rows_touched` (the other rows
/// are known to be zero), in f64, reproducible.
pub fn sum_sq_rows(g: &[f32], d: usize, rows_touched: &[bool]) -> f64 {
    let parts: Vec<f64> = g
        .par_chunks(d * 64)
        .zip(rows_touched.par_chunks(64))
        .map(|(g, t)| {
            g.chunks(d)
                .zip(t)
                .filter(|(_, &t)| t)
                .map(|(r, _)| dot(r, r) as f64)
                .sum::<f64>()
        })
        .collect();
    parts.iter().sum()
}

/// Sum of squares in f64, reproducible.
pub fn sum_sq(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x
        .par_chunks(FLAT_CHUNK)
        .map(|c| {
            let mut acc = [0f32; 16];
            let it = c.chunks_exact(16);
            let rem = it.remainder();
            let mut s = 0f64;
            // Blocks of 16 lanes in f32, folded into f64 every 64 blocks to bound error.
            for (bi, b) in it.enumerate() {
                for i in 0..16 {
                    acc[i] += b[i] * b[i];
                }
                if bi % 64 == 63 {
                    s += acc.iter().map(|&v| v as f64).sum::<f64>();
                    acc = [0f32; 16];
                }
            }
            s += acc.iter().map(|&v| v as f64).sum::<f64>();
            s + rem.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()
        })
        .collect();
    parts.iter().sum()
}

pub fn scale_in_place(x: &mut [f32], a: f32) {
    x.par_chunks_mut(FLAT_CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= a));
}

/// Adam hyper-parameters of one update (PyTorch's formulation, bias-corrected).
#[derive(Clone, Copy, Debug)]
pub struct AdamHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1-based step count of this parameter's moments.
    pub t: u64,
    /// Gradient scale (gradient-norm clipping), 1 = none.
    pub gscale: f32,
}

/// Fused Adam on flat buffers; the gradient is multiplied by `h.gscale` (clipping) on
/// the fly, and `g` is zeroed for the next step.
pub fn adam_step(p: &mut [f32], g: &mut [f32], m: &mut [f32], v: &mut [f32], h: AdamHyper) {
    p.par_chunks_mut(FLAT_CHUNK)
        .zip(g.par_chunks_mut(FLAT_CHUNK))
        .zip(m.par_chunks_mut(FLAT_CHUNK))
        .zip(v.par_chunks_mut(FLAT_CHUNK))
        .for_each(|(((p, g), m), v)| adam_step_seq(p, g, m, v, h));
}

#[inline]
fn adam_step_seq(p: &mut [f32], g: &mut [f32], m: &mut [f32], v: &mut [f32], h: AdamHyper) {
    let bc1 = 1.0 - (h.beta1 as f64).powi(h.t as i32);
    let bc2 = 1.0 - (h.beta2 as f64).powi(h.t as i32);
    let step_size = (h.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let (b1, b2, eps, gs) = (h.beta1, h.beta2, h.eps, h.gscale);
    for i in 0..p.len() {
        let gi = g[i] * gs;
        let mi = b1 * m[i] + (1.0 - b1) * gi;
        let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * mi / (vi.sqrt() / bc2_sqrt + eps);
        g[i] = 0.0;
    }
}

/// [`adam_step`] on a row-major `[rows, d]` matrix whose rows are then rescaled to unit
/// norm (the constrained decoder), fused so each row is streamed once.
pub fn adam_step_unit_rows(
    p: &mut [f32],
    g: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    h: AdamHyper,
    d: usize,
) {
    let rows_per_task = (FLAT_CHUNK / d.max(1)).max(1);
    let c = rows_per_task * d;
    p.par_chunks_mut(c)
        .zip(g.par_chunks_mut(c))
        .zip(m.par_chunks_mut(c))
        .zip(v.par_chunks_mut(c))
        .for_each(|(((p, g), m), v)| {
            for (((pr, gr), mr), vr) in p
                .chunks_mut(d)
                .zip(g.chunks_mut(d))
                .zip(m.chunks_mut(d))
                .zip(v.chunks_mut(d))
            {
                adam_step_seq(pr, gr, mr, vr, h);
                let n = (dot(pr, pr) as f64).sqrt();
                if n > 0.0 {
                    let inv = (1.0 / n) as f32;
                    pr.iter_mut().for_each(|x| *x *= inv);
                }
            }
        });
}

/// Remove from each touched decoder-row gradient its component along the row; returns
/// the squared norm of the resulting gradient (f64, reproducible) while the rows are hot.
pub fn remove_parallel(w: &[f32], g: &mut [f32], d: usize, touched: &[bool]) -> f64 {
    let parts: Vec<f64> = g
        .par_chunks_mut(d * 64)
        .zip(w.par_chunks(d * 64))
        .zip(touched.par_chunks(64))
        .map(|((g, w), t)| {
            let mut s = 0f64;
            for ((g, w), &t) in g.chunks_mut(d).zip(w.chunks(d)).zip(t) {
                if t {
                    let ww = dot(w, w);
                    if ww > 0.0 {
                        let a = dot(g, w) / ww;
                        axpy(-a, w, g);
                    }
                    s += dot(g, g) as f64;
                }
            }
            s
        })
        .collect();
    parts.iter().sum()
}

/// Rescale every row to unit norm (rows of norm 0 are left alone).
pub fn normalize_rows(w: &mut [f32], d: usize) {
    w.par_chunks_mut(d).with_min_len(64).for_each(|r| {
        let n = (dot(r, r) as f64).sqrt();
        if n > 0.0 {
            let inv = (1.0 / n) as f32;
            r.iter_mut().for_each(|v| *v *= inv);
        }
    });
}

/// Row norms.
pub fn row_norms(w: &[f32], d: usize) -> Vec<f32> {
    w.par_chunks(d)
        .map(|r| (dot(r, r) as f64).sqrt() as f32)
        .collect()
}

/// Weiszfeld geometric median of the rows of `x` [rows, d], started from the mean,
/// at most `max_iter` iterations, stopping when the update moves less than `tol`.
pub fn geometric_median(x: &[f32], rows: usize, d: usize, max_iter: usize, tol: f64) -> Vec<f32> {
    let mut y = mean_rows(x, rows, d);
    for _ in 0..max_iter {
        let parts: Vec<(Vec<f64>, f64)> = x
            .par_chunks(d * 64)
            .map(|blk| {
                let mut num = vec![0f64; d];
                let mut den = 0f64;
                for row in blk.chunks_exact(d) {
                    let dist = row
                        .iter()
                        .zip(&y)
                        .map(|(&a, &b)| (a as f64 - b).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    let w = 1.0 / dist.max(1e-8);
                    den += w;
                    for (n, &a) in num.iter_mut().zip(row) {
                        *n += w * a as f64;
                    }
                }
                (num, den)
            })
            .collect();
        let mut num = vec![0f64; d];
        let mut den = 0f64;
        for (n, w) in parts {
            den += w;
            for (a, b) in num.iter_mut().zip(n) {
                *a += b;
            }
        }
        let new: Vec<f64> = num.iter().map(|v| v / den).collect();
        let moved = new
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        y = new;
        if moved < tol {
            break;
        }
    }
    y.iter().map(|&v| v as f32).collect()
}

pub fn mean_rows(x: &[f32], rows: usize, d: usize) -> Vec<f64> {
    let mut m = vec![0f64; d];
    for part in col_sums(x, d, None) {
        for (a, b) in m.iter_mut().zip(part) {
            *a += b;
        }
    }
    m.iter_mut().for_each(|v| *v /= rows.max(1) as f64);
    m
}

/// Per-chunk column sums of `x` (or of `(x - center)^2`), in fixed 256-row chunks so the
/// f64 result is reproducible whatever the thread count.
fn col_sums(x: &[f32], d: usize, center: Option<&[f64]>) -> Vec<Vec<f64>> {
    x.par_chunks(d * 256)
        .map(|blk| {
            let mut acc = vec![0f64; d];
            for row in blk.chunks_exact(d) {
                match center {
                    None => acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64),
                    Some(c) => acc
                        .iter_mut()
                        .zip(row)
                        .zip(c)
                        .for_each(|((a, &v), &m)| *a += (v as f64 - m).powi(2)),
                }
            }
            acc
        })
        .collect()
}

/// Total variance `sum_j Var_rows(x_j)` in f64 (the FVU denominator).
pub fn total_variance(x: &[f32], rows: usize, d: usize) -> f64 {
    let m = mean_rows(x, rows, d);
    let s: f64 = col_sums(x, d, Some(&m))
        .iter()
        .map(|p| p.iter().sum::<f64>())
        .sum();
    s / rows.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use saelab_core::rng::Rng;

    fn randn(r: &mut Rng, n: usize) -> Vec<f32> {
        let mut v = vec![0f32; n];
        r.fill_normal(&mut v, 1.0);
        v
    }

    #[test]
    fn topk_matches_sort_reference() {
        let mut r = Rng::new(5);
        let mut buf = Vec::new();
        for &(n, k) in &[
            (1usize, 1usize),
            (7, 3),
            (100, 40),
            (1000, 40),
            (333, 1),
            (64, 64),
            (50, 60),
        ] {
            for trial in 0..20 {
                let mut row = randn(&mut r, n);
                if trial % 3 == 0 {
                    // Mostly negative rows: fewer than k positive values.
                    row.iter_mut().for_each(|v| *v -= 2.0);
                }
                if trial % 5 == 0 && n > 4 {
                    row[1] = row[3]; // ties
                }
                // Fed in uneven chunks with a bias, as two disjoint column ranges merged
                // (the encoder's GEMM tasks and tiles): same as the whole summed row.
                let bias: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
                let summed: Vec<f32> = row.iter().zip(&bias).map(|(a, b)| a + b).collect();
                topk_select(&summed, k, 0.0, &mut buf);
                let split = n / 3;
                let mut merged = Vec::new();
                for range in [0..split, split..n] {
                    let mut run = TopkStream::new(0.0);
                    let mut c = range.start;
                    while c < range.end {
                        let len = (1 + r.below(40)).min(range.end - c);
                        run.feed(&row[c..c + len], Some(&bias[c..c + len]), c, k);
                        c += len;
                    }
                    merged.extend(run.buf);
                }
                keep_topk(&mut merged, k);
                assert_eq!(merged, buf, "chunked + merged, n={n} k={k}");
                topk_select(&row, k, 0.0, &mut buf);
                let mut all: Vec<(f32, u32)> = row
                    .iter()
                    .enumerate()
                    .filter(|(_, &v)| v > 0.0)
                    .map(|(i, &v)| (v, i as u32))
                    .collect();
                all.sort_by(desc);
                all.truncate(k);
                all.sort_by_key(|e| e.1);
                assert_eq!(buf, all, "n={n} k={k}");
            }
        }
    }

    #[test]
    fn decode_and_grads_match_dense() {
        let mut r = Rng::new(9);
        let (rows, f, d) = (13, 29, 11);
        let w = randn(&mut r, f * d);
        let bias = randn(&mut r, d);
        let mut dense = vec![0f32; rows * f];
        for v in dense.iter_mut() {
            if r.f32() < 0.2 {
                *v = r.normal();
            }
        }
        let codes = crate::codes::SparseCodes::from_dense(&dense, rows, f);
        let mut out = vec![0f32; rows * d];
        decode(
            &codes.offsets,
            &codes.idx,
            &codes.val,
            &w,
            d,
            Some(&bias),
            &mut out,
        );
        for i in 0..rows {
            for j in 0..d {
                let mut s = bias[j] as f64;
                for l in 0..f {
                    s += dense[i * f + l] as f64 * w[l * d + j] as f64;
                }
                assert!((s - out[i * d + j] as f64).abs() < 1e-4);
            }
        }
        let dy = randn(&mut r, rows * d);
        let mut gv = vec![0f32; codes.nnz()];
        grad_vals(&codes.offsets, &codes.idx, &w, d, &dy, d, &|_| 0, &mut gv);
        let er = entry_rows(&codes.offsets);
        for p in 0..codes.nnz() {
            let (row, l) = (er[p] as usize, codes.idx[p] as usize);
            let s: f64 = (0..d)
                .map(|j| dy[row * d + j] as f64 * w[l * d + j] as f64)
                .sum();
            assert!((s - gv[p] as f64).abs() < 1e-4);
        }
        // dW[l] = sum_r val * dy[r] via the CSC, against the dense outer product.
        let csc = Csc::build(f, &er, &codes.idx);
        let mut g = vec![0f32; f * d];
        let sums = accum_rows(&csc, &codes.val, &dy, d, &|_| 0, d, &mut g);
        for l in 0..f {
            let s: f64 = (0..rows).map(|i| dense[i * f + l] as f64).sum();
            assert!((s - sums[l] as f64).abs() < 1e-4);
            for j in 0..d {
                let s: f64 = (0..rows)
                    .map(|i| dense[i * f + l] as f64 * dy[i * d + j] as f64)
                    .sum();
                assert!((s - g[l * d + j] as f64).abs() < 1e-4);
            }
        }
        let mut g2 = vec![0f32; f * d];
        let mut gv2 = vec![0f32; codes.nnz()];
        decoder_backward(&csc, &codes.val, &w, d, &dy, d, &|_| 0, &mut g2, &mut gv2);
        assert_eq!(g2, g, "fused backward, weight part");
        for (a, b) in gv2.iter().zip(&gv) {
            assert!((a - b).abs() < 1e-5, "fused backward, value part");
        }
        let ws = weighted_row_sum(&w, &sums, d);
        for j in 0..d {
            let s: f64 = (0..f).map(|l| sums[l] as f64 * w[l * d + j] as f64).sum();
            assert!((s - ws[j] as f64).abs() < 1e-3);
        }

        // The dense kernels give the same results as the sparse ones (entries with
        // repeats: the aux path can list a (row, latent) twice).
        let close = |a: &[f32], b: &[f32], what: &str| {
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                    "{what}: {x} vs {y}"
                );
            }
        };
        assert!(dense_pays(codes.nnz(), rows, f));
        let fd = densify(&er, &codes.idx, &codes.val, rows, f);
        assert_eq!(fd, dense);
        let mut out_d = vec![0f32; rows * d];
        decode_dense(&fd, rows, f, &w, d, &bias, &mut out_d, MatmulPrecision::F32);
        close(&out_d, &out, "dense decode");
        let (mut g3, mut gv3) = (vec![0f32; f * d], vec![0f32; codes.nnz()]);
        decoder_backward_dense(
            &fd,
            rows,
            f,
            &er,
            &codes.idx,
            &w,
            d,
            &dy,
            &mut g3,
            &mut gv3,
            MatmulPrecision::F32,
        );
        close(&g3, &g, "dense backward, weight part");
        close(&gv3, &gv, "dense backward, value part");
        let mut rows_rep = er.clone();
        rows_rep.push(er[0]);
        let mut lat_rep = codes.idx.clone();
        lat_rep.push(codes.idx[0]);
        let mut coef_rep = codes.val.clone();
        coef_rep.push(0.5);
        let csc_rep = Csc::build(f, &rows_rep, &lat_rep);
        let mut g4 = vec![0f32; f * d];
        let s4 = accum_rows(&csc_rep, &coef_rep, &dy, d, &|_| 0, d, &mut g4);
        let mut g5 = vec![0f32; f * d];
        let s5 = accum_rows_dense(
            &rows_rep,
            &lat_rep,
            &coef_rep,
            &dy,
            rows,
            f,
            d,
            &mut g5,
            MatmulPrecision::F32,
        );
        close(&g5, &g4, "dense accum_rows");
        close(&s5, &s4, "dense accum_rows sums");
        assert!(!dense_pays(rows * f / 20, rows, f));
    }

    /// The tiled TopK encoder (threaded: several GEMM tasks merged) selects exactly what
    /// a full pre-activation matrix would give, AuxK included, also for rows with fewer
    /// than k positive values.
    /// An encoder_topk case: random `[f, d]` weights, bias `low.1` on every `low.0`-th
    /// latent and -0.5 elsewhere, AuxK columns `l % aux.0 == aux.1`.
    fn topk_case(
        r: &mut Rng,
        f: usize,
        d: usize,
        low: (usize, f32),
        aux: (u32, u32),
    ) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
        let w = randn(r, f * d);
        let bias = (0..f)
            .map(|l| if l % low.0 == 0 { low.1 } else { -0.5 })
            .collect();
        let aux_cols = (0..f as u32).filter(|l| l % aux.0 == aux.1).collect();
        (w, bias, aux_cols)
    }

    #[test]
    fn encoder_topk_matches_full_rows() {
        let mut r = Rng::new(12);
        let (rows, f, d, k, k_aux) = (70, 2100, 24, 40, 20);
        let mut x = randn(&mut r, rows * d);
        // A few rows pushed negative: fewer than k positive pre-activations.
        for i in (0..rows).step_by(9) {
            x[i * d..(i + 1) * d].iter_mut().for_each(|v| *v *= 0.05);
        }
        let (w, bias, aux_cols) = topk_case(&mut r, f, d, (9, -3.0), (13, 5));
        let wt = MatRef::row_major(&w, f, d).t();
        let got = encoder_topk(
            &x,
            rows,
            wt,
            &bias,
            k,
            0.0,
            &aux_cols,
            k_aux,
            MatmulPrecision::F32,
        );
        let mut pre = vec![0f32; rows * f];
        gemm(
            1.0,
            MatRef::row_major(&x, rows, d),
            MatRef::row_major(&w, f, d).t(),
            0.0,
            MatMut::row_major(&mut pre, rows, f),
        );
        let mut buf = Vec::new();
        let mut short_rows = 0;
        for i in 0..rows {
            let row: Vec<f32> = pre[i * f..(i + 1) * f]
                .iter()
                .zip(&bias)
                .map(|(a, b)| a + b)
                .collect();
            topk_select(&row, k, 0.0, &mut buf);
            short_rows += (buf.len() < k) as usize;
            assert_eq!(got[i].main, buf, "row {i}");
            let mut aux: Vec<(f32, u32)> = aux_cols.iter().map(|&l| (row[l as usize], l)).collect();
            aux.sort_by(desc);
            aux.truncate(k_aux);
            aux.sort_by_key(|e| e.1);
            assert_eq!(got[i].aux, aux, "aux row {i}");
        }
        assert!(
            short_rows > 0,
            "no row with fewer than k positive values was tested"
        );
    }

    /// bf16 selection: the latents of the top-k of the bf16-rounded products (reference in
    /// f64), with values recomputed in f32.
    #[test]
    fn encoder_topk_bf16_selects_from_rounded_products_with_f32_values() {
        let mut r = Rng::new(13);
        let (rows, f, d, k, k_aux) = (70, 2100, 40, 40, 20);
        let x = randn(&mut r, rows * d);
        let (w, bias, aux_cols) = topk_case(&mut r, f, d, (7, -2.0), (11, 3));
        let wt = MatRef::row_major(&w, f, d).t();
        let got = encoder_topk(
            &x,
            rows,
            wt,
            &bias,
            k,
            0.0,
            &aux_cols,
            k_aux,
            MatmulPrecision::Bf16,
        );
        let round = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
        for i in 0..rows {
            let xi = &x[i * d..(i + 1) * d];
            let exact: Vec<f32> = (0..f)
                .map(|l| dot(xi, &w[l * d..(l + 1) * d]) + bias[l])
                .collect();
            let rounded: Vec<f64> = (0..f)
                .map(|l| {
                    let s: f64 = (0..d).map(|j| round(xi[j]) * round(w[l * d + j])).sum();
                    s + bias[l] as f64
                })
                .collect();
            let top = |cols: &mut dyn Iterator<Item = usize>, n: usize, floor: f64| {
                let mut v: Vec<(f64, usize)> = cols
                    .map(|l| (rounded[l], l))
                    .filter(|e| e.0 > floor)
                    .collect();
                v.sort_by(|a, b| b.0.total_cmp(&a.0));
                v.truncate(n);
                let mut ls: Vec<u32> = v.into_iter().map(|e| e.1 as u32).collect();
                ls.sort();
                ls
            };
            let want_main = top(&mut (0..f), k, 0.0);
            let want_aux = top(&mut aux_cols.iter().map(|&l| l as usize), k_aux, f64::MIN);
            let main: Vec<u32> = got[i].main.iter().map(|e| e.1).collect();
            let aux: Vec<u32> = got[i].aux.iter().map(|e| e.1).collect();
            // An entry whose f32 value is not above the floor is dropped after recompute.
            let kept: Vec<u32> = want_main
                .iter()
                .copied()
                .filter(|&l| exact[l as usize] > 0.0)
                .collect();
            assert_eq!(main, kept, "row {i}");
            assert_eq!(aux, want_aux, "aux row {i}");
            for &(v, l) in got[i].main.iter().chain(&got[i].aux) {
                assert!(
                    (v - exact[l as usize]).abs() <= 1e-5 * (1.0 + v.abs()),
                    "row {i}"
                );
            }
        }
    }

    #[test]
    fn encoder_blocks_match_gemm_reference() {
        let mut r = Rng::new(2);
        let (rows, f, d) = (37, 50, 19);
        let x = randn(&mut r, rows * d);
        let w = randn(&mut r, f * d);
        let mut buf = Vec::new();
        for precision in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
            let mut got = vec![0f32; rows * f];
            encoder_blocks(&x, rows, d, &w, f, 8, &mut buf, precision, |r0, blk| {
                got[r0 * f..r0 * f + blk.len()].copy_from_slice(blk);
            });
            let zero = vec![0f32; f];
            let mut one = vec![0f32; f];
            let mut max_err = 0f64;
            for i in 0..rows {
                pre_row(&x[i * d..(i + 1) * d], &w, &zero, &mut one);
                for l in 0..f {
                    let terms = (0..d).map(|j| x[i * d + j] as f64 * w[l * d + j] as f64);
                    let s: f64 = terms.clone().sum();
                    // bf16 rounds both factors by <= 2^-9 each: <= ~2^-8 of sum |terms|.
                    let tol = match precision {
                        MatmulPrecision::F32 => 1e-4,
                        MatmulPrecision::Bf16 => terms.map(f64::abs).sum::<f64>() / 250.0,
                    };
                    let e = (s - got[i * f + l] as f64).abs();
                    assert!(e < tol, "{precision:?} ({i}, {l}): {e}");
                    max_err = max_err.max(e);
                    assert!((s - one[l] as f64).abs() < 1e-4);
                }
            }
            // The bf16 path did round (its error is far above f32 summation's).
            assert_eq!(
                precision == MatmulPrecision::Bf16,
                max_err > 1e-4,
                "{max_err}"
            );
        }
    }

    #[test]
    fn adam_matches_scalar_reference() {
        let mut r = Rng::new(4);
        let n = 100_003;
        let mut p = randn(&mut r, n);
        let mut m = vec![0f32; n];
        let mut v = vec![0f32; n];
        let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
        for t in 1..=3u64 {
            let g = randn(&mut r, n);
            let mut g1 = g.clone();
            let h = AdamHyper {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                t,
                gscale: 1.0,
            };
            adam_step(&mut p, &mut g1, &mut m, &mut v, h);
            assert!(g1.iter().all(|&x| x == 0.0));
            for i in 0..n {
                m2[i] = 0.9 * m2[i] + 0.1 * g[i];
                v2[i] = 0.999 * v2[i] + 0.001 * g[i] * g[i];
                let mh = m2[i] as f64 / (1.0 - 0.9f64.powi(t as i32));
                let vh = v2[i] as f64 / (1.0 - 0.999f64.powi(t as i32));
                p2[i] -= (1e-2 * mh / (vh.sqrt() + 1e-8)) as f32;
            }
        }
        for i in 0..n {
            assert!((p[i] - p2[i]).abs() < 1e-5, "{} {}", p[i], p2[i]);
        }
    }

    #[test]
    fn adam_unit_rows_equals_adam_then_normalise() {
        let mut r = Rng::new(6);
        let (rows, d) = (50, 700);
        let p0 = randn(&mut r, rows * d);
        let g0 = randn(&mut r, rows * d);
        let m0 = randn(&mut r, rows * d);
        let v0: Vec<f32> = randn(&mut r, rows * d).iter().map(|x| x.abs()).collect();
        let h = AdamHyper {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 7,
            gscale: 0.5,
        };
        let (mut p1, mut g1, mut m1, mut v1) = (p0.clone(), g0.clone(), m0.clone(), v0.clone());
        adam_step(&mut p1, &mut g1, &mut m1, &mut v1, h);
        normalize_rows(&mut p1, d);
        let (mut p2, mut g2, mut m2, mut v2) = (p0.clone(), g0.clone(), m0.clone(), v0.clone());
        adam_step_unit_rows(&mut p2, &mut g2, &mut m2, &mut v2, h, d);
        assert_eq!(p1, p2);
        assert_eq!((m1, v1, g1), (m2, v2, g2));
        // gscale is the same as scaling the gradient beforehand.
        let (mut p3, mut m3, mut v3) = (p0.clone(), m0.clone(), v0.clone());
        let mut g3: Vec<f32> = g0.iter().map(|x| x * 0.5).collect();
        adam_step(
            &mut p3,
            &mut g3,
            &mut m3,
            &mut v3,
            AdamHyper { gscale: 1.0, ..h },
        );
        let (mut p4, mut m4, mut v4, mut g4) = (p0.clone(), m0.clone(), v0.clone(), g0.clone());
        adam_step(&mut p4, &mut g4, &mut m4, &mut v4, h);
        assert_eq!(p3, p4);
    }

    #[test]
    fn parallel_removal_and_norms() {
        let mut r = Rng::new(8);
        let d = 10;
        let mut w = randn(&mut r, 4 * d);
        normalize_rows(&mut w, d);
        for n in row_norms(&w, d) {
            assert!((n - 1.0).abs() < 1e-6);
        }
        let mut g = randn(&mut r, 4 * d);
        let g0 = g.clone();
        let ss = remove_parallel(&w, &mut g, d, &[true, false, true, true]);
        let want: f64 = [0, 2, 3]
            .iter()
            .map(|&r| {
                g[r * d..(r + 1) * d]
                    .iter()
                    .map(|&v| (v as f64).powi(2))
                    .sum::<f64>()
            })
            .sum();
        assert!((ss - want).abs() < 1e-5 * want);
        assert!(dot(&g[0..d], &w[0..d]).abs() < 1e-5);
        assert_eq!(&g[d..2 * d], &g0[d..2 * d]);
        let exact: f64 = g0.iter().map(|&v| (v as f64).powi(2)).sum();
        assert!((sum_sq(&g0) - exact).abs() < 1e-6 * exact);
    }

    #[test]
    fn variance_matches_two_pass_reference() {
        let mut r = Rng::new(12);
        let (rows, d) = (700, 5);
        let x = randn(&mut r, rows * d);
        let mut want = 0f64;
        for j in 0..d {
            let m: f64 = (0..rows).map(|i| x[i * d + j] as f64).sum::<f64>() / rows as f64;
            want += (0..rows)
                .map(|i| (x[i * d + j] as f64 - m).powi(2))
                .sum::<f64>()
                / rows as f64;
        }
        assert!((total_variance(&x, rows, d) - want).abs() < 1e-9 * want);
    }

    #[test]
    fn geometric_median_resists_outliers() {
        let mut r = Rng::new(1);
        let (rows, d) = (201, 3);
        let mut x = randn(&mut r, rows * d);
        for v in x[..30 * d].iter_mut() {
            *v += 100.0; // 15% far outliers pull the mean, not the median
        }
        let gm = geometric_median(&x, rows, d, 100, 1e-5);
        let mean = mean_rows(&x, rows, d);
        assert!(mean[0] > 10.0);
        assert!(gm.iter().all(|v| v.abs() < 1.0), "{gm:?}");
        // The median minimises the sum of distances: compare with small perturbations.
        let cost = |y: &[f32]| -> f64 {
            x.chunks(d)
                .map(|row| {
                    row.iter()
                        .zip(y)
                        .map(|(a, b)| ((a - b) as f64).powi(2))
                        .sum::<f64>()
                        .sqrt()
                })
                .sum()
        };
        let c0 = cost(&gm);
        for j in 0..d {
            for s in [-0.05f32, 0.05] {
                let mut y = gm.clone();
                y[j] += s;
                assert!(cost(&y) >= c0 - 1e-6);
            }
        }
    }
}
