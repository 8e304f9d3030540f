//! Run the evaluations on a real model, for measurements (not a test).
//!
//! ```text
//! cargo run --release -p saelab-eval --example eval_model -- \
//!   MODEL.gguf HOOK OUT_DIR BROWN_DIR STDLIB_DIR EVALS [SAE_DIR|identity] [CACHE_DIR]
//! ```
//! EVALS is a comma list (core,absorption,sparse_probing,tpp,scr). Without an SAE
//! directory (or with `identity`) the SAE is the exact identity `[relu(x), relu(-x)]`
//! with decoder `[I; -I]`, whose core scores must be 1. Sizes are small (see below).

use anyhow::{Context, Result};
use saelab_data::corpus::{load_brown, load_sotu, BrownUnit, Dataset};
use saelab_eval::*;
use saelab_sae::model::{InferenceArch, Sae, SaeMetadata};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn identity_sae(d: usize) -> Sae {
    let f = 2 * d;
    let mut w_enc = vec![0f32; d * f];
    let mut w_dec = vec![0f32; f * d];
    for i in 0..d {
        w_enc[i * f + i] = 1.0;
        w_enc[i * f + d + i] = -1.0;
        w_dec[i * d + i] = 1.0;
        w_dec[(d + i) * d + i] = -1.0;
    }
    Sae {
        arch: InferenceArch::Standard,
        d_in: d,
        d_sae: f,
        k: 0,
        apply_b_dec_to_input: false,
        w_enc,
        b_enc: vec![0.0; f],
        w_dec,
        b_dec: vec![0.0; d],
        threshold: None,
        b_gate: None,
        r_mag: None,
        b_mag: None,
        metadata: SaeMetadata::default(),
    }
}

fn to_labeled(ds: &Dataset) -> Vec<LabeledText> {
    ds.docs
        .iter()
        .map(|d| LabeledText {
            text: d.text.clone(),
            labels: d.labels.clone(),
        })
        .collect()
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 6 {
        anyhow::bail!("usage: eval_model MODEL HOOK OUT_DIR BROWN_DIR STDLIB_DIR EVALS [SAE_DIR|identity] [CACHE_DIR]");
    }
    let t0 = Instant::now();
    let lm =
        saelab_lm::Model::load(Path::new(&a[0])).with_context(|| format!("loading {}", a[0]))?;
    eprintln!("model loaded in {:.1} s", t0.elapsed().as_secs_f64());
    let d = lm.config().d_model;
    let sae = match a.get(6).map(|s| s.as_str()) {
        None | Some("identity") => identity_sae(d),
        Some(dir) => Sae::load(Path::new(dir))?,
    };
    let brown = load_brown(Path::new(&a[3]), BrownUnit::Paragraph)?;
    let mut sotu = to_labeled(&load_sotu(Path::new(&a[4]))?);
    // SOTU speeches are long: keep their first 2000 characters (the probe reads 128 tokens).
    for d in &mut sotu {
        let cut = d
            .text
            .char_indices()
            .nth(2000)
            .map(|(i, _)| i)
            .unwrap_or(d.text.len());
        d.text.truncate(cut);
    }
    let brown_docs = to_labeled(&brown);
    let core_texts: Vec<String> = brown_docs.iter().map(|d| d.text.clone()).collect();
    let opts = EvalOptions {
        evals: a[5].split(',').map(String::from).collect(),
        hook: a[1].clone(),
        seed: 42,
        cache_dir: a.get(7).map(PathBuf::from),
        identity: SaeIdentity {
            sae_lens_id: a.get(6).cloned().unwrap_or("identity".into()),
            sae_lens_release_id: "local".into(),
        },
        core: CoreConfig {
            batch_prompts: 8,
            ctx: 128,
            recon_batches: 4,
            sparsity_batches: 8,
            per_latent_details: false,
            ..Default::default()
        },
        core_texts,
        absorption: AbsorptionConfig {
            max_words: Some(1500),
            ..Default::default()
        },
        sparse_probing: SparseProbingConfig {
            n_train: 200,
            n_val: 50,
            n_test: 100,
            ..Default::default()
        },
        probing_datasets: vec![ProbeDataset {
            name: "brown-genre".into(),
            label_key: "genre".into(),
            docs: brown_docs.clone(),
        }],
        scr_tpp: ScrTppConfig {
            n_train: 200,
            n_test: 100,
            ..Default::default()
        },
        tpp_datasets: Vec::new(),
        scr: Some(ScrSpec {
            dataset: ProbeDataset {
                name: "sotu".into(),
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
                pos: "pre-1900".into(),
                neg: "post-1900".into(),
            },
        }),
    };
    let t1 = Instant::now();
    let run = run_evals(&opts, &sae, &lm, Path::new(&a[2]))?;
    eprintln!("evals done in {:.1} s", t1.elapsed().as_secs_f64());
    for p in &run.paths {
        eprintln!("wrote {}", p.display());
    }
    print!("{}", run.summary);
    Ok(())
}
