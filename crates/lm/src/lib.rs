//! saelab-lm: language models with hook points.
//!
//! Planned modules (one concern each):
//! - `gguf`: GGUF reader (metadata, tensor index), dequantisation of Q4_0/Q4_1/Q8_0/F16/F32.
//! - `weights`: safetensors + config.json loading.
//! - `tokenizer`: tokenizers built from GGUF metadata or tokenizer.json.
//! - `hooks`: hook names (`blocks.L.hook_resid_post`, ...) and hook actions.
//! - `llama`, `gemma2`: one file per architecture, forwards with hooks.
