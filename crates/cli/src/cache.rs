//! `saelab cache`: run the LM over a corpus and store the activations at one hook.

use anyhow::Result;
use clap::Args;
use saelab_data::cache::{cache_activations, CacheOptions};
use saelab_data::corpus::load_corpus;
use saelab_data::packing::PackMode;
use saelab_data::store::Dtype;
use saelab_lm::{HookPoint, Model, WeightDtype};
use std::path::PathBuf;

#[derive(Args)]
pub struct CacheArgs {
    /// `default` (SmolLM2-135M-Instruct from the cache), a .gguf file, or a directory with
    /// config.json + *.safetensors + tokenizer.json (Llama or Gemma-2).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// LM arithmetic: `f32` (exact), `bf16-weights` (half the weight memory, f32
    /// arithmetic) or `bf16` (bf16 products with f32 sums, as PyTorch's bf16: on AMX tiles
    /// where the CPU has them, about 2x faster there; results are tagged "[bf16]").
    #[arg(long, default_value = "f32")]
    pub lm_precision: WeightDtype,
    /// Hook name, TransformerLens style: blocks.L.hook_resid_pre | hook_resid_post |
    /// hook_attn_out | hook_mlp_out.
    #[arg(long, default_value = "blocks.14.hook_resid_post")]
    pub hook: String,
    /// Corpus: default | nlp-corpus | brown | sotu | spam | moby-dick, or a .txt/.jsonl/.json/.csv file.
    #[arg(long, default_value = "default")]
    pub corpus: String,
    /// Token positions to run through the model (0 = the whole corpus).
    #[arg(long, default_value_t = 1_000_000)]
    pub tokens: u64,
    /// Output directory of the activation store (an interrupted run resumes here).
    #[arg(long)]
    pub out: PathBuf,
    /// Context length of each packed row (BOS first).
    #[arg(long, default_value_t = 128)]
    pub ctx_len: usize,
    /// How documents fill the rows: `concat` (as SAELens: documents joined with a BOS
    /// between them, every row full) or `per-doc` (no concatenation: one document per
    /// row, truncated to the context length; the padding is not stored).
    #[arg(long, default_value = "concat")]
    pub pack: PackMode,
    /// Rows per LM forward.
    #[arg(long, default_value_t = 8)]
    pub batch_rows: usize,
    /// Storage type of the activations: f32 | bf16 | f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Keep BOS/EOS/pad/control-token positions (dropped by default, as SAELens does).
    #[arg(long)]
    pub keep_special: bool,
    /// Drop rows whose norm exceeds this multiple of the median (attention sinks); 0 = keep all.
    #[arg(long, default_value_t = 10.0)]
    pub norm_outlier_factor: f32,
    /// Seed of the document order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: CacheArgs) -> Result<()> {
    let hook: HookPoint = a.hook.parse()?;
    let model = Model::open(&a.model, a.lm_precision)?;
    let dataset = load_corpus(&a.corpus)?;
    let mut opts = CacheOptions::new(hook);
    opts.tokens = a.tokens;
    opts.ctx_len = a.ctx_len;
    opts.pack_mode = a.pack;
    opts.batch_rows = a.batch_rows;
    opts.dtype = Dtype::parse(&a.dtype)?;
    opts.drop_special = !a.keep_special;
    opts.norm_outlier_factor = (a.norm_outlier_factor > 0.0).then_some(a.norm_outlier_factor);
    opts.seed = a.seed;
    opts.progress = true;
    let m = cache_activations(&model, &dataset, &opts, &a.out)?;
    println!("{}", serde_json::to_string_pretty(&m)?);
    println!("activation store: {}", a.out.display());
    Ok(())
}
