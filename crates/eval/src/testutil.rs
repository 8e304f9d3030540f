//! Helpers shared by the unit tests.

use saelab_core::rng::Rng;
use saelab_sae::model::{InferenceArch, Sae, SaeMetadata};

/// A random ReLU SAE (b_dec = 0.1 everywhere).
pub fn random_sae(d: usize, f: usize, seed: u64) -> Sae {
    let mut r = Rng::new(seed);
    let mut w_enc = vec![0f32; d * f];
    r.fill_normal(&mut w_enc, 0.5);
    let mut w_dec = vec![0f32; f * d];
    r.fill_normal(&mut w_dec, 0.5);
    let mut b_enc = vec![0f32; f];
    r.fill_normal(&mut b_enc, 0.1);
    Sae {
        arch: InferenceArch::Standard,
        d_in: d,
        d_sae: f,
        k: 0,
        apply_b_dec_to_input: false,
        w_enc,
        b_enc,
        w_dec,
        b_dec: vec![0.1; d],
        threshold: None,
        b_gate: None,
        r_mag: None,
        b_mag: None,
        metadata: SaeMetadata::default(),
    }
}
