//! `saelab browse`: the feature browser of one SAE over an activation store.

use anyhow::{Context, Result};
use clap::Args;
use saelab_data::store::ActivationStore;
use saelab_lm::{Model, WeightDtype};
use saelab_report::browser::{self, write_sae_browser, BrowseOptions};
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
    let store = ActivationStore::open(&a.store)
        .with_context(|| format!("opening activation store {}", a.store.display()))?;
    let model = Model::open(&a.model, WeightDtype::F32)?;
    let opts = BrowseOptions {
        max_rows: a.rows,
        examples: a.examples,
        before: a.before,
        after: a.after,
    };
    let pb = indicatif::ProgressBar::new(opts.max_rows.min(store.rows()));
    if let Ok(s) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows ({per_sec}, eta {eta})",
    ) {
        pb.set_style(s);
    }
    let out = a.out.unwrap_or_else(|| browser::default_dir(&a.sae));
    let sum = write_sae_browser(&model, &store, &a.sae, &out, &opts, &|done| {
        pb.set_position(done)
    })?;
    pb.finish_and_clear();
    println!(
        "{} of {} latents fire on the {} rows scanned\nbrowser: {}\n         {}",
        sum.alive,
        sum.latents,
        sum.rows_scanned,
        out.join(browser::PAGE_FILE).display(),
        out.join(browser::DATA_FILE).display()
    );
    Ok(())
}
