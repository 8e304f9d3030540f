//! saelab-sae: sparse autoencoders, their fast trainer, and the SAELens file format.
//!
//! # Public API (what the CLI uses)
//!
//! ```no_run
//! use saelab_sae::{train, Sae, TrainConfig, TrainOptions};
//! use saelab_core::source::MatrixSource;
//! # fn main() -> anyhow::Result<()> {
//! let mut source = MatrixSource::new(vec![0.5f32; 4096 * 64], 64, "demo");
//! let cfg = TrainConfig { d_sae: 256, k: 8, total_tokens: 4096, batch_size: 256, ..Default::default() };
//! let dirs = vec![std::path::PathBuf::from("out/sae0")];
//! let summaries = train(&[cfg], &mut source, &dirs, TrainOptions::default())?;
//! println!("{} steps, {} tokens", summaries[0].steps, summaries[0].tokens);
//! let sae = Sae::load(&dirs[0])?; // SAELens folder: cfg.json + sae_weights.safetensors
//! let (codes, x_hat) = sae.forward(&vec![0.5f32; 64], 1);
//! # let _ = (codes, x_hat); Ok(()) }
//! ```
//!
//! - [`config::TrainConfig`]: one SAE's training configuration (serde/TOML, documented
//!   defaults, unknown fields rejected). The resolved config is saved as `train_config.toml`.
//! - [`train::train`]`(configs, source, out_dirs, opts)`: trains several SAEs from one read
//!   of each batch; writes `metrics.jsonl`, checkpoints (`checkpoint.safetensors`, resumable
//!   bit-identically with `opts.resume`) and the SAELens folder in each output directory;
//!   returns a [`train::TrainSummary`] per SAE (steps, tokens, wall time, final metrics).
//! - [`model::Sae`]: the inference SAE (SAELens layout) with `encode`/`decode`/`forward`,
//!   `Sae::save(dir)`, `Sae::load(dir)` (SAELens or sparsify folder), `Sae::load_sparsify`.
//!
//! # Modules
//!
//! - [`codes`]: sparse (CSR) codes of a batch, the currency after the encoder.
//! - [`model`]: the inference form of an SAE (SAELens layout) with encode/decode.
//! - [`io`]: SAELens / sparsify files.
//! - [`regularizer`]: the hook through which the research methods join a step.
//! - [`methods`]: the research methods (engineer H5's module) built on that hook.
//! - [`kernels`]: the sparse kernels (blocked encoder + top-k, sparse decoder and backward,
//!   fused Adam), each tested against a dense reference.
//! - [`trainer`]: one SAE under training: every architecture's step.
//! - [`checkpoint`]: exact-resume checkpoints.
//! - [`train`]: the loop over batches.
//! - [`synth`]: synthetic structured activations for tests and benchmarks.

// Kernels take many slices by design (no allocation, explicit layouts), and index loops
// over parallel arrays read more clearly than zipped iterators here.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

pub mod checkpoint;
pub mod codes;
pub mod config;
pub mod io;
pub mod kernels;
pub mod methods;
pub mod model;
pub mod regularizer;
pub mod synth;
pub mod train;
pub mod trainer;

pub use codes::SparseCodes;
pub use config::{Architecture, MatmulPrecision, TrainConfig};
pub use model::{InferenceArch, Sae};
pub use train::{export_checkpoint, train, TrainOptions, TrainSummary};
pub use trainer::{TrainHooks, TrainSae};
