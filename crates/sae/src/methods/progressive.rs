//! Method 1: progressive sparsity-guided orthogonality.
//!
//! Penalty `lambda_2(p) * sum_(i,j) c_ij(p) |f_i^T f_j| / B` over ordered pairs, with
//! `n_ij = (M^T M)_ij / count_j` (the fraction of j's firings on which i also fires),
//! `c_ij = clamp((n_ij - thr(p)) / thr(p), 0, 1)` treated as a constant (no gradient),
//! `thr` floored. Only pairs that co-fire in the batch have `f_i^T f_j != 0`, so the
//! penalty, its gradient and `n_ij` are computed from the active pairs only (see
//! [`super::pairs`]); [`dense_reference`] is the research's F x F formula, kept for
//! tests and the benchmark.
//!
//! Gradient: `d/d f_ti [c_ij |D_ij| + c_ji |D_ji|] = (c_ij + c_ji) sign(D_ij) f_tj`
//! with `D = F^T F` symmetric; `sign(0) = 0`.

use super::pairs::{run_latents, Csc, PairEma};
use super::schedule::{warmup_factor, ThresholdSchedule, WeightSchedule};
use crate::codes::SparseCodes;
use crate::regularizer::{DecoderGrad, PenaltyOut, Regularizer, StepContext};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Configuration of Method 1 (TOML: the fields of `[method]` with
/// `method = "progressive_ortho"`). Defaults: see `docs/methods.md`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProgressiveConfig {
    /// `thr(p)`; default linear from 0.85.
    pub threshold: ThresholdSchedule,
    /// Floor of `thr(p)`; default 1e-3 (the research's).
    pub threshold_floor: f64,
    /// `lambda_2(p)`; default `0.25 (1 - p)^2`.
    pub weight: WeightSchedule,
    /// Linear warm-up of the weight over this fraction of training; default 0.1.
    pub warmup_fraction: f64,
    /// EMA momentum of `n_ij` (0 = use the batch's `n_ij`); default 0.9.
    pub ema_momentum: f64,
    /// EMA entries whose value falls below this are dropped; default 0.01.
    pub ema_epsilon: f64,
    /// ... and so are entries below this fraction of the current threshold; default
    /// 0.05 (a pair then gets an entry once a batch has `n_ij >= 0.05 thr / (1 - m)`,
    /// half the threshold at m = 0.9; see docs/methods.md for what this approximates).
    /// 0 = only `ema_epsilon`.
    pub ema_epsilon_relative: f64,
    /// At most this many stored EMA entries (12 bytes each); default 8M (96 MB).
    pub ema_max_entries: usize,
    /// Whether `i == j` terms count (the research's dense code included them: they
    /// penalise `||f_i||^2`); default false.
    pub include_diagonal: bool,
}

impl Default for ProgressiveConfig {
    fn default() -> Self {
        ProgressiveConfig {
            threshold: ThresholdSchedule::Linear { base: 0.85 },
            threshold_floor: 1e-3,
            weight: WeightSchedule::Power {
                max: 0.25,
                exponent: 2.0,
            },
            warmup_fraction: 0.1,
            ema_momentum: 0.9,
            ema_epsilon: 0.01,
            ema_epsilon_relative: 0.05,
            ema_max_entries: 8_000_000,
            include_diagonal: false,
        }
    }
}

impl ProgressiveConfig {
    /// The static orthogonality control the research never ran: the same penalty with
    /// a constant threshold and weight, no warm-up and no EMA.
    pub fn static_control() -> Self {
        ProgressiveConfig {
            threshold: ThresholdSchedule::Constant { value: 0.85 },
            weight: WeightSchedule::Constant { value: 0.25 },
            warmup_fraction: 0.0,
            ema_momentum: 0.0,
            ..Default::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.threshold.validate()?;
        self.weight.validate()?;
        if !(self.threshold_floor > 0.0 && self.threshold_floor <= 1.0) {
            bail!(
                "progressive_ortho: threshold_floor = {} must lie in (0, 1]",
                self.threshold_floor
            );
        }
        if !(0.0..1.0).contains(&self.warmup_fraction) {
            bail!(
                "progressive_ortho: warmup_fraction = {} must lie in [0, 1)",
                self.warmup_fraction
            );
        }
        if !(0.0..1.0).contains(&self.ema_momentum) {
            bail!(
                "progressive_ortho: ema_momentum = {} must lie in [0, 1) (0 disables the EMA)",
                self.ema_momentum
            );
        }
        if !(self.ema_epsilon >= 0.0 && self.ema_epsilon < 1.0) {
            bail!(
                "progressive_ortho: ema_epsilon = {} must lie in [0, 1)",
                self.ema_epsilon
            );
        }
        if !(self.ema_epsilon_relative >= 0.0 && self.ema_epsilon_relative < 1.0) {
            bail!(
                "progressive_ortho: ema_epsilon_relative = {} must lie in [0, 1)",
                self.ema_epsilon_relative
            );
        }
        if self.ema_momentum > 0.0 && self.ema_max_entries < 16 {
            bail!(
                "progressive_ortho: ema_max_entries = {} is too small (>= 16)",
                self.ema_max_entries
            );
        }
        Ok(())
    }

    pub fn threshold_at(&self, p: f64) -> f64 {
        self.threshold.value(p, self.threshold_floor)
    }

    /// The EMA's drop threshold when the co-activation threshold is `thr`.
    pub fn ema_epsilon_at(&self, thr: f64) -> f64 {
        self.ema_epsilon.max(self.ema_epsilon_relative * thr)
    }

    pub fn weight_at(&self, p: f64) -> f64 {
        self.weight.value(p) * warmup_factor(p, self.warmup_fraction)
    }
}

/// Co-activation statistics of one step (also used by the monitor).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CoactStats {
    /// Ordered co-firing pairs `(i, j)`, `i != j`, in the batch.
    pub pairs: u64,
    /// Fraction of those with `n_ij > thr`.
    pub frac_above: f64,
    /// Mean `c_ij` over those pairs.
    pub mean_c: f64,
}

/// The result of one evaluation of the penalty.
#[derive(Clone, Debug, Default)]
pub struct ProgressiveStep {
    /// `sum c_ij |f_i^T f_j| / B` (before the weight).
    pub raw: f64,
    pub threshold: f64,
    pub weight: f64,
    pub stats: CoactStats,
}

#[inline]
fn clamp_c(n: f32, thr: f32) -> f32 {
    ((n - thr) / thr).clamp(0.0, 1.0)
}

struct LatentOut {
    loss: f64,
    pairs: u64,
    above: u64,
    sum_c: f64,
    /// Pair-EMA entries evicted by the bound during this latent's update.
    evicted: u64,
}

/// The sparse penalty. `grad_val` (aligned with `codes.val`) receives
/// `weight * d(raw)/d(val)`. `ema` (if any) is updated with this batch's `n_ij`.
pub fn sparse_penalty(
    codes: &SparseCodes,
    threshold: f64,
    weight: f64,
    diag: bool,
    ema: Option<&mut PairEma<2>>,
    grad_val: Option<&mut [f32]>,
) -> ProgressiveStep {
    let f = codes.d_sae;
    let b = codes.rows.max(1);
    let csc = Csc::build(codes);
    let thr = threshold as f32;
    let scale = (weight / b as f64) as f32;
    let want_grad = grad_val.is_some();
    let inv_counts: Vec<f32> = (0..f).map(|i| 1.0 / csc.count(i).max(1) as f32).collect();

    let (walk, mut lists) = match ema {
        Some(e) => (Some(e.begin()), Some(e)),
        None => (None, None),
    };
    let (outs, grad) = run_latents(
        &csc,
        lists.as_mut().map(|e| e.lists.as_mut_slice()),
        diag,
        want_grad,
        |s, i, list| {
            let inv_i = inv_counts[i];
            // Batch values: n_ij = C_ij / count_j, n_ji = C_ij / count_i.
            let batch = |j: u32, c: u32| [c as f32 * inv_counts[j as usize], c as f32 * inv_i];
            let mut evicted = 0;
            if let (Some(w), Some(list)) = (walk.as_ref(), list) {
                let acc = &s.acc;
                evicted =
                    PairEma::update_list(w, list, &s.touched, &mut s.pos, &mut s.ema_val, |j| {
                        batch(j, acc[j as usize].0)
                    });
            } else {
                for &j in &s.touched {
                    s.ema_val[j as usize] = batch(j, s.acc[j as usize].0);
                }
            }
            let mut o = LatentOut {
                loss: 0.0,
                pairs: 0,
                above: 0,
                sum_c: 0.0,
                evicted,
            };
            for &j in &s.touched {
                let ju = j as usize;
                let [nij, nji] = s.ema_val[ju];
                let d = s.acc[ju].1;
                let sign = if d > 0.0 {
                    1.0
                } else if d < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                let cij = clamp_c(nij, thr);
                if ju == i {
                    // Diagonal: c_ii ||f_i||^2; the scatter adds w twice (2 c_ii f_ti).
                    o.loss += cij as f64 * d.abs() as f64;
                    s.w[ju] = cij * sign * scale;
                    continue;
                }
                let cji = clamp_c(nji, thr);
                o.loss += (cij + cji) as f64 * d.abs() as f64;
                o.pairs += 2;
                o.above += (nij > thr) as u64 + (nji > thr) as u64;
                o.sum_c += (cij + cji) as f64;
                s.w[ju] = (cij + cji) * sign * scale;
            }
            o
        },
    );
    if let Some(g) = grad_val {
        for (q, &p) in csc.orig.iter().enumerate() {
            g[p as usize] += grad[q];
        }
    }
    let (mut loss, mut pairs, mut above, mut sum_c, mut evicted) = (0f64, 0u64, 0u64, 0f64, 0);
    for o in &outs {
        loss += o.loss;
        pairs += o.pairs;
        above += o.above;
        sum_c += o.sum_c;
        evicted += o.evicted;
    }
    if let Some(e) = lists {
        e.end(evicted);
    }
    let denom = pairs.max(1) as f64;
    ProgressiveStep {
        raw: loss / b as f64,
        threshold,
        weight,
        stats: CoactStats {
            pairs,
            frac_above: above as f64 / denom,
            mean_c: sum_c / denom,
        },
    }
}

/// The research's dense formula in f64, for tests and the benchmark: builds the F x F
/// matrices `M^T M`, `F^T F` (and `n`, `c`). `codes` is dense row-major [B, F].
/// `ema` (F x F, row-major, `n_ema[i * F + j]` = EMA of `n_ij`) is updated in place
/// when given (`first` = this is the first batch, so it is overwritten).
/// Returns `(raw penalty, gradient [B, F] of the weighted penalty)`.
pub fn dense_reference(
    codes: &[f32],
    b: usize,
    f: usize,
    threshold: f64,
    weight: f64,
    diag: bool,
    ema: Option<(&mut [f64], f64, bool)>,
) -> (f64, Vec<f64>) {
    let mut cnt = vec![0f64; f];
    let mut co = vec![0f64; f * f];
    let mut dot = vec![0f64; f * f];
    for t in 0..b {
        let row = &codes[t * f..(t + 1) * f];
        for i in 0..f {
            if row[i] == 0.0 {
                continue;
            }
            cnt[i] += 1.0;
            for j in 0..f {
                if row[j] != 0.0 {
                    co[i * f + j] += 1.0;
                    dot[i * f + j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
    }
    let mut n = vec![0f64; f * f];
    for i in 0..f {
        for j in 0..f {
            n[i * f + j] = if cnt[j] > 0.0 {
                co[i * f + j] / cnt[j]
            } else {
                0.0
            };
        }
    }
    if let Some((e, m, first)) = ema {
        for (ev, nv) in e.iter_mut().zip(n.iter_mut()) {
            *ev = if first {
                *nv
            } else {
                m * *ev + (1.0 - m) * *nv
            };
            *nv = *ev;
        }
    }
    let c: Vec<f64> = n
        .iter()
        .map(|&v| ((v - threshold) / threshold).clamp(0.0, 1.0))
        .collect();
    let mut raw = 0f64;
    for i in 0..f {
        for j in 0..f {
            if i != j || diag {
                raw += c[i * f + j] * dot[i * f + j].abs();
            }
        }
    }
    let mut grad = vec![0f64; b * f];
    for t in 0..b {
        for i in 0..f {
            let mut g = 0f64;
            for j in 0..f {
                if i == j && !diag {
                    continue;
                }
                let d = dot[i * f + j];
                let s = if d > 0.0 {
                    1.0
                } else if d < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                g += (c[i * f + j] + c[j * f + i]) * s * codes[t * f + j] as f64;
            }
            grad[t * f + i] = g * weight / b as f64;
        }
    }
    (raw / b as f64, grad)
}

/// Method 1 as a [`Regularizer`].
pub struct ProgressiveOrtho {
    cfg: ProgressiveConfig,
    ema: Option<PairEma<2>>,
    name: String,
}

impl ProgressiveOrtho {
    pub fn new(cfg: ProgressiveConfig, d_sae: usize) -> Result<Self> {
        cfg.validate()?;
        let ema = (cfg.ema_momentum > 0.0).then(|| {
            PairEma::new(
                d_sae,
                cfg.ema_momentum as f32,
                cfg.ema_epsilon as f32,
                cfg.ema_max_entries,
            )
        });
        Ok(ProgressiveOrtho {
            cfg,
            ema,
            name: "progressive_ortho".into(),
        })
    }

    pub fn config(&self) -> &ProgressiveConfig {
        &self.cfg
    }
}

impl Regularizer for ProgressiveOrtho {
    fn name(&self) -> &str {
        &self.name
    }

    fn penalty(
        &mut self,
        ctx: &StepContext,
        codes: &SparseCodes,
        grad_val: &mut [f32],
        _grad_dec: &mut DecoderGrad<'_>,
    ) -> Result<PenaltyOut> {
        if codes.d_sae != ctx.d_sae || grad_val.len() != codes.val.len() {
            bail!(
                "progressive_ortho: codes have d_sae {} / {} values but the step has d_sae {} / {} gradient slots",
                codes.d_sae,
                codes.val.len(),
                ctx.d_sae,
                grad_val.len()
            );
        }
        let p = ctx.progress();
        let thr = self.cfg.threshold_at(p);
        let w = self.cfg.weight_at(p);
        if let Some(e) = self.ema.as_mut() {
            e.epsilon = self.cfg.ema_epsilon_at(thr) as f32;
        }
        let st = sparse_penalty(
            codes,
            thr,
            w,
            self.cfg.include_diagonal,
            self.ema.as_mut(),
            Some(grad_val),
        );
        let mut metrics = vec![
            ("ortho_penalty_raw".to_string(), st.raw),
            ("ortho_threshold".to_string(), thr),
            ("ortho_weight".to_string(), w),
            ("coact_pairs".to_string(), st.stats.pairs as f64),
            ("coact_frac_above".to_string(), st.stats.frac_above),
            ("coact_mean_c".to_string(), st.stats.mean_c),
        ];
        if let Some(e) = &self.ema {
            metrics.push(("ema_entries".to_string(), e.entries() as f64));
            metrics.push(("ema_evicted".to_string(), e.evicted as f64));
        }
        Ok(PenaltyOut {
            loss: w * st.raw,
            metrics,
        })
    }

    /// The only state is the EMA of `n_ij` (empty when the EMA is off).
    fn save_state(&self) -> Result<Vec<u8>> {
        Ok(self.ema.as_ref().map(|e| e.to_bytes()).unwrap_or_default())
    }

    fn load_state(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.ema {
            Some(e) if !bytes.is_empty() => e.load_bytes(bytes).context("progressive_ortho: cannot restore state"),
            None if !bytes.is_empty() => bail!("progressive_ortho: saved state has EMA statistics but this run's ema_momentum is 0"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::needless_range_loop)] // index loops mirror the formulas
    use super::*;
    use crate::regularizer::DecoderGradBuf;
    use saelab_core::rng::Rng;

    /// Random codes with a few "twin" latents that tend to co-fire, so that c_ij spans
    /// 0, fractional values and 1.
    fn codes(rng: &mut Rng, b: usize, f: usize, k: usize) -> SparseCodes {
        let mut c = SparseCodes::with_capacity(b, f, b * k);
        for _ in 0..b {
            let mut perm = rng.permutation(f);
            perm.truncate(k);
            if perm.contains(&0) && !perm.contains(&1) && rng.f32() < 0.8 {
                perm[k - 1] = if perm[k - 1] == 0 { perm[0] } else { 1 };
                if !perm.contains(&0) {
                    perm[0] = 0;
                }
            }
            let sign_flip = rng.f32() < 0.2;
            c.push_row(
                perm.into_iter()
                    .map(|i| {
                        (
                            i as u32,
                            (0.1 + 2.0 * rng.f32()) * if sign_flip && i == 2 { -1.0 } else { 1.0 },
                        )
                    })
                    .collect::<Vec<_>>(),
            );
        }
        c
    }

    fn check_case(seed: u64, diag: bool, thr: f64) {
        let mut rng = Rng::new(seed);
        let (b, f, k) = (24, 13, 4);
        let c = codes(&mut rng, b, f, k);
        let dense = c.to_dense();
        let mut g = vec![0f32; c.nnz()];
        let st = sparse_penalty(&c, thr, 0.3, diag, None, Some(&mut g));
        let (raw, gd) = dense_reference(&dense, b, f, thr, 0.3, diag, None);
        assert!(
            (st.raw - raw).abs() < 1e-5 * (1.0 + raw.abs()),
            "raw {} vs {}",
            st.raw,
            raw
        );
        assert!(raw > 0.0, "case must exercise the penalty");
        for r in 0..b {
            for p in c.offsets[r]..c.offsets[r + 1] {
                let i = c.idx[p] as usize;
                let want = gd[r * f + i];
                assert!(
                    (g[p] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "grad {} vs {}",
                    g[p],
                    want
                );
            }
        }
    }

    #[test]
    fn ema_drop_threshold_follows_the_threshold() {
        let c = ProgressiveConfig::default();
        assert!((c.ema_epsilon_at(0.85) - 0.0425).abs() < 1e-12);
        assert_eq!(c.ema_epsilon_at(0.1), 0.01);
        let abs_only = ProgressiveConfig {
            ema_epsilon_relative: 0.0,
            ..Default::default()
        };
        assert_eq!(abs_only.ema_epsilon_at(0.85), 0.01);
        for bad in [-0.1, 1.0] {
            let e = ProgressiveConfig {
                ema_epsilon_relative: bad,
                ..Default::default()
            }
            .validate()
            .unwrap_err();
            assert!(e.to_string().contains("ema_epsilon_relative"), "{e}");
        }
    }

    #[test]
    fn sparse_equals_dense_on_random_cases() {
        for seed in 0..6 {
            check_case(seed, false, 0.3);
            check_case(seed + 100, true, 0.5);
            check_case(seed + 200, false, 0.05);
        }
    }

    #[test]
    fn sparse_ema_equals_dense_ema_over_steps() {
        let mut rng = Rng::new(9);
        let (b, f, k) = (20, 11, 4);
        let mut ema = PairEma::<2>::new(f, 0.8, 0.0, 1 << 20);
        let mut dense_ema = vec![0f64; f * f];
        for step in 0..5 {
            let c = codes(&mut rng, b, f, k);
            let mut g = vec![0f32; c.nnz()];
            let st = sparse_penalty(&c, 0.2, 0.5, false, Some(&mut ema), Some(&mut g));
            let (raw, gd) = dense_reference(
                &c.to_dense(),
                b,
                f,
                0.2,
                0.5,
                false,
                Some((&mut dense_ema, 0.8, step == 0)),
            );
            assert!(
                (st.raw - raw).abs() < 1e-4 * (1.0 + raw),
                "step {step}: {} vs {raw}",
                st.raw
            );
            for r in 0..b {
                for p in c.offsets[r]..c.offsets[r + 1] {
                    let want = gd[r * f + c.idx[p] as usize];
                    assert!((g[p] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
                }
            }
        }
        // Stored values equal the dense EMA of every pair that was ever seen.
        for (i, l) in ema.lists.iter().enumerate() {
            for e in l {
                let v = ema.read(e);
                let j = e.j as usize;
                assert!((v[0] as f64 - dense_ema[i * f + j]).abs() < 1e-5);
                assert!((v[1] as f64 - dense_ema[j * f + i]).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let mut rng = Rng::new(77);
        let (b, f, k) = (16, 9, 3);
        let c = codes(&mut rng, b, f, k);
        let mut g = vec![0f32; c.nnz()];
        let thr = 0.3;
        let st = sparse_penalty(&c, thr, 1.0, false, None, Some(&mut g));
        assert!(st.raw > 0.0);
        // c_ij depends only on the firing mask, which small perturbations keep.
        let h = 1e-3f32;
        for p in 0..c.nnz() {
            let mut cp = c.clone();
            cp.val[p] += h;
            let up = sparse_penalty(&cp, thr, 1.0, false, None, None).raw;
            cp.val[p] -= 2.0 * h;
            let dn = sparse_penalty(&cp, thr, 1.0, false, None, None).raw;
            let fd = (up - dn) / (2.0 * h as f64);
            assert!(
                (fd - g[p] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "p {p}: fd {fd} vs {}",
                g[p]
            );
        }
    }

    #[test]
    fn static_control_is_constant() {
        let c = ProgressiveConfig::static_control();
        c.validate().unwrap();
        for p in [0.0, 0.1, 0.5, 0.99, 1.0] {
            assert_eq!(c.threshold_at(p), 0.85);
            assert_eq!(c.weight_at(p), 0.25);
        }
        let d = ProgressiveConfig::default();
        assert!((d.weight_at(0.05) - 0.25 * 0.95f64.powi(2) * 0.5).abs() < 1e-12);
        assert!((d.threshold_at(0.5) - 0.425).abs() < 1e-12);
    }

    #[test]
    fn regularizer_adds_gradient_and_reports_metrics() {
        let mut rng = Rng::new(3);
        let c = codes(&mut rng, 32, 17, 5);
        let mut reg = ProgressiveOrtho::new(ProgressiveConfig::static_control(), 17).unwrap();
        let x = vec![0f32; 32 * 4];
        let w_dec = vec![0f32; 17 * 4];
        let ctx = StepContext {
            step: 3,
            total_steps: 10,
            d_in: 4,
            d_sae: 17,
            x: &x,
            x_hat: &x,
            w_dec: &w_dec,
            pre_active: None,
        };
        let mut g = vec![1f32; c.nnz()];
        let out = reg
            .penalty(&ctx, &c, &mut g, &mut DecoderGradBuf::default().view())
            .unwrap();
        let (raw, gd) = dense_reference(&c.to_dense(), 32, 17, 0.85, 0.25, false, None);
        assert!((out.loss - 0.25 * raw).abs() < 1e-5 * (1.0 + raw));
        // Gradient was added to the existing 1.0, not overwritten.
        for p in c.offsets[0]..c.offsets[1] {
            let want = 1.0 + gd[c.idx[p] as usize];
            assert!((g[p] as f64 - want).abs() < 1e-5);
        }
        assert!(out
            .metrics
            .iter()
            .any(|(n, v)| n == "ortho_threshold" && *v == 0.85));
        // Round trip of the (EMA) state through save/load.
        let mut with_ema = ProgressiveOrtho::new(ProgressiveConfig::default(), 17).unwrap();
        let mut g2 = vec![0f32; c.nnz()];
        with_ema
            .penalty(&ctx, &c, &mut g2, &mut DecoderGradBuf::default().view())
            .unwrap();
        let bytes = with_ema.save_state().unwrap();
        assert!(!bytes.is_empty());
        let mut restored = ProgressiveOrtho::new(ProgressiveConfig::default(), 17).unwrap();
        restored.load_state(&bytes).unwrap();
        assert_eq!(
            restored.ema.as_ref().unwrap().lists,
            with_ema.ema.as_ref().unwrap().lists
        );
        assert!(reg.load_state(&bytes).is_err()); // static control has no EMA
        let mut bad = vec![0f32; 3];
        assert!(reg
            .penalty(&ctx, &c, &mut bad, &mut DecoderGradBuf::default().view())
            .is_err());
    }
}
