//! The inference form of an SAE, as SAELens stores it: `W_enc` [d_in, d_sae],
//! `b_enc` [d_sae], `W_dec` [d_sae, d_in], `b_dec` [d_in], plus `threshold` for
//! JumpReLU and the gate parameters for Gated. Every trained SAE is folded into this
//! form at save (normalisation scale, decoder norms), so a saved SAE takes raw
//! activations.

use crate::codes::SparseCodes;
use saelab_core::gemm::{gemm, MatMut, MatRef};
use serde::{Deserialize, Serialize};

/// The inference activation rule (SAELens `architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InferenceArch {
    /// ReLU.
    Standard,
    /// Top-k of the pre-activations, ReLU on the kept values.
    Topk,
    /// `pre * 1[pre > threshold_i]` (BatchTopK is saved as this with one threshold).
    Jumprelu,
    /// Gated SAE: `1[pi_gate > 0] * ReLU(pi_mag)`.
    Gated,
}

/// Where the SAE was trained (SAELens `metadata`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SaeMetadata {
    pub model_name: String,
    pub hook_name: String,
    pub context_size: usize,
    pub prepend_bos: bool,
    pub dataset_path: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Sae {
    pub arch: InferenceArch,
    pub d_in: usize,
    pub d_sae: usize,
    /// Top-k for `Topk`.
    pub k: usize,
    pub apply_b_dec_to_input: bool,
    pub w_enc: Vec<f32>,
    pub b_enc: Vec<f32>,
    pub w_dec: Vec<f32>,
    pub b_dec: Vec<f32>,
    /// JumpReLU thresholds [d_sae].
    pub threshold: Option<Vec<f32>>,
    /// Gated: gate bias, magnitude scale (log) and bias, each [d_sae]; `b_enc` unused.
    pub b_gate: Option<Vec<f32>>,
    pub r_mag: Option<Vec<f32>>,
    pub b_mag: Option<Vec<f32>>,
    pub metadata: SaeMetadata,
}

impl Sae {
    /// Pre-activations `(x - b_dec?) W_enc + b_enc`, [rows, d_sae].
    pub fn pre_activations(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (d, f) = (self.d_in, self.d_sae);
        assert_eq!(x.len(), rows * d, "encode: input is not [rows, d_in]");
        let xin: std::borrow::Cow<[f32]> = if self.apply_b_dec_to_input {
            let mut v = x.to_vec();
            for row in v.chunks_exact_mut(d) {
                for (a, b) in row.iter_mut().zip(&self.b_dec) {
                    *a -= b;
                }
            }
            v.into()
        } else {
            x.into()
        };
        let mut pre = vec![0f32; rows * f];
        let bias = if self.arch == InferenceArch::Gated {
            self.b_gate.as_ref().unwrap()
        } else {
            &self.b_enc
        };
        for row in pre.chunks_exact_mut(f) {
            row.copy_from_slice(bias);
        }
        gemm(
            1.0,
            MatRef::row_major(&xin, rows, d),
            MatRef::row_major(&self.w_enc, d, f),
            1.0,
            MatMut::row_major(&mut pre, rows, f),
        );
        pre
    }

    /// Sparse codes of a batch [rows, d_in].
    pub fn encode(&self, x: &[f32], rows: usize) -> SparseCodes {
        let f = self.d_sae;
        let pre = self.pre_activations(x, rows);
        let mut codes = SparseCodes::with_capacity(rows, f, rows * self.k.max(1));
        let mut scratch: Vec<(u32, f32)> = Vec::with_capacity(f);
        for r in 0..rows {
            let p = &pre[r * f..(r + 1) * f];
            scratch.clear();
            match self.arch {
                InferenceArch::Standard => scratch.extend(
                    p.iter()
                        .enumerate()
                        .filter(|(_, v)| **v > 0.0)
                        .map(|(i, v)| (i as u32, *v)),
                ),
                InferenceArch::Jumprelu => {
                    let th = self
                        .threshold
                        .as_ref()
                        .expect("jumprelu SAE without threshold");
                    scratch.extend(
                        p.iter()
                            .enumerate()
                            .filter(|(i, v)| **v > th[*i] && **v > 0.0)
                            .map(|(i, v)| (i as u32, *v)),
                    )
                }
                InferenceArch::Topk => {
                    scratch.extend(p.iter().enumerate().map(|(i, v)| (i as u32, *v)));
                    let k = self.k.min(f);
                    if k < scratch.len() {
                        scratch.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
                        scratch.truncate(k);
                    }
                    scratch.retain(|e| e.1 > 0.0);
                }
                InferenceArch::Gated => {
                    // p holds the gate pre-activations; magnitudes reuse the same matmul
                    // scaled by exp(r_mag) (x W_enc = p - b_gate).
                    let (bg, rm, bm) = (
                        self.b_gate.as_ref().unwrap(),
                        self.r_mag.as_ref().unwrap(),
                        self.b_mag.as_ref().unwrap(),
                    );
                    for i in 0..f {
                        if p[i] > 0.0 {
                            let mag = (p[i] - bg[i]) * rm[i].exp() + bm[i];
                            if mag > 0.0 {
                                scratch.push((i as u32, mag));
                            }
                        }
                    }
                }
            }
            scratch.sort_unstable_by_key(|e| e.0);
            codes.push_row(scratch.iter().copied());
        }
        codes
    }

    /// Reconstruction `codes W_dec + b_dec`, [rows, d_in], touching only active rows.
    pub fn decode(&self, codes: &SparseCodes) -> Vec<f32> {
        let d = self.d_in;
        let mut out = vec![0f32; codes.rows * d];
        for (r, o) in out.chunks_exact_mut(d).enumerate() {
            o.copy_from_slice(&self.b_dec);
            let (idx, val) = codes.row(r);
            for (&i, &v) in idx.iter().zip(val) {
                let w = &self.w_dec[i as usize * d..(i as usize + 1) * d];
                for (a, b) in o.iter_mut().zip(w) {
                    *a += v * b;
                }
            }
        }
        out
    }

    /// Encode then decode.
    pub fn forward(&self, x: &[f32], rows: usize) -> (SparseCodes, Vec<f32>) {
        let c = self.encode(x, rows);
        let y = self.decode(&c);
        (c, y)
    }
}
