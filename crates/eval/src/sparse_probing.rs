//! Sparse probing (SAEBench `evals/sparse_probing`) and the one-vs-rest task builder
//! shared with TPP.
//!
//! Per dataset, the `max_classes` largest classes of the label key each give a
//! balanced one-vs-rest task: positives are the class's documents, negatives are drawn
//! evenly (round robin) from the other classes. Documents are split per class into
//! train / validation / test before any task is built, so no document is in two
//! splits. Probes: a full-width logistic probe by AdamW with early stopping on the
//! validation loss (never the test set), and for each k an L2 logistic regression on
//! the k dimensions/latents with the largest `|mean(pos) - mean(neg)|` on the train
//! split. Scores are test accuracies, averaged over classes then datasets.

use crate::cache::ActCache;
use crate::lm_api::HookedLm;
use crate::output::{EvalResult, J};
use crate::probe::{
    accuracy, fit_logreg_l2, top_k_by_mean_diff, train_adam_probe, AdamProbeConfig, Design,
    LogRegConfig,
};
use crate::tasks::{
    collect_doc_acts, gather_codes, gather_rows, pool_llm, pool_sae, texts_fingerprint,
    LabeledText, ProbeDataset,
};
use anyhow::{bail, Context, Result};
use saelab_core::rng::Rng;
use saelab_sae::codes::SparseCodes;
use saelab_sae::model::Sae;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct SparseProbingConfig {
    /// Per task (half positive, half negative).
    pub n_train: usize,
    pub n_val: usize,
    pub n_test: usize,
    pub ctx: usize,
    pub max_classes: usize,
    pub ks: Vec<usize>,
    pub llm_batch_size: usize,
    pub probe_epochs: usize,
    pub probe_batch: usize,
    pub probe_lr: f32,
    pub probe_patience: usize,
    pub seed: u64,
}

impl Default for SparseProbingConfig {
    fn default() -> Self {
        // CPU-sized: each class of a dataset contributes (n_train + n_val + n_test) / 2
        // documents to the pool that goes through the LM, so these sizes keep the five
        // default datasets near 300k LM tokens (about 3 minutes here, once per model
        // and hook). `saelab eval --sizes saebench` restores 4000 / 1000.
        SparseProbingConfig {
            n_train: 240,
            n_val: 60,
            n_test: 120,
            ctx: 128,
            max_classes: 4,
            ks: vec![1, 2, 5, 10, 20, 50],
            llm_batch_size: 16,
            probe_epochs: 100,
            // SAEBench: 250 on 4000 rows (16 steps per epoch); smaller sets need a
            // smaller batch for the same number of steps.
            probe_batch: 64,
            probe_lr: 1e-2,
            probe_patience: 5,
            seed: 42,
        }
    }
}

/// The seed of a dataset's splits, from the run's seed and the dataset's name. TPP
/// uses the same seed for a dataset that sparse probing also probes: each class's
/// documents are then shuffled alike, and since both take a prefix of each shuffled
/// class, TPP's smaller pool lies inside sparse probing's and its LM activations are
/// reused ([`crate::tasks::collect_doc_acts`]).
pub fn dataset_seed(seed: u64, name: &str) -> u64 {
    seed ^ crate::cache::fnv64(name.bytes())
}

/// A balanced binary task over rows of a document pool.
#[derive(Clone, Debug, PartialEq)]
pub struct BinaryTask {
    pub name: String,
    /// (pool row, label) per split.
    pub train: Vec<(usize, bool)>,
    pub val: Vec<(usize, bool)>,
    pub test: Vec<(usize, bool)>,
}

/// The document pool of a dataset (indices into its docs) and its one-vs-rest tasks.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskSet {
    pub pool: Vec<usize>,
    pub tasks: Vec<BinaryTask>,
}

/// Build balanced one-vs-rest tasks from `docs` labelled under `key`.
pub fn one_vs_rest_tasks(
    name: &str,
    docs: &[LabeledText],
    key: &str,
    sizes: (usize, usize, usize),
    max_classes: usize,
    seed: u64,
) -> Result<TaskSet> {
    let (n_train, n_val, n_test) = sizes;
    if n_train < 2 || n_val < 2 || n_test < 2 {
        bail!(
            "{name}: train/val/test sizes must each be at least 2 (got {n_train}/{n_val}/{n_test})"
        );
    }
    let mut by_class: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, d) in docs.iter().enumerate() {
        if let Some(v) = d.labels.get(key) {
            if d.text.trim().is_empty() {
                bail!("{name}: document {i} has an empty text");
            }
            by_class.entry(v.as_str()).or_default().push(i);
        }
    }
    let mut classes: Vec<(&str, Vec<usize>)> =
        by_class.into_iter().filter(|(_, v)| v.len() >= 6).collect();
    classes.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    classes.truncate(max_classes);
    if classes.len() < 2 {
        bail!("{name}: label '{key}' gives fewer than 2 classes with at least 6 documents; a probing task needs two classes");
    }
    let mut rng = Rng::new(seed);
    // Per class: train / val / test document lists, scaled down if the class is small.
    let want = (n_train / 2, n_val / 2, n_test / 2);
    let mut splits: Vec<[Vec<usize>; 3]> = Vec::new();
    for (_, docs_c) in &classes {
        let mut v = docs_c.clone();
        rng.shuffle(&mut v);
        let total = want.0 + want.1 + want.2;
        let scale = (v.len() as f64 / total as f64).min(1.0);
        let a = ((want.0 as f64 * scale) as usize).max(1);
        let b = ((want.1 as f64 * scale) as usize).max(1);
        let c = ((want.2 as f64 * scale) as usize)
            .max(1)
            .min(v.len().saturating_sub(a + b));
        splits.push([
            v[..a].to_vec(),
            v[a..a + b].to_vec(),
            v[a + b..a + b + c].to_vec(),
        ]);
    }
    let mut pool: Vec<usize> = splits
        .iter()
        .flat_map(|s| s.iter().flatten().copied())
        .collect();
    pool.sort_unstable();
    let row_of: BTreeMap<usize, usize> = pool.iter().enumerate().map(|(r, &d)| (d, r)).collect();
    let mut tasks = Vec::new();
    for (ci, (cname, _)) in classes.iter().enumerate() {
        let mut parts: Vec<Vec<(usize, bool)>> = Vec::new();
        for (s, pos) in splits[ci].iter().enumerate() {
            // Negatives: round robin over the other classes (each shuffled).
            let mut others: Vec<Vec<usize>> = (0..classes.len())
                .filter(|&o| o != ci)
                .map(|o| splits[o][s].clone())
                .collect();
            for o in &mut others {
                rng.shuffle(o);
            }
            let mut neg = Vec::with_capacity(pos.len());
            let mut cursor = vec![0usize; others.len()];
            while neg.len() < pos.len() {
                let mut progressed = false;
                for (o, list) in others.iter().enumerate() {
                    if neg.len() < pos.len() && cursor[o] < list.len() {
                        neg.push(list[cursor[o]]);
                        cursor[o] += 1;
                        progressed = true;
                    }
                }
                if !progressed {
                    break;
                }
            }
            let n = pos.len().min(neg.len());
            let mut part: Vec<(usize, bool)> = pos[..n]
                .iter()
                .map(|d| (row_of[d], true))
                .chain(neg[..n].iter().map(|d| (row_of[d], false)))
                .collect();
            rng.shuffle(&mut part);
            parts.push(part);
        }
        let test = parts.pop().unwrap();
        let val = parts.pop().unwrap();
        let train = parts.pop().unwrap();
        tasks.push(BinaryTask {
            name: cname.to_string(),
            train,
            val,
            test,
        });
    }
    Ok(TaskSet { pool, tasks })
}

/// Pooled LM activations [n_pool, d] and pooled SAE latents of a dataset's pool.
pub struct PooledData {
    pub x: Vec<f32>,
    pub d: usize,
    pub f: SparseCodes,
}

/// Collect (cached) and pool the activations of the pool documents.
#[allow(clippy::too_many_arguments)] // the cache key needs every one of them
pub fn pooled_data(
    lm: &dyn HookedLm,
    sae: &Sae,
    hook: &str,
    ds: &ProbeDataset,
    pool: &[usize],
    ctx: usize,
    batch: usize,
    eval: &str,
    seed: u64,
    cache: &ActCache,
) -> Result<PooledData> {
    let texts: Vec<&str> = pool.iter().map(|&i| ds.docs[i].text.as_str()).collect();
    let key = format!(
        "{eval}|{}|{hook}|{}|n={}|ctx={ctx}|seed={seed}|texts={}",
        lm.name(),
        ds.name,
        texts.len(),
        texts_fingerprint(texts.iter().copied())
    );
    let acts = collect_doc_acts(lm, hook, &texts, ctx, batch, cache, &key)
        .with_context(|| format!("dataset {}", ds.name))?;
    Ok(PooledData {
        x: pool_llm(&acts),
        d: acts.d,
        f: pool_sae(&acts, sae)?,
    })
}

fn split_xy(rows: &[(usize, bool)]) -> (Vec<usize>, Vec<bool>) {
    (
        rows.iter().map(|r| r.0).collect(),
        rows.iter().map(|r| r.1).collect(),
    )
}

/// Test accuracy of the full-width probe (early-stopped on validation) and of the
/// top-k L2 probes, on one input representation.
fn probe_task(
    full_train: &Design,
    full_val: &Design,
    full_test: &Design,
    task: &BinaryTask,
    cfg: &SparseProbingConfig,
    seed: u64,
) -> Result<(f64, Vec<f64>)> {
    let ytr: Vec<bool> = task.train.iter().map(|r| r.1).collect();
    let yva: Vec<bool> = task.val.iter().map(|r| r.1).collect();
    let yte: Vec<bool> = task.test.iter().map(|r| r.1).collect();
    let f = |v: &[bool]| v.iter().map(|&b| b as u8 as f32).collect::<Vec<f32>>();
    let pc = AdamProbeConfig {
        lr: cfg.probe_lr,
        epochs: cfg.probe_epochs,
        batch: cfg.probe_batch,
        decoupled: true,
        weight_decay: 1e-2,
        patience: Some(cfg.probe_patience),
        seed,
        ..Default::default()
    };
    // Standardised dense copies (train mean and std): pooled latents are all positive
    // with large means, and without centring a few Adam steps cannot leave the
    // constant-prediction regime.
    let (mean, std) = column_mean_std(full_train);
    let (n_tr, n_va, n_te, d) = (full_train.n(), full_val.n(), full_test.n(), full_train.d());
    let (s_tr, s_va, s_te) = (
        standardized(full_train, &mean, &std),
        standardized(full_val, &mean, &std),
        standardized(full_test, &mean, &std),
    );
    let (d_tr, d_va, d_te) = (
        Design::dense(&s_tr, n_tr, d),
        Design::dense(&s_va, n_va, d),
        Design::dense(&s_te, n_te, d),
    );
    let p = train_adam_probe(&d_tr, &f(&ytr), 1, &pc, Some((&d_va, &f(&yva))))?;
    let z = p.logits(&d_te, None);
    let full_acc = accuracy(&z.iter().map(|v| *v > 0.0).collect::<Vec<_>>(), &yte);
    let mut ks = Vec::new();
    for &k in &cfg.ks {
        if k > full_train.d() {
            ks.push(f64::NAN);
            continue;
        }
        let cols = top_k_by_mean_diff(full_train, &ytr, k);
        let m = fit_logreg_l2(full_train, &ytr, Some(&cols), &LogRegConfig::default())?;
        ks.push(accuracy(&m.predict(full_test), &yte));
    }
    Ok((full_acc, ks))
}

/// Per-column mean and standard deviation (1 where the column is constant).
fn column_mean_std(x: &Design) -> (Vec<f32>, Vec<f32>) {
    let all = vec![true; x.n()];
    let mean = x.column_means(&all);
    let sq: Vec<f64> = {
        let mut s = vec![0f64; x.d()];
        let dense = standardized(x, &vec![0.0; x.d()], &vec![1.0; x.d()]);
        for row in dense.chunks_exact(x.d().max(1)) {
            for (a, v) in s.iter_mut().zip(row) {
                *a += (*v as f64) * (*v as f64);
            }
        }
        s
    };
    let n = x.n().max(1) as f64;
    let std = sq
        .iter()
        .zip(&mean)
        .map(|(s2, m)| {
            let v = (s2 / n - m * m).max(0.0).sqrt();
            if v > 1e-8 {
                v as f32
            } else {
                1.0
            }
        })
        .collect();
    (mean.iter().map(|m| *m as f32).collect(), std)
}

/// A dense copy of `x` with columns standardised by `mean` and `std`.
fn standardized(x: &Design, mean: &[f32], std: &[f32]) -> Vec<f32> {
    let d = x.d();
    let mut out = Vec::with_capacity(x.n() * d);
    for i in 0..x.n() {
        out.extend(mean.iter().zip(std).map(|(m, s)| -m / s));
        let row = &mut out[i * d..(i + 1) * d];
        match x {
            Design::Dense { x, .. } => {
                for j in 0..d {
                    row[j] = (x[i * d + j] - mean[j]) / std[j];
                }
            }
            Design::Sparse(c) => {
                let (idx, val) = c.row(i);
                for (&j, &v) in idx.iter().zip(val) {
                    let j = j as usize;
                    row[j] = (v - mean[j]) / std[j];
                }
            }
        }
    }
    out
}

/// Test accuracy of the full-width probe and of each top-k probe.
pub type ProbeScores = (f64, Vec<f64>);

/// LM and SAE probe accuracies of one task.
pub fn evaluate_task(
    data: &PooledData,
    task: &BinaryTask,
    cfg: &SparseProbingConfig,
    seed: u64,
) -> Result<(ProbeScores, ProbeScores)> {
    let (rtr, _) = split_xy(&task.train);
    let (rva, _) = split_xy(&task.val);
    let (rte, _) = split_xy(&task.test);
    let d = data.d;
    let (xtr, xva, xte) = (
        gather_rows(&data.x, d, &rtr),
        gather_rows(&data.x, d, &rva),
        gather_rows(&data.x, d, &rte),
    );
    let llm = probe_task(
        &Design::dense(&xtr, rtr.len(), d),
        &Design::dense(&xva, rva.len(), d),
        &Design::dense(&xte, rte.len(), d),
        task,
        cfg,
        seed,
    )
    .with_context(|| format!("LM probe for class '{}'", task.name))?;
    let (ftr, fva, fte) = (
        gather_codes(&data.f, &rtr),
        gather_codes(&data.f, &rva),
        gather_codes(&data.f, &rte),
    );
    let sae = probe_task(
        &Design::Sparse(&ftr),
        &Design::Sparse(&fva),
        &Design::Sparse(&fte),
        task,
        cfg,
        seed,
    )
    .with_context(|| format!("SAE probe for class '{}'", task.name))?;
    Ok((llm, sae))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Run sparse probing over datasets.
pub fn run_sparse_probing(
    lm: &dyn HookedLm,
    sae: &Sae,
    hook: &str,
    datasets: &[ProbeDataset],
    cfg: &SparseProbingConfig,
    cache: &ActCache,
) -> Result<EvalResult> {
    crate::lm_api::check_sae_width(sae, lm, hook)?;
    if datasets.is_empty() {
        bail!("sparse probing: no dataset given");
    }
    let nk = cfg.ks.len();
    let (mut llm_all, mut sae_all): (Vec<Vec<f64>>, Vec<Vec<f64>>) = (Vec::new(), Vec::new());
    let mut details = Vec::new();
    let mut per_class = Vec::new();
    for ds in datasets {
        let seed = dataset_seed(cfg.seed, &ds.name);
        let ts = one_vs_rest_tasks(
            &ds.name,
            &ds.docs,
            &ds.label_key,
            (cfg.n_train, cfg.n_val, cfg.n_test),
            cfg.max_classes,
            seed,
        )?;
        let data = pooled_data(
            lm,
            sae,
            hook,
            ds,
            &ts.pool,
            cfg.ctx,
            cfg.llm_batch_size,
            "sparse_probing",
            seed,
            cache,
        )?;
        // Per dataset: mean over classes of [full, top-k...] for LLM and SAE.
        let (mut l_rows, mut s_rows) = (Vec::new(), Vec::new());
        for (ti, task) in ts.tasks.iter().enumerate() {
            let ((la, lk), (sa, sk)) = evaluate_task(&data, task, cfg, seed ^ (ti as u64 + 1))
                .with_context(|| format!("dataset {}", ds.name))?;
            per_class.push(J::obj(vec![
                ("dataset_name", J::str(&ds.name)),
                ("class", J::str(&task.name)),
                ("n_train", J::Int(task.train.len() as i64)),
                ("n_test", J::Int(task.test.len() as i64)),
                ("llm_test_accuracy", J::Num(la)),
                ("llm_top_k_test_accuracy", J::nums(&lk)),
                ("sae_test_accuracy", J::Num(sa)),
                ("sae_top_k_test_accuracy", J::nums(&sk)),
            ]));
            l_rows.push(std::iter::once(la).chain(lk).collect::<Vec<_>>());
            s_rows.push(std::iter::once(sa).chain(sk).collect::<Vec<_>>());
        }
        let col_mean = |rows: &[Vec<f64>]| {
            (0..=nk)
                .map(|j| mean(&rows.iter().map(|r| r[j]).collect::<Vec<_>>()))
                .collect::<Vec<f64>>()
        };
        let (lm_mean, sae_mean) = (col_mean(&l_rows), col_mean(&s_rows));
        let mut det = vec![
            ("dataset_name", J::str(&ds.name)),
            ("llm_test_accuracy", J::Num(lm_mean[0])),
        ];
        let names: Vec<(String, String)> = cfg
            .ks
            .iter()
            .map(|k| {
                (
                    format!("llm_top_{k}_test_accuracy"),
                    format!("sae_top_{k}_test_accuracy"),
                )
            })
            .collect();
        for (j, (ln, _)) in names.iter().enumerate() {
            det.push((ln.as_str(), J::Num(lm_mean[j + 1])));
        }
        det.push(("sae_test_accuracy", J::Num(sae_mean[0])));
        for (j, (_, sn)) in names.iter().enumerate() {
            det.push((sn.as_str(), J::Num(sae_mean[j + 1])));
        }
        details.push(J::obj(det));
        llm_all.push(lm_mean);
        sae_all.push(sae_mean);
    }
    let over = |rows: &[Vec<f64>], j: usize| mean(&rows.iter().map(|r| r[j]).collect::<Vec<_>>());
    let mut llm_m = vec![("llm_test_accuracy".to_string(), over(&llm_all, 0))];
    let mut sae_m = vec![("sae_test_accuracy".to_string(), over(&sae_all, 0))];
    for (j, k) in cfg.ks.iter().enumerate() {
        llm_m.push((format!("llm_top_{k}_test_accuracy"), over(&llm_all, j + 1)));
        sae_m.push((format!("sae_top_{k}_test_accuracy"), over(&sae_all, j + 1)));
    }
    let config = J::obj(vec![
        ("model_name", J::str(lm.name())),
        ("hook_name", J::str(hook)),
        ("random_seed", J::Int(cfg.seed as i64)),
        (
            "dataset_names",
            J::Arr(datasets.iter().map(|d| J::str(&d.name)).collect()),
        ),
        ("probe_train_set_size", J::Int(cfg.n_train as i64)),
        ("probe_val_set_size", J::Int(cfg.n_val as i64)),
        ("probe_test_set_size", J::Int(cfg.n_test as i64)),
        ("context_length", J::Int(cfg.ctx as i64)),
        ("sae_batch_size", J::Int(cfg.llm_batch_size as i64)),
        (
            "k_values",
            J::Arr(cfg.ks.iter().map(|&k| J::Int(k as i64)).collect()),
        ),
        ("max_classes", J::Int(cfg.max_classes as i64)),
        (
            "model_selection",
            J::str("early stopping on the validation split; test used only for reporting"),
        ),
        (
            "full_probe_inputs",
            J::str("standardised with the train split mean and std"),
        ),
    ]);
    Ok(EvalResult {
        eval_type_id: "sparse_probing".into(),
        eval_config: config,
        metrics: vec![("llm".into(), llm_m), ("sae".into(), sae_m)],
        details,
        unstructured: J::obj(vec![("per_class", J::Arr(per_class))]),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::lm_api::ToyLm;
    use crate::testutil::{identity_sae, toy_words};

    /// Documents whose words come mostly from a class-specific quarter of the vocabulary.
    pub fn class_docs(
        words: &[String],
        n_per_class: usize,
        classes: usize,
        seed: u64,
    ) -> Vec<LabeledText> {
        let mut r = Rng::new(seed);
        let mut docs = Vec::new();
        let q = words.len() / classes;
        for c in 0..classes {
            for _ in 0..n_per_class {
                let len = 6 + r.below(10);
                let text: Vec<&str> = (0..len)
                    .map(|_| {
                        if r.f32() < 0.5 {
                            words[c * q + r.below(q)].as_str()
                        } else {
                            words[r.below(words.len())].as_str()
                        }
                    })
                    .collect();
                let cname = format!("class{c}");
                docs.push(LabeledText::new(
                    text.join(" "),
                    &[
                        ("topic", cname.as_str()),
                        ("half", if c < classes / 2 { "lo" } else { "hi" }),
                    ],
                ));
            }
        }
        docs
    }

    #[test]
    fn tasks_are_balanced_disjoint_and_seeded() {
        let words = toy_words();
        let docs = class_docs(&words, 30, 6, 1);
        let ts = one_vs_rest_tasks("toy", &docs, "topic", (20, 8, 12), 5, 3).unwrap();
        assert_eq!(ts.tasks.len(), 5);
        for t in &ts.tasks {
            for part in [&t.train, &t.val, &t.test] {
                let pos = part.iter().filter(|r| r.1).count();
                assert_eq!(pos * 2, part.len(), "balanced");
            }
            assert_eq!(t.train.len(), 20);
            let tr: std::collections::BTreeSet<usize> = t.train.iter().map(|r| r.0).collect();
            assert!(
                t.test.iter().all(|r| !tr.contains(&r.0)),
                "train and test overlap"
            );
            for &(row, lab) in &t.train {
                assert_eq!(docs[ts.pool[row]].labels["topic"] == t.name, lab);
            }
        }
        assert_eq!(
            ts,
            one_vs_rest_tasks("toy", &docs, "topic", (20, 8, 12), 5, 3).unwrap()
        );
        // One class only: a clear error.
        let one: Vec<LabeledText> = docs
            .iter()
            .filter(|d| d.labels["topic"] == "class0")
            .cloned()
            .collect();
        assert!(one_vs_rest_tasks("toy", &one, "topic", (20, 8, 12), 5, 3)
            .unwrap_err()
            .to_string()
            .contains("fewer than 2 classes"));
        let mut empty = docs.clone();
        empty[3].text = " ".into();
        assert!(one_vs_rest_tasks("toy", &empty, "topic", (20, 8, 12), 5, 3)
            .unwrap_err()
            .to_string()
            .contains("empty text"));
    }

    #[test]
    fn probing_beats_chance_on_toy_classes() {
        let words = toy_words();
        let refs: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
        let lm = ToyLm::new(&refs, 16, 1, 2);
        let ds = ProbeDataset {
            name: "toy".into(),
            label_key: "topic".into(),
            docs: class_docs(&words, 40, 3, 5),
        };
        let cfg = SparseProbingConfig {
            n_train: 40,
            n_val: 10,
            n_test: 20,
            ctx: 32,
            ks: vec![1, 5, 40],
            probe_epochs: 60,
            probe_batch: 16,
            ..Default::default()
        };
        let r = run_sparse_probing(
            &lm,
            &identity_sae(16),
            "blocks.0.hook_resid_post",
            &[ds],
            &cfg,
            &ActCache::default(),
        )
        .unwrap();
        let llm = r.metric("llm", "llm_test_accuracy").unwrap();
        let sae = r.metric("sae", "sae_test_accuracy").unwrap();
        assert!(llm > 0.75, "llm accuracy {llm}");
        assert!(sae > 0.75, "sae accuracy {sae}");
        assert!(
            r.metric("llm", "llm_top_40_test_accuracy")
                .unwrap()
                .is_nan(),
            "k > d is not applicable"
        );
        assert!(r.metric("sae", "sae_top_5_test_accuracy").unwrap() > 0.6);
        assert_eq!(r.details.len(), 1);
    }
}
