//! Schedules of Method 1 (progressive sparsity-guided orthogonality) as configuration
//! values: every schedule the research log tried is a variant here, so an experiment
//! changes a TOML table, not code.
//!
//! TOML form (internally tagged by `kind`):
//! `threshold = { kind = "power", base = 0.9, exponent = 0.5 }`,
//! `weight = { kind = "cosine", max = 0.2 }`.
//! `p = step / total_steps` is the training progress in [0, 1].

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The co-firing threshold `thr(p)`; every variant's value is floored at `floor`
/// (applied by [`ThresholdSchedule::value`], default 1e-3 as in the research).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ThresholdSchedule {
    /// `value` for every p (the static control).
    Constant { value: f64 },
    /// `base * (1 - p)` (the research's default).
    Linear { base: f64 },
    /// `base * (1 - p)^exponent` (research: exponents 0.5 and 0.3).
    Power { base: f64, exponent: f64 },
    /// `base * (1 - p^exponent)` (research: exponents 0.5 and 1.5).
    OneMinusPower { base: f64, exponent: f64 },
    /// `base * rate^p` (research: `0.9^p`, i.e. base 1, rate 0.9).
    Exponential { base: f64, rate: f64 },
    /// `base * (1 - slope * p)` until it reaches the floor, then the floor
    /// (research: `0.9 (1 - 2p)` then 1e-3, i.e. base 0.9, slope 2).
    StepWise { base: f64, slope: f64 },
}

impl ThresholdSchedule {
    /// The raw schedule value before flooring.
    fn raw(&self, p: f64) -> f64 {
        let p = p.clamp(0.0, 1.0);
        match *self {
            ThresholdSchedule::Constant { value } => value,
            ThresholdSchedule::Linear { base } => base * (1.0 - p),
            ThresholdSchedule::Power { base, exponent } => base * (1.0 - p).powf(exponent),
            ThresholdSchedule::OneMinusPower { base, exponent } => base * (1.0 - p.powf(exponent)),
            ThresholdSchedule::Exponential { base, rate } => base * rate.powf(p),
            ThresholdSchedule::StepWise { base, slope } => base * (1.0 - slope * p),
        }
    }

    /// `thr(p)`, floored at `floor` (so `c_ij`'s division never blows up).
    pub fn value(&self, p: f64, floor: f64) -> f64 {
        self.raw(p).max(floor)
    }

    pub fn validate(&self) -> Result<()> {
        let in_unit = |name: &str, v: f64| -> Result<()> {
            if !(v > 0.0 && v <= 1.0) {
                bail!("threshold schedule: {name} = {v} must lie in (0, 1]");
            }
            Ok(())
        };
        let positive = |name: &str, v: f64| -> Result<()> {
            if !(v > 0.0 && v.is_finite()) {
                bail!("threshold schedule: {name} = {v} must be positive and finite");
            }
            Ok(())
        };
        match *self {
            ThresholdSchedule::Constant { value } => in_unit("value", value),
            ThresholdSchedule::Linear { base } => in_unit("base", base),
            ThresholdSchedule::Power { base, exponent }
            | ThresholdSchedule::OneMinusPower { base, exponent } => {
                in_unit("base", base)?;
                positive("exponent", exponent)
            }
            ThresholdSchedule::Exponential { base, rate } => {
                in_unit("base", base)?;
                in_unit("rate", rate)
            }
            ThresholdSchedule::StepWise { base, slope } => {
                in_unit("base", base)?;
                positive("slope", slope)
            }
        }
    }
}

/// The penalty weight `lambda_2(p)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WeightSchedule {
    /// `value` for every p (the static control).
    Constant { value: f64 },
    /// `max * (1 - p)^exponent` (the research's default: exponent 2).
    Power { max: f64, exponent: f64 },
    /// `max * exp(-rate * p)` (research: rate 3).
    Exponential { max: f64, rate: f64 },
    /// `max * (1 - p)`.
    Linear { max: f64 },
    /// `max * 0.5 * (1 + cos(pi p))`.
    Cosine { max: f64 },
}

impl WeightSchedule {
    pub fn value(&self, p: f64) -> f64 {
        let p = p.clamp(0.0, 1.0);
        match *self {
            WeightSchedule::Constant { value } => value,
            WeightSchedule::Power { max, exponent } => max * (1.0 - p).powf(exponent),
            WeightSchedule::Exponential { max, rate } => max * (-rate * p).exp(),
            WeightSchedule::Linear { max } => max * (1.0 - p),
            WeightSchedule::Cosine { max } => max * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let w = match *self {
            WeightSchedule::Constant { value } => value,
            WeightSchedule::Power { max, exponent } => {
                if !(exponent > 0.0 && exponent.is_finite()) {
                    bail!("weight schedule: exponent = {exponent} must be positive and finite");
                }
                max
            }
            WeightSchedule::Exponential { max, rate } => {
                if !(rate >= 0.0 && rate.is_finite()) {
                    bail!("weight schedule: rate = {rate} must be >= 0 and finite");
                }
                max
            }
            WeightSchedule::Linear { max } | WeightSchedule::Cosine { max } => max,
        };
        if !(w >= 0.0 && w.is_finite()) {
            bail!("weight schedule: weight {w} must be >= 0 and finite (a negative weight would reward co-activation)");
        }
        Ok(())
    }
}

/// Linear warm-up multiplier on the weight: `min(1, p / fraction)`; `fraction = 0`
/// disables it.
pub fn warmup_factor(p: f64, fraction: f64) -> f64 {
    if fraction <= 0.0 {
        1.0
    } else {
        (p / fraction).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn threshold_values_at_chosen_p() {
        let f = 1e-3;
        close(
            ThresholdSchedule::Constant { value: 0.85 }.value(0.7, f),
            0.85,
        );
        close(
            ThresholdSchedule::Linear { base: 0.9 }.value(0.25, f),
            0.675,
        );
        close(ThresholdSchedule::Linear { base: 0.9 }.value(1.0, f), 1e-3);
        close(
            ThresholdSchedule::Power {
                base: 0.8,
                exponent: 0.5,
            }
            .value(0.75, f),
            0.4,
        );
        close(
            ThresholdSchedule::OneMinusPower {
                base: 0.9,
                exponent: 0.5,
            }
            .value(0.25, f),
            0.45,
        );
        close(
            ThresholdSchedule::OneMinusPower {
                base: 1.0,
                exponent: 1.5,
            }
            .value(0.25, f),
            0.875,
        );
        close(
            ThresholdSchedule::Exponential {
                base: 1.0,
                rate: 0.9,
            }
            .value(0.5, f),
            0.9f64.sqrt(),
        );
        close(
            ThresholdSchedule::StepWise {
                base: 0.9,
                slope: 2.0,
            }
            .value(0.25, f),
            0.45,
        );
        close(
            ThresholdSchedule::StepWise {
                base: 0.9,
                slope: 2.0,
            }
            .value(0.6, f),
            1e-3,
        );
    }

    #[test]
    fn weight_values_at_chosen_p() {
        close(WeightSchedule::Constant { value: 0.2 }.value(0.9), 0.2);
        close(
            WeightSchedule::Power {
                max: 0.4,
                exponent: 2.0,
            }
            .value(0.5),
            0.1,
        );
        close(
            WeightSchedule::Exponential {
                max: 0.3,
                rate: 3.0,
            }
            .value(0.5),
            0.3 * (-1.5f64).exp(),
        );
        close(WeightSchedule::Linear { max: 0.2 }.value(0.25), 0.15);
        close(WeightSchedule::Cosine { max: 0.2 }.value(0.5), 0.1);
        close(WeightSchedule::Cosine { max: 0.2 }.value(1.0), 0.0);
        close(warmup_factor(0.05, 0.1), 0.5);
        close(warmup_factor(0.5, 0.1), 1.0);
        close(warmup_factor(0.0, 0.0), 1.0);
    }

    #[test]
    fn toml_tagged_form_and_rejections() {
        #[derive(Deserialize)]
        struct W {
            t: ThresholdSchedule,
            w: WeightSchedule,
        }
        let w: W = toml::from_str("t = { kind = \"power\", base = 0.9, exponent = 0.5 }\nw = { kind = \"cosine\", max = 0.2 }").unwrap();
        assert_eq!(
            w.t,
            ThresholdSchedule::Power {
                base: 0.9,
                exponent: 0.5
            }
        );
        assert_eq!(w.w, WeightSchedule::Cosine { max: 0.2 });
        let bad = toml::from_str::<W>(
            "t = { kind = \"sigmoid\", base = 0.9 }\nw = { kind = \"cosine\", max = 0.2 }",
        );
        let msg = format!("{}", bad.err().unwrap());
        assert!(msg.contains("sigmoid"), "{msg}");
        assert!(toml::from_str::<W>("t = { kind = \"linear\", base = 0.9, extra = 1 }\nw = { kind = \"cosine\", max = 0.2 }").is_err());
        assert!(ThresholdSchedule::Linear { base: 1.5 }.validate().is_err());
        assert!(ThresholdSchedule::Constant { value: 0.0 }
            .validate()
            .is_err());
        assert!(WeightSchedule::Linear { max: -0.1 }.validate().is_err());
        assert!(WeightSchedule::Power {
            max: 0.1,
            exponent: 2.0
        }
        .validate()
        .is_ok());
    }
}
