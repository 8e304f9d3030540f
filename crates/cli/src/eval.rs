//! `saelab eval`: run SAEBench evaluations on one SAE folder.

use anyhow::Result;
use clap::Args;
use saelab_lm::{Model, WeightDtype};
use saelab_report::evalsetup::SuiteEvaluator;
use saelab_report::runner::Evaluator;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// SAE folder (SAELens cfg.json + sae_weights.safetensors, or sparsify's
    /// cfg.json + sae.safetensors). Its hook comes from cfg.json metadata.hook_name.
    #[arg(long)]
    pub sae: PathBuf,
    /// Comma-separated: core, absorption, sparse_probing, tpp, scr. (unlearning and
    /// autointerp are not available offline: they need gemma-2-2b-it + WMDP and an LLM judge.)
    #[arg(
        long,
        default_value = "core,absorption,sparse_probing,tpp,scr",
        value_delimiter = ','
    )]
    pub evals: Vec<String>,
    /// The model the SAE was trained on: `default`, a .gguf file or a safetensors directory.
    #[arg(long, default_value = "default")]
    pub model: String,
    /// LM arithmetic: `f32` (exact), `bf16-weights` (half the weight memory, f32
    /// arithmetic) or `bf16` (bf16 products with f32 sums, as PyTorch's bf16: on AMX tiles
    /// where the CPU has them, about 2x faster there; results are tagged "[bf16]").
    #[arg(long, default_value = "f32")]
    pub lm_precision: WeightDtype,
    /// Output directory for the SAEBench JSON files (default: SAE/evals).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Evaluation sizes: `default` (sized for a 2-core CPU: 8 x 8 x 128 reconstruction
    /// tokens, 240/60/120 probe splits), `quick` (about half of that, as the quickstart
    /// uses), `saebench` (SAEBench's 200 x 16 x 128 reconstruction tokens,
    /// 2000 x 16 x 128 sparsity tokens, 4000/1000 probe splits) or `tiny` (smoke tests).
    #[arg(long, default_value = "default",
          value_parser = clap::builder::PossibleValuesParser::new(saelab_report::evalsetup::EVAL_SIZES))]
    pub sizes: String,
    /// Shorthand for `--sizes saebench`.
    #[arg(long, conflicts_with = "sizes")]
    pub saebench_sizes: bool,
    /// Where LM activations for evaluations are cached and reused across SAEs of the
    /// same model and hook (default: $SAELAB_HOME/eval-cache).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let model = Model::open(&a.model, a.lm_precision)?;
    let out = a.out.unwrap_or_else(|| a.sae.join("evals"));
    let cache = a
        .cache_dir
        .unwrap_or_else(|| saelab_core::assets::saelab_home().join("eval-cache"));
    let ev = SuiteEvaluator::new(Some(cache));
    let sizes = if a.saebench_sizes {
        "saebench"
    } else {
        a.sizes.as_str()
    };
    ev.evaluate(&model, &a.sae, &a.evals, &out, sizes)?;
    println!("results: {}", out.display());
    Ok(())
}
