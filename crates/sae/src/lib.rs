//! saelab-sae: sparse autoencoders and their trainer.
//!
//! - [`codes`]: sparse (CSR) codes of a batch, the currency after the encoder.
//! - [`model`]: the inference form of an SAE (SAELens layout) with encode/decode.
//! - [`regularizer`]: the hook through which the research methods join a step.

pub mod codes;
pub mod model;
pub mod regularizer;
