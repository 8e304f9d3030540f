//! Helpers shared by the unit tests.

use crate::lm_api::{HookedLm, ToyLm};
use anyhow::Result;
use saelab_core::rng::Rng;
use saelab_sae::model::{InferenceArch, Sae, SaeMetadata};
use std::cell::Cell;

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

/// The identity as a ReLU SAE: latents `[relu(x), relu(-x)]`, decoder `[I; -I]`.
pub fn identity_sae(d: usize) -> Sae {
    let f = 2 * d;
    let mut w_enc = vec![0f32; d * f];
    let mut w_dec = vec![0f32; f * d];
    for i in 0..d {
        w_enc[i * f + i] = 1.0;
        w_enc[i * f + d + i] = -1.0;
        w_dec[i * d + i] = 1.0;
        w_dec[(d + i) * d + i] = -1.0;
    }
    let mut s = random_sae(d, f, 0);
    s.w_enc = w_enc;
    s.w_dec = w_dec;
    s.b_enc = vec![0.0; f];
    s.b_dec = vec![0.0; d];
    s
}

/// Words for the toy LM: 20 per letter a..z, deterministic.
pub fn toy_words() -> Vec<String> {
    let mut r = Rng::new(77);
    let mut out = Vec::new();
    for l in b'a'..=b'z' {
        for _ in 0..20 {
            let len = 3 + r.below(4);
            let mut w = String::new();
            w.push(l as char);
            for _ in 1..len {
                w.push((b'a' + r.below(26) as u8) as char);
            }
            if !out.contains(&w) {
                out.push(w);
            }
        }
    }
    out
}

/// `n` texts of 5..25 random words from `words`.
pub fn toy_texts(words: &[String], n: usize, seed: u64) -> Vec<String> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|_| {
            let len = 5 + r.below(20);
            (0..len)
                .map(|_| words[r.below(words.len())].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Counts the token positions the LM is run on.
pub struct Counting<'a> {
    pub inner: &'a ToyLm,
    pub tokens: Cell<usize>,
}

impl HookedLm for Counting<'_> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn d_model(&self) -> usize {
        self.inner.d_model()
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner.encode(text)
    }
    fn token_text(&self, id: u32) -> String {
        self.inner.token_text(id)
    }
    fn bos_id(&self) -> Option<u32> {
        self.inner.bos_id()
    }
    fn eos_id(&self) -> Option<u32> {
        self.inner.eos_id()
    }
    fn pad_id(&self) -> Option<u32> {
        self.inner.pad_id()
    }
    fn capture(&self, t: &[u32], b: usize, s: usize, h: &str) -> Result<Vec<f32>> {
        self.tokens.set(self.tokens.get() + t.len());
        self.inner.capture(t, b, s, h)
    }
    fn logits_with_edit(
        &self,
        t: &[u32],
        b: usize,
        s: usize,
        h: &str,
        e: &mut dyn FnMut(&mut [f32], usize, usize),
    ) -> Result<Vec<f32>> {
        self.tokens.set(self.tokens.get() + t.len());
        self.inner.logits_with_edit(t, b, s, h, e)
    }
}
