//! Method 2: the self-correcting orthogonal SAE, five switchable parts.
//!
//! 1. [`ZScoreGate`]: adaptive per-latent thresholds `mu_i + z sigma_i` from EMAs of each
//!    latent's pre-activation mean and standard deviation (implements [`Gate`]).
//! 2. [`SelfCorrecting`] (a [`Regularizer`]): interference-weighted orthogonality
//!    penalty `weight * sum_(i<j) max(0, s_ij - tau) * overlap(cos(d_i, d_j))` over pairs
//!    that co-fire in the batch, `s_ij` an EMA co-activation statistic (no gradient),
//!    gradient to both decoder rows, added in place into the trainer's [`DecoderGrad`].
//! 3. Reactivation: latents dead for `dead_window` steps whose decoder direction
//!    overlaps a high-interference latent are returned from `after_step`.
//! 4. Rank-r randomized SVD of the sparse interference matrix `A_ij = max(0, s_ij - tau)`
//!    finds the high-interference latents (largest energy-weighted leverage).
//! 5. Profiling metrics (reactivations, interference mass, decoder diversity).
//!
//! The choices behind every default are in `docs/methods.md`.

use super::monitor::{decoder_cosine_stats, CosineOptions};
use super::pairs::{run_latents, Csc, PairEma};
use super::rsvd::{randomized_svd, DenseOp, SparseSymOp};
use crate::codes::SparseCodes;
use crate::regularizer::{DecoderGrad, Gate, PenaltyOut, Regularizer, StepContext};
use anyhow::{bail, Result};
use rayon::prelude::*;
use saelab_core::gemm::{gemm, MatMut, MatRef};
use saelab_core::rng::Rng;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// Part 1 settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    pub enabled: bool,
    /// A latent fires when `pre > mu + z sigma`; default 2.0 (the proposal's).
    pub z: f64,
    /// EMA decay of the per-latent mean and std; default 0.99 (the log's).
    pub ema_decay: f64,
    /// Thresholds are clamped to at least this; default 0.0 (codes stay >= 0).
    pub min_threshold: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            enabled: true,
            z: 2.0,
            ema_decay: 0.99,
            min_threshold: 0.0,
        }
    }
}

/// Which co-activation statistic `s_ij` the penalty weights by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    /// EMA of the batch cosine of the two activation columns,
    /// `f_i^T f_j / (||f_i|| ||f_j||)`, in [0, 1] for non-negative codes (scale-free).
    Correlation,
    /// EMA of `f_i^T f_j / B`, the proposal's literal `EMA(h_i h_j)` (depends on the
    /// activation scale, so `tau` must be chosen per model).
    SecondMoment,
}

/// The overlap term of the decoder directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    CosSquared,
    AbsCos,
}

impl Overlap {
    /// `(g(c), g'(c))`.
    #[inline]
    fn eval(self, c: f32) -> (f32, f32) {
        match self {
            Overlap::CosSquared => (c * c, 2.0 * c),
            Overlap::AbsCos => (
                c.abs(),
                if c > 0.0 {
                    1.0
                } else if c < 0.0 {
                    -1.0
                } else {
                    0.0
                },
            ),
        }
    }
}

/// Part 2 settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InterferenceConfig {
    pub enabled: bool,
    /// Penalty weight; default 0.01 (the log's final value).
    pub weight: f64,
    /// Pairs with `s_ij <= tau` are not penalised; default 0.1.
    pub tau: f64,
    pub statistic: Statistic,
    pub overlap: Overlap,
    /// EMA decay of `s_ij`; default 0.99.
    pub ema_decay: f64,
    /// Stored statistics below this read as 0 and are dropped; default 1e-3.
    pub ema_epsilon: f64,
    /// Bound on stored pair entries (8 bytes each); default 4M (32 MB).
    pub ema_max_entries: usize,
    /// At most this many pairs (the largest weights) are penalised per step; default 16384.
    pub max_pairs_per_step: usize,
    /// Budget of ordered co-firing pair events per step for the pair statistics; a batch
    /// above it (dense codes: a ReLU SAE early in training) updates them from an evenly
    /// strided row sample that fits. Default 8M (TopK k = 40, B = 2048 has 3.2M).
    pub max_pair_events: u64,
    /// Update the pair statistics every this many steps (1 = every step). With N > 1
    /// the EMA takes every N-th batch with decay `ema_decay^N`, so its horizon in steps
    /// is unchanged, and the steps in between penalise the pairs selected at the last
    /// update (their decoder overlaps recomputed with the current decoder).
    pub stats_every: usize,
}

impl Default for InterferenceConfig {
    fn default() -> Self {
        InterferenceConfig {
            enabled: true,
            weight: 0.01,
            tau: 0.1,
            statistic: Statistic::Correlation,
            overlap: Overlap::CosSquared,
            ema_decay: 0.99,
            ema_epsilon: 1e-3,
            ema_max_entries: 4_000_000,
            max_pairs_per_step: 16384,
            max_pair_events: 8_000_000,
            stats_every: 1,
        }
    }
}

/// Part 3 settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReactivationConfig {
    pub enabled: bool,
    /// A latent is dead after this many steps without firing; default 500.
    pub dead_window: usize,
    /// Check every this many steps; default 250.
    pub check_every: usize,
    /// Size of the high-interference set (largest leverage); default 256.
    pub hot_latents: usize,
    /// A dead latent is implicated when its decoder |cos| with some hot latent is at
    /// least this; default 0.3.
    pub min_overlap: f64,
    /// At most this fraction of the dictionary is reactivated per check; default 0.01.
    pub max_fraction: f64,
}

impl Default for ReactivationConfig {
    fn default() -> Self {
        ReactivationConfig {
            enabled: true,
            dead_window: 500,
            check_every: 250,
            hot_latents: 256,
            min_overlap: 0.3,
            max_fraction: 0.01,
        }
    }
}

/// Part 4 settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RsvdConfig {
    /// Rank; default 32 (the proposal's).
    pub rank: usize,
    /// Extra probe vectors; default 8.
    pub oversample: usize,
    /// Power iterations; default 2.
    pub power_iters: usize,
}

impl Default for RsvdConfig {
    fn default() -> Self {
        RsvdConfig {
            rank: 32,
            oversample: 8,
            power_iters: 2,
        }
    }
}

/// Method 2 settings (TOML: `method = "self_correcting"` with sub-tables `gate`,
/// `penalty`, `reactivation`, `rsvd`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelfCorrectingConfig {
    pub gate: GateConfig,
    pub penalty: InterferenceConfig,
    pub reactivation: ReactivationConfig,
    pub rsvd: RsvdConfig,
    /// Profiling metrics (part 5) every this many steps (0 = never); default 250.
    pub profile_every: usize,
    /// Rows sampled for the decoder cosine statistics of the profile; default 512.
    pub profile_cosine_rows: usize,
}

impl Default for SelfCorrectingConfig {
    fn default() -> Self {
        SelfCorrectingConfig {
            gate: GateConfig::default(),
            penalty: InterferenceConfig::default(),
            reactivation: ReactivationConfig::default(),
            rsvd: RsvdConfig::default(),
            profile_every: 250,
            profile_cosine_rows: 512,
        }
    }
}

impl SelfCorrectingConfig {
    pub fn validate(&self, d_sae: usize) -> Result<()> {
        let g = &self.gate;
        if !(g.z.is_finite()) {
            bail!("self_correcting.gate: z = {} must be finite", g.z);
        }
        if !(0.0..1.0).contains(&g.ema_decay) {
            bail!(
                "self_correcting.gate: ema_decay = {} must lie in [0, 1)",
                g.ema_decay
            );
        }
        if !g.min_threshold.is_finite() {
            bail!("self_correcting.gate: min_threshold must be finite");
        }
        let p = &self.penalty;
        if !(p.weight >= 0.0 && p.weight.is_finite()) {
            bail!(
                "self_correcting.penalty: weight = {} must be >= 0 and finite",
                p.weight
            );
        }
        if !(p.tau >= 0.0 && p.tau.is_finite()) {
            bail!(
                "self_correcting.penalty: tau = {} must be >= 0 and finite",
                p.tau
            );
        }
        if p.statistic == Statistic::Correlation && p.tau >= 1.0 {
            bail!("self_correcting.penalty: tau = {} >= 1 would penalise nothing (the correlation statistic is <= 1)", p.tau);
        }
        if !(0.0..1.0).contains(&p.ema_decay) {
            bail!(
                "self_correcting.penalty: ema_decay = {} must lie in [0, 1)",
                p.ema_decay
            );
        }
        if !(p.ema_epsilon >= 0.0 && p.ema_epsilon.is_finite()) {
            bail!(
                "self_correcting.penalty: ema_epsilon = {} must be >= 0",
                p.ema_epsilon
            );
        }
        if p.ema_max_entries < 16
            || p.max_pairs_per_step == 0
            || p.max_pair_events == 0
            || p.stats_every == 0
        {
            bail!("self_correcting.penalty: ema_max_entries must be >= 16, max_pairs_per_step, max_pair_events and stats_every >= 1");
        }
        let r = &self.reactivation;
        if r.enabled && (r.dead_window == 0 || r.check_every == 0 || r.hot_latents == 0) {
            bail!("self_correcting.reactivation: dead_window, check_every and hot_latents must be >= 1");
        }
        if !(r.min_overlap >= 0.0 && r.min_overlap <= 1.0) {
            bail!(
                "self_correcting.reactivation: min_overlap = {} must lie in [0, 1]",
                r.min_overlap
            );
        }
        if !(r.max_fraction > 0.0 && r.max_fraction <= 1.0) {
            bail!(
                "self_correcting.reactivation: max_fraction = {} must lie in (0, 1]",
                r.max_fraction
            );
        }
        let s = &self.rsvd;
        if s.rank == 0 || s.rank > d_sae {
            bail!(
                "self_correcting.rsvd: rank = {} must lie in [1, d_sae = {d_sae}]",
                s.rank
            );
        }
        if s.power_iters > 20 {
            bail!(
                "self_correcting.rsvd: power_iters = {} is excessive (<= 20)",
                s.power_iters
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Part 1: the z-score gate.

/// Adaptive thresholds `max(mu_i + z sigma_i, min_threshold)` where `mu_i`, `sigma_i`
/// are EMAs of the batch mean and (population) standard deviation of latent `i`'s
/// pre-activations; the first batch initialises them, every batch updates them.
pub struct ZScoreGate {
    pub mu: Vec<f32>,
    pub sigma: Vec<f32>,
    thr: Vec<f32>,
    cfg: GateConfig,
    started: bool,
    /// Latents re-initialised by the regularizer: their statistics restart from the
    /// next batch (their old distribution no longer applies).
    resets: Arc<Mutex<Vec<u32>>>,
}

#[derive(Serialize, Deserialize)]
struct GateState {
    mu: Vec<f32>,
    sigma: Vec<f32>,
    started: bool,
}

impl ZScoreGate {
    pub fn new(cfg: GateConfig, d_sae: usize, resets: Arc<Mutex<Vec<u32>>>) -> ZScoreGate {
        ZScoreGate {
            mu: vec![0.0; d_sae],
            sigma: vec![0.0; d_sae],
            thr: vec![0.0; d_sae],
            cfg,
            started: false,
            resets,
        }
    }
}

/// Per-column mean and population std of a row-major [rows, d] matrix, f64
/// accumulation over fixed 256-row chunks (deterministic for any thread count).
pub fn column_mean_std(pre: &[f32], rows: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
    let chunk = 256;
    let parts: Vec<(Vec<f64>, Vec<f64>)> = pre[..rows * d]
        .par_chunks(chunk * d)
        .map(|block| {
            let (mut s, mut s2) = (vec![0f64; d], vec![0f64; d]);
            for row in block.chunks_exact(d) {
                for ((a, b), &x) in s.iter_mut().zip(s2.iter_mut()).zip(row) {
                    let x = x as f64;
                    *a += x;
                    *b += x * x;
                }
            }
            (s, s2)
        })
        .collect();
    let (mut s, mut s2) = (vec![0f64; d], vec![0f64; d]);
    for (a, b) in parts {
        s.iter_mut().zip(&a).for_each(|(x, y)| *x += y);
        s2.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
    }
    let n = rows.max(1) as f64;
    let mean: Vec<f64> = s.iter().map(|x| x / n).collect();
    let std = s2
        .iter()
        .zip(&mean)
        .map(|(x, m)| (x / n - m * m).max(0.0).sqrt())
        .collect();
    (mean, std)
}

impl Gate for ZScoreGate {
    fn name(&self) -> &str {
        "zscore_gate"
    }

    fn thresholds(&mut self, pre: &[f32], rows: usize, d_sae: usize) -> &[f32] {
        assert_eq!(
            d_sae,
            self.mu.len(),
            "zscore_gate: built for d_sae {}, got {d_sae}",
            self.mu.len()
        );
        assert!(
            pre.len() >= rows * d_sae,
            "zscore_gate: pre-activation buffer too small"
        );
        let (mean, std) = column_mean_std(pre, rows, d_sae);
        let d = self.cfg.ema_decay as f32;
        if !self.started {
            for i in 0..d_sae {
                self.mu[i] = mean[i] as f32;
                self.sigma[i] = std[i] as f32;
            }
            self.started = true;
        } else {
            for i in 0..d_sae {
                self.mu[i] = d * self.mu[i] + (1.0 - d) * mean[i] as f32;
                self.sigma[i] = d * self.sigma[i] + (1.0 - d) * std[i] as f32;
            }
            let resets =
                std::mem::take(&mut *self.resets.lock().unwrap_or_else(|e| e.into_inner()));
            for i in resets {
                let i = i as usize;
                if i < d_sae {
                    self.mu[i] = mean[i] as f32;
                    self.sigma[i] = std[i] as f32;
                }
            }
        }
        let (z, lo) = (self.cfg.z as f32, self.cfg.min_threshold as f32);
        for i in 0..d_sae {
            self.thr[i] = (self.mu[i] + z * self.sigma[i]).max(lo);
        }
        &self.thr
    }

    /// The training rule keeps `pre > max(thr, 0)`; `thr` is the last step's
    /// thresholds, recomputed from the saved statistics so a resumed run exports the same.
    fn inference_thresholds(&self) -> Option<Vec<f32>> {
        let (z, lo) = (self.cfg.z as f32, self.cfg.min_threshold as f32);
        self.started.then(|| {
            self.mu
                .iter()
                .zip(&self.sigma)
                .map(|(m, s)| (m + z * s).max(lo).max(0.0))
                .collect()
        })
    }

    fn save_state(&self) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec(&GateState {
            mu: self.mu.clone(),
            sigma: self.sigma.clone(),
            started: self.started,
        })?)
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let s: GateState = serde_json::from_slice(bytes)
            .map_err(|e| anyhow::anyhow!("zscore_gate: cannot read saved state: {e}"))?;
        if s.mu.len() != self.mu.len() || s.sigma.len() != self.mu.len() {
            bail!(
                "zscore_gate: saved state has {} latents, this run has {}",
                s.mu.len(),
                self.mu.len()
            );
        }
        self.mu = s.mu;
        self.sigma = s.sigma;
        self.started = s.started;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Parts 2-5: the regularizer.

/// One penalised pair of a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PenalisedPair {
    pub i: u32,
    pub j: u32,
    /// `max(0, s_ij - tau)`.
    pub a: f32,
    pub cos: f32,
}

/// The result of one evaluation of the interference penalty.
#[derive(Clone, Debug, Default)]
pub struct InterferenceStep {
    /// `sum a_ij * overlap_ij` (before the weight): the interference mass.
    pub mass: f64,
    /// Co-firing unordered pairs with `a_ij > 0` (before the per-step cap).
    pub candidates: usize,
    pub pairs: Vec<PenalisedPair>,
}

impl InterferenceStep {
    /// The summary of evaluated pairs: their mass and count.
    fn of(pairs: Vec<PenalisedPair>, overlap: Overlap) -> InterferenceStep {
        InterferenceStep {
            mass: pairs
                .iter()
                .map(|p| (p.a * overlap.eval(p.cos).0) as f64)
                .sum(),
            candidates: pairs.len(),
            pairs,
        }
    }
}

/// The penalised pairs of a statistics update, `(i, j, a_ij)` largest first, and the
/// number of candidates before the per-step cap.
pub type Candidates = (Vec<(u32, u32, f32)>, usize);

/// Update the pair statistics from `codes` and return the co-firing pairs with
/// `a_ij = s_ij - tau > 0`, largest first (ties by index), at most `max_pairs`.
pub fn interference_candidates(
    codes: &SparseCodes,
    ema: &mut PairEma<1>,
    statistic: Statistic,
    tau: f32,
    max_pairs: usize,
) -> Candidates {
    let csc = Csc::build(codes);
    let col_norm = csc.col_norms();
    let inv_b = 1.0 / codes.rows.max(1) as f32;
    let walk = ema.begin();
    let (per, _) = run_latents(
        &csc,
        Some(ema.lists.as_mut_slice()),
        false,
        false,
        |s, i, list| {
            let list = list.expect("lists given");
            let acc = &s.acc;
            let evicted =
                PairEma::update_list(&walk, list, &s.touched, &mut s.pos, &mut s.ema_val, |j| {
                    let d = acc[j as usize].1;
                    let x = match statistic {
                        Statistic::Correlation => d / (col_norm[i] * col_norm[j as usize]),
                        Statistic::SecondMoment => d * inv_b,
                    };
                    [x]
                });
            let mut out = Vec::new();
            for &j in &s.touched {
                let a = s.ema_val[j as usize][0] - tau;
                if a > 0.0 {
                    out.push((i as u32, j, a));
                }
            }
            (out, evicted)
        },
    );
    ema.end(per.iter().map(|p| p.1).sum());
    let mut all: Vec<(u32, u32, f32)> = per.into_iter().flat_map(|p| p.0).collect();
    let candidates = all.len();
    let order = |x: &(u32, u32, f32), y: &(u32, u32, f32)| {
        y.2.total_cmp(&x.2).then((x.0, x.1).cmp(&(y.0, y.1)))
    };
    if all.len() > max_pairs {
        all.select_nth_unstable_by(max_pairs, order);
        all.truncate(max_pairs);
    }
    all.sort_unstable_by(order);
    (all, candidates)
}

/// The interference penalty on the decoder for the given pairs: returns the step
/// summary and adds `weight * d(mass)/d(W_dec rows)` into `grad_dec` (listing each
/// involved latent once, ascending). Rows need not be unit norm: the gradient
/// of `cos(u, v) = u.v / (|u||v|)` is `v / (|u||v|) - cos u / |u|^2`.
pub fn interference_penalty(
    pairs: &[(u32, u32, f32)],
    w_dec: &[f32],
    d_in: usize,
    overlap: Overlap,
    weight: f32,
    grad_dec: Option<&mut DecoderGrad<'_>>,
) -> InterferenceStep {
    let row = |i: u32| &w_dec[i as usize * d_in..(i as usize + 1) * d_in];
    let n = w_dec.len() / d_in.max(1);
    // Both sides of every pair grouped by latent: latent l's partners are
    // `sides[off[l]..off[l + 1]]`, each `(other, pair index)`.
    let (off, sides) = SparseSymOp::sides(n, pairs);
    let involved: Vec<u32> = (0..n as u32)
        .filter(|&l| off[l as usize] < off[l as usize + 1])
        .collect();
    // Each involved row's norm once (a latent is in many pairs), in a dense table.
    let mut norms = vec![0f32; n];
    let computed: Vec<f32> = involved
        .par_iter()
        .map(|&i| super::norm(row(i)).max(1e-12) as f32)
        .collect();
    for (&i, &c) in involved.iter().zip(&computed) {
        norms[i as usize] = c;
    }
    let Some(gd) = grad_dec else {
        let evaluated: Vec<PenalisedPair> = pairs
            .par_iter()
            .map(|&(i, j, a)| {
                let cos = pair_cos(row(i), row(j), norms[i as usize], norms[j as usize]);
                PenalisedPair { i, j, a, cos }
            })
            .collect();
        return InterferenceStep::of(evaluated, overlap);
    };
    // With the gradient, each pair is evaluated from both of its rows, row by row:
    // partner j's row is read once for its dot product and its gradient term (a
    // separate pass computing every cos first read each pair's rows twice more; this
    // phase is memory-bound). Both sides compute the same cos bit for bit.
    assert_eq!(gd.d_in, d_in, "decoder gradient of another width");
    // Disjoint rows of the trainer's gradient, one per involved latent, each with its
    // partners and the slots for their cos (no data touched here).
    let mut cos_side = vec![0f32; sides.len()];
    let mut targets: Vec<RowTask> = Vec::new();
    let mut rest = cos_side.as_mut_slice();
    for (l, out) in gd.grad[..n * d_in].chunks_mut(d_in).enumerate() {
        let (lo, hi) = (off[l], off[l + 1]);
        if lo < hi {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(hi - lo);
            rest = tail;
            targets.push((l as u32, out, &sides[lo..hi], mine));
        }
    }
    gd.touched.extend_from_slice(&involved);
    targets
        .par_iter_mut()
        .with_min_len(16)
        .for_each(|(i, out, partners, cos_out)| {
            let i = *i;
            let ni = norms[i as usize];
            let ri = row(i);
            let mut self_coef = 0f32;
            for (&(j, k), co) in partners.iter().zip(cos_out.iter_mut()) {
                let a = pairs[k as usize].2;
                let nj = norms[j as usize];
                let rj = row(j);
                let cos = pair_cos(ri, rj, ni, nj);
                let b = weight * a * overlap.eval(cos).1;
                let c = b / (ni * nj);
                out.iter_mut().zip(rj).for_each(|(o, x)| *o += c * x);
                self_coef += b * cos / (ni * ni);
                *co = cos;
            }
            out.iter_mut()
                .zip(ri)
                .for_each(|(o, x)| *o -= self_coef * x);
        });
    drop(targets);
    // Either side's cos is the pair's (they are equal bit for bit).
    let mut cos = vec![0f32; pairs.len()];
    for (&(_, k), &c) in sides.iter().zip(&cos_side) {
        cos[k as usize] = c;
    }
    let evaluated: Vec<PenalisedPair> = pairs
        .iter()
        .zip(&cos)
        .map(|(&(i, j, a), &cos)| PenalisedPair { i, j, a, cos })
        .collect();
    InterferenceStep::of(evaluated, overlap)
}

/// One involved latent's part of the penalty's gradient pass: the latent, its row of the
/// decoder gradient, its partners `(other, pair index)` and the slots for their cos.
type RowTask<'a> = (u32, &'a mut [f32], &'a [(u32, u32)], &'a mut [f32]);

/// Cosine of two decoder rows with known norms.
#[inline]
fn pair_cos(a: &[f32], b: &[f32], na: f32, nb: f32) -> f32 {
    (super::dot(a, b) / (na as f64 * nb as f64)) as f32
}

/// One reactivation check, for the log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReactivationEvent {
    pub step: usize,
    pub dead: usize,
    pub implicated: usize,
    pub reactivated: Vec<u32>,
    /// Interference mass of the step of the check, and of the next check.
    pub mass_before: f64,
    pub mass_after: Option<f64>,
}

/// Energy-weighted leverage of each row of `u` (rows x r) with singular values `s`:
/// `sum_k s_k^2 u_ik^2 / sum_k s_k^2`.
pub fn leverage(u: &[f32], s: &[f64], rows: usize) -> Vec<f64> {
    let r = s.len();
    let tot: f64 = s.iter().map(|x| x * x).sum::<f64>().max(1e-300);
    (0..rows)
        .map(|i| {
            (0..r)
                .map(|k| s[k] * s[k] * (u[i * r + k] as f64).powi(2))
                .sum::<f64>()
                / tot
        })
        .collect()
}

/// The reactivation rule: among `dead` latents, those whose decoder row has
/// `|cos| >= min_overlap` with at least one `hot` latent, ordered by that largest
/// |cos| (descending, ties by index), at most `max_count`. Returns `(picked, implicated)`.
pub fn pick_reactivations(
    dead: &[u32],
    hot: &[u32],
    w_dec: &[f32],
    d_in: usize,
    min_overlap: f32,
    max_count: usize,
) -> (Vec<u32>, usize) {
    if dead.is_empty() || hot.is_empty() {
        return (Vec::new(), 0);
    }
    let gather = |ids: &[u32]| -> Vec<f32> {
        let mut m = vec![0f32; ids.len() * d_in];
        for (k, &i) in ids.iter().enumerate() {
            let r = &w_dec[i as usize * d_in..(i as usize + 1) * d_in];
            let n = super::norm(r).max(1e-12) as f32;
            m[k * d_in..(k + 1) * d_in]
                .iter_mut()
                .zip(r)
                .for_each(|(o, x)| *o = x / n);
        }
        m
    };
    let (dm, hm) = (gather(dead), gather(hot));
    let mut c = vec![0f32; dead.len() * hot.len()];
    gemm(
        1.0,
        MatRef::row_major(&dm, dead.len(), d_in),
        MatRef::row_major(&hm, hot.len(), d_in).t(),
        0.0,
        MatMut::row_major(&mut c, dead.len(), hot.len()),
    );
    let mut scored: Vec<(f32, u32)> = dead
        .iter()
        .enumerate()
        .map(|(k, &d)| {
            let best = c[k * hot.len()..(k + 1) * hot.len()]
                .iter()
                .zip(hot)
                .filter(|(_, &h)| h != d)
                .map(|(x, _)| x.abs())
                .fold(0f32, f32::max);
            (best, d)
        })
        .filter(|(s, _)| *s >= min_overlap)
        .collect();
    let implicated = scored.len();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.truncate(max_count);
    (scored.into_iter().map(|(_, d)| d).collect(), implicated)
}

/// Method 2 as a [`Regularizer`] (parts 2-5; part 1 is the [`ZScoreGate`] built next
/// to it, sharing the list of re-initialised latents).
pub struct SelfCorrecting {
    cfg: SelfCorrectingConfig,
    d_sae: usize,
    ema: PairEma<1>,
    /// Step at which each latent last fired (or started / was re-initialised).
    last_fired: Vec<usize>,
    started: bool,
    rng: Rng,
    last_mass: f64,
    /// The pairs (and candidate count) of the last statistics update, penalised again
    /// until the next one (`penalty.stats_every > 1`).
    last_pairs: Option<Candidates>,
    pub log: Vec<ReactivationEvent>,
    pub total_reactivated: usize,
    resets: Arc<Mutex<Vec<u32>>>,
}

impl SelfCorrecting {
    pub fn new(
        cfg: SelfCorrectingConfig,
        d_sae: usize,
        seed: u64,
        resets: Arc<Mutex<Vec<u32>>>,
    ) -> Result<Self> {
        cfg.validate(d_sae)?;
        let ema = PairEma::new(
            d_sae,
            cfg.penalty.ema_decay.powi(cfg.penalty.stats_every as i32) as f32,
            cfg.penalty.ema_epsilon as f32,
            cfg.penalty.ema_max_entries,
        );
        Ok(SelfCorrecting {
            cfg,
            d_sae,
            ema,
            last_fired: vec![0; d_sae],
            started: false,
            rng: Rng::new(seed ^ 0x5e1f_c0de),
            last_mass: 0.0,
            last_pairs: None,
            log: Vec::new(),
            total_reactivated: 0,
            resets,
        })
    }

    /// The sparse interference matrix `A_ij = max(0, s_ij - tau)` from the stored
    /// statistics (each unordered pair once, mirrored).
    pub fn interference_matrix(&self) -> SparseSymOp {
        let tau = self.cfg.penalty.tau as f32;
        let mut trip = Vec::new();
        for (i, l) in self.ema.lists.iter().enumerate() {
            for e in l {
                if e.j as usize != i {
                    let a = self.ema.read(e)[0] - tau;
                    if a > 0.0 {
                        trip.push((i as u32, e.j, a));
                    }
                }
            }
        }
        SparseSymOp::from_upper(self.d_sae, &trip)
    }

    /// High-interference latents: the `hot_latents` largest energy-weighted leverages
    /// (> 0) in the rank-r randomized SVD of the interference matrix.
    pub fn hot_latents(&mut self) -> Vec<u32> {
        let a = self.interference_matrix();
        if a.idx.is_empty() {
            return Vec::new();
        }
        let r = &self.cfg.rsvd;
        let svd = randomized_svd(&a, r.rank, r.oversample, r.power_iters, &mut self.rng);
        let lev = leverage(&svd.u, &svd.s, self.d_sae);
        let mut order: Vec<u32> = (0..self.d_sae as u32)
            .filter(|&i| lev[i as usize] > 0.0)
            .collect();
        order.sort_by(|&x, &y| lev[y as usize].total_cmp(&lev[x as usize]).then(x.cmp(&y)));
        order.truncate(self.cfg.reactivation.hot_latents);
        order
    }

    /// Forget the statistics of re-initialised latents (every pair they belong to).
    fn forget(&mut self, latents: &[u32]) {
        if latents.is_empty() {
            return;
        }
        let mut gone = vec![false; self.d_sae];
        for &d in latents {
            gone[d as usize] = true;
            self.ema.lists[d as usize].clear();
        }
        for l in &mut self.ema.lists {
            l.retain(|e| !gone[e.j as usize]);
        }
        if let Some((pairs, _)) = &mut self.last_pairs {
            pairs.retain(|&(i, j, _)| !gone[i as usize] && !gone[j as usize]);
        }
    }

    fn profile(&mut self, ctx: &StepContext, metrics: &mut Vec<(String, f64)>) {
        let r = &self.cfg.rsvd;
        let op = DenseOp {
            data: &ctx.w_dec[..ctx.d_sae * ctx.d_in],
            rows: ctx.d_sae,
            cols: ctx.d_in,
        };
        let svd = randomized_svd(
            &op,
            r.rank.min(ctx.d_in),
            r.oversample,
            r.power_iters,
            &mut self.rng,
        );
        let wd = &ctx.w_dec[..ctx.d_sae * ctx.d_in];
        let fro2: f64 = wd
            .par_chunks(ctx.d_in)
            .map(|r| super::dot(r, r))
            .collect::<Vec<f64>>()
            .iter()
            .sum();
        let top: f64 = svd.s.iter().map(|s| s * s).sum();
        let s1 = svd.s.first().copied().unwrap_or(0.0);
        metrics.push((
            "sc_decoder_stable_rank".into(),
            if s1 > 0.0 { fro2 / (s1 * s1) } else { 0.0 },
        ));
        let ent: f64 = svd
            .s
            .iter()
            .map(|s| s * s / top.max(1e-300))
            .filter(|p| *p > 0.0)
            .map(|p| -p * p.ln())
            .sum();
        metrics.push(("sc_decoder_effective_rank_top_r".into(), ent.exp()));
        metrics.push((
            "sc_decoder_top_r_energy".into(),
            if fro2 > 0.0 { top / fro2 } else { 0.0 },
        ));
        let opts = CosineOptions {
            sample_rows: self.cfg.profile_cosine_rows,
            seed: ctx.step as u64,
        };
        let cs = decoder_cosine_stats(
            &ctx.w_dec[..ctx.d_sae * ctx.d_in],
            ctx.d_sae,
            ctx.d_in,
            &opts,
        );
        metrics.push(("sc_decoder_mean_abs_cos".into(), cs.mean));
        metrics.push(("sc_decoder_max_abs_cos".into(), cs.max));
    }
}

#[derive(Serialize, Deserialize)]
struct ScState {
    last_fired: Vec<usize>,
    started: bool,
    rng: [u64; 4],
    last_mass: f64,
    /// `SelfCorrecting::last_pairs` (absent in states saved before `stats_every`).
    #[serde(default)]
    last_pairs: Option<Candidates>,
    log: Vec<ReactivationEvent>,
    total_reactivated: usize,
}

impl Regularizer for SelfCorrecting {
    fn name(&self) -> &str {
        "self_correcting"
    }

    fn penalty(
        &mut self,
        ctx: &StepContext,
        codes: &SparseCodes,
        _grad_val: &mut [f32],
        grad_dec: &mut DecoderGrad<'_>,
    ) -> Result<PenaltyOut> {
        if codes.d_sae != self.d_sae
            || ctx.d_sae != self.d_sae
            || ctx.w_dec.len() < ctx.d_sae * ctx.d_in
        {
            bail!(
                "self_correcting: built for d_sae {}, got codes with {} and a step with d_sae {} / {} decoder values",
                self.d_sae,
                codes.d_sae,
                ctx.d_sae,
                ctx.w_dec.len()
            );
        }
        if !self.started {
            self.last_fired.iter_mut().for_each(|s| *s = ctx.step);
            self.started = true;
        }
        let mut metrics = Vec::new();
        let mut loss = 0.0;
        let p = &self.cfg.penalty;
        // The pair statistics also feed reactivation, so they are kept whenever either
        // part is on; the loss and decoder gradient only when the penalty is on (with
        // the penalty off the mass is still measured, as a diagnostic).
        if p.enabled || self.cfg.reactivation.enabled {
            let update = self.last_pairs.is_none() || ctx.step.is_multiple_of(p.stats_every);
            if update {
                // Dense codes: statistics from a row sample within the pair budget.
                let events = super::pairs::pair_events(codes);
                let sample;
                let stat_codes = if events > p.max_pair_events {
                    let stride = events.div_ceil(p.max_pair_events) as usize;
                    sample = super::pairs::row_sample(codes, stride);
                    metrics.push(("sc_pair_row_stride".into(), stride as f64));
                    &sample
                } else {
                    codes
                };
                self.last_pairs = Some(interference_candidates(
                    stat_codes,
                    &mut self.ema,
                    p.statistic,
                    p.tau as f32,
                    p.max_pairs_per_step,
                ));
            }
            let (pairs, candidates) = self.last_pairs.as_ref().expect("set above");
            let st = interference_penalty(
                pairs,
                ctx.w_dec,
                ctx.d_in,
                p.overlap,
                p.weight as f32,
                if p.enabled { Some(grad_dec) } else { None },
            );
            if p.enabled {
                loss = p.weight * st.mass;
            }
            self.last_mass = st.mass;
            metrics.push(("sc_interference_mass".into(), st.mass));
            metrics.push(("sc_weight".into(), if p.enabled { p.weight } else { 0.0 }));
            metrics.push(("sc_tau".into(), p.tau));
            metrics.push(("sc_penalised_pairs".into(), st.pairs.len() as f64));
            metrics.push(("sc_candidate_pairs".into(), *candidates as f64));
            metrics.push(("sc_ema_entries".into(), self.ema.entries() as f64));
        }
        metrics.push(("sc_reactivated_total".into(), self.total_reactivated as f64));
        if let Some(e) = self.log.last() {
            metrics.push((
                "sc_reactivated_last_check".into(),
                e.reactivated.len() as f64,
            ));
            metrics.push(("sc_mass_before_last_reactivation".into(), e.mass_before));
            if let Some(a) = e.mass_after {
                metrics.push(("sc_mass_after_last_reactivation".into(), a));
            }
        }
        if self.cfg.profile_every > 0 && ctx.step.is_multiple_of(self.cfg.profile_every) {
            self.profile(ctx, &mut metrics);
        }
        Ok(PenaltyOut { loss, metrics })
    }

    fn after_step(&mut self, ctx: &StepContext, codes: &SparseCodes) -> Result<Vec<u32>> {
        if !self.started {
            self.last_fired.iter_mut().for_each(|s| *s = ctx.step);
            self.started = true;
        }
        for (&i, &v) in codes.idx.iter().zip(&codes.val) {
            if v != 0.0 {
                self.last_fired[i as usize] = ctx.step;
            }
        }
        let r = self.cfg.reactivation.clone();
        if !r.enabled || ctx.step == 0 || !ctx.step.is_multiple_of(r.check_every) {
            return Ok(Vec::new());
        }
        if let Some(prev) = self.log.last_mut() {
            prev.mass_after = Some(self.last_mass);
        }
        let dead: Vec<u32> = (0..self.d_sae as u32)
            .filter(|&i| ctx.step - self.last_fired[i as usize] >= r.dead_window)
            .collect();
        let hot = if dead.is_empty() {
            Vec::new()
        } else {
            self.hot_latents()
        };
        let max_count = ((r.max_fraction * self.d_sae as f64).floor() as usize).max(1);
        let (picked, implicated) = pick_reactivations(
            &dead,
            &hot,
            ctx.w_dec,
            ctx.d_in,
            r.min_overlap as f32,
            max_count,
        );
        for &d in &picked {
            self.last_fired[d as usize] = ctx.step;
        }
        self.forget(&picked);
        self.total_reactivated += picked.len();
        self.resets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(&picked);
        self.log.push(ReactivationEvent {
            step: ctx.step,
            dead: dead.len(),
            implicated,
            reactivated: picked.clone(),
            mass_before: self.last_mass,
            mass_after: None,
        });
        Ok(picked)
    }

    /// Layout: 8-byte little-endian length of a JSON header (counters, RNG, log), the
    /// header, then the pair statistics in [`PairEma::to_bytes`] form.
    fn save_state(&self) -> Result<Vec<u8>> {
        let s = ScState {
            last_fired: self.last_fired.clone(),
            started: self.started,
            rng: self.rng.state(),
            last_mass: self.last_mass,
            last_pairs: self.last_pairs.clone(),
            log: self.log.clone(),
            total_reactivated: self.total_reactivated,
        };
        let head = serde_json::to_vec(&s)?;
        let mut out = (head.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&head);
        out.extend_from_slice(&self.ema.to_bytes());
        Ok(out)
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if bytes.len() < 8 {
            bail!("self_correcting: saved state is truncated");
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        if bytes.len() < 8 + n {
            bail!("self_correcting: saved state is truncated");
        }
        let s: ScState = serde_json::from_slice(&bytes[8..8 + n])
            .map_err(|e| anyhow::anyhow!("self_correcting: cannot read saved state: {e}"))?;
        if s.last_fired.len() != self.d_sae {
            bail!(
                "self_correcting: saved state has {} latents, this run has {}",
                s.last_fired.len(),
                self.d_sae
            );
        }
        self.ema
            .load_bytes(&bytes[8 + n..])
            .map_err(|e| anyhow::anyhow!("self_correcting: {e}"))?;
        self.last_fired = s.last_fired;
        self.started = s.started;
        self.rng = Rng::from_state(s.rng);
        self.last_mass = s.last_mass;
        self.last_pairs = s.last_pairs;
        self.log = s.log;
        self.total_reactivated = s.total_reactivated;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regularizer::DecoderGradBuf;

    /// A step of a 10-step run whose reconstruction equals its input (the penalty
    /// tests need only the codes and the decoder).
    fn step_ctx<'a>(
        step: usize,
        d_in: usize,
        d_sae: usize,
        x: &'a [f32],
        w_dec: &'a [f32],
    ) -> StepContext<'a> {
        StepContext {
            step,
            total_steps: 10,
            d_in,
            d_sae,
            x,
            x_hat: x,
            w_dec,
            pre_active: None,
        }
    }

    /// One penalty call with fresh gradient buffers.
    fn penalty_step(
        sc: &mut SelfCorrecting,
        ctx: &StepContext,
        codes: &SparseCodes,
    ) -> (PenaltyOut, DecoderGradBuf) {
        let mut gd = DecoderGradBuf::zeros(ctx.d_sae, ctx.d_in);
        let out = sc
            .penalty(ctx, codes, &mut vec![0.0; codes.nnz()], &mut gd.view())
            .unwrap();
        (out, gd)
    }

    /// The value of the metric `name`, if logged.
    fn metric(out: &PenaltyOut, name: &str) -> Option<f64> {
        out.metrics.iter().find(|(n, _)| n == name).map(|m| m.1)
    }

    #[test]
    fn dense_batches_use_a_strided_row_sample_within_the_budget() {
        use crate::methods::pairs::{pair_events, row_sample};
        let mut rng = Rng::new(4);
        let (rows, f) = (64, 40);
        let mut c = SparseCodes::with_capacity(rows, f, rows * f);
        for _ in 0..rows {
            let mut row = Vec::new();
            for i in 0..f as u32 {
                if rng.f32() < 0.5 {
                    row.push((i, 1.0 + rng.f32()));
                }
            }
            c.push_row(row);
        }
        let ev = pair_events(&c);
        let want: u64 = (0..rows)
            .map(|r| {
                let n = c.row(r).0.len() as u64;
                n * n.saturating_sub(1)
            })
            .sum();
        assert_eq!(ev, want);
        let s = row_sample(&c, 3);
        assert_eq!(s.rows, rows.div_ceil(3));
        for (k, r) in (0..rows).step_by(3).enumerate() {
            assert_eq!(s.row(k), c.row(r));
        }
        // A penalty step on the dense batch uses the sample and reports its stride; the
        // full batch (budget above its events) reports none.
        let d_in = 6;
        let mut w = vec![0f32; f * d_in];
        rng.fill_normal(&mut w, 1.0);
        let x = vec![0f32; rows * d_in];
        let ctx = step_ctx(1, d_in, f, &x, &w);
        let stride_of = |budget: u64| {
            let mut cfg = SelfCorrectingConfig::default();
            cfg.penalty.max_pair_events = budget;
            cfg.profile_every = 0;
            let resets = Arc::new(Mutex::new(Vec::new()));
            let mut sc = SelfCorrecting::new(cfg, f, 2, resets).unwrap();
            metric(&penalty_step(&mut sc, &ctx, &c).0, "sc_pair_row_stride")
        };
        assert_eq!(stride_of(ev / 4), Some(ev.div_ceil(ev / 4) as f64));
        assert_eq!(stride_of(ev), None);
    }

    #[test]
    fn zscore_gate_matches_hand_computed_ema() {
        let resets = Arc::new(Mutex::new(Vec::new()));
        let cfg = GateConfig {
            enabled: true,
            z: 2.0,
            ema_decay: 0.5,
            min_threshold: 0.0,
        };
        let mut g = ZScoreGate::new(cfg, 2, resets.clone());
        assert_eq!(g.inference_thresholds(), None, "no statistics yet");
        // Batch 1, latent 0: [1, 3] -> mean 2, std 1; latent 1: [-4, -2] -> mean -3, std 1.
        let t = g.thresholds(&[1.0, -4.0, 3.0, -2.0], 2, 2).to_vec();
        assert_eq!(t, vec![4.0, 0.0]); // -3 + 2 = -1 clamped to 0
                                       // Batch 2, latent 0: [2, 2] -> mean 2, std 0 => mu 2, sigma 0.5, thr 3.
                                       // latent 1: [0, 4] -> mean 2, std 2 => mu -0.5, sigma 1.5, thr 2.5.
        let t = g.thresholds(&[2.0, 0.0, 2.0, 4.0], 2, 2).to_vec();
        assert_eq!(t, vec![3.0, 2.5]);
        assert_eq!((g.mu[1], g.sigma[1]), (-0.5, 1.5));
        // A reset latent restarts from the batch: latent 1 batch [10, 12] -> 11, 1 -> thr 13.
        resets.lock().unwrap().push(1);
        let t = g.thresholds(&[2.0, 10.0, 2.0, 12.0], 2, 2).to_vec();
        assert_eq!(t, vec![2.0 + 2.0 * 0.25, 13.0]);
        // The exported thresholds are the last step's, from the statistics alone.
        assert_eq!(g.inference_thresholds(), Some(t));
        let saved = g.save_state().unwrap();
        let mut h = ZScoreGate::new(GateConfig::default(), 2, Arc::new(Mutex::new(Vec::new())));
        h.load_state(&saved).unwrap();
        assert_eq!(
            (h.mu.clone(), h.sigma.clone()),
            (g.mu.clone(), g.sigma.clone())
        );
        assert!(h.load_state(b"[1,2]").is_err());
    }

    fn dense_candidates(codes: &SparseCodes, tau: f32) -> Vec<(u32, u32, f32)> {
        let (b, f) = (codes.rows, codes.d_sae);
        let d = codes.to_dense();
        let mut out = Vec::new();
        let col = |i: usize| (0..b).map(|t| d[t * f + i] as f64).collect::<Vec<_>>();
        for i in 0..f {
            for j in i + 1..f {
                let (a, c) = (col(i), col(j));
                let dot: f64 = a.iter().zip(&c).map(|(x, y)| x * y).sum();
                if dot == 0.0 {
                    continue;
                }
                let n = (a.iter().map(|x| x * x).sum::<f64>()
                    * c.iter().map(|x| x * x).sum::<f64>())
                .sqrt();
                let s = (dot / n) as f32 - tau;
                if s > 0.0 {
                    out.push((i as u32, j as u32, s));
                }
            }
        }
        out
    }

    #[test]
    fn candidates_match_dense_correlation_on_first_batch() {
        let mut rng = Rng::new(11);
        let (b, f, k) = (30, 12, 4);
        let mut codes = SparseCodes::with_capacity(b, f, b * k);
        for _ in 0..b {
            let mut p = rng.permutation(f);
            p.truncate(k);
            codes.push_row(
                p.into_iter()
                    .map(|i| (i as u32, 0.2 + rng.f32()))
                    .collect::<Vec<_>>(),
            );
        }
        let mut ema = PairEma::<1>::new(f, 0.9, 0.0, 1 << 20);
        let (got, n) =
            interference_candidates(&codes, &mut ema, Statistic::Correlation, 0.2, usize::MAX);
        let mut want = dense_candidates(&codes, 0.2);
        want.sort_by(|x, y| y.2.total_cmp(&x.2).then((x.0, x.1).cmp(&(y.0, y.1))));
        assert_eq!(n, want.len());
        assert!(n > 3);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((g.0, g.1), (w.0, w.1));
            assert!((g.2 - w.2).abs() < 1e-5);
        }
        // The per-step cap keeps the largest.
        let mut ema = PairEma::<1>::new(f, 0.9, 0.0, 1 << 20);
        let (top, _) = interference_candidates(&codes, &mut ema, Statistic::Correlation, 0.2, 3);
        assert_eq!(top.len(), 3);
        assert_eq!((top[0].0, top[0].1), (want[0].0, want[0].1));
    }

    #[test]
    fn interference_gradient_matches_finite_differences() {
        let mut rng = Rng::new(12);
        let (f, d) = (6, 5);
        let mut w = vec![0f32; f * d];
        rng.fill_normal(&mut w, 1.0);
        for x in w[2 * d..3 * d].iter_mut() {
            *x *= 3.0; // non-unit rows: the cos gradient must handle norms
        }
        let pairs = vec![(0u32, 1u32, 0.5f32), (0, 2, 0.3), (2, 4, 0.7), (3, 5, 0.2)];
        for overlap in [Overlap::CosSquared, Overlap::AbsCos] {
            // The gradient is added to what the buffer holds (here 1s) and each
            // involved row is listed once, ascending.
            let mut gd = DecoderGradBuf::zeros(f, d);
            gd.grad.iter_mut().for_each(|g| *g = 1.0);
            let st = interference_penalty(&pairs, &w, d, overlap, 0.7, Some(&mut gd.view()));
            let full: Vec<f64> = gd.grad.iter().map(|&g| g as f64 - 1.0).collect();
            assert_eq!(gd.touched, vec![0, 1, 2, 3, 4, 5]);
            // The row-by-row pass (with gradient) and the pair pass (without) agree on
            // every cos and the mass, bit for bit.
            let plain = interference_penalty(&pairs, &w, d, overlap, 0.7, None);
            assert_eq!(st.pairs, plain.pairs);
            assert_eq!(st.mass, plain.mass);
            let h = 1e-3f32;
            for p in 0..f * d {
                let mut wp = w.clone();
                wp[p] += h;
                let up = interference_penalty(&pairs, &wp, d, overlap, 0.7, None).mass;
                wp[p] -= 2.0 * h;
                let dn = interference_penalty(&pairs, &wp, d, overlap, 0.7, None).mass;
                let fd = 0.7 * (up - dn) / (2.0 * h as f64);
                assert!(
                    (fd - full[p]).abs() < 2e-3 * (1.0 + fd.abs()),
                    "{overlap:?} p {p}: fd {fd} vs {}",
                    full[p]
                );
            }
            assert!(st.mass > 0.0);
        }
    }

    #[test]
    fn reactivation_rule_picks_exactly_the_intended_latents() {
        let d = 8;
        let f = 10;
        let mut w = vec![0f32; f * d];
        let unit = |k: usize| {
            let mut v = vec![0f32; d];
            v[k] = 1.0;
            v
        };
        // Hot latents 0 (e0) and 1 (e1).
        w[..d].copy_from_slice(&unit(0));
        w[d..2 * d].copy_from_slice(&unit(1));
        // Dead 5: cos 0.8 with e0; dead 6: cos 0.5 with e1; dead 7: cos 0.2 (below);
        // dead 8: orthogonal; dead 9: cos 0.9 with e1 but 2x norm.
        let mix = |a: usize, c: f32, b: usize| {
            let mut v = vec![0f32; d];
            v[a] = c;
            v[b] = (1.0 - c * c).sqrt();
            v
        };
        w[5 * d..6 * d].copy_from_slice(&mix(0, 0.8, 4));
        w[6 * d..7 * d].copy_from_slice(&mix(1, -0.5, 5));
        w[7 * d..8 * d].copy_from_slice(&mix(0, 0.2, 6));
        w[8 * d..9 * d].copy_from_slice(&unit(7));
        let v9: Vec<f32> = mix(1, 0.9, 3).iter().map(|x| 2.0 * x).collect();
        w[9 * d..10 * d].copy_from_slice(&v9);
        let dead = [5u32, 6, 7, 8, 9];
        let (picked, implicated) = pick_reactivations(&dead, &[0, 1], &w, d, 0.3, 10);
        assert_eq!(picked, vec![9, 5, 6]);
        assert_eq!(implicated, 3);
        let (picked, _) = pick_reactivations(&dead, &[0, 1], &w, d, 0.3, 2);
        assert_eq!(picked, vec![9, 5]);
        assert!(pick_reactivations(&dead, &[], &w, d, 0.3, 10).0.is_empty());
    }

    #[test]
    fn hot_latents_come_from_the_interference_block() {
        // Latents 0..4 co-fire strongly with each other; 4..20 fire alone.
        let (b, f) = (64, 20);
        let mut codes = SparseCodes::with_capacity(b, f, 0);
        let mut rng = Rng::new(13);
        for t in 0..b {
            let mut row: Vec<(u32, f32)> = (0..4).map(|i| (i, 0.5 + rng.f32())).collect();
            row.push((4 + (t % 16) as u32, 1.0));
            codes.push_row(row);
        }
        let mut cfg = SelfCorrectingConfig::default();
        cfg.rsvd.rank = 4;
        cfg.reactivation.hot_latents = 4;
        let mut sc = SelfCorrecting::new(cfg, f, 1, Arc::new(Mutex::new(Vec::new()))).unwrap();
        interference_candidates(&codes, &mut sc.ema, Statistic::Correlation, 0.1, 100);
        let mut hot = sc.hot_latents();
        hot.sort();
        assert_eq!(hot, vec![0, 1, 2, 3]);
    }

    #[test]
    fn regularizer_end_to_end_reactivates_dead_and_reports_profile() {
        let (d_in, f, b) = (8usize, 12usize, 32usize);
        let mut rng = Rng::new(14);
        let mut w = vec![0f32; f * d_in];
        rng.fill_normal(&mut w, 1.0);
        // Latent 11 never fires and copies latent 0's direction (0 is in the hot block).
        let r0: Vec<f32> = w[..d_in].to_vec();
        w[11 * d_in..12 * d_in].copy_from_slice(&r0);
        let mut cfg = SelfCorrectingConfig::default();
        cfg.rsvd.rank = 3;
        cfg.reactivation = ReactivationConfig {
            dead_window: 4,
            check_every: 5,
            hot_latents: 3,
            ..Default::default()
        };
        cfg.profile_every = 5;
        let resets = Arc::new(Mutex::new(Vec::new()));
        let mut sc = SelfCorrecting::new(cfg, f, 2, resets.clone()).unwrap();
        let x = vec![0f32; b * d_in];
        let mut all_picked = Vec::new();
        for step in 0..6 {
            let mut codes = SparseCodes::with_capacity(b, f, 0);
            for t in 0..b {
                let mut row: Vec<(u32, f32)> = (0..3).map(|i| (i, 0.5 + rng.f32())).collect();
                row.push((3 + (t % 8) as u32, 1.0));
                codes.push_row(row);
            }
            let ctx = step_ctx(step, d_in, f, &x, &w);
            let (out, gd) = penalty_step(&mut sc, &ctx, &codes);
            assert!(out.loss > 0.0 && !gd.touched.is_empty());
            if step == 5 {
                assert!(metric(&out, "sc_decoder_stable_rank").is_some());
            }
            all_picked.extend(sc.after_step(&ctx, &codes).unwrap());
        }
        assert_eq!(all_picked, vec![11]);
        assert_eq!(sc.total_reactivated, 1);
        assert_eq!(sc.log.len(), 1);
        assert_eq!(sc.log[0].dead, 1);
        assert_eq!(*resets.lock().unwrap(), vec![11]);
        let saved = sc.save_state().unwrap();
        let mut sc2 = SelfCorrecting::new(
            SelfCorrectingConfig {
                rsvd: RsvdConfig {
                    rank: 3,
                    ..Default::default()
                },
                ..Default::default()
            },
            f,
            2,
            Arc::new(Mutex::new(Vec::new())),
        )
        .unwrap();
        sc2.load_state(&saved).unwrap();
        assert_eq!(sc2.log, sc.log);
        assert_eq!(sc2.ema.entries(), sc.ema.entries());
    }

    #[test]
    fn penalty_off_keeps_statistics_without_loss() {
        let (d_in, f, b) = (6usize, 8usize, 16usize);
        let mut rng = Rng::new(15);
        let mut w = vec![0f32; f * d_in];
        rng.fill_normal(&mut w, 1.0);
        let mut cfg = SelfCorrectingConfig::default();
        cfg.penalty.enabled = false;
        cfg.rsvd.rank = 2;
        cfg.profile_every = 0;
        let mut sc = SelfCorrecting::new(cfg, f, 3, Arc::new(Mutex::new(Vec::new()))).unwrap();
        let mut codes = SparseCodes::with_capacity(b, f, 0);
        for _ in 0..b {
            codes.push_row(vec![(0u32, 1.0f32), (1, 0.5 + rng.f32()), (2, 0.3)]);
        }
        let x = vec![0f32; b * d_in];
        let ctx = step_ctx(1, d_in, f, &x, &w);
        let (out, gd) = penalty_step(&mut sc, &ctx, &codes);
        assert_eq!(out.loss, 0.0);
        assert!(gd.touched.is_empty() && gd.grad.iter().all(|&g| g == 0.0));
        assert!(sc.ema.entries() > 0);
        let mass = metric(&out, "sc_interference_mass").unwrap();
        assert!(mass > 0.0);
    }

    #[test]
    fn stats_every_updates_every_nth_step_and_resumes_identically() {
        let (d_in, f, b) = (6usize, 12usize, 32usize);
        let mut rng = Rng::new(21);
        let mut w = vec![0f32; f * d_in];
        rng.fill_normal(&mut w, 1.0);
        let batches: Vec<SparseCodes> = (0..4)
            .map(|_| {
                let mut c = SparseCodes::with_capacity(b, f, b * 5);
                for _ in 0..b {
                    let perm = rng.permutation(f);
                    c.push_row(perm[..5].iter().map(|&i| (i as u32, 0.2 + rng.f32())));
                }
                c
            })
            .collect();
        let mut cfg = SelfCorrectingConfig::default();
        cfg.penalty.stats_every = 2;
        cfg.penalty.tau = 0.05;
        cfg.rsvd.rank = 2;
        cfg.reactivation.enabled = false;
        cfg.profile_every = 0;
        let new = |cfg: &SelfCorrectingConfig| {
            SelfCorrecting::new(cfg.clone(), f, 3, Arc::new(Mutex::new(Vec::new()))).unwrap()
        };
        let mut sc = new(&cfg);
        assert_eq!(sc.ema.momentum, 0.99f64.powi(2) as f32);
        let x = vec![0f32; b * d_in];
        let mut outs = Vec::new();
        let mut ts = Vec::new();
        let mut saved = Vec::new();
        for (step, codes) in batches.iter().enumerate() {
            let ctx = step_ctx(step, d_in, f, &x, &w);
            outs.push(penalty_step(&mut sc, &ctx, codes));
            ts.push(sc.ema.t);
            saved.push(sc.save_state().unwrap());
        }
        // Statistics are updated at steps 0 and 2 only.
        assert_eq!(ts, vec![1, 1, 2, 2]);
        assert!(outs[0].0.loss > 0.0);
        // Step 1 penalises step 0's pairs with the same decoder: the same loss and
        // gradient, although its batch differs.
        assert_eq!(outs[1].0.loss, outs[0].0.loss);
        assert_eq!(outs[1].1.touched, outs[0].1.touched);
        assert_eq!(outs[1].1.grad, outs[0].1.grad);
        assert_ne!(outs[2].0.loss, outs[0].0.loss);
        // Resuming after step 0 or 1 reproduces the next steps bit for bit.
        for from in [0usize, 1] {
            let mut r = new(&cfg);
            r.load_state(&saved[from]).unwrap();
            for step in from + 1..4 {
                let ctx = step_ctx(step, d_in, f, &x, &w);
                let (o, g) = penalty_step(&mut r, &ctx, &batches[step]);
                assert_eq!(
                    o.loss, outs[step].0.loss,
                    "resumed after {from}, step {step}"
                );
                assert_eq!(g.grad, outs[step].1.grad);
            }
        }
        // Every step (the default) updates every time.
        cfg.penalty.stats_every = 1;
        let mut every = new(&cfg);
        for (step, codes) in batches.iter().enumerate() {
            penalty_step(&mut every, &step_ctx(step, d_in, f, &x, &w), codes);
        }
        assert_eq!(every.ema.t, 4);
        cfg.penalty.stats_every = 0;
        assert!(cfg.validate(f).is_err());
    }
}
