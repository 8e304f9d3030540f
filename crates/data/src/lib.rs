//! saelab-data: text in, activations out.
//!
//! Planned modules: `assets` (fetch the default model and corpora), `corpus` (readers and
//! the labelled `Dataset`), `packing` (rows of ctx_len with BOS), `store` (sharded,
//! memory-mapped activation store and its shuffling reader), `cache` (LM -> store).
