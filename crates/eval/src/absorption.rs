//! First-letter feature absorption (SAEBench `evals/absorption`).
//!
//! 1. Vocabulary: tokens whose text, after removing one leading space, is non-empty
//!    ASCII letters; label = lower-cased first letter. Deduplicated by word, split
//!    80/20 (seeded; SAEBench ignores its seed, here the seed decides everything).
//! 2. Prompts: 10 in-context examples from the same split, then the target; the
//!    activation at position -6 (the word) of the hook is the probe input. Two ways
//!    to build them: SAEBench's one prompt per word (`packed_ctx = None`, ~70 LM
//!    tokens per word), or the CPU default, packed rows ([`packed_rows`]) where one
//!    row holds 10 example lines and then target lines, each read at its word token
//!    with at least 10 examples of its split before it (~12 LM tokens per word). The
//!    CPU default also caps words per first letter (600) instead of using all ~39k
//!    SmolLM2 words: with a global cap the rare letters got too few test words for
//!    their probes to pass the F1 gate.
//! 3. Ground-truth probe: 26 one-vs-rest logistic outputs by Adam (pos_weight, lr
//!    1e-2 decaying to 1e-5, weight decay 1e-4, batch 64, 50 epochs), cached to a file.
//! 4. k-sparse probing on SAE latents: an L1 logistic probe picks candidates; for
//!    k = 1..10 the top-k signed weights of a letter's row get an L2 logistic fit; the
//!    F1-jump rule ([`feature_split`]) decides the split latents.
//! 5. Per test word correctly classified by the GT probe, [`word_absorption`] gives the
//!    absorption fraction and the full-absorption flag; letters with GT F1 <= 0.6 are
//!    excluded; fewer than 20 letters left gives "no result" (reported, not an abort).

use crate::cache::{read_blob, write_blob, ActCache, Blob};
use crate::lm_api::HookedLm;
use crate::output::{EvalResult, J};
use crate::probe::{
    f1_score, fit_logreg_l2, top_k_indices, train_adam_probe, AdamProbeConfig, Design, LinearProbe,
    LogRegConfig,
};
use anyhow::{bail, Context, Result};
use saelab_core::rng::Rng;
use saelab_sae::model::Sae;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct AbsorptionConfig {
    pub f1_jump_threshold: f64,
    pub max_k_value: usize,
    pub prompt_template: String,
    pub prompt_token_pos: isize,
    pub icl_examples: usize,
    pub k_sparse_probe_l1_decay: f32,
    pub k_sparse_probe_batch_size: usize,
    pub k_sparse_probe_epochs: usize,
    pub gt_probe_epochs: usize,
    pub gt_probe_batch_size: usize,
    pub min_gt_probe_f1: f64,
    pub min_feats_for_eval: usize,
    /// Cap on the number of vocabulary words used (sampled with the seed); `None` = all.
    pub max_words: Option<usize>,
    /// Cap on the words kept per first letter (sampled with the seed, applied before
    /// `max_words`); `None` = all. Keeps the rare letters (q, x, y, z...) that a global
    /// cap would starve of test words, at a fraction of the full vocabulary's cost.
    pub max_words_per_letter: Option<usize>,
    /// `None`: SAEBench's prompts, one sequence per word (about 70 tokens each).
    /// `Some(ctx)`: packed prompts, rows of at most `ctx` tokens holding
    /// `icl_examples` example lines and then as many target lines as fit, each target
    /// read at its word token; every target still sees at least `icl_examples`
    /// examples from its own split before it (the earlier targets of the row, with
    /// their answers, are further examples). About 6x fewer LM tokens per word.
    pub packed_ctx: Option<usize>,
    pub llm_batch_size: usize,
    pub seed: u64,
    /// Where the ground-truth probe is cached (keyed by model, hook, words, seed).
    pub gt_probe_path: Option<PathBuf>,
}

impl Default for AbsorptionConfig {
    fn default() -> Self {
        AbsorptionConfig {
            f1_jump_threshold: 0.03,
            max_k_value: 10,
            prompt_template: "{word} has the first letter:".into(),
            prompt_token_pos: -6,
            icl_examples: 10,
            k_sparse_probe_l1_decay: 0.01,
            // SAEBench uses 4096 on ~30k words; with the word cap below, a smaller batch
            // keeps the number of optimisation steps comparable.
            k_sparse_probe_batch_size: 256,
            k_sparse_probe_epochs: 50,
            gt_probe_epochs: 50,
            gt_probe_batch_size: 64,
            min_gt_probe_f1: 0.6,
            min_feats_for_eval: 20,
            max_words: None,
            max_words_per_letter: Some(600),
            packed_ctx: Some(256),
            llm_batch_size: 16,
            seed: 42,
            gt_probe_path: None,
        }
    }
}

/// Vocabulary words (deduplicated) and their first-letter class 0..26.
pub fn first_letter_vocab(lm: &dyn HookedLm) -> Vec<(String, usize)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for id in 0..lm.vocab_size() as u32 {
        let t = lm.token_text(id);
        let w = t.strip_prefix(' ').unwrap_or(&t);
        if !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphabetic()) && seen.insert(w.to_string())
        {
            let l = (w.as_bytes()[0].to_ascii_lowercase() - b'a') as usize;
            out.push((w.to_string(), l));
        }
    }
    out
}

/// The words used, in split order (the first 80% train): shuffled with the seed,
/// capped per letter, then globally.
pub fn select_words(
    mut vocab: Vec<(String, usize)>,
    cfg: &AbsorptionConfig,
    rng: &mut Rng,
) -> Vec<(String, usize)> {
    rng.shuffle(&mut vocab);
    if let Some(cap) = cfg.max_words_per_letter {
        let mut per = [0usize; 26];
        vocab.retain(|w| {
            per[w.1] += 1;
            per[w.1] <= cap
        });
        // The frequent letters reach their cap early in the list: shuffle again, or
        // all their words would land in the training split.
        rng.shuffle(&mut vocab);
    }
    if let Some(m) = cfg.max_words {
        vocab.truncate(m);
    }
    vocab
}

/// The in-context prompt: a newline, the examples (`"{ex} has the first letter: X"`)
/// joined by newlines, a newline, then the target with the template.
pub fn icl_prompt(template: &str, word: &str, examples: &[&str]) -> String {
    let mut s = String::from("\n");
    for ex in examples {
        let up = ex
            .chars()
            .next()
            .map(|c| c.to_ascii_uppercase())
            .unwrap_or(' ');
        s.push_str(&template.replace("{word}", ex));
        s.push(' ');
        s.push(up);
        s.push('\n');
    }
    s.push_str(&template.replace("{word}", word));
    s
}

/// The F1-jump rule: starting from -100, accept k while F1_k > previous + threshold.
/// Returns the number of latents in the split (`f1s[k - 1]` is the F1 with k latents).
pub fn feature_split(f1s: &[f64], threshold: f64) -> usize {
    let mut prev = -100.0;
    let mut n = 0;
    for (i, &f) in f1s.iter().enumerate() {
        if f > prev + threshold {
            prev = f;
            n = i + 1;
        } else {
            break;
        }
    }
    n
}

/// The absorption result for one word.
#[derive(Clone, Debug, PartialEq)]
pub struct WordAbsorption {
    pub absorption_fraction: f64,
    pub full_absorption: bool,
    /// `x . u`, the probe projection.
    pub probe_projection: f64,
    pub main_projection: f64,
    /// Latents with the largest positive projections among the candidate absorbers.
    pub absorbers: Vec<usize>,
}

/// Absorption of one word. `x` its activation, `codes` its SAE latents (index, value),
/// `u` the unit GT-probe direction, `cos[f] = cos(u, W_dec[f])`, `split` the split latents.
pub fn word_absorption(
    x: &[f32],
    codes: (&[u32], &[f32]),
    u: &[f64],
    cos: &[f64],
    split: &[usize],
) -> WordAbsorption {
    let p_total: f64 = x.iter().zip(u).map(|(a, b)| *a as f64 * b).sum();
    let (idx, val) = codes;
    let act = |f: usize| {
        idx.iter()
            .position(|&j| j as usize == f)
            .map(|p| val[p] as f64)
            .unwrap_or(0.0)
    };
    let main: f64 = split.iter().map(|&f| act(f) * cos[f]).sum();
    let mut cand: Vec<(usize, f64)> = idx
        .iter()
        .zip(val)
        .map(|(&j, &v)| (j as usize, v as f64 * cos[j as usize]))
        .filter(|&(j, p)| !split.contains(&j) && cos[j] >= 0.1 && p > 0.0)
        .collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    cand.truncate(3);
    let s: f64 = cand.iter().map(|c| c.1).sum();
    let absorption_fraction = if main >= p_total || p_total <= 0.0 || s / p_total < 0.4 {
        // Nothing missing from the main latents (or no probe signal to absorb).
        0.0
    } else if main <= 0.0 {
        1.0
    } else {
        let a = s.min(p_total - main);
        (a / (a + main)).clamp(0.0, 1.0)
    };
    // Full absorption: the split latents are silent and one latent carries the direction.
    let top = idx
        .iter()
        .zip(val)
        .map(|(&j, &v)| (j as usize, v as f64 * cos[j as usize]))
        .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
    let full_absorption = split.iter().all(|&f| act(f) < 1e-8)
        && match top {
            // P >= 0 in SAEBench; P = 0 would divide by zero, so require P > 0.
            Some((j, p)) => cos[j] >= 0.025 && p_total > 0.0 && p / p_total >= 0.4,
            None => false,
        };
    WordAbsorption {
        absorption_fraction,
        full_absorption,
        probe_projection: p_total,
        main_projection: main,
        absorbers: cand.iter().map(|c| c.0).collect(),
    }
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        f64::NAN
    };
    (m, var.sqrt())
}

/// Activations at position `pos` (from the end) of the prompts, [n, d].
fn prompt_acts(
    lm: &dyn HookedLm,
    hook: &str,
    prompts: &[String],
    pos: isize,
    batch: usize,
) -> Result<Vec<f32>> {
    let d = lm.d_model();
    let mut seqs = Vec::with_capacity(prompts.len());
    for p in prompts {
        let mut ids: Vec<u32> = lm.bos_id().into_iter().collect();
        ids.extend(lm.encode(p)?);
        if (ids.len() as isize) < -pos {
            bail!("prompt shorter than {} tokens: {p:?}", -pos);
        }
        seqs.push(ids);
    }
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| (seqs[i].len(), i));
    let mut out = vec![0f32; prompts.len() * d];
    for chunk in order.chunks(batch.max(1)) {
        let seq = chunk.iter().map(|&i| seqs[i].len()).max().unwrap();
        let mut toks = vec![lm.fill_id(); chunk.len() * seq];
        for (r, &i) in chunk.iter().enumerate() {
            toks[r * seq..r * seq + seqs[i].len()].copy_from_slice(&seqs[i]);
        }
        let a = lm.capture(&toks, chunk.len(), seq, hook)?;
        for (r, &i) in chunk.iter().enumerate() {
            let t = (seqs[i].len() as isize + pos) as usize;
            out[i * d..(i + 1) * d].copy_from_slice(&a[(r * seq + t) * d..(r * seq + t + 1) * d]);
        }
    }
    Ok(out)
}

/// The `n` cached activations under `key`, or computed by `make` and cached.
fn cached_acts(
    cache: &ActCache,
    key: &str,
    n: usize,
    make: impl FnOnce() -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    if let Some(a) = cache
        .load(key)
        .and_then(|mut b| b.take_f32("acts").ok())
        .filter(|a| a.len() == n)
    {
        return Ok(a);
    }
    let a = make()?;
    let blob = Blob {
        f32s: vec![("acts".into(), a)],
        ..Default::default()
    };
    if let Err(e) = cache.store(key, &blob) {
        tracing::warn!("could not write eval cache entry: {e:#}");
    }
    Ok(blob.f32s.into_iter().next().expect("one tensor").1)
}

/// One packed row: its tokens and, per target word, (word index, token position).
#[derive(Debug)]
pub struct PackedRow {
    pub tokens: Vec<u32>,
    pub targets: Vec<(usize, usize)>,
}

/// Pack every word of each split into rows of at most `ctx` tokens: BOS, a newline,
/// `icl_examples` example lines (`"{ex} has the first letter: X"`, examples drawn
/// from the split, never one of the row's targets), then target lines in split order
/// with their answers, as long as they fit. A target is read at
/// `line length + prompt_token_pos` within its line (its word token, as in SAEBench's
/// prompt read at position -6). Lines are tokenized one by one: the newline and the
/// answer are separate pre-tokens, so this equals tokenizing the whole row.
pub fn packed_rows(
    lm: &dyn HookedLm,
    cfg: &AbsorptionConfig,
    words: &[&str],
    splits: &[std::ops::Range<usize>],
    ctx: usize,
    rng: &mut Rng,
) -> Result<Vec<PackedRow>> {
    let bos: Vec<u32> = lm.bos_id().into_iter().collect();
    let nl = lm.encode("\n")?;
    let answers: Vec<Vec<u32>> = (b'A'..=b'Z')
        .map(|c| lm.encode(&format!(" {}\n", c as char)))
        .collect::<Result<_>>()?;
    let mut lines = Vec::with_capacity(words.len());
    for w in words {
        let t = lm.encode(&cfg.prompt_template.replace("{word}", w))?;
        if (t.len() as isize) < -cfg.prompt_token_pos {
            bail!(
                "absorption prompt for {w:?} is shorter than {} tokens",
                -cfg.prompt_token_pos
            );
        }
        lines.push(t);
    }
    let letter = |i: usize| (words[i].as_bytes()[0].to_ascii_uppercase() - b'A') as usize;
    let line_len = |i: usize| lines[i].len() + answers[letter(i)].len();
    let mut rows = Vec::new();
    for range in splits {
        if range.len() <= cfg.icl_examples {
            bail!(
                "absorption: a split of {} words cannot hold {} in-context examples",
                range.len(),
                cfg.icl_examples
            );
        }
        let mut next = range.start;
        while next < range.end {
            // The targets that fit after the context are not known until the context is
            // drawn, so exclude a window of upcoming words at least as large as any row
            // holds (a line is at least -prompt_token_pos + 1 tokens), unless the split
            // is too small to leave enough other words.
            let max_targets = ctx / (cfg.prompt_token_pos.unsigned_abs() + 1);
            let window = next..(next + max_targets).min(range.end);
            let exclude = range.len() >= window.len() + cfg.icl_examples;
            let mut tokens = bos.clone();
            tokens.extend_from_slice(&nl);
            for _ in 0..cfg.icl_examples {
                let j = loop {
                    let j = range.start + rng.below(range.len());
                    if !exclude || !window.contains(&j) {
                        break j;
                    }
                };
                tokens.extend_from_slice(&lines[j]);
                tokens.extend_from_slice(&answers[letter(j)]);
            }
            let mut targets = Vec::new();
            while next < range.end && tokens.len() + line_len(next) <= ctx {
                let at =
                    tokens.len() + (lines[next].len() as isize + cfg.prompt_token_pos) as usize;
                targets.push((next, at));
                tokens.extend_from_slice(&lines[next]);
                tokens.extend_from_slice(&answers[letter(next)]);
                next += 1;
            }
            if targets.is_empty() {
                bail!(
                    "absorption: packed rows of {ctx} tokens cannot hold {} examples and a target",
                    cfg.icl_examples
                );
            }
            rows.push(PackedRow { tokens, targets });
        }
    }
    Ok(rows)
}

/// Activations at every target of the packed rows, [n_words, d] in word order.
fn packed_acts(
    lm: &dyn HookedLm,
    hook: &str,
    rows: &[PackedRow],
    n_words: usize,
    batch: usize,
) -> Result<Vec<f32>> {
    let d = lm.d_model();
    let mut out = vec![0f32; n_words * d];
    let mut done = 0usize;
    for chunk in rows.chunks(batch.max(1)) {
        let seq = chunk
            .iter()
            .map(|r| r.tokens.len())
            .max()
            .expect("non-empty");
        let mut toks = vec![lm.fill_id(); chunk.len() * seq];
        for (r, row) in chunk.iter().enumerate() {
            toks[r * seq..r * seq + row.tokens.len()].copy_from_slice(&row.tokens);
        }
        let a = lm.capture(&toks, chunk.len(), seq, hook)?;
        for (r, row) in chunk.iter().enumerate() {
            for &(i, t) in &row.targets {
                let at = (r * seq + t) * d;
                out[i * d..(i + 1) * d].copy_from_slice(&a[at..at + d]);
                done += 1;
            }
        }
    }
    if done != n_words {
        bail!("absorption: packed rows hold {done} targets for {n_words} words");
    }
    Ok(out)
}

fn one_hot(labels: &[usize], k: usize) -> Vec<f32> {
    let mut y = vec![0f32; labels.len() * k];
    for (i, &l) in labels.iter().enumerate() {
        y[i * k + l] = 1.0;
    }
    y
}

fn no_result(config: J, reason: String) -> EvalResult {
    let nan = f64::NAN;
    EvalResult {
        eval_type_id: "absorption_first_letter".into(),
        eval_config: config,
        metrics: vec![(
            "mean".into(),
            vec![
                ("mean_absorption_fraction_score".into(), nan),
                ("mean_full_absorption_score".into(), nan),
                ("mean_num_split_features".into(), nan),
                ("std_dev_absorption_fraction_score".into(), nan),
                ("std_dev_full_absorption_score".into(), nan),
                ("std_dev_num_split_features".into(), nan),
            ],
        )],
        details: Vec::new(),
        unstructured: J::obj(vec![("no_result", J::str(reason))]),
    }
}

/// Run the absorption evaluation.
pub fn run_absorption(
    lm: &dyn HookedLm,
    sae: &Sae,
    hook: &str,
    cfg: &AbsorptionConfig,
    cache: &ActCache,
) -> Result<EvalResult> {
    let d = lm.d_model();
    crate::lm_api::check_sae_width(sae, lm, hook)?;
    if cfg.max_k_value == 0 || cfg.icl_examples == 0 || cfg.prompt_token_pos >= 0 {
        bail!("absorption: max_k_value and icl_examples must be positive and prompt_token_pos negative");
    }
    let config = J::obj(vec![
        ("model_name", J::str(lm.name())),
        ("hook_name", J::str(hook)),
        ("random_seed", J::Int(cfg.seed as i64)),
        ("f1_jump_threshold", J::Num(cfg.f1_jump_threshold)),
        ("max_k_value", J::Int(cfg.max_k_value as i64)),
        ("prompt_template", J::str(&cfg.prompt_template)),
        ("prompt_token_pos", J::Int(cfg.prompt_token_pos as i64)),
        ("llm_batch_size", J::Int(cfg.llm_batch_size as i64)),
        (
            "k_sparse_probe_l1_decay",
            J::Num(cfg.k_sparse_probe_l1_decay as f64),
        ),
        (
            "k_sparse_probe_batch_size",
            J::Int(cfg.k_sparse_probe_batch_size as i64),
        ),
        (
            "k_sparse_probe_num_epochs",
            J::Int(cfg.k_sparse_probe_epochs as i64),
        ),
        ("min_GT_probe_f1", J::Num(cfg.min_gt_probe_f1)),
        ("min_feats_for_eval", J::Int(cfg.min_feats_for_eval as i64)),
        (
            "max_words",
            cfg.max_words.map(|m| J::Int(m as i64)).unwrap_or(J::Null),
        ),
        (
            "max_words_per_letter",
            cfg.max_words_per_letter
                .map(|m| J::Int(m as i64))
                .unwrap_or(J::Null),
        ),
        (
            "packed_ctx",
            cfg.packed_ctx.map(|m| J::Int(m as i64)).unwrap_or(J::Null),
        ),
    ]);
    let mut rng = Rng::new(cfg.seed);
    let vocab = select_words(first_letter_vocab(lm), cfg, &mut rng);
    if vocab.len() < 2 * (cfg.icl_examples + 1) {
        return Ok(no_result(
            config,
            format!("only {} alphabetic vocabulary words", vocab.len()),
        ));
    }
    let n_train = vocab.len() * 4 / 5;
    let words: Vec<&str> = vocab.iter().map(|w| w.0.as_str()).collect();
    let labels: Vec<usize> = vocab.iter().map(|w| w.1).collect();
    let is_train = |i: usize| i < n_train;
    let splits = [0..n_train, n_train..words.len()];
    let (key, x) = match cfg.packed_ctx {
        None => {
            // Prompts: examples drawn from the word's own split, never the word itself.
            let mut prompts = Vec::with_capacity(words.len());
            for i in 0..words.len() {
                let range = splits[!is_train(i) as usize].clone();
                let mut ex = Vec::with_capacity(cfg.icl_examples);
                while ex.len() < cfg.icl_examples {
                    let j = range.start + rng.below(range.len());
                    if j != i {
                        ex.push(words[j]);
                    }
                }
                prompts.push(icl_prompt(&cfg.prompt_template, words[i], &ex));
            }
            let key = format!(
                "absorption|{}|{hook}|words={}|pos={}|seed={}|tmpl={}",
                lm.name(),
                crate::tasks::texts_fingerprint(prompts.iter().map(|s| s.as_str())),
                cfg.prompt_token_pos,
                cfg.seed,
                cfg.prompt_template
            );
            let x = cached_acts(cache, &key, words.len() * d, || {
                prompt_acts(lm, hook, &prompts, cfg.prompt_token_pos, cfg.llm_batch_size)
            })?;
            (key, x)
        }
        Some(ctx) => {
            let rows = packed_rows(lm, cfg, &words, &splits, ctx, &mut rng)?;
            let key = format!(
                "absorption-packed|{}|{hook}|words={}|ctx={ctx}|icl={}|pos={}|seed={}|tmpl={}",
                lm.name(),
                crate::tasks::texts_fingerprint(words.iter().copied()),
                cfg.icl_examples,
                cfg.prompt_token_pos,
                cfg.seed,
                cfg.prompt_template
            );
            let x = cached_acts(cache, &key, words.len() * d, || {
                packed_acts(lm, hook, &rows, words.len(), cfg.llm_batch_size)
            })?;
            (key, x)
        }
    };
    let (x_train, x_test) = x.split_at(n_train * d);
    let (l_train, l_test) = labels.split_at(n_train);
    let n_test = l_test.len();
    let present: Vec<bool> = (0..26)
        .map(|l| l_train.contains(&l) && l_test.contains(&l))
        .collect();

    // Ground-truth probe (cached to a file when asked).
    let gt_key = format!("gt-probe|{key}");
    let gt = match cfg
        .gt_probe_path
        .as_ref()
        .filter(|p| p.exists())
        .and_then(|p| read_blob(p, &gt_key).ok())
    {
        Some(b) => LinearProbe {
            d,
            outputs: 26,
            w: b.f32("w")?.to_vec(),
            b: b.f32("b")?.to_vec(),
        },
        None => {
            // Letters absent from the training words get an always-negative output.
            let mut y = one_hot(l_train, 26);
            let absent: Vec<usize> = (0..26).filter(|&l| !l_train.contains(&l)).collect();
            let keep: Vec<usize> = (0..26).filter(|l| !absent.contains(l)).collect();
            if keep.len() < 2 {
                return Ok(no_result(
                    config,
                    format!("training words cover only {} letter(s)", keep.len()),
                ));
            }
            let yk: Vec<f32> = (0..n_train)
                .flat_map(|i| keep.iter().map(|&l| y[i * 26 + l]).collect::<Vec<_>>())
                .collect();
            let pc = AdamProbeConfig {
                lr: 1e-2,
                lr_end: Some(1e-5),
                epochs: cfg.gt_probe_epochs,
                batch: cfg.gt_probe_batch_size,
                weight_decay: 1e-4,
                pos_weight: true,
                seed: cfg.seed,
                ..Default::default()
            };
            let p = train_adam_probe(
                &Design::dense(x_train, n_train, d),
                &yk,
                keep.len(),
                &pc,
                None,
            )
            .context("ground-truth probe")?;
            let mut full = LinearProbe::zeros(d, 26);
            full.b.fill(-1e4);
            for (o, &l) in keep.iter().enumerate() {
                full.w[l * d..(l + 1) * d].copy_from_slice(p.row(o));
                full.b[l] = p.b[o];
            }
            y.clear();
            if let Some(path) = &cfg.gt_probe_path {
                let blob = Blob {
                    f32s: vec![("w".into(), full.w.clone()), ("b".into(), full.b.clone())],
                    ..Default::default()
                };
                write_blob(path, &gt_key, &blob)?;
            }
            full
        }
    };
    let test_des = Design::dense(x_test, n_test, d);
    let gt_logits = gt.logits(&test_des, None);
    let gt_f1: Vec<f64> = (0..26)
        .map(|l| {
            if !present[l] {
                return f64::NAN;
            }
            let pred: Vec<bool> = (0..n_test).map(|i| gt_logits[i * 26 + l] > 0.0).collect();
            let truth: Vec<bool> = l_test.iter().map(|&t| t == l).collect();
            f1_score(&pred, &truth)
        })
        .collect();
    let letters: Vec<usize> = (0..26)
        .filter(|&l| gt_f1[l] > cfg.min_gt_probe_f1)
        .collect();
    if letters.len() < cfg.min_feats_for_eval {
        let mut r = no_result(
            config,
            format!(
                "only {} letters have a ground-truth probe F1 above {} (need {})",
                letters.len(),
                cfg.min_gt_probe_f1,
                cfg.min_feats_for_eval
            ),
        );
        if let J::Obj(fields) = &mut r.unstructured {
            fields.push(("ground_truth_probe_f1".into(), J::nums(&gt_f1)));
            let count = |ls: &[usize]| {
                J::Arr(
                    (0..26)
                        .map(|l| J::Int(ls.iter().filter(|&&t| t == l).count() as i64))
                        .collect(),
                )
            };
            fields.push(("n_words_train_per_letter".into(), count(l_train)));
            fields.push(("n_words_test_per_letter".into(), count(l_test)));
        }
        return Ok(r);
    }

    // SAE latents and the k-sparse probes.
    let c_train = sae.encode(x_train, n_train);
    let c_test = sae.encode(x_test, n_test);
    let keep: Vec<usize> = (0..26).filter(|&l| l_train.contains(&l)).collect();
    let yk: Vec<f32> = (0..n_train)
        .flat_map(|i| {
            keep.iter()
                .map(|&l| if l_train[i] == l { 1.0 } else { 0.0 })
                .collect::<Vec<_>>()
        })
        .collect();
    let kc = AdamProbeConfig {
        lr: 1e-2,
        lr_end: Some(1e-5),
        epochs: cfg.k_sparse_probe_epochs,
        batch: cfg.k_sparse_probe_batch_size,
        weight_decay: 1e-6,
        l1: cfg.k_sparse_probe_l1_decay,
        pos_weight: true,
        seed: cfg.seed ^ 0x5eed,
        ..Default::default()
    };
    let sparse = train_adam_probe(&Design::Sparse(&c_train), &yk, keep.len(), &kc, None)
        .context("k-sparse L1 probe on SAE latents")?;
    let dec_norm: Vec<f64> = sae
        .w_dec
        .chunks_exact(d)
        .map(|r| r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt())
        .collect();

    // Letters are independent: evaluated in parallel, gathered in letter order.
    use rayon::prelude::*;
    let per_letter: Vec<Option<(J, f64, f64, usize)>> = letters
        .par_iter()
        .map(|&l| -> Result<Option<(J, f64, f64, usize)>> {
            let o = keep
                .iter()
                .position(|&k| k == l)
                .expect("evaluated letters have training words");
            let row: Vec<f64> = sparse.row(o).iter().map(|v| *v as f64).collect();
            let ranked = top_k_indices(&row, cfg.max_k_value);
            let y_tr: Vec<bool> = l_train.iter().map(|&t| t == l).collect();
            let y_te: Vec<bool> = l_test.iter().map(|&t| t == l).collect();
            let mut f1s = Vec::new();
            for k in 1..=ranked.len() {
                let m = fit_logreg_l2(
                    &Design::Sparse(&c_train),
                    &y_tr,
                    Some(&ranked[..k]),
                    &LogRegConfig::default(),
                )
                .with_context(|| {
                    format!(
                        "k-sparse probe for letter {} with k = {k}",
                        (b'a' + l as u8) as char
                    )
                })?;
                f1s.push(f1_score(&m.predict(&Design::Sparse(&c_test)), &y_te));
            }
            let n_split = feature_split(&f1s, cfg.f1_jump_threshold);
            let split = &ranked[..n_split];
            // Unit probe direction and its cosine with every decoder row.
            let w = gt.row(l);
            let wn = w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            let u: Vec<f64> = w.iter().map(|v| *v as f64 / wn).collect();
            let cos: Vec<f64> = (0..sae.d_sae)
                .map(|f| {
                    let r = &sae.w_dec[f * d..(f + 1) * d];
                    r.iter().zip(&u).map(|(a, b)| *a as f64 * b).sum::<f64>()
                        / dec_norm[f].max(1e-30)
                })
                .collect();
            let (mut sum_frac, mut n_full, mut n_tp) = (0f64, 0usize, 0usize);
            for i in 0..n_test {
                if l_test[i] != l || gt_logits[i * 26 + l] <= 0.0 {
                    continue;
                }
                n_tp += 1;
                let wa =
                    word_absorption(&x_test[i * d..(i + 1) * d], c_test.row(i), &u, &cos, split);
                sum_frac += wa.absorption_fraction;
                n_full += wa.full_absorption as usize;
            }
            let letter = ((b'a' + l as u8) as char).to_string();
            if n_tp == 0 {
                return Ok(None);
            }
            let (mf, fr) = (sum_frac / n_tp as f64, n_full as f64 / n_tp as f64);
            let detail = J::obj(vec![
                ("first_letter", J::str(letter)),
                ("mean_absorption_fraction", J::Num(mf)),
                ("full_absorption_rate", J::Num(fr)),
                ("num_full_absorption", J::Int(n_full as i64)),
                ("num_probe_true_positives", J::Int(n_tp as i64)),
                ("num_split_features", J::Int(n_split as i64)),
                (
                    "split_feature_ids",
                    J::Arr(split.iter().map(|&f| J::Int(f as i64)).collect()),
                ),
                ("ground_truth_probe_f1", J::Num(gt_f1[l])),
                ("k_sparse_f1", J::nums(&f1s)),
            ]);
            Ok(Some((detail, mf, fr, n_split)))
        })
        .collect::<Result<_>>()?;
    let mut details = Vec::new();
    let (mut fracs, mut fulls, mut nsplits) = (Vec::new(), Vec::new(), Vec::new());
    for (detail, mf, fr, n_split) in per_letter.into_iter().flatten() {
        details.push(detail);
        fracs.push(mf);
        fulls.push(fr);
        nsplits.push(n_split as f64);
    }
    if fracs.len() < cfg.min_feats_for_eval {
        return Ok(no_result(
            config,
            format!(
                "only {} letters have probe true positives (need {})",
                fracs.len(),
                cfg.min_feats_for_eval
            ),
        ));
    }
    let (mf, sf) = mean_std(&fracs);
    let (mfull, sfull) = mean_std(&fulls);
    let (ms, ss) = mean_std(&nsplits);
    Ok(EvalResult {
        eval_type_id: "absorption_first_letter".into(),
        eval_config: config,
        metrics: vec![(
            "mean".into(),
            vec![
                ("mean_absorption_fraction_score".into(), mf),
                ("mean_full_absorption_score".into(), mfull),
                ("mean_num_split_features".into(), ms),
                ("std_dev_absorption_fraction_score".into(), sf),
                ("std_dev_full_absorption_score".into(), sfull),
                ("std_dev_num_split_features".into(), ss),
            ],
        )],
        details,
        unstructured: J::obj(vec![
            ("n_words_train", J::Int(n_train as i64)),
            ("n_words_test", J::Int(n_test as i64)),
            ("ground_truth_probe_f1", J::nums(&gt_f1)),
        ]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_rule() {
        assert_eq!(feature_split(&[0.5, 0.52, 0.9], 0.03), 1);
        assert_eq!(feature_split(&[0.5, 0.6, 0.7, 0.71], 0.03), 3);
        assert_eq!(feature_split(&[], 0.03), 0);
        assert_eq!(feature_split(&[0.0, 0.0], 0.03), 1);
    }

    #[test]
    fn prompt_format() {
        let p = icl_prompt("{word} has the first letter:", "cat", &["dog", "emu"]);
        assert_eq!(
            p,
            "\ndog has the first letter: D\nemu has the first letter: E\ncat has the first letter:"
        );
    }

    /// u = e0 in 3 dims; decoder rows' cosines with u given directly.
    fn case(x: [f32; 3], idx: &[u32], val: &[f32], cos: &[f64], split: &[usize]) -> WordAbsorption {
        word_absorption(&x, (idx, val), &[1.0, 0.0, 0.0], cos, split)
    }

    #[test]
    fn word_rules() {
        let cos = [1.0, 0.9, 0.5, 0.05, 0.3];
        // Main latent carries the full projection: no absorption.
        let w = case([2.0, 0.0, 0.0], &[0], &[2.0], &cos, &[0]);
        assert_eq!((w.absorption_fraction, w.full_absorption), (0.0, false));
        assert_eq!(w.main_projection, 2.0);
        // Main latent silent, absorber 1 carries 0.9 * 2 = 1.8 of P = 2: fully absorbed.
        let w = case([2.0, 0.0, 0.0], &[1], &[2.0], &cos, &[0]);
        assert_eq!(w.absorption_fraction, 1.0);
        assert!(w.full_absorption);
        assert_eq!(w.absorbers, vec![1]);
        // Partial: main 1.0 of P = 3; absorbers 1 (0.9*1) + 2 (0.5*2) = 1.9; A = min(1.9, 2) -> 1.9/2.9.
        let w = case([3.0, 0.0, 0.0], &[0, 1, 2], &[1.0, 1.0, 2.0], &cos, &[0]);
        assert!((w.absorption_fraction - 1.9 / 2.9).abs() < 1e-12);
        assert!(!w.full_absorption, "the split latent fires");
        // Absorbers too weak (S / P < 0.4): 0. Latent 3 has cos < 0.1 and is no candidate.
        let w = case([3.0, 0.0, 0.0], &[0, 3], &[1.0, 20.0], &cos, &[0]);
        assert_eq!(w.absorption_fraction, 0.0);
        assert!(w.absorbers.is_empty());
        // Only the top 3 absorbers count: 4 candidates, smallest dropped.
        let cos5 = [1.0, 0.5, 0.5, 0.5, 0.5];
        let w = word_absorption(
            &[4.0, 0.0, 0.0],
            (&[1, 2, 3, 4], &[1.0, 2.0, 3.0, 0.5]),
            &[1.0, 0.0, 0.0],
            &cos5,
            &[0],
        );
        assert_eq!(w.absorbers, vec![3, 2, 1]);
        assert_eq!(w.absorption_fraction, 1.0);
        // Full absorption needs the top latent to carry >= 40% of P.
        let w = case([10.0, 0.0, 0.0], &[1], &[2.0], &cos, &[0]);
        assert!(!w.full_absorption);
        // Negative probe projection: nothing to absorb.
        let w = case([-1.0, 0.0, 0.0], &[1], &[2.0], &cos, &[0]);
        assert_eq!((w.absorption_fraction, w.full_absorption), (0.0, false));
    }

    #[test]
    fn per_letter_cap_keeps_every_letter_in_both_splits() {
        // Skewed letter frequencies, as in a real vocabulary: letter l has 40 * (26 - l)
        // + 10 words.
        let mut vocab = Vec::new();
        for l in 0..26usize {
            for i in 0..40 * (26 - l) + 10 {
                vocab.push((format!("{}w{i}", (b'a' + l as u8) as char), l));
            }
        }
        let cfg = AbsorptionConfig {
            max_words_per_letter: Some(100),
            ..Default::default()
        };
        let words = select_words(vocab, &cfg, &mut Rng::new(3));
        let n_train = words.len() * 4 / 5;
        for l in 0..26 {
            let n = words.iter().filter(|w| w.1 == l).count();
            let test = words[n_train..].iter().filter(|w| w.1 == l).count();
            assert!(n <= 100);
            // About a fifth of each letter's words are test words.
            assert!(
                test * 10 >= n && test * 10 <= 4 * n,
                "letter {l}: {test} of {n}"
            );
        }
    }

    #[test]
    fn packed_rows_hold_every_word_once_after_enough_examples() {
        use crate::lm_api::ToyLm;
        use crate::testutil::toy_words;
        let mut words = toy_words();
        words.extend(["has", "the", "first", "letter"].map(String::from));
        let refs: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
        let lm = ToyLm::new(&refs, 8, 1, 3);
        let cfg = AbsorptionConfig::default();
        let list: Vec<&str> = refs.iter().copied().take(400).collect();
        assert!(list.len() >= 200, "{}", list.len());
        let split = list.len() * 4 / 5;
        let splits = [0..split, split..list.len()];
        let ctx = 256;
        let rows = packed_rows(&lm, &cfg, &list, &splits, ctx, &mut Rng::new(5)).unwrap();
        let mut seen = vec![0usize; list.len()];
        let line = |w: &str| {
            lm.encode(&cfg.prompt_template.replace("{word}", w))
                .unwrap()
        };
        for row in &rows {
            assert!(row.tokens.len() <= ctx && !row.targets.is_empty());
            let split_of = |i: usize| (i >= split) as usize;
            let first = row.targets[0].0;
            for &(i, at) in &row.targets {
                seen[i] += 1;
                assert_eq!(split_of(i), split_of(first), "a row mixes splits");
                // The read position is the word's last token: the template's tail follows.
                let l = line(list[i]);
                let word_end = l.len() - 6;
                let start = at - word_end;
                assert_eq!(&row.tokens[start..start + l.len()], &l[..]);
                // At least icl_examples complete lines ("has the first letter:") before it.
                let before = &row.tokens[..start];
                let colon = lm.encode(" letter:").unwrap();
                let n_lines = before
                    .windows(colon.len())
                    .filter(|w| *w == &colon[..])
                    .count();
                assert!(n_lines >= cfg.icl_examples, "{n_lines}");
            }
            // No target appears among the row's own examples.
            let ex_end = row.targets[0].1 - (line(list[first]).len() - 6);
            for &(i, _) in &row.targets {
                let l = line(list[i]);
                assert!(!row.tokens[..ex_end].windows(l.len()).any(|w| w == &l[..]));
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "every word read exactly once");
        // Too short a row is an error, not an empty result.
        let e = packed_rows(&lm, &cfg, &list, &splits, 20, &mut Rng::new(5)).unwrap_err();
        assert!(e.to_string().contains("cannot hold"), "{e}");
    }

    #[test]
    fn end_to_end_on_toy_lm_is_seeded_and_caches_the_probe() {
        use crate::lm_api::ToyLm;
        use crate::testutil::{identity_sae, toy_words};
        let mut words = toy_words();
        words.extend(["has", "the", "first", "letter"].map(String::from));
        let refs: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
        let lm = ToyLm::new(&refs, 24, 1, 9);
        let dir = std::env::temp_dir().join(format!("saelab-absorption-{}", std::process::id()));
        let probe_path = dir.join("gt.bin");
        let cfg = AbsorptionConfig {
            gt_probe_path: Some(probe_path.clone()),
            k_sparse_probe_epochs: 100,
            k_sparse_probe_batch_size: 32,
            gt_probe_epochs: 150,
            gt_probe_batch_size: 16,
            ..Default::default()
        };
        let sae = identity_sae(24);
        let hook = "blocks.0.hook_resid_post";
        let a = run_absorption(&lm, &sae, hook, &cfg, &ActCache::default()).unwrap();
        assert!(
            a.unstructured.get("no_result").is_none(),
            "{:?}",
            a.unstructured
        );
        assert!(probe_path.exists());
        let b = run_absorption(&lm, &sae, hook, &cfg, &ActCache::default()).unwrap();
        assert_eq!(a.metrics, b.metrics, "same seed, cached probe: same result");
        let frac = a.metric("mean", "mean_absorption_fraction_score").unwrap();
        let full = a.metric("mean", "mean_full_absorption_score").unwrap();
        let nsplit = a.metric("mean", "mean_num_split_features").unwrap();
        assert!(
            (0.0..=1.0).contains(&frac) && (0.0..=1.0).contains(&full),
            "{frac} {full}"
        );
        assert!((1.0..=10.0).contains(&nsplit));
        assert!(a.details.len() >= 20);
        // Gating reports instead of aborting.
        let strict = AbsorptionConfig {
            min_gt_probe_f1: 0.999,
            gt_probe_path: None,
            ..cfg
        };
        let r = run_absorption(&lm, &sae, hook, &strict, &ActCache::default()).unwrap();
        let reason = r.unstructured.get("no_result").expect("gated");
        assert!(matches!(reason, J::Str(s) if s.contains("ground-truth probe F1")));
        assert!(r
            .metric("mean", "mean_absorption_fraction_score")
            .unwrap()
            .is_nan());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
