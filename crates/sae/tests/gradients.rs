//! The trainer's sparse analytic gradients against central finite differences of a dense
//! f64 reference loss, for every architecture (including AuxK with dead latents, rows
//! with fewer than k positive pre-activations, Matryoshka prefixes, decoder-norm
//! penalties, the Gated frozen-decoder term), and the JumpReLU threshold STE against its
//! formula.
#![allow(clippy::needless_range_loop)]

use saelab_core::rng::Rng;
use saelab_sae::config::{Architecture, L0Penalty, TrainConfig};
use saelab_sae::trainer::{
    TrainHooks, TrainSae, B_DEC, B_ENC, B_MAG, R_MAG, THRESHOLD, W_DEC, W_ENC,
};

struct Ref<'a> {
    cfg: &'a TrainConfig,
    d: usize,
    f: usize,
    rows: usize,
    x: &'a [f32],
    dead: &'a [bool],
}

fn top_desc(mut v: Vec<(f64, usize)>, k: usize) -> Vec<(f64, usize)> {
    v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    v.truncate(k);
    v
}

impl Ref<'_> {
    /// Dense f64 loss; `fz` holds the parameters used where the trainer detaches
    /// (AuxK residual target, Gated auxiliary decoder).
    fn loss(&self, p: &[Vec<f64>], fz: &[Vec<f64>]) -> f64 {
        let (d, f, rows, cfg) = (self.d, self.f, self.rows, self.cfg);
        let arch = cfg.architecture;
        let apply = cfg.apply_b_dec_to_input.unwrap();
        let enc = |p: &[Vec<f64>]| -> (Vec<f64>, Vec<f64>) {
            let mut xc = vec![0f64; rows * d];
            for r in 0..rows {
                for j in 0..d {
                    xc[r * d + j] =
                        self.x[r * d + j] as f64 - if apply { p[B_DEC][j] } else { 0.0 };
                }
            }
            let mut pre = vec![0f64; rows * f];
            for r in 0..rows {
                for l in 0..f {
                    let mut s = p[B_ENC][l];
                    for j in 0..d {
                        s += xc[r * d + j] * p[W_ENC][l * d + j];
                    }
                    pre[r * f + l] = s;
                }
            }
            (xc, pre)
        };
        let codes = |p: &[Vec<f64>], pre: &[f64]| -> Vec<f64> {
            let mut c = vec![0f64; rows * f];
            match arch {
                Architecture::Topk => {
                    for r in 0..rows {
                        let v: Vec<(f64, usize)> = (0..f)
                            .map(|l| (pre[r * f + l], l))
                            .filter(|e| e.0 > 0.0)
                            .collect();
                        for (val, l) in top_desc(v, cfg.k) {
                            c[r * f + l] = val;
                        }
                    }
                }
                Architecture::Batchtopk | Architecture::MatryoshkaBatchtopk => {
                    let v: Vec<(f64, usize)> = (0..rows * f)
                        .map(|i| (pre[i], i))
                        .filter(|e| e.0 > 0.0)
                        .collect();
                    for (val, i) in top_desc(v, cfg.k * rows) {
                        c[i] = val;
                    }
                }
                Architecture::Standard | Architecture::StandardApril => {
                    for i in 0..rows * f {
                        c[i] = pre[i].max(0.0);
                    }
                }
                Architecture::Jumprelu => {
                    for r in 0..rows {
                        for l in 0..f {
                            let v = pre[r * f + l];
                            c[r * f + l] = if v > p[THRESHOLD][l] { v } else { 0.0 };
                        }
                    }
                }
                Architecture::Gated => {
                    for r in 0..rows {
                        for l in 0..f {
                            let g = pre[r * f + l];
                            let xw = g - p[B_ENC][l];
                            let m = xw * p[R_MAG][l].exp() + p[B_MAG][l];
                            c[r * f + l] = if g > 0.0 { m.max(0.0) } else { 0.0 };
                        }
                    }
                }
            }
            c
        };
        let decode = |p: &[Vec<f64>], c: &[f64], upto: usize, bias: bool| -> Vec<f64> {
            let mut out = vec![0f64; rows * d];
            for r in 0..rows {
                for j in 0..d {
                    let mut s = if bias { p[B_DEC][j] } else { 0.0 };
                    for l in 0..upto {
                        s += c[r * f + l] * p[W_DEC][l * d + j];
                    }
                    out[r * d + j] = s;
                }
            }
            out
        };
        let mse = |a: &[f64]| -> f64 {
            a.iter()
                .zip(self.x)
                .map(|(a, &b)| (a - b as f64).powi(2))
                .sum::<f64>()
                / rows as f64
        };
        let (_, pre) = enc(p);
        let c = codes(p, &pre);
        let mut loss = 0.0;
        if arch == Architecture::MatryoshkaBatchtopk {
            let pr = &cfg.matryoshka_prefixes;
            for &m in pr {
                loss += mse(&decode(p, &c, m, true)) / pr.len() as f64;
            }
        } else {
            loss += mse(&decode(p, &c, f, true));
        }
        let norms: Vec<f64> = (0..f)
            .map(|l| {
                (0..d)
                    .map(|j| p[W_DEC][l * d + j].powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        match arch {
            Architecture::Standard => {
                loss += cfg.l1_coeff.unwrap() * c.iter().sum::<f64>() / rows as f64;
            }
            Architecture::StandardApril => {
                let s: f64 = (0..rows * f).map(|i| c[i] * norms[i % f]).sum();
                loss += cfg.l1_coeff.unwrap() * s / rows as f64;
            }
            Architecture::Jumprelu if cfg.l0_penalty == L0Penalty::Tanh => {
                let s: f64 = (0..rows * f)
                    .map(|i| (cfg.tanh_scale * c[i] * norms[i % f]).tanh())
                    .sum();
                loss += cfg.l0_coeff * s / rows as f64;
            }
            Architecture::Jumprelu => {
                // Piecewise constant in the weights: adds to the loss, not to their gradient.
                let l0 = c.iter().filter(|&&v| v != 0.0).count() as f64 / rows as f64;
                loss += cfg.l0_coeff * (l0 / cfg.target_l0 - 1.0).powi(2);
            }
            Architecture::Gated => {
                let lam = cfg.l1_coeff.unwrap();
                let relu_gate: Vec<f64> = pre.iter().map(|v| v.max(0.0)).collect();
                loss += lam * relu_gate.iter().sum::<f64>() / rows as f64;
                // Frozen decoder (weights and bias) for the auxiliary reconstruction.
                loss += mse(&decode(fz, &relu_gate, f, true));
            }
            _ => {}
        }
        let n_dead = self.dead.iter().filter(|&&b| b).count();
        if arch.is_topk_family() && n_dead > 0 {
            let kcfg = cfg.auxk_k.unwrap();
            let k_aux = kcfg.min(n_dead);
            let mut ca = vec![0f64; rows * f];
            for r in 0..rows {
                let v: Vec<(f64, usize)> = (0..f)
                    .filter(|&l| self.dead[l])
                    .map(|l| (pre[r * f + l], l))
                    .collect();
                for (val, l) in top_desc(v, k_aux) {
                    ca[r * f + l] = val;
                }
            }
            let e_hat = decode(p, &ca, f, false);
            // Detached residual target.
            let (_, pre_z) = enc(fz);
            let cz = codes(fz, &pre_z);
            // The residual target is that of the full dictionary (Matryoshka: the last prefix).
            let xh = decode(fz, &cz, f, true);
            let resid: Vec<f64> = self.x.iter().zip(&xh).map(|(&a, b)| a as f64 - b).collect();
            let mut mean = vec![0f64; d];
            for r in 0..rows {
                for j in 0..d {
                    mean[j] += resid[r * d + j] / rows as f64;
                }
            }
            let var: f64 = (0..rows * d)
                .map(|i| (resid[i] - mean[i % d]).powi(2))
                .sum::<f64>()
                / rows as f64;
            let num: f64 = (0..rows * d)
                .map(|i| (resid[i] - e_hat[i]).powi(2))
                .sum::<f64>()
                / rows as f64;
            let scale = (n_dead as f64 / kcfg as f64).min(1.0);
            loss += cfg.auxk_coef.unwrap() * scale * num / var;
        }
        loss
    }
}

fn setup(arch: Architecture, tanh: bool) -> (TrainSae, Vec<f32>, Vec<bool>) {
    let (d, f, rows) = (6, 16, 10);
    let cfg = TrainConfig {
        architecture: arch,
        d_sae: f,
        k: 3,
        batch_size: rows,
        total_tokens: 1000,
        l1_coeff: Some(0.3),
        l1_warmup_steps: 1,
        dead_tokens: 100,
        auxk_coef: Some(0.5),
        l0_penalty: if tanh {
            L0Penalty::Tanh
        } else {
            L0Penalty::TargetL0
        },
        l0_coeff: 0.2,
        jumprelu_threshold_init: 0.05,
        jumprelu_bandwidth: 0.2,
        ..Default::default()
    };
    let mut sae = TrainSae::new(&cfg, d, 100).unwrap();
    let mut rng = Rng::new(arch as u64 + 10 * tanh as u64);
    for t in sae.tensors.iter_mut() {
        let n = t.p.len();
        let mut v = vec![0f32; n];
        rng.fill_normal(&mut v, 0.5);
        t.p = v;
    }
    // Negative encoder biases: several rows have fewer than k positive pre-activations.
    for b in sae.tensors[B_ENC].p.iter_mut() {
        *b = *b * 0.5 - 0.6;
    }
    if arch == Architecture::Jumprelu {
        for t in sae.tensors[THRESHOLD].p.iter_mut() {
            *t = t.abs() * 0.3 + 0.05;
        }
    }
    sae.initialized = true;
    sae.step = 50;
    let mut dead = vec![false; f];
    for l in [1usize, 4, 7, 8, 13] {
        dead[l] = true;
        sae.since_fired[l] = 1000;
    }
    let mut x = vec![0f32; rows * d];
    rng.fill_normal(&mut x, 1.0);
    (sae, x, dead)
}

fn check(arch: Architecture, tanh: bool) {
    let (mut sae, x, dead) = setup(arch, tanh);
    let (d, f, rows) = (sae.d_in, sae.d_sae, x.len() / sae.d_in);
    sae.zero_grads();
    let loss = sae.gradients(&x, &mut TrainHooks::default()).unwrap();
    let p: Vec<Vec<f64>> = sae
        .tensors
        .iter()
        .map(|t| t.p.iter().map(|&v| v as f64).collect())
        .collect();
    let r = Ref {
        cfg: &sae.cfg,
        d,
        f,
        rows,
        x: &x,
        dead: &dead,
    };
    let l0 = r.loss(&p, &p);
    assert!(
        (loss - l0).abs() < 1e-4 * (1.0 + l0.abs()),
        "{arch:?}: loss {loss} vs reference {l0}"
    );
    let h = 1e-5;
    let (mut checked, mut nonzero) = (0, 0);
    for (ti, t) in sae.tensors.iter().enumerate() {
        if arch == Architecture::Jumprelu && ti == THRESHOLD {
            continue; // STE, not a derivative: see jumprelu_threshold_ste_matches_formula
        }
        for i in 0..t.p.len() {
            let mut pp = p.clone();
            pp[ti][i] += h;
            let lp = r.loss(&pp, &p);
            pp[ti][i] -= 2.0 * h;
            let lm = r.loss(&pp, &p);
            let fd = (lp - lm) / (2.0 * h);
            let g = t.g[i] as f64;
            assert!(
                (g - fd).abs() <= 2e-3 + 2e-3 * fd.abs(),
                "{arch:?} tanh={tanh}: d loss / d {}[{i}] analytic {g} vs finite difference {fd}",
                t.name
            );
            checked += 1;
            nonzero += (fd.abs() > 1e-3) as usize;
        }
    }
    assert!(checked > 200);
    assert!(
        nonzero > checked / 5,
        "{arch:?}: only {nonzero} of {checked} gradients are non-zero"
    );
}

#[test]
fn sparse_gradients_match_finite_differences() {
    for arch in [
        Architecture::Topk,
        Architecture::Batchtopk,
        Architecture::MatryoshkaBatchtopk,
        Architecture::Standard,
        Architecture::StandardApril,
        Architecture::Gated,
        Architecture::Jumprelu,
    ] {
        check(arch, false);
    }
    check(Architecture::Jumprelu, true);
}

/// The JumpReLU threshold gradient is the straight-through estimator of the JumpReLU
/// paper: d f / d theta = -(theta/eps) K((pre - theta)/eps) times the code gradient, and
/// d step / d theta = -(1/eps) K(...) for the L0 term, with K the rectangle on |u| < 1/2.
#[test]
fn jumprelu_threshold_ste_matches_formula() {
    let (mut sae, x, _) = setup(Architecture::Jumprelu, false);
    let (d, f, rows) = (sae.d_in, sae.d_sae, x.len() / sae.d_in);
    sae.zero_grads();
    sae.gradients(&x, &mut TrainHooks::default()).unwrap();
    let p = |i: usize| -> Vec<f64> { sae.tensors[i].p.iter().map(|&v| v as f64).collect() };
    let (w, b, wd, bd, th) = (p(W_ENC), p(B_ENC), p(W_DEC), p(B_DEC), p(THRESHOLD));
    let eps = sae.cfg.jumprelu_bandwidth;
    let pre: Vec<f64> = (0..rows * f)
        .map(|i| {
            let (r, l) = (i / f, i % f);
            b[l] + (0..d)
                .map(|j| x[r * d + j] as f64 * w[l * d + j])
                .sum::<f64>()
        })
        .collect();
    let c: Vec<f64> = (0..rows * f)
        .map(|i| if pre[i] > th[i % f] { pre[i] } else { 0.0 })
        .collect();
    let l0 = c.iter().filter(|&&v| v != 0.0).count() as f64 / rows as f64;
    let (tgt, coef) = (sae.cfg.target_l0, sae.cfg.l0_coeff);
    let dl0 = coef * 2.0 * (l0 / tgt - 1.0) / tgt;
    let mut want = vec![0f64; f];
    let mut in_window = 0;
    for r in 0..rows {
        let dy: Vec<f64> = (0..d)
            .map(|j| {
                let xh = bd[j] + (0..f).map(|l| c[r * f + l] * wd[l * d + j]).sum::<f64>();
                2.0 * (xh - x[r * d + j] as f64) / rows as f64
            })
            .collect();
        for l in 0..f {
            let u = (pre[r * f + l] - th[l]) / eps;
            if u.abs() < 0.5 {
                in_window += 1;
                let up: f64 = (0..d).map(|j| dy[j] * wd[l * d + j]).sum();
                want[l] += -(th[l] / eps) * up + dl0 / rows as f64 * (-1.0 / eps);
            }
        }
    }
    assert!(in_window > 3, "test needs entries inside the STE window");
    for l in 0..f {
        let g = sae.tensors[THRESHOLD].g[l] as f64;
        assert!(
            (g - want[l]).abs() < 1e-4 * (1.0 + want[l].abs()),
            "theta[{l}]: {g} vs {}",
            want[l]
        );
    }
}
