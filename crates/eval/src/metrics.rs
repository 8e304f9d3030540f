//! Core-evaluation metrics over plain matrices (SAEBench `evals/core`).
//!
//! [`CoreAccumulator`] takes batches of activations `x` [rows, d], their sparse codes
//! and reconstructions `x_hat`, plus a token mask (`false` = special token, skipped)
//! and computes reconstruction, shrinkage, sparsity and per-latent statistics, pooled
//! over batches exactly as SAEBench does (including its batch-wise quirks, reported
//! under SAEBench's names) and conventionally (reported as `*_conventional`).
//! [`loss_stats`] computes KL and CE from logits in f64 (log-sum-exp per position);
//! [`weight_metrics`] computes encoder/decoder norms and cosines, the max-cosine pass
//! blocked through the GEMM so no `F x F` matrix is ever held.

use saelab_core::gemm::{gemm, MatMut, MatRef};
use saelab_sae::codes::SparseCodes;
use saelab_sae::model::Sae;

/// Accumulates the sparsity/variance/shrinkage statistics over batches.
#[derive(Clone, Debug)]
pub struct CoreAccumulator {
    pub d: usize,
    pub d_sae: usize,
    n_tok: u64,
    sum_l2_in: f64,
    sum_l2_out: f64,
    sum_l2_ratio: f64,
    sum_l0: f64,
    sum_l1: f64,
    sum_cos: f64,
    sum_ev_legacy: f64,
    sum_mse_quirk: f64,
    sse_total: f64,
    sum_sq_x: f64,
    sum_x: Vec<f64>,
    batch_a: Vec<f64>,
    batch_r: Vec<f64>,
    batch_rrb: Vec<f64>,
    fire_tokens: Vec<u64>,
    fire_seqs: Vec<u64>,
    last_seq: Vec<u64>,
    n_seqs: u64,
}

/// Final core reconstruction/sparsity numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct CoreMetrics {
    pub tokens: u64,
    pub l2_norm_in: f64,
    pub l2_norm_out: f64,
    pub l2_ratio: f64,
    pub relative_reconstruction_bias: f64,
    pub l0: f64,
    pub l1: f64,
    pub cossim: f64,
    /// SAEBench `mse`: per-token SSE divided by the batch token count, averaged.
    pub mse_saebench: f64,
    /// Mean squared error over tokens and dimensions.
    pub mse_conventional: f64,
    /// SAEBench `explained_variance` (total variance taken as `A - (A/d)^2`).
    pub explained_variance_saebench: f64,
    pub explained_variance_legacy: f64,
    /// `1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2` over all tokens.
    pub explained_variance_conventional: f64,
    /// Fraction of tokens on which each latent fires.
    pub density: Vec<f64>,
    /// Tokens firing / sequences with a firing, per latent (NaN if it never fires).
    pub consistent_activation: Vec<f64>,
    pub frac_alive: f64,
    pub freq_over_1_percent: f64,
    pub freq_over_10_percent: f64,
    pub normalized_freq_over_1_percent: f64,
    pub normalized_freq_over_10_percent: f64,
}

impl CoreAccumulator {
    pub fn new(d: usize, d_sae: usize) -> Self {
        CoreAccumulator {
            d,
            d_sae,
            n_tok: 0,
            sum_l2_in: 0.0,
            sum_l2_out: 0.0,
            sum_l2_ratio: 0.0,
            sum_l0: 0.0,
            sum_l1: 0.0,
            sum_cos: 0.0,
            sum_ev_legacy: 0.0,
            sum_mse_quirk: 0.0,
            sse_total: 0.0,
            sum_sq_x: 0.0,
            sum_x: vec![0.0; d],
            batch_a: Vec::new(),
            batch_r: Vec::new(),
            batch_rrb: Vec::new(),
            fire_tokens: vec![0; d_sae],
            fire_seqs: vec![0; d_sae],
            last_seq: vec![u64::MAX; d_sae],
            n_seqs: 0,
        }
    }

    /// Add one batch: `x`, `x_hat` [rows, d], `codes` with `rows` rows, `mask` [rows]
    /// (`true` = keep). Rows are grouped into sequences of `seq_len` consecutive rows
    /// (for the consistent-activation heuristic).
    pub fn add_batch(
        &mut self,
        x: &[f32],
        x_hat: &[f32],
        codes: &SparseCodes,
        mask: &[bool],
        seq_len: usize,
    ) {
        let d = self.d;
        let rows = mask.len();
        assert_eq!(x.len(), rows * d, "x is not [rows, d]");
        assert_eq!(x_hat.len(), rows * d, "x_hat is not [rows, d]");
        assert_eq!(codes.rows, rows, "codes rows != mask rows");
        assert!(
            seq_len > 0 && rows.is_multiple_of(seq_len),
            "rows not a multiple of seq_len"
        );
        let kept: Vec<usize> = (0..rows).filter(|&r| mask[r]).collect();
        let nb = kept.len();
        if nb == 0 {
            return;
        }
        // Batch mean of x per dimension, for the legacy explained variance.
        let mut xbar = vec![0f64; d];
        for &r in &kept {
            for (m, &v) in xbar.iter_mut().zip(&x[r * d..(r + 1) * d]) {
                *m += v as f64;
            }
        }
        for m in &mut xbar {
            *m /= nb as f64;
        }
        let (mut a_b, mut r_b, mut xh2_b, mut xxh_b) = (0f64, 0f64, 0f64, 0f64);
        for &r in &kept {
            let xr = &x[r * d..(r + 1) * d];
            let hr = &x_hat[r * d..(r + 1) * d];
            let (mut xx, mut hh, mut xh, mut sse, mut tv) = (0f64, 0f64, 0f64, 0f64, 0f64);
            for j in 0..d {
                let (a, b) = (xr[j] as f64, hr[j] as f64);
                xx += a * a;
                hh += b * b;
                xh += a * b;
                sse += (a - b) * (a - b);
                tv += (a - xbar[j]) * (a - xbar[j]);
                self.sum_x[j] += a;
            }
            let (nx, nh) = (xx.sqrt(), hh.sqrt());
            self.sum_l2_in += nx;
            self.sum_l2_out += nh;
            self.sum_l2_ratio += nh / if nx < 1e-4 { 1.0 } else { nx };
            self.sum_cos += if nx > 0.0 && nh > 0.0 {
                xh / (nx * nh)
            } else {
                0.0
            };
            self.sum_ev_legacy += 1.0 - sse / tv;
            self.sum_mse_quirk += sse / nb as f64;
            self.sse_total += sse;
            self.sum_sq_x += xx;
            a_b += xx;
            r_b += sse;
            xh2_b += hh;
            xxh_b += xh;
            let (_, val) = codes.row(r);
            self.sum_l0 += val.iter().filter(|v| **v != 0.0).count() as f64;
            self.sum_l1 += val.iter().map(|v| *v as f64).sum::<f64>();
        }
        self.batch_a.push(a_b / nb as f64);
        self.batch_r.push(r_b / nb as f64);
        self.batch_rrb
            .push((xh2_b / nb as f64) / (xxh_b / nb as f64));
        self.n_tok += nb as u64;
        // Per-latent firing counts; a sequence counts once per latent.
        for s in 0..rows / seq_len {
            let seq_id = self.n_seqs;
            self.n_seqs += 1;
            for (r, &keep) in mask.iter().enumerate().skip(s * seq_len).take(seq_len) {
                if !keep {
                    continue;
                }
                let (idx, val) = codes.row(r);
                for (&f, &v) in idx.iter().zip(val) {
                    if v > 0.0 {
                        let f = f as usize;
                        self.fire_tokens[f] += 1;
                        if self.last_seq[f] != seq_id {
                            self.last_seq[f] = seq_id;
                            self.fire_seqs[f] += 1;
                        }
                    }
                }
            }
        }
    }

    pub fn tokens(&self) -> u64 {
        self.n_tok
    }

    pub fn finish(&self) -> CoreMetrics {
        let n = self.n_tok as f64;
        let d = self.d as f64;
        let mean = |v: &[f64]| {
            if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let a = mean(&self.batch_a);
        let r = mean(&self.batch_r);
        let centred: f64 = self.sum_sq_x - self.sum_x.iter().map(|s| s * s).sum::<f64>() / n;
        let density: Vec<f64> = self.fire_tokens.iter().map(|&c| c as f64 / n).collect();
        let consistent_activation: Vec<f64> = self
            .fire_tokens
            .iter()
            .zip(&self.fire_seqs)
            .map(|(&t, &s)| {
                if s == 0 {
                    f64::NAN
                } else {
                    t as f64 / s as f64
                }
            })
            .collect();
        let f = self.d_sae as f64;
        let total_density: f64 = density.iter().sum();
        let over = |th: f64| density.iter().filter(|v| **v > th).count() as f64 / f;
        let norm_over = |th: f64| density.iter().filter(|v| **v > th).sum::<f64>() / total_density;
        CoreMetrics {
            tokens: self.n_tok,
            l2_norm_in: self.sum_l2_in / n,
            l2_norm_out: self.sum_l2_out / n,
            l2_ratio: self.sum_l2_ratio / n,
            relative_reconstruction_bias: mean(&self.batch_rrb),
            l0: self.sum_l0 / n,
            l1: self.sum_l1 / n,
            cossim: self.sum_cos / n,
            mse_saebench: self.sum_mse_quirk / n,
            mse_conventional: self.sse_total / (n * d),
            explained_variance_saebench: 1.0 - r / (a - (a / d) * (a / d)),
            explained_variance_legacy: self.sum_ev_legacy / n,
            explained_variance_conventional: 1.0 - self.sse_total / centred,
            frac_alive: density.iter().filter(|v| **v > 0.0).count() as f64 / f,
            freq_over_1_percent: over(0.01),
            freq_over_10_percent: over(0.1),
            normalized_freq_over_1_percent: norm_over(0.01),
            normalized_freq_over_10_percent: norm_over(0.1),
            density,
            consistent_activation,
        }
    }
}

/// Sums of KL(clean || run) and CE of a run over the kept positions of some batches.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossStats {
    pub kl_sum: f64,
    pub kl_n: u64,
    pub ce_sum: f64,
    pub ce_n: u64,
}

impl LossStats {
    pub fn add(&mut self, o: &LossStats) {
        self.kl_sum += o.kl_sum;
        self.kl_n += o.kl_n;
        self.ce_sum += o.ce_sum;
        self.ce_n += o.ce_n;
    }
    pub fn kl(&self) -> f64 {
        self.kl_sum / self.kl_n as f64
    }
    pub fn ce(&self) -> f64 {
        self.ce_sum / self.ce_n as f64
    }
}

/// KL(clean || run) at every position with `mask[b, t]`, and the CE of `run` (the
/// clean run itself when `run` is None) at positions `t < seq - 1` with `mask[b, t]`
/// (SAEBench's `mask[:, :-1]`), predicting `tokens[b, t + 1]`. Logits are
/// `[batch * seq, vocab]`.
pub fn loss_stats(
    clean: &[f32],
    run: Option<&[f32]>,
    tokens: &[u32],
    mask: &[bool],
    batch: usize,
    seq: usize,
    vocab: usize,
) -> LossStats {
    use rayon::prelude::*;
    assert_eq!(
        clean.len(),
        batch * seq * vocab,
        "clean logits are not [batch*seq, vocab]"
    );
    assert_eq!(tokens.len(), batch * seq);
    assert_eq!(mask.len(), batch * seq);
    if let Some(r) = run {
        assert_eq!(
            r.len(),
            clean.len(),
            "run logits are not [batch*seq, vocab]"
        );
    }
    // One position per task (a row of the vocabulary is 49k values); the sum runs in
    // position order afterwards, so the result does not depend on the thread count.
    let per_pos: Vec<LossStats> = (0..batch * seq)
        .into_par_iter()
        .map(|pos| {
            let mut st = LossStats::default();
            if !mask[pos] {
                return st;
            }
            let c = &clean[pos * vocab..(pos + 1) * vocab];
            let r = run.map(|r| &r[pos * vocab..(pos + 1) * vocab]);
            let lse_r = match r {
                Some(r) => {
                    // KL(p || q) = sum_i p_i (c_i - r_i) - (lse_c - lse_r), p = softmax(c),
                    // with lse_c = mc + ln z from the same pass.
                    let mc = c.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
                    let (mut z, mut a) = (0f64, 0f64);
                    for (&ci, &ri) in c.iter().zip(r) {
                        let e = (ci as f64 - mc).exp();
                        z += e;
                        a += e * (ci as f64 - ri as f64);
                    }
                    let lse_r = log_sum_exp(r);
                    st.kl_sum += a / z - (mc + z.ln() - lse_r);
                    st.kl_n += 1;
                    lse_r
                }
                None => log_sum_exp(c),
            };
            let t = pos % seq;
            if t + 1 < seq {
                let logit = r.unwrap_or(c)[tokens[pos + 1] as usize] as f64;
                st.ce_sum += lse_r - logit;
                st.ce_n += 1;
            }
            st
        })
        .collect();
    let mut st = LossStats::default();
    for p in &per_pos {
        st.add(p);
    }
    st
}

/// `log(sum(exp(row)))` in f64, stable.
fn log_sum_exp(row: &[f32]) -> f64 {
    let m = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
    m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// SAEBench `kl_div_score = (KL_abl - KL_sae) / KL_abl`.
pub fn kl_div_score(kl_sae: f64, kl_abl: f64) -> f64 {
    (kl_abl - kl_sae) / kl_abl
}

/// SAEBench `ce_loss_score = (CE_abl - CE_sae) / (CE_abl - CE_clean)`.
pub fn ce_loss_score(ce_clean: f64, ce_sae: f64, ce_abl: f64) -> f64 {
    (ce_abl - ce_sae) / (ce_abl - ce_clean)
}

/// Per-latent weight statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightMetrics {
    pub encoder_norm: Vec<f64>,
    pub encoder_bias: Vec<f64>,
    pub encoder_decoder_cosine_sim: Vec<f64>,
    pub max_encoder_cosine_sim: Vec<f64>,
    pub max_decoder_cosine_sim: Vec<f64>,
}

/// Rows of `m` [n, d] scaled to unit norm (zero rows stay zero).
fn unit_rows(m: &[f32], n: usize, d: usize) -> Vec<f32> {
    let mut out = m.to_vec();
    for row in out.chunks_exact_mut(d).take(n) {
        let nr = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        if nr > 0.0 {
            for v in row {
                *v = (*v as f64 / nr) as f32;
            }
        }
    }
    out
}

/// For each row of `m` [n, d], the max cosine with any *other* row, computed in
/// blocks of rows so memory stays `block * n` floats.
pub fn max_cosine_to_others(m: &[f32], n: usize, d: usize) -> Vec<f64> {
    max_cosine_blocked(m, n, d, (16 << 20) / n.max(1))
}

fn max_cosine_blocked(m: &[f32], n: usize, d: usize, block: usize) -> Vec<f64> {
    let u = unit_rows(m, n, d);
    let block = block.clamp(1, n.max(1));
    let mut out = vec![f64::NEG_INFINITY; n];
    let mut g = vec![0f32; block * n];
    let mut start = 0;
    while start < n {
        let bs = block.min(n - start);
        gemm(
            1.0,
            MatRef::row_major(&u[start * d..(start + bs) * d], bs, d),
            MatRef::row_major(&u, n, d).t(),
            0.0,
            MatMut::row_major(&mut g[..bs * n], bs, n),
        );
        for i in 0..bs {
            let row = &g[i * n..(i + 1) * n];
            let mut best = f32::NEG_INFINITY;
            for (j, &v) in row.iter().enumerate() {
                if j != start + i && v > best {
                    best = v;
                }
            }
            out[start + i] = best as f64;
        }
        start += bs;
    }
    if n == 1 {
        out[0] = f64::NAN;
    }
    out
}

/// Encoder norms/biases, encoder-decoder cosines and max cosines for every latent.
pub fn weight_metrics(sae: &Sae) -> WeightMetrics {
    let (d, f) = (sae.d_in, sae.d_sae);
    // Encoder columns as rows [f, d].
    let mut enc = vec![0f32; f * d];
    for i in 0..d {
        for j in 0..f {
            enc[j * d + i] = sae.w_enc[i * f + j];
        }
    }
    let mut encoder_norm = Vec::with_capacity(f);
    let mut cos = Vec::with_capacity(f);
    for j in 0..f {
        let e = &enc[j * d..(j + 1) * d];
        let w = &sae.w_dec[j * d..(j + 1) * d];
        let ee = e.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        let ww = w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        let ew = e
            .iter()
            .zip(w)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum::<f64>();
        encoder_norm.push(ee.sqrt());
        cos.push(ew / (ee.sqrt() * ww.sqrt()));
    }
    let bias = if sae.b_enc.len() == f {
        &sae.b_enc
    } else {
        sae.b_gate.as_ref().unwrap_or(&sae.b_enc)
    };
    WeightMetrics {
        encoder_norm,
        encoder_bias: bias.iter().map(|v| *v as f64).collect(),
        encoder_decoder_cosine_sim: cos,
        max_encoder_cosine_sim: max_cosine_to_others(&enc, f, d),
        max_decoder_cosine_sim: max_cosine_to_others(&sae.w_dec, f, d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saelab_core::rng::Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        let mut v = vec![0f32; n];
        r.fill_normal(&mut v, 1.0);
        v
    }

    #[test]
    fn perfect_reconstruction_gives_ev_one() {
        let (rows, d) = (32, 8);
        let x = random(rows * d, 1);
        let codes =
            SparseCodes::from_dense(&x.iter().map(|v| v.max(0.0)).collect::<Vec<_>>(), rows, d);
        let mask: Vec<bool> = (0..rows).map(|r| r % 8 != 0).collect();
        let mut acc = CoreAccumulator::new(d, d);
        acc.add_batch(&x, &x, &codes, &mask, 8);
        acc.add_batch(&x, &x, &codes, &mask, 8);
        let m = acc.finish();
        assert_eq!(m.tokens, 56);
        assert!((m.explained_variance_conventional - 1.0).abs() < 1e-12);
        assert!((m.explained_variance_legacy - 1.0).abs() < 1e-12);
        assert!((m.explained_variance_saebench - 1.0).abs() < 1e-12);
        assert!((m.cossim - 1.0).abs() < 1e-6);
        assert!((m.l2_ratio - 1.0).abs() < 1e-12);
        assert!((m.relative_reconstruction_bias - 1.0).abs() < 1e-12);
        assert_eq!(m.mse_conventional, 0.0);
    }

    #[test]
    fn hand_computed_batch() {
        // d = 2, one sequence of 3 tokens, token 2 masked.
        let x = vec![3.0f32, 4.0, 1.0, 0.0, 100.0, 100.0];
        let xh = vec![3.0f32, 0.0, 2.0, 0.0, -5.0, 7.0];
        let codes = SparseCodes::from_dense(&[1.0, 0.0, 2.0, 0.5, 0.0, 0.0, 9.0, 9.0, 9.0], 3, 3);
        let mask = vec![true, true, false];
        let mut acc = CoreAccumulator::new(2, 3);
        acc.add_batch(&x, &xh, &codes, &mask, 3);
        let m = acc.finish();
        assert_eq!(m.tokens, 2);
        // norms: |x| = 5, 1; |xh| = 3, 2.
        assert!((m.l2_norm_in - 3.0).abs() < 1e-12);
        assert!((m.l2_norm_out - 2.5).abs() < 1e-12);
        assert!((m.l2_ratio - (0.6 + 2.0) / 2.0).abs() < 1e-12);
        // cos: (9/15 + 2/2)/2
        assert!((m.cossim - 0.8).abs() < 1e-12);
        // SSE: 16, 1 -> conventional mse = 17 / (2 * 2)
        assert!((m.mse_conventional - 17.0 / 4.0).abs() < 1e-12);
        // SAEBench mse: mean over tokens of SSE_t / N_b = (16/2 + 1/2) / 2
        assert!((m.mse_saebench - 4.25).abs() < 1e-12);
        // mean x = (2, 2); centred SS = (1+4) + (1+4) = 10 -> EV = 1 - 17/10
        assert!((m.explained_variance_conventional - (1.0 - 1.7)).abs() < 1e-12);
        assert!(
            (m.explained_variance_legacy - (1.0 - 16.0 / 5.0 + 1.0 - 1.0 / 5.0) / 2.0).abs()
                < 1e-12
        );
        // A = (25 + 1)/2 = 13, R = 8.5 -> 1 - 8.5 / (13 - 6.5^2)
        assert!((m.explained_variance_saebench - (1.0 - 8.5 / (13.0 - 42.25))).abs() < 1e-12);
        // rrb = mean|xh|^2 / mean <x,xh> = (13/2) / (11/2)
        assert!((m.relative_reconstruction_bias - 13.0 / 11.0).abs() < 1e-12);
        assert!((m.l0 - 1.5).abs() < 1e-12);
        assert!((m.l1 - 1.75).abs() < 1e-12);
        assert_eq!(m.density, vec![1.0, 0.0, 0.5]);
        assert_eq!(m.consistent_activation[0], 2.0);
        assert!(m.consistent_activation[1].is_nan());
        assert!((m.frac_alive - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.freq_over_10_percent - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.normalized_freq_over_10_percent - 1.0).abs() < 1e-12);
    }

    #[test]
    fn losses_and_scores() {
        let (b, s, v) = (2, 4, 5);
        let clean = random(b * s * v, 3);
        let abl = random(b * s * v, 4);
        let tokens: Vec<u32> = (0..b * s).map(|i| (i * 3 % v) as u32).collect();
        let mask = vec![true, true, false, true, true, true, true, true];
        let c = loss_stats(&clean, None, &tokens, &mask, b, s, v);
        let perfect = loss_stats(&clean, Some(&clean), &tokens, &mask, b, s, v);
        let a = loss_stats(&clean, Some(&abl), &tokens, &mask, b, s, v);
        // KL kept positions: 7; CE kept positions: t < 3 and masked -> 2 + 3 = 5.
        assert_eq!((a.kl_n, a.ce_n), (7, 5));
        assert!(perfect.kl() < 1e-12);
        assert!(a.kl() > 0.0);
        assert!((ce_loss_score(c.ce(), perfect.ce(), a.ce()) - 1.0).abs() < 1e-12);
        assert!((kl_div_score(perfect.kl(), a.kl()) - 1.0).abs() < 1e-12);
        assert!(ce_loss_score(c.ce(), a.ce(), a.ce()).abs() < 1e-12);
        assert!(kl_div_score(a.kl(), a.kl()).abs() < 1e-12);
        // Hand check of one CE term against a direct formula.
        let row = &clean[0..v];
        let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
        let ce0 = lse - row[tokens[1] as usize] as f64;
        let one = loss_stats(
            &clean[..s * v],
            None,
            &tokens[..s],
            &[true, false, false, false],
            1,
            s,
            v,
        );
        assert!((one.ce() - ce0).abs() < 1e-12);
        // KL against the textbook sum_i p_i (log p_i - log q_i), position by position.
        let log_softmax = |row: &[f32]| -> Vec<f64> {
            let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
            row.iter().map(|&x| x as f64 - lse).collect()
        };
        let mut kl_ref = 0.0;
        for pos in (0..b * s).filter(|&p| mask[p]) {
            let lp = log_softmax(&clean[pos * v..(pos + 1) * v]);
            let lq = log_softmax(&abl[pos * v..(pos + 1) * v]);
            kl_ref += lp
                .iter()
                .zip(&lq)
                .map(|(p, q)| p.exp() * (p - q))
                .sum::<f64>();
        }
        assert!(
            (a.kl() - kl_ref / 7.0).abs() < 1e-12,
            "{} vs {}",
            a.kl(),
            kl_ref / 7.0
        );
        // Large logits stay finite in f64.
        let big: Vec<f32> = clean.iter().map(|x| x * 1e4).collect();
        let st = loss_stats(&clean, Some(&big), &tokens, &mask, b, s, v);
        assert!(st.kl().is_finite() && st.ce().is_finite());
    }

    #[test]
    fn max_cosine_matches_brute_force_across_blocks() {
        let (n, d) = (37, 6);
        let m = random(n * d, 7);
        let got = max_cosine_blocked(&m, n, d, 5);
        assert_eq!(got, max_cosine_to_others(&m, n, d));
        for i in 0..n {
            let mut best = f64::NEG_INFINITY;
            for j in 0..n {
                if i == j {
                    continue;
                }
                let a = &m[i * d..(i + 1) * d];
                let b = &m[j * d..(j + 1) * d];
                let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
                let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                best = best.max(dot / (na * nb));
            }
            assert!((got[i] - best).abs() < 1e-5, "{i}: {} vs {best}", got[i]);
        }
    }
}
