//! From a language model and a dataset to activations: [`cache_activations`] writes an
//! activation store (see [`crate::store`]); [`LmStream`] serves activations straight
//! from the model through a shuffling buffer, for runs larger than the disk budget.
//!
//! Both read the same deterministic token stream: documents in a seeded order, packed
//! into rows of `ctx_len` ([`crate::packing`]), run through the model `batch_rows` rows
//! at a time with the forward stopped after the hook's layer. Position `g` of the stream
//! is row `g / ctx_len`, column `g % ctx_len`. Filters (optional): positions holding a
//! special token (BOS, EOS, pad and the tokenizer's other control tokens) and positions
//! whose activation norm exceeds `norm_outlier_factor` x the median norm of the first
//! batch (attention sinks; dictionary_learning uses 10x) are not stored; padding
//! positions of per-document rows never are.
//!
//! Resuming: the store's manifest says how many stream positions its complete shards
//! account for. A rerun with the same options re-tokenises the stream, restarts the LM
//! at the batch containing that position (batches stay aligned to multiples of
//! `batch_rows` rows, so every forward sees exactly the batch it saw the first time) and
//! appends from there, which reproduces the uninterrupted store byte for byte.
//!
//! Memory: the pending token rows, one forward's activations and one shard buffer.

use crate::corpus::Dataset;
use crate::packing::{doc_order, PackMode, Packer};
use crate::store::{median, Dtype, Manifest, Skip, StoreSpec, StoreWriter, DEFAULT_SHARD_ROWS};
use anyhow::{anyhow, bail, Context, Result};
use saelab_core::rng::Rng;
use saelab_core::source::ActivationSource;
use saelab_lm::{HookPoint, Hooks, Model};
use std::path::Path;

/// Options shared by [`cache_activations`] and [`LmStream`].
#[derive(Clone, Debug)]
pub struct CacheOptions {
    pub hook: HookPoint,
    /// Token positions to run through the model (rounded up to whole rows; BOS and
    /// other filtered positions count). 0 = the whole dataset.
    pub tokens: u64,
    pub ctx_len: usize,
    /// Rows per forward (8 x 128 tokens by default).
    pub batch_rows: usize,
    pub dtype: Dtype,
    /// Do not store positions holding special tokens (BOS, EOS, pad, control tokens).
    pub drop_special: bool,
    /// Do not store rows with norm > factor x median norm (None: keep all).
    pub norm_outlier_factor: Option<f32>,
    /// Seed of the document order.
    pub seed: u64,
    pub pack_mode: PackMode,
    pub shard_rows: usize,
    /// Show an indicatif progress bar (tokens/s) on stderr.
    pub progress: bool,
    /// Write at most this many new shards in this call and return the incomplete,
    /// resumable manifest (lets a long cache run in bounded sessions).
    pub stop_after_shards: Option<usize>,
}

impl CacheOptions {
    pub fn new(hook: HookPoint) -> Self {
        CacheOptions {
            hook,
            tokens: 0,
            ctx_len: 128,
            batch_rows: 8,
            dtype: Dtype::F32,
            drop_special: true,
            norm_outlier_factor: Some(10.0),
            seed: 0,
            pack_mode: PackMode::Concat,
            shard_rows: DEFAULT_SHARD_ROWS,
            progress: false,
            stop_after_shards: None,
        }
    }

    fn validate(&self, model: &Model) -> Result<()> {
        self.hook.check(model.config().n_layers)?;
        if self.ctx_len < 2 || self.batch_rows == 0 || self.shard_rows == 0 {
            bail!("cache options: ctx_len must be >= 2 and batch_rows, shard_rows >= 1");
        }
        if self.ctx_len > model.config().max_seq {
            bail!(
                "ctx_len {} exceeds the model's maximum sequence length {}",
                self.ctx_len,
                model.config().max_seq
            );
        }
        if let Some(f) = self.norm_outlier_factor {
            if f.is_nan() || f <= 1.0 {
                bail!("norm outlier factor must be > 1, got {f}");
            }
        }
        Ok(())
    }
}

/// Token ids that are filtered when `drop_special` is set.
fn special_ids(model: &Model) -> Vec<u32> {
    let t = model.tokenizer();
    let mut ids = t.special_ids();
    ids.extend(t.bos_id());
    ids.extend(t.eos_id());
    ids.extend(t.pad_id());
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// One forward's worth of packed rows and their activations.
struct Batch {
    /// Stream index of the first row.
    first_row: u64,
    tokens: Vec<u32>,
    lens: Vec<usize>,
    acts: Vec<f32>,
}

/// Stream index of the first row, row-major tokens and real lengths of a batch.
type RowBatch = (u64, Vec<u32>, Vec<usize>);

/// Tokenises, packs and runs the model batch by batch.
struct Producer<'a> {
    model: &'a Model,
    dataset: &'a Dataset,
    opts: CacheOptions,
    order: Vec<usize>,
    next_doc: usize,
    packer: Packer,
    /// Rows taken from the packer so far (= stream row index of the next row).
    rows_taken: u64,
    /// Stop after this many rows (None: when the dataset runs out).
    max_rows: Option<u64>,
}

impl<'a> Producer<'a> {
    fn new(model: &'a Model, dataset: &'a Dataset, opts: &CacheOptions) -> Result<Self> {
        opts.validate(model)?;
        if dataset.is_empty() {
            bail!("dataset {} has no documents", dataset.name);
        }
        let t = model.tokenizer();
        let bos = t.bos_id().or(t.eos_id()).ok_or_else(|| {
            anyhow!("the model's tokenizer has neither a BOS nor an EOS token to start rows with")
        })?;
        let pad = t.pad_id().or(t.eos_id()).unwrap_or(bos);
        let max_rows = (opts.tokens > 0).then(|| opts.tokens.div_ceil(opts.ctx_len as u64));
        Ok(Producer {
            model,
            dataset,
            order: doc_order(dataset.len(), Some(opts.seed)),
            next_doc: 0,
            packer: Packer::new(opts.ctx_len, opts.pack_mode, bos, pad)?,
            rows_taken: 0,
            max_rows,
            opts: opts.clone(),
        })
    }

    /// Total stream positions this producer will emit, if known up front.
    fn planned_positions(&self) -> Option<u64> {
        self.max_rows.map(|r| r * self.opts.ctx_len as u64)
    }

    /// The next `batch_rows` rows (fewer at the end) without running the model.
    fn next_rows(&mut self) -> Result<Option<RowBatch>> {
        let want = match self.max_rows {
            Some(m) => (m.saturating_sub(self.rows_taken) as usize).min(self.opts.batch_rows),
            None => self.opts.batch_rows,
        };
        while self.packer.ready_rows() < want && self.next_doc < self.order.len() {
            let doc = &self.dataset.docs[self.order[self.next_doc]];
            self.next_doc += 1;
            let ids = self.model.tokenizer().encode(&doc.text).with_context(|| {
                format!(
                    "cannot tokenise document {} of {}",
                    self.next_doc - 1,
                    self.dataset.name
                )
            })?;
            self.packer.push_doc(&ids);
        }
        let n = want.min(self.packer.ready_rows());
        if n == 0 {
            return Ok(None);
        }
        let first = self.rows_taken;
        let mut tokens = Vec::with_capacity(n * self.opts.ctx_len);
        let mut lens = Vec::with_capacity(n);
        for _ in 0..n {
            let r = self.packer.pop_row().expect("row counted as ready");
            tokens.extend_from_slice(&r.tokens);
            lens.push(r.len);
        }
        self.rows_taken += n as u64;
        Ok(Some((first, tokens, lens)))
    }

    fn forward(&self, first_row: u64, tokens: Vec<u32>, lens: Vec<usize>) -> Result<Batch> {
        let rows = lens.len();
        let mut hooks = Hooks::new().capture(self.opts.hook).logits(false);
        let mut out = self
            .model
            .forward(&tokens, rows, self.opts.ctx_len, &mut hooks)?;
        let acts = out
            .captured
            .remove(&self.opts.hook)
            .ok_or_else(|| anyhow!("the model returned no activations for {}", self.opts.hook))?;
        Ok(Batch {
            first_row,
            tokens,
            lens,
            acts,
        })
    }

    fn next_batch(&mut self) -> Result<Option<Batch>> {
        match self.next_rows()? {
            Some((first, tokens, lens)) => Ok(Some(self.forward(first, tokens, lens)?)),
            None => Ok(None),
        }
    }
}

/// Classifies the positions of a batch: keep, or skip and why.
struct Filter {
    special: Vec<u32>,
    factor: Option<f32>,
    /// Norm limit (factor x reference median), fixed once known.
    limit: Option<f32>,
}

impl Filter {
    fn new(model: &Model, opts: &CacheOptions, median_norm: Option<f32>) -> Self {
        Filter {
            special: if opts.drop_special {
                special_ids(model)
            } else {
                Vec::new()
            },
            factor: opts.norm_outlier_factor,
            limit: match (opts.norm_outlier_factor, median_norm) {
                (Some(f), Some(m)) => Some(f * m),
                _ => None,
            },
        }
    }

    /// Set the reference from a batch if not known yet; returns the median when set.
    fn calibrate(&mut self, b: &Batch, ctx: usize, d: usize) -> Option<f32> {
        let f = self.factor?;
        if self.limit.is_some() {
            return None;
        }
        let mut norms = Vec::new();
        for (r, &len) in b.lens.iter().enumerate() {
            for p in 0..len {
                let i = r * ctx + p;
                if !self.special.contains(&b.tokens[i]) {
                    norms.push(norm(&b.acts[i * d..(i + 1) * d]));
                }
            }
        }
        if norms.is_empty() {
            return None;
        }
        let m = median(&norms);
        self.limit = Some(f * m);
        Some(m)
    }

    fn classify(&self, token: u32, row: &[f32], is_pad: bool) -> Option<Skip> {
        if is_pad {
            return Some(Skip::Padding);
        }
        if self.special.contains(&token) {
            return Some(Skip::Special);
        }
        if let Some(limit) = self.limit {
            if norm(row) > limit {
                return Some(Skip::Outlier);
            }
        }
        None
    }
}

fn norm(x: &[f32]) -> f32 {
    x.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt() as f32
}

fn progress_bar(show: bool, len: Option<u64>) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} tokens ({per_sec}, eta {eta})",
    );
    if let Ok(s) = style {
        pb.set_style(s);
    }
    pb
}

/// Run `model` over `dataset` and store the activations at `opts.hook` in `out_dir`
/// (created, or resumed if it holds an incomplete store written with the same options).
pub fn cache_activations(
    model: &Model,
    dataset: &Dataset,
    opts: &CacheOptions,
    out_dir: &Path,
) -> Result<Manifest> {
    let mut producer = Producer::new(model, dataset, opts)?;
    let d = model.config().d_model;
    let ctx = opts.ctx_len;
    let spec = StoreSpec {
        model: model.name_with_precision(),
        hook: opts.hook.to_string(),
        d_model: d,
        dtype: opts.dtype,
        ctx_len: ctx,
        shard_rows: opts.shard_rows,
        dropped_token_ids: if opts.drop_special {
            special_ids(model)
        } else {
            Vec::new()
        },
        norm_outlier_factor: opts.norm_outlier_factor,
        // What determines the stream: a rerun must agree on all of it to resume.
        source: serde_json::json!({
            "dataset": dataset.name,
            "documents": dataset.len(),
            "bytes": dataset.total_bytes(),
            "seed": opts.seed,
            "pack_mode": format!("{:?}", opts.pack_mode),
            "tokens": opts.tokens,
            "batch_rows": opts.batch_rows,
        }),
    };
    let mut writer = StoreWriter::open(out_dir, spec)?;
    if writer.is_complete() {
        return Ok(writer.manifest().clone());
    }
    let resume = writer.resume_position();
    let mut filter = Filter::new(model, opts, writer.norm_median());
    let shards_at_start = writer.manifest().shards.len();
    let pb = progress_bar(opts.progress, producer.planned_positions());
    pb.set_position(resume);
    if resume > 0 {
        tracing::info!("resuming {} at token position {resume}", out_dir.display());
    }
    // Skip whole batches before the resume point without running the model.
    let first_row = resume / ctx as u64;
    let skip_batches = first_row / opts.batch_rows as u64;
    for _ in 0..skip_batches {
        if producer.next_rows()?.is_none() {
            bail!(
                "{} records {resume} token positions but the dataset now yields fewer; \
                 was the corpus changed?",
                out_dir.join(crate::store::MANIFEST).display()
            );
        }
    }
    while let Some(b) = producer.next_batch()? {
        if let Some(m) = filter.calibrate(&b, ctx, d) {
            writer.set_norm_median(m);
        }
        for (r, &len) in b.lens.iter().enumerate() {
            for p in 0..ctx {
                let g = (b.first_row + r as u64) * ctx as u64 + p as u64;
                if g < resume {
                    continue; // accounted for by a complete shard
                }
                let i = r * ctx + p;
                let row = &b.acts[i * d..(i + 1) * d];
                match filter.classify(b.tokens[i], row, p >= len) {
                    Some(why) => writer.skip(why),
                    None => writer.push(row, b.tokens[i])?,
                }
            }
        }
        pb.set_position(writer.position());
        if let Some(k) = opts.stop_after_shards {
            if writer.manifest().shards.len() >= shards_at_start + k {
                pb.finish_and_clear();
                return Ok(writer.manifest().clone());
            }
        }
    }
    pb.finish_and_clear();
    if let Some(p) = producer.planned_positions() {
        if writer.position() < p {
            tracing::warn!(
                "dataset {} ran out after {} of {p} requested token positions",
                dataset.name,
                writer.position()
            );
        }
    }
    writer.finish()
}

/// Options of [`LmStream`] on top of [`CacheOptions`].
#[derive(Clone, Debug)]
pub struct StreamOptions {
    pub cache: CacheOptions,
    /// Shuffling buffer capacity in rows; refilled from the model when half empty.
    pub buffer_rows: usize,
}

/// Activations generated on the fly: LM -> shuffling buffer -> consumer.
///
/// The buffer is filled with `buffer_rows` rows (all forwards' kept positions); each
/// served row is drawn uniformly from the buffer and removed (no replacement), and the
/// buffer is topped up from the model whenever it falls to half capacity, as in
/// dictionary_learning's `ActivationBuffer`. Deterministic for a given seed.
pub struct LmStream<'a> {
    model: &'a Model,
    dataset: &'a Dataset,
    opts: StreamOptions,
    producer: Producer<'a>,
    filter: Filter,
    buf: Vec<f32>,
    rows: usize,
    exhausted: bool,
    rng: Rng,
    d: usize,
}

impl<'a> LmStream<'a> {
    pub fn new(model: &'a Model, dataset: &'a Dataset, opts: StreamOptions) -> Result<Self> {
        if opts.buffer_rows < 2 * opts.cache.batch_rows * opts.cache.ctx_len {
            bail!(
                "stream buffer of {} rows is smaller than two forwards ({} rows)",
                opts.buffer_rows,
                2 * opts.cache.batch_rows * opts.cache.ctx_len
            );
        }
        let d = model.config().d_model;
        Ok(LmStream {
            model,
            dataset,
            producer: Producer::new(model, dataset, &opts.cache)?,
            filter: Filter::new(model, &opts.cache, None),
            buf: Vec::with_capacity(opts.buffer_rows * d),
            rows: 0,
            exhausted: false,
            rng: Rng::new(opts.cache.seed).fork(0x5EED),
            d,
            opts,
        })
    }

    fn refill(&mut self) -> Result<()> {
        let ctx = self.opts.cache.ctx_len;
        let d = self.d;
        let per_forward = self.opts.cache.batch_rows * ctx;
        while !self.exhausted && self.rows + per_forward <= self.opts.buffer_rows {
            let Some(b) = self.producer.next_batch()? else {
                self.exhausted = true;
                break;
            };
            self.filter.calibrate(&b, ctx, d);
            self.buf.truncate(self.rows * d);
            for (r, &len) in b.lens.iter().enumerate() {
                for p in 0..ctx {
                    let i = r * ctx + p;
                    let row = &b.acts[i * d..(i + 1) * d];
                    if self.filter.classify(b.tokens[i], row, p >= len).is_none() {
                        self.buf.extend_from_slice(row);
                        self.rows += 1;
                    }
                }
            }
        }
        Ok(())
    }
}

impl ActivationSource for LmStream<'_> {
    fn d_in(&self) -> usize {
        self.d
    }

    fn next_batch(&mut self, rows: usize, out: &mut [f32]) -> Result<usize> {
        let d = self.d;
        let mut done = 0;
        while done < rows {
            if self.rows <= self.opts.buffer_rows / 2 && !self.exhausted {
                self.refill()?;
            }
            if self.rows == 0 {
                break;
            }
            let j = self.rng.below(self.rows);
            out[done * d..(done + 1) * d].copy_from_slice(&self.buf[j * d..(j + 1) * d]);
            // Move the last row into the hole: O(d) removal without replacement.
            let last = self.rows - 1;
            if j != last {
                self.buf.copy_within(last * d..(last + 1) * d, j * d);
            }
            self.rows -= 1;
            done += 1;
        }
        Ok(done)
    }

    fn len_hint(&self) -> Option<usize> {
        None
    }

    fn reset(&mut self) -> Result<()> {
        *self = LmStream::new(self.model, self.dataset, self.opts.clone())?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "{} {} on {} (streamed, seed {})",
            self.model.config().name,
            self.opts.cache.hook,
            self.dataset.name,
            self.opts.cache.seed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::Document;
    use crate::store::{ActivationStore, ReadFilter, SequentialReader};
    use saelab_lm::HookKind;
    use std::path::PathBuf;
    use std::sync::{Arc, OnceLock};

    fn model() -> &'static Model {
        static M: OnceLock<Model> = OnceLock::new();
        M.get_or_init(|| {
            let path = saelab_core::assets::ensure_model().expect("default model");
            Model::load(&path).expect("load model")
        })
    }

    fn dataset() -> Dataset {
        let texts = [
            "The cat sat on the mat and looked out of the window at the rain.",
            "Prices of wheat rose sharply in the spring, to the dismay of the bakers.",
            "She opened the letter, read the first line, and put it back in the drawer.",
            "In 1851 the whaling ship left Nantucket for the Pacific.",
            "Functions in Rust return the value of their last expression.",
            "The committee will meet again on Tuesday to discuss the budget.",
        ];
        // 18 documents of two sentences (~30 tokens each): enough for 12 rows of 16.
        let docs = (0..18)
            .map(|k| Document::new(format!("{} {}", texts[k % 6], texts[(k / 6 + k + 1) % 6])))
            .collect();
        Dataset::new("tiny", docs)
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("saelab-cache-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn opts() -> CacheOptions {
        CacheOptions {
            tokens: 16 * 12,
            ctx_len: 16,
            batch_rows: 4,
            shard_rows: 40,
            seed: 3,
            ..CacheOptions::new(HookPoint::new(2, HookKind::ResidPost))
        }
    }

    fn files(d: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// The cache holds exactly the activations of a direct forward over the packed
    /// rows, minus the special positions, and resumes to an identical store.
    #[test]
    fn cache_matches_forward_and_resumes_identically() {
        let m = model();
        let ds = dataset();
        let o = opts();
        let dir = tmpdir("full");
        let man = cache_activations(m, &ds, &o, &dir).unwrap();
        assert!(man.complete);
        assert_eq!(man.positions, 16 * 12);
        let special = special_ids(m);
        assert!(
            man.filters.dropped_special >= 12,
            "every row starts with BOS"
        );
        assert_eq!(
            man.total_rows + man.filters.dropped_special + man.filters.dropped_outliers,
            192
        );
        let store = ActivationStore::open(&dir).unwrap();
        store.verify().unwrap();

        // Reference: pack the same way and run the same batches directly.
        let bos = m.tokenizer().bos_id().or(m.tokenizer().eos_id()).unwrap();
        let pad = m
            .tokenizer()
            .pad_id()
            .or(m.tokenizer().eos_id())
            .unwrap_or(bos);
        let packed = crate::packing::pack_dataset(
            &ds,
            |s| m.tokenizer().encode(s),
            bos,
            pad,
            &crate::packing::PackOptions {
                ctx_len: 16,
                mode: PackMode::Concat,
                shuffle_seed: Some(3),
                max_rows: Some(12),
            },
        )
        .unwrap();
        assert_eq!(packed.rows(), 12);
        let d = m.config().d_model;
        let mut kept = 0u64;
        let mut row = vec![0f32; d];
        for b in 0..3 {
            let toks = &packed.tokens[b * 64..(b + 1) * 64];
            let mut hooks = Hooks::new().capture(o.hook).logits(false);
            let out = m.forward(toks, 4, 16, &mut hooks).unwrap();
            let acts = &out.captured[&o.hook];
            for (i, &t) in toks.iter().enumerate() {
                if special.contains(&t) {
                    continue;
                }
                let x = &acts[i * d..(i + 1) * d];
                let limit = 10.0 * man.filters.norm_median.unwrap();
                if norm(x) > limit {
                    continue;
                }
                store.read_row(kept, &mut row);
                assert_eq!(store.token(kept), t);
                assert_eq!(store.position(kept), (b * 64 + i) as u64);
                assert_eq!(&row[..], x, "row {kept}");
                kept += 1;
            }
        }
        assert_eq!(kept, man.total_rows);

        // Interrupted after 2 shards, then resumed: byte-identical directory.
        let part = tmpdir("part");
        let first = cache_activations(
            m,
            &ds,
            &CacheOptions {
                stop_after_shards: Some(2),
                ..o.clone()
            },
            &part,
        )
        .unwrap();
        assert!(!first.complete);
        assert_eq!(first.shards.len(), 2);
        assert!(first.positions < 192);
        let resumed = cache_activations(m, &ds, &o, &part).unwrap();
        assert_eq!(resumed, man);
        assert_eq!(files(&dir), files(&part));
        // Different options on the same directory are refused with the manifest named.
        let err = cache_activations(
            m,
            &ds,
            &CacheOptions {
                seed: 4,
                ..o.clone()
            },
            &part,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("manifest.json"), "{err:#}");

        // The stream serves the same multiset of rows in a shuffled order.
        let mut stream = LmStream::new(
            m,
            &ds,
            StreamOptions {
                cache: o.clone(),
                buffer_rows: 200,
            },
        )
        .unwrap();
        let mut served = Vec::new();
        let mut buf = vec![0f32; 32 * d];
        loop {
            let n = stream.next_batch(32, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            served.extend(
                buf[..n * d]
                    .chunks(d)
                    .map(|r| r.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()),
            );
        }
        let mut stored: Vec<Vec<u32>> = (0..store.rows())
            .map(|i| {
                store.read_row(i, &mut row);
                row.iter().map(|v| v.to_bits()).collect()
            })
            .collect();
        assert_ne!(served, stored, "stream order is shuffled");
        served.sort();
        stored.sort();
        assert_eq!(served, stored);

        let seq = SequentialReader::new(Arc::new(store), &ReadFilter::default());
        assert_eq!(seq.len_hint(), Some(man.total_rows as usize));
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&part).unwrap();
    }

    #[test]
    fn per_doc_mode_skips_padding_and_bad_options_fail() {
        let m = model();
        let ds = dataset();
        let o = CacheOptions {
            pack_mode: PackMode::PerDoc,
            tokens: 0,
            ctx_len: 32,
            norm_outlier_factor: None,
            ..opts()
        };
        let dir = tmpdir("perdoc");
        let man = cache_activations(m, &ds, &o, &dir).unwrap();
        assert_eq!(man.positions, 18 * 32);
        let real: u64 = ds
            .docs
            .iter()
            .map(|d| (m.tokenizer().encode(&d.text).unwrap().len() + 1).min(32) as u64)
            .sum();
        assert_eq!(man.filters.skipped_padding, 18 * 32 - real);
        assert_eq!(man.total_rows + man.filters.dropped_special, real);
        std::fs::remove_dir_all(&dir).unwrap();

        let bad = CacheOptions {
            hook: HookPoint::new(99, HookKind::ResidPost),
            ..opts()
        };
        let err = cache_activations(m, &ds, &bad, &tmpdir("bad")).unwrap_err();
        assert!(format!("{err:#}").contains("layer 99"), "{err:#}");
        let small = LmStream::new(
            m,
            &ds,
            StreamOptions {
                cache: opts(),
                buffer_rows: 10,
            },
        );
        assert!(small.is_err());
    }
}
