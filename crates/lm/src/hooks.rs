//! Hook points (`blocks.{L}.hook_resid_pre`, ... in SAELens/TransformerLens naming) and the
//! actions a forward applies at them: capture a copy, replace in place with a function of
//! the activation, or zero it.
//!
//! Semantics per layer L, in forward order:
//! - `resid_pre`: the residual stream entering block L (after the embedding for L = 0);
//! - `attn_out`: what the attention sub-block adds to the residual (after o_proj, and after
//!   the post-attention norm for Gemma-2);
//! - `mlp_out`: what the MLP sub-block adds to the residual (after Gemma-2's post-FFN norm);
//! - `resid_post`: the residual stream leaving block L (= `resid_pre` of L + 1).
//!
//! Several actions at one point run in the order they were registered, so a capture
//! registered after a replace sees the replaced value.

use anyhow::{bail, Result};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookKind {
    ResidPre,
    AttnOut,
    MlpOut,
    ResidPost,
}

impl HookKind {
    pub const ALL: [HookKind; 4] = [
        HookKind::ResidPre,
        HookKind::AttnOut,
        HookKind::MlpOut,
        HookKind::ResidPost,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            HookKind::ResidPre => "hook_resid_pre",
            HookKind::AttnOut => "hook_attn_out",
            HookKind::MlpOut => "hook_mlp_out",
            HookKind::ResidPost => "hook_resid_post",
        }
    }
}

/// A hook point: a layer and a kind. Displays and parses as `blocks.12.hook_resid_post`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HookPoint {
    pub layer: usize,
    pub kind: HookKind,
}

impl HookPoint {
    pub fn new(layer: usize, kind: HookKind) -> Self {
        HookPoint { layer, kind }
    }

    /// Parse and check the layer against a model with `n_layers` blocks.
    pub fn parse_for(name: &str, n_layers: usize) -> Result<HookPoint> {
        let hp: HookPoint = name.parse()?;
        hp.check(n_layers)?;
        Ok(hp)
    }

    /// Error if the layer does not exist in a model with `n_layers` blocks.
    pub fn check(&self, n_layers: usize) -> Result<()> {
        if self.layer >= n_layers {
            bail!(
                "hook point {self}: layer {} does not exist; this model has layers 0..{} (valid names: blocks.0.hook_resid_pre .. blocks.{}.hook_resid_post)",
                self.layer,
                n_layers.saturating_sub(1),
                n_layers.saturating_sub(1)
            );
        }
        Ok(())
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blocks.{}.{}", self.layer, self.kind.suffix())
    }
}

impl FromStr for HookPoint {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<HookPoint> {
        let valid = "valid names are blocks.{L}.hook_resid_pre, blocks.{L}.hook_attn_out, blocks.{L}.hook_mlp_out, blocks.{L}.hook_resid_post";
        let rest = s.strip_prefix("blocks.");
        let parsed = rest
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, suffix)| {
                let layer = l.parse::<usize>().ok()?;
                let kind = HookKind::ALL.into_iter().find(|k| k.suffix() == suffix)?;
                Some(HookPoint { layer, kind })
            });
        match parsed {
            Some(hp) => Ok(hp),
            None => bail!("unknown hook point {s:?}: {valid}"),
        }
    }
}

/// A replacement function: `f(act /*[rows, d]*/, rows, d)` edits the activation in place.
pub type ReplaceFn<'a> = Box<dyn FnMut(&mut [f32], usize, usize) + 'a>;

/// What to do at a hook point.
pub(crate) enum Action<'a> {
    Capture,
    Zero,
    Replace(ReplaceFn<'a>),
}

/// Hook actions for one forward call.
pub struct Hooks<'a> {
    pub(crate) actions: Vec<(HookPoint, Action<'a>)>,
    pub(crate) logits: bool,
}

impl Default for Hooks<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> Hooks<'a> {
    /// No hooks; logits computed.
    pub fn new() -> Self {
        Hooks {
            actions: Vec::new(),
            logits: true,
        }
    }

    /// Record a copy of the activation at `hp` into `ForwardOutput::captured`.
    pub fn capture(mut self, hp: HookPoint) -> Self {
        self.actions.push((hp, Action::Capture));
        self
    }

    /// Replace the activation at `hp` in place: `f(act /*[rows, d]*/, rows, d)`.
    pub fn replace(mut self, hp: HookPoint, f: impl FnMut(&mut [f32], usize, usize) + 'a) -> Self {
        self.actions.push((hp, Action::Replace(Box::new(f))));
        self
    }

    /// Set the activation at `hp` to zero (zero ablation).
    pub fn zero(mut self, hp: HookPoint) -> Self {
        self.actions.push((hp, Action::Zero));
        self
    }

    /// Whether to compute logits (default true). With `false` the forward stops after the
    /// last layer that has a hook.
    pub fn logits(mut self, on: bool) -> Self {
        self.logits = on;
        self
    }

    /// Check every hook point against a model with `n_layers` blocks.
    pub(crate) fn check(&self, n_layers: usize) -> Result<()> {
        for (hp, _) in &self.actions {
            hp.check(n_layers)?;
        }
        Ok(())
    }

    pub(crate) fn any_at(&self, layer: usize, kind: HookKind) -> bool {
        self.actions
            .iter()
            .any(|(hp, _)| hp.layer == layer && hp.kind == kind)
    }

    /// Run all actions registered at `hp` on `act` ([rows, d]).
    pub(crate) fn apply(
        &mut self,
        hp: HookPoint,
        act: &mut [f32],
        rows: usize,
        d: usize,
        captured: &mut HashMap<HookPoint, Vec<f32>>,
    ) {
        for (p, a) in self.actions.iter_mut() {
            if *p != hp {
                continue;
            }
            match a {
                Action::Capture => {
                    captured.insert(hp, act.to_vec());
                }
                Action::Zero => act.fill(0.0),
                Action::Replace(f) => f(act, rows, d),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_errors_are_clear() {
        for kind in HookKind::ALL {
            let hp = HookPoint::new(12, kind);
            let s = hp.to_string();
            assert_eq!(s.parse::<HookPoint>().unwrap(), hp);
        }
        assert_eq!(
            HookPoint::new(3, HookKind::ResidPost).to_string(),
            "blocks.3.hook_resid_post"
        );
        let e = "blocks.3.hook_resid_mid"
            .parse::<HookPoint>()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hook_resid_mid") && e.contains("hook_resid_pre"),
            "{e}"
        );
        let e = "layer3".parse::<HookPoint>().unwrap_err().to_string();
        assert!(e.contains("valid names"), "{e}");
        let e = HookPoint::parse_for("blocks.30.hook_resid_pre", 30)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layers 0..29"), "{e}");
        assert!(HookPoint::parse_for("blocks.29.hook_mlp_out", 30).is_ok());
    }
}
