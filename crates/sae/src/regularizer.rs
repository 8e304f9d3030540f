//! The extension point through which the research methods (and any future auxiliary
//! loss on the codes or the decoder) join a training step without the trainer knowing
//! their details.
//!
//! Order inside a step: encode -> sparse codes -> every regularizer's `penalty` adds its
//! gradient with respect to the code values (and optionally the decoder rows it
//! touches) -> the trainer backpropagates `grad_val` through the encoder sparsely ->
//! optimizer step -> `after_step` (statistics, reactivation).

use crate::codes::SparseCodes;
use anyhow::Result;

/// What a step looks like to a regularizer.
pub struct StepContext<'a> {
    /// Optimizer step index (0-based) and planned total steps; `p = step / total`.
    pub step: usize,
    pub total_steps: usize,
    pub d_in: usize,
    pub d_sae: usize,
    /// The batch's input activations (normalised as the SAE sees them), [rows, d_in].
    pub x: &'a [f32],
    /// The reconstruction, [rows, d_in].
    pub x_hat: &'a [f32],
    /// Decoder rows, [d_sae, d_in], row-major.
    pub w_dec: &'a [f32],
    /// Pre-activations of the active latents, aligned with `codes.val`, when the
    /// architecture has them (TopK, BatchTopK, ReLU keep them).
    pub pre_active: Option<&'a [f32]>,
}

impl StepContext<'_> {
    pub fn progress(&self) -> f64 {
        if self.total_steps == 0 {
            0.0
        } else {
            self.step as f64 / self.total_steps as f64
        }
    }
}

/// d(loss)/d(W_dec) as the trainer holds it: its dense `[d_sae, d_in]` gradient, which
/// already holds the reconstruction's part when regularizers run. A regularizer adds
/// its rows in place (at d_sae = 16384 a separate buffer of rows, zeroed, filled and
/// then added by the trainer, cost as much as the self-correcting penalty's arithmetic)
/// and lists the latents whose rows it changed in `touched`: the trainer's later
/// passes over the decoder gradient (parallel-component removal, gradient norm) visit
/// only listed rows. Listing a latent twice is harmless.
pub struct DecoderGrad<'a> {
    pub d_in: usize,
    pub grad: &'a mut [f32],
    pub touched: &'a mut Vec<u32>,
}

impl DecoderGrad<'_> {
    /// Row `latent` of the gradient, listed as touched.
    pub fn row_mut(&mut self, latent: u32) -> &mut [f32] {
        self.touched.push(latent);
        let (l, d) = (latent as usize, self.d_in);
        &mut self.grad[l * d..(l + 1) * d]
    }
}

/// An owned dense decoder gradient and its touched list (tests, benchmarks, and any
/// caller outside the trainer): `view()` lends it as a [`DecoderGrad`].
#[derive(Clone, Debug, Default)]
pub struct DecoderGradBuf {
    pub d_in: usize,
    pub grad: Vec<f32>,
    pub touched: Vec<u32>,
}

impl DecoderGradBuf {
    pub fn zeros(d_sae: usize, d_in: usize) -> DecoderGradBuf {
        DecoderGradBuf {
            d_in,
            grad: vec![0.0; d_sae * d_in],
            touched: Vec::new(),
        }
    }

    pub fn view(&mut self) -> DecoderGrad<'_> {
        DecoderGrad {
            d_in: self.d_in,
            grad: &mut self.grad,
            touched: &mut self.touched,
        }
    }
}

/// A regularizer's contribution to one step.
#[derive(Default, Debug, Clone)]
pub struct PenaltyOut {
    /// The weighted penalty added to the loss.
    pub loss: f64,
    /// Named scalars for the metrics log (threshold, weight, pair counts, ...).
    pub metrics: Vec<(String, f64)>,
}

/// Adaptive per-latent gate: lets a method replace the architecture's activation rule
/// (Method 2's z-score thresholds). Returns, for a row of pre-activations, whether each
/// latent fires. Implementations keep their own statistics.
pub trait Gate: Send {
    fn name(&self) -> &str;
    /// Update statistics from a batch of pre-activations [rows, d_sae] and return the
    /// per-latent thresholds to use this step.
    fn thresholds(&mut self, pre: &[f32], rows: usize, d_sae: usize) -> &[f32];

    /// The per-latent thresholds an exported SAE applies in place of the gate: the
    /// trained rule as a JumpReLU on the pre-activation (`f = pre` where `pre >
    /// threshold`, else 0). `None` (the default) when the gate has no such form yet.
    fn inference_thresholds(&self) -> Option<Vec<f32>> {
        None
    }

    /// Internal state for checkpoints (default: stateless). Resume is bit-identical only
    /// if everything that influences later steps is saved here.
    fn save_state(&self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }

    /// Restore what [`Gate::save_state`] returned.
    fn load_state(&mut self, _bytes: &[u8]) -> Result<()> {
        Ok(())
    }
}

pub trait Regularizer: Send {
    fn name(&self) -> &str;

    /// Compute the penalty for this step. Add d(loss)/d(codes.val) into `grad_val`
    /// (aligned with `codes.val`), and d(loss)/d(W_dec rows) into `grad_dec`, listing
    /// the rows it changed.
    fn penalty(
        &mut self,
        ctx: &StepContext,
        codes: &SparseCodes,
        grad_val: &mut [f32],
        grad_dec: &mut DecoderGrad<'_>,
    ) -> Result<PenaltyOut>;

    /// Called after the optimizer step; may return latents to re-initialise.
    fn after_step(&mut self, _ctx: &StepContext, _codes: &SparseCodes) -> Result<Vec<u32>> {
        Ok(Vec::new())
    }

    /// Internal state for checkpoints (default: stateless). Resume is bit-identical only
    /// if everything that influences later steps is saved here.
    fn save_state(&self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }

    /// Restore what [`Regularizer::save_state`] returned.
    fn load_state(&mut self, _bytes: &[u8]) -> Result<()> {
        Ok(())
    }
}
