//! Targeted probe perturbation (TPP) and spurious correlation removal (SCR)
//! (SAEBench `evals/scr_and_tpp`).
//!
//! Probes are logistic on pooled LM activations (Adam, lr 1e-3, L1 1e-3, batch 16,
//! 20 epochs). For a probe `w` and its binary train split, each latent's effect is
//! `delta_f * (w . W_dec[f])` with `delta_f = mean_pos(f) - mean_neg(f)` of pooled
//! latents; TPP clamps `delta_f >= 0` and ranks by effect, SCR ranks by `|effect|`.
//! Ablating latents `A` gives pooled activations `mean x - sum_{f in A} mean(f) W_dec[f]`
//! (see `tasks`); only non-special tokens are pooled, so padding never turns
//! non-zero (SAEBench quirk 7), and clean and ablated accuracies use the same test
//! documents (quirk 6).

use crate::cache::ActCache;
use crate::lm_api::HookedLm;
use crate::output::{EvalResult, J};
use crate::probe::{accuracy, train_adam_probe, AdamProbeConfig, Design, LinearProbe};
use crate::sparse_probing::{dataset_seed, one_vs_rest_tasks, pooled_data, BinaryTask, PooledData};
use crate::tasks::{gather_codes, gather_rows, pool_ablated, LabeledText, ProbeDataset};
use anyhow::{bail, Context, Result};
use saelab_core::rng::Rng;
use saelab_sae::model::Sae;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct ScrTppConfig {
    pub n_values: Vec<usize>,
    pub probe_epochs: usize,
    pub probe_lr: f32,
    pub probe_l1: f32,
    pub probe_batch: usize,
    /// Per probe train / test set sizes (TPP tasks; SCR cells get a quarter each).
    pub n_train: usize,
    pub n_test: usize,
    pub ctx: usize,
    pub max_classes: usize,
    pub llm_batch_size: usize,
    pub seed: u64,
}

impl Default for ScrTppConfig {
    fn default() -> Self {
        ScrTppConfig {
            n_values: vec![2, 5, 10, 20, 50, 100, 500],
            probe_epochs: 20,
            probe_lr: 1e-3,
            probe_l1: 1e-3,
            probe_batch: 16,
            // CPU-sized (SAEBench: 4000 / 1000 per probe); `--sizes saebench` sets those.
            n_train: 240,
            n_test: 120,
            ctx: 128,
            max_classes: 4,
            llm_batch_size: 16,
            seed: 42,
        }
    }
}

fn probe_cfg(cfg: &ScrTppConfig, seed: u64) -> AdamProbeConfig {
    AdamProbeConfig {
        lr: cfg.probe_lr,
        epochs: cfg.probe_epochs,
        batch: cfg.probe_batch,
        l1: cfg.probe_l1,
        seed,
        ..Default::default()
    }
}

/// Train a binary probe on pooled rows.
fn train_probe(
    x: &[f32],
    d: usize,
    rows: &[(usize, bool)],
    cfg: &ScrTppConfig,
    seed: u64,
) -> Result<LinearProbe> {
    let idx: Vec<usize> = rows.iter().map(|r| r.0).collect();
    let xs = gather_rows(x, d, &idx);
    let y: Vec<f32> = rows.iter().map(|r| r.1 as u8 as f32).collect();
    train_adam_probe(
        &Design::dense(&xs, idx.len(), d),
        &y,
        1,
        &probe_cfg(cfg, seed),
        None,
    )
}

/// Accuracy of `probe` on pooled rows `rows` of `x`.
fn probe_accuracy(probe: &LinearProbe, x: &[f32], d: usize, rows: &[(usize, bool)]) -> f64 {
    let idx: Vec<usize> = rows.iter().map(|r| r.0).collect();
    let xs = gather_rows(x, d, &idx);
    let z = probe.logits(&Design::dense(&xs, idx.len(), d), None);
    let y: Vec<bool> = rows.iter().map(|r| r.1).collect();
    accuracy(&z.iter().map(|v| *v > 0.0).collect::<Vec<_>>(), &y)
}

/// Per-latent effect of a probe over its train rows: `delta_f * (w . W_dec[f])`, with
/// `delta_f` clamped at 0 when `clamp_positive` (TPP).
pub fn latent_effects(
    data: &PooledData,
    sae: &Sae,
    probe: &LinearProbe,
    rows: &[(usize, bool)],
    clamp_positive: bool,
) -> Vec<f64> {
    let idx: Vec<usize> = rows.iter().map(|r| r.0).collect();
    let y: Vec<bool> = rows.iter().map(|r| r.1).collect();
    let codes = gather_codes(&data.f, &idx);
    let des = Design::Sparse(&codes);
    let neg: Vec<bool> = y.iter().map(|v| !v).collect();
    let mp = des.column_means(&y);
    let mn = des.column_means(&neg);
    let d = sae.d_in;
    let w = probe.row(0);
    (0..sae.d_sae)
        .map(|f| {
            let mut delta = mp[f] - mn[f];
            if clamp_positive {
                delta = delta.max(0.0);
            }
            let proj: f64 = sae.w_dec[f * d..(f + 1) * d]
                .iter()
                .zip(w)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            delta * proj
        })
        .collect()
}

/// Top-`n` latents by value (ties by index).
fn top_n(v: &[f64], n: usize) -> Vec<usize> {
    crate::probe::top_k_indices(v, n)
}

/// TPP on one dataset: `[n_values][3]` = (total, intended, unintended), mean over classes.
pub fn tpp_dataset(
    data: &PooledData,
    sae: &Sae,
    tasks: &[BinaryTask],
    cfg: &ScrTppConfig,
) -> Result<Vec<[f64; 3]>> {
    let d = data.d;
    let probes: Vec<LinearProbe> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            train_probe(&data.x, d, &t.train, cfg, cfg.seed ^ (i as u64 + 11))
                .with_context(|| format!("TPP probe for class '{}'", t.name))
        })
        .collect::<Result<_>>()?;
    let clean: Vec<f64> = probes
        .iter()
        .zip(tasks)
        .map(|(p, t)| probe_accuracy(p, &data.x, d, &t.test))
        .collect();
    let k = tasks.len();
    let mut out = vec![[0f64; 3]; cfg.n_values.len()];
    for i in 0..k {
        let eff = latent_effects(data, sae, &probes[i], &tasks[i].train, true);
        for (ni, &n) in cfg.n_values.iter().enumerate() {
            let abl = top_n(&eff, n.min(sae.d_sae));
            let xp = pool_ablated(&data.x, &data.f, sae, &abl);
            let intended = clean[i] - probe_accuracy(&probes[i], &xp, d, &tasks[i].test);
            let unintended: f64 = (0..k)
                .filter(|&j| j != i)
                .map(|j| clean[j] - probe_accuracy(&probes[j], &xp, d, &tasks[j].test))
                .sum::<f64>()
                / (k - 1) as f64;
            out[ni][0] += (intended - unintended) / k as f64;
            out[ni][1] += intended / k as f64;
            out[ni][2] += unintended / k as f64;
        }
    }
    Ok(out)
}

/// Run TPP over datasets (one-vs-rest classes of each dataset's label key).
pub fn run_tpp(
    lm: &dyn HookedLm,
    sae: &Sae,
    hook: &str,
    datasets: &[ProbeDataset],
    cfg: &ScrTppConfig,
    cache: &ActCache,
) -> Result<EvalResult> {
    crate::lm_api::check_sae_width(sae, lm, hook)?;
    if datasets.is_empty() {
        bail!("TPP: no dataset given");
    }
    let mut acc = vec![[0f64; 3]; cfg.n_values.len()];
    let mut details = Vec::new();
    for ds in datasets {
        let seed = dataset_seed(cfg.seed, &ds.name);
        // TPP has no model selection: the validation split is unused (minimum size).
        let ts = one_vs_rest_tasks(
            &ds.name,
            &ds.docs,
            &ds.label_key,
            (cfg.n_train, 2, cfg.n_test),
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
            "tpp",
            seed,
            cache,
        )?;
        let r = tpp_dataset(&data, sae, &ts.tasks, cfg)
            .with_context(|| format!("dataset {}", ds.name))?;
        let mut det = vec![("dataset_name".to_string(), J::str(&ds.name))];
        for (ni, n) in cfg.n_values.iter().enumerate() {
            det.push((format!("tpp_threshold_{n}_total_metric"), J::Num(r[ni][0])));
            det.push((
                format!("tpp_threshold_{n}_intended_diff_only"),
                J::Num(r[ni][1]),
            ));
            det.push((
                format!("tpp_threshold_{n}_unintended_diff_only"),
                J::Num(r[ni][2]),
            ));
            for c in 0..3 {
                acc[ni][c] += r[ni][c] / datasets.len() as f64;
            }
        }
        details.push(J::Obj(det));
    }
    let mut m = Vec::new();
    for (ni, n) in cfg.n_values.iter().enumerate() {
        m.push((format!("tpp_threshold_{n}_total_metric"), acc[ni][0]));
        m.push((format!("tpp_threshold_{n}_intended_diff_only"), acc[ni][1]));
        m.push((
            format!("tpp_threshold_{n}_unintended_diff_only"),
            acc[ni][2],
        ));
    }
    Ok(EvalResult {
        eval_type_id: "tpp".into(),
        eval_config: config_json(lm, hook, cfg, datasets, None),
        metrics: vec![("tpp_metrics".into(), m)],
        details,
        unstructured: J::obj(vec![]),
    })
}

fn config_json(
    lm: &dyn HookedLm,
    hook: &str,
    cfg: &ScrTppConfig,
    datasets: &[ProbeDataset],
    scr: Option<&ScrSpec>,
) -> J {
    let mut p = vec![
        ("model_name", J::str(lm.name())),
        ("hook_name", J::str(hook)),
        ("random_seed", J::Int(cfg.seed as i64)),
        (
            "dataset_names",
            J::Arr(datasets.iter().map(|d| J::str(&d.name)).collect()),
        ),
        (
            "n_values",
            J::Arr(cfg.n_values.iter().map(|&n| J::Int(n as i64)).collect()),
        ),
        ("probe_train_set_size", J::Int(cfg.n_train as i64)),
        ("probe_test_set_size", J::Int(cfg.n_test as i64)),
        ("context_length", J::Int(cfg.ctx as i64)),
        ("probe_epochs", J::Int(cfg.probe_epochs as i64)),
        ("probe_lr", J::Num(cfg.probe_lr as f64)),
        ("probe_l1_penalty", J::Num(cfg.probe_l1 as f64)),
        ("probe_batch_size", J::Int(cfg.probe_batch as i64)),
    ];
    if let Some(s) = scr {
        p.push((
            "intended_attribute",
            J::str(format!("{}={} vs {}", s.a.key, s.a.pos, s.a.neg)),
        ));
        p.push((
            "spurious_attribute",
            J::str(format!("{}={} vs {}", s.b.key, s.b.pos, s.b.neg)),
        ));
    }
    J::obj(p)
}

/// A binary attribute: documents whose label `key` is `pos` or `neg`.
#[derive(Clone, Debug, PartialEq)]
pub struct Attribute {
    pub key: String,
    pub pos: String,
    pub neg: String,
}

impl Attribute {
    fn of(&self, d: &LabeledText) -> Option<bool> {
        match d.labels.get(&self.key) {
            Some(v) if *v == self.pos => Some(true),
            Some(v) if *v == self.neg => Some(false),
            _ => None,
        }
    }
}

/// SCR input: a dataset and two binary attributes (`a` the intended one, `b` the spurious one).
#[derive(Clone, Debug)]
pub struct ScrSpec {
    pub dataset: ProbeDataset,
    pub a: Attribute,
    pub b: Attribute,
}

/// Add label `new_key` = `lo`/`hi` by comparing the numeric label `key` with
/// `threshold` (e.g. SOTU era: year < 1900 vs >= 1900). Documents whose label is
/// missing or not a number get no new label.
pub fn binarize_numeric_label(
    docs: &mut [LabeledText],
    key: &str,
    threshold: f64,
    new_key: &str,
    lo: &str,
    hi: &str,
) {
    for d in docs {
        if let Some(v) = d.labels.get(key).and_then(|v| v.trim().parse::<f64>().ok()) {
            d.labels.insert(
                new_key.to_string(),
                if v < threshold { lo } else { hi }.to_string(),
            );
        }
    }
}

/// SCR result for one direction and N values.
#[derive(Clone, Debug, PartialEq)]
pub struct ScrDirection {
    pub clean_acc: f64,
    pub oracle_acc: f64,
    pub scores: Vec<f64>,
}

/// `(acc_ablated - acc_clean) / (acc_oracle - acc_clean)`, 0 when the denominator < 0.001.
pub fn scr_score(abl: f64, clean: f64, oracle: f64) -> f64 {
    let den = oracle - clean;
    if den < 0.001 {
        0.0
    } else {
        (abl - clean) / den
    }
}

/// Run SCR.
pub fn run_scr(
    lm: &dyn HookedLm,
    sae: &Sae,
    hook: &str,
    spec: &ScrSpec,
    cfg: &ScrTppConfig,
    cache: &ActCache,
) -> Result<EvalResult> {
    crate::lm_api::check_sae_width(sae, lm, hook)?;
    let ds = &spec.dataset;
    // Four cells (a, b), each split into train / test.
    let mut cells: BTreeMap<(bool, bool), Vec<usize>> = BTreeMap::new();
    for (i, d) in ds.docs.iter().enumerate() {
        if let (Some(a), Some(b)) = (spec.a.of(d), spec.b.of(d)) {
            if d.text.trim().is_empty() {
                bail!("{}: document {i} has an empty text", ds.name);
            }
            cells.entry((a, b)).or_default().push(i);
        }
    }
    for a in [true, false] {
        for b in [true, false] {
            let n = cells.get(&(a, b)).map(|v| v.len()).unwrap_or(0);
            if n < 4 {
                bail!(
                    "{}: only {n} documents with {}={} and {}={} (need at least 4 per combination)",
                    ds.name,
                    spec.a.key,
                    if a { &spec.a.pos } else { &spec.a.neg },
                    spec.b.key,
                    if b { &spec.b.pos } else { &spec.b.neg }
                );
            }
        }
    }
    let mut rng = Rng::new(cfg.seed);
    // Equal cell sizes so the balanced sets really decorrelate a and b.
    let per_cell = cells.values().map(|v| v.len()).min().unwrap();
    let want_tr = (cfg.n_train / 4).max(1);
    let want_te = (cfg.n_test / 4).max(1);
    let scale = (per_cell as f64 / (want_tr + want_te) as f64).min(1.0);
    let n_tr = ((want_tr as f64 * scale) as usize).max(1);
    let n_te = ((want_te as f64 * scale) as usize).clamp(1, per_cell - n_tr);
    let mut split: BTreeMap<(bool, bool), (Vec<usize>, Vec<usize>)> = BTreeMap::new();
    for (k, v) in &cells {
        let mut v = v.clone();
        rng.shuffle(&mut v);
        split.insert(*k, (v[..n_tr].to_vec(), v[n_tr..n_tr + n_te].to_vec()));
    }
    let mut pool: Vec<usize> = split
        .values()
        .flat_map(|(a, b)| a.iter().chain(b).copied())
        .collect();
    pool.sort_unstable();
    let row: BTreeMap<usize, usize> = pool.iter().enumerate().map(|(r, &d)| (d, r)).collect();
    let data = pooled_data(
        lm,
        sae,
        hook,
        ds,
        &pool,
        cfg.ctx,
        cfg.llm_batch_size,
        "scr",
        cfg.seed,
        cache,
    )?;
    let d = data.d;
    let rows_of = |train: bool,
                   label: &dyn Fn(bool, bool) -> bool,
                   cells_used: &[(bool, bool)]|
     -> Vec<(usize, bool)> {
        let mut v: Vec<(usize, bool)> = Vec::new();
        for &(a, b) in cells_used {
            let (tr, te) = &split[&(a, b)];
            for doc in if train { tr } else { te } {
                v.push((row[doc], label(a, b)));
            }
        }
        v
    };
    let all = [(true, true), (true, false), (false, true), (false, false)];
    let by_a = |a: bool, _b: bool| a;
    let by_b = |_a: bool, b: bool| b;
    // Biased probe: trained where a and b coincide (label a, equal to b there).
    let biased_train = rows_of(true, &by_a, &[(true, true), (false, false)]);
    let biased =
        train_probe(&data.x, d, &biased_train, cfg, cfg.seed ^ 1).context("SCR biased probe")?;
    let oracle_a_train = rows_of(true, &by_a, &all);
    let oracle_b_train = rows_of(true, &by_b, &all);
    let oracle_a = train_probe(&data.x, d, &oracle_a_train, cfg, cfg.seed ^ 2)
        .context("SCR oracle probe (intended attribute)")?;
    let oracle_b = train_probe(&data.x, d, &oracle_b_train, cfg, cfg.seed ^ 3)
        .context("SCR oracle probe (spurious attribute)")?;
    let test_a = rows_of(false, &by_a, &all);
    let test_b = rows_of(false, &by_b, &all);
    // Direction 1: remove b's latents, measure the biased probe on a (and vice versa).
    let direction = |remove_probe: &LinearProbe,
                     remove_train: &[(usize, bool)],
                     test: &[(usize, bool)],
                     oracle: &LinearProbe| {
        let clean_acc = probe_accuracy(&biased, &data.x, d, test);
        let oracle_acc = probe_accuracy(oracle, &data.x, d, test);
        let eff: Vec<f64> = latent_effects(&data, sae, remove_probe, remove_train, false)
            .iter()
            .map(|e| e.abs())
            .collect();
        let scores = cfg
            .n_values
            .iter()
            .map(|&n| {
                let xp = pool_ablated(&data.x, &data.f, sae, &top_n(&eff, n.min(sae.d_sae)));
                scr_score(probe_accuracy(&biased, &xp, d, test), clean_acc, oracle_acc)
            })
            .collect();
        ScrDirection {
            clean_acc,
            oracle_acc,
            scores,
        }
    };
    let dir1 = direction(&oracle_b, &oracle_b_train, &test_a, &oracle_a);
    let dir2 = direction(&oracle_a, &oracle_a_train, &test_b, &oracle_b);
    // The reported direction is the one where the biased probe is weaker.
    let main = if dir1.clean_acc <= dir2.clean_acc {
        &dir1
    } else {
        &dir2
    };
    let mut m = Vec::new();
    for (ni, n) in cfg.n_values.iter().enumerate() {
        m.push((format!("scr_dir1_threshold_{n}"), dir1.scores[ni]));
        m.push((format!("scr_metric_threshold_{n}"), main.scores[ni]));
        m.push((format!("scr_dir2_threshold_{n}"), dir2.scores[ni]));
    }
    let dir_json = |s: &ScrDirection| {
        J::obj(vec![
            ("biased_probe_clean_accuracy", J::Num(s.clean_acc)),
            ("oracle_accuracy", J::Num(s.oracle_acc)),
            ("scores", J::nums(&s.scores)),
        ])
    };
    Ok(EvalResult {
        eval_type_id: "scr".into(),
        eval_config: config_json(lm, hook, cfg, std::slice::from_ref(ds), Some(spec)),
        metrics: vec![("scr_metrics".into(), m)],
        details: vec![J::obj(vec![
            ("dataset_name", J::str(&ds.name)),
            ("dir1", dir_json(&dir1)),
            ("dir2", dir_json(&dir2)),
        ])],
        unstructured: J::obj(vec![
            ("docs_per_cell_train", J::Int(n_tr as i64)),
            ("docs_per_cell_test", J::Int(n_te as i64)),
            (
                "reported_direction",
                J::str(if std::ptr::eq(main, &dir1) {
                    "dir1"
                } else {
                    "dir2"
                }),
            ),
        ]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm_api::ToyLm;
    use crate::sparse_probing::tests::class_docs;
    use crate::testutil::{identity_sae, random_sae, toy_words};

    #[test]
    fn scr_score_rule_and_binarize() {
        assert!((scr_score(0.8, 0.6, 0.9) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(scr_score(0.8, 0.6, 0.6005), 0.0);
        let mut docs = vec![
            LabeledText::new("a", &[("year", "1850")]),
            LabeledText::new("b", &[("year", "1950")]),
            LabeledText::new("c", &[]),
        ];
        binarize_numeric_label(&mut docs, "year", 1900.0, "era", "old", "new");
        assert_eq!(docs[0].labels["era"], "old");
        assert_eq!(docs[1].labels["era"], "new");
        assert!(!docs[2].labels.contains_key("era"));
    }

    #[test]
    fn tpp_ablating_class_latents_hurts_that_class_most() {
        let words = toy_words();
        let refs: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
        let lm = ToyLm::new(&refs, 16, 1, 2);
        let ds = ProbeDataset {
            name: "toy".into(),
            label_key: "topic".into(),
            docs: class_docs(&words, 40, 3, 5),
        };
        let cfg = ScrTppConfig {
            n_values: vec![2, 8, 32],
            n_train: 40,
            n_test: 20,
            ctx: 32,
            probe_epochs: 40,
            probe_lr: 1e-2,
            ..Default::default()
        };
        let r = run_tpp(
            &lm,
            &identity_sae(16),
            "blocks.0.hook_resid_post",
            std::slice::from_ref(&ds),
            &cfg,
            &ActCache::default(),
        )
        .unwrap();
        // Ablating all 32 latents of the identity SAE zeroes every pooled activation.
        let all = r
            .metric("tpp_metrics", "tpp_threshold_32_intended_diff_only")
            .unwrap();
        assert!(all > 0.2, "intended drop {all}");
        let small = r
            .metric("tpp_metrics", "tpp_threshold_2_total_metric")
            .unwrap();
        assert!(small.is_finite());
        let r2 = run_tpp(
            &lm,
            &identity_sae(16),
            "blocks.0.hook_resid_post",
            std::slice::from_ref(&ds),
            &cfg,
            &ActCache::default(),
        )
        .unwrap();
        assert_eq!(r.metrics, r2.metrics, "seeded");
        assert!(run_tpp(
            &lm,
            &random_sae(15, 8, 1),
            "blocks.0.hook_resid_post",
            &[ds],
            &cfg,
            &ActCache::default()
        )
        .is_err());
    }

    #[test]
    fn scr_runs_on_two_attributes_and_rejects_missing_cells() {
        let words = toy_words();
        let refs: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
        let lm = ToyLm::new(&refs, 16, 1, 2);
        // topic class0/class1 x half lo/hi: 4 classes, "half" splits them 2 x 2.
        let mut docs = class_docs(&words, 30, 4, 9);
        for (i, d) in docs.iter_mut().enumerate() {
            let t = d.labels["topic"].clone();
            let pair = if t == "class0" || t == "class2" {
                "p"
            } else {
                "q"
            };
            d.labels.insert("pair".into(), pair.into());
            d.labels.insert("id".into(), i.to_string());
        }
        let spec = ScrSpec {
            dataset: ProbeDataset {
                name: "toy".into(),
                label_key: "pair".into(),
                docs: docs.clone(),
            },
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
        };
        let cfg = ScrTppConfig {
            n_values: vec![2, 32],
            n_train: 80,
            n_test: 40,
            ctx: 32,
            probe_epochs: 30,
            probe_lr: 1e-2,
            ..Default::default()
        };
        let r = run_scr(
            &lm,
            &identity_sae(16),
            "blocks.0.hook_resid_post",
            &spec,
            &cfg,
            &ActCache::default(),
        )
        .unwrap();
        for n in [2, 32] {
            assert!(r
                .metric("scr_metrics", &format!("scr_metric_threshold_{n}"))
                .unwrap()
                .is_finite());
        }
        let bad = ScrSpec {
            b: Attribute {
                key: "topic".into(),
                pos: "class0".into(),
                neg: "class1".into(),
            },
            ..spec
        };
        let err = run_scr(
            &lm,
            &identity_sae(16),
            "blocks.0.hook_resid_post",
            &bad,
            &cfg,
            &ActCache::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("need at least 4 per combination"),
            "{err}"
        );
    }
}
