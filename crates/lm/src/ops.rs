//! Shared transformer operations used by every architecture: RMSNorm, rotary embeddings,
//! softmax, activations, linear layers on `saelab_core::gemm`, and causal grouped-query
//! attention parallelised over (batch, head).
//!
//! Activations are row-major `[rows, width]` f32 buffers; weights are PyTorch-layout
//! `[out, in]` matrices, so a linear layer is `y = x W^T` with `W^T` a free strided view.

use half::bf16;
use rayon::prelude::*;
use saelab_core::gemm::amx::{gemm_bf16_products, PackedBf16};
use saelab_core::gemm::{gemm, gemm_bf16b, gemm_serial, BfMatRef, MatMut, MatRef};

/// A weight matrix `[out, in]`: row-major f32; row-major bf16 (half the memory, products
/// and sums still f32: the GEMM widens bf16 while packing); or bf16 packed for bf16
/// products (`W^T` in AMX tiles, inputs rounded to bf16 too, sums f32).
pub enum Mat {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    Bf16Products(PackedBf16),
}

impl From<Vec<f32>> for Mat {
    fn from(v: Vec<f32>) -> Mat {
        Mat::F32(v)
    }
}

impl Mat {
    /// The same matrix stored as bf16 (round to nearest even).
    pub fn to_bf16(self) -> Mat {
        match self {
            Mat::F32(v) => Mat::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            m => m,
        }
    }

    /// The same matrix (`rows x cols`) packed for bf16 products (round to nearest even).
    pub fn to_bf16_products(self, rows: usize, cols: usize) -> Mat {
        let packed = match &self {
            Mat::F32(v) => PackedBf16::pack(MatRef::row_major(v, rows, cols).t()),
            Mat::Bf16(v) => {
                let f: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
                PackedBf16::pack(MatRef::row_major(&f, rows, cols).t())
            }
            Mat::Bf16Products(_) => return self,
        };
        Mat::Bf16Products(packed)
    }

    /// Copy row `r` (of width `out.len()`) as f32 into `out`, times `scale`.
    pub fn row_into(&self, r: usize, out: &mut [f32], scale: f32) {
        let d = out.len();
        match self {
            Mat::F32(v) => {
                for (o, &x) in out.iter_mut().zip(&v[r * d..(r + 1) * d]) {
                    *o = x * scale;
                }
            }
            Mat::Bf16(v) => {
                for (o, &x) in out.iter_mut().zip(&v[r * d..(r + 1) * d]) {
                    *o = x.to_f32() * scale;
                }
            }
            // Packed as W^T: row r of W is column r of the packed matrix.
            Mat::Bf16Products(p) => {
                for (c, o) in out.iter_mut().enumerate() {
                    *o = p.at(c, r) * scale;
                }
            }
        }
    }

    /// Bytes of storage.
    pub fn bytes(&self) -> usize {
        match self {
            Mat::F32(v) => v.len() * 4,
            Mat::Bf16(v) => v.len() * 2,
            Mat::Bf16Products(p) => p.bytes(),
        }
    }
}

/// `out[r] = x[r] / rms(x[r]) * w` (w is the effective multiplier: Gemma's `1 + w` is folded
/// in at load). The mean square is accumulated in f64-free f32 pairs of lanes; d is small.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    out.par_chunks_mut(d * 16)
        .zip(x.par_chunks(d * 16))
        .for_each(|(o, xi)| {
            for (orow, xrow) in o.chunks_exact_mut(d).zip(xi.chunks_exact(d)) {
                rmsnorm_row(xrow, w, eps, orow);
            }
        });
}

#[inline]
pub fn rmsnorm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, &xv), &wv) in out.iter_mut().zip(x).zip(w) {
        *o = xv * inv * wv;
    }
}

/// `y[rows, out] = x[rows, in] W^T + beta * y` with W `[out, in]` row-major.
fn linear_beta(
    x: &[f32],
    rows: usize,
    w: &Mat,
    n_out: usize,
    n_in: usize,
    beta: f32,
    y: &mut [f32],
) {
    let a = MatRef::row_major(&x[..rows * n_in], rows, n_in);
    let c = MatMut::row_major(&mut y[..rows * n_out], rows, n_out);
    match w {
        Mat::F32(w) => gemm(
            1.0,
            a,
            MatRef::row_major(&w[..n_out * n_in], n_out, n_in).t(),
            beta,
            c,
        ),
        Mat::Bf16(w) => gemm_bf16b(
            1.0,
            a,
            BfMatRef::row_major(&w[..n_out * n_in], n_out, n_in).t(),
            beta,
            c,
        ),
        Mat::Bf16Products(p) => {
            assert!(
                p.rows() == n_in && p.cols() == n_out,
                "linear: packed weight shape"
            );
            gemm_bf16_products(a, p, beta != 0.0, c)
        }
    }
}

/// `y[rows, out] = x[rows, in] W^T` with W `[out, in]` row-major.
pub fn linear(x: &[f32], rows: usize, w: &Mat, n_out: usize, n_in: usize, y: &mut [f32]) {
    linear_beta(x, rows, w, n_out, n_in, 0.0, y)
}

/// `y += x W^T` (accumulate into the residual stream).
pub fn linear_acc(x: &[f32], rows: usize, w: &Mat, n_out: usize, n_in: usize, y: &mut [f32]) {
    linear_beta(x, rows, w, n_out, n_in, 1.0, y)
}

/// Rotary embedding tables for positions `0..max_pos`: `cos[p * half + i]`, `sin[...]`,
/// with frequency `theta^(-2i/head_dim)` (computed in f64 like the reference's float64
/// inverse frequencies, then rounded).
pub struct Rope {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, max_pos: usize) -> Rope {
        let half = head_dim / 2;
        let mut cos = vec![0f32; max_pos * half];
        let mut sin = vec![0f32; max_pos * half];
        for p in 0..max_pos {
            for i in 0..half {
                // The reference computes inv_freq in f32 and the angle as an f32 product.
                let inv = (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32;
                let ang = p as f32 * inv;
                cos[p * half + i] = ang.cos();
                sin[p * half + i] = ang.sin();
            }
        }
        Rope { half, cos, sin }
    }

    /// Rotate one head vector in place at position `pos`, half-split ("NeoX") layout:
    /// pairs are (x[i], x[i + half]).
    #[inline]
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let h = self.half;
        let c = &self.cos[pos * h..(pos + 1) * h];
        let s = &self.sin[pos * h..(pos + 1) * h];
        let (a, b) = x.split_at_mut(h);
        for i in 0..h {
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * c[i] - x1 * s[i];
            b[i] = x1 * c[i] + x0 * s[i];
        }
    }
}

/// Apply RoPE to the q and k heads of a fused `[batch*seq, (nh + 2*nkv) * hd]` QKV buffer,
/// positions `0..seq` within each row of the batch.
pub fn rope_qkv(qkv: &mut [f32], seq: usize, n_heads: usize, n_kv: usize, hd: usize, rope: &Rope) {
    let w = (n_heads + 2 * n_kv) * hd;
    qkv.par_chunks_mut(w).enumerate().for_each(|(r, row)| {
        let pos = r % seq;
        for h in 0..n_heads + n_kv {
            rope.apply(&mut row[h * hd..(h + 1) * hd], pos);
        }
    });
}

/// `exp(x)` for f32 without libm: `2^n * p(r)` with `x = n ln2 + r`, `|r| <= ln2/2`, and a
/// degree-7 Taylor polynomial (relative error < 2e-7 over the clamped range). Branch-free,
/// so loops over slices vectorise (16 lanes inside the `avx512f` functions below); libm's
/// scalar `expf` was ~9% of a forward.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

/// GELU, tanh approximation (PyTorch `gelu(approximate="tanh")`), with
/// `tanh(y) = 1 - 2 / (exp(2y) + 1)`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let y = C * (x + 0.044715 * x * x * x);
    let t = 1.0 - 2.0 / (exp_fast(2.0 * y) + 1.0);
    0.5 * x * (1.0 + t)
}

/// Gated-MLP activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatedAct {
    /// SwiGLU: `silu(gate) * up` (Llama).
    Silu,
    /// GeGLU: `gelu_tanh(gate) * up` (Gemma-2).
    GeluTanh,
}

#[inline(always)]
fn gated_row(gate: &[f32], up: &[f32], out: &mut [f32], act: GatedAct) {
    match act {
        GatedAct::Silu => {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = silu(g) * u;
            }
        }
        GatedAct::GeluTanh => {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = gelu_tanh(g) * u;
            }
        }
    }
}

/// The same loop compiled for AVX-512, so the branch-free activations use 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gated_row_avx512(gate: &[f32], up: &[f32], out: &mut [f32], act: GatedAct) {
    gated_row(gate, up, out, act)
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Gated MLP activation: `out[r, j] = act(gu[r, j]) * gu[r, ff + j]` over a fused
/// `[rows, 2*ff]` gate|up buffer.
pub fn gated_act(gu: &[f32], ff: usize, out: &mut [f32], act: GatedAct) {
    let wide = has_avx512();
    out.par_chunks_mut(ff * 8)
        .zip(gu.par_chunks(2 * ff * 8))
        .for_each(|(o, g)| {
            for (orow, grow) in o.chunks_exact_mut(ff).zip(g.chunks_exact(2 * ff)) {
                let (gate, up) = grow.split_at(ff);
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: avx512f was detected at run time.
                    unsafe { gated_row_avx512(gate, up, orow, act) };
                    continue;
                }
                let _ = wide;
                gated_row(gate, up, orow, act);
            }
        });
}

#[inline(always)]
fn softmax_impl(x: &mut [f32]) {
    // Max and sum over 16 independent lanes: a plain fold is a serial dependency
    // chain (f32 max/add are not reassociated), which kept the loop scalar.
    const L: usize = 16;
    let mut mx = [f32::NEG_INFINITY; L];
    let mut chunks = x.chunks_exact(L);
    for c in &mut chunks {
        for (m, &v) in mx.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    let m = chunks.remainder().iter().fold(
        mx.iter().cloned().fold(f32::NEG_INFINITY, f32::max),
        |a, &v| a.max(v),
    );
    let mut sum = [0f32; L];
    let mut chunks = x.chunks_exact_mut(L);
    for c in &mut chunks {
        for (s, v) in sum.iter_mut().zip(c.iter_mut()) {
            *v = exp_fast(*v - m);
            *s += *v;
        }
    }
    let mut s: f32 = 0.0;
    for v in chunks.into_remainder() {
        *v = exp_fast(*v - m);
        s += *v;
    }
    s += sum.iter().sum::<f32>();
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_avx512(x: &mut [f32]) {
    softmax_impl(x)
}

/// In-place numerically stable softmax of a row.
#[inline]
pub fn softmax(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: avx512f was detected at run time.
        unsafe { softmax_avx512(x) };
        return;
    }
    softmax_impl(x)
}

/// Attention hyper-parameters.
#[derive(Clone, Copy, Debug)]
pub struct AttnParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplier of q·k (1/sqrt(head_dim), or Gemma-2's query_pre_attn_scalar^-0.5).
    pub scale: f32,
    /// Gemma-2 attention logit soft-capping: `cap * tanh(s / cap)`.
    pub softcap: Option<f32>,
    /// Sliding window: query i sees keys j with `i - j < window`.
    pub window: Option<usize>,
}

/// Scratch buffers for [`attention`], reused across layers and calls.
#[derive(Default)]
pub struct AttnScratch {
    scores: Vec<f32>,
    heads: Vec<f32>,
}

/// Causal grouped-query attention over a fused QKV buffer `[batch*seq, (nh+2nkv)*hd]`
/// (q heads, then k heads, then v heads). Writes `[batch*seq, nh*hd]` to `out`.
/// One task per (batch, head); QK^T and PV are GEMMs on strided views of `qkv`.
pub fn attention(
    qkv: &[f32],
    batch: usize,
    seq: usize,
    p: &AttnParams,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    let (nh, nkv, hd) = (p.n_heads, p.n_kv_heads, p.head_dim);
    let w = (nh + 2 * nkv) * hd;
    let group = nh / nkv;
    scratch.scores.resize(batch * nh * seq * seq, 0.0);
    scratch.heads.resize(batch * nh * seq * hd, 0.0);
    scratch
        .scores
        .par_chunks_mut(seq * seq)
        .zip(scratch.heads.par_chunks_mut(seq * hd))
        .enumerate()
        .for_each(|(bh, (sc, oh))| {
            let (b, h) = (bh / nh, bh % nh);
            let g = h / group;
            let base = b * seq * w;
            let view = |col: usize| MatRef {
                data: &qkv[base + col..base + (seq - 1) * w + col + hd],
                rows: seq,
                cols: hd,
                rs: w as isize,
                cs: 1,
            };
            let q = view(h * hd);
            let k = view((nh + g) * hd);
            let v = view((nh + nkv + g) * hd);
            gemm_serial(p.scale, q, k.t(), 0.0, MatMut::row_major(sc, seq, seq));
            for i in 0..seq {
                let row = &mut sc[i * seq..(i + 1) * seq];
                let lo = match p.window {
                    Some(win) => (i + 1).saturating_sub(win),
                    None => 0,
                };
                if let Some(cap) = p.softcap {
                    for s in &mut row[lo..=i] {
                        *s = cap * (*s / cap).tanh();
                    }
                }
                softmax(&mut row[lo..=i]);
                row[..lo].fill(0.0);
                row[i + 1..].fill(0.0);
            }
            gemm_serial(
                1.0,
                MatRef::row_major(sc, seq, seq),
                v,
                0.0,
                MatMut::row_major(oh, seq, hd),
            );
        });
    // Scatter [b, h, s, hd] back to [b*s, h*hd] rows.
    let heads = &scratch.heads;
    out.par_chunks_mut(nh * hd)
        .enumerate()
        .for_each(|(r, orow)| {
            let (b, s) = (r / seq, r % seq);
            for h in 0..nh {
                let src = ((b * nh + h) * seq + s) * hd;
                orow[h * hd..(h + 1) * hd].copy_from_slice(&heads[src..src + hd]);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use saelab_core::rng::Rng;

    /// Direct per-query reference of attention (f64), for random inputs.
    fn attention_ref(qkv: &[f32], batch: usize, seq: usize, p: &AttnParams) -> Vec<f32> {
        let (nh, nkv, hd) = (p.n_heads, p.n_kv_heads, p.head_dim);
        let w = (nh + 2 * nkv) * hd;
        let mut out = vec![0f32; batch * seq * nh * hd];
        for b in 0..batch {
            for h in 0..nh {
                let g = h / (nh / nkv);
                for i in 0..seq {
                    let qi = &qkv[(b * seq + i) * w + h * hd..][..hd];
                    let mut s: Vec<(usize, f64)> = Vec::new();
                    for j in 0..=i {
                        if let Some(win) = p.window {
                            if i - j >= win {
                                continue;
                            }
                        }
                        let kj = &qkv[(b * seq + j) * w + (nh + g) * hd..][..hd];
                        let mut dot: f64 =
                            qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        dot *= p.scale as f64;
                        if let Some(c) = p.softcap {
                            dot = c as f64 * (dot / c as f64).tanh();
                        }
                        s.push((j, dot));
                    }
                    let m = s.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x.1 - m).exp()).sum();
                    for e in 0..hd {
                        let mut acc = 0f64;
                        for &(j, sj) in &s {
                            acc += (sj - m).exp() / z
                                * qkv[(b * seq + j) * w + (nh + nkv + g) * hd + e] as f64;
                        }
                        out[(b * seq + i) * nh * hd + h * hd + e] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_reference() {
        let mut rng = Rng::new(3);
        for &(batch, seq, nh, nkv, hd, softcap, window) in &[
            (2usize, 7usize, 4usize, 2usize, 8usize, None, None),
            (1, 9, 3, 1, 6, Some(5.0f32), Some(3usize)),
            (3, 5, 2, 2, 4, None, Some(2)),
        ] {
            let p = AttnParams {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                scale: 0.7,
                softcap,
                window,
            };
            let w = (nh + 2 * nkv) * hd;
            let qkv: Vec<f32> = (0..batch * seq * w).map(|_| rng.normal()).collect();
            let mut out = vec![0f32; batch * seq * nh * hd];
            attention(&qkv, batch, seq, &p, &mut AttnScratch::default(), &mut out);
            let r = attention_ref(&qkv, batch, seq, &p);
            for (a, b) in out.iter().zip(&r) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn rope_rotates_pairs_and_preserves_norm() {
        let rope = Rope::new(8, 10000.0, 16);
        let mut rng = Rng::new(5);
        let x: Vec<f32> = (0..8).map(|_| rng.normal()).collect();
        let mut y = x.clone();
        rope.apply(&mut y, 5);
        for i in 0..4 {
            let ang = 5.0f64 * 10000f64.powf(-(2.0 * i as f64) / 8.0);
            let (c, s) = (ang.cos(), ang.sin());
            let e0 = x[i] as f64 * c - x[i + 4] as f64 * s;
            let e1 = x[i + 4] as f64 * c + x[i] as f64 * s;
            assert!((y[i] as f64 - e0).abs() < 1e-5 && (y[i + 4] as f64 - e1).abs() < 1e-5);
        }
        let mut z = x.clone();
        rope.apply(&mut z, 0);
        assert_eq!(z, x);
    }

    #[test]
    fn rmsnorm_and_activations_match_formulas() {
        let mut rng = Rng::new(9);
        let x: Vec<f32> = (0..12).map(|_| rng.normal()).collect();
        let w: Vec<f32> = (0..6).map(|_| rng.normal()).collect();
        let mut out = vec![0f32; 12];
        rmsnorm(&x, &w, 1e-5, &mut out);
        for r in 0..2 {
            let row = &x[r * 6..r * 6 + 6];
            let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 6.0;
            for j in 0..6 {
                let e = row[j] as f64 / (ms + 1e-5).sqrt() * w[j] as f64;
                assert!((out[r * 6 + j] as f64 - e).abs() < 1e-5);
            }
        }
        assert!((silu(1.5) - 1.5 / (1.0 + (-1.5f32).exp())).abs() < 1e-6);
        for i in -1740..=1760 {
            let x = i as f32 * 0.05;
            let (e, r) = (exp_fast(x) as f64, (x as f64).exp());
            assert!(((e - r) / r).abs() < 1e-6, "exp_fast({x}) = {e}, exp = {r}");
            let g = gelu_tanh(x) as f64;
            let gr = 0.5
                * x as f64
                * (1.0 + (0.7978845608 * (x as f64 + 0.044715 * (x as f64).powi(3))).tanh());
            assert!(
                (g - gr).abs() < 1e-6 * (1.0 + gr.abs()),
                "gelu_tanh({x}) = {g}, want {gr}"
            );
        }
        assert!(
            exp_fast(-1000.0) < 1e-37 && exp_fast(1000.0) > 1e38 && exp_fast(1000.0).is_finite()
        );
        let gu: Vec<f32> = (0..2 * 5 * 3).map(|_| rng.normal()).collect();
        for act in [GatedAct::Silu, GatedAct::GeluTanh] {
            let mut out = vec![0f32; 15];
            gated_act(&gu, 5, &mut out, act);
            for r in 0..3 {
                for j in 0..5 {
                    let (g, u) = (gu[r * 10 + j] as f64, gu[r * 10 + 5 + j] as f64);
                    let a = match act {
                        GatedAct::Silu => g / (1.0 + (-g).exp()),
                        GatedAct::GeluTanh => {
                            0.5 * g * (1.0 + (0.7978845608 * (g + 0.044715 * g.powi(3))).tanh())
                        }
                    };
                    assert!((out[r * 5 + j] as f64 - a * u).abs() < 1e-5);
                }
            }
        }
        // gelu_tanh(1) from PyTorch: 0.8411920
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-6);
        let mut s = vec![1.0, 2.0, 3.0];
        softmax(&mut s);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6 && s[2] > s[1]);
    }
}
