//! `saelab experiment`, `saelab quickstart`, `saelab report` and `saelab compare`.

use anyhow::{bail, Context, Result};
use clap::Args;
use saelab_report::evalsetup::SuiteEvaluator;
use saelab_report::plan::Plan;
use saelab_report::results::load_records;
use saelab_report::runner::{run_plan, write_run_report, RunOptions};
use saelab_report::stats::{format_diff, format_summary, seed_diff, summarize_seeds};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The quickstart plan, embedded so the binary runs it from anywhere.
pub const QUICKSTART_PLAN: &str = include_str!("../../../plans/quickstart.toml");

#[derive(Args)]
pub struct ExperimentArgs {
    /// Plan file (see plans/quickstart.toml and plans/research.toml).
    pub plan: PathBuf,
    /// Run directory (default: runs/<plan name>). Rerunning resumes: finished work is skipped.
    #[arg(long)]
    pub run: Option<PathBuf>,
}

#[derive(Args)]
pub struct QuickstartArgs {
    /// Run directory (default: runs/quickstart, or runs/quickstart-bf16 with --bf16).
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// bf16 products with f32 sums in the LM (`lm_precision = "bf16"`) and in the TopK
    /// selection (`encoder_precision = "bf16"`): on a CPU with AMX (Xeon Sapphire Rapids
    /// and later) the main job takes about 0.7x the time, with reconstruction metrics
    /// ~0.001 lower (README). Elsewhere it computes the same values, slower.
    #[arg(long)]
    pub bf16: bool,
}

#[derive(Args)]
pub struct ReportArgs {
    /// Run directory written by `saelab experiment`.
    pub run: PathBuf,
}

#[derive(Args)]
pub struct CompareArgs {
    /// Baseline run directory.
    pub run_a: PathBuf,
    /// Run directory compared with it.
    pub run_b: PathBuf,
    /// Only metrics whose name contains this text.
    #[arg(long)]
    pub filter: Option<String>,
}

fn execute(plan: &Plan, text: &str, run: PathBuf) -> Result<()> {
    let evaluator = SuiteEvaluator::new(Some(run.join("eval-cache")));
    let report = run_plan(
        plan,
        text,
        &evaluator,
        &RunOptions {
            run_dir: run,
            progress: true,
        },
    )?;
    println!("report: {}", report.display());
    println!("        {}", report.with_extension("md").display());
    Ok(())
}

pub fn experiment(a: ExperimentArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.plan)
        .with_context(|| format!("cannot read plan {}", a.plan.display()))?;
    let plan = Plan::parse(&text).with_context(|| format!("invalid plan {}", a.plan.display()))?;
    let run = a
        .run
        .unwrap_or_else(|| PathBuf::from("runs").join(&plan.name));
    execute(&plan, &text, run)
}

pub fn quickstart(a: QuickstartArgs) -> Result<()> {
    println!("fetching the default model and corpora (first run only) ...");
    for p in saelab_core::assets::fetch_all()? {
        println!("  {}", p.display());
    }
    let text = if a.bf16 {
        quickstart_bf16_plan()
    } else {
        QUICKSTART_PLAN.to_string()
    };
    let plan = Plan::parse(&text).context("the embedded quickstart plan")?;
    let run = a
        .run
        .unwrap_or_else(|| PathBuf::from("runs").join(&plan.name));
    execute(&plan, &text, run)
}

/// The quickstart plan with bf16 products in the LM and the TopK selection: three lines
/// of the embedded plan changed (name, `lm_precision`, `encoder_precision` in `[train]`),
/// its comments kept, so the run directory holds a readable plan.
fn quickstart_bf16_plan() -> String {
    let mut out = String::new();
    let mut named = false;
    for line in QUICKSTART_PLAN.lines() {
        // The first `name` is the plan's; the variants' come later.
        if line.starts_with("name = ") && !named {
            named = true;
            out.push_str("name = \"quickstart-bf16\"\n");
        } else if line.starts_with("lm_precision = ") {
            out.push_str("lm_precision = \"bf16\"\n");
        } else {
            out.push_str(line);
            out.push('\n');
            if line.trim() == "[train]" {
                out.push_str("encoder_precision = \"bf16\"\n");
            }
        }
    }
    out
}

pub fn report(a: ReportArgs) -> Result<()> {
    let plan_path = a.run.join("plan.toml");
    let plan = Plan::load(&plan_path)?;
    let path = write_run_report(&a.run, &plan)?;
    println!("report: {}", path.display());
    Ok(())
}

/// variant -> metric -> `(seed, value)` for every finished seed.
type SeedValues = BTreeMap<String, BTreeMap<String, Vec<(u64, f64)>>>;

fn metrics_by_variant(run: &Path) -> Result<SeedValues> {
    let records = load_records(run)?;
    if records.is_empty() {
        bail!(
            "{}: no finished SAE (no variants/*/seed-*/summary.json)",
            run.display()
        );
    }
    let mut out: SeedValues = BTreeMap::new();
    for r in &records {
        for (k, v) in r.flat_metrics() {
            out.entry(r.variant.clone())
                .or_default()
                .entry(k)
                .or_default()
                .push((r.seed, v));
        }
    }
    Ok(out)
}

/// Print, per variant present in both runs, each metric in A and B and the difference
/// B - A with its 95% interval (paired over seeds when both runs have the same seeds,
/// Welch otherwise); write the same as compare.md into RUN_B.
pub fn compare(a: CompareArgs) -> Result<()> {
    let ma = metrics_by_variant(&a.run_a)?;
    let mb = metrics_by_variant(&a.run_b)?;
    let shared: Vec<&String> = ma.keys().filter(|v| mb.contains_key(*v)).collect();
    if shared.is_empty() {
        bail!(
            "the runs share no variant name ({} has {}; {} has {})",
            a.run_a.display(),
            ma.keys().cloned().collect::<Vec<_>>().join(", "),
            a.run_b.display(),
            mb.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let mut md = format!(
        "# saelab compare\n\nA = `{}`, B = `{}`; mean ± 95% interval over seeds; Δ = B − A, paired over seeds when both runs have the same seeds (a seed fixes the initialisation and the batch order), else Welch (marked).\n\n",
        a.run_a.display(),
        a.run_b.display()
    );
    for v in shared {
        let (xa, xb) = (&ma[v], &mb[v]);
        let keys: BTreeSet<&String> = xa.keys().chain(xb.keys()).collect();
        md.push_str(&format!(
            "## {v}\n\n| metric | A | B | Δ (B − A) |\n|---|---|---|---|\n"
        ));
        println!("\n== {v} ==");
        println!("{:<64} {:>18} {:>18} {:>20}", "metric", "A", "B", "B - A");
        for k in keys {
            if a.filter.as_ref().is_some_and(|f| !k.contains(f.as_str())) {
                continue;
            }
            let empty = Vec::new();
            let (va, vb) = (xa.get(k).unwrap_or(&empty), xb.get(k).unwrap_or(&empty));
            let (sa, sb) = (
                format_summary(&summarize_seeds(va)),
                format_summary(&summarize_seeds(vb)),
            );
            let d = if va.is_empty() || vb.is_empty() {
                "n/a".to_string()
            } else {
                format_diff(seed_diff(vb, va))
            };
            println!("{k:<64} {sa:>18} {sb:>18} {d:>20}");
            md.push_str(&format!("| {k} | {sa} | {sb} | {d} |\n"));
        }
        md.push('\n');
    }
    let out = a.run_b.join("compare.md");
    saelab_core::fsutil::write_atomic(&out, md.as_bytes())?;
    println!("\nwritten: {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run directory holding only summary.json files: `train.fvu` per variant and seed.
    fn fake_run(dir: &Path, rows: &[(&str, u64, f64)]) {
        for &(variant, seed, fvu) in rows {
            let d = dir.join(format!("variants/{variant}/seed-{seed}"));
            std::fs::create_dir_all(&d).unwrap();
            let summary = serde_json::json!({"variant": variant, "seed": seed, "steps": 10, "final": {"fvu": fvu}});
            std::fs::write(d.join("summary.json"), summary.to_string()).unwrap();
        }
    }

    #[test]
    fn compare_pairs_seeds_and_marks_welch() {
        let root = std::env::temp_dir().join(format!("saelab-compare-{}", std::process::id()));
        let (a, b) = (root.join("a"), root.join("b"));
        // topk: same seeds, B - A = 0.010, 0.012, 0.011 per seed (paired mean 0.011,
        // half-width 4.303 * 0.001 / sqrt(3) = 0.0025); the seeds' own spread (1.0) would
        // swamp a Welch interval. relu: seeds 0, 1 in A and 1, 2 in B -> Welch (variances
        // 0.005, 2 degrees of freedom: 4.303 * sqrt(0.005)), marked.
        fake_run(
            &a,
            &[
                ("topk", 0, 0.5),
                ("topk", 1, 1.5),
                ("topk", 2, 2.5),
                ("relu", 0, 0.2),
                ("relu", 1, 0.3),
            ],
        );
        fake_run(
            &b,
            &[
                ("topk", 0, 0.51),
                ("topk", 1, 1.512),
                ("topk", 2, 2.511),
                ("relu", 1, 0.25),
                ("relu", 2, 0.35),
            ],
        );
        compare(CompareArgs {
            run_a: a,
            run_b: b.clone(),
            filter: Some("fvu".into()),
        })
        .unwrap();
        let md = std::fs::read_to_string(b.join("compare.md")).unwrap();
        assert!(
            md.contains("| train.fvu | 1.5 ± 2.5 | 1.5 ± 2.5 | +0.0110 ± 0.0025 |"),
            "{md}"
        );
        assert!(
            md.contains("| train.fvu | 0.25 ± 0.64 | 0.30 ± 0.64 | +0.05 ± 0.30 (Welch) |"),
            "{md}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_bf16_quickstart_differs_only_in_precision_and_name() {
        let f32_plan = Plan::parse(QUICKSTART_PLAN).unwrap();
        let text = quickstart_bf16_plan();
        let bf16 = Plan::parse(&text).unwrap();
        assert_eq!(bf16.name, "quickstart-bf16");
        assert_eq!(
            (f32_plan.lm_precision.as_str(), bf16.lm_precision.as_str()),
            ("f32", "bf16")
        );
        assert_eq!(bf16.train["encoder_precision"].as_str(), Some("bf16"));
        assert!(!f32_plan.train.contains_key("encoder_precision"));
        assert_eq!(text.lines().count(), QUICKSTART_PLAN.lines().count() + 1);
        let mut back = bf16.clone();
        back.name = f32_plan.name.clone();
        back.lm_precision = f32_plan.lm_precision.clone();
        back.train.remove("encoder_precision");
        assert_eq!(
            toml::to_string(&back).unwrap(),
            toml::to_string(&f32_plan).unwrap()
        );
    }
}
