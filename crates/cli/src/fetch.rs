//! `saelab fetch`: populate the asset cache.

use anyhow::Result;
use clap::Args;
use saelab_core::assets;

#[derive(Args)]
pub struct FetchArgs {
    /// Also download a Hugging Face hub model repository (owner/name; safetensors +
    /// tokenizer.json + config.json). Needs the `huggingface_hub` Python package and
    /// network access to the hub.
    #[arg(long, value_name = "REPO")]
    pub hf: Option<String>,
}

pub fn run(args: FetchArgs) -> Result<()> {
    println!("cache: {}", assets::saelab_home().display());
    for p in assets::fetch_all()? {
        println!("ok    {}", p.display());
    }
    if let Some(repo) = args.hf {
        let dir = assets::fetch_hf_model(&repo)?;
        println!("ok    {}", dir.display());
    }
    Ok(())
}
