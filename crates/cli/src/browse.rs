//! `saelab browse`: the feature browser of one SAE over an activation store.

use anyhow::{bail, Context, Result};
use clap::Args;
use saelab_data::store::ActivationStore;
use saelab_lm::{Model, WeightDtype};
use saelab_report::browser::{browse, write_browser, BrowseOptions};
use saelab_sae::Sae;
use std::path::PathBuf;

#[derive(Args)]
pub struct BrowseArgs {
    /// SAE folder (SAELens or sparsify layout).
    #[arg(long)]
    pub sae: PathBuf,
    /// Activation store at the SAE's hook (`saelab cache` output, or a run's
    /// `activations/`). Its token and position files give each example's context.
    #[arg(long)]
    pub store: PathBuf,
    /// The model whose tokenizer turns token ids into text: `default`, a .gguf file or a
    /// safetensors directory (the model the store was cached from).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Rows of the store to scan, from its start.
    #[arg(long, default_value_t = BrowseOptions::default().max_rows)]
    pub rows: u64,
    /// Top-activating examples kept per latent.
    #[arg(long, default_value_t = BrowseOptions::default().examples)]
    pub examples: usize,
    /// Context tokens shown before each example's token.
    #[arg(long, default_value_t = BrowseOptions::default().before)]
    pub before: usize,
    /// Context tokens shown after it.
    #[arg(long, default_value_t = BrowseOptions::default().after)]
    pub after: usize,
    /// Output directory for browser.html and features.json (default: SAE/browser).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: BrowseArgs) -> Result<()> {
    let sae = Sae::load(&a.sae)?;
    let store = ActivationStore::open(&a.store)
        .with_context(|| format!("opening activation store {}", a.store.display()))?;
    let hook = &store.manifest().hook;
    if !sae.metadata.hook_name.is_empty() && &sae.metadata.hook_name != hook {
        bail!(
            "{} was trained at {} but the store {} holds {hook}",
            a.sae.display(),
            sae.metadata.hook_name,
            a.store.display()
        );
    }
    let model = Model::open(&a.model, WeightDtype::F32)?;
    let tok = model.tokenizer();
    let opts = BrowseOptions {
        max_rows: a.rows,
        examples: a.examples,
        before: a.before,
        after: a.after,
    };
    let rows = opts.max_rows.min(store.rows());
    let pb = indicatif::ProgressBar::new(rows);
    if let Ok(s) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows ({per_sec}, eta {eta})",
    ) {
        pb.set_style(s);
    }
    let (scanned, features) = browse(&store, &sae, &opts, &|done| pb.set_position(done))?;
    pb.finish_and_clear();
    let vocab = tok.vocab_size() as u32;
    if let Some(t) = features
        .iter()
        .flat_map(|f| &f.examples)
        .flat_map(|e| &e.tokens)
        .find(|&&t| t >= vocab)
    {
        bail!(
            "token id {t} in {} is outside the vocabulary of {} ({vocab} tokens): pass the model the store was cached from with --model",
            a.store.display(),
            a.model
        );
    }
    let out = a.out.unwrap_or_else(|| a.sae.join("browser"));
    write_browser(&out, &a.sae, &store, scanned, &features, &|t| {
        tok.token_text(t)
    })?;
    let alive = features.iter().filter(|f| f.fires > 0).count();
    println!(
        "{alive} of {} latents fire on the {scanned} rows scanned\nbrowser: {}\n         {}",
        features.len(),
        out.join("browser.html").display(),
        out.join("features.json").display()
    );
    Ok(())
}
