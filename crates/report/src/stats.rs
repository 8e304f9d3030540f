//! Statistics over seeds: means with 95% confidence intervals (Student t), and the
//! difference of two variants' means: paired over seeds when both have the same seeds
//! (in one run a seed fixes the initialisation and the batch order, so the per-seed
//! differences remove what the seeds share), a Welch interval otherwise. With one seed
//! there is no interval: it is reported as missing, never as zero width.

use std::collections::BTreeMap;

/// Two-sided 97.5% quantiles of Student's t for 1..=30 degrees of freedom.
const T975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// t quantile for a 95% two-sided interval; fractional dof are rounded down (conservative).
pub fn t_quantile_975(dof: f64) -> f64 {
    if dof.is_nan() || dof < 1.0 {
        return f64::NAN;
    }
    let d = dof.floor() as usize;
    if d <= 30 {
        T975[d - 1]
    } else if d <= 60 {
        2.042 - (d - 30) as f64 * (2.042 - 2.000) / 30.0
    } else {
        1.96
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    /// Half width of the 95% interval (NaN with fewer than two values).
    pub ci95: f64,
}

/// Mean, sample standard deviation and 95% interval half-width of finite values.
pub fn summarize(values: &[f64]) -> Summary {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n == 0 {
        return Summary {
            n,
            mean: f64::NAN,
            std: f64::NAN,
            ci95: f64::NAN,
        };
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Summary {
            n,
            mean,
            std: f64::NAN,
            ci95: f64::NAN,
        };
    }
    // Values equal up to floating-point rounding (the same metric summed in another
    // order, ~1e-17 apart) have no spread: otherwise that residue, or the last bit the
    // mean itself loses, prints as "0.200000 ± 0.000000".
    let (lo, hi) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    let std = if hi - lo <= 1e-12 * lo.abs().max(hi.abs()) {
        0.0
    } else {
        (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64).sqrt()
    };
    Summary {
        n,
        mean,
        std,
        ci95: t_quantile_975((n - 1) as f64) * std / (n as f64).sqrt(),
    }
}

/// [`summarize`] of per-seed values `(seed, value)`.
pub fn summarize_seeds(values: &[(u64, f64)]) -> Summary {
    summarize(&values.iter().map(|&(_, x)| x).collect::<Vec<_>>())
}

/// Difference of means `a - b` with a Welch 95% interval half-width.
pub fn welch_diff(a: &[f64], b: &[f64]) -> Summary {
    let sa = summarize(a);
    let sb = summarize(b);
    let mean = sa.mean - sb.mean;
    if sa.n < 2 || sb.n < 2 {
        return Summary {
            n: sa.n.min(sb.n),
            mean,
            std: f64::NAN,
            ci95: f64::NAN,
        };
    }
    let va = sa.std * sa.std / sa.n as f64;
    let vb = sb.std * sb.std / sb.n as f64;
    let se = (va + vb).sqrt();
    if se == 0.0 {
        return Summary {
            n: sa.n.min(sb.n),
            mean,
            std: 0.0,
            ci95: 0.0,
        };
    }
    let dof = (va + vb).powi(2) / (va * va / (sa.n as f64 - 1.0) + vb * vb / (sb.n as f64 - 1.0));
    Summary {
        n: sa.n.min(sb.n),
        mean,
        std: se,
        ci95: t_quantile_975(dof) * se,
    }
}

/// How [`seed_diff`] compared two sets of per-seed values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffMethod {
    /// Mean and Student t interval of the per-seed differences (same seeds on both sides).
    Paired,
    /// Difference of the means with a Welch interval (the seeds differ).
    Welch,
}

/// Difference `a - b` of two variants' per-seed values `(seed, value)`: paired when both
/// have finite values for the same two or more seeds, Welch otherwise. The choice depends
/// only on which seeds have a value, never on what the values are.
pub fn seed_diff(a: &[(u64, f64)], b: &[(u64, f64)]) -> (Summary, DiffMethod) {
    let finite = |xs: &[(u64, f64)]| -> BTreeMap<u64, f64> {
        xs.iter().filter(|(_, x)| x.is_finite()).copied().collect()
    };
    let (ma, mb) = (finite(a), finite(b));
    let same_seeds = ma.len() == a.len() && mb.len() == b.len() && ma.keys().eq(mb.keys());
    if same_seeds && ma.len() >= 2 {
        let d: Vec<f64> = ma.iter().map(|(s, x)| x - mb[s]).collect();
        (summarize(&d), DiffMethod::Paired)
    } else {
        let v = |m: &BTreeMap<u64, f64>| m.values().copied().collect::<Vec<_>>();
        (welch_diff(&v(&ma), &v(&mb)), DiffMethod::Welch)
    }
}

/// A difference cell: "+0.012 ± 0.004", signed; Welch ones are marked "(Welch)" so a table
/// that mixes both says which is which.
pub fn format_diff((d, method): (Summary, DiffMethod)) -> String {
    let f = format_summary(&d);
    let f = if d.mean >= 0.0 && d.mean.is_finite() {
        format!("+{f}")
    } else {
        f
    };
    match method {
        DiffMethod::Paired => f,
        DiffMethod::Welch if d.ci95.is_finite() => format!("{f} (Welch)"),
        DiffMethod::Welch => f,
    }
}

/// "0.812 ± 0.004" with a sensible number of digits; "0.812 (1 seed)" without interval.
pub fn format_summary(s: &Summary) -> String {
    if !s.mean.is_finite() {
        return "n/a".into();
    }
    // A nonzero interval, or a nonzero mean known more precisely than the cap, below the
    // six-decimal cap would print as 0.000000: scientific notation instead. (A tiny mean
    // with a wide interval, such as rounding residue of 0.1 - 0.1, prints as 0.00.)
    let below_cap = |x: f64| x != 0.0 && x.abs() < 0.5e-6;
    if below_cap(s.ci95) || (below_cap(s.mean) && (s.ci95.is_nan() || s.ci95 < 0.5e-6)) {
        return if s.ci95 == 0.0 {
            format!("{:.2e} ± 0", s.mean)
        } else if s.ci95.is_finite() {
            format!("{:.2e} ± {:.1e}", s.mean, s.ci95)
        } else {
            format!("{:.2e} (n={})", s.mean, s.n)
        };
    }
    let digits = digits_for(s.mean, s.ci95);
    if s.ci95.is_finite() {
        format!("{:.*} ± {:.*}", digits, s.mean, digits, s.ci95)
    } else {
        format!("{:.*} (n={})", digits, s.mean, s.n)
    }
}

fn digits_for(mean: f64, ci: f64) -> usize {
    // Two significant digits of the interval, or three of the mean without one.
    if ci.is_finite() && ci > 0.0 {
        return ((-ci.log10()).ceil() as i64 + 1).clamp(1, 6) as usize;
    }
    if mean == 0.0 || !mean.is_finite() {
        return 3;
    }
    (2 - mean.abs().log10().floor() as i64).clamp(1, 6) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_matches_hand_computation() {
        let s = summarize(&[1.0, 2.0, 3.0]);
        assert_eq!(s.n, 3);
        assert!((s.mean - 2.0).abs() < 1e-12);
        assert!((s.std - 1.0).abs() < 1e-12);
        // t(2) = 4.303; half-width = 4.303 * 1 / sqrt(3)
        assert!((s.ci95 - 4.303 / 3f64.sqrt()).abs() < 1e-9);
        let one = summarize(&[5.0, f64::NAN]);
        assert_eq!(one.n, 1);
        assert!(one.ci95.is_nan());
        assert_eq!(format_summary(&one), "5.00 (n=1)");
    }

    #[test]
    fn equal_values_have_zero_spread() {
        // Three copies of a value: their computed mean differs from it in the last bit.
        let x = 0.20000000000000057;
        let s = summarize(&[x, x, x]);
        assert_eq!((s.std, s.ci95), (0.0, 0.0));
        assert_eq!(format_summary(&s), "0.200 ± 0.000");
        let d = welch_diff(&[x, x, x], &[0.1, 0.1, 0.1]);
        assert_eq!(d.ci95, 0.0);
        assert_eq!(format_summary(&d), "0.100 ± 0.000");
        // The same metric summed in another order: apart by rounding only.
        let r = summarize(&[
            0.014930555555555548,
            0.014930555555555553,
            0.014930555555555548,
        ]);
        assert_eq!(format_summary(&r), "0.0149 ± 0.0000");
        // A real spread below the six-decimal cap is shown, not printed as zero.
        let t = summarize(&[1.2e-6, 1.3e-6, 1.1e-6]);
        assert!(t.ci95 > 0.0 && t.ci95 < 0.5e-6);
        assert_eq!(format_summary(&t), "1.20e-6 ± 2.5e-7");
        // A tiny constant (a decayed penalty weight) keeps its digits.
        let w = summarize(&[6.713e-8, 6.713e-8, 6.713e-8]);
        assert_eq!(format_summary(&w), "6.71e-8 ± 0");
        assert_eq!(format_summary(&summarize(&[6.713e-8])), "6.71e-8 (n=1)");
        // Rounding residue of a zero difference, with a wide interval, stays fixed-point.
        let z = welch_diff(&[0.1, 0.2, 0.1], &[0.1, 0.1, 0.2 + 1e-16]);
        assert!(z.mean != 0.0 && z.mean.abs() < 1e-15, "{z:?}");
        assert_eq!(format_summary(&z), "-0.00 ± 0.13");
    }

    #[test]
    fn paired_over_the_same_seeds_welch_otherwise() {
        // Per-seed differences 0.10, 0.12, 0.11: paired mean 0.11, sd 0.01,
        // half-width 4.303 * 0.01 / sqrt(3); the seeds' shared offsets cancel.
        let b = [(0, 1.0), (1, 2.0), (2, 3.0)];
        let a = [(2, 3.11), (0, 1.10), (1, 2.12)];
        let (d, m) = seed_diff(&a, &b);
        assert_eq!(m, DiffMethod::Paired);
        assert!((d.mean - 0.11).abs() < 1e-12);
        assert!((d.ci95 - 4.303 * 0.01 / 3f64.sqrt()).abs() < 1e-9, "{d:?}");
        // Welch on the same values would not resolve it (the seeds' spread dominates).
        assert!(welch_diff(&[1.10, 2.12, 3.11], &[1.0, 2.0, 3.0]).ci95 > 1.0);
        assert_eq!(format_diff((d, m)), "+0.110 ± 0.025");
        // Another seed set, or a missing value, falls back to Welch, marked as such.
        let (w, m) = seed_diff(&[(0, 1.1), (1, 2.1), (3, 3.1)], &b);
        assert_eq!(m, DiffMethod::Welch);
        assert_eq!(w, welch_diff(&[1.1, 2.1, 3.1], &[1.0, 2.0, 3.0]));
        assert!(format_diff((w, m)).ends_with(" (Welch)"));
        let (_, m) = seed_diff(&[(0, 1.1), (1, f64::NAN), (2, 3.1)], &b);
        assert_eq!(m, DiffMethod::Welch);
        // One seed each: no interval, no marker.
        let (one, m) = seed_diff(&[(0, 1.5)], &[(0, 1.0)]);
        assert_eq!(format_diff((one, m)), "+0.500 (n=1)");
    }

    #[test]
    fn welch_interval() {
        let d = welch_diff(&[1.0, 2.0, 3.0], &[0.0, 1.0, 2.0]);
        assert!((d.mean - 1.0).abs() < 1e-12);
        // equal variances 1, n=3: se = sqrt(2/3), dof = 4 -> t = 2.776
        assert!(
            (d.ci95 - 2.776 * (2.0f64 / 3.0).sqrt()).abs() < 1e-9,
            "{d:?}"
        );
        assert_eq!(t_quantile_975(100.0), 1.96);
    }
}
