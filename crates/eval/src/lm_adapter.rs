//! [`HookedLm`] for `saelab_lm::Model`: hook names are parsed as `HookPoint`s, capture
//! runs stop after the hook (`logits(false)`), edits are `Hooks::replace`, and edits of a
//! known residual-stream activation resume the forward there (`Model::forward_from`).

use crate::lm_api::{logits_substituting, HookedLm};
use anyhow::{Context, Result};
use saelab_lm::{HookKind, HookPoint, Hooks, Model};
use std::str::FromStr;

fn hook_point(hook: &str) -> Result<HookPoint> {
    HookPoint::from_str(hook).with_context(|| format!("invalid hook point '{hook}'"))
}

impl HookedLm for Model {
    fn name(&self) -> String {
        self.name_with_precision()
    }
    fn d_model(&self) -> usize {
        self.config().d_model
    }
    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer().encode(text)
    }
    fn token_text(&self, id: u32) -> String {
        self.tokenizer().token_text(id)
    }
    fn bos_id(&self) -> Option<u32> {
        self.tokenizer().bos_id()
    }
    fn eos_id(&self) -> Option<u32> {
        self.tokenizer().eos_id()
    }
    fn pad_id(&self) -> Option<u32> {
        self.tokenizer().pad_id()
    }
    fn capture(&self, tokens: &[u32], batch: usize, seq: usize, hook: &str) -> Result<Vec<f32>> {
        let hp = hook_point(hook)?;
        let mut hooks = Hooks::new().capture(hp).logits(false);
        let mut out = self.forward(tokens, batch, seq, &mut hooks)?;
        out.captured
            .remove(&hp)
            .context("the LM did not capture the hook activation")
    }
    fn logits_with_edit(
        &self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        hook: &str,
        edit: &mut dyn FnMut(&mut [f32], usize, usize),
    ) -> Result<Vec<f32>> {
        let hp = hook_point(hook)?;
        let mut hooks = Hooks::new().replace(hp, edit).logits(true);
        let out = self.forward(tokens, batch, seq, &mut hooks)?;
        out.logits.context("the LM returned no logits")
    }
    fn logits_from_activation(
        &self,
        tokens: &[u32],
        batch: usize,
        seq: usize,
        hook: &str,
        act: &[f32],
        edit: &mut dyn FnMut(&mut [f32], usize, usize),
    ) -> Result<Vec<f32>> {
        let hp = hook_point(hook)?;
        if !matches!(hp.kind, HookKind::ResidPre | HookKind::ResidPost) {
            // attn_out / mlp_out are not the residual stream: no resume point.
            return logits_substituting(self, tokens, batch, seq, hook, act, edit);
        }
        let mut hooks = Hooks::new().replace(hp, edit).logits(true);
        let out = self.forward_from(hp, act, tokens, batch, seq, &mut hooks)?;
        out.logits.context("the LM returned no logits")
    }
}
