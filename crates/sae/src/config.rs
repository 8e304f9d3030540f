//! The training configuration: one TOML table per SAE, every field optional in the file
//! (missing fields take the documented defaults below), unknown fields rejected so a
//! typo never silently falls back to a default. The trainer writes the *resolved*
//! configuration (every default filled in, architecture-dependent ones included) as
//! `train_config.toml` beside the saved SAE.

use crate::model::SaeMetadata;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Training architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// TopK with AuxK (dictionary_learning / OpenAI): top-k of ReLU(pre) per token.
    Topk,
    /// BatchTopK: top k*B over the whole batch; saved as JumpReLU with one threshold.
    Batchtopk,
    /// Matryoshka BatchTopK: BatchTopK whose nested dictionary prefixes each reconstruct x.
    MatryoshkaBatchtopk,
    /// ReLU + L1 with a unit-norm decoder (dictionary_learning StandardTrainer).
    Standard,
    /// Anthropic April-2024 update: separate biases, unconstrained decoder, L1 weighted by
    /// decoder norms; norms folded into the encoder at save.
    StandardApril,
    /// JumpReLU with a straight-through estimator and a raw threshold parameter.
    Jumprelu,
    /// Gated SAE with the frozen-decoder auxiliary loss.
    Gated,
}

/// Activation normalisation (a single scale, estimated before training and folded into
/// the saved weights so the saved SAE takes raw activations).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    None,
    /// SAELens: x * sqrt(d_in) / mean ||x||.
    ExpectedAverageOnlyIn,
    /// dictionary_learning: x / sqrt(mean ||x||^2).
    Rms,
}

/// How the decoder bias is initialised on the first batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BDecInit {
    /// Weiszfeld geometric median of the first batch (from the mean, <= 100 iterations).
    GeometricMedian,
    Mean,
    Zeros,
}

/// JumpReLU sparsity penalty.
/// f32 or bf16 products (see [`TrainConfig::encoder_precision`] and
/// [`TrainConfig::dense_precision`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatmulPrecision {
    #[default]
    F32,
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum L0Penalty {
    /// dictionary_learning: `l0_coeff * (L0 / target_l0 - 1)^2`, L0 via the step STE.
    TargetL0,
    /// Anthropic: `l0_coeff * mean_rows sum_i tanh(tanh_scale * f_i * ||W_dec_i||)`.
    Tanh,
}

/// One SAE's training configuration. `Option` fields resolve to architecture-dependent
/// defaults (see [`TrainConfig::resolved`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Default `topk`.
    pub architecture: Architecture,
    /// Number of latents F. Default 16384.
    pub d_sae: usize,
    /// Active latents per token (TopK) or mean per token (BatchTopK). Default 40.
    pub k: usize,
    /// Tokens to train on; steps = total_tokens / batch_size. Default 5_000_000.
    pub total_tokens: u64,
    /// Tokens per step. Default 2048.
    pub batch_size: usize,
    /// Learning rate. Default: TopK family 2e-4 / sqrt(F / 2^14); standard 1e-3;
    /// standard_april 5e-5; jumprelu 7e-5; gated 5e-5.
    pub lr: Option<f64>,
    /// Adam beta1. Default 0.9 (jumprelu: 0.0, as dictionary_learning).
    pub adam_beta1: Option<f64>,
    /// Adam beta2. Default 0.999.
    pub adam_beta2: f64,
    /// Adam epsilon. Default 1e-8.
    pub adam_eps: f64,
    /// Linear LR warm-up steps. Default 1000.
    pub warmup_steps: usize,
    /// Where the linear warm-up starts. `true`: step `s` (0-based) uses `lr * s / warmup`,
    /// so the first step only feeds Adam's moments (dictionary_learning's and sparsify's
    /// schedules); `false`: `lr * (s + 1) / warmup` (SAELens). Default true for the
    /// standard, standard_april and gated SAEs (dictionary_learning's trainers), false for
    /// the TopK family and JumpReLU. It matters for a ReLU SAE: its first gradient, at
    /// L0 ~F/2, is the largest of the run, and taking a step along it cost 0.045 of
    /// held-out FVE at L0 180 in a 100-step run (docs/benchmarks-peers.md section 7).
    pub warmup_from_zero: Option<bool>,
    /// Step from which the LR decays linearly to 0 at the last step. Default none.
    pub decay_start: Option<usize>,
    /// Global gradient-norm clip (0 = off). Default 1.0 (standard: 0, as dictionary_learning).
    pub grad_clip: Option<f64>,
    /// Keep decoder rows at unit norm (remove the parallel gradient, renormalise after each
    /// step). Default true, except standard_april (false).
    pub unit_norm_decoder: Option<bool>,
    /// Subtract b_dec from the input before encoding. Default true (jumprelu and
    /// standard_april: false).
    pub apply_b_dec_to_input: Option<bool>,
    /// Seed of every random choice of this run. Default 42.
    pub seed: u64,
    /// Default `none`.
    pub normalize_activations: Normalization,
    /// Batches read to estimate the normalisation scale. Default 100.
    pub norm_estimation_batches: usize,
    /// Default `geometric_median`.
    pub b_dec_init: BDecInit,
    /// A latent is dead after this many tokens without firing. Default 10_000_000.
    pub dead_tokens: u64,
    /// AuxK weight (0 = off). Default 1/32 for the TopK family, 0 otherwise.
    pub auxk_coef: Option<f64>,
    /// AuxK k. Default d_in / 2.
    pub auxk_k: Option<usize>,
    /// TopK: track an inference threshold (EMA of the smallest positive top-k value) and
    /// save the SAE as JumpReLU with it. Default false.
    pub topk_inference_threshold: bool,
    /// Step after which the threshold EMA starts (TopK and BatchTopK). Default 1000.
    pub threshold_start_step: usize,
    /// EMA decay of the inference threshold. Default 0.999.
    pub threshold_beta: f64,
    /// L1 coefficient (standard, standard_april, gated). Default 0.1 (standard_april: 5.0).
    pub l1_coeff: Option<f64>,
    /// L1 warm-up: s(t) = min(t / l1_warmup_steps, 1). Default 2000.
    pub l1_warmup_steps: usize,
    /// Resample dead latents every this many steps (standard only, 0 = off). Default 0.
    pub resample_every: usize,
    /// JumpReLU STE bandwidth. Default 0.001.
    pub jumprelu_bandwidth: f64,
    /// JumpReLU initial threshold. Default 0.001.
    pub jumprelu_threshold_init: f64,
    /// Default `target_l0`.
    pub l0_penalty: L0Penalty,
    /// Target L0 of the `target_l0` penalty. Default 20.
    pub target_l0: f64,
    /// Weight of the JumpReLU L0 penalty. Default 1.0.
    pub l0_coeff: f64,
    /// Scale c of the tanh penalty. Default 4.0.
    pub tanh_scale: f64,
    /// Matryoshka prefix sizes (increasing, last = d_sae). Default: F/16, F/8, F/4, F/2, F.
    pub matryoshka_prefixes: Vec<usize>,
    /// Metrics line every this many steps. Default 100.
    pub log_every: usize,
    /// Log10-density histogram every this many steps (0 = off). Default 1000.
    pub hist_every: usize,
    /// Checkpoint (and usable SAE) every this many steps (0 = only at the end). Default 1000.
    pub checkpoint_every: usize,
    /// Rows of the pre-activation block computed per encoder GEMM call (performance only:
    /// each call packs the whole encoder, so fewer, larger blocks are faster; the block
    /// buffer is `rows x d_sae` f32). Default 2048.
    pub encoder_block_rows: usize,
    /// Arithmetic of the TopK-family encoder's selection: `f32` (default), or `bf16`:
    /// the latents are chosen from bf16 products with f32 sums (AMX tiles where the CPU
    /// has them, ~2x the f32 GEMM there) and the chosen values are then recomputed in
    /// f32, so codes, loss and gradients stay f32; only near-ties at the k-th value can
    /// select differently.
    pub encoder_precision: MatmulPrecision,
    /// Arithmetic of the dense GEMMs (the ReLU-type encoders' pre-activations, and the
    /// decoder and its gradients when the codes are dense, as a ReLU + L1 SAE's are early
    /// in training): `f32` (default) or `bf16`: bf16 products with f32 sums (AMX tiles
    /// where the CPU has them), used as computed, like PyTorch's bf16 autocast.
    pub dense_precision: MatmulPrecision,
    /// Written into the saved SAE's cfg.json `metadata`.
    pub metadata: SaeMetadata,
    /// Feature-separation monitoring (decoder |cos| statistics on a 1024-row sample and
    /// co-activation statistics of the batch, `sep_*` keys in metrics.jsonl) every this
    /// many steps, for every run (0 = off). Default 500.
    pub separation_every: usize,
    /// Research method attached to this SAE (`[method]` table with `method =
    /// "none" | "progressive_ortho" | "self_correcting"`; see docs/methods.md). Default none.
    pub method: crate::methods::MethodConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            architecture: Architecture::Topk,
            d_sae: 16384,
            k: 40,
            total_tokens: 5_000_000,
            batch_size: 2048,
            lr: None,
            adam_beta1: None,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            warmup_steps: 1000,
            warmup_from_zero: None,
            decay_start: None,
            grad_clip: None,
            unit_norm_decoder: None,
            apply_b_dec_to_input: None,
            seed: 42,
            normalize_activations: Normalization::None,
            norm_estimation_batches: 100,
            b_dec_init: BDecInit::GeometricMedian,
            dead_tokens: 10_000_000,
            auxk_coef: None,
            auxk_k: None,
            topk_inference_threshold: false,
            threshold_start_step: 1000,
            threshold_beta: 0.999,
            l1_coeff: None,
            l1_warmup_steps: 2000,
            resample_every: 0,
            jumprelu_bandwidth: 0.001,
            jumprelu_threshold_init: 0.001,
            l0_penalty: L0Penalty::TargetL0,
            target_l0: 20.0,
            l0_coeff: 1.0,
            tanh_scale: 4.0,
            matryoshka_prefixes: Vec::new(),
            log_every: 100,
            hist_every: 1000,
            checkpoint_every: 1000,
            encoder_block_rows: 2048,
            encoder_precision: MatmulPrecision::F32,
            dense_precision: MatmulPrecision::F32,
            metadata: SaeMetadata::default(),
            separation_every: 500,
            method: crate::methods::MethodConfig::None,
        }
    }
}

impl Architecture {
    pub fn is_topk_family(self) -> bool {
        matches!(
            self,
            Architecture::Topk | Architecture::Batchtopk | Architecture::MatryoshkaBatchtopk
        )
    }

    /// Whether a gate (adaptive per-latent thresholds) can stand in for this
    /// architecture's activation: only a ReLU rule can be replaced by one.
    pub fn takes_a_gate(self) -> bool {
        matches!(self, Architecture::Standard | Architecture::StandardApril)
    }
}

impl TrainConfig {
    /// Parse a TOML document holding one configuration.
    pub fn from_toml_str(s: &str) -> Result<Self> {
        Ok(toml::from_str(s)?)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_toml_str(&s)
            .with_context(|| format!("invalid training config {}", path.display()))
    }

    pub fn to_toml_string(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// Steps this configuration trains for.
    pub fn steps(&self) -> usize {
        if self.batch_size == 0 {
            0
        } else {
            (self.total_tokens / self.batch_size as u64) as usize
        }
    }

    /// Every `Option` filled with its architecture-dependent default (needs `d_in` for
    /// AuxK's k); validates the values.
    pub fn resolved(&self, d_in: usize) -> Result<TrainConfig> {
        use Architecture::*;
        let mut c = self.clone();
        let a = c.architecture;
        let f = c.d_sae as f64;
        c.lr.get_or_insert(match a {
            Topk | Batchtopk | MatryoshkaBatchtopk => 2e-4 / (f / 16384.0).sqrt(),
            Standard => 1e-3,
            StandardApril => 5e-5,
            Jumprelu => 7e-5,
            Gated => 5e-5,
        });
        c.adam_beta1
            .get_or_insert(if a == Jumprelu { 0.0 } else { 0.9 });
        c.grad_clip
            .get_or_insert(if a == Standard { 0.0 } else { 1.0 });
        c.warmup_from_zero
            .get_or_insert(matches!(a, Standard | StandardApril | Gated));
        c.unit_norm_decoder.get_or_insert(a != StandardApril);
        c.apply_b_dec_to_input
            .get_or_insert(!matches!(a, Jumprelu | StandardApril));
        c.auxk_coef
            .get_or_insert(if a.is_topk_family() { 1.0 / 32.0 } else { 0.0 });
        c.auxk_k.get_or_insert((d_in / 2).max(1));
        c.l1_coeff
            .get_or_insert(if a == StandardApril { 5.0 } else { 0.1 });
        if a == MatryoshkaBatchtopk && c.matryoshka_prefixes.is_empty() {
            let mut p: Vec<usize> = [16, 8, 4, 2]
                .iter()
                .map(|d| c.d_sae / d)
                .filter(|&v| v > 0)
                .collect();
            p.push(c.d_sae);
            p.dedup();
            c.matryoshka_prefixes = p;
        }
        c.validate(d_in)?;
        Ok(c)
    }

    fn validate(&self, d_in: usize) -> Result<()> {
        if d_in == 0 {
            bail!("d_in must be >= 1");
        }
        self.method.validate(self.d_sae)?;
        if let crate::methods::MethodConfig::SelfCorrecting(m) = &self.method {
            if m.gate.enabled && !self.architecture.takes_a_gate() {
                bail!(
                    "method self_correcting with its z-score gate needs a ReLU-type architecture (standard or standard_april), not {:?}; set method.gate.enabled = false to use its penalty and reactivation with {:?}",
                    self.architecture,
                    self.architecture
                );
            }
        }
        if self.d_sae < 1 {
            bail!("d_sae must be >= 1 (got {})", self.d_sae);
        }
        if self.batch_size < 1 {
            bail!("batch_size must be >= 1");
        }
        if self.architecture.is_topk_family() && (self.k < 1 || self.k > self.d_sae) {
            bail!(
                "k must be in 1..=d_sae (k = {}, d_sae = {})",
                self.k,
                self.d_sae
            );
        }
        let lr = self.lr.unwrap_or(1.0);
        if lr.is_nan() || lr <= 0.0 || !lr.is_finite() {
            bail!("lr must be > 0 (got {lr})");
        }
        let b1 = self.adam_beta1.unwrap_or(0.9);
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&self.adam_beta2) {
            bail!("Adam betas must be in [0, 1)");
        }
        if self.adam_eps.is_nan() || self.adam_eps <= 0.0 {
            bail!("adam_eps must be > 0");
        }
        if let Some(ds) = self.decay_start {
            if ds >= self.steps().max(1) {
                bail!(
                    "decay_start ({ds}) must be below the number of steps ({})",
                    self.steps()
                );
            }
        }
        if self.normalize_activations != Normalization::None && self.norm_estimation_batches == 0 {
            bail!("norm_estimation_batches must be >= 1 when normalising");
        }
        if !(0.0..1.0).contains(&self.threshold_beta) {
            bail!("threshold_beta must be in [0, 1)");
        }
        if self.architecture == Architecture::Jumprelu
            && (self.jumprelu_bandwidth.is_nan() || self.jumprelu_bandwidth <= 0.0)
        {
            bail!("jumprelu_bandwidth must be > 0");
        }
        if self.architecture == Architecture::Jumprelu
            && self.l0_penalty == L0Penalty::TargetL0
            && (self.target_l0.is_nan() || self.target_l0 <= 0.0)
        {
            bail!("target_l0 must be > 0");
        }
        if self.architecture == Architecture::MatryoshkaBatchtopk {
            let p = &self.matryoshka_prefixes;
            if p.is_empty()
                || p.windows(2).any(|w| w[0] >= w[1])
                || p[0] == 0
                || *p.last().unwrap() != self.d_sae
            {
                bail!(
                    "matryoshka_prefixes must increase strictly from >= 1 to d_sae ({}), got {:?}",
                    self.d_sae,
                    p
                );
            }
        }
        if self.encoder_block_rows == 0 {
            bail!("encoder_block_rows must be >= 1");
        }
        if self.encoder_precision == MatmulPrecision::Bf16 && !self.architecture.is_topk_family() {
            bail!(
                "encoder_precision = \"bf16\" applies to the TopK family's selection; {:?} computes dense pre-activations in f32 (use \"f32\")",
                self.architecture
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_roundtrip_and_unknown_fields_rejected() {
        let c = TrainConfig::default().resolved(64).unwrap();
        let s = c.to_toml_string().unwrap();
        let back = TrainConfig::from_toml_str(&s).unwrap();
        assert_eq!(back, c);
        assert!(s.contains("lr = "), "resolved config writes the lr: {s}");
        let err = TrainConfig::from_toml_str("d_sea = 3").unwrap_err();
        assert!(format!("{err:#}").contains("d_sea"), "{err:#}");
        let partial =
            TrainConfig::from_toml_str("architecture = \"jumprelu\"\nd_sae = 64").unwrap();
        assert_eq!(partial.k, 40);
        let r = partial.resolved(8).unwrap();
        assert_eq!(r.adam_beta1, Some(0.0));
        assert_eq!(r.apply_b_dec_to_input, Some(false));
    }

    #[test]
    fn lr_rule_and_validation() {
        let c = TrainConfig {
            d_sae: 65536,
            ..Default::default()
        }
        .resolved(16)
        .unwrap();
        assert!((c.lr.unwrap() - 1e-4).abs() < 1e-12);
        let bad = |c: TrainConfig| c.resolved(16).unwrap_err().to_string();
        assert!(bad(TrainConfig {
            k: 100,
            d_sae: 50,
            ..Default::default()
        })
        .contains("k must"));
        assert!(bad(TrainConfig {
            d_sae: 0,
            ..Default::default()
        })
        .contains("d_sae"));
        assert!(bad(TrainConfig {
            lr: Some(0.0),
            ..Default::default()
        })
        .contains("lr"));
        assert!(bad(TrainConfig {
            lr: Some(-1.0),
            ..Default::default()
        })
        .contains("lr"));
        let m = TrainConfig {
            architecture: Architecture::MatryoshkaBatchtopk,
            d_sae: 64,
            k: 4,
            ..Default::default()
        }
        .resolved(8)
        .unwrap();
        assert_eq!(m.matryoshka_prefixes, vec![4, 8, 16, 32, 64]);
    }
}
