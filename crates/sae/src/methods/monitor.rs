//! Feature-separation monitoring, for every run (baselines included): decoder cosine
//! statistics, co-activation statistics and the method's current penalty, threshold
//! and weight, as one JSON-serialisable record.
//!
//! The decoder statistics never form the F x F cosine matrix: rows are processed in
//! blocks of 128 against the whole decoder with the GEMM (memory O(128 F)), either for
//! every row (exact, the default up to `sample_rows >= F`) or for a seeded random
//! sample of rows (each sampled row against all others: the mean, std and histogram
//! are unbiased estimates over pairs; `max` is the largest over the sampled rows' pairs,
//! a lower bound of the true maximum).

use super::pairs::{pair_events, row_sample};
use super::progressive::{sparse_penalty, CoactStats};
use crate::codes::SparseCodes;
use anyhow::{Context, Result};
use saelab_core::gemm::{gemm, MatMut, MatRef};
use saelab_core::rng::Rng;
use serde::Serialize;
use std::path::Path;

/// Number of histogram bins of |cos| over [0, 1].
pub const COS_BINS: usize = 20;

#[derive(Clone, Debug)]
pub struct CosineOptions {
    /// Rows whose cosines with all other rows are computed; `>= F` means exact.
    pub sample_rows: usize,
    pub seed: u64,
}

impl Default for CosineOptions {
    fn default() -> Self {
        CosineOptions {
            sample_rows: 1024,
            seed: 0,
        }
    }
}

/// Statistics of `|cos(d_i, d_j)|` over ordered pairs `i != j` (all, or those of the
/// sampled rows).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CosineStats {
    pub mean: f64,
    pub std: f64,
    pub max: f64,
    /// Counts of |cos| in 20 equal bins over [0, 1] (1.0 falls in the last bin).
    pub histogram: Vec<u64>,
    pub pairs: u64,
    pub rows_used: usize,
    pub exact: bool,
}

/// Decoder |cos| statistics of `w_dec` ([f, d_in], row-major); zero rows are skipped.
pub fn decoder_cosine_stats(
    w_dec: &[f32],
    f: usize,
    d_in: usize,
    opts: &CosineOptions,
) -> CosineStats {
    let w = &w_dec[..f * d_in];
    let norms: Vec<f32> = (0..f)
        .map(|i| super::norm(&w[i * d_in..(i + 1) * d_in]) as f32)
        .collect();
    let exact = opts.sample_rows >= f;
    let mut rows: Vec<usize> = if exact {
        (0..f).collect()
    } else {
        let mut r = Rng::new(opts.seed).permutation(f);
        r.truncate(opts.sample_rows);
        r.sort_unstable();
        r
    };
    rows.retain(|&i| norms[i] > 0.0);
    let mut hist = vec![0u64; COS_BINS];
    let (mut s, mut s2, mut mx, mut n) = (0f64, 0f64, 0f64, 0u64);
    let block = 128;
    let mut a = vec![0f32; block * d_in];
    let mut c = vec![0f32; block * f];
    for chunk in rows.chunks(block) {
        let m = chunk.len();
        for (k, &i) in chunk.iter().enumerate() {
            a[k * d_in..(k + 1) * d_in].copy_from_slice(&w[i * d_in..(i + 1) * d_in]);
        }
        gemm(
            1.0,
            MatRef::row_major(&a[..m * d_in], m, d_in),
            MatRef::row_major(w, f, d_in).t(),
            0.0,
            MatMut::row_major(&mut c[..m * f], m, f),
        );
        for (k, &i) in chunk.iter().enumerate() {
            for j in 0..f {
                if j == i || norms[j] == 0.0 {
                    continue;
                }
                let v = ((c[k * f + j] / (norms[i] * norms[j])).abs() as f64).min(1.0);
                s += v;
                s2 += v * v;
                mx = mx.max(v);
                n += 1;
                hist[((v * COS_BINS as f64) as usize).min(COS_BINS - 1)] += 1;
            }
        }
    }
    let mean = if n > 0 { s / n as f64 } else { 0.0 };
    let std = if n > 0 {
        (s2 / n as f64 - mean * mean).max(0.0).sqrt()
    } else {
        0.0
    };
    CosineStats {
        mean,
        std,
        max: mx,
        histogram: hist,
        pairs: n,
        rows_used: rows.len(),
        exact,
    }
}

/// Co-activation statistics of a batch at a given co-firing threshold: the fraction of
/// co-firing ordered pairs with `n_ij > threshold` and the mean `c_ij` (Method 1's
/// quantities, computed sparsely; no gradient, no state). Dense codes (a ReLU SAE early
/// in training) are measured on an evenly strided row sample of at most
/// [`MONITOR_PAIR_EVENTS`] pair events, as the quantities are ratios over pairs.
pub fn coactivation_stats(codes: &SparseCodes, threshold: f64) -> CoactStats {
    let events = pair_events(codes);
    if events > MONITOR_PAIR_EVENTS {
        let stride = events.div_ceil(MONITOR_PAIR_EVENTS) as usize;
        return sparse_penalty(
            &row_sample(codes, stride),
            threshold,
            0.0,
            false,
            None,
            None,
        )
        .stats;
    }
    sparse_penalty(codes, threshold, 0.0, false, None, None).stats
}

/// Pair-event budget of one monitoring record (TopK k = 40, B = 2048 has 3.2M).
pub const MONITOR_PAIR_EVENTS: u64 = 8_000_000;

/// One monitoring record.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SeparationStats {
    pub step: usize,
    pub decoder: CosineStats,
    pub coactivation: CoactStats,
    /// The co-firing threshold the co-activation statistics used.
    pub coactivation_threshold: f64,
    /// The method's penalty (weighted loss term), threshold and weight this step, if
    /// the run has a method (read from its `PenaltyOut` metrics).
    pub penalty: Option<f64>,
    pub threshold: Option<f64>,
    pub weight: Option<f64>,
}

/// Compute a monitoring record. `method` is the run's regularizer output this step, if
/// any: its loss, and Method 1's `ortho_threshold` and `ortho_weight` metrics, are
/// copied. Without Method 1 the co-activation statistics use `default_threshold`.
pub fn separation_stats(
    step: usize,
    w_dec: &[f32],
    d_in: usize,
    codes: &SparseCodes,
    method: Option<&crate::regularizer::PenaltyOut>,
    default_threshold: f64,
    opts: &CosineOptions,
) -> SeparationStats {
    let get = |name: &str| {
        method.and_then(|m| m.metrics.iter().find(|(n, _)| n == name).map(|(_, v)| *v))
    };
    let threshold = get("ortho_threshold");
    let thr = threshold.unwrap_or(default_threshold);
    SeparationStats {
        step,
        decoder: decoder_cosine_stats(w_dec, codes.d_sae, d_in, opts),
        coactivation: coactivation_stats(codes, thr),
        coactivation_threshold: thr,
        penalty: method.map(|m| m.loss),
        threshold,
        weight: get("ortho_weight").or(get("sc_weight")),
    }
}

impl SeparationStats {
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).context("cannot serialise separation statistics")
    }

    /// Write as pretty JSON, atomically.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let s =
            serde_json::to_vec_pretty(self).context("cannot serialise separation statistics")?;
        saelab_core::fsutil::write_atomic(path, &s)
            .with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(w: &[f32], f: usize, d: usize) -> (f64, f64, Vec<u64>) {
        let (mut s, mut mx, mut h) = (0f64, 0f64, vec![0u64; COS_BINS]);
        let mut n = 0;
        for i in 0..f {
            for j in 0..f {
                if i == j {
                    continue;
                }
                let (a, b) = (&w[i * d..(i + 1) * d], &w[j * d..(j + 1) * d]);
                let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
                let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                let v = (dot / (na * nb)).abs().min(1.0);
                s += v;
                mx = mx.max(v);
                n += 1;
                h[((v * COS_BINS as f64) as usize).min(COS_BINS - 1)] += 1;
            }
        }
        (s / n as f64, mx, h)
    }

    #[test]
    fn exact_cosine_stats_match_brute_force() {
        let mut rng = Rng::new(8);
        let (f, d) = (300, 16);
        let mut w = vec![0f32; f * d];
        rng.fill_normal(&mut w, 1.0);
        // A near-duplicate pair so that max is large.
        for k in 0..d {
            w[5 * d + k] = w[7 * d + k] * 2.0 + 0.01 * rng.normal();
        }
        let st = decoder_cosine_stats(
            &w,
            f,
            d,
            &CosineOptions {
                sample_rows: f,
                seed: 0,
            },
        );
        let (mean, mx, h) = brute(&w, f, d);
        assert!(st.exact);
        assert_eq!(st.pairs, (f * (f - 1)) as u64);
        assert!((st.mean - mean).abs() < 1e-5);
        assert!((st.max - mx).abs() < 1e-5 && mx > 0.99);
        let diff: u64 = st
            .histogram
            .iter()
            .zip(&h)
            .map(|(a, b)| a.abs_diff(*b))
            .sum();
        assert!(diff <= 4, "histograms differ by {diff}"); // f32 vs f64 at bin edges
        let sampled = decoder_cosine_stats(
            &w,
            f,
            d,
            &CosineOptions {
                sample_rows: 100,
                seed: 1,
            },
        );
        assert!(!sampled.exact && sampled.rows_used == 100);
        assert!(
            (sampled.mean - mean).abs() < 0.02,
            "{} vs {mean}",
            sampled.mean
        );
        let js = SeparationStats {
            decoder: st,
            ..Default::default()
        }
        .to_json()
        .unwrap();
        assert!(js.contains("\"histogram\":["));
    }
}
