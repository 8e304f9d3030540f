//! The bridge between the evaluations' small LM trait (`saelab_eval::lm_api::HookedLm`)
//! and the real model (`saelab_lm::Model`). Lives here because this is the first crate
//! that depends on both.

use anyhow::{anyhow, Result};
use saelab_eval::lm_api::HookedLm;
use saelab_lm::{HookPoint, Hooks, Model};

pub struct LmAdapter<'a> {
    pub model: &'a Model,
}

impl LmAdapter<'_> {
    fn hook(&self, name: &str) -> Result<HookPoint> {
        HookPoint::parse_for(name, self.model.config().n_layers)
    }
}

impl HookedLm for LmAdapter<'_> {
    fn name(&self) -> String {
        self.model.config().name.clone()
    }
    fn d_model(&self) -> usize {
        self.model.config().d_model
    }
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.model.tokenizer().encode(text)
    }
    fn token_text(&self, id: u32) -> String {
        self.model.tokenizer().token_text(id)
    }
    fn bos_id(&self) -> Option<u32> {
        self.model.tokenizer().bos_id()
    }
    fn eos_id(&self) -> Option<u32> {
        self.model.tokenizer().eos_id()
    }
    fn pad_id(&self) -> Option<u32> {
        self.model.tokenizer().pad_id()
    }
    fn capture(&self, tokens: &[u32], batch: usize, seq: usize, hook: &str) -> Result<Vec<f32>> {
        let hp = self.hook(hook)?;
        let mut hooks = Hooks::new().capture(hp).logits(false);
        let mut out = self.model.forward(tokens, batch, seq, &mut hooks)?;
        out.captured.remove(&hp).ok_or_else(|| anyhow!("the forward did not capture {hook}"))
    }
    fn logits_and_capture(&self, tokens: &[u32], batch: usize, seq: usize, hook: &str) -> Result<(Vec<f32>, Vec<f32>)> {
        let hp = self.hook(hook)?;
        let mut hooks = Hooks::new().capture(hp).logits(true);
        let mut out = self.model.forward(tokens, batch, seq, &mut hooks)?;
        let acts = out.captured.remove(&hp).ok_or_else(|| anyhow!("the forward did not capture {hook}"))?;
        let logits = out.logits.ok_or_else(|| anyhow!("the forward returned no logits"))?;
        Ok((logits, acts))
    }
    fn logits_with_edit(
        &self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        hook: &str,
        edit: &mut dyn FnMut(&mut [f32], usize, usize),
    ) -> Result<Vec<f32>> {
        let hp = self.hook(hook)?;
        let mut hooks = Hooks::new().replace(hp, |a: &mut [f32], r, d| edit(a, r, d)).logits(true);
        let out = self.model.forward(tokens, batch, seq, &mut hooks)?;
        out.logits.ok_or_else(|| anyhow!("the forward returned no logits"))
    }
}
