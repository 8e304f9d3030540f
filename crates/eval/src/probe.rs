//! Linear probes shared by every evaluation.
//!
//! - [`fit_logreg_l2`]: binary logistic regression with an L2 penalty in scikit-learn's
//!   form (`0.5 ||w||^2 + C * sum_i s_i * logloss_i`, intercept not penalised, optional
//!   "balanced" sample weights `n / (2 n_class)`), solved to convergence by L-BFGS in
//!   f64. SAEBench fits this on the top-k selected dimensions (sparse probing, absorption).
//! - [`train_adam_probe`]: a multi-output logistic probe trained by mini-batch Adam with
//!   optional per-output `pos_weight`, L1 on the weights (`l1 * mean_out sum |w|`),
//!   coupled or decoupled weight decay, exponential learning-rate decay and early
//!   stopping on a validation set. It covers absorption's ground-truth and k-sparse
//!   probes, sparse probing's full-width probe, and the SCR/TPP probes.
//! - [`top_k_by_mean_diff`], [`accuracy`], [`f1_score`].
//!
//! Inputs are a [`Design`]: a dense row-major matrix (LM activations) or sparse codes
//! (SAE latents, where a dense `[n, d_sae]` copy would be wasteful).

use anyhow::{bail, Result};
use rayon::prelude::*;
use saelab_core::gemm::{gemm, MatMut, MatRef};
use saelab_core::rng::Rng;
use saelab_sae::codes::SparseCodes;

/// A probe's input matrix: `n` rows of width `d`.
#[derive(Clone, Copy, Debug)]
pub enum Design<'a> {
    Dense { x: &'a [f32], n: usize, d: usize },
    Sparse(&'a SparseCodes),
}

impl<'a> Design<'a> {
    pub fn dense(x: &'a [f32], n: usize, d: usize) -> Self {
        assert_eq!(x.len(), n * d, "Design::dense: buffer is not [n, d]");
        Design::Dense { x, n, d }
    }

    pub fn n(&self) -> usize {
        match self {
            Design::Dense { n, .. } => *n,
            Design::Sparse(c) => c.rows,
        }
    }

    pub fn d(&self) -> usize {
        match self {
            Design::Dense { d, .. } => *d,
            Design::Sparse(c) => c.d_sae,
        }
    }

    /// Visit the non-zero entries (dense: all entries) of row `i`.
    fn for_row(&self, i: usize, mut f: impl FnMut(usize, f32)) {
        match self {
            Design::Dense { x, d, .. } => {
                for (j, &v) in x[i * d..(i + 1) * d].iter().enumerate() {
                    f(j, v);
                }
            }
            Design::Sparse(c) => {
                let (idx, val) = c.row(i);
                for (&j, &v) in idx.iter().zip(val) {
                    f(j as usize, v);
                }
            }
        }
    }

    /// Column `j` of every row, as f64 (for the small dense L-BFGS problems).
    fn columns(&self, cols: &[usize]) -> Vec<f64> {
        let n = self.n();
        let k = cols.len();
        let mut out = vec![0f64; n * k];
        match self {
            Design::Dense { x, d, .. } => {
                for i in 0..n {
                    for (c, &j) in cols.iter().enumerate() {
                        out[i * k + c] = x[i * d + j] as f64;
                    }
                }
            }
            Design::Sparse(codes) => {
                // Output column of each latent (NONE: not selected). A dense table, not a
                // hash map: a ReLU SAE's rows hold thousands of entries, each looked up.
                const NONE: u32 = u32::MAX;
                let mut pos = vec![NONE; codes.d_sae];
                for (c, &j) in cols.iter().enumerate() {
                    pos[j] = c as u32;
                }
                for i in 0..n {
                    let (idx, val) = codes.row(i);
                    let o = &mut out[i * k..(i + 1) * k];
                    for (&j, &v) in idx.iter().zip(val) {
                        let c = pos[j as usize];
                        if c != NONE {
                            o[c as usize] = v as f64;
                        }
                    }
                }
            }
        }
        out
    }

    /// Per-column mean over the rows where `sel[i]` (f64 accumulation).
    pub fn column_means(&self, sel: &[bool]) -> Vec<f64> {
        let d = self.d();
        let mut s = vec![0f64; d];
        let mut cnt = 0usize;
        for (i, &on) in sel.iter().enumerate() {
            if on {
                cnt += 1;
                self.for_row(i, |j, v| s[j] += v as f64);
            }
        }
        if cnt > 0 {
            for v in &mut s {
                *v /= cnt as f64;
            }
        }
        s
    }
}

/// A binary linear classifier `z = x . w + b`.
#[derive(Clone, Debug, PartialEq)]
pub struct BinaryModel {
    /// Input columns the weights apply to (a top-k selection), or all columns if `None`.
    pub cols: Option<Vec<usize>>,
    pub w: Vec<f64>,
    pub b: f64,
}

impl BinaryModel {
    /// Decision values (logits) for every row.
    pub fn decision(&self, x: &Design) -> Vec<f64> {
        let n = x.n();
        match &self.cols {
            Some(cols) => {
                let m = x.columns(cols);
                let k = cols.len();
                (0..n)
                    .map(|i| self.b + dot64(&m[i * k..(i + 1) * k], &self.w))
                    .collect()
            }
            None => (0..n)
                .map(|i| {
                    let mut z = self.b;
                    x.for_row(i, |j, v| z += v as f64 * self.w[j]);
                    z
                })
                .collect(),
        }
    }

    /// Predictions at logit > 0.
    pub fn predict(&self, x: &Design) -> Vec<bool> {
        self.decision(x).into_iter().map(|z| z > 0.0).collect()
    }
}

/// Options of the L2 logistic regression (scikit-learn defaults used by SAEBench).
#[derive(Clone, Debug)]
pub struct LogRegConfig {
    /// Inverse regularisation strength.
    pub c: f64,
    /// Weight samples by `n / (2 n_class)` (scikit-learn `class_weight="balanced"`).
    pub balanced: bool,
    pub max_iter: usize,
    /// Stop when the max-abs gradient entry falls below this.
    pub tol: f64,
}

impl Default for LogRegConfig {
    fn default() -> Self {
        LogRegConfig {
            c: 1.0,
            balanced: true,
            max_iter: 1000,
            tol: 1e-6,
        }
    }
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Stable `log(1 + exp(z))`.
#[inline]
fn softplus(z: f64) -> f64 {
    if z > 0.0 {
        z + (-z).exp().ln_1p()
    } else {
        z.exp().ln_1p()
    }
}

#[inline]
fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// The scikit-learn L2 logistic objective and its gradient over `theta = [w; b]`, on a
/// dense f64 matrix `m` [n, k] with labels `y` and sample weights `s`.
#[allow(clippy::too_many_arguments)] // a flat signature keeps the solver closure cheap
pub fn logreg_objective(
    m: &[f64],
    n: usize,
    k: usize,
    y: &[bool],
    s: &[f64],
    c: f64,
    theta: &[f64],
    grad: &mut [f64],
) -> f64 {
    let (w, b) = (&theta[..k], theta[k]);
    let mut loss = 0.5 * dot64(w, w);
    grad[..k].copy_from_slice(w);
    grad[k] = 0.0;
    for i in 0..n {
        let row = &m[i * k..(i + 1) * k];
        let z = b + dot64(row, w);
        // log loss of label t in {0,1}: softplus(z) - t z; derivative sigmoid(z) - t.
        let t = if y[i] { 1.0 } else { 0.0 };
        loss += c * s[i] * (softplus(z) - t * z);
        let g = c * s[i] * (sigmoid(z) - t);
        for (gj, xj) in grad[..k].iter_mut().zip(row) {
            *gj += g * xj;
        }
        grad[k] += g;
    }
    loss
}

/// Minimise a smooth convex function by L-BFGS (memory 10) with Armijo backtracking.
/// Returns the number of iterations used.
pub fn lbfgs(
    theta: &mut [f64],
    max_iter: usize,
    tol: f64,
    mut f: impl FnMut(&[f64], &mut [f64]) -> f64,
) -> usize {
    let p = theta.len();
    let mem = 10;
    let mut g = vec![0f64; p];
    let mut fx = f(theta, &mut g);
    let mut s_hist: Vec<Vec<f64>> = Vec::new();
    let mut y_hist: Vec<Vec<f64>> = Vec::new();
    let mut g_new = vec![0f64; p];
    let mut x_new = vec![0f64; p];
    for it in 0..max_iter {
        let gmax = g.iter().fold(0f64, |a, v| a.max(v.abs()));
        if gmax < tol {
            return it;
        }
        // Two-loop recursion for the direction -H g.
        let mut q = g.clone();
        let mut alphas = vec![0f64; s_hist.len()];
        for i in (0..s_hist.len()).rev() {
            let rho = 1.0 / dot64(&y_hist[i], &s_hist[i]);
            alphas[i] = rho * dot64(&s_hist[i], &q);
            for (qj, yj) in q.iter_mut().zip(&y_hist[i]) {
                *qj -= alphas[i] * yj;
            }
        }
        if let (Some(s), Some(y)) = (s_hist.last(), y_hist.last()) {
            let gamma = dot64(s, y) / dot64(y, y);
            for v in &mut q {
                *v *= gamma;
            }
        } else {
            // First step: scale so the step has unit length at most.
            let gn = dot64(&g, &g).sqrt();
            for v in &mut q {
                *v /= gn.max(1.0);
            }
        }
        for i in 0..s_hist.len() {
            let rho = 1.0 / dot64(&y_hist[i], &s_hist[i]);
            let beta = rho * dot64(&y_hist[i], &q);
            for (qj, sj) in q.iter_mut().zip(&s_hist[i]) {
                *qj += (alphas[i] - beta) * sj;
            }
        }
        let mut dir: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot64(&g, &dir);
        if slope >= 0.0 {
            // Not a descent direction (numerical trouble): restart from steepest descent.
            s_hist.clear();
            y_hist.clear();
            dir = g.iter().map(|v| -v).collect();
            slope = dot64(&g, &dir);
        }
        let mut step = 1.0;
        let mut accepted = false;
        for _ in 0..60 {
            for j in 0..p {
                x_new[j] = theta[j] + step * dir[j];
            }
            let f_new = f(&x_new, &mut g_new);
            if f_new.is_finite() && f_new <= fx + 1e-4 * step * slope {
                let s: Vec<f64> = (0..p).map(|j| x_new[j] - theta[j]).collect();
                let y: Vec<f64> = (0..p).map(|j| g_new[j] - g[j]).collect();
                if dot64(&s, &y) > 1e-12 {
                    if s_hist.len() == mem {
                        s_hist.remove(0);
                        y_hist.remove(0);
                    }
                    s_hist.push(s);
                    y_hist.push(y);
                }
                theta.copy_from_slice(&x_new);
                g.copy_from_slice(&g_new);
                let rel = (fx - f_new).abs() / fx.abs().max(f_new.abs()).max(1.0);
                fx = f_new;
                accepted = true;
                if rel < 1e-15 {
                    return it + 1;
                }
                break;
            }
            step *= 0.5;
        }
        if !accepted {
            return it;
        }
    }
    max_iter
}

fn class_counts(y: &[bool]) -> (usize, usize) {
    let pos = y.iter().filter(|v| **v).count();
    (pos, y.len() - pos)
}

/// Fit the L2 logistic regression on the columns `cols` of `x` (all columns if `None`).
/// Errors when only one class is present or the inputs are not finite.
pub fn fit_logreg_l2(
    x: &Design,
    y: &[bool],
    cols: Option<&[usize]>,
    cfg: &LogRegConfig,
) -> Result<BinaryModel> {
    let n = x.n();
    if y.len() != n {
        bail!("logistic regression: {} labels for {} rows", y.len(), n);
    }
    let (pos, neg) = class_counts(y);
    if pos == 0 || neg == 0 {
        bail!("logistic regression: only one class present ({pos} positive, {neg} negative rows)");
    }
    let all: Vec<usize>;
    let cols = match cols {
        Some(c) => c,
        None => {
            all = (0..x.d()).collect();
            &all
        }
    };
    let k = cols.len();
    let m = x.columns(cols);
    if m.iter().any(|v| !v.is_finite()) {
        bail!("logistic regression: non-finite input values");
    }
    let s: Vec<f64> = if cfg.balanced {
        let (wp, wn) = (n as f64 / (2.0 * pos as f64), n as f64 / (2.0 * neg as f64));
        y.iter().map(|&t| if t { wp } else { wn }).collect()
    } else {
        vec![1.0; n]
    };
    let mut theta = vec![0f64; k + 1];
    lbfgs(&mut theta, cfg.max_iter, cfg.tol, |th, g| {
        logreg_objective(&m, n, k, y, &s, cfg.c, th, g)
    });
    if theta.iter().any(|v| !v.is_finite()) {
        bail!("logistic regression: the solver diverged (non-finite weights)");
    }
    let b = theta[k];
    theta.truncate(k);
    Ok(BinaryModel {
        cols: Some(cols.to_vec()),
        w: theta,
        b,
    })
}

/// Indices of the `k` columns with the largest `|mean(pos) - mean(neg)|`, ties by index.
pub fn top_k_by_mean_diff(x: &Design, y: &[bool], k: usize) -> Vec<usize> {
    let neg: Vec<bool> = y.iter().map(|v| !v).collect();
    let mp = x.column_means(y);
    let mn = x.column_means(&neg);
    let diff: Vec<f64> = mp.iter().zip(&mn).map(|(a, b)| (a - b).abs()).collect();
    top_k_indices(&diff, k)
}

/// Indices of the `k` largest values (descending, ties by lower index; NaN last).
pub fn top_k_indices(v: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let key = |i: usize| {
        if v[i].is_nan() {
            f64::NEG_INFINITY
        } else {
            v[i]
        }
    };
    idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    idx.truncate(k.min(v.len()));
    idx
}

pub fn accuracy(pred: &[bool], y: &[bool]) -> f64 {
    if y.is_empty() {
        return f64::NAN;
    }
    pred.iter().zip(y).filter(|(a, b)| a == b).count() as f64 / y.len() as f64
}

/// Binary F1 of the positive class (0 when there are no true positives).
pub fn f1_score(pred: &[bool], y: &[bool]) -> f64 {
    let tp = pred.iter().zip(y).filter(|(p, t)| **p && **t).count() as f64;
    let fp = pred.iter().zip(y).filter(|(p, t)| **p && !**t).count() as f64;
    let fneg = pred.iter().zip(y).filter(|(p, t)| !**p && **t).count() as f64;
    if tp == 0.0 {
        return 0.0;
    }
    2.0 * tp / (2.0 * tp + fp + fneg)
}

/// Options of the Adam-trained multi-output logistic probe.
#[derive(Clone, Debug)]
pub struct AdamProbeConfig {
    pub lr: f32,
    /// Final learning rate of an exponential decay over all steps (`None`: constant).
    pub lr_end: Option<f32>,
    pub epochs: usize,
    pub batch: usize,
    pub weight_decay: f32,
    /// AdamW (decoupled) weight decay instead of Adam's L2-in-gradient.
    pub decoupled: bool,
    /// `l1 * mean_over_outputs(sum_j |w_oj|)` added to the loss.
    pub l1: f32,
    /// BCE positive weight per output = n_neg / n_pos of the training labels.
    pub pos_weight: bool,
    /// With a validation set: stop after this many epochs without improvement of the
    /// validation loss and keep the best epoch's weights.
    pub patience: Option<usize>,
    /// Train on inputs divided by their per-column RMS over the training rows, then
    /// map the weights back to raw inputs. Same function class, but Adam's step size
    /// no longer depends on the activation scale (residual norms reach the hundreds).
    pub scale_inputs: bool,
    pub seed: u64,
}

impl Default for AdamProbeConfig {
    fn default() -> Self {
        AdamProbeConfig {
            lr: 1e-2,
            lr_end: None,
            epochs: 50,
            batch: 64,
            weight_decay: 0.0,
            decoupled: false,
            l1: 0.0,
            pos_weight: false,
            patience: None,
            scale_inputs: false,
            seed: 0,
        }
    }
}

/// A multi-output linear probe: `z_o = x . w[o] + b[o]`, weights stored `[outputs, d]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearProbe {
    pub d: usize,
    pub outputs: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

impl LinearProbe {
    pub fn zeros(d: usize, outputs: usize) -> Self {
        LinearProbe {
            d,
            outputs,
            w: vec![0.0; d * outputs],
            b: vec![0.0; outputs],
        }
    }

    pub fn row(&self, o: usize) -> &[f32] {
        &self.w[o * self.d..(o + 1) * self.d]
    }

    /// Logits `[rows.len(), outputs]` of the selected rows (all rows if `rows` is None).
    pub fn logits(&self, x: &Design, rows: Option<&[usize]>) -> Vec<f32> {
        let all: Vec<usize>;
        let rows = match rows {
            Some(r) => r,
            None => {
                all = (0..x.n()).collect();
                &all
            }
        };
        let (k, d) = (self.outputs, self.d);
        let m = rows.len();
        let mut z = vec![0f32; m * k];
        for r in z.chunks_exact_mut(k) {
            r.copy_from_slice(&self.b);
        }
        match x {
            Design::Dense { x, .. } => {
                let mut buf = vec![0f32; m * d];
                for (r, &i) in rows.iter().enumerate() {
                    buf[r * d..(r + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
                }
                gemm(
                    1.0,
                    MatRef::row_major(&buf, m, d),
                    MatRef::row_major(&self.w, k, d).t(),
                    1.0,
                    MatMut::row_major(&mut z, m, k),
                );
            }
            Design::Sparse(_) if k == 0 => {}
            Design::Sparse(c) => {
                // The weights transposed once ([d, k]: a latent's outputs contiguous), so
                // one pass over a row's entries serves every output. Each output's sum
                // is still formed from 0 in entry order, then added to the bias: the
                // logits are the ones a per-output dot product gives. Rows in parallel.
                let wt = transpose(&self.w, k, d);
                z.par_chunks_mut(k).zip(rows.par_iter()).for_each_init(
                    || vec![0f32; k],
                    |s, (zr, &i)| {
                        s.fill(0.0);
                        let (idx, val) = c.row(i);
                        for (&j, &v) in idx.iter().zip(val) {
                            let wj = &wt[j as usize * k..(j as usize + 1) * k];
                            for (a, &w) in s.iter_mut().zip(wj) {
                                *a += v * w;
                            }
                        }
                        for (a, &b) in zr.iter_mut().zip(s.iter()) {
                            *a += b;
                        }
                    },
                );
            }
        }
        z
    }
}

/// `[cols, rows]` copy of a row-major `[rows, cols]` matrix.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for (r, row) in m.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

/// Mean BCE-with-logits (with per-output positive weights) over `z` and `y` [m, k], and
/// its gradient wrt `z` written to `g`.
fn bce_grad(z: &[f32], y: &[f32], pw: &[f32], k: usize, g: &mut [f32]) -> f64 {
    let denom = z.len() as f64;
    let mut loss = 0f64;
    for (idx, ((&zi, &yi), gi)) in z.iter().zip(y).zip(g.iter_mut()).enumerate() {
        let p = pw[idx % k] as f64;
        let (z64, y64) = (zi as f64, yi as f64);
        // -[p y log s(z) + (1-y) log(1 - s(z))] = p y softplus(-z) + (1-y) softplus(z)
        loss += p * y64 * softplus(-z64) + (1.0 - y64) * softplus(z64);
        *gi = ((sigmoid(z64) * (p * y64 + 1.0 - y64) - p * y64) / denom) as f32;
    }
    loss / denom
}

/// Full objective (BCE + L1, without weight decay) of `probe` on rows `rows`, and the
/// gradient wrt weights and biases. Exposed for the finite-difference tests.
#[allow(clippy::too_many_arguments)] // outputs are caller-owned buffers reused across steps
pub fn probe_loss_grad(
    probe: &LinearProbe,
    x: &Design,
    y: &[f32],
    rows: &[usize],
    pw: &[f32],
    l1: f32,
    gw: &mut [f32],
    gb: &mut [f32],
) -> f64 {
    let (k, d) = (probe.outputs, probe.d);
    let z = probe.logits(x, Some(rows));
    let mut yb = vec![0f32; rows.len() * k];
    for (r, &i) in rows.iter().enumerate() {
        yb[r * k..(r + 1) * k].copy_from_slice(&y[i * k..(i + 1) * k]);
    }
    let mut g = vec![0f32; z.len()];
    let mut loss = bce_grad(&z, &yb, pw, k, &mut g);
    gw.iter_mut().for_each(|v| *v = 0.0);
    gb.iter_mut().for_each(|v| *v = 0.0);
    for r in 0..rows.len() {
        for o in 0..k {
            gb[o] += g[r * k + o];
        }
    }
    match x {
        Design::Dense { x, .. } => {
            let m = rows.len();
            let mut buf = vec![0f32; m * d];
            for (r, &i) in rows.iter().enumerate() {
                buf[r * d..(r + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
            }
            // gw [k, d] = g^T [k, m] * buf [m, d]
            gemm(
                1.0,
                MatRef::row_major(&g, m, k).t(),
                MatRef::row_major(&buf, m, d),
                0.0,
                MatMut::row_major(gw, k, d),
            );
        }
        Design::Sparse(_) if k == 0 => {}
        Design::Sparse(c) => {
            // Accumulated latent-major (gwt [d, k]: one pass over a row's entries for
            // every output), in spans of latents in parallel; each element still adds
            // its rows' terms in row order, so the sums are the ones an output-major
            // loop gives. Row indices are ascending.
            const SPAN: usize = 512;
            let mut gwt = vec![0f32; d * k];
            gwt.par_chunks_mut(SPAN * k)
                .enumerate()
                .for_each(|(t, out)| {
                    let (j0, j1) = (t * SPAN, t * SPAN + out.len() / k);
                    for (r, &i) in rows.iter().enumerate() {
                        let (idx, val) = c.row(i);
                        let lo = idx.partition_point(|&j| (j as usize) < j0);
                        let hi = lo + idx[lo..].partition_point(|&j| (j as usize) < j1);
                        let gr = &g[r * k..(r + 1) * k];
                        for (&j, &v) in idx[lo..hi].iter().zip(&val[lo..hi]) {
                            let jl = j as usize - j0;
                            // No skip of zero upstream gradients (the output-major
                            // loop had one): a sum that starts at +0 is never -0, so
                            // adding a zero term leaves it unchanged, and the loop
                            // vectorises.
                            for (a, &go) in out[jl * k..(jl + 1) * k].iter_mut().zip(gr) {
                                *a += go * v;
                            }
                        }
                    }
                });
            gw.copy_from_slice(&transpose(&gwt, d, k));
        }
    }
    if l1 > 0.0 {
        let scale = l1 / k as f32;
        loss += scale as f64 * probe.w.iter().map(|v| v.abs() as f64).sum::<f64>();
        for (gj, wj) in gw.iter_mut().zip(&probe.w) {
            // Subgradient 0 at exactly 0, as torch's sign().
            *gj += scale
                * if *wj > 0.0 {
                    1.0
                } else if *wj < 0.0 {
                    -1.0
                } else {
                    0.0
                };
        }
    }
    loss
}

/// Train a multi-output logistic probe. `y` is `[n, outputs]` with entries in {0, 1}.
/// With `val = Some((x_val, y_val))` and `cfg.patience`, the epoch with the lowest
/// validation loss is kept (model selection never touches a test set).
pub fn train_adam_probe(
    x: &Design,
    y: &[f32],
    outputs: usize,
    cfg: &AdamProbeConfig,
    val: Option<(&Design, &[f32])>,
) -> Result<LinearProbe> {
    if cfg.scale_inputs {
        return train_scaled(x, y, outputs, cfg, val);
    }
    let (n, d, k) = (x.n(), x.d(), outputs);
    if y.len() != n * k {
        bail!("probe: labels are not [{n}, {k}] ({} values)", y.len());
    }
    if n == 0 || d == 0 {
        bail!("probe: empty training set ({n} rows of width {d})");
    }
    if cfg.batch == 0 || cfg.epochs == 0 {
        bail!("probe: batch size and epochs must be positive");
    }
    let mut pw = vec![1f32; k];
    for o in 0..k {
        let pos = (0..n).filter(|&i| y[i * k + o] > 0.5).count();
        if pos == 0 || pos == n {
            bail!(
                "probe: output {o} has only one class in the training set ({pos} of {n} positive)"
            );
        }
        if cfg.pos_weight {
            pw[o] = (n - pos) as f32 / pos as f32;
        }
    }
    let mut probe = LinearProbe::zeros(d, k);
    // Small random init (torch's nn.Linear default scale), seeded.
    let mut rng = Rng::new(cfg.seed);
    let bound = 1.0 / (d as f32).sqrt();
    for w in &mut probe.w {
        *w = rng.uniform(-bound, bound);
    }
    let (mut mw, mut vw) = (vec![0f32; d * k], vec![0f32; d * k]);
    let (mut mb, mut vb) = (vec![0f32; k], vec![0f32; k]);
    let (mut gw, mut gb) = (vec![0f32; d * k], vec![0f32; k]);
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let steps_per_epoch = n.div_ceil(cfg.batch);
    let total = (steps_per_epoch * cfg.epochs) as f64;
    let gamma = match cfg.lr_end {
        Some(end) if end > 0.0 && total > 1.0 => ((end / cfg.lr) as f64).powf(1.0 / (total - 1.0)),
        _ => 1.0,
    };
    let mut t = 0usize;
    let mut best: Option<(f64, LinearProbe)> = None;
    let mut since_best = 0usize;
    let val_rows: Vec<usize> = val.map(|(xv, _)| (0..xv.n()).collect()).unwrap_or_default();
    for _epoch in 0..cfg.epochs {
        let order = rng.permutation(n);
        for rows in order.chunks(cfg.batch) {
            let lr = (cfg.lr as f64 * gamma.powi(t as i32)) as f32;
            t += 1;
            probe_loss_grad(&probe, x, y, rows, &pw, cfg.l1, &mut gw, &mut gb);
            if cfg.weight_decay > 0.0 && !cfg.decoupled {
                for (g, w) in gw.iter_mut().zip(&probe.w) {
                    *g += cfg.weight_decay * w;
                }
            }
            let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
            for j in 0..d * k {
                mw[j] = b1 * mw[j] + (1.0 - b1) * gw[j];
                vw[j] = b2 * vw[j] + (1.0 - b2) * gw[j] * gw[j];
                if cfg.decoupled && cfg.weight_decay > 0.0 {
                    probe.w[j] -= lr * cfg.weight_decay * probe.w[j];
                }
                probe.w[j] -= lr * (mw[j] / c1) / ((vw[j] / c2).sqrt() + eps);
            }
            for o in 0..k {
                mb[o] = b1 * mb[o] + (1.0 - b1) * gb[o];
                vb[o] = b2 * vb[o] + (1.0 - b2) * gb[o] * gb[o];
                probe.b[o] -= lr * (mb[o] / c1) / ((vb[o] / c2).sqrt() + eps);
            }
        }
        if probe.w.iter().any(|v| !v.is_finite()) {
            bail!("probe: training diverged (non-finite weights)");
        }
        if let (Some((xv, yv)), Some(patience)) = (val, cfg.patience) {
            let (mut gw2, mut gb2) = (vec![0f32; d * k], vec![0f32; k]);
            let vl = probe_loss_grad(&probe, xv, yv, &val_rows, &pw, 0.0, &mut gw2, &mut gb2);
            if best.as_ref().is_none_or(|(b, _)| vl < *b) {
                best = Some((vl, probe.clone()));
                since_best = 0;
            } else {
                since_best += 1;
                if since_best >= patience {
                    break;
                }
            }
        }
    }
    Ok(match best {
        Some((_, p)) => p,
        None => probe,
    })
}

/// Per-column RMS over all rows (1 for all-zero columns).
pub fn column_rms(x: &Design) -> Vec<f32> {
    let mut s = vec![0f64; x.d()];
    for i in 0..x.n() {
        x.for_row(i, |j, v| s[j] += (v as f64) * (v as f64));
    }
    s.iter()
        .map(|&v| {
            let r = (v / x.n().max(1) as f64).sqrt();
            if r > 0.0 && r.is_finite() {
                r as f32
            } else {
                1.0
            }
        })
        .collect()
}

/// A copy of `x` with column `j` divided by `s[j]`: dense data or sparse codes.
fn scaled_copy(x: &Design, s: &[f32]) -> (Vec<f32>, Option<SparseCodes>) {
    match x {
        Design::Dense { x, d, .. } => {
            let mut v = x.to_vec();
            for row in v.chunks_exact_mut(*d) {
                for (a, sj) in row.iter_mut().zip(s) {
                    *a /= sj;
                }
            }
            (v, None)
        }
        Design::Sparse(c) => {
            let mut c2 = (*c).clone();
            for (j, v) in c2.idx.iter().zip(c2.val.iter_mut()) {
                *v /= s[*j as usize];
            }
            (Vec::new(), Some(c2))
        }
    }
}

fn train_scaled(
    x: &Design,
    y: &[f32],
    outputs: usize,
    cfg: &AdamProbeConfig,
    val: Option<(&Design, &[f32])>,
) -> Result<LinearProbe> {
    let s = column_rms(x);
    let (xd, xc) = scaled_copy(x, &s);
    let xs = match &xc {
        Some(c) => Design::Sparse(c),
        None => Design::dense(&xd, x.n(), x.d()),
    };
    let vs = val.map(|(v, yv)| (scaled_copy(v, &s), v.n(), v.d(), yv));
    let vdes = vs.as_ref().map(|((vd, vc), n, d, yv)| {
        let des = match vc {
            Some(c) => Design::Sparse(c),
            None => Design::dense(vd, *n, *d),
        };
        (des, *yv)
    });
    let inner = AdamProbeConfig {
        scale_inputs: false,
        ..cfg.clone()
    };
    let mut p = train_adam_probe(
        &xs,
        y,
        outputs,
        &inner,
        vdes.as_ref().map(|(d, yv)| (d, *yv)),
    )?;
    // z = sum_j w_j (x_j / s_j) + b: raw-input weights are w_j / s_j.
    for row in p.w.chunks_exact_mut(p.d) {
        for (w, sj) in row.iter_mut().zip(&s) {
            *w /= sj;
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two Gaussian blobs in `d` dims separated along a random direction.
    fn blobs(n: usize, d: usize, sep: f32, seed: u64) -> (Vec<f32>, Vec<bool>) {
        // The direction depends on `d` only, so train and test sets share it.
        let mut dir = vec![0f32; d];
        Rng::new(1000 + d as u64).fill_normal(&mut dir, 1.0);
        let mut r = Rng::new(seed);
        let nrm = dir.iter().map(|v| v * v).sum::<f32>().sqrt();
        let mut x = vec![0f32; n * d];
        let mut y = vec![false; n];
        for i in 0..n {
            y[i] = i % 2 == 0;
            let s = if y[i] { sep / 2.0 } else { -sep / 2.0 };
            for j in 0..d {
                x[i * d + j] = r.normal() + s * dir[j] / nrm;
            }
        }
        (x, y)
    }

    #[test]
    fn logreg_objective_gradient_matches_finite_differences() {
        let (n, k) = (30, 4);
        let mut r = Rng::new(5);
        let m: Vec<f64> = (0..n * k).map(|_| r.normal() as f64).collect();
        let y: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
        let s: Vec<f64> = (0..n).map(|_| 0.5 + r.f64()).collect();
        let theta: Vec<f64> = (0..=k).map(|_| r.normal() as f64).collect();
        let mut g = vec![0f64; k + 1];
        logreg_objective(&m, n, k, &y, &s, 0.7, &theta, &mut g);
        let mut scratch = vec![0f64; k + 1];
        for j in 0..=k {
            let h = 1e-6;
            let mut tp = theta.clone();
            tp[j] += h;
            let fp = logreg_objective(&m, n, k, &y, &s, 0.7, &tp, &mut scratch);
            tp[j] -= 2.0 * h;
            let fm = logreg_objective(&m, n, k, &y, &s, 0.7, &tp, &mut scratch);
            let fd = (fp - fm) / (2.0 * h);
            assert!(
                (fd - g[j]).abs() < 1e-6 * (1.0 + fd.abs()),
                "coord {j}: fd {fd} vs {}",
                g[j]
            );
        }
    }

    #[test]
    fn sparse_columns_match_the_dense_design() {
        // Random sparse codes (about a third of the entries non-zero, random values).
        let (n, f) = (50, 40);
        let mut r = Rng::new(17);
        let mut dense = vec![0f32; n * f];
        r.fill_normal(&mut dense, 1.0);
        for v in dense.iter_mut() {
            if *v < 0.4 {
                *v = 0.0;
            }
        }
        let codes = SparseCodes::from_dense(&dense, n, f);
        for cols in [vec![3usize, 0, 39, 17], (0..f).rev().collect(), vec![5]] {
            let want = Design::dense(&dense, n, f).columns(&cols);
            assert_eq!(Design::Sparse(&codes).columns(&cols), want, "cols {cols:?}");
        }
    }

    #[test]
    fn logreg_converges_to_stationary_point_and_separates() {
        let (n, d) = (400, 10);
        let (x, y) = blobs(n, d, 4.0, 11);
        let des = Design::dense(&x, n, d);
        let cfg = LogRegConfig::default();
        let model = fit_logreg_l2(&des, &y, None, &cfg).unwrap();
        // At the optimum the gradient vanishes.
        let m = des.columns(&(0..d).collect::<Vec<_>>());
        let s = vec![1.0; n]; // balanced weights are 1 for a 50/50 split
        let mut theta = model.w.clone();
        theta.push(model.b);
        let mut g = vec![0f64; d + 1];
        logreg_objective(&m, n, d, &y, &s, 1.0, &theta, &mut g);
        let gmax = g.iter().fold(0f64, |a, v| a.max(v.abs()));
        assert!(gmax < 1e-5, "gradient at solution {gmax}");
        // Separation 4 sigma: Bayes accuracy = Phi(2) = 0.977.
        let (xt, yt) = blobs(2000, d, 4.0, 12);
        let acc = accuracy(&model.predict(&Design::dense(&xt, 2000, d)), &yt);
        assert!(acc > 0.95 && acc < 0.995, "test accuracy {acc}");
    }

    #[test]
    fn logreg_rejects_one_class() {
        let x = vec![1f32, 2.0, 3.0];
        let err = fit_logreg_l2(
            &Design::dense(&x, 3, 1),
            &[true, true, true],
            None,
            &LogRegConfig::default(),
        );
        assert!(err.unwrap_err().to_string().contains("one class"));
    }

    #[test]
    fn balanced_weights_shift_the_threshold() {
        // 1-D data, 90% negatives: the balanced fit puts the boundary nearer the middle.
        let mut r = Rng::new(2);
        let n = 1000;
        let mut x = vec![0f32; n];
        let mut y = vec![false; n];
        for i in 0..n {
            y[i] = i % 10 == 0;
            x[i] = r.normal() + if y[i] { 1.0 } else { -1.0 };
        }
        let des = Design::dense(&x, n, 1);
        let bal = fit_logreg_l2(&des, &y, None, &LogRegConfig::default()).unwrap();
        let unb = fit_logreg_l2(
            &des,
            &y,
            None,
            &LogRegConfig {
                balanced: false,
                ..Default::default()
            },
        )
        .unwrap();
        let t_bal = -bal.b / bal.w[0];
        let t_unb = -unb.b / unb.w[0];
        assert!(t_bal.abs() < 0.3, "balanced threshold {t_bal}");
        assert!(t_unb > 0.8, "unbalanced threshold {t_unb}");
    }

    /// The sparse logits and weight gradient are the sums an output-major loop forms
    /// (bit for bit), over several latent spans, on a row subset in shuffled order.
    #[test]
    fn sparse_logits_and_gradient_equal_output_major_sums() {
        let (n, d, k) = (40, 1300, 5);
        let mut r = Rng::new(23);
        let mut x = vec![0f32; n * d];
        for v in &mut x {
            *v = if r.f32() < 0.6 { 0.0 } else { r.f32() * 3.0 };
        }
        let codes = SparseCodes::from_dense(&x, n, d);
        let mut probe = LinearProbe::zeros(d, k);
        r.fill_normal(&mut probe.w, 0.5);
        r.fill_normal(&mut probe.b, 0.5);
        let y: Vec<f32> = (0..n * k)
            .map(|_| if r.f32() < 0.4 { 1.0 } else { 0.0 })
            .collect();
        let rows: Vec<usize> = (0..n).map(|i| (i * 7 + 3) % n).take(31).collect();
        let z = probe.logits(&Design::Sparse(&codes), Some(&rows));
        let mut g = vec![0f32; rows.len() * k];
        let mut yb = Vec::new();
        for (ri, &i) in rows.iter().enumerate() {
            let (idx, val) = codes.row(i);
            for o in 0..k {
                let w = probe.row(o);
                let mut s = 0f32;
                for (&j, &v) in idx.iter().zip(val) {
                    s += v * w[j as usize];
                }
                assert_eq!(z[ri * k + o].to_bits(), (probe.b[o] + s).to_bits());
            }
            yb.extend_from_slice(&y[i * k..(i + 1) * k]);
        }
        let pw = vec![1.0f32; k];
        bce_grad(&z, &yb, &pw, k, &mut g);
        let (mut gw, mut gb) = (vec![0f32; d * k], vec![0f32; k]);
        probe_loss_grad(
            &probe,
            &Design::Sparse(&codes),
            &y,
            &rows,
            &pw,
            0.0,
            &mut gw,
            &mut gb,
        );
        let mut want = vec![0f32; d * k];
        for (ri, &i) in rows.iter().enumerate() {
            let (idx, val) = codes.row(i);
            for o in 0..k {
                let go = g[ri * k + o];
                if go != 0.0 {
                    for (&j, &v) in idx.iter().zip(val) {
                        want[o * d + j as usize] += go * v;
                    }
                }
            }
        }
        assert!(want.iter().filter(|v| **v != 0.0).count() > d);
        for (a, b) in gw.iter().zip(&want) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }

    #[test]
    #[allow(clippy::needless_range_loop)] // coordinate-wise finite differences
    fn probe_gradient_matches_finite_differences_dense_and_sparse() {
        let (n, d, k) = (12, 7, 3);
        let mut r = Rng::new(9);
        let mut x = vec![0f32; n * d];
        for v in &mut x {
            *v = if r.f32() < 0.5 { 0.0 } else { r.normal() };
        }
        let y: Vec<f32> = (0..n * k)
            .map(|_| if r.f32() < 0.4 { 1.0 } else { 0.0 })
            .collect();
        let codes = SparseCodes::from_dense(&x, n, d);
        let mut probe = LinearProbe::zeros(d, k);
        r.fill_normal(&mut probe.w, 0.5);
        r.fill_normal(&mut probe.b, 0.5);
        let rows: Vec<usize> = (0..n).collect();
        let pw = vec![1.5f32, 1.0, 0.5];
        for des in [Design::dense(&x, n, d), Design::Sparse(&codes)] {
            let (mut gw, mut gb) = (vec![0f32; d * k], vec![0f32; k]);
            probe_loss_grad(&probe, &des, &y, &rows, &pw, 0.01, &mut gw, &mut gb);
            let (mut sw, mut sb) = (vec![0f32; d * k], vec![0f32; k]);
            let h = 1e-3f32;
            for j in 0..d * k {
                let mut p = probe.clone();
                p.w[j] += h;
                let fp = probe_loss_grad(&p, &des, &y, &rows, &pw, 0.01, &mut sw, &mut sb);
                p.w[j] -= 2.0 * h;
                let fm = probe_loss_grad(&p, &des, &y, &rows, &pw, 0.01, &mut sw, &mut sb);
                let fd = ((fp - fm) / (2.0 * h as f64)) as f32;
                assert!((fd - gw[j]).abs() < 2e-3, "w[{j}]: fd {fd} vs {}", gw[j]);
            }
            for o in 0..k {
                let mut p = probe.clone();
                p.b[o] += h;
                let fp = probe_loss_grad(&p, &des, &y, &rows, &pw, 0.01, &mut sw, &mut sb);
                p.b[o] -= 2.0 * h;
                let fm = probe_loss_grad(&p, &des, &y, &rows, &pw, 0.01, &mut sw, &mut sb);
                let fd = ((fp - fm) / (2.0 * h as f64)) as f32;
                assert!((fd - gb[o]).abs() < 2e-3, "b[{o}]: fd {fd} vs {}", gb[o]);
            }
        }
    }

    #[test]
    fn adam_probe_learns_and_is_deterministic() {
        let (n, d) = (600, 16);
        let (x, yb) = blobs(n, d, 4.0, 21);
        let y: Vec<f32> = yb.iter().map(|&v| if v { 1.0 } else { 0.0 }).collect();
        let des = Design::dense(&x, n, d);
        let cfg = AdamProbeConfig {
            epochs: 20,
            batch: 32,
            lr: 1e-2,
            lr_end: Some(1e-4),
            seed: 3,
            ..Default::default()
        };
        let p1 = train_adam_probe(&des, &y, 1, &cfg, None).unwrap();
        let p2 = train_adam_probe(&des, &y, 1, &cfg, None).unwrap();
        assert_eq!(p1, p2, "same seed must give the same probe");
        let p3 = train_adam_probe(
            &des,
            &y,
            1,
            &AdamProbeConfig {
                seed: 4,
                ..cfg.clone()
            },
            None,
        )
        .unwrap();
        assert_ne!(p1, p3);
        let (xt, yt) = blobs(2000, d, 4.0, 22);
        let z = p1.logits(&Design::dense(&xt, 2000, d), None);
        let pred: Vec<bool> = z.iter().map(|v| *v > 0.0).collect();
        let acc = accuracy(&pred, &yt);
        assert!(acc > 0.95, "accuracy {acc}");
    }

    #[test]
    fn scaled_training_handles_huge_inputs_and_maps_weights_back() {
        // One informative column scaled by 1e3 next to a huge uninformative one.
        let (n, d) = (600, 8);
        let (mut x, yb) = blobs(n, d, 4.0, 51);
        for i in 0..n {
            x[i * d] *= 1e3;
            x[i * d + 1] += 500.0;
        }
        let y: Vec<f32> = yb.iter().map(|&v| v as u8 as f32).collect();
        let codes = SparseCodes::from_dense(&x, n, d);
        let cfg = AdamProbeConfig {
            epochs: 30,
            batch: 32,
            scale_inputs: true,
            seed: 5,
            ..Default::default()
        };
        for des in [Design::dense(&x, n, d), Design::Sparse(&codes)] {
            let p = train_adam_probe(&des, &y, 1, &cfg, None).unwrap();
            let z = p.logits(&des, None);
            let acc = accuracy(&z.iter().map(|v| *v > 0.0).collect::<Vec<_>>(), &yb);
            assert!(acc > 0.95, "scaled accuracy {acc}");
        }
    }

    #[test]
    fn l1_probe_on_sparse_codes_picks_the_informative_latent() {
        // 3 outputs; output o is "latent 5*o fires"; 40 latents, sparse rows.
        let (n, d, k) = (900, 40, 3);
        let mut r = Rng::new(31);
        let mut dense = vec![0f32; n * d];
        let mut y = vec![0f32; n * k];
        for i in 0..n {
            let o = i % k;
            y[i * k + o] = 1.0;
            dense[i * d + 5 * o] = 1.0 + r.f32();
            for _ in 0..3 {
                let j = r.below(d);
                dense[i * d + j] += r.f32();
            }
        }
        let codes = SparseCodes::from_dense(&dense, n, d);
        let cfg = AdamProbeConfig {
            epochs: 30,
            batch: 128,
            l1: 0.01,
            pos_weight: true,
            seed: 1,
            ..Default::default()
        };
        let p = train_adam_probe(&Design::Sparse(&codes), &y, k, &cfg, None).unwrap();
        for o in 0..k {
            let row: Vec<f64> = p.row(o).iter().map(|v| *v as f64).collect();
            assert_eq!(top_k_indices(&row, 1), vec![5 * o], "output {o}: {row:?}");
        }
    }

    #[test]
    fn early_stopping_keeps_best_validation_epoch() {
        // Few noisy training rows in many dims: training loss keeps falling while the
        // validation loss turns up; the returned probe has the best validation loss.
        let (n, d) = (40, 60);
        let (x, yb) = blobs(n, d, 1.0, 41);
        let (xv, yvb) = blobs(400, d, 1.0, 42);
        let y: Vec<f32> = yb.iter().map(|&v| v as u8 as f32).collect();
        let yv: Vec<f32> = yvb.iter().map(|&v| v as u8 as f32).collect();
        let (dx, dv) = (Design::dense(&x, n, d), Design::dense(&xv, 400, d));
        let cfg = AdamProbeConfig {
            epochs: 200,
            batch: 8,
            lr: 1e-2,
            patience: Some(5),
            seed: 2,
            ..Default::default()
        };
        let p = train_adam_probe(&dx, &y, 1, &cfg, Some((&dv, &yv))).unwrap();
        let full = train_adam_probe(
            &dx,
            &y,
            1,
            &AdamProbeConfig {
                patience: None,
                ..cfg
            },
            None,
        )
        .unwrap();
        let rows: Vec<usize> = (0..400).collect();
        let (mut a, mut b) = (vec![0f32; d], vec![0f32; 1]);
        let l_es = probe_loss_grad(&p, &dv, &yv, &rows, &[1.0], 0.0, &mut a, &mut b);
        let l_full = probe_loss_grad(&full, &dv, &yv, &rows, &[1.0], 0.0, &mut a, &mut b);
        assert!(
            l_es < l_full,
            "early-stopped val loss {l_es} vs full {l_full}"
        );
    }

    #[test]
    fn top_k_and_scores() {
        let x = vec![0f32, 5.0, 1.0, 1.0, 4.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let des = Design::dense(&x, 4, 3);
        let y = [true, true, false, false];
        assert_eq!(top_k_by_mean_diff(&des, &y, 2), vec![1, 2]);
        let codes = SparseCodes::from_dense(&x, 4, 3);
        assert_eq!(
            top_k_by_mean_diff(&Design::Sparse(&codes), &y, 2),
            vec![1, 2]
        );
        assert_eq!(top_k_indices(&[1.0, f64::NAN, 3.0, 3.0], 3), vec![2, 3, 0]);
        let pred = [true, false, true, false];
        let truth = [true, true, false, false];
        assert_eq!(accuracy(&pred, &truth), 0.5);
        assert!((f1_score(&pred, &truth) - 0.5).abs() < 1e-12);
        assert_eq!(f1_score(&[false; 4], &truth), 0.0);
    }
}
