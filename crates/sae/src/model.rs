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

impl InferenceArch {
    pub const ALL: [InferenceArch; 4] = [
        InferenceArch::Standard,
        InferenceArch::Topk,
        InferenceArch::Jumprelu,
        InferenceArch::Gated,
    ];
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
        let xin = self.encoder_input(x, rows);
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

    /// The encoder's input: `x - b_dec` when the SAE subtracts it, else `x`.
    fn encoder_input<'a>(&self, x: &'a [f32], rows: usize) -> std::borrow::Cow<'a, [f32]> {
        let d = self.d_in;
        assert_eq!(x.len(), rows * d, "encode: input is not [rows, d_in]");
        if self.apply_b_dec_to_input {
            let mut v = x.to_vec();
            for row in v.chunks_exact_mut(d) {
                for (a, b) in row.iter_mut().zip(&self.b_dec) {
                    *a -= b;
                }
            }
            v.into()
        } else {
            x.into()
        }
    }

    /// Sparse codes of a batch [rows, d_in]. Indices within a row are ascending.
    pub fn encode(&self, x: &[f32], rows: usize) -> SparseCodes {
        use rayon::prelude::*;
        let f = self.d_sae;
        if self.arch == InferenceArch::Topk {
            // The trainer's tiled selection: the k largest positive pre-activations,
            // without a [rows, d_sae] matrix.
            let xin = self.encoder_input(x, rows);
            let w = MatRef::row_major(&self.w_enc, self.d_in, f);
            let sel = crate::kernels::encoder_topk(
                &xin,
                rows,
                w,
                &self.b_enc,
                self.k.min(f),
                0.0,
                &[],
                0,
                crate::config::MatmulPrecision::F32,
            );
            let mut codes = SparseCodes::with_capacity(rows, f, rows * self.k.max(1));
            for r in sel {
                codes.push_row(r.main.iter().map(|&(v, l)| (l, v)));
            }
            return codes;
        }
        let pre = self.pre_activations(x, rows);
        // Selection is per row: blocks of rows in parallel, joined in order.
        const BLOCK: usize = 64;
        let parts: Vec<SparseCodes> = pre
            .par_chunks(BLOCK * f)
            .map(|p| self.select_rows(p, p.len() / f))
            .collect();
        let mut codes = SparseCodes::with_capacity(rows, f, rows * self.k.max(1));
        for p in &parts {
            codes.append(p);
        }
        codes
    }

    /// The active latents of `rows` rows of pre-activations `pre` [rows, d_sae].
    fn select_rows(&self, pre: &[f32], rows: usize) -> SparseCodes {
        let f = self.d_sae;
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
                InferenceArch::Topk => unreachable!("TopK selects in `encode`"),
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
        use rayon::prelude::*;
        let d = self.d_in;
        let mut out = vec![0f32; codes.rows * d];
        out.par_chunks_exact_mut(d).enumerate().for_each(|(r, o)| {
            o.copy_from_slice(&self.b_dec);
            let (idx, val) = codes.row(r);
            for (&i, &v) in idx.iter().zip(val) {
                let w = &self.w_dec[i as usize * d..(i as usize + 1) * d];
                for (a, b) in o.iter_mut().zip(w) {
                    *a += v * b;
                }
            }
        });
        out
    }

    /// Encode then decode.
    pub fn forward(&self, x: &[f32], rows: usize) -> (SparseCodes, Vec<f32>) {
        let c = self.encode(x, rows);
        let y = self.decode(&c);
        (c, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tests::random_sae;
    use saelab_core::rng::Rng;

    /// Dense reference of the activation rule, straight from the definitions.
    fn dense_codes(sae: &Sae, x: &[f32], rows: usize) -> Vec<f32> {
        let (d, f) = (sae.d_in, sae.d_sae);
        let mut out = vec![0f32; rows * f];
        for r in 0..rows {
            let pre: Vec<f32> = (0..f)
                .map(|j| {
                    let mut s = 0f64;
                    for i in 0..d {
                        s += (x[r * d + i] - sae.b_dec[i]) as f64 * sae.w_enc[i * f + j] as f64;
                    }
                    s as f32
                })
                .collect();
            let o = &mut out[r * f..(r + 1) * f];
            match sae.arch {
                InferenceArch::Standard => {
                    for j in 0..f {
                        o[j] = (pre[j] + sae.b_enc[j]).max(0.0);
                    }
                }
                InferenceArch::Jumprelu => {
                    let th = sae.threshold.as_ref().unwrap();
                    for j in 0..f {
                        let p = pre[j] + sae.b_enc[j];
                        o[j] = if p > th[j] && p > 0.0 { p } else { 0.0 };
                    }
                }
                InferenceArch::Topk => {
                    let mut order: Vec<usize> = (0..f).collect();
                    let p: Vec<f32> = (0..f).map(|j| pre[j] + sae.b_enc[j]).collect();
                    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
                    for &j in &order[..sae.k] {
                        o[j] = p[j].max(0.0);
                    }
                }
                InferenceArch::Gated => {
                    let (bg, rm, bm) = (
                        sae.b_gate.as_ref().unwrap(),
                        sae.r_mag.as_ref().unwrap(),
                        sae.b_mag.as_ref().unwrap(),
                    );
                    for j in 0..f {
                        let mag = pre[j] * rm[j].exp() + bm[j];
                        o[j] = if pre[j] + bg[j] > 0.0 {
                            mag.max(0.0)
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
        out
    }

    #[test]
    fn encode_and_decode_match_dense_reference_across_row_blocks() {
        // 150 rows span three of encode's 64-row selection blocks (ReLU, JumpReLU, gated)
        // and two of the TopK encoder's 112-row GEMM tiles.
        let (d, f, rows) = (12, 40, 150);
        for (n, arch) in InferenceArch::ALL.into_iter().enumerate() {
            let sae = random_sae(arch, d, f, 10 + n as u64);
            let mut x = vec![0f32; rows * d];
            Rng::new(99).fill_normal(&mut x, 1.0);
            let codes = sae.encode(&x, rows);
            assert_eq!(codes.rows, rows);
            let got = codes.to_dense();
            let want = dense_codes(&sae, &x, rows);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{arch:?} {i}: {g} vs {w}"
                );
            }
            assert!(codes.nnz() > 0 && codes.nnz() < rows * f, "{arch:?}");
            for r in 0..rows {
                let (idx, _) = codes.row(r);
                assert!(
                    idx.windows(2).all(|w| w[0] < w[1]),
                    "{arch:?}: row {r} unsorted"
                );
            }
            // decode = dense codes times W_dec plus b_dec.
            let y = sae.decode(&codes);
            for r in 0..rows {
                for i in 0..d {
                    let mut s = sae.b_dec[i] as f64;
                    for j in 0..f {
                        s += got[r * f + j] as f64 * sae.w_dec[j * d + i] as f64;
                    }
                    let v = y[r * d + i];
                    assert!((v as f64 - s).abs() < 1e-3 * (1.0 + s.abs()), "{arch:?}");
                }
            }
        }
    }
}
