//! `report.html` (self-contained: inline SVG, opens from disk) and `report.md` (tables,
//! plots as files under `plots/`) for a run directory. Every number shown is read from
//! the run's stored results ([`crate::results`]); nothing is computed from anything else.
//!
//! The report is generic over metric names: whatever the trainer logged and whatever the
//! evaluations wrote is shown, with a few well-known metrics promoted to the headline
//! table. Flags are raised for variants with zero steps, non-finite values, or a dead
//! fraction above the plan's threshold.

use crate::plots::{html_escape, line_chart, scatter_errors, ErrPoint, Series};
use crate::results::SeedRecord;
use crate::stats::{format_diff, format_summary, seed_diff, summarize, summarize_seeds};
use anyhow::Result;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// What the report needs to know besides the records.
pub struct ReportInput<'a> {
    pub title: String,
    /// (label, value) rows for the setup table.
    pub setup: Vec<(String, String)>,
    pub baseline: String,
    /// Variant order (plan order); records of other variants are appended.
    pub variant_order: Vec<String>,
    pub flag_dead_fraction: f64,
    pub records: &'a [SeedRecord],
    /// Feature browsers: (label, path relative to the run directory).
    pub browsers: Vec<(String, String)>,
}

/// Metrics promoted to the headline table when present (matched by suffix).
const HEADLINE: &[&str] = &[
    "core.model_behavior_preservation.kl_div_score",
    "core.model_performance_preservation.ce_loss_score",
    "core.reconstruction_quality.explained_variance",
    "core.reconstruction_quality.explained_variance_conventional",
    "core.reconstruction_quality.cossim",
    "core.sparsity.l0",
    "core.misc_metrics.frac_alive",
    "absorption_first_letter.mean.mean_absorption_fraction_score",
    "absorption_first_letter.mean.mean_full_absorption_score",
    "absorption_first_letter.mean.mean_num_split_features",
    "sparse_probing.sae.sae_top_1_test_accuracy",
    "sparse_probing.llm.llm_top_1_test_accuracy",
    "tpp.tpp_metrics.tpp_threshold_20_total_metric",
    "scr.scr_metrics.scr_metric_threshold_20",
    "train.fvu",
    "train.l0",
    "train.dead_fraction",
];

/// A section of the report: a heading, a paragraph, tables (markdown + html) and plots.
struct Section {
    title: String,
    text: String,
    md: String,
    html: String,
    plots: Vec<(String, String)>, // (file stem, svg)
}

impl Section {
    fn new(title: &str, text: &str) -> Self {
        Section {
            title: title.into(),
            text: text.into(),
            md: String::new(),
            html: String::new(),
            plots: Vec::new(),
        }
    }
}

fn ordered_variants(input: &ReportInput) -> Vec<String> {
    let mut order = input.variant_order.clone();
    let present: BTreeSet<&str> = input.records.iter().map(|r| r.variant.as_str()).collect();
    order.retain(|v| present.contains(v.as_str()));
    for r in input.records {
        if !order.contains(&r.variant) {
            order.push(r.variant.clone());
        }
    }
    order
}

fn values(records: &[SeedRecord], variant: &str, key: &str) -> Vec<f64> {
    values_by_seed(records, variant, key)
        .into_iter()
        .map(|(_, x)| x)
        .collect()
}

/// `(seed, value)` of one metric for every seed of a variant that has it.
fn values_by_seed(records: &[SeedRecord], variant: &str, key: &str) -> Vec<(u64, f64)> {
    records
        .iter()
        .filter(|r| r.variant == variant)
        .filter_map(|r| r.flat_metrics().get(key).map(|&x| (r.seed, x)))
        .collect()
}

/// A table of one or more metrics: rows = variants, mean ± CI and Δ vs baseline ± CI.
fn metric_table(input: &ReportInput, variants: &[String], keys: &[String]) -> (String, String) {
    let mut md = String::from("| variant |");
    let mut html = String::from("<table><tr><th>variant</th>");
    for k in keys {
        let _ = write!(md, " {k} | Δ vs {} |", input.baseline);
        let _ = write!(
            html,
            "<th>{}</th><th>Δ vs {}</th>",
            html_escape(k),
            html_escape(&input.baseline)
        );
    }
    md.push('\n');
    md.push_str(&"|---".repeat(1 + 2 * keys.len()));
    md.push_str("|\n");
    html.push_str("</tr>");
    for v in variants {
        let _ = write!(md, "| {v} |");
        let _ = write!(html, "<tr><td>{}</td>", html_escape(v));
        for k in keys {
            let x = values_by_seed(input.records, v, k);
            let s = summarize_seeds(&x);
            let diff = if v == &input.baseline {
                "—".to_string()
            } else {
                let b = values_by_seed(input.records, &input.baseline, k);
                if b.is_empty() || x.is_empty() {
                    "n/a".into()
                } else {
                    format_diff(seed_diff(&x, &b))
                }
            };
            let _ = write!(md, " {} | {} |", format_summary(&s), diff);
            let _ = write!(
                html,
                "<td>{}</td><td>{}</td>",
                html_escape(&format_summary(&s)),
                html_escape(&diff)
            );
        }
        md.push('\n');
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    (md, html)
}

fn flags(input: &ReportInput, r: &SeedRecord) -> Vec<String> {
    let mut f = Vec::new();
    if r.num("steps").unwrap_or(0.0) < 1.0 {
        f.push("ZERO STEPS".to_string());
    }
    let flat = r.flat_metrics();
    let nonfinite: Vec<&String> = flat
        .iter()
        .filter(|(_, v)| !v.is_finite())
        .map(|(k, _)| k)
        .collect();
    if !nonfinite.is_empty() {
        f.push(format!(
            "non-finite: {}",
            nonfinite
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for e in r.evals.keys() {
        if let Some(why) = r.eval_no_result(e) {
            f.push(format!("{e}: no result ({why})"));
        }
    }
    if r.summary.get("diverged").and_then(Value::as_bool) == Some(true) {
        f.push("loss became NaN/Inf".into());
    }
    if let Some(d) = flat.get("train.dead_fraction") {
        if *d > input.flag_dead_fraction {
            f.push(format!(
                "dead fraction {d:.3} > {}",
                input.flag_dead_fraction
            ));
        }
    }
    f
}

fn curve_progress(r: &SeedRecord, row: &serde_json::Map<String, Value>) -> Option<f64> {
    if let Some(p) = row.get("p").and_then(Value::as_f64) {
        return Some(p);
    }
    let step = row.get("step").and_then(Value::as_f64)?;
    let total = r.num("total_steps").or_else(|| r.num("steps"))?;
    (total > 0.0).then(|| step / total)
}

/// Mean over seeds of a curve key, aligned by log index.
fn mean_curve(records: &[&SeedRecord], key: &str) -> Vec<(f64, f64)> {
    let mut acc: BTreeMap<i64, (f64, f64, usize)> = BTreeMap::new();
    for r in records {
        for row in &r.curve {
            let (Some(p), Some(v)) = (curve_progress(r, row), row.get(key).and_then(Value::as_f64))
            else {
                continue;
            };
            let e = acc.entry((p * 1e6).round() as i64).or_insert((0.0, 0.0, 0));
            e.0 += p;
            e.1 += v;
            e.2 += 1;
        }
    }
    acc.values()
        .map(|(p, v, n)| (p / *n as f64, v / *n as f64))
        .collect()
}

fn curve_sections(input: &ReportInput, variants: &[String]) -> (Section, Section, Section) {
    let mut curves = Section::new(
        "Training curves",
        "Every scalar the trainer logged, against training progress p = step / total steps, averaged over seeds.",
    );
    let mut sep = Section::new(
        "Feature separation across training phases",
        "Decoder cosine-similarity histograms at several points of training and the co-activation statistics over time (first seed of each variant for histograms).",
    );
    let mut selfc = Section::new(
        "Self-correcting method diagnostics",
        "Reactivations, interference mass and feature diversity logged by the self-correcting orthogonal SAE.",
    );
    let mut scalar_keys = BTreeSet::new();
    let mut hist_keys = BTreeSet::new();
    for r in input.records {
        for row in &r.curve {
            for (k, v) in row {
                match v {
                    Value::Number(_)
                        if !["step", "p", "tokens", "elapsed_s", "time"].contains(&k.as_str()) =>
                    {
                        scalar_keys.insert(k.clone());
                    }
                    Value::Array(a) if a.iter().all(Value::is_number) && !a.is_empty() => {
                        hist_keys.insert(k.clone());
                    }
                    _ => {}
                }
            }
        }
    }
    for key in &scalar_keys {
        let series: Vec<Series> = variants
            .iter()
            .map(|v| {
                let rs: Vec<&SeedRecord> =
                    input.records.iter().filter(|r| &r.variant == v).collect();
                Series {
                    name: v.clone(),
                    points: mean_curve(&rs, key),
                }
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        if series.is_empty() {
            continue;
        }
        let svg = line_chart(key, "training progress p", key, &series, false);
        let lk = key.to_lowercase();
        let target = if ["reactiv", "interference", "diversity", "effective_rank"]
            .iter()
            .any(|w| lk.contains(w))
        {
            &mut selfc
        } else if [
            "cos",
            "coact",
            "c_ij",
            "pairs",
            "threshold",
            "penalty",
            "sep",
        ]
        .iter()
        .any(|w| lk.contains(w))
        {
            &mut sep
        } else {
            &mut curves
        };
        target
            .plots
            .push((format!("curve_{}", crate::results::sanitize(key)), svg));
    }
    for key in &hist_keys {
        for v in variants {
            let Some(r) = input.records.iter().find(|r| &r.variant == v) else {
                continue;
            };
            let rows: Vec<(f64, &Vec<Value>)> = r
                .curve
                .iter()
                .filter_map(|row| Some((curve_progress(r, row)?, row.get(key)?.as_array()?)))
                .collect();
            if rows.is_empty() {
                continue;
            }
            let mut series = Vec::new();
            for target in [0.0, 0.25, 0.5, 0.75, 1.0] {
                let (p, h) = rows
                    .iter()
                    .min_by(|a, b| (a.0 - target).abs().total_cmp(&(b.0 - target).abs()))
                    .unwrap();
                if series
                    .iter()
                    .any(|s: &Series| s.name == format!("p={p:.2}"))
                {
                    continue;
                }
                let n = h.len() as f64;
                let pts = h
                    .iter()
                    .enumerate()
                    .filter_map(|(i, x)| Some(((i as f64 + 0.5) / n, x.as_f64()?)))
                    .collect();
                series.push(Series {
                    name: format!("p={p:.2}"),
                    points: pts,
                });
            }
            let svg = line_chart(
                &format!("{key}: {v}"),
                "bin (fraction of range)",
                key,
                &series,
                false,
            );
            sep.plots.push((
                format!(
                    "hist_{}_{}",
                    crate::results::sanitize(key),
                    crate::results::sanitize(v)
                ),
                svg,
            ));
        }
    }
    (curves, sep, selfc)
}

/// Parse metric names of the form `<prefix><N><suffix>` into (pattern, N).
fn split_number(key: &str, marker: &str) -> Option<(String, f64)> {
    let i = key.find(marker)? + marker.len();
    let rest = &key[i..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() {
        return None;
    }
    let n: f64 = digits.parse().ok()?;
    Some((format!("{}{{N}}{}", &key[..i], &rest[digits.len()..]), n))
}

fn eval_sections(input: &ReportInput, variants: &[String]) -> Section {
    let mut s = Section::new(
        "Evaluations by k and N",
        "Probing accuracy against the number of latents k, TPP/SCR against the number of ablated latents N, absorption per letter (means over seeds).",
    );
    let keys: BTreeSet<String> = input
        .records
        .iter()
        .flat_map(|r| r.flat_metrics().into_keys())
        .collect();
    let mut families: BTreeMap<String, Vec<(f64, String)>> = BTreeMap::new();
    for k in &keys {
        for marker in ["_top_", "_threshold_"] {
            if let Some((pat, n)) = split_number(k, marker) {
                families.entry(pat).or_default().push((n, k.clone()));
            }
        }
    }
    for (pat, mut members) in families {
        if members.len() < 2 {
            continue;
        }
        members.sort_by(|a, b| a.0.total_cmp(&b.0));
        let series: Vec<Series> = variants
            .iter()
            .map(|v| Series {
                name: v.clone(),
                points: members
                    .iter()
                    .filter_map(|(n, k)| {
                        Some((*n, summarize(&values(input.records, v, k)).mean))
                            .filter(|p| p.1.is_finite())
                    })
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        let xl = if pat.contains("_top_") {
            "k (latents)"
        } else {
            "N (ablated latents)"
        };
        s.plots.push((
            format!("family_{}", crate::results::sanitize(&pat)),
            line_chart(&pat, xl, "value", &series, true),
        ));
    }
    // Absorption per letter, from eval_result_details.
    let mut per_letter: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for r in input.records {
        let Some(Value::Array(details)) = r
            .evals
            .get("absorption_first_letter")
            .and_then(|j| j.get("eval_result_details"))
        else {
            continue;
        };
        for d in details {
            let Some(letter) = d
                .get("first_letter")
                .or_else(|| d.get("letter"))
                .and_then(Value::as_str)
            else {
                continue;
            };
            for field in [
                "mean_absorption_fraction",
                "absorption_rate",
                "full_absorption_rate",
                "mean_full_absorption",
            ] {
                if let Some(x) = d.get(field).and_then(Value::as_f64) {
                    per_letter
                        .entry(format!("{}|{field}", r.variant))
                        .or_default()
                        .entry(letter.to_string())
                        .or_default()
                        .push(x);
                }
            }
        }
    }
    let fields: BTreeSet<String> = per_letter
        .keys()
        .filter_map(|k| k.split('|').nth(1).map(String::from))
        .collect();
    for field in fields {
        let series: Vec<Series> = variants
            .iter()
            .filter_map(|v| {
                let m = per_letter.get(&format!("{v}|{field}"))?;
                Some(Series {
                    name: v.clone(),
                    points: m
                        .iter()
                        .map(|(l, xs)| {
                            (
                                (l.as_bytes()[0].to_ascii_lowercase() - b'a') as f64,
                                summarize(xs).mean,
                            )
                        })
                        .collect(),
                })
            })
            .collect();
        s.plots.push((
            format!("absorption_{field}"),
            line_chart(
                &format!("absorption per letter: {field}"),
                "letter (a = 0 ... z = 25)",
                &field,
                &series,
                false,
            ),
        ));
    }
    s
}

/// Render the report into `run/report.html`, `run/report.md` and `run/plots/*.svg`.
pub fn write_report(run: &Path, input: &ReportInput) -> Result<()> {
    let variants = ordered_variants(input);
    let mut sections: Vec<Section> = Vec::new();

    // Setup and per-variant bookkeeping.
    let mut setup = Section::new(
        "Setup",
        "What was trained, on what, and for how long. Flags mark results that must not be trusted.",
    );
    setup.md.push_str("| setting | value |\n|---|---|\n");
    setup.html.push_str("<table>");
    for (k, v) in &input.setup {
        let _ = writeln!(setup.md, "| {k} | {v} |");
        let _ = write!(
            setup.html,
            "<tr><th>{}</th><td>{}</td></tr>",
            html_escape(k),
            html_escape(v)
        );
    }
    setup.html.push_str("</table>");
    setup.md.push_str("\n| variant | seed | steps | tokens trained | wall time (s) | flags |\n|---|---|---|---|---|---|\n");
    setup.html.push_str("<table><tr><th>variant</th><th>seed</th><th>steps</th><th>tokens trained</th><th>wall time (s)</th><th>flags</th></tr>");
    for v in &variants {
        for r in input.records.iter().filter(|r| &r.variant == v) {
            let fl = flags(input, r).join("; ");
            let (steps, tokens, wall) = (
                r.num("steps").unwrap_or(0.0),
                r.num("tokens").unwrap_or(0.0),
                r.num("wall_seconds").unwrap_or(f64::NAN),
            );
            let _ = writeln!(
                setup.md,
                "| {v} | {} | {steps:.0} | {tokens:.0} | {wall:.1} | {} |",
                r.seed,
                if fl.is_empty() { "—" } else { &fl }
            );
            let cls = if fl.is_empty() { "" } else { " class=\"flag\"" };
            let _ = write!(
                setup.html,
                "<tr{cls}><td>{}</td><td>{}</td><td>{steps:.0}</td><td>{tokens:.0}</td><td>{wall:.1}</td><td>{}</td></tr>",
                html_escape(v),
                r.seed,
                html_escape(if fl.is_empty() { "—" } else { &fl })
            );
        }
    }
    setup.html.push_str("</table>");
    sections.push(setup);

    // Headline table.
    let all_keys: BTreeSet<String> = input
        .records
        .iter()
        .flat_map(|r| r.flat_metrics().into_keys())
        .collect();
    let headline: Vec<String> = HEADLINE
        .iter()
        .filter(|h| all_keys.contains(**h))
        .map(|h| h.to_string())
        .collect();
    let mut head = Section::new(
        "Headline metrics",
        "Mean ± 95% confidence interval over seeds (Student t), and the difference to the baseline with its 95% interval: paired over seeds (mean and Student t interval of the per-seed differences; a seed fixes the initialisation and the batch order of every variant in a run) when both variants have the same seeds, otherwise a Welch interval, marked (Welch). With one seed no interval exists and n=1 is shown.",
    );
    for chunk in headline.chunks(3) {
        let (md, html) = metric_table(input, &variants, chunk);
        head.md.push_str(&md);
        head.md.push('\n');
        head.html.push_str(&html);
    }
    sections.push(head);

    // Frontier.
    let mut front = Section::new("Sparsity-fidelity frontier", "Each point is a variant (mean over seeds, bars = 95% intervals): further up and to the left is better.");
    let l0_key = ["core.sparsity.l0", "train.l0"]
        .into_iter()
        .find(|k| all_keys.contains(*k));
    if let Some(l0k) = l0_key {
        for yk in [
            "core.reconstruction_quality.explained_variance_conventional",
            "core.reconstruction_quality.explained_variance",
            "core.model_performance_preservation.ce_loss_score",
            "train.fvu",
        ] {
            if !all_keys.contains(yk) {
                continue;
            }
            let pts: Vec<ErrPoint> = variants
                .iter()
                .map(|v| {
                    let (x, y) = (
                        summarize(&values(input.records, v, l0k)),
                        summarize(&values(input.records, v, yk)),
                    );
                    ErrPoint {
                        label: v.clone(),
                        x: x.mean,
                        y: y.mean,
                        xerr: x.ci95,
                        yerr: y.ci95,
                    }
                })
                .filter(|p| p.x.is_finite() && p.y.is_finite())
                .collect();
            front.plots.push((
                format!("frontier_{}", crate::results::sanitize(yk)),
                scatter_errors(&format!("{yk} vs L0"), l0k, yk, &pts),
            ));
        }
    }
    sections.push(front);

    let (curves, sep, selfc) = curve_sections(input, &variants);
    sections.push(curves);
    sections.push(sep);
    if !selfc.plots.is_empty() {
        sections.push(selfc);
    }
    sections.push(eval_sections(input, &variants));

    // Every metric.
    let mut all = Section::new(
        "All metrics",
        "Every scalar stored for this run, one row block per metric.",
    );
    let keys: Vec<String> = all_keys.into_iter().collect();
    for chunk in keys.chunks(2) {
        let (md, html) = metric_table(input, &variants, chunk);
        all.md.push_str(&md);
        all.md.push('\n');
        all.html.push_str(&html);
    }
    sections.push(all);
    if !input.browsers.is_empty() {
        let mut b = Section::new(
            "Feature browsers",
            "Each variant's first seed: its latents' top-activating tokens of this run's activation store, in context (saelab browse). Each opens from disk.",
        );
        b.html.push_str("<ul>");
        for (label, href) in &input.browsers {
            let _ = writeln!(b.md, "- [{label}]({href})");
            let _ = write!(
                b.html,
                "<li><a href=\"{}\">{}</a></li>",
                html_escape(href),
                html_escape(label)
            );
        }
        b.html.push_str("</ul>");
        sections.push(b);
    }

    // Write.
    let plot_dir = run.join("plots");
    let mut md = format!("# {}\n\n", input.title);
    let mut html = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{}</title><style>{}</style></head><body><h1>{}</h1><nav>",
        html_escape(&input.title),
        CSS,
        html_escape(&input.title)
    );
    for (i, s) in sections.iter().enumerate() {
        let _ = write!(html, "<a href=\"#s{i}\">{}</a> ", html_escape(&s.title));
    }
    html.push_str("</nav>");
    for (i, s) in sections.iter().enumerate() {
        let _ = write!(md, "## {}\n\n{}\n\n{}\n", s.title, s.text, s.md);
        let _ = write!(
            html,
            "<section id=\"s{i}\"><h2>{}</h2><p>{}</p>{}",
            html_escape(&s.title),
            html_escape(&s.text),
            s.html
        );
        if s.plots.is_empty() && s.md.is_empty() {
            md.push_str("_Nothing recorded for this section in this run._\n\n");
            html.push_str("<p class=\"none\">Nothing recorded for this section in this run.</p>");
        }
        html.push_str("<div class=\"plots\">");
        for (stem, svg) in &s.plots {
            let file = format!("{stem}.svg");
            saelab_core::fsutil::write_atomic(&plot_dir.join(&file), svg.as_bytes())?;
            let _ = writeln!(md, "![{stem}](plots/{file})\n");
            let _ = write!(html, "<figure>{svg}</figure>");
        }
        html.push_str("</div></section>");
    }
    html.push_str("</body></html>\n");
    saelab_core::fsutil::write_atomic(&run.join("report.md"), md.as_bytes())?;
    saelab_core::fsutil::write_atomic(&run.join("report.html"), html.as_bytes())?;
    Ok(())
}

const CSS: &str = "body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}\
th{background:#f4f4f4}tr.flag td{background:#fde8e8}nav a{margin-right:1em}figure{display:inline-block;margin:4px}\
.none{color:#888}section{margin-top:2em}";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(variant: &str, seed: u64, ev: f64, steps: u64, dead: f64) -> SeedRecord {
        let summary = json!({"variant": variant, "seed": seed, "steps": steps, "total_steps": steps, "tokens": steps * 2048, "wall_seconds": 12.5,
            "final": {"fvu": 1.0 - ev, "l0": 32.0, "dead_fraction": dead}});
        let curve = (0..5)
            .map(|i| json!({"step": i * steps / 4, "fvu": 1.0 - ev * i as f64 / 4.0, "cos_hist": [1.0, 2.0, 3.0], "reactivated": i}).as_object().unwrap().clone())
            .collect();
        let mut evals = BTreeMap::new();
        evals.insert(
            "core".to_string(),
            json!({"eval_type_id": "core", "eval_result_metrics": {"reconstruction_quality": {"explained_variance": ev}, "sparsity": {"l0": 32.0 + seed as f64}}}),
        );
        SeedRecord {
            variant: variant.into(),
            seed,
            dir: Default::default(),
            summary: summary.as_object().unwrap().clone(),
            curve,
            evals,
        }
    }

    #[test]
    fn report_has_every_section_and_flags() {
        let dir = std::env::temp_dir().join(format!("saelab-report-test-{}", std::process::id()));
        let recs = vec![
            record("topk", 0, 0.80, 100, 0.01),
            record("topk", 1, 0.82, 100, 0.01),
            record("ortho", 0, 0.85, 100, 0.9),
            record("ortho", 1, 0.86, 0, 0.01),
            record("static", 0, 0.84, 100, 0.01),
            record("static", 2, 0.86, 100, 0.01),
        ];
        let input = ReportInput {
            title: "test run".into(),
            setup: vec![("model".into(), "tiny".into())],
            baseline: "topk".into(),
            variant_order: vec!["topk".into(), "ortho".into()],
            flag_dead_fraction: 0.5,
            records: &recs,
            browsers: vec![(
                "topk seed 0".into(),
                "variants/topk/seed-0/browser/browser.html".into(),
            )],
        };
        write_report(&dir, &input).unwrap();
        let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        for s in [
            "Setup",
            "Headline metrics",
            "Sparsity-fidelity frontier",
            "Training curves",
            "Feature separation",
            "Self-correcting",
            "All metrics",
            "Feature browsers",
        ] {
            assert!(html.contains(s) && md.contains(s), "missing section {s}");
        }
        assert!(
            html.contains("<a href=\"variants/topk/seed-0/browser/browser.html\">topk seed 0</a>")
        );
        assert!(md.contains("ZERO STEPS"));
        assert!(md.contains("dead fraction 0.900 > 0.5"));
        // topk EV = mean(0.80, 0.82) = 0.81; ortho - topk over seeds 0 and 1: per-seed
        // differences 0.05 and 0.04, paired mean 0.045, half-width 12.706 * 0.00707 / sqrt(2)
        assert!(md.contains("0.81"), "{md}");
        assert!(md.contains("+0.045 ± 0.064 |"), "{md}");
        // static has seeds 0 and 2: Welch, 0.85 - 0.81, half-width 4.303 * sqrt(2e-4), marked
        assert!(md.contains("+0.040 ± 0.061 (Welch)"), "{md}");
        assert!(html.matches("<svg").count() >= 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
