//! What the evaluations need from a language model, as a small trait.
//!
//! The evaluations only ever (a) tokenize text, (b) read the activation at one hook
//! point, and (c) run the model to logits with that hook's activation rewritten. The
//! [`HookedLm`] trait names exactly that, so the evaluation code is independent of the
//! LM implementation: `saelab_lm::Model` implements it through an adapter, and the
//! tests use [`ToyLm`], a tiny deterministic model.
//!
//! Adapter sketch for `saelab_lm::Model` (hooks are "blocks.L.hook_resid_post" strings
//! parsed with `HookPoint::from_str`): `capture` = `forward` with
//! `Hooks::new().capture(hp).logits(false)`, taking `captured[&hp]`;
//! `logits_with_edit` = `Hooks::new().replace(hp, edit).logits(true)`;
//! `logits_from_activation` = `Model::forward_from` at residual-stream hooks.

use anyhow::{bail, Result};
use saelab_core::rng::Rng;
use std::collections::HashMap;

/// An in-place edit of a hook activation: `edit(act [rows, d], rows, d)`.
pub type EditFn<'a> = dyn FnMut(&mut [f32], usize, usize) + 'a;

/// A language model with one readable/writable hook point per call.
pub trait HookedLm {
    /// Model name (goes into cache keys and result files).
    fn name(&self) -> String;
    fn d_model(&self) -> usize;
    fn vocab_size(&self) -> usize;
    /// Token ids of `text`, without BOS.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Decoded text of one token (e.g. " cat").
    fn token_text(&self, id: u32) -> String;
    fn bos_id(&self) -> Option<u32>;
    fn eos_id(&self) -> Option<u32>;
    fn pad_id(&self) -> Option<u32>;
    /// Activation at `hook` for `tokens` [batch, seq]: [batch * seq, d_model].
    fn capture(&self, tokens: &[u32], batch: usize, seq: usize, hook: &str) -> Result<Vec<f32>>;
    /// Logits [batch * seq, vocab] with the activation at `hook` rewritten in place by
    /// `edit(act [rows, d], rows, d)` before the rest of the forward.
    fn logits_with_edit(
        &self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        hook: &str,
        edit: &mut dyn FnMut(&mut [f32], usize, usize),
    ) -> Result<Vec<f32>>;

    /// [`HookedLm::logits_with_edit`] for tokens whose activation at `hook` is already
    /// known (`act`, [batch * seq, d], e.g. from a cache): the edit sees a copy of `act`.
    /// Models that can resume a forward mid-way run only the part after `hook`; the
    /// default runs the whole forward and substitutes `act` at the hook.
    fn logits_from_activation(
        &self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        hook: &str,
        act: &[f32],
        edit: &mut dyn FnMut(&mut [f32], usize, usize),
    ) -> Result<Vec<f32>> {
        logits_substituting(self, tokens, batch, seq, hook, act, edit)
    }

    /// Token ids SAEBench ignores: pad, eos, bos.
    fn ignored_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = [self.pad_id(), self.eos_id(), self.bos_id()]
            .into_iter()
            .flatten()
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The id used to right-pad rows (pad, else eos, else bos, else 0).
    fn fill_id(&self) -> u32 {
        self.pad_id()
            .or(self.eos_id())
            .or(self.bos_id())
            .unwrap_or(0)
    }
}

/// The whole forward with `act` substituted at `hook`, then `edit`: the default of
/// [`HookedLm::logits_from_activation`], for models (or hooks) that cannot resume.
pub fn logits_substituting<L: HookedLm + ?Sized>(
    lm: &L,
    tokens: &[u32],
    batch: usize,
    seq: usize,
    hook: &str,
    act: &[f32],
    edit: &mut dyn FnMut(&mut [f32], usize, usize),
) -> Result<Vec<f32>> {
    if act.len() != batch * seq * lm.d_model() {
        bail!(
            "{} activation values given for a [{batch}, {seq}, {}] batch",
            act.len(),
            lm.d_model()
        );
    }
    lm.logits_with_edit(tokens, batch, seq, hook, &mut |h, rows, d| {
        h.copy_from_slice(act);
        edit(h, rows, d)
    })
}

/// Every evaluation's first check: the SAE reads activations as wide as the model's.
pub fn check_sae_width(sae: &saelab_sae::model::Sae, lm: &dyn HookedLm, hook: &str) -> Result<()> {
    if sae.d_in != lm.d_model() {
        bail!(
            "SAE d_in {} differs from the model width {} at {hook}",
            sae.d_in,
            lm.d_model()
        );
    }
    Ok(())
}

/// A tiny deterministic LM for tests and examples.
///
/// Vocabulary: `<bos>`, `<eos>`, `<pad>`, the 256 single bytes, then whole words given
/// at construction (each with and without a leading space). Tokenization is greedy
/// longest match. Layer 0's residual is `E[tok] + mean_{s<=t} E[tok_s]` (a causal
/// context mix); layer `l > 0` adds `0.5 tanh(h A_l)`. Logits are `h_last W_out`.
/// Embeddings of words carry a direction per first letter, so first-letter
/// information is linearly present, as in a real LM.
pub struct ToyLm {
    pub d: usize,
    pub n_layers: usize,
    vocab: Vec<String>,
    lookup: HashMap<String, u32>,
    max_len: usize,
    emb: Vec<f32>,
    mix: Vec<Vec<f32>>,
    w_out: Vec<f32>,
}

impl ToyLm {
    pub const BOS: u32 = 0;
    pub const EOS: u32 = 1;
    pub const PAD: u32 = 2;

    pub fn new(words: &[&str], d: usize, n_layers: usize, seed: u64) -> Self {
        let mut vocab: Vec<String> = vec!["<bos>".into(), "<eos>".into(), "<pad>".into()];
        for b in 0u8..=255 {
            vocab.push(String::from_utf8_lossy(&[b]).into_owned());
        }
        for w in words {
            for v in [w.to_string(), format!(" {w}")] {
                if !vocab.contains(&v) {
                    vocab.push(v);
                }
            }
        }
        let mut lookup = HashMap::new();
        for (i, t) in vocab.iter().enumerate().skip(3) {
            // Byte tokens that are not valid UTF-8 on their own decode to U+FFFD; keep
            // the first spelling only.
            lookup.entry(t.clone()).or_insert(i as u32);
        }
        let max_len = vocab.iter().map(|t| t.len()).max().unwrap_or(1);
        let v = vocab.len();
        let mut rng = Rng::new(seed);
        let mut letter = vec![0f32; 26 * d];
        rng.fill_normal(&mut letter, 1.0);
        let mut emb = vec![0f32; v * d];
        rng.fill_normal(&mut emb, 0.5);
        for (i, t) in vocab.iter().enumerate() {
            let s = t.trim_start_matches(' ');
            if s.len() > 1 && s.chars().all(|c| c.is_ascii_alphabetic()) {
                let l = (s.as_bytes()[0].to_ascii_lowercase() - b'a') as usize;
                for j in 0..d {
                    emb[i * d + j] += 3.0 * letter[l * d + j];
                }
            }
        }
        let mix = (0..n_layers.saturating_sub(1))
            .map(|_| {
                let mut a = vec![0f32; d * d];
                rng.fill_normal(&mut a, 1.0 / (d as f32).sqrt());
                a
            })
            .collect();
        let mut w_out = vec![0f32; d * v];
        rng.fill_normal(&mut w_out, 1.0 / (d as f32).sqrt());
        ToyLm {
            d,
            n_layers,
            vocab,
            lookup,
            max_len,
            emb,
            mix,
            w_out,
        }
    }

    fn parse_hook(&self, hook: &str) -> Result<usize> {
        let layer = hook
            .strip_prefix("blocks.")
            .and_then(|r| r.strip_suffix(".hook_resid_post"))
            .and_then(|l| l.parse::<usize>().ok());
        match layer {
            Some(l) if l < self.n_layers => Ok(l),
            _ => bail!(
                "toy LM: unknown hook point '{hook}' (have blocks.0..{}.hook_resid_post)",
                self.n_layers
            ),
        }
    }

    fn layer(&self, l: usize, h: &mut [f32], tokens: &[u32], batch: usize, seq: usize) {
        let d = self.d;
        if l == 0 {
            for b in 0..batch {
                let mut run = vec![0f32; d];
                for t in 0..seq {
                    let tok = tokens[b * seq + t] as usize;
                    let e = &self.emb[tok * d..(tok + 1) * d];
                    for j in 0..d {
                        run[j] += e[j];
                    }
                    let row = &mut h[(b * seq + t) * d..(b * seq + t + 1) * d];
                    for j in 0..d {
                        row[j] = e[j] + run[j] / (t + 1) as f32;
                    }
                }
            }
        } else {
            let a = &self.mix[l - 1];
            for row in h.chunks_exact_mut(d) {
                let old = row.to_vec();
                for j in 0..d {
                    let s: f32 = (0..d).map(|i| old[i] * a[i * d + j]).sum();
                    row[j] = old[j] + 0.5 * s.tanh();
                }
            }
        }
    }

    fn run(
        &self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        hook: &str,
        edit: Option<&mut EditFn>,
        logits: bool,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        if tokens.len() != batch * seq {
            bail!(
                "toy LM: {} tokens for a [{batch}, {seq}] batch",
                tokens.len()
            );
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.vocab.len()) {
            bail!("toy LM: token id {t} out of range");
        }
        let hl = self.parse_hook(hook)?;
        let (d, rows) = (self.d, batch * seq);
        let mut h = vec![0f32; rows * d];
        let mut captured = Vec::new();
        let mut edit = edit;
        for l in 0..self.n_layers {
            self.layer(l, &mut h, tokens, batch, seq);
            if l == hl {
                captured = h.clone();
                if let Some(e) = edit.as_mut() {
                    e(&mut h, rows, d);
                }
                if !logits {
                    return Ok((Vec::new(), captured));
                }
            }
        }
        let v = self.vocab.len();
        let mut out = vec![0f32; rows * v];
        saelab_core::gemm::gemm(
            1.0,
            saelab_core::gemm::MatRef::row_major(&h, rows, d),
            saelab_core::gemm::MatRef::row_major(&self.w_out, d, v),
            0.0,
            saelab_core::gemm::MatMut::row_major(&mut out, rows, v),
        );
        Ok((out, captured))
    }
}

impl HookedLm for ToyLm {
    fn name(&self) -> String {
        format!(
            "toy-lm-d{}-l{}-v{}",
            self.d,
            self.n_layers,
            self.vocab.len()
        )
    }
    fn d_model(&self) -> usize {
        self.d
    }
    fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let mut found = None;
            for len in (1..=self.max_len.min(bytes.len() - i)).rev() {
                if let Ok(s) = std::str::from_utf8(&bytes[i..i + len]) {
                    if let Some(&id) = self.lookup.get(s) {
                        found = Some((id, len));
                        break;
                    }
                }
            }
            match found {
                Some((id, len)) => {
                    out.push(id);
                    i += len;
                }
                None => {
                    out.push(3 + bytes[i] as u32);
                    i += 1;
                }
            }
        }
        Ok(out)
    }
    fn token_text(&self, id: u32) -> String {
        match self.vocab.get(id as usize) {
            Some(_) if id < 3 => String::new(),
            Some(t) => t.clone(),
            None => String::new(),
        }
    }
    fn bos_id(&self) -> Option<u32> {
        Some(Self::BOS)
    }
    fn eos_id(&self) -> Option<u32> {
        Some(Self::EOS)
    }
    fn pad_id(&self) -> Option<u32> {
        Some(Self::PAD)
    }
    fn capture(&self, tokens: &[u32], batch: usize, seq: usize, hook: &str) -> Result<Vec<f32>> {
        Ok(self.run(tokens, batch, seq, hook, None, false)?.1)
    }
    fn logits_with_edit(
        &self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        hook: &str,
        edit: &mut dyn FnMut(&mut [f32], usize, usize),
    ) -> Result<Vec<f32>> {
        Ok(self.run(tokens, batch, seq, hook, Some(edit), true)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toy_lm_tokenizes_and_is_causal() {
        let lm = ToyLm::new(&["cat", "dog", "has"], 8, 2, 1);
        let ids = lm.encode("cat has dog!").unwrap();
        let texts: Vec<String> = ids.iter().map(|&i| lm.token_text(i)).collect();
        assert_eq!(texts, vec!["cat", " has", " dog", "!"]);
        let a = lm.capture(&ids, 1, 4, "blocks.1.hook_resid_post").unwrap();
        let mut ids2 = ids.clone();
        ids2[3] = lm.encode("?").unwrap()[0];
        let b = lm.capture(&ids2, 1, 4, "blocks.1.hook_resid_post").unwrap();
        assert_eq!(
            a[..3 * 8],
            b[..3 * 8],
            "earlier positions must not see later tokens"
        );
        assert_ne!(a[3 * 8..], b[3 * 8..]);
        assert!(lm.capture(&ids, 1, 4, "blocks.2.hook_resid_post").is_err());
        // An identity edit leaves the logits unchanged; zeroing changes them.
        let hook = "blocks.0.hook_resid_post";
        let clean = lm
            .logits_with_edit(&ids, 1, 4, hook, &mut |_, _, _| {})
            .unwrap();
        // Logits from a known activation: the true one gives the clean logits; a
        // different one is really substituted.
        let cap = lm.capture(&ids, 1, 4, hook).unwrap();
        let from = lm
            .logits_from_activation(&ids, 1, 4, hook, &cap, &mut |_, _, _| {})
            .unwrap();
        assert_eq!(clean, from);
        let halved: Vec<f32> = cap.iter().map(|x| x * 0.5).collect();
        let from_halved = lm
            .logits_from_activation(&ids, 1, 4, hook, &halved, &mut |_, _, _| {})
            .unwrap();
        let edited = lm
            .logits_with_edit(&ids, 1, 4, hook, &mut |h, _, _| {
                h.iter_mut().for_each(|x| *x *= 0.5)
            })
            .unwrap();
        assert_eq!(from_halved, edited);
        assert_ne!(from_halved, clean);
        assert!(lm
            .logits_from_activation(&ids, 1, 4, hook, &cap[1..], &mut |_, _, _| {})
            .is_err());
        let zero = lm
            .logits_with_edit(&ids, 1, 4, "blocks.0.hook_resid_post", &mut |h, _, _| {
                h.fill(0.0)
            })
            .unwrap();
        assert_ne!(clean, zero);
    }
}
