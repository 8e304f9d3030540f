//! saelab-core: the small shared base of the saelab pipeline.
//!
//! Everything numerically hot and shared between the LM forward (`saelab-lm`) and the
//! SAE trainer (`saelab-sae`) lives here, so both stages use one GEMM and one RNG:
//!
//! - [`gemm`]: `C = alpha * A * B + beta * C` on strided f32 views, multithreaded.
//! - [`rng`]: a small deterministic RNG (SplitMix64 seeding a xoshiro256++ stream).
//! - [`source`]: the [`source::ActivationSource`] trait the trainer and evaluations
//!   read activations through (a memory-mapped store, an in-memory matrix, or the LM).
//! - [`assets`]: the cache of the default model and corpora, fetched with pip and npm.
//! - [`fsutil`]: write-to-temp-then-rename helpers, so no command leaves half a file.
//! - [`interrupt`]: Ctrl-C / SIGTERM as a request to stop at the next safe point.
//! - [`malloc`]: keep the training step's large buffers in the heap between steps.

pub mod assets;
pub mod fsutil;
pub mod gemm;
pub mod interrupt;
pub mod malloc;
pub mod rng;
pub mod source;
