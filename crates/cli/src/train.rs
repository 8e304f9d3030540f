//! `saelab train`: train one or several SAEs from one read of an activation store.

use anyhow::{bail, Context, Result};
use clap::Args;
use saelab_data::store::{ActivationStore, ShuffleOptions, ShuffledReader};
use saelab_sae::{export_checkpoint, train, TrainConfig, TrainOptions};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub struct TrainArgs {
    /// Training config (TOML, every key optional; see `saelab train --print-default-config`).
    /// Repeat to train several SAEs sharing one read of the activations.
    #[arg(long = "config", value_name = "TOML")]
    pub configs: Vec<PathBuf>,
    /// Override a config key for every SAE: `--set k=32 --set method.method="progressive_ortho"`.
    /// Values are TOML (strings need quotes).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Activation store written by `saelab cache`.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// Output directory; each SAE goes to OUT/<config file stem> (OUT itself with one config).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the checkpoints in the output directories (bit-identical to an
    /// uninterrupted run).
    #[arg(long)]
    pub resume: bool,
    /// Replace SAEs already present in the output directories.
    #[arg(long)]
    pub overwrite: bool,
    /// Print the default configuration with every key and exit.
    #[arg(long)]
    pub print_default_config: bool,
}

/// Parse a train config file with `--set` overrides applied.
pub fn load_config(path: Option<&PathBuf>, sets: &[String]) -> Result<TrainConfig> {
    let mut table: toml::Table = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("{} is not valid TOML", p.display()))?
        }
        None => toml::Table::new(),
    };
    for s in sets {
        let Some((k, v)) = s.split_once('=') else {
            bail!("--set `{s}` is not KEY=VALUE")
        };
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {v}"))
            .map(|mut t| t.remove("v").unwrap())
            .unwrap_or_else(|_| toml::Value::String(v.to_string()));
        saelab_report::plan::set_dotted(&mut table, k.trim(), value)?;
    }
    let what = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "--set values".into());
    let cfg: TrainConfig = toml::Value::Table(table)
        .try_into()
        .with_context(|| format!("invalid training config {what}"))?;
    Ok(cfg)
}

pub fn run(a: TrainArgs) -> Result<()> {
    if a.print_default_config {
        print!("{}", toml::to_string(&TrainConfig::default())?);
        return Ok(());
    }
    let Some(store_dir) = a.store else {
        bail!("--store is required (an activation store from `saelab cache`)")
    };
    let Some(out) = a.out else {
        bail!("--out is required")
    };
    let mut configs = Vec::new();
    let mut dirs = Vec::new();
    if a.configs.is_empty() {
        configs.push(load_config(None, &a.sets)?);
        dirs.push(out.clone());
    }
    for p in &a.configs {
        configs.push(load_config(Some(p), &a.sets)?);
        dirs.push(if a.configs.len() == 1 {
            out.clone()
        } else {
            out.join(p.file_stem().unwrap_or_default())
        });
    }
    let store = Arc::new(ActivationStore::open(&store_dir)?);
    // The saved SAE names where its activations came from (SAELens metadata), unless set.
    let m = store.manifest();
    for c in &mut configs {
        if c.metadata.model_name.is_empty() {
            c.metadata.model_name = m.model.clone();
        }
        if c.metadata.hook_name.is_empty() {
            c.metadata.hook_name = m.hook.clone();
        }
        if c.metadata.context_size == 0 {
            c.metadata.context_size = m.ctx_len;
            c.metadata.prepend_bos = true;
        }
    }
    let seed = configs[0].seed;
    let mut source = ShuffledReader::new(
        store,
        ShuffleOptions {
            seed,
            ..Default::default()
        },
    );
    let opts = TrainOptions {
        resume: a.resume,
        overwrite: a.overwrite,
        progress: true,
        loop_source: true,
        ..Default::default()
    };
    let summaries = train(&configs, &mut source, &dirs, opts)?;
    for s in summaries {
        println!(
            "{}: {} steps, {} tokens, {:.1} s ({:.0} tokens/s)",
            s.out_dir.display(),
            s.steps,
            s.tokens,
            s.wall_seconds,
            s.tokens_per_second
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct ExportArgs {
    /// SAE output directories of `saelab train` or `saelab experiment`, each holding a
    /// `checkpoint.safetensors`.
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
}

/// Re-write each directory's SAE from its checkpoint with this build's export.
pub fn export(a: ExportArgs) -> Result<()> {
    for dir in &a.dirs {
        let (step, planned) = export_checkpoint(dir)?;
        println!(
            "{}: SAE re-written from the checkpoint at step {step} of {planned}",
            dir.display()
        );
    }
    Ok(())
}
