//! saelab-eval: the SAEBench evaluations, reimplemented for CPU.
//!
//! Public entry: [`run_evals`]`(opts, sae, lm, out_dir)` runs the evaluations named
//! in [`EvalOptions::evals`] (`core`, `absorption`, `sparse_probing`, `tpp`, `scr`)
//! for one SAE on one LM hook, and writes one SAEBench-schema JSON per evaluation
//! (`<out_dir>/<eval_type_id>_eval_results.json`, atomically, only after every
//! requested evaluation succeeded: bad input never leaves partial results). It
//! returns the paths, the in-memory results and a compact summary table.
//!
//! Layers:
//! - algorithms over plain matrices: [`probe`] (L2 logistic regression by L-BFGS,
//!   Adam multi-output probes with L1/pos_weight/early stopping), [`metrics`] (core
//!   reconstruction/sparsity/KL/CE/weight statistics), the per-word rules of
//!   [`absorption`], the task builders of [`sparse_probing`] and [`scr_tpp`];
//! - drivers that take activations and logits from a [`lm_api::HookedLm`] and texts as
//!   [`tasks::LabeledText`] ([`core_eval`], [`absorption`], [`sparse_probing`],
//!   [`scr_tpp`]), with an on-disk [`cache`] of everything that does not depend on the
//!   SAE, so evaluating a second SAE on the same model and hook skips those LM passes;
//! - [`output`]: the SAEBench JSON schema (NaN written as -1) and the summary table.
//!
//! Where SAEBench's definition is unusual, the SAEBench value keeps its name and the
//! conventional one is reported next to it (`explained_variance_conventional`,
//! `mse_conventional`). Unlearning and autointerp are not reproducible offline and
//! return an explicit "not available" error.
//!
//! The LM is reached only through [`lm_api::HookedLm`], implemented for
//! `saelab_lm::Model` in [`lm_adapter`] (tests use the toy [`lm_api::ToyLm`]). Corpora
//! from `saelab_data::corpus` map one-to-one onto [`tasks::LabeledText`].

pub mod absorption;
pub mod cache;
pub mod core_eval;
pub mod lm_adapter;
pub mod lm_api;
pub mod metrics;
pub mod output;
pub mod probe;
pub mod scr_tpp;
pub mod sparse_probing;
pub mod tasks;

#[cfg(test)]
pub(crate) mod testutil;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub use absorption::AbsorptionConfig;
pub use core_eval::CoreConfig;
pub use lm_api::HookedLm;
pub use output::{EvalResult, SaeIdentity};
pub use scr_tpp::{Attribute, ScrSpec, ScrTppConfig};
pub use sparse_probing::SparseProbingConfig;
pub use tasks::{LabeledText, ProbeDataset};

/// The evaluations, by the names accepted in [`EvalOptions::evals`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalKind {
    Core,
    Absorption,
    SparseProbing,
    Tpp,
    Scr,
}

impl EvalKind {
    /// Parse an evaluation name; unlearning and autointerp are known but unavailable.
    pub fn parse(name: &str) -> Result<EvalKind> {
        Ok(match name.trim().to_ascii_lowercase().as_str() {
            "core" => EvalKind::Core,
            "absorption" | "absorption_first_letter" => EvalKind::Absorption,
            "sparse_probing" | "sparse-probing" => EvalKind::SparseProbing,
            "tpp" => EvalKind::Tpp,
            "scr" => EvalKind::Scr,
            "unlearning" => bail!(
                "eval 'unlearning' not available: needs an instruction-tuned model (SAEBench uses gemma-2-2b-it), \
                 the WMDP-bio forget corpus (released only on request by its authors) and the WMDP/MMLU \
                 multiple-choice sets, none of which are reachable here"
            ),
            "autointerp" => bail!(
                "eval 'autointerp' not available: needs an LLM judge (SAEBench calls gpt-4o-mini through an \
                 API) to write and score latent explanations; no such model is reachable offline"
            ),
            other => bail!("unknown eval '{other}' (known: core, absorption, sparse_probing, tpp, scr; unavailable: unlearning, autointerp)"),
        })
    }

    pub fn type_id(&self) -> &'static str {
        match self {
            EvalKind::Core => "core",
            EvalKind::Absorption => "absorption_first_letter",
            EvalKind::SparseProbing => "sparse_probing",
            EvalKind::Tpp => "tpp",
            EvalKind::Scr => "scr",
        }
    }
}

/// Everything [`run_evals`] needs besides the SAE and the LM.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Evaluation names, in output order.
    pub evals: Vec<String>,
    /// Hook point of the SAE, e.g. "blocks.12.hook_resid_post".
    pub hook: String,
    /// Seed of every random choice (overrides the per-eval configs' seeds).
    pub seed: u64,
    /// Directory of the LM activation cache (`None` = no caching).
    pub cache_dir: Option<PathBuf>,
    pub identity: SaeIdentity,
    pub core: CoreConfig,
    /// Texts for the core evaluation's token stream.
    pub core_texts: Vec<String>,
    pub absorption: AbsorptionConfig,
    pub sparse_probing: SparseProbingConfig,
    /// Datasets for sparse probing (and TPP when `tpp_datasets` is empty).
    pub probing_datasets: Vec<ProbeDataset>,
    pub scr_tpp: ScrTppConfig,
    pub tpp_datasets: Vec<ProbeDataset>,
    pub scr: Option<ScrSpec>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            evals: vec!["core".into()],
            hook: String::new(),
            seed: 42,
            cache_dir: None,
            identity: SaeIdentity::default(),
            core: CoreConfig::default(),
            core_texts: Vec::new(),
            absorption: AbsorptionConfig::default(),
            sparse_probing: SparseProbingConfig::default(),
            probing_datasets: Vec::new(),
            scr_tpp: ScrTppConfig::default(),
            tpp_datasets: Vec::new(),
            scr: None,
        }
    }
}

/// What [`run_evals`] produced.
#[derive(Clone, Debug)]
pub struct EvalRun {
    pub paths: Vec<PathBuf>,
    pub results: Vec<EvalResult>,
    /// [`output::summary_table`] of the results.
    pub summary: String,
}

/// Check the requested evaluations and their inputs before any work.
fn validate(
    opts: &EvalOptions,
    sae: &saelab_sae::model::Sae,
    lm: &dyn HookedLm,
) -> Result<Vec<EvalKind>> {
    if opts.evals.is_empty() {
        bail!("no evaluation requested");
    }
    let mut kinds = Vec::new();
    for name in &opts.evals {
        let k = EvalKind::parse(name)?;
        if kinds.contains(&k) {
            bail!("eval '{name}' requested twice");
        }
        kinds.push(k);
    }
    if sae.d_in != lm.d_model() {
        bail!(
            "SAE d_in {} does not match the model width {} of {} at {}",
            sae.d_in,
            lm.d_model(),
            lm.name(),
            opts.hook
        );
    }
    if sae.w_enc.len() != sae.d_in * sae.d_sae || sae.w_dec.len() != sae.d_in * sae.d_sae {
        bail!(
            "SAE weights do not match d_in {} x d_sae {}",
            sae.d_in,
            sae.d_sae
        );
    }
    if opts.hook.is_empty() {
        bail!("no hook point given");
    }
    if !sae.metadata.hook_name.is_empty() && sae.metadata.hook_name != opts.hook {
        tracing::warn!(
            "the SAE was trained at {} but is evaluated at {}",
            sae.metadata.hook_name,
            opts.hook
        );
    }
    for k in &kinds {
        match k {
            EvalKind::Core if opts.core_texts.iter().all(|t| t.trim().is_empty()) => {
                bail!("core: no texts given (EvalOptions::core_texts)")
            }
            EvalKind::SparseProbing if opts.probing_datasets.is_empty() => {
                bail!("sparse_probing: no dataset given")
            }
            EvalKind::Tpp if opts.tpp_datasets.is_empty() && opts.probing_datasets.is_empty() => {
                bail!("tpp: no dataset given")
            }
            EvalKind::Scr if opts.scr.is_none() => {
                bail!("scr: no dataset and attribute pair given (EvalOptions::scr)")
            }
            _ => {}
        }
    }
    Ok(kinds)
}

/// Run the requested evaluations and write one result file per evaluation.
pub fn run_evals(
    opts: &EvalOptions,
    sae: &saelab_sae::model::Sae,
    lm: &dyn HookedLm,
    out_dir: &Path,
) -> Result<EvalRun> {
    let kinds = validate(opts, sae, lm)?;
    let cache = cache::ActCache::new(opts.cache_dir.clone());
    let hook = opts.hook.as_str();
    let mut results = Vec::new();
    for k in &kinds {
        let t0 = std::time::Instant::now();
        let r = match k {
            EvalKind::Core => {
                let texts: Vec<&str> = opts.core_texts.iter().map(|s| s.as_str()).collect();
                core_eval::run_core(lm, sae, hook, &texts, &opts.core, &cache)
            }
            EvalKind::Absorption => {
                let cfg = AbsorptionConfig {
                    seed: opts.seed,
                    ..opts.absorption.clone()
                };
                absorption::run_absorption(lm, sae, hook, &cfg, &cache)
            }
            EvalKind::SparseProbing => {
                let cfg = SparseProbingConfig {
                    seed: opts.seed,
                    ..opts.sparse_probing.clone()
                };
                sparse_probing::run_sparse_probing(
                    lm,
                    sae,
                    hook,
                    &opts.probing_datasets,
                    &cfg,
                    &cache,
                )
            }
            EvalKind::Tpp => {
                let cfg = ScrTppConfig {
                    seed: opts.seed,
                    ..opts.scr_tpp.clone()
                };
                let ds = if opts.tpp_datasets.is_empty() {
                    &opts.probing_datasets
                } else {
                    &opts.tpp_datasets
                };
                scr_tpp::run_tpp(lm, sae, hook, ds, &cfg, &cache)
            }
            EvalKind::Scr => {
                let cfg = ScrTppConfig {
                    seed: opts.seed,
                    ..opts.scr_tpp.clone()
                };
                scr_tpp::run_scr(
                    lm,
                    sae,
                    hook,
                    opts.scr.as_ref().expect("validated"),
                    &cfg,
                    &cache,
                )
            }
        }
        .with_context(|| format!("eval '{}' failed", k.type_id()))?;
        tracing::info!(
            "eval {} done in {:.1} s",
            k.type_id(),
            t0.elapsed().as_secs_f64()
        );
        results.push(r);
    }
    // All evaluations succeeded: now write the files.
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    // eval_id identifies a run, so it is drawn from the clock, not the result seed.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = saelab_core::rng::Rng::new(nanos ^ ((std::process::id() as u64) << 32));
    let mut paths = Vec::new();
    for r in &results {
        let json = output::result_json(r, sae, &opts.identity, &output::uuid4(&mut rng), millis);
        let path = out_dir.join(format!("{}_eval_results.json", r.eval_type_id));
        output::write_result(&path, &json)?;
        paths.push(path);
    }
    let summary = output::summary_table(&results);
    Ok(EvalRun {
        paths,
        results,
        summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm_api::ToyLm;
    use crate::sparse_probing::tests::class_docs;
    use crate::testutil::{random_sae, toy_texts, toy_words, Counting};
    use std::cell::Cell;

    fn options(dir: &Path) -> EvalOptions {
        let words = toy_words();
        let mut docs = class_docs(&words, 30, 4, 9);
        for d in docs.iter_mut() {
            let t = d.labels["topic"].clone();
            d.labels.insert(
                "pair".into(),
                if t == "class0" || t == "class2" {
                    "p"
                } else {
                    "q"
                }
                .into(),
            );
        }
        let ds = ProbeDataset {
            name: "toy".into(),
            label_key: "topic".into(),
            docs,
        };
        EvalOptions {
            evals: ["core", "absorption", "sparse_probing", "tpp", "scr"]
                .map(String::from)
                .to_vec(),
            hook: "blocks.0.hook_resid_post".into(),
            seed: 7,
            cache_dir: Some(dir.join("cache")),
            identity: SaeIdentity {
                sae_lens_id: "toy-sae".into(),
                sae_lens_release_id: "test".into(),
            },
            core: CoreConfig {
                batch_prompts: 2,
                ctx: 16,
                recon_batches: 2,
                sparsity_batches: 4,
                ..Default::default()
            },
            core_texts: toy_texts(&words, 80, 3),
            absorption: AbsorptionConfig {
                gt_probe_epochs: 5,
                k_sparse_probe_epochs: 5,
                min_feats_for_eval: 1,
                min_gt_probe_f1: 0.0,
                max_k_value: 3,
                // SAEBench's one prompt per word here; the packed rows are tested in
                // absorption.rs.
                packed_ctx: None,
                ..Default::default()
            },
            sparse_probing: SparseProbingConfig {
                n_train: 40,
                n_val: 10,
                n_test: 20,
                ctx: 24,
                ks: vec![1, 5],
                probe_epochs: 10,
                probe_batch: 16,
                ..Default::default()
            },
            probing_datasets: vec![ds.clone()],
            scr_tpp: ScrTppConfig {
                n_values: vec![2, 10],
                n_train: 40,
                n_test: 20,
                ctx: 24,
                probe_epochs: 5,
                ..Default::default()
            },
            tpp_datasets: Vec::new(),
            scr: Some(ScrSpec {
                dataset: ds,
                a: Attribute {
                    key: "pair".into(),
                    pos: "p".into(),
                    neg: "q".into(),
                },
                b: Attribute {
                    key: "half".into(),
                    pos: "lo".into(),
                    neg: "hi".into(),
                },
            }),
        }
    }

    #[test]
    fn all_evals_write_saebench_files_and_the_second_sae_reuses_the_cache() {
        let dir = std::env::temp_dir().join(format!("saelab-run-evals-{}", std::process::id()));
        let words = toy_words();
        let refs: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
        let toy = ToyLm::new(&refs, 12, 1, 4);
        let lm = Counting {
            inner: &toy,
            tokens: Cell::new(0),
        };
        let opts = options(&dir);
        let run = run_evals(&opts, &random_sae(12, 48, 1), &lm, &dir.join("a")).unwrap();
        let first = lm.tokens.replace(0);
        assert_eq!(run.paths.len(), 5);
        let keys = [
            "eval_type_id",
            "eval_config",
            "eval_id",
            "datetime_epoch_millis",
            "eval_result_metrics",
            "eval_result_details",
            "sae_bench_commit_hash",
            "sae_lens_id",
            "sae_lens_release_id",
            "sae_lens_version",
            "sae_cfg_dict",
            "eval_result_unstructured",
        ];
        for (p, ty) in run.paths.iter().zip([
            "core",
            "absorption_first_letter",
            "sparse_probing",
            "tpp",
            "scr",
        ]) {
            let text = std::fs::read_to_string(p).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["eval_type_id"], ty);
            let pos: Vec<usize> = keys
                .iter()
                .map(|k| {
                    text.find(&format!("\n  \"{k}\":"))
                        .unwrap_or_else(|| panic!("{k} missing in {ty}"))
                })
                .collect();
            assert!(
                pos.windows(2).all(|w| w[0] < w[1]),
                "top-level keys out of order in {ty}"
            );
            // Results (not the config, where null means "no cap") never hold null.
            let results = format!("{}{}", v["eval_result_metrics"], v["eval_result_details"]);
            assert!(
                !text.contains("NaN") && !results.contains("null"),
                "non-finite values must be -1"
            );
        }
        assert!(run.summary.contains("core/model_behavior_preservation"));
        // A second SAE on the same model and hook: only the SAE-dependent passes run.
        let run2 = run_evals(&opts, &random_sae(12, 48, 2), &lm, &dir.join("b")).unwrap();
        let second = lm.tokens.get();
        assert_eq!(run2.paths.len(), 5);
        assert!(
            second * 3 < first,
            "second SAE ran {second} LM tokens, first {first}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_input_is_a_clear_error_and_writes_nothing() {
        let dir = std::env::temp_dir().join(format!("saelab-run-evals-bad-{}", std::process::id()));
        let words = toy_words();
        let refs: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
        let toy = ToyLm::new(&refs, 12, 1, 4);
        let mut opts = options(&dir);
        opts.cache_dir = None;
        let out = dir.join("out");
        let err = |o: &EvalOptions, d: usize| {
            run_evals(o, &random_sae(d, 24, 1), &toy, &out)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&opts, 11).contains("does not match the model width"));
        opts.evals = vec!["core".into(), "bogus".into()];
        assert!(err(&opts, 12).contains("unknown eval 'bogus'"));
        opts.evals = vec!["unlearning".into()];
        assert!(err(&opts, 12).contains("not available: needs"));
        opts.evals = vec!["autointerp".into()];
        assert!(err(&opts, 12).contains("not available: needs"));
        // A failing evaluation after a succeeding one: no file at all.
        opts.evals = vec!["core".into(), "sparse_probing".into()];
        opts.probing_datasets[0].label_key = "no-such-label".into();
        let e = run_evals(&opts, &random_sae(12, 24, 1), &toy, &out).unwrap_err();
        assert!(format!("{e:#}").contains("fewer than 2 classes"), "{e:#}");
        assert!(!out.exists(), "no partial results");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
