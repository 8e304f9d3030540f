//! The core evaluation (SAEBench `evals/core`): model-behaviour preservation (KL),
//! performance preservation (CE), reconstruction, shrinkage, sparsity, per-latent
//! statistics.
//!
//! Token rows: documents tokenized without BOS and concatenated with a BOS between
//! documents, cut into rows of exactly `ctx` tokens, each starting with BOS. The hook
//! activations of the batches are computed once and cached (they do not depend on the
//! SAE); all `sparsity_batches` batches feed the reconstruction/sparsity statistics.
//! The first `recon_batches` batches run three forwards resumed from the cached hook
//! activation (clean; SAE spliced at the hook with masked positions keeping x; hook
//! zero-ablated), so only the layers after the hook run; the clean and ablation
//! losses are cached too, leaving two partial forwards per batch for each new SAE.

use crate::cache::{ActCache, Blob};
use crate::lm_api::HookedLm;
use crate::metrics::{
    ce_loss_score, kl_div_score, loss_stats, weight_metrics, CoreAccumulator, LossStats,
};
use crate::output::{EvalResult, J};
use crate::tasks::texts_fingerprint;
use anyhow::{bail, Context, Result};
use saelab_sae::model::Sae;

/// Sizes of the core evaluation (SAEBench: 16 prompts, ctx 128, 200 and 2000 batches;
/// the defaults here are sized for a small CPU).
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub batch_prompts: usize,
    pub ctx: usize,
    pub recon_batches: usize,
    pub sparsity_batches: usize,
    pub exclude_special_tokens: bool,
    /// Write one per-latent object per latent into `eval_result_details`.
    pub per_latent_details: bool,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            batch_prompts: 8,
            ctx: 128,
            recon_batches: 8,
            sparsity_batches: 32,
            exclude_special_tokens: true,
            per_latent_details: true,
        }
    }
}

/// `n_rows` rows of `ctx` tokens from `texts` (each row starts with BOS; BOS separates
/// documents). Returns fewer rows only if the texts run out; errors if none fit.
pub fn build_token_rows(
    lm: &dyn HookedLm,
    texts: &[&str],
    ctx: usize,
    n_rows: usize,
) -> Result<Vec<u32>> {
    let bos = lm
        .bos_id()
        .context("the core evaluation needs a model with a BOS token")?;
    if ctx < 2 {
        bail!("context length {ctx} is too short");
    }
    let mut rows = Vec::with_capacity(n_rows * ctx);
    let mut cur: Vec<u32> = vec![bos];
    'outer: for (i, t) in texts.iter().enumerate() {
        let ids = lm
            .encode(t)
            .with_context(|| format!("cannot tokenize text {i}"))?;
        if ids.is_empty() {
            continue;
        }
        // Separator before every document except at the start of a row.
        let doc = (if cur.len() > 1 { Some(bos) } else { None })
            .into_iter()
            .chain(ids);
        for id in doc {
            cur.push(id);
            if cur.len() == ctx {
                rows.extend_from_slice(&cur);
                cur.clear();
                cur.push(bos);
                if rows.len() == n_rows * ctx {
                    break 'outer;
                }
            }
        }
    }
    if rows.is_empty() {
        bail!("the texts give no full row of {ctx} tokens");
    }
    Ok(rows)
}

fn mask_of(tokens: &[u32], ignored: &[u32], exclude: bool) -> Vec<bool> {
    tokens
        .iter()
        .map(|t| !exclude || !ignored.contains(t))
        .collect()
}

// Stored as raw bits: a JSON round trip of an f64 is not guaranteed to be exact.
fn stats_to_bits(s: &LossStats) -> [u64; 4] {
    [s.kl_sum.to_bits(), s.kl_n, s.ce_sum.to_bits(), s.ce_n]
}

fn stats_from_bits(v: &[u64]) -> Option<LossStats> {
    (v.len() == 4).then(|| LossStats {
        kl_sum: f64::from_bits(v[0]),
        kl_n: v[1],
        ce_sum: f64::from_bits(v[2]),
        ce_n: v[3],
    })
}

/// Run the core evaluation.
pub fn run_core(
    lm: &dyn HookedLm,
    sae: &Sae,
    hook: &str,
    texts: &[&str],
    cfg: &CoreConfig,
    cache: &ActCache,
) -> Result<EvalResult> {
    let d = lm.d_model();
    crate::lm_api::check_sae_width(sae, lm, hook)?;
    if cfg.batch_prompts == 0 || cfg.sparsity_batches == 0 {
        bail!("core: batch size and number of batches must be positive");
    }
    let (b, s) = (cfg.batch_prompts, cfg.ctx);
    let n_batches = cfg.recon_batches.max(cfg.sparsity_batches);
    let tokens = build_token_rows(lm, texts, s, n_batches * b)?;
    let n_full = tokens.len() / (b * s);
    if n_full == 0 {
        bail!("core: the texts give fewer than {b} rows of {s} tokens (one batch)");
    }
    let (n_recon, n_sparse) = (
        cfg.recon_batches.min(n_full),
        cfg.sparsity_batches.min(n_full),
    );
    let ignored = lm.ignored_ids();
    let base_key = format!(
        "core|{}|{hook}|b={b}|ctx={s}|texts={}|excl={}",
        lm.name(),
        texts_fingerprint(texts.iter().copied()),
        cfg.exclude_special_tokens
    );
    let v = lm.vocab_size();

    // Hook activations of the first max(recon, sparsity) batches: they feed the
    // sparsity/variance statistics, and the recon batches' forwards resume from them.
    let n_acts = n_recon.max(n_sparse);
    let act_key = format!("{base_key}|acts|n={n_acts}");
    let acts: Vec<f32> = match cache
        .load(&act_key)
        .and_then(|mut bl| bl.take_f32("acts").ok())
    {
        Some(a) if a.len() == n_acts * b * s * d => a,
        _ => {
            let mut all = Vec::with_capacity(n_acts * b * s * d);
            for bi in 0..n_acts {
                let tok = &tokens[bi * b * s..(bi + 1) * b * s];
                let a = lm.capture(tok, b, s, hook)?;
                if a.len() != b * s * d {
                    bail!(
                        "LM returned {} activation values for a [{b}, {s}, {d}] batch",
                        a.len()
                    );
                }
                all.extend_from_slice(&a);
            }
            let blob = Blob {
                f32s: vec![("acts".into(), all)],
                ..Default::default()
            };
            if let Err(e) = cache.store(&act_key, &blob) {
                tracing::warn!("could not write eval cache entry: {e:#}");
            }
            blob.f32s.into_iter().next().unwrap().1
        }
    };

    // Reconstruction batches: KL and CE.
    // "v2": KL/CE summed per position in log-sum-exp form (was a log-softmax per row).
    let loss_key = format!("{base_key}|losses-v2|n={n_recon}");
    let cached = cache.load(&loss_key).and_then(|bl| {
        Some((
            stats_from_bits(bl.u64("clean").ok()?)?,
            stats_from_bits(bl.u64("abl").ok()?)?,
        ))
    });
    let (mut st_clean, mut st_sae, mut st_abl) = (
        LossStats::default(),
        LossStats::default(),
        LossStats::default(),
    );
    for bi in 0..n_recon {
        let tok = &tokens[bi * b * s..(bi + 1) * b * s];
        let mask = mask_of(tok, &ignored, cfg.exclude_special_tokens);
        let x = &acts[bi * b * s * d..(bi + 1) * b * s * d];
        let clean = lm.logits_from_activation(tok, b, s, hook, x, &mut |_, _, _| {})?;
        if clean.len() != b * s * v {
            bail!(
                "LM returned {} logits for a [{b}, {s}, {v}] batch",
                clean.len()
            );
        }
        let mut splice = |h: &mut [f32], rows: usize, dd: usize| {
            let (_, xh) = sae.forward(h, rows);
            for r in 0..rows {
                if mask[r] {
                    h[r * dd..(r + 1) * dd].copy_from_slice(&xh[r * dd..(r + 1) * dd]);
                }
            }
        };
        let spliced = lm.logits_from_activation(tok, b, s, hook, x, &mut splice)?;
        st_sae.add(&loss_stats(&clean, Some(&spliced), tok, &mask, b, s, v));
        if cached.is_none() {
            st_clean.add(&loss_stats(&clean, None, tok, &mask, b, s, v));
            let abl = lm.logits_from_activation(tok, b, s, hook, x, &mut |h, _, _| h.fill(0.0))?;
            st_abl.add(&loss_stats(&clean, Some(&abl), tok, &mask, b, s, v));
        }
    }
    match cached {
        Some((c, a)) => {
            tracing::info!("eval cache hit: {loss_key}");
            st_clean = c;
            st_abl = a;
        }
        None if n_recon > 0 => {
            let blob = Blob {
                u64s: vec![
                    ("clean".into(), stats_to_bits(&st_clean).to_vec()),
                    ("abl".into(), stats_to_bits(&st_abl).to_vec()),
                ],
                ..Default::default()
            };
            if let Err(e) = cache.store(&loss_key, &blob) {
                tracing::warn!("could not write eval cache entry: {e:#}");
            }
        }
        None => {}
    }

    let mut acc = CoreAccumulator::new(d, sae.d_sae);
    for bi in 0..n_sparse {
        let x = &acts[bi * b * s * d..(bi + 1) * b * s * d];
        let tok = &tokens[bi * b * s..(bi + 1) * b * s];
        let mask = mask_of(tok, &ignored, cfg.exclude_special_tokens);
        let (codes, xh) = sae.forward(x, b * s);
        acc.add_batch(x, &xh, &codes, &mask, s);
    }
    let m = acc.finish();
    let w = weight_metrics(sae);
    let mean = |v: &[f64]| {
        let f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        f.iter().sum::<f64>() / f.len() as f64
    };
    let nan_if = |cond: bool, x: f64| if cond { x } else { f64::NAN };
    let metrics = vec![
        (
            "model_behavior_preservation".to_string(),
            vec![
                (
                    "kl_div_score".to_string(),
                    nan_if(n_recon > 0, kl_div_score(st_sae.kl(), st_abl.kl())),
                ),
                (
                    "kl_div_with_ablation".to_string(),
                    nan_if(n_recon > 0, st_abl.kl()),
                ),
                (
                    "kl_div_with_sae".to_string(),
                    nan_if(n_recon > 0, st_sae.kl()),
                ),
            ],
        ),
        (
            "model_performance_preservation".to_string(),
            vec![
                (
                    "ce_loss_score".to_string(),
                    nan_if(
                        n_recon > 0,
                        ce_loss_score(st_clean.ce(), st_sae.ce(), st_abl.ce()),
                    ),
                ),
                (
                    "ce_loss_with_ablation".to_string(),
                    nan_if(n_recon > 0, st_abl.ce()),
                ),
                (
                    "ce_loss_with_sae".to_string(),
                    nan_if(n_recon > 0, st_sae.ce()),
                ),
                (
                    "ce_loss_without_sae".to_string(),
                    nan_if(n_recon > 0, st_clean.ce()),
                ),
            ],
        ),
        (
            "reconstruction_quality".to_string(),
            vec![
                (
                    "explained_variance".to_string(),
                    m.explained_variance_saebench,
                ),
                (
                    "explained_variance_legacy".to_string(),
                    m.explained_variance_legacy,
                ),
                ("mse".to_string(), m.mse_saebench),
                ("cossim".to_string(), m.cossim),
                (
                    "explained_variance_conventional".to_string(),
                    m.explained_variance_conventional,
                ),
                ("mse_conventional".to_string(), m.mse_conventional),
            ],
        ),
        (
            "shrinkage".to_string(),
            vec![
                ("l2_norm_in".to_string(), m.l2_norm_in),
                ("l2_norm_out".to_string(), m.l2_norm_out),
                ("l2_ratio".to_string(), m.l2_ratio),
                (
                    "relative_reconstruction_bias".to_string(),
                    m.relative_reconstruction_bias,
                ),
            ],
        ),
        (
            "sparsity".to_string(),
            vec![("l0".to_string(), m.l0), ("l1".to_string(), m.l1)],
        ),
        (
            "token_stats".to_string(),
            vec![
                (
                    "total_tokens_eval_reconstruction".to_string(),
                    (n_recon * b * s) as f64,
                ),
                (
                    "total_tokens_eval_sparsity_variance".to_string(),
                    (n_sparse * b * s) as f64,
                ),
            ],
        ),
        (
            "misc_metrics".to_string(),
            vec![
                ("freq_over_1_percent".to_string(), m.freq_over_1_percent),
                ("freq_over_10_percent".to_string(), m.freq_over_10_percent),
                (
                    "normalized_freq_over_1_percent".to_string(),
                    m.normalized_freq_over_1_percent,
                ),
                (
                    "normalized_freq_over_10_percent".to_string(),
                    m.normalized_freq_over_10_percent,
                ),
                (
                    "average_max_encoder_cosine_sim".to_string(),
                    mean(&w.max_encoder_cosine_sim),
                ),
                (
                    "average_max_decoder_cosine_sim".to_string(),
                    mean(&w.max_decoder_cosine_sim),
                ),
                ("frac_alive".to_string(), m.frac_alive),
            ],
        ),
    ];
    let details = if cfg.per_latent_details {
        (0..sae.d_sae)
            .map(|f| {
                J::obj(vec![
                    ("index", J::Int(f as i64)),
                    ("feature_density", J::Num(m.density[f])),
                    (
                        "consistent_activation_heuristic",
                        J::Num(m.consistent_activation[f]),
                    ),
                    ("encoder_bias", J::Num(w.encoder_bias[f])),
                    ("encoder_norm", J::Num(w.encoder_norm[f])),
                    (
                        "encoder_decoder_cosine_sim",
                        J::Num(w.encoder_decoder_cosine_sim[f]),
                    ),
                    (
                        "max_decoder_cosine_sim",
                        J::Num(w.max_decoder_cosine_sim[f]),
                    ),
                    (
                        "max_encoder_cosine_sim",
                        J::Num(w.max_encoder_cosine_sim[f]),
                    ),
                ])
            })
            .collect()
    } else {
        Vec::new()
    };
    let config = J::obj(vec![
        ("model_name", J::str(lm.name())),
        ("hook_name", J::str(hook)),
        ("batch_size_prompts", J::Int(b as i64)),
        ("n_eval_reconstruction_batches", J::Int(n_recon as i64)),
        ("n_eval_sparsity_variance_batches", J::Int(n_sparse as i64)),
        ("context_size", J::Int(s as i64)),
        (
            "exclude_special_tokens_from_reconstruction",
            J::Bool(cfg.exclude_special_tokens),
        ),
        ("compute_kl", J::Bool(true)),
        ("compute_ce_loss", J::Bool(true)),
        ("compute_l2_norms", J::Bool(true)),
        ("compute_sparsity_metrics", J::Bool(true)),
        ("compute_variance_metrics", J::Bool(true)),
        ("compute_featurewise_density_statistics", J::Bool(true)),
        ("compute_featurewise_weight_based_metrics", J::Bool(true)),
    ]);
    Ok(EvalResult {
        eval_type_id: "core".into(),
        eval_config: config,
        metrics,
        details,
        unstructured: J::obj(vec![(
            "notes",
            J::str(
                "explained_variance and mse use SAEBench's formulas (total variance A - (A/d)^2; \
                 SSE divided by the batch token count); *_conventional are 1 - SSE/SST over all \
                 tokens and the mean over tokens and dimensions",
            ),
        )]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm_api::ToyLm;
    use crate::testutil::{identity_sae, random_sae, toy_texts, toy_words};

    fn setup() -> (ToyLm, Vec<String>) {
        let words = toy_words();
        let refs: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
        let lm = ToyLm::new(&refs, 8, 2, 5);
        let texts = toy_texts(&words, 60, 1);
        (lm, texts)
    }

    fn cfg() -> CoreConfig {
        CoreConfig {
            batch_prompts: 2,
            ctx: 16,
            recon_batches: 2,
            sparsity_batches: 3,
            ..Default::default()
        }
    }

    #[test]
    fn token_rows_start_with_bos_and_separate_documents() {
        let (lm, _) = setup();
        let a = lm.encode("ab").unwrap();
        let c = lm.encode("cd ef").unwrap();
        let stream: Vec<u32> = [ToyLm::BOS]
            .into_iter()
            .chain(a.iter().copied())
            .chain([ToyLm::BOS])
            .chain(c.iter().copied())
            .collect();
        let rows = build_token_rows(&lm, &["ab", "cd ef"], 8, 10).unwrap();
        assert_eq!(rows, stream[..8]);
        // With short rows, every row starts with BOS and the texts continue in order.
        let rows = build_token_rows(&lm, &["ab", "cd ef"], 3, 10).unwrap();
        for row in rows.chunks(3) {
            assert_eq!(row[0], ToyLm::BOS);
        }
        assert!(build_token_rows(&lm, &["a"], 16, 1).is_err());
    }

    #[test]
    fn perfect_sae_scores_one_and_zero_sae_scores_zero() {
        let (lm, texts) = setup();
        let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let hook = "blocks.0.hook_resid_post";
        let r = run_core(
            &lm,
            &identity_sae(8),
            hook,
            &refs,
            &cfg(),
            &ActCache::default(),
        )
        .unwrap();
        assert!(
            (r.metric("model_behavior_preservation", "kl_div_score")
                .unwrap()
                - 1.0)
                .abs()
                < 1e-6
        );
        assert!(
            (r.metric("model_performance_preservation", "ce_loss_score")
                .unwrap()
                - 1.0)
                .abs()
                < 1e-6
        );
        assert!(
            (r.metric("reconstruction_quality", "explained_variance_conventional")
                .unwrap()
                - 1.0)
                .abs()
                < 1e-6
        );
        assert!((r.metric("reconstruction_quality", "cossim").unwrap() - 1.0).abs() < 1e-6);
        assert!(
            r.metric("model_behavior_preservation", "kl_div_with_ablation")
                .unwrap()
                > 0.0
        );
        assert_eq!(r.details.len(), 16);
        // A zero SAE with no special-token exclusion is exactly the ablation.
        let mut zero = random_sae(8, 16, 1);
        zero.w_dec.fill(0.0);
        zero.b_dec.fill(0.0);
        let c = CoreConfig {
            exclude_special_tokens: false,
            ..cfg()
        };
        let r = run_core(&lm, &zero, hook, &refs, &c, &ActCache::default()).unwrap();
        assert!(
            r.metric("model_behavior_preservation", "kl_div_score")
                .unwrap()
                .abs()
                < 1e-9
        );
        assert!(
            r.metric("model_performance_preservation", "ce_loss_score")
                .unwrap()
                .abs()
                < 1e-9
        );
        assert!(
            r.metric("reconstruction_quality", "explained_variance_conventional")
                .unwrap()
                < 0.0
        );
        assert_eq!(
            r.metric("token_stats", "total_tokens_eval_sparsity_variance")
                .unwrap(),
            96.0
        );
        // Width mismatch is an error.
        assert!(run_core(
            &lm,
            &random_sae(7, 4, 1),
            hook,
            &refs,
            &cfg(),
            &ActCache::default()
        )
        .is_err());
    }

    #[test]
    fn cache_gives_identical_results() {
        let (lm, texts) = setup();
        let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let dir = std::env::temp_dir().join(format!("saelab-core-cache-{}", std::process::id()));
        let cache = ActCache::new(Some(dir.clone()));
        let sae = random_sae(8, 24, 3);
        let hook = "blocks.1.hook_resid_post";
        let a = run_core(&lm, &sae, hook, &refs, &cfg(), &ActCache::default()).unwrap();
        let b = run_core(&lm, &sae, hook, &refs, &cfg(), &cache).unwrap();
        assert!(std::fs::read_dir(&dir).unwrap().count() >= 2);
        let c = run_core(&lm, &sae, hook, &refs, &cfg(), &cache).unwrap();
        assert_eq!(a.metrics, b.metrics);
        assert_eq!(a.metrics, c.metrics);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
