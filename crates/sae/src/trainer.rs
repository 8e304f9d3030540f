//! One SAE under training: parameters in the training layout (encoder latent-major
//! `[F, d_in]`), Adam moments, counters, and the step of every architecture:
//! encode (blocked GEMM + selection) -> sparse decode -> losses -> sparse backward ->
//! decoder-parallel removal -> clip -> Adam -> renormalise -> statistics.
//!
//! Everything here works in the normalised space (`x * scale`); [`TrainSae::to_inference`]
//! folds the scale (and, for the April variant, the decoder norms) into the weights.

use crate::codes::SparseCodes;
use crate::config::{Architecture, BDecInit, L0Penalty, TrainConfig};
use crate::kernels::{self, AdamHyper, Csc};
use crate::methods::BuiltMethod;
use crate::model::{InferenceArch, Sae};
use crate::regularizer::{DecoderGrad, Gate, Regularizer, StepContext};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use saelab_core::gemm::MatRef;
use saelab_core::rng::Rng;
use serde::Serialize;

/// One trainable tensor with its gradient and Adam moments (all flat, same length).
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: &'static str,
    /// Rows: `d_sae` for per-latent tensors (matrices and vectors), 1 for `b_dec`.
    pub rows: usize,
    pub cols: usize,
    pub p: Vec<f32>,
    pub g: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Tensor {
    fn new(name: &'static str, rows: usize, cols: usize, p: Vec<f32>) -> Self {
        let n = rows * cols;
        assert_eq!(p.len(), n);
        Tensor {
            name,
            rows,
            cols,
            p,
            g: vec![0.0; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
}

/// Index of the tensors in [`TrainSae::tensors`].
pub const W_ENC: usize = 0;
pub const B_ENC: usize = 1;
pub const W_DEC: usize = 2;
pub const B_DEC: usize = 3;
/// JumpReLU threshold (raw, not log).
pub const THRESHOLD: usize = 4;
/// Gated: magnitude log-scale and bias (`b_enc` is the gate bias).
pub const R_MAG: usize = 4;
pub const B_MAG: usize = 5;

/// Research-method hooks attached to one SAE (see [`crate::regularizer`]).
#[derive(Default)]
pub struct TrainHooks {
    pub regularizers: Vec<Box<dyn Regularizer>>,
    pub gate: Option<Box<dyn Gate>>,
}

impl TrainHooks {
    /// The hooks of `cfg`'s research method (none for a plain SAE) on inputs of width
    /// `d_in`: what `train` attaches, and what a checkpoint's hook state restores into.
    pub fn for_config(cfg: &TrainConfig, d_in: usize) -> Result<TrainHooks> {
        let built = cfg
            .method
            .build(d_in, cfg.d_sae, cfg.seed)
            .context("building the research method")?;
        Ok(built.into())
    }
}

impl From<BuiltMethod> for TrainHooks {
    fn from(b: BuiltMethod) -> Self {
        TrainHooks {
            regularizers: b.regularizers,
            gate: b.gate,
        }
    }
}

/// What one step measured (one line of `metrics.jsonl`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub tokens: u64,
    pub loss: f64,
    pub mse: f64,
    pub auxk: f64,
    pub sparsity_loss: f64,
    pub regularizer_loss: f64,
    pub fvu: f64,
    pub l0: f64,
    pub dead_fraction: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub threshold: Option<f64>,
    pub reinitialised: usize,
    /// Training progress `step / total_steps`.
    pub p: f64,
    /// Regularizer metrics (flat names as the regularizer gives them, prefixed with the
    /// regularizer's name only on a clash) and the `sep_*` separation scalars.
    pub extra: Vec<(String, f64)>,
    /// Array-valued metrics (the `sep_cos_hist` histogram) on separation steps.
    pub arrays: Vec<(String, Vec<f64>)>,
}

/// Keys of [`StepMetrics`] that regularizer metrics must not shadow.
const CORE_KEYS: &[&str] = &[
    "step",
    "tokens",
    "loss",
    "mse",
    "auxk",
    "sparsity_loss",
    "regularizer_loss",
    "fvu",
    "l0",
    "dead_fraction",
    "lr",
    "grad_norm",
    "threshold",
    "reinitialised",
    "p",
];

/// An SAE in training.
pub struct TrainSae {
    /// The resolved configuration.
    pub cfg: TrainConfig,
    pub d_in: usize,
    pub d_sae: usize,
    pub tensors: Vec<Tensor>,
    /// Optimizer steps done.
    pub step: usize,
    /// Tokens trained on.
    pub tokens: u64,
    /// Planned steps (LR schedule, progress of the research methods).
    pub total_steps: usize,
    pub rng: Rng,
    /// Tokens since each latent last fired (dead = >= `cfg.dead_tokens`).
    pub since_fired: Vec<u64>,
    /// Firing counts since the last density histogram (or the start).
    pub window_fires: Vec<u64>,
    pub window_tokens: u64,
    /// Inference threshold EMA (TopK / BatchTopK); negative = not started.
    pub threshold_ema: f32,
    /// The latest batch's smallest kept activation (fallback threshold).
    pub last_min_act: f32,
    /// Activation normalisation scale (x is multiplied by it before the SAE sees it).
    pub scale: f32,
    /// False until b_dec was initialised from the first batch.
    pub initialized: bool,
    /// When `Some`, seconds spent per step phase are accumulated here (benchmarks).
    pub profile: Option<Vec<(&'static str, f64)>>,
    pre_buf: Vec<f32>,
    /// The latents whose decoder-gradient rows the regularizers changed this step (kept
    /// across steps to reuse its allocation).
    reg_touched: Vec<u32>,
}

/// Per-row selection result of the encoder pass.
#[derive(Default)]
struct RowSel {
    /// Main active entries: latent, value, pre-activation.
    main: Vec<(u32, f32, f32)>,
    /// AuxK entries (dead latents' top pre-activations): latent, pre.
    aux: Vec<(u32, f32)>,
    /// JumpReLU inactive entries inside the STE window: latent, pre.
    near: Vec<(u32, f32)>,
    /// Gated: latent, gate pre-activation, x_c . W_enc[l].
    gate: Vec<(u32, f32, f32)>,
}

/// A CSR list of extra entries (latent, value) per row.
#[derive(Default)]
struct Entries {
    off: Vec<usize>,
    idx: Vec<u32>,
    val: Vec<f32>,
}

impl Entries {
    fn push_row(&mut self, it: impl IntoIterator<Item = (u32, f32)>) {
        if self.off.is_empty() {
            self.off.push(0);
        }
        for (i, v) in it {
            self.idx.push(i);
            self.val.push(v);
        }
        self.off.push(self.idx.len());
    }
}

/// Wall time per phase of the step, accumulated when [`TrainSae::profile`] is on.
struct Prof {
    on: bool,
    t: std::time::Instant,
    acc: Vec<(&'static str, f64)>,
}

impl Prof {
    fn new(on: bool) -> Self {
        Prof {
            on,
            t: std::time::Instant::now(),
            acc: Vec::new(),
        }
    }
    fn lap(&mut self, name: &'static str) {
        if self.on {
            let now = std::time::Instant::now();
            self.acc.push((name, (now - self.t).as_secs_f64()));
            self.t = now;
        }
    }
}

/// What the forward/backward pass hands to the optimizer part of the step.
struct Fwd {
    prof: Prof,
    loss: f64,
    mse: f64,
    auxk: f64,
    sparsity_loss: f64,
    reg_loss: f64,
    fvu: f64,
    touched: Vec<bool>,
    enc_touched: Vec<bool>,
    extra: Vec<(String, f64)>,
    x_hat: Vec<f32>,
    enc: Encoded,
}

/// The encoder's output for a batch.
struct Encoded {
    codes: SparseCodes,
    pre: Vec<f32>,
    aux: Entries,
    near: Entries,
    gate: Entries,
    /// Gated: x_c . W_enc[l] for each gate entry.
    gate_xw: Vec<f32>,
    /// Gated: index of each main entry in the gate entries.
    main_to_gate: Vec<u32>,
}

fn sgn_rand_unit_rows(rng: &mut Rng, f: usize, d: usize, uniform: bool, norm: f32) -> Vec<f32> {
    let mut w = vec![0f32; f * d];
    if uniform {
        rng.fill_uniform(&mut w, -1.0, 1.0);
    } else {
        rng.fill_normal(&mut w, 1.0);
    }
    kernels::normalize_rows(&mut w, d);
    if norm != 1.0 {
        kernels::scale_in_place(&mut w, norm);
    }
    w
}

impl TrainSae {
    /// A freshly initialised SAE (b_dec is set from the first batch at the first step).
    pub fn new(cfg: &TrainConfig, d_in: usize, total_steps: usize) -> Result<Self> {
        let cfg = cfg.resolved(d_in)?;
        let (f, d) = (cfg.d_sae, d_in);
        let mut rng = Rng::new(cfg.seed);
        let mut init_rng = rng.fork(1);
        rng = rng.fork(2);
        use Architecture::*;
        // Decoder rows; encoder = decoder transpose (latent-major: the same matrix).
        let w_dec = match cfg.architecture {
            // dictionary_learning StandardTrainer: N(0,1) columns scaled to norm 0.1.
            Standard | StandardApril | Gated => sgn_rand_unit_rows(&mut init_rng, f, d, false, 0.1),
            _ => sgn_rand_unit_rows(&mut init_rng, f, d, true, 1.0),
        };
        let w_enc = w_dec.clone();
        let mut tensors = vec![
            Tensor::new("W_enc", f, d, w_enc),
            Tensor::new("b_enc", f, 1, vec![0.0; f]),
            Tensor::new("W_dec", f, d, w_dec),
            Tensor::new("b_dec", 1, d, vec![0.0; d]),
        ];
        match cfg.architecture {
            Jumprelu => tensors.push(Tensor::new(
                "threshold",
                f,
                1,
                vec![cfg.jumprelu_threshold_init as f32; f],
            )),
            Gated => {
                tensors.push(Tensor::new("r_mag", f, 1, vec![0.0; f]));
                tensors.push(Tensor::new("b_mag", f, 1, vec![0.0; f]));
            }
            _ => {}
        }
        Ok(TrainSae {
            d_in,
            d_sae: f,
            tensors,
            step: 0,
            tokens: 0,
            total_steps,
            rng,
            since_fired: vec![0; f],
            window_fires: vec![0; f],
            window_tokens: 0,
            threshold_ema: -1.0,
            last_min_act: 0.0,
            scale: 1.0,
            initialized: false,
            profile: None,
            pre_buf: Vec::new(),
            reg_touched: Vec::new(),
            cfg,
        })
    }

    pub fn arch(&self) -> Architecture {
        self.cfg.architecture
    }

    fn apply_b_dec(&self) -> bool {
        self.cfg.apply_b_dec_to_input.unwrap_or(true)
    }

    fn unit_norm(&self) -> bool {
        self.cfg.unit_norm_decoder.unwrap_or(true)
    }

    /// LR of step `step` (0-based): linear warm-up, then linear decay to 0 from `decay_start`.
    pub fn lr_at(&self, step: usize) -> f64 {
        let base = self.cfg.lr.unwrap_or(1e-3);
        let w = self.cfg.warmup_steps;
        let first = if self.cfg.warmup_from_zero.unwrap_or(false) {
            0
        } else {
            1
        };
        let warm = if w == 0 {
            1.0
        } else {
            ((step + first) as f64 / w as f64).min(1.0)
        };
        let decay = match self.cfg.decay_start {
            Some(ds) if step >= ds && self.total_steps > ds => {
                ((self.total_steps - step) as f64 / (self.total_steps - ds) as f64).clamp(0.0, 1.0)
            }
            _ => 1.0,
        };
        base * warm * decay
    }

    fn l1_scale(&self) -> f64 {
        let w = self.cfg.l1_warmup_steps;
        if w == 0 {
            1.0
        } else {
            (self.step as f64 / w as f64).min(1.0)
        }
    }

    /// Dead latents (no fire for `dead_tokens` tokens).
    pub fn dead_latents(&self) -> Vec<u32> {
        let t = self.cfg.dead_tokens;
        (0..self.d_sae as u32)
            .filter(|&l| self.since_fired[l as usize] >= t)
            .collect()
    }

    /// Set b_dec from the first batch (normalised), as configured.
    pub fn init_from_batch(&mut self, x: &[f32]) {
        let d = self.d_in;
        let rows = x.len() / d;
        let b = match self.cfg.b_dec_init {
            BDecInit::GeometricMedian => kernels::geometric_median(x, rows, d, 100, 1e-5),
            BDecInit::Mean => kernels::mean_rows(x, rows, d)
                .iter()
                .map(|&v| v as f32)
                .collect(),
            BDecInit::Zeros => vec![0.0; d],
        };
        self.tensors[B_DEC].p.copy_from_slice(&b);
        self.initialized = true;
    }

    /// The encoder pass with the architecture's selection rule.
    fn encode(
        &mut self,
        x_c: &[f32],
        rows: usize,
        gate: Option<&mut Box<dyn Gate>>,
    ) -> Result<Encoded> {
        let (f, d) = (self.d_sae, self.d_in);
        let arch = self.arch();
        let cfg = &self.cfg;
        let use_aux = arch.is_topk_family() && cfg.auxk_coef.unwrap_or(0.0) > 0.0;
        let dead: Vec<u32> = if use_aux {
            self.dead_latents()
        } else {
            Vec::new()
        };
        let k_aux = cfg.auxk_k.unwrap_or(d / 2).min(dead.len());
        let k = cfg.k.min(f);
        let cand = match arch {
            Architecture::Batchtopk | Architecture::MatryoshkaBatchtopk => (4 * k).min(f),
            _ => k,
        };
        let b_enc = &self.tensors[B_ENC].p;
        let theta = if arch == Architecture::Jumprelu {
            Some(&self.tensors[THRESHOLD].p[..])
        } else {
            None
        };
        let (r_mag, b_mag) = if arch == Architecture::Gated {
            (
                Some(&self.tensors[R_MAG].p[..]),
                Some(&self.tensors[B_MAG].p[..]),
            )
        } else {
            (None, None)
        };
        let half_bw = (cfg.jumprelu_bandwidth * 0.5) as f32;
        let block_rows = if gate.is_some() {
            rows
        } else {
            cfg.encoder_block_rows
        };
        if gate.is_some() && !arch.takes_a_gate() {
            bail!("a gate (adaptive thresholds) replaces the ReLU rule: it needs architecture standard or standard_april, not {arch:?}");
        }
        let mut gate = gate;
        let mut sels: Vec<RowSel> = Vec::with_capacity(rows);
        let mut gate_err: Option<anyhow::Error> = None;
        let w_enc = &self.tensors[W_ENC].p;
        if arch.is_topk_family() {
            // Select straight from the GEMM's tiles, adding the bias on the fly: the
            // [rows, F] pre-activation block is never written (a gate needs a ReLU rule).
            sels = kernels::encoder_topk(
                x_c,
                rows,
                MatRef::row_major(w_enc, f, d).t(),
                b_enc,
                cand,
                0.0,
                &dead,
                k_aux,
                cfg.encoder_precision,
            )
            .into_iter()
            .map(|t| RowSel {
                main: t.main.into_iter().map(|(v, l)| (l, v, v)).collect(),
                aux: t.aux.into_iter().map(|(v, l)| (l, v)).collect(),
                ..Default::default()
            })
            .collect();
        } else {
            kernels::encoder_blocks(
                x_c,
                rows,
                d,
                w_enc,
                f,
                block_rows,
                &mut self.pre_buf,
                cfg.dense_precision,
                |_r0, blk| {
                    // The other rules (and a gate's statistics) need the biased block.
                    blk.par_chunks_mut(f).with_min_len(4).for_each(|p| {
                        for (a, b) in p.iter_mut().zip(b_enc.iter()) {
                            *a += b;
                        }
                    });
                    let thr: Option<Vec<f32>> = match gate.as_mut() {
                        Some(g) => {
                            let t = g.thresholds(blk, blk.len() / f, f).to_vec();
                            if t.len() != f {
                                gate_err = Some(anyhow::anyhow!(
                                    "gate '{}' returned {} thresholds for {} latents",
                                    g.name(),
                                    t.len(),
                                    f
                                ));
                            }
                            Some(t)
                        }
                        None => None,
                    };
                    if gate_err.is_some() {
                        return;
                    }
                    let thr = thr.as_deref();
                    let part: Vec<RowSel> = blk
                        .par_chunks(f)
                        .map(|p| {
                            let mut s = RowSel::default();
                            match arch {
                                Architecture::Topk
                                | Architecture::Batchtopk
                                | Architecture::MatryoshkaBatchtopk => {
                                    unreachable!("the TopK family selects from the GEMM tiles")
                                }
                                Architecture::Standard | Architecture::StandardApril => match thr {
                                    Some(t) => s.main.extend(
                                        p.iter()
                                            .zip(t)
                                            .enumerate()
                                            .filter(|(_, (&v, &t))| v > t.max(0.0))
                                            .map(|(l, (&v, _))| (l as u32, v, v)),
                                    ),
                                    None => s.main.extend(
                                        p.iter()
                                            .enumerate()
                                            .filter(|(_, &v)| v > 0.0)
                                            .map(|(l, &v)| (l as u32, v, v)),
                                    ),
                                },
                                Architecture::Jumprelu => {
                                    let th = theta.unwrap();
                                    for (l, (&v, &t)) in p.iter().zip(th).enumerate() {
                                        if v > t {
                                            s.main.push((l as u32, v, v));
                                        } else if v > t - half_bw {
                                            s.near.push((l as u32, v));
                                        }
                                    }
                                }
                                Architecture::Gated => {
                                    let (rm, bm) = (r_mag.unwrap(), b_mag.unwrap());
                                    for (l, &g) in p.iter().enumerate() {
                                        if g > 0.0 {
                                            let xw = g - b_enc[l];
                                            let m = xw * rm[l].exp() + bm[l];
                                            if m > 0.0 {
                                                s.main.push((l as u32, m, m));
                                            }
                                            s.gate.push((l as u32, g, xw));
                                        }
                                    }
                                }
                            }
                            s
                        })
                        .collect();
                    sels.extend(part);
                },
            );
        }
        if let Some(e) = gate_err {
            return Err(e);
        }
        if matches!(
            arch,
            Architecture::Batchtopk | Architecture::MatryoshkaBatchtopk
        ) {
            self.batch_select(&mut sels, x_c, rows, k, cand);
        }
        let mut codes =
            SparseCodes::with_capacity(rows, f, sels.iter().map(|s| s.main.len()).sum());
        let mut pre = Vec::with_capacity(codes.idx.capacity());
        let (mut aux, mut near, mut gate_e) =
            (Entries::default(), Entries::default(), Entries::default());
        let mut gate_xw = Vec::new();
        let mut main_to_gate = Vec::new();
        for s in &sels {
            codes.push_row(s.main.iter().map(|e| (e.0, e.1)));
            pre.extend(s.main.iter().map(|e| e.2));
            aux.push_row(s.aux.iter().copied());
            near.push_row(s.near.iter().copied());
            if arch == Architecture::Gated {
                let base = gate_e.idx.len() as u32;
                let mut j = 0usize;
                for &(l, _, _) in &s.main {
                    while s.gate[j].0 != l {
                        j += 1;
                    }
                    main_to_gate.push(base + j as u32);
                }
                gate_e.push_row(s.gate.iter().map(|e| (e.0, e.1)));
                gate_xw.extend(s.gate.iter().map(|e| e.2));
            } else {
                gate_e.push_row(std::iter::empty());
            }
        }
        Ok(Encoded {
            codes,
            pre,
            aux,
            near,
            gate: gate_e,
            gate_xw,
            main_to_gate,
        })
    }

    /// BatchTopK: keep the k*B largest positive values over the batch. Rows whose
    /// `cand` candidates might not contain all their qualifying values are recomputed in
    /// full (rare: a row would need more than 4k of the batch's top k*B values).
    fn batch_select(&self, sels: &mut [RowSel], x_c: &[f32], rows: usize, k: usize, cand: usize) {
        let (f, d) = (self.d_sae, self.d_in);
        let keep = k * rows;
        let order = |a: &(f32, u32, u32), b: &(f32, u32, u32)| {
            b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
        };
        let collect = |sels: &[RowSel]| -> Vec<(f32, u32, u32)> {
            sels.iter()
                .enumerate()
                .flat_map(|(r, s)| s.main.iter().map(move |e| (e.1, r as u32, e.0)))
                .collect()
        };
        let mut all = collect(sels);
        if all.len() > keep {
            all.select_nth_unstable_by(keep - 1, order);
            let pivot = all[keep - 1];
            let mut redo = false;
            if cand < f {
                for r in 0..rows {
                    let s = &sels[r];
                    if s.main.len() == cand {
                        let smallest = s
                            .main
                            .iter()
                            .map(|e| (e.1, r as u32, e.0))
                            .max_by(order)
                            .unwrap();
                        if order(&smallest, &pivot) != std::cmp::Ordering::Greater {
                            // Saturated row: take all its positive values.
                            let mut p = vec![0f32; f];
                            kernels::pre_row(
                                &x_c[r * d..(r + 1) * d],
                                &self.tensors[W_ENC].p,
                                &self.tensors[B_ENC].p,
                                &mut p,
                            );
                            let aux = std::mem::take(&mut sels[r].aux);
                            sels[r] = RowSel {
                                main: p
                                    .iter()
                                    .enumerate()
                                    .filter(|(_, &v)| v > 0.0)
                                    .map(|(l, &v)| (l as u32, v, v))
                                    .collect(),
                                aux,
                                ..Default::default()
                            };
                            redo = true;
                        }
                    }
                }
            }
            if redo {
                all = collect(sels);
                all.select_nth_unstable_by(keep - 1, order);
            }
            all.truncate(keep);
            all.sort_unstable_by(|a, b| a.1.cmp(&b.1).then(a.2.cmp(&b.2)));
            for s in sels.iter_mut() {
                s.main.clear();
            }
            for (v, r, l) in all {
                sels[r as usize].main.push((l, v, v));
            }
        }
    }

    /// Matryoshka prefix group of a latent (0-based), or 0 for other architectures.
    fn groups(&self) -> Vec<usize> {
        if self.arch() == Architecture::MatryoshkaBatchtopk {
            self.cfg.matryoshka_prefixes.clone()
        } else {
            vec![self.d_sae]
        }
    }

    /// Loss and gradients (accumulated into each tensor's `g`) of a normalised batch,
    /// without touching the parameters: exactly what the step optimises.
    pub fn gradients(&mut self, x: &[f32], hooks: &mut TrainHooks) -> Result<f64> {
        Ok(self.forward_backward(x, hooks)?.loss)
    }

    /// Zero every gradient buffer.
    pub fn zero_grads(&mut self) {
        for t in self.tensors.iter_mut() {
            t.g.iter_mut().for_each(|g| *g = 0.0);
        }
    }

    fn forward_backward(&mut self, x: &[f32], hooks: &mut TrainHooks) -> Result<Fwd> {
        let (f, d) = (self.d_sae, self.d_in);
        let rows = x.len() / d;
        if rows == 0 || rows * d != x.len() {
            bail!(
                "train_step: batch of {} values is not a whole number of rows of {}",
                x.len(),
                d
            );
        }
        if !self.initialized {
            self.init_from_batch(x);
        }
        let arch = self.arch();
        let apply_b_dec = self.apply_b_dec();
        let mut x_c = x.to_vec();
        if apply_b_dec {
            let b = &self.tensors[B_DEC].p;
            x_c.par_chunks_mut(d)
                .for_each(|r| r.iter_mut().zip(b).for_each(|(a, b)| *a -= b));
        }
        let mut prof = Prof::new(self.profile.is_some());
        let enc = self.encode(&x_c, rows, hooks.gate.as_mut())?;
        prof.lap("encode (GEMM + selection)");
        let codes = &enc.codes;
        let inv_b = 1.0 / rows as f32;

        // ---- decoder forward, per Matryoshka prefix ----
        let prefixes = self.groups();
        let ng = prefixes.len();
        let group_of = |l: u32| prefixes.partition_point(|&p| p <= l as usize);
        let w_dec = &self.tensors[W_DEC].p;
        let b_dec = &self.tensors[B_DEC].p;
        let entry_rows = kernels::entry_rows(&codes.offsets);
        // Dense codes (a ReLU SAE early in training fires about half its latents): GEMM
        // kernels instead of per-entry gathers. Not for Matryoshka prefixes.
        let dense_codes = (ng == 1 && kernels::dense_pays(codes.nnz(), rows, f))
            .then(|| kernels::densify(&entry_rows, &codes.idx, &codes.val, rows, f));
        // recon[r, g] = b_dec + sum of the row's entries with latent < prefixes[g].
        let mut recon = vec![0f32; rows * ng * d];
        if let Some(fd) = &dense_codes {
            kernels::decode_dense(
                fd,
                rows,
                f,
                w_dec,
                d,
                b_dec,
                &mut recon,
                self.cfg.dense_precision,
            );
        } else {
            recon
                .par_chunks_mut(ng * d)
                .enumerate()
                .for_each(|(r, out)| {
                    let mut acc = b_dec.clone();
                    let (idx, val) = codes.row(r);
                    let mut p = 0;
                    for g in 0..ng {
                        while p < idx.len() && (idx[p] as usize) < prefixes[g] {
                            let l = idx[p] as usize;
                            kernels::axpy(val[p], &w_dec[l * d..(l + 1) * d], &mut acc);
                            p += 1;
                        }
                        out[g * d..(g + 1) * d].copy_from_slice(&acc);
                    }
                });
        }
        let x_hat: Vec<f32> = if ng == 1 {
            recon.clone()
        } else {
            recon
                .par_chunks(ng * d)
                .flat_map_iter(|c| c[(ng - 1) * d..].iter().copied())
                .collect()
        };

        // ---- reconstruction losses and dy (suffix sums over prefixes) ----
        let gw = 1.0 / ng as f64;
        let mut mse_parts = vec![0f64; ng];
        let mut dy = vec![0f32; rows * ng * d];
        {
            let per_row: Vec<Vec<f64>> = dy
                .par_chunks_mut(ng * d)
                .zip(recon.par_chunks(ng * d))
                .zip(x.par_chunks(d))
                .map(|((dyr, rr), xr)| {
                    let mut sq = vec![0f64; ng];
                    let mut suffix = vec![0f32; d];
                    for g in (0..ng).rev() {
                        let xg = &rr[g * d..(g + 1) * d];
                        let c = (2.0 * gw) as f32 * inv_b;
                        for j in 0..d {
                            let e = xg[j] - xr[j];
                            sq[g] += (e as f64) * (e as f64);
                            suffix[j] += c * e;
                        }
                        dyr[g * d..(g + 1) * d].copy_from_slice(&suffix);
                    }
                    sq
                })
                .collect();
            for sq in per_row {
                for g in 0..ng {
                    mse_parts[g] += sq[g];
                }
            }
        }
        let mse_final = mse_parts[ng - 1] / rows as f64;
        let recon_loss: f64 = mse_parts.iter().map(|s| gw * s / rows as f64).sum();
        let resid: Vec<f32> = x.par_iter().zip(&x_hat).map(|(a, b)| a - b).collect();
        let tv = kernels::total_variance(x, rows, d);
        let fvu = if tv > 0.0 {
            kernels::total_variance(&resid, rows, d) / tv
        } else {
            f64::NAN
        };

        prof.lap("decode + loss");
        // ---- d loss / d code values ----
        let nnz = codes.nnz();
        let mut grad_val = vec![0f32; nnz];
        let dy_off = |l: u32| group_of(l) * d;
        // Reconstruction part of d loss / d codes and of d loss / d W_dec, in one
        // latent-major pass (the gradient buffer is moved out and back: no early return
        // can happen in between).
        let mut g_dec = std::mem::take(&mut self.tensors[W_DEC].g);
        match &dense_codes {
            Some(fd) => kernels::decoder_backward_dense(
                fd,
                rows,
                f,
                &entry_rows,
                &codes.idx,
                &self.tensors[W_DEC].p,
                d,
                &dy,
                &mut g_dec,
                &mut grad_val,
                self.cfg.dense_precision,
            ),
            None => kernels::decoder_backward(
                &Csc::build(f, &entry_rows, &codes.idx),
                &codes.val,
                &self.tensors[W_DEC].p,
                d,
                &dy,
                ng * d,
                &dy_off,
                &mut g_dec,
                &mut grad_val,
            ),
        }
        drop(dense_codes);
        // `g_dec` stays out of the tensor until the regularizers have added their rows
        // (below); nothing in between can return early.
        let w_dec = &self.tensors[W_DEC].p;
        let l1s = self.l1_scale();
        let mut sparsity_loss = 0f64;
        // Extra decoder-row gradients from penalties involving decoder norms.
        let mut dec_norm_grad: Vec<(u32, f32)> = Vec::new();
        let dec_norms = if matches!(arch, Architecture::StandardApril)
            || (arch == Architecture::Jumprelu && self.cfg.l0_penalty == L0Penalty::Tanh)
        {
            kernels::row_norms(w_dec, d)
        } else {
            Vec::new()
        };
        let mut theta_grad = vec![0f32; if arch == Architecture::Jumprelu { f } else { 0 }];
        let mut g_near_kept: Vec<f32> = Vec::new();
        match arch {
            Architecture::Standard => {
                let lam = self.cfg.l1_coeff.unwrap() * l1s;
                sparsity_loss =
                    lam * codes.val.iter().map(|&v| v as f64).sum::<f64>() / rows as f64;
                let gl = (lam as f32) * inv_b;
                grad_val.iter_mut().for_each(|g| *g += gl);
            }
            Architecture::StandardApril => {
                let lam = self.cfg.l1_coeff.unwrap() * l1s;
                let mut per_lat = vec![0f64; f];
                let mut s = 0f64;
                for p in 0..nnz {
                    let l = codes.idx[p] as usize;
                    s += codes.val[p] as f64 * dec_norms[l] as f64;
                    per_lat[l] += codes.val[p] as f64;
                    grad_val[p] += (lam as f32) * inv_b * dec_norms[l];
                }
                sparsity_loss = lam * s / rows as f64;
                for (l, &sv) in per_lat.iter().enumerate() {
                    if sv != 0.0 {
                        dec_norm_grad.push((l as u32, (lam * sv / rows as f64) as f32));
                    }
                }
            }
            Architecture::Jumprelu => {
                let th = &self.tensors[THRESHOLD].p;
                let eps = self.cfg.jumprelu_bandwidth as f32;
                let half = 0.5 * eps;
                let in_win = |v: f32, t: f32| (v - t).abs() < half;
                // Upstream gradient of the near (inactive) entries: <dy, W_dec[l]> (+ tanh term).
                let near = &enc.near;
                let mut g_near = vec![0f32; near.idx.len()];
                kernels::grad_vals(&near.off, &near.idx, w_dec, d, &dy, d, &|_| 0, &mut g_near);
                match self.cfg.l0_penalty {
                    L0Penalty::TargetL0 => {
                        let l0 = nnz as f64 / rows as f64;
                        let tgt = self.cfg.target_l0;
                        let c = self.cfg.l0_coeff;
                        sparsity_loss = c * (l0 / tgt - 1.0).powi(2);
                        let dl0 = (c * 2.0 * (l0 / tgt - 1.0) / tgt) as f32;
                        // d step / d theta = -(1/eps) K; L0 = (1/B) sum steps.
                        let step_g = -dl0 * inv_b / eps;
                        for p in 0..nnz {
                            let l = codes.idx[p] as usize;
                            if in_win(enc.pre[p], th[l]) {
                                theta_grad[l] += step_g;
                            }
                        }
                        for (q, &l) in near.idx.iter().enumerate() {
                            if in_win(near.val[q], th[l as usize]) {
                                theta_grad[l as usize] += step_g;
                            }
                        }
                    }
                    L0Penalty::Tanh => {
                        let c = self.cfg.l0_coeff;
                        let sc = self.cfg.tanh_scale as f32;
                        let mut s = 0f64;
                        let mut per_lat = vec![0f64; f];
                        for p in 0..nnz {
                            let l = codes.idx[p] as usize;
                            let u = sc * codes.val[p] * dec_norms[l];
                            let t = u.tanh();
                            s += t as f64;
                            let dt = (1.0 - t * t) * (c as f32) * inv_b;
                            grad_val[p] += dt * sc * dec_norms[l];
                            per_lat[l] += (dt * sc * codes.val[p]) as f64;
                        }
                        for (q, &l) in near.idx.iter().enumerate() {
                            // f = 0 here: d tanh(c f n) / d f = c n.
                            g_near[q] += (c as f32) * inv_b * sc * dec_norms[l as usize];
                        }
                        sparsity_loss = c * s / rows as f64;
                        for (l, &sv) in per_lat.iter().enumerate() {
                            if sv != 0.0 {
                                dec_norm_grad.push((l as u32, sv as f32));
                            }
                        }
                    }
                }
                g_near_kept = g_near;
            }
            _ => {}
        }

        // ---- research-method regularizers ----
        let mut reg_loss = 0f64;
        let mut extra = Vec::new();
        let mut reg_touched = std::mem::take(&mut self.reg_touched);
        reg_touched.clear();
        let reg_result = (|| -> Result<()> {
            if hooks.regularizers.is_empty() {
                return Ok(());
            }
            let ctx = StepContext {
                step: self.step,
                total_steps: self.total_steps,
                d_in: d,
                d_sae: f,
                x,
                x_hat: &x_hat,
                w_dec,
                pre_active: Some(&enc.pre),
            };
            let mut gv = vec![0f32; nnz];
            for reg in hooks.regularizers.iter_mut() {
                let before = reg_touched.len();
                let mut gd = DecoderGrad {
                    d_in: d,
                    grad: &mut g_dec,
                    touched: &mut reg_touched,
                };
                let out = reg.penalty(&ctx, codes, &mut gv, &mut gd)?;
                if g_dec.len() != f * d || reg_touched[before..].iter().any(|&l| l as usize >= f) {
                    bail!(
                        "regularizer '{}' resized the decoder gradient or listed a latent >= {f}",
                        reg.name()
                    );
                }
                reg_loss += out.loss;
                for (k, v) in out.metrics {
                    let clash =
                        CORE_KEYS.contains(&k.as_str()) || extra.iter().any(|(e, _)| *e == k);
                    extra.push((
                        if clash {
                            format!("{}_{}", reg.name(), k)
                        } else {
                            k
                        },
                        v,
                    ));
                }
            }
            for (g, r) in grad_val.iter_mut().zip(&gv) {
                *g += r;
            }
            Ok(())
        })();
        self.tensors[W_DEC].g = g_dec;
        reg_result?;
        let w_dec = &self.tensors[W_DEC].p;
        let b_dec = &self.tensors[B_DEC].p;

        // ---- JumpReLU STE: d f / d theta = -(theta/eps) K((pre - theta)/eps), applied to the
        // full upstream gradient of each code value (reconstruction, penalty, regularizers).
        if arch == Architecture::Jumprelu {
            let th = &self.tensors[THRESHOLD].p;
            let eps = self.cfg.jumprelu_bandwidth as f32;
            let half = 0.5 * eps;
            for p in 0..nnz {
                let l = codes.idx[p] as usize;
                if (enc.pre[p] - th[l]).abs() < half {
                    theta_grad[l] += grad_val[p] * (-th[l] / eps);
                }
            }
            let near = &enc.near;
            for (q, &l) in near.idx.iter().enumerate() {
                let l = l as usize;
                if (near.val[q] - th[l]).abs() < half {
                    theta_grad[l] += g_near_kept[q] * (-th[l] / eps);
                }
            }
        }

        prof.lap("code gradients + penalties + regularizers");
        // ---- AuxK ----
        let mut auxk = 0f64;
        let aux = &enc.aux;
        let mut aux_grad = vec![0f32; aux.idx.len()];
        let mut d_ehat = Vec::new();
        if !aux.idx.is_empty() {
            let n_dead = self.dead_latents().len();
            let k_aux_cfg = self.cfg.auxk_k.unwrap().max(1);
            let scale = (n_dead as f64 / k_aux_cfg as f64).min(1.0);
            let coef = self.cfg.auxk_coef.unwrap() * scale;
            let mut e_hat = vec![0f32; rows * d];
            kernels::decode(&aux.off, &aux.idx, &aux.val, w_dec, d, None, &mut e_hat);
            let denom = kernels::total_variance(&resid, rows, d);
            let num: f64 = e_hat
                .iter()
                .zip(&resid)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                / rows as f64;
            if denom > 0.0 {
                auxk = num / denom;
                let c = (coef * 2.0 / (rows as f64 * denom)) as f32;
                d_ehat = e_hat.iter().zip(&resid).map(|(a, b)| c * (a - b)).collect();
                kernels::grad_vals(
                    &aux.off,
                    &aux.idx,
                    w_dec,
                    d,
                    &d_ehat,
                    d,
                    &|_| 0,
                    &mut aux_grad,
                );
                auxk *= coef;
            }
        }

        // ---- Gated: auxiliary reconstruction from ReLU(gate) through a frozen decoder ----
        let mut gate_grad = Vec::new();
        let mut gated_aux = 0f64;
        if arch == Architecture::Gated {
            let ge = &enc.gate;
            let lam = (self.cfg.l1_coeff.unwrap() * l1s) as f32;
            sparsity_loss =
                lam as f64 * ge.val.iter().map(|&v| v as f64).sum::<f64>() / rows as f64;
            let mut y_aux = vec![0f32; rows * d];
            kernels::decode(&ge.off, &ge.idx, &ge.val, w_dec, d, Some(b_dec), &mut y_aux);
            let mut dya = vec![0f32; rows * d];
            let mut s = 0f64;
            for ((o, a), b) in dya.iter_mut().zip(&y_aux).zip(x) {
                let e = a - b;
                s += (e as f64).powi(2);
                *o = 2.0 * e * inv_b;
            }
            gated_aux = s / rows as f64;
            gate_grad = vec![lam * inv_b; ge.idx.len()];
            kernels::grad_vals(&ge.off, &ge.idx, w_dec, d, &dya, d, &|_| 0, &mut gate_grad);
        }

        let loss = recon_loss + auxk + sparsity_loss + reg_loss + gated_aux;
        if !loss.is_finite() {
            bail!(
                "loss became {loss} at step {} (mse {recon_loss}, auxk {auxk}, sparsity {sparsity_loss}, regularizers {reg_loss})",
                self.step
            );
        }

        prof.lap("AuxK / gated aux");
        // ---- decoder gradients ----
        {
            let t = &mut self.tensors;
            let (lo, hi) = t.split_at_mut(W_DEC);
            let _ = lo;
            let g_dec = &mut hi[0].g;
            if !aux.idx.is_empty() && !d_ehat.is_empty() {
                let csc_aux = Csc::build(f, &kernels::entry_rows(&aux.off), &aux.idx);
                kernels::accum_rows(&csc_aux, &aux.val, &d_ehat, d, &|_| 0, d, g_dec);
            }
            let w = &hi[0].p;
            for &(l, c) in &dec_norm_grad {
                let l = l as usize;
                let n = dec_norms[l];
                if n > 0.0 {
                    let (gr, wr) = (&mut g_dec[l * d..(l + 1) * d], &w[l * d..(l + 1) * d]);
                    kernels::axpy(c / n, wr, gr);
                }
            }
        }

        prof.lap("decoder weight gradients");
        // ---- encoder gradients: coefficient d loss / d (x_c . W_enc[l]) per entry ----
        let (enc_rows, enc_lat, enc_coef, bias_coef): (
            Vec<u32>,
            Vec<u32>,
            Vec<f32>,
            Option<Vec<f32>>,
        ) = match arch {
            Architecture::Gated => {
                let ge = &enc.gate;
                let rm = &self.tensors[R_MAG].p;
                let mut coef = gate_grad.clone();
                let mut g_rmag = vec![0f32; f];
                let mut g_bmag = vec![0f32; f];
                for (p, &q) in enc.main_to_gate.iter().enumerate() {
                    let q = q as usize;
                    let l = ge.idx[q] as usize;
                    let dm = grad_val[p];
                    let e = rm[l].exp();
                    coef[q] += dm * e;
                    g_rmag[l] += dm * e * enc.gate_xw[q];
                    g_bmag[l] += dm;
                }
                self.tensors[R_MAG]
                    .g
                    .iter_mut()
                    .zip(&g_rmag)
                    .for_each(|(a, b)| *a += b);
                self.tensors[B_MAG]
                    .g
                    .iter_mut()
                    .zip(&g_bmag)
                    .for_each(|(a, b)| *a += b);
                // The gate bias gets only the gate part.
                let mut bsum = vec![0f32; f];
                for (q, &l) in ge.idx.iter().enumerate() {
                    bsum[l as usize] += gate_grad[q];
                }
                (
                    kernels::entry_rows(&ge.off),
                    ge.idx.clone(),
                    coef,
                    Some(bsum),
                )
            }
            _ => {
                let mut rows_v = entry_rows.clone();
                let mut lat = codes.idx.clone();
                let mut coef = grad_val.clone();
                if !aux_grad.is_empty() {
                    rows_v.extend(kernels::entry_rows(&aux.off));
                    lat.extend_from_slice(&aux.idx);
                    coef.extend_from_slice(&aux_grad);
                }
                (rows_v, lat, coef, None)
            }
        };
        let csum = if kernels::dense_pays(enc_lat.len(), rows, f) {
            kernels::accum_rows_dense(
                &enc_rows,
                &enc_lat,
                &enc_coef,
                &x_c,
                rows,
                f,
                d,
                &mut self.tensors[W_ENC].g,
                self.cfg.dense_precision,
            )
        } else {
            kernels::accum_rows(
                &Csc::build(f, &enc_rows, &enc_lat),
                &enc_coef,
                &x_c,
                d,
                &|_| 0,
                d,
                &mut self.tensors[W_ENC].g,
            )
        };
        {
            let bsum = bias_coef.as_ref().unwrap_or(&csum);
            self.tensors[B_ENC]
                .g
                .iter_mut()
                .zip(bsum)
                .for_each(|(a, b)| *a += b);
        }
        if arch == Architecture::Jumprelu {
            self.tensors[THRESHOLD]
                .g
                .iter_mut()
                .zip(&theta_grad)
                .for_each(|(a, b)| *a += b);
        }
        prof.lap("encoder weight gradients");
        // b_dec: decoder path sum_r dy_r (all prefixes), encoder path -W_enc^T csum.
        {
            let mut gb = vec![0f64; d];
            for r in 0..rows {
                let row = &dy[r * ng * d..r * ng * d + d];
                for (a, &b) in gb.iter_mut().zip(row) {
                    *a += b as f64;
                }
            }
            if apply_b_dec {
                let wsum = kernels::weighted_row_sum(&self.tensors[W_ENC].p, &csum, d);
                for (a, b) in gb.iter_mut().zip(wsum) {
                    *a -= b as f64;
                }
            }
            self.tensors[B_DEC]
                .g
                .iter_mut()
                .zip(&gb)
                .for_each(|(a, &b)| *a += b as f32);
        }

        // Decoder rows with a gradient (the parallel-component removal touches only these).
        let mut touched = vec![false; f];
        for &l in codes.idx.iter().chain(&aux.idx).chain(&reg_touched) {
            touched[l as usize] = true;
        }
        self.reg_touched = reg_touched;
        for &(l, _) in &dec_norm_grad {
            touched[l as usize] = true;
        }
        prof.lap("b_dec gradient");
        let mut enc_touched = vec![false; f];
        for &l in &enc_lat {
            enc_touched[l as usize] = true;
        }
        Ok(Fwd {
            prof,
            enc_touched,
            loss,
            mse: mse_final,
            auxk,
            sparsity_loss: sparsity_loss + gated_aux,
            reg_loss,
            fvu,
            touched,
            extra,
            x_hat,
            enc,
        })
    }

    /// One optimizer step on a normalised batch `x` [rows, d_in].
    pub fn train_step(&mut self, x: &[f32], hooks: &mut TrainHooks) -> Result<StepMetrics> {
        let (f, d) = (self.d_sae, self.d_in);
        let rows = x.len() / d;
        let arch = self.arch();
        let Fwd {
            mut prof,
            loss,
            mse: mse_final,
            auxk,
            sparsity_loss,
            reg_loss,
            fvu,
            touched,
            enc_touched,
            extra,
            x_hat,
            enc,
        } = self.forward_backward(x, hooks)?;
        let codes = &enc.codes;
        // ---- optimizer ----
        let unit = self.unit_norm();
        // Squared gradient norm, computed only over rows that can be non-zero (and for
        // the decoder while the removal pass has the rows in cache).
        let mut gn2 = if unit {
            let t = &mut self.tensors[W_DEC];
            kernels::remove_parallel(&t.p, &mut t.g, d, &touched)
        } else {
            kernels::sum_sq_rows(&self.tensors[W_DEC].g, d, &touched)
        };
        prof.lap("decoder parallel-gradient removal");
        gn2 += kernels::sum_sq_rows(&self.tensors[W_ENC].g, d, &enc_touched);
        for (i, t) in self.tensors.iter().enumerate() {
            if i != W_ENC && i != W_DEC {
                gn2 += kernels::sum_sq(&t.g);
            }
        }
        let grad_norm = gn2.sqrt();
        let clip = self.cfg.grad_clip.unwrap_or(0.0);
        if !grad_norm.is_finite() {
            bail!("gradient norm became {grad_norm} at step {}", self.step);
        }
        // Clipping is applied inside the Adam pass (no separate pass over the gradients).
        let gscale = if clip > 0.0 && grad_norm > clip {
            (clip / (grad_norm + 1e-6)) as f32
        } else {
            1.0
        };
        prof.lap("gradient norm + clip");
        let lr = self.lr_at(self.step);
        let h = AdamHyper {
            lr: lr as f32,
            beta1: self.cfg.adam_beta1.unwrap() as f32,
            beta2: self.cfg.adam_beta2 as f32,
            eps: self.cfg.adam_eps as f32,
            t: self.step as u64 + 1,
            gscale,
        };
        for (i, t) in self.tensors.iter_mut().enumerate() {
            let Tensor { p, g, m, v, .. } = t;
            if i == W_DEC && unit {
                // Renormalise each decoder row right after its update, while it is in cache.
                kernels::adam_step_unit_rows(p, g, m, v, h, d);
            } else {
                kernels::adam_step(p, g, m, v, h);
            }
        }
        if arch == Architecture::Jumprelu {
            // A raw threshold below 0 would let negative pre-activations through.
            self.tensors[THRESHOLD]
                .p
                .iter_mut()
                .for_each(|t| *t = t.max(0.0));
        }

        prof.lap("Adam + renormalise");
        // ---- statistics ----
        let bt = rows as u64;
        let mut fired = vec![false; f];
        for (&l, &v) in codes.idx.iter().zip(&codes.val) {
            if v != 0.0 {
                fired[l as usize] = true;
                self.window_fires[l as usize] += 1;
            }
        }
        for (s, &fi) in self.since_fired.iter_mut().zip(&fired) {
            *s = if fi { 0 } else { s.saturating_add(bt) };
        }
        self.window_tokens += bt;
        let l0 = codes.val.iter().filter(|&&v| v != 0.0).count() as f64 / rows as f64;
        // Smallest kept activation: TopK per-row minimum averaged (dictionary_learning),
        // BatchTopK the batch minimum.
        let mut threshold = None;
        if arch.is_topk_family() {
            let min_act = if arch == Architecture::Topk {
                let mins: Vec<f64> = (0..rows)
                    .filter_map(|r| {
                        let (_, v) = codes.row(r);
                        v.iter()
                            .copied()
                            .filter(|&a| a > 0.0)
                            .reduce(f32::min)
                            .map(|m| m as f64)
                    })
                    .collect();
                if mins.is_empty() {
                    0.0
                } else {
                    (mins.iter().sum::<f64>() / mins.len() as f64) as f32
                }
            } else {
                codes
                    .val
                    .iter()
                    .copied()
                    .filter(|&a| a > 0.0)
                    .reduce(f32::min)
                    .unwrap_or(0.0)
            };
            self.last_min_act = min_act;
            let track = arch != Architecture::Topk || self.cfg.topk_inference_threshold;
            if track && self.step >= self.cfg.threshold_start_step {
                let b = self.cfg.threshold_beta as f32;
                self.threshold_ema = if self.threshold_ema < 0.0 {
                    min_act
                } else {
                    b * self.threshold_ema + (1.0 - b) * min_act
                };
            }
            if track {
                threshold = Some(self.inference_threshold() as f64);
            }
        }
        let dead_fraction = self
            .since_fired
            .iter()
            .filter(|&&s| s >= self.cfg.dead_tokens)
            .count() as f64
            / f as f64;
        self.step += 1;
        self.tokens += bt;

        prof.lap("statistics");
        // ---- after-step hooks and resampling ----
        let mut reinit: Vec<u32> = Vec::new();
        if !hooks.regularizers.is_empty() {
            let w_dec = &self.tensors[W_DEC].p;
            let ctx = StepContext {
                step: self.step - 1,
                total_steps: self.total_steps,
                d_in: d,
                d_sae: f,
                x,
                x_hat: &x_hat,
                w_dec,
                pre_active: Some(&enc.pre),
            };
            for reg in hooks.regularizers.iter_mut() {
                let r = reg.after_step(&ctx, codes)?;
                if let Some(&bad) = r.iter().find(|&&l| l as usize >= f) {
                    bail!(
                        "regularizer '{}' asked to re-initialise latent {bad} of {f}",
                        reg.name()
                    );
                }
                reinit.extend(r);
            }
        }
        let mut use_input = false;
        if arch == Architecture::Standard
            && self.cfg.resample_every > 0
            && self.step.is_multiple_of(self.cfg.resample_every)
        {
            let lim = (self.cfg.resample_every as u64 / 2) * bt;
            reinit.extend((0..f as u32).filter(|&l| self.since_fired[l as usize] >= lim));
            use_input = true;
        }
        reinit.sort_unstable();
        reinit.dedup();
        if !reinit.is_empty() {
            self.reinit_latents(&reinit, x, &x_hat, use_input);
        }

        prof.lap("after-step hooks");
        // ---- feature-separation monitoring (every run, baselines included) ----
        let mut extra = extra;
        let mut arrays = Vec::new();
        let se = self.cfg.separation_every;
        if se > 0 && (self.step.is_multiple_of(se) || self.step == self.total_steps) {
            let method = if hooks.regularizers.is_empty() {
                None
            } else {
                Some(crate::regularizer::PenaltyOut {
                    loss: reg_loss,
                    metrics: extra.clone(),
                })
            };
            let opts = crate::methods::monitor::CosineOptions {
                seed: self.cfg.seed,
                ..Default::default()
            };
            let st = crate::methods::monitor::separation_stats(
                self.step,
                &self.tensors[W_DEC].p,
                d,
                codes,
                method.as_ref(),
                0.5,
                &opts,
            );
            extra.push(("sep_cos_mean".into(), st.decoder.mean));
            extra.push(("sep_cos_std".into(), st.decoder.std));
            extra.push(("sep_cos_max".into(), st.decoder.max));
            extra.push(("sep_coact_frac_above".into(), st.coactivation.frac_above));
            extra.push(("sep_mean_cij".into(), st.coactivation.mean_c));
            extra.push(("sep_coact_pairs".into(), st.coactivation.pairs as f64));
            arrays.push((
                "sep_cos_hist".into(),
                st.decoder.histogram.iter().map(|&c| c as f64).collect(),
            ));
            prof.lap("separation monitoring");
        }
        if let Some(acc) = self.profile.as_mut() {
            for (name, t) in prof.acc {
                match acc.iter_mut().find(|e| e.0 == name) {
                    Some(e) => e.1 += t,
                    None => acc.push((name, t)),
                }
            }
        }
        Ok(StepMetrics {
            step: self.step,
            tokens: self.tokens,
            loss,
            mse: mse_final,
            auxk,
            sparsity_loss,
            regularizer_loss: reg_loss,
            fvu,
            l0,
            dead_fraction,
            lr,
            grad_norm,
            threshold,
            reinitialised: reinit.len(),
            p: if self.total_steps == 0 {
                0.0
            } else {
                self.step as f64 / self.total_steps as f64
            },
            extra,
            arrays,
        })
    }

    /// The threshold an inference JumpReLU would use: the EMA once started, else the
    /// latest batch's smallest kept activation.
    pub fn inference_threshold(&self) -> f32 {
        if self.threshold_ema >= 0.0 {
            self.threshold_ema
        } else {
            self.last_min_act
        }
    }

    /// Re-initialise latents (resampling style): for each, sample a row of the batch with
    /// probability proportional to its reconstruction error; the decoder row becomes the
    /// unit direction of that row's residual (or of the input itself when `use_input`, as
    /// dictionary_learning's resampling), the encoder row that direction times 0.2 times
    /// the mean norm of the other encoder rows, biases 0, and the Adam moments of every
    /// per-latent parameter of those latents are zeroed.
    pub fn reinit_latents(&mut self, latents: &[u32], x: &[f32], x_hat: &[f32], use_input: bool) {
        let (f, d) = (self.d_sae, self.d_in);
        let rows = x.len() / d;
        if rows == 0 || latents.is_empty() {
            return;
        }
        let mut is_re = vec![false; f];
        latents.iter().for_each(|&l| is_re[l as usize] = true);
        let enc_norms = kernels::row_norms(&self.tensors[W_ENC].p, d);
        let alive: Vec<f32> = enc_norms
            .iter()
            .zip(&is_re)
            .filter(|(_, &r)| !r)
            .map(|(&n, _)| n)
            .collect();
        let alive_norm = if alive.is_empty() {
            1.0
        } else {
            alive.iter().sum::<f32>() / alive.len() as f32
        };
        let errs: Vec<f64> = (0..rows)
            .map(|r| {
                (0..d)
                    .map(|j| ((x[r * d + j] - x_hat[r * d + j]) as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        let apply = self.apply_b_dec();
        for &l in latents {
            let l = l as usize;
            let s = self
                .rng
                .weighted_index(&errs)
                .unwrap_or_else(|| self.rng.below(rows));
            let mut u: Vec<f32> = if use_input {
                let b = &self.tensors[B_DEC].p;
                (0..d)
                    .map(|j| x[s * d + j] - if apply { b[j] } else { 0.0 })
                    .collect()
            } else {
                (0..d).map(|j| x[s * d + j] - x_hat[s * d + j]).collect()
            };
            let n = (kernels::dot(&u, &u) as f64).sqrt();
            if n > 0.0 {
                u.iter_mut().for_each(|v| *v = (*v as f64 / n) as f32);
            } else {
                self.rng.fill_normal(&mut u, 1.0);
                kernels::normalize_rows(&mut u, d);
            }
            let dec_scale = if self.unit_norm() {
                1.0
            } else {
                enc_norms[l].clamp(1e-3, 1.0)
            };
            for (i, t) in self.tensors.iter_mut().enumerate() {
                if t.rows != f {
                    continue;
                }
                let c = t.cols;
                let rng_ = l * c..(l + 1) * c;
                match i {
                    W_ENC => t.p[rng_.clone()]
                        .iter_mut()
                        .zip(&u)
                        .for_each(|(a, b)| *a = b * 0.2 * alive_norm),
                    W_DEC => t.p[rng_.clone()]
                        .iter_mut()
                        .zip(&u)
                        .for_each(|(a, b)| *a = b * dec_scale),
                    B_ENC => t.p[l] = 0.0,
                    _ if self.cfg.architecture == Architecture::Jumprelu => {
                        t.p[l] = self.cfg.jumprelu_threshold_init as f32
                    }
                    _ => t.p[l] = 0.0,
                }
                t.m[rng_.clone()].fill(0.0);
                t.v[rng_].fill(0.0);
            }
            self.since_fired[l] = 0;
        }
    }

    /// log10 of each latent's firing frequency (+1e-10) over the current window, or over
    /// the whole run when the window is empty (SAELens `sparsity.safetensors`).
    pub fn log10_density(&self) -> Vec<f32> {
        let t = self.window_tokens.max(1) as f64;
        self.window_fires
            .iter()
            .map(|&c| ((c as f64 / t) + 1e-10).log10() as f32)
            .collect()
    }

    /// Histogram of log10 densities over [-10, 0] in bins of 0.5 (counts per bin).
    pub fn density_histogram(&self) -> (Vec<f64>, Vec<u64>) {
        let edges: Vec<f64> = (0..=20).map(|i| -10.0 + 0.5 * i as f64).collect();
        let mut counts = vec![0u64; 20];
        for v in self.log10_density() {
            let b = (((v as f64) + 10.0) / 0.5).floor().clamp(0.0, 19.0) as usize;
            counts[b] += 1;
        }
        (edges, counts)
    }

    pub fn reset_density_window(&mut self) {
        self.window_fires.iter_mut().for_each(|c| *c = 0);
        self.window_tokens = 0;
    }

    /// The inference SAE (SAELens layout) taking raw activations: the normalisation scale
    /// and (April variant) the decoder norms folded into the weights.
    pub fn to_inference(&self) -> Sae {
        self.export(None)
    }

    /// [`TrainSae::to_inference`] of an SAE trained with a gate (adaptive thresholds in
    /// place of the ReLU rule): `gate_thresholds` (from [`crate::regularizer::Gate::inference_thresholds`])
    /// make the exported SAE a JumpReLU that applies them, i.e. the rule it was trained
    /// with, instead of a plain ReLU SAE that would fire every positive pre-activation.
    /// Errors if the thresholds do not match the latents or the architecture has no ReLU
    /// rule for them to replace (training refuses such a gate too).
    pub fn to_inference_gated(&self, gate_thresholds: Option<&[f32]>) -> Result<Sae> {
        if let Some(t) = gate_thresholds {
            if t.len() != self.d_sae {
                bail!(
                    "cannot export the gate: {} thresholds for {} latents",
                    t.len(),
                    self.d_sae
                );
            }
            let arch = self.arch();
            if !arch.takes_a_gate() {
                bail!("cannot export the gate: it replaces a ReLU rule, and {arch:?} has none");
            }
        }
        Ok(self.export(gate_thresholds))
    }

    /// The export behind [`TrainSae::to_inference`] and [`TrainSae::to_inference_gated`];
    /// `gate_thresholds` are already checked.
    fn export(&self, gate_thresholds: Option<&[f32]>) -> Sae {
        let (f, d) = (self.d_sae, self.d_in);
        let arch = self.arch();
        let mut w_lat = self.tensors[W_ENC].p.clone();
        let mut b_enc = self.tensors[B_ENC].p.clone();
        let mut w_dec = self.tensors[W_DEC].p.clone();
        let mut b_dec = self.tensors[B_DEC].p.clone();
        let mut threshold: Option<Vec<f32>> = match arch {
            _ if gate_thresholds.is_some() => gate_thresholds.map(|t| t.to_vec()),
            Architecture::Jumprelu => Some(self.tensors[THRESHOLD].p.clone()),
            Architecture::Batchtopk | Architecture::MatryoshkaBatchtopk => {
                Some(vec![self.inference_threshold(); f])
            }
            Architecture::Topk if self.cfg.topk_inference_threshold => {
                Some(vec![self.inference_threshold(); f])
            }
            _ => None,
        };
        if arch == Architecture::StandardApril {
            // ReLU is positively homogeneous: f_l * W_dec[l] = (f_l n_l) * (W_dec[l] / n_l).
            let norms = kernels::row_norms(&w_dec, d);
            for l in 0..f {
                let n = norms[l];
                if n > 0.0 {
                    w_dec[l * d..(l + 1) * d].iter_mut().for_each(|v| *v /= n);
                    w_lat[l * d..(l + 1) * d].iter_mut().for_each(|v| *v *= n);
                    b_enc[l] *= n;
                    if let Some(t) = threshold.as_mut() {
                        t[l] *= n;
                    }
                }
            }
        }
        // Fold the input scale s: pre = (s x - b) W + c = (x - b/s)(s W) + c; x_hat = out / s.
        let s = self.scale;
        if s != 1.0 {
            w_lat.iter_mut().for_each(|v| *v *= s);
            w_dec.iter_mut().for_each(|v| *v /= s);
            b_dec.iter_mut().for_each(|v| *v /= s);
        }
        let mut w_enc = vec![0f32; d * f];
        for l in 0..f {
            for j in 0..d {
                w_enc[j * f + l] = w_lat[l * d + j];
            }
        }
        let (iarch, k) = match arch {
            Architecture::Topk if threshold.is_none() => (InferenceArch::Topk, self.cfg.k),
            Architecture::Topk
            | Architecture::Batchtopk
            | Architecture::MatryoshkaBatchtopk
            | Architecture::Jumprelu => (InferenceArch::Jumprelu, 0),
            Architecture::Standard | Architecture::StandardApril if threshold.is_some() => {
                (InferenceArch::Jumprelu, 0)
            }
            Architecture::Standard | Architecture::StandardApril => (InferenceArch::Standard, 0),
            Architecture::Gated => (InferenceArch::Gated, 0),
        };
        let gated = arch == Architecture::Gated;
        Sae {
            arch: iarch,
            d_in: d,
            d_sae: f,
            k,
            apply_b_dec_to_input: self.apply_b_dec(),
            w_enc,
            b_enc: if gated { vec![0.0; f] } else { b_enc.clone() },
            w_dec,
            b_dec,
            threshold,
            b_gate: if gated { Some(b_enc) } else { None },
            r_mag: if gated {
                Some(self.tensors[R_MAG].p.clone())
            } else {
                None
            },
            b_mag: if gated {
                Some(self.tensors[B_MAG].p.clone())
            } else {
                None
            },
            metadata: self.cfg.metadata.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_schedule_step_by_step() {
        let cfg = TrainConfig {
            d_sae: 8,
            k: 2,
            lr: Some(1.0),
            warmup_steps: 4,
            decay_start: Some(6),
            total_tokens: 10 * 2048,
            ..Default::default()
        };
        let sae = TrainSae::new(&cfg, 4, 10).unwrap();
        let got: Vec<f64> = (0..10).map(|s| sae.lr_at(s)).collect();
        let want = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        // Warm-up from zero (dictionary_learning's schedule, the standard SAE's default).
        let std_cfg = TrainConfig {
            architecture: Architecture::Standard,
            ..cfg.clone()
        };
        let sae = TrainSae::new(&std_cfg, 4, 10).unwrap();
        let got: Vec<f64> = (0..10).map(|s| sae.lr_at(s)).collect();
        let want = [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        // The L1 warm-up s(t) = min(t / 2000, 1).
        let mut s = TrainSae::new(
            &TrainConfig {
                architecture: Architecture::Standard,
                d_sae: 8,
                ..Default::default()
            },
            4,
            10,
        )
        .unwrap();
        s.step = 500;
        assert!((s.l1_scale() - 0.25).abs() < 1e-12);
        s.step = 5000;
        assert_eq!(s.l1_scale(), 1.0);
    }

    #[test]
    fn resampling_revives_dead_latents() {
        let d = 6;
        let cfg = TrainConfig {
            architecture: Architecture::Standard,
            d_sae: 12,
            batch_size: 16,
            resample_every: 4,
            ..Default::default()
        };
        let mut sae = TrainSae::new(&cfg, d, 100).unwrap();
        // Latents 0..6 can never fire: large negative bias, zero-gradient region.
        for l in 0..6 {
            sae.tensors[B_ENC].p[l] = -1e6;
        }
        let mut x = vec![0f32; 16 * d];
        Rng::new(2).fill_normal(&mut x, 1.0);
        let mut hooks = TrainHooks::default();
        let mut reinit = 0;
        for _ in 0..4 {
            reinit += sae.train_step(&x, &mut hooks).unwrap().reinitialised;
        }
        assert!(reinit >= 6, "dead latents resampled at step 4: {reinit}");
        for l in 0..6 {
            assert_eq!(sae.tensors[B_ENC].p[l], 0.0);
            assert!(
                sae.tensors[B_ENC].m[l] == 0.0
                    && sae.tensors[W_ENC].m[l * d..(l + 1) * d]
                        .iter()
                        .all(|&v| v == 0.0)
            );
            let n: f32 = sae.tensors[W_DEC].p[l * d..(l + 1) * d]
                .iter()
                .map(|v| v * v)
                .sum::<f32>()
                .sqrt();
            assert!((n - 1.0).abs() < 1e-5);
        }
        let fires = sae.train_step(&x, &mut hooks).unwrap();
        assert!(fires.l0 > 0.0);
    }
}
