//! `saelab experiment`: run a plan end to end into one run directory.
//!
//! Stages: validate everything (plan, every variant's training config) -> cache the
//! activations once -> per seed: train every unfinished variant together (one read of
//! each batch feeds them all), evaluate that seed's SAEs, rewrite the results table and
//! report (which says PARTIAL until every SAE is trained and evaluated).
//! Resumable: finished work is recognised by its files (`summary.json`, an eval's JSON,
//! a complete activation store) and skipped; a seed whose training was interrupted
//! resumes from its checkpoints.

use crate::plan::{Plan, Variant};
use crate::report::{write_report, ReportInput};
use crate::results::{
    check_run_format, load_records, variant_dir, write_results_table, RUN_FORMAT_VERSION,
};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use saelab_core::fsutil::write_atomic;
use saelab_data::cache::{cache_activations, CacheOptions};
use saelab_data::corpus::load_corpus;
use saelab_data::store::{ActivationStore, ShuffleOptions, ShuffledReader};
use saelab_lm::{HookPoint, Model};
use saelab_sae::{train, TrainConfig, TrainOptions};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// How the evaluation stage is run (the CLI supplies it; tests can skip evals).
pub trait Evaluator {
    /// Evaluate the SAE in `sae_dir` with `evals`, writing one SAEBench JSON per
    /// evaluation into `out_dir` (named by [`crate::evalsetup::eval_file_name`],
    /// atomically; an existing file means done). The evaluation seed is fixed and
    /// independent of the SAE's training seed, so every SAE is measured on the same data.
    fn evaluate(
        &self,
        model: &Model,
        sae_dir: &Path,
        evals: &[String],
        out_dir: &Path,
        sizes: &str,
    ) -> Result<()>;
}

pub struct RunOptions {
    pub run_dir: PathBuf,
    pub progress: bool,
}

/// A variant's training config for one seed, checked before any compute.
pub fn variant_config(plan: &Plan, v: &Variant, seed: u64) -> Result<TrainConfig> {
    let mut t = v.train.clone();
    t.insert("seed".into(), toml::Value::Integer(seed as i64));
    t.insert(
        "total_tokens".into(),
        toml::Value::Integer(plan.train_tokens as i64),
    );
    let mut cfg: TrainConfig = toml::Value::Table(t)
        .try_into()
        .with_context(|| format!("variant `{}`: invalid training settings", v.name))?;
    cfg.metadata.hook_name = plan.hook.clone();
    cfg.metadata.context_size = plan.ctx_len;
    cfg.metadata.prepend_bos = true;
    cfg.metadata.dataset_path = plan.corpus.clone();
    if (cfg.batch_size as u64) > plan.train_tokens {
        bail!(
            "variant `{}`: the token budget ({}) is below one batch ({} tokens)",
            v.name,
            plan.train_tokens,
            cfg.batch_size
        );
    }
    Ok(cfg)
}

fn bar(progress: bool, len: u64) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix:.bold} [{elapsed_precise}] {wide_bar} {pos}/{len} work items, ETA {eta} — {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_prefix("experiment");
    pb
}

/// Run (or resume) a plan. Returns the path of report.html.
pub fn run_plan(
    plan: &Plan,
    plan_text: &str,
    evaluator: &dyn Evaluator,
    opts: &RunOptions,
) -> Result<PathBuf> {
    let run = &opts.run_dir;
    check_run_format(run)?;
    let variants = plan.expand()?;
    let hook: HookPoint = plan
        .hook
        .parse()
        .with_context(|| format!("plan `{}`: bad hook", plan.name))?;
    // Every config is checked before anything is computed.
    let mut configs = Vec::new();
    for v in &variants {
        for &s in &plan.seeds {
            configs.push((v.clone(), s, variant_config(plan, v, s)?));
        }
    }
    let batch = configs[0].2.batch_size;
    if let Some((v, _, c)) = configs.iter().find(|(_, _, c)| c.batch_size != batch) {
        bail!("variant `{}` has batch_size {} but others {batch}: variants trained together share batches", v.name, c.batch_size);
    }
    let plan_path = run.join("plan.toml");
    if plan_path.exists() {
        let old = std::fs::read_to_string(&plan_path)
            .with_context(|| format!("cannot read {}", plan_path.display()))?;
        let mut old_plan = Plan::parse(&old).with_context(|| {
            format!(
                "{} (from an earlier run) is not a valid plan",
                plan_path.display()
            )
        })?;
        // Output only: browsers can be switched on or off when resuming (existing ones
        // are kept), without making it another plan.
        old_plan.browser_rows = plan.browser_rows;
        if toml::to_string(&old_plan)? != toml::to_string(plan)? {
            bail!("{} holds a different plan; resume it with the same plan or choose a new run directory", run.display());
        }
    }
    std::fs::create_dir_all(run)
        .with_context(|| format!("cannot create run directory {}", run.display()))?;
    write_atomic(&plan_path, plan_text.as_bytes())?;
    let stamp = json!({"format_version": RUN_FORMAT_VERSION, "saelab_version": env!("CARGO_PKG_VERSION"), "plan": plan.name});
    write_atomic(
        &run.join("saelab-run.json"),
        serde_json::to_string_pretty(&stamp)?.as_bytes(),
    )?;

    let n_items = 1 + plan.seeds.len() + variants.len() * plan.seeds.len();
    let overall = bar(opts.progress, n_items as u64);
    let t0 = Instant::now();

    // Stage 1: activations.
    overall.set_message("loading the model");
    let model = Model::open(&plan.model, plan.lm_weights()?)?;
    hook.check(model.config().n_layers)?;
    let store_dir = run.join("activations");
    overall.set_message("caching activations");
    tracing::info!(
        "stage 1/3: activations of {} at {} into {}",
        model.config().name,
        plan.hook,
        store_dir.display()
    );
    let complete = ActivationStore::open(&store_dir)
        .map(|s| s.manifest().complete)
        .unwrap_or(false);
    if !complete {
        let dataset = load_corpus(&plan.corpus)?;
        let mut co = CacheOptions::new(hook);
        co.tokens = plan.train_tokens;
        co.ctx_len = plan.ctx_len;
        co.pack_mode = plan.pack_mode()?;
        co.progress = opts.progress;
        cache_activations(&model, &dataset, &co, &store_dir)?;
    }
    let store = Arc::new(ActivationStore::open(&store_dir)?);
    {
        // A complete store is reused as is: make sure it is this plan's.
        let m = store.manifest();
        let packing = format!("{:?}", plan.pack_mode()?);
        if m.source
            .get("pack_mode")
            .is_some_and(|p| *p != packing.as_str())
        {
            bail!(
                "{} holds activations packed as {}, but the plan asks for `pack = \"{}\"`; use a new run directory",
                store_dir.display(),
                m.source["pack_mode"],
                plan.pack
            );
        }
        if m.hook != plan.hook
            || m.ctx_len != plan.ctx_len
            || m.model != model.name_with_precision()
        {
            bail!(
                "{} holds activations of {} at {} (context {}), but the plan asks for {} at {} (context {}); use a new run directory",
                store_dir.display(),
                m.model,
                m.hook,
                m.ctx_len,
                model.name_with_precision(),
                plan.hook,
                plan.ctx_len
            );
        }
    }
    overall.inc(1);

    // Stages 2 and 3 seed by seed: train a seed's variants (one shared read), evaluate
    // them, and rewrite the report, so a long plan shows finished seeds while the next
    // one trains (and a plan stopped between seeds has complete results for some).
    for &seed in &plan.seeds {
        overall.set_message(format!("training seed {seed}"));
        tracing::info!("stage 2/3: training seed {seed}");
        let todo: Vec<&(Variant, u64, TrainConfig)> = configs
            .iter()
            .filter(|(v, s, _)| {
                *s == seed
                    && !variant_dir(run, &v.name, seed)
                        .join("summary.json")
                        .exists()
            })
            .collect();
        if !todo.is_empty() {
            let cfgs: Vec<TrainConfig> = todo
                .iter()
                .map(|(_, _, c)| {
                    let mut c = c.clone();
                    c.metadata.model_name = model.name_with_precision();
                    c
                })
                .collect();
            let dirs: Vec<PathBuf> = todo
                .iter()
                .map(|(v, s, _)| variant_dir(run, &v.name, *s))
                .collect();
            let resume = dirs
                .iter()
                .any(|d| d.join("checkpoint.safetensors").exists());
            let mut source = ShuffledReader::new(
                store.clone(),
                ShuffleOptions {
                    seed,
                    ..Default::default()
                },
            );
            let topts = TrainOptions {
                resume,
                overwrite: !resume,
                progress: opts.progress,
                loop_source: true,
                ..Default::default()
            };
            let summaries = train(&cfgs, &mut source, &dirs, topts)
                .with_context(|| format!("training seed {seed}"))?;
            for (((v, s, c), sum), dir) in todo.iter().zip(&summaries).zip(&dirs) {
                let fin = serde_json::to_value(&sum.final_metrics)?;
                let summary = json!({
                    "variant": v.name, "seed": s, "steps": sum.steps, "total_steps": sum.planned_steps,
                    "tokens": sum.tokens, "wall_seconds": sum.wall_seconds, "tokens_per_second": sum.tokens_per_second,
                    "architecture": c.architecture, "d_sae": c.d_sae, "k": c.k, "final": fin,
                });
                write_atomic(
                    &dir.join("summary.json"),
                    serde_json::to_string_pretty(&summary)?.as_bytes(),
                )?;
            }
        }
        overall.inc(1);

        for (v, _, _) in configs.iter().filter(|(_, s, _)| *s == seed) {
            overall.set_message(format!("evaluating {} seed {seed}", v.name));
            let dir = variant_dir(run, &v.name, seed);
            let out = dir.join("evals");
            let missing = missing_evals(&dir, plan)?;
            if !missing.is_empty() {
                tracing::info!(
                    "stage 3/3: evaluating {} seed {seed}: {}",
                    v.name,
                    missing.join(", ")
                );
                let t = Instant::now();
                evaluator
                    .evaluate(&model, &dir, &missing, &out, &plan.eval_sizes)
                    .with_context(|| format!("evaluating {} seed {seed}", v.name))?;
                tracing::info!(
                    "evaluated {} seed {seed} in {:.0} s",
                    v.name,
                    t.elapsed().as_secs_f64()
                );
            }
            if plan.browser_rows > 0
                && Some(&seed) == plan.seeds.first()
                && !is_current(&browser_page(&dir), &dir)
            {
                overall.set_message(format!("feature browser of {} seed {seed}", v.name));
                let t = Instant::now();
                let opts = crate::browser::BrowseOptions {
                    max_rows: plan.browser_rows,
                    ..Default::default()
                };
                let out = crate::browser::default_dir(&dir);
                crate::browser::write_sae_browser(&model, &store, &dir, &out, &opts, &|_| {})
                    .with_context(|| format!("feature browser of {} seed {seed}", v.name))?;
                tracing::info!(
                    "feature browser of {} seed {seed} in {:.0} s: {}",
                    v.name,
                    t.elapsed().as_secs_f64(),
                    browser_page(&dir).display()
                );
            }
            overall.inc(1);
        }
        write_run_report(run, plan)?;
    }
    overall.finish_with_message(format!("done in {:.0} s", t0.elapsed().as_secs_f64()));
    tracing::info!(
        "experiment {} done in {:.0} s",
        plan.name,
        t0.elapsed().as_secs_f64()
    );
    Ok(run.join("report.html"))
}

/// The distinct values of a train key over the variants (`default` where unset), joined
/// with " / ": one value when every variant agrees.
fn train_values(variants: &[Variant], key: &str, default: &str) -> String {
    let values: std::collections::BTreeSet<&str> = variants
        .iter()
        .map(|v| v.train.get(key).and_then(|x| x.as_str()).unwrap_or(default))
        .collect();
    values.into_iter().collect::<Vec<_>>().join(" / ")
}

/// The plan's evaluations whose SAEBench JSON is not in `sae_dir/evals`, or is older than
/// the SAE's weights (re-written since, e.g. by `saelab export`): like `make`, a result
/// older than its input is redone.
fn missing_evals(sae_dir: &Path, plan: &Plan) -> Result<Vec<String>> {
    let out = sae_dir.join("evals");
    let mut missing = Vec::new();
    for e in &plan.evals {
        if !is_current(&out.join(crate::evalsetup::eval_file_name(e)?), sae_dir) {
            missing.push(e.clone());
        }
    }
    Ok(missing)
}

/// A result file derived from an SAE is current if it exists and is not older than the
/// SAE's weights (an SAE re-exported since is evaluated, or browsed, again).
fn is_current(result: &Path, sae_dir: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (
        modified(result),
        modified(&sae_dir.join(saelab_sae::io::WEIGHTS_FILE)),
    ) {
        (Some(r), Some(w)) => r >= w,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Where the runner writes a variant's feature browser (first seed only).
pub fn browser_page(sae_dir: &Path) -> PathBuf {
    crate::browser::default_dir(sae_dir).join(crate::browser::PAGE_FILE)
}

/// How much of the plan the run directory holds: every (variant, seed) trained and
/// evaluated, or a partial count, so an interim report says it is one.
fn run_status(run: &Path, plan: &Plan, variants: &[Variant]) -> Result<String> {
    let (mut trained, mut evaluated) = (0, 0);
    for v in variants {
        for &seed in &plan.seeds {
            let dir = variant_dir(run, &v.name, seed);
            if !dir.join("summary.json").exists() {
                continue;
            }
            trained += 1;
            evaluated += missing_evals(&dir, plan)?.is_empty() as usize;
        }
    }
    let n = variants.len() * plan.seeds.len();
    Ok(if evaluated == n {
        format!("complete: all {n} SAEs trained and evaluated")
    } else {
        format!("PARTIAL: {trained} of {n} SAEs trained, {evaluated} of {n} evaluated (resume with the same plan and run directory)")
    })
}

/// (Re)write results.csv/json and the report from what the run directory holds.
pub fn write_run_report(run: &Path, plan: &Plan) -> Result<PathBuf> {
    let records = load_records(run)?;
    write_results_table(run, &records)?;
    let variants = plan.expand()?;
    let setup = vec![
        ("status".to_string(), run_status(run, plan, &variants)?),
        ("plan".to_string(), plan.name.clone()),
        ("model".to_string(), plan.model.clone()),
        ("hook".to_string(), plan.hook.clone()),
        ("corpus".to_string(), plan.corpus.clone()),
        ("tokens per SAE".to_string(), plan.train_tokens.to_string()),
        ("context length".to_string(), plan.ctx_len.to_string()),
        ("LM precision".to_string(), plan.lm_precision.clone()),
        (
            "TopK selection precision".to_string(),
            train_values(&variants, "encoder_precision", "f32"),
        ),
        (
            "dense GEMM precision".to_string(),
            train_values(&variants, "dense_precision", "f32"),
        ),
        (
            "seeds".to_string(),
            plan.seeds
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("evaluations".to_string(), plan.evals.join(", ")),
        ("evaluation sizes".to_string(), plan.eval_sizes.clone()),
    ];
    let mut browsers = Vec::new();
    if let Some(&seed) = plan.seeds.first() {
        for v in &variants {
            let dir = variant_dir(run, &v.name, seed);
            let page = browser_page(&dir);
            if page.exists() {
                let rel = page.strip_prefix(run).unwrap_or(&page);
                browsers.push((format!("{} seed {seed}", v.name), rel.display().to_string()));
            }
        }
    }
    let input = ReportInput {
        title: format!("saelab experiment: {}", plan.name),
        setup,
        baseline: plan.baseline_name()?,
        variant_order: variants.iter().map(|v| v.name.clone()).collect(),
        flag_dead_fraction: plan.flag_dead_fraction,
        records: &records,
        browsers,
    };
    write_report(run, &input)?;
    Ok(run.join("report.html"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_variant_config_is_valid_before_compute() {
        for text in [
            include_str!("../../../plans/quickstart.toml"),
            include_str!("../../../plans/research.toml"),
        ] {
            let plan = Plan::parse(text).unwrap();
            for v in plan.expand().unwrap() {
                let c =
                    variant_config(&plan, &v, 0).unwrap_or_else(|e| panic!("{}: {e:#}", v.name));
                c.resolved(576)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", v.name));
                c.method
                    .build(576, c.d_sae, 0)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", v.name));
            }
        }
    }

    #[test]
    fn a_method_the_architecture_cannot_use_is_refused() {
        let text = include_str!("../../../plans/quickstart.toml").replace(
            "[[variants]]\nname = \"topk\"",
            "[[variants]]\nname = \"topk\"\ntrain = { method = { method = \"self_correcting\" } }",
        );
        let plan = Plan::parse(&text).unwrap();
        let v = &plan.expand().unwrap()[0];
        let e = variant_config(&plan, v, 0)
            .and_then(|c| c.resolved(576))
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("needs a ReLU-type architecture"),
            "{e:#}"
        );
    }
}
