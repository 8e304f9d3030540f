//! The on-disk activation store: a directory of shards plus a manifest.
//!
//! ```text
//! store/
//!   manifest.json        format, model, hook, d_model, dtype, ctx_len, shard list, filters
//!   shard-00000.act      rows x d_model little-endian values (f32, bf16 or f16), no header
//!   tokens-00000.u32     rows x u32: the token id each activation row was computed at
//!   positions-00000.u64  rows x u64: its position in the packed token stream
//!                        (row * ctx_len + column), to recover context and document
//!   shard-00001.act ...
//! ```
//!
//! **Writing** ([`StoreWriter`]) buffers one shard in memory (`shard_rows` rows, 2^16 by
//! default), then writes the shard and its token file atomically (temp file + rename,
//! `saelab_core::fsutil`) and only then rewrites the manifest atomically. The manifest
//! therefore lists exactly the shards that are complete on disk, and records how many
//! token positions of the (deterministic) input stream they account for, kept or
//! filtered ([`Manifest::positions`]). Reopening a store with an incomplete manifest
//! resumes after its last shard: the producer skips `positions` stream positions and
//! pushes the rest, which gives byte-identical shards to an uninterrupted run. A failed
//! write (disk full, read-only directory) is reported with the file name and leaves no
//! temp file and no manifest entry.
//!
//! **Reading** ([`ActivationStore`]) memory-maps every shard (memmap2) after checking
//! sizes against the manifest; [`ActivationStore::verify`] also checks the XXH64
//! checksums. Sources implementing `ActivationSource`:
//! - [`SequentialReader`]: rows in stored order (evaluations);
//! - [`ShuffledReader`]: training order. Scheme: each epoch draws a fresh permutation of
//!   the shards; consecutive shards of that order are grouped into mixing windows of at
//!   most `window_rows` rows (default: every shard in one window as long as the store
//!   holds at most 4 GiB, else 4 GiB worth of shards), and every window is served as a
//!   uniform random permutation of its rows, gathered from the memory maps. With one
//!   window this is an exact uniform shuffle of the whole store; with several, each
//!   batch still mixes rows from several shards (each shard itself mixes hundreds of
//!   documents), while the pages touched at a time stay bounded, so the page cache can
//!   keep them and the disk sees shard-sized reads (`madvise(WILLNEED)` per window).
//!
//! Filters: rows at special tokens (BOS/EOS/pad) and attention-sink outliers (norm above
//! `factor` x the median norm, 10x by default as in dictionary_learning) can be dropped
//! when caching (recorded in [`Manifest::filters`]) or when reading ([`ReadFilter`]).

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use saelab_core::fsutil::{write_atomic, write_atomic_with};
use saelab_core::rng::Rng;
use saelab_core::source::ActivationSource;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const FORMAT: &str = "saelab-activations";
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const DEFAULT_SHARD_ROWS: usize = 1 << 16;

/// Element type of the stored activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }

    pub fn parse(s: &str) -> Result<Dtype> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Dtype::F32,
            "bf16" | "bfloat16" => Dtype::Bf16,
            "f16" | "float16" | "half" => Dtype::F16,
            _ => bail!("unknown activation dtype {s:?} (expected f32, bf16 or f16)"),
        })
    }

    /// Append `row` in this dtype, little-endian (bf16/f16 rounded to nearest even).
    pub fn encode(self, row: &[f32], out: &mut Vec<u8>) {
        match self {
            Dtype::F32 => {
                for v in row {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Dtype::Bf16 => {
                for &v in row {
                    out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
                }
            }
            Dtype::F16 => {
                for &v in row {
                    out.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
                }
            }
        }
    }

    /// Decode `out.len()` values from `bytes`.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            Dtype::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::Bf16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
            Dtype::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
        }
    }
}

/// XXH64 (seed 0) of `data`: a fast, well-known non-cryptographic checksum.
pub fn xxh64(data: &[u8]) -> u64 {
    const P1: u64 = 11400714785074694791;
    const P2: u64 = 14029467366897019727;
    const P3: u64 = 1609587929392839161;
    const P4: u64 = 9650029242287828579;
    const P5: u64 = 2870177450012600261;
    #[inline(always)]
    fn round(acc: u64, input: u64) -> u64 {
        acc.wrapping_add(input.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    }
    #[inline(always)]
    fn merge(acc: u64, v: u64) -> u64 {
        (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
    }
    #[inline(always)]
    fn r64(b: &[u8]) -> u64 {
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }
    let len = data.len();
    let mut rest = data;
    let mut h = if len >= 32 {
        let (mut v1, mut v2, mut v3, mut v4) =
            (P1.wrapping_add(P2), P2, 0u64, 0u64.wrapping_sub(P1));
        let mut stripes = rest.chunks_exact(32);
        for s in &mut stripes {
            v1 = round(v1, r64(&s[0..]));
            v2 = round(v2, r64(&s[8..]));
            v3 = round(v3, r64(&s[16..]));
            v4 = round(v4, r64(&s[24..]));
        }
        rest = stripes.remainder();
        let mut h = v1
            .rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18));
        h = merge(h, v1);
        h = merge(h, v2);
        h = merge(h, v3);
        merge(h, v4)
    } else {
        P5
    };
    h = h.wrapping_add(len as u64);
    while rest.len() >= 8 {
        h ^= round(0, r64(rest));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        let k = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as u64;
        h ^= k.wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h ^= (b as u64).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

fn hex64(x: u64) -> String {
    format!("{x:016x}")
}

/// One complete shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    pub tokens_file: String,
    pub rows: u64,
    /// XXH64 of the shard file / token file, hex.
    pub xxh64: String,
    pub tokens_xxh64: String,
    /// u64 per row: the stream position (row * ctx_len + column of the packed token
    /// stream) each activation was computed at, to recover its context and document.
    pub positions_file: String,
    pub positions_xxh64: String,
    /// Stream positions accounted for (kept or filtered) up to the end of this shard.
    pub end_position: u64,
}

/// What was dropped while caching, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct FilterRecord {
    /// Token ids whose rows are not stored (BOS/EOS/pad when `drop_special`).
    pub dropped_token_ids: Vec<u32>,
    /// Rows with norm > factor x `norm_median` are not stored.
    pub norm_outlier_factor: Option<f32>,
    /// Median row norm measured on the first batch (the outlier reference).
    pub norm_median: Option<f32>,
    /// Positions dropped so far (as of the last complete shard).
    pub dropped_special: u64,
    pub dropped_outliers: u64,
    /// Padding positions (per-document packing) never computed.
    pub skipped_padding: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub model: String,
    pub hook: String,
    pub d_model: usize,
    pub dtype: Dtype,
    pub ctx_len: usize,
    pub shard_rows: usize,
    /// Rows stored in all complete shards.
    pub total_rows: u64,
    /// Token positions of the input stream accounted for (stored + dropped).
    pub positions: u64,
    /// True once the producer finished (no resume needed).
    pub complete: bool,
    pub filters: FilterRecord,
    /// Provenance (dataset, seed, packing...) compared on resume.
    pub source: serde_json::Value,
    pub shards: Vec<ShardInfo>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read activation store manifest {}", path.display()))?;
        let m: Manifest = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a valid activation store manifest",
                path.display()
            )
        })?;
        if m.format != FORMAT {
            bail!(
                "{}: format {:?} is not {FORMAT:?}",
                path.display(),
                m.format
            );
        }
        if m.version != FORMAT_VERSION {
            bail!(
                "{}: unsupported store version {} (this build reads {FORMAT_VERSION})",
                path.display(),
                m.version
            );
        }
        let sum: u64 = m.shards.iter().map(|s| s.rows).sum();
        if sum != m.total_rows {
            bail!(
                "{}: total_rows {} but the shards hold {sum} rows",
                path.display(),
                m.total_rows
            );
        }
        if m.d_model == 0 {
            bail!("{}: d_model is 0", path.display());
        }
        Ok(m)
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        write_atomic(&dir.join(MANIFEST), &bytes)
    }

    pub fn row_bytes(&self) -> usize {
        self.d_model * self.dtype.bytes()
    }
}

/// What a writer is asked to produce; on resume it must match the existing manifest.
#[derive(Clone, Debug)]
pub struct StoreSpec {
    pub model: String,
    pub hook: String,
    pub d_model: usize,
    pub dtype: Dtype,
    pub ctx_len: usize,
    pub shard_rows: usize,
    pub dropped_token_ids: Vec<u32>,
    pub norm_outlier_factor: Option<f32>,
    pub source: serde_json::Value,
}

/// Why a stream position was not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    Special,
    Outlier,
    Padding,
}

/// Appends rows shard by shard; see the module docs for the resume protocol.
pub struct StoreWriter {
    dir: PathBuf,
    manifest: Manifest,
    buf: Vec<u8>,
    tokens: Vec<u32>,
    positions: Vec<u64>,
    pending_rows: usize,
    position: u64,
    counters: (u64, u64, u64),
}

fn shard_names(i: usize) -> (String, String, String) {
    (
        format!("shard-{i:05}.act"),
        format!("tokens-{i:05}.u32"),
        format!("positions-{i:05}.u64"),
    )
}

/// Write little-endian bytes atomically; returns their XXH64.
fn write_side_file(path: &Path, bytes: &[u8], what: &str) -> Result<u64> {
    write_atomic_with(path, |w| w.write_all(bytes).map_err(Into::into))
        .with_context(|| format!("cannot write {what} file {}", path.display()))?;
    Ok(xxh64(bytes))
}

impl StoreWriter {
    /// Start a store in `dir`, or resume the incomplete one found there (the spec must
    /// match). A complete store is reopened as is ([`StoreWriter::is_complete`]).
    pub fn open(dir: &Path, spec: StoreSpec) -> Result<StoreWriter> {
        if spec.d_model == 0 || spec.shard_rows == 0 || spec.ctx_len == 0 {
            bail!("invalid store spec: d_model, shard_rows and ctx_len must be positive");
        }
        std::fs::create_dir_all(dir).with_context(|| {
            format!("cannot create activation store directory {}", dir.display())
        })?;
        remove_stale_temps(dir)?;
        let manifest_path = dir.join(MANIFEST);
        let manifest = if manifest_path.exists() {
            let m = Manifest::read(dir)?;
            let mismatch = |what: &str, have: String, want: String| {
                anyhow!(
                    "{} was written with {what} = {have}, this run asks for {want}; \
                     use another directory or delete it to start over",
                    manifest_path.display()
                )
            };
            if m.model != spec.model {
                return Err(mismatch("model", m.model, spec.model));
            }
            if m.hook != spec.hook {
                return Err(mismatch("hook", m.hook, spec.hook));
            }
            for (what, have, want) in [
                ("d_model", m.d_model, spec.d_model),
                ("ctx_len", m.ctx_len, spec.ctx_len),
                ("shard_rows", m.shard_rows, spec.shard_rows),
            ] {
                if have != want {
                    return Err(mismatch(what, have.to_string(), want.to_string()));
                }
            }
            if m.dtype != spec.dtype {
                return Err(mismatch(
                    "dtype",
                    m.dtype.name().into(),
                    spec.dtype.name().into(),
                ));
            }
            if m.filters.dropped_token_ids != spec.dropped_token_ids
                || m.filters.norm_outlier_factor != spec.norm_outlier_factor
            {
                return Err(mismatch(
                    "filters",
                    format!(
                        "{:?}/{:?}",
                        m.filters.dropped_token_ids, m.filters.norm_outlier_factor
                    ),
                    format!(
                        "{:?}/{:?}",
                        spec.dropped_token_ids, spec.norm_outlier_factor
                    ),
                ));
            }
            if m.source != spec.source {
                return Err(mismatch(
                    "source",
                    m.source.to_string(),
                    spec.source.to_string(),
                ));
            }
            // The shards we resume after must be intact.
            check_shard_files(dir, &m)?;
            m
        } else {
            Manifest {
                format: FORMAT.into(),
                version: FORMAT_VERSION,
                model: spec.model,
                hook: spec.hook,
                d_model: spec.d_model,
                dtype: spec.dtype,
                ctx_len: spec.ctx_len,
                shard_rows: spec.shard_rows,
                total_rows: 0,
                positions: 0,
                complete: false,
                filters: FilterRecord {
                    dropped_token_ids: spec.dropped_token_ids,
                    norm_outlier_factor: spec.norm_outlier_factor,
                    ..Default::default()
                },
                source: spec.source,
                shards: Vec::new(),
            }
        };
        let f = &manifest.filters;
        let counters = (f.dropped_special, f.dropped_outliers, f.skipped_padding);
        let position = manifest.positions;
        let cap = if manifest.complete {
            0
        } else {
            manifest.shard_rows * manifest.row_bytes()
        };
        Ok(StoreWriter {
            dir: dir.to_path_buf(),
            buf: Vec::with_capacity(cap),
            tokens: Vec::new(),
            positions: Vec::new(),
            pending_rows: 0,
            position,
            counters,
            manifest,
        })
    }

    pub fn is_complete(&self) -> bool {
        self.manifest.complete
    }

    /// Stream positions already accounted for by complete shards: a resumed producer
    /// skips this many positions of its input stream.
    pub fn resume_position(&self) -> u64 {
        self.manifest.positions
    }

    /// Positions accounted for so far, including the in-memory shard.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Rows durably stored plus rows pending in memory.
    pub fn rows(&self) -> u64 {
        self.manifest.total_rows + self.pending_rows as u64
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The outlier reference norm (kept from the manifest when resuming).
    pub fn norm_median(&self) -> Option<f32> {
        self.manifest.filters.norm_median
    }

    pub fn set_norm_median(&mut self, m: f32) {
        self.manifest.filters.norm_median = Some(m);
    }

    /// Store one activation row computed at token `token`.
    pub fn push(&mut self, row: &[f32], token: u32) -> Result<()> {
        if self.manifest.complete {
            bail!(
                "activation store {} is already complete",
                self.dir.display()
            );
        }
        if row.len() != self.manifest.d_model {
            bail!(
                "row of width {} pushed to a store of d_model {}",
                row.len(),
                self.manifest.d_model
            );
        }
        self.manifest.dtype.encode(row, &mut self.buf);
        self.tokens.push(token);
        self.positions.push(self.position);
        self.pending_rows += 1;
        self.position += 1;
        if self.pending_rows == self.manifest.shard_rows {
            self.flush_shard()?;
        }
        Ok(())
    }

    /// Account for a stream position that is not stored.
    pub fn skip(&mut self, why: Skip) {
        match why {
            Skip::Special => self.counters.0 += 1,
            Skip::Outlier => self.counters.1 += 1,
            Skip::Padding => self.counters.2 += 1,
        }
        self.position += 1;
    }

    fn flush_shard(&mut self) -> Result<()> {
        if self.pending_rows == 0 {
            return Ok(());
        }
        let idx = self.manifest.shards.len();
        let (file, tokens_file, positions_file) = shard_names(idx);
        write_atomic(&self.dir.join(&file), &self.buf).with_context(|| {
            format!(
                "cannot write activation shard {}",
                self.dir.join(&file).display()
            )
        })?;
        let tok_bytes: Vec<u8> = self.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let tok_hash = write_side_file(&self.dir.join(&tokens_file), &tok_bytes, "token")?;
        let pos_bytes: Vec<u8> = self
            .positions
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        let pos_hash = write_side_file(&self.dir.join(&positions_file), &pos_bytes, "position")?;
        let mut next = self.manifest.clone();
        next.shards.push(ShardInfo {
            file,
            tokens_file,
            rows: self.pending_rows as u64,
            xxh64: hex64(xxh64(&self.buf)),
            tokens_xxh64: hex64(tok_hash),
            positions_file,
            positions_xxh64: hex64(pos_hash),
            end_position: self.position,
        });
        next.total_rows += self.pending_rows as u64;
        next.positions = self.position;
        next.filters.dropped_special = self.counters.0;
        next.filters.dropped_outliers = self.counters.1;
        next.filters.skipped_padding = self.counters.2;
        next.write(&self.dir)?;
        self.manifest = next;
        self.buf.clear();
        self.tokens.clear();
        self.positions.clear();
        self.pending_rows = 0;
        Ok(())
    }

    /// Write the last (partial) shard and mark the store complete.
    pub fn finish(mut self) -> Result<Manifest> {
        if self.manifest.complete {
            return Ok(self.manifest);
        }
        self.flush_shard()?;
        self.manifest.complete = true;
        // Counters and positions of trailing skipped positions belong to no shard.
        self.manifest.positions = self.position;
        self.manifest.filters.dropped_special = self.counters.0;
        self.manifest.filters.dropped_outliers = self.counters.1;
        self.manifest.filters.skipped_padding = self.counters.2;
        self.manifest.write(&self.dir)?;
        Ok(self.manifest)
    }
}

fn remove_stale_temps(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e?;
        if e.file_name().to_string_lossy().contains(".tmp.") {
            std::fs::remove_file(e.path())
                .with_context(|| format!("cannot remove stale temp file {}", e.path().display()))?;
        }
    }
    Ok(())
}

fn check_shard_files(dir: &Path, m: &Manifest) -> Result<()> {
    for s in &m.shards {
        for (file, want) in [
            (&s.file, s.rows * m.row_bytes() as u64),
            (&s.tokens_file, s.rows * 4),
            (&s.positions_file, s.rows * 8),
        ] {
            let p = dir.join(file);
            let len = std::fs::metadata(&p)
                .with_context(|| {
                    format!(
                        "shard {} listed in {} is missing",
                        p.display(),
                        dir.join(MANIFEST).display()
                    )
                })?
                .len();
            if len != want {
                bail!(
                    "{} has {len} bytes but {} says {} rows ({want} bytes)",
                    p.display(),
                    dir.join(MANIFEST).display(),
                    s.rows
                );
            }
        }
    }
    Ok(())
}

struct ShardMap {
    act: Mmap,
    tokens: Mmap,
    positions: Mmap,
}

/// A read-only, memory-mapped activation store.
pub struct ActivationStore {
    dir: PathBuf,
    manifest: Manifest,
    shards: Vec<ShardMap>,
    /// First global row of each shard, plus the total at the end.
    starts: Vec<u64>,
}

fn map_file(p: &Path) -> Result<Mmap> {
    let f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
    // SAFETY: store files are written once (temp + rename) and never modified in place;
    // a concurrent writer only adds new files.
    unsafe { Mmap::map(&f) }.with_context(|| format!("cannot memory-map {}", p.display()))
}

impl ActivationStore {
    /// Open a store and check every shard's size against the manifest.
    pub fn open(dir: &Path) -> Result<ActivationStore> {
        let manifest = Manifest::read(dir)?;
        check_shard_files(dir, &manifest)?;
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut starts = vec![0u64];
        for s in &manifest.shards {
            shards.push(ShardMap {
                act: map_file(&dir.join(&s.file))?,
                tokens: map_file(&dir.join(&s.tokens_file))?,
                positions: map_file(&dir.join(&s.positions_file))?,
            });
            starts.push(starts.last().copied().unwrap_or(0) + s.rows);
        }
        Ok(ActivationStore {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            starts,
        })
    }

    /// Recompute every checksum (reads the whole store).
    pub fn verify(&self) -> Result<()> {
        self.manifest
            .shards
            .par_iter()
            .zip(self.shards.par_iter())
            .try_for_each(|(info, map)| -> Result<()> {
                for (file, want, bytes) in [
                    (&info.file, &info.xxh64, &map.act[..]),
                    (&info.tokens_file, &info.tokens_xxh64, &map.tokens[..]),
                    (
                        &info.positions_file,
                        &info.positions_xxh64,
                        &map.positions[..],
                    ),
                ] {
                    let got = hex64(xxh64(bytes));
                    if &got != want {
                        bail!(
                            "{} is corrupt: checksum {got} does not match {want} in {}",
                            self.dir.join(file).display(),
                            self.dir.join(MANIFEST).display()
                        );
                    }
                }
                Ok(())
            })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn rows(&self) -> u64 {
        self.manifest.total_rows
    }

    pub fn d_model(&self) -> usize {
        self.manifest.d_model
    }

    fn locate(&self, row: u64) -> (usize, usize) {
        let s = self.starts.partition_point(|&st| st <= row) - 1;
        (s, (row - self.starts[s]) as usize)
    }

    /// Decode row `i` into `out` (length d_model).
    pub fn read_row(&self, i: u64, out: &mut [f32]) {
        let (s, r) = self.locate(i);
        let rb = self.manifest.row_bytes();
        self.manifest
            .dtype
            .decode(&self.shards[s].act[r * rb..(r + 1) * rb], out);
    }

    /// Token id at which row `i` was computed.
    pub fn token(&self, i: u64) -> u32 {
        let (s, r) = self.locate(i);
        let b = &self.shards[s].tokens[r * 4..r * 4 + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Stream position (row * ctx_len + column of the packed tokens) of row `i`.
    pub fn position(&self, i: u64) -> u64 {
        let (s, r) = self.locate(i);
        let b = &self.shards[s].positions[r * 8..r * 8 + 8];
        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    }

    /// Decode rows `start..start + out.len() / d_model`.
    pub fn read_rows(&self, start: u64, out: &mut [f32]) {
        let d = self.d_model();
        for (k, o) in out.chunks_exact_mut(d).enumerate() {
            self.read_row(start + k as u64, o);
        }
    }

    /// Row norms (L2), computed in parallel over shards.
    pub fn row_norms(&self) -> Vec<f32> {
        let d = self.d_model();
        let rb = self.manifest.row_bytes();
        let dtype = self.manifest.dtype;
        let per_shard: Vec<Vec<f32>> = self
            .shards
            .par_iter()
            .map(|m| {
                let mut row = vec![0f32; d];
                m.act
                    .chunks_exact(rb)
                    .map(|b| {
                        dtype.decode(b, &mut row);
                        row.iter()
                            .map(|&x| (x as f64) * (x as f64))
                            .sum::<f64>()
                            .sqrt() as f32
                    })
                    .collect()
            })
            .collect();
        per_shard.concat()
    }

    /// Global row indices that pass `filter`, in stored order.
    pub fn kept_rows(&self, filter: &ReadFilter) -> Vec<u64> {
        let norms_limit = filter.norm_outlier_factor.map(|f| {
            let norms = self.row_norms();
            (median(&norms) * f, norms)
        });
        (0..self.rows())
            .filter(|&i| {
                if !filter.exclude_tokens.is_empty()
                    && filter.exclude_tokens.contains(&self.token(i))
                {
                    return false;
                }
                match &norms_limit {
                    Some((limit, norms)) => norms[i as usize] <= *limit,
                    None => true,
                }
            })
            .collect()
    }

    fn advise_shard(&self, s: usize) {
        #[cfg(unix)]
        {
            let _ = self.shards[s].act.advise(memmap2::Advice::WillNeed);
        }
        #[cfg(not(unix))]
        let _ = s;
    }

    pub fn describe(&self) -> String {
        format!(
            "{} {} ({} rows, {})",
            self.manifest.model,
            self.manifest.hook,
            self.rows(),
            self.dir.display()
        )
    }
}

/// Median of a non-empty slice (upper median for even lengths); 0 for an empty one.
pub fn median(xs: &[f32]) -> f32 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
    *m
}

/// Rows to leave out when reading (on top of what was filtered at cache time).
#[derive(Clone, Debug, Default)]
pub struct ReadFilter {
    pub exclude_tokens: Vec<u32>,
    /// Drop rows with norm > factor x median row norm of the store.
    pub norm_outlier_factor: Option<f32>,
}

/// Serves the rows of a store in stored order.
pub struct SequentialReader {
    store: Arc<ActivationStore>,
    rows: Vec<u64>,
    pos: usize,
}

impl SequentialReader {
    pub fn new(store: Arc<ActivationStore>, filter: &ReadFilter) -> Self {
        let rows = store.kept_rows(filter);
        SequentialReader {
            store,
            rows,
            pos: 0,
        }
    }
}

fn gather(store: &ActivationStore, idx: &[u64], out: &mut [f32]) {
    let d = store.d_model();
    if idx.len() >= 256 {
        out[..idx.len() * d]
            .par_chunks_mut(d)
            .zip(idx.par_iter())
            .for_each(|(o, &i)| store.read_row(i, o));
    } else {
        for (o, &i) in out.chunks_exact_mut(d).zip(idx) {
            store.read_row(i, o);
        }
    }
}

impl ActivationSource for SequentialReader {
    fn d_in(&self) -> usize {
        self.store.d_model()
    }

    fn next_batch(&mut self, rows: usize, out: &mut [f32]) -> Result<usize> {
        let n = rows.min(self.rows.len() - self.pos);
        gather(&self.store, &self.rows[self.pos..self.pos + n], out);
        self.pos += n;
        Ok(n)
    }

    fn len_hint(&self) -> Option<usize> {
        Some(self.rows.len())
    }

    fn reset(&mut self) -> Result<()> {
        self.pos = 0;
        Ok(())
    }

    fn describe(&self) -> String {
        self.store.describe()
    }
}

/// Options of the [`ShuffledReader`].
#[derive(Clone, Debug)]
pub struct ShuffleOptions {
    pub seed: u64,
    /// Passes over the data; each uses a fresh permutation.
    pub epochs: usize,
    /// Maximum rows per mixing window (None: as many as fit in 4 GiB of stored bytes).
    pub window_rows: Option<usize>,
    pub filter: ReadFilter,
}

impl Default for ShuffleOptions {
    fn default() -> Self {
        ShuffleOptions {
            seed: 0,
            epochs: 1,
            window_rows: None,
            filter: ReadFilter::default(),
        }
    }
}

/// Random-order reader (see the module docs for the scheme).
pub struct ShuffledReader {
    store: Arc<ActivationStore>,
    opts: ShuffleOptions,
    window_rows: usize,
    /// Kept global row indices grouped by shard.
    kept_by_shard: Vec<Vec<u64>>,
    total_kept: usize,
    epoch: usize,
    /// Shard order of the current epoch and the next shard to load into a window.
    shard_order: Vec<usize>,
    next_shard: usize,
    window: Vec<u64>,
    pos: usize,
    rng: Rng,
}

impl ShuffledReader {
    pub fn new(store: Arc<ActivationStore>, opts: ShuffleOptions) -> Self {
        let kept = store.kept_rows(&opts.filter);
        let mut kept_by_shard = vec![Vec::new(); store.shards.len()];
        for i in kept {
            kept_by_shard[store.locate(i).0].push(i);
        }
        let total_kept = kept_by_shard.iter().map(|v| v.len()).sum();
        let budget = (4usize << 30) / store.manifest.row_bytes().max(1);
        let window_rows = opts.window_rows.unwrap_or(budget).max(1);
        let mut r = ShuffledReader {
            store,
            window_rows,
            kept_by_shard,
            total_kept,
            epoch: 0,
            shard_order: Vec::new(),
            next_shard: 0,
            window: Vec::new(),
            pos: 0,
            rng: Rng::new(opts.seed),
            opts,
        };
        r.start_epoch(0);
        r
    }

    fn start_epoch(&mut self, e: usize) {
        self.epoch = e;
        self.rng = Rng::new(self.opts.seed).fork(e as u64);
        self.shard_order = self.rng.permutation(self.kept_by_shard.len());
        self.next_shard = 0;
        self.window.clear();
        self.pos = 0;
    }

    /// Load the next window of the epoch; false when the epoch is over.
    fn next_window(&mut self) -> bool {
        self.window.clear();
        self.pos = 0;
        while self.next_shard < self.shard_order.len() {
            let s = self.shard_order[self.next_shard];
            let n = self.kept_by_shard[s].len();
            if !self.window.is_empty() && self.window.len() + n > self.window_rows {
                break;
            }
            self.window.extend_from_slice(&self.kept_by_shard[s]);
            self.store.advise_shard(s);
            self.next_shard += 1;
        }
        self.rng.shuffle(&mut self.window);
        !self.window.is_empty()
    }

    /// Rows served per epoch.
    pub fn rows_per_epoch(&self) -> usize {
        self.total_kept
    }

    pub fn epoch(&self) -> usize {
        self.epoch
    }
}

impl ActivationSource for ShuffledReader {
    fn d_in(&self) -> usize {
        self.store.d_model()
    }

    fn next_batch(&mut self, rows: usize, out: &mut [f32]) -> Result<usize> {
        let d = self.store.d_model();
        let mut done = 0;
        while done < rows {
            if self.pos == self.window.len() && !self.next_window() {
                if self.epoch + 1 >= self.opts.epochs {
                    break;
                }
                self.start_epoch(self.epoch + 1);
                continue;
            }
            let n = (rows - done).min(self.window.len() - self.pos);
            gather(
                &self.store,
                &self.window[self.pos..self.pos + n],
                &mut out[done * d..],
            );
            self.pos += n;
            done += n;
        }
        Ok(done)
    }

    fn len_hint(&self) -> Option<usize> {
        Some(self.total_kept * self.opts.epochs)
    }

    fn reset(&mut self) -> Result<()> {
        self.start_epoch(0);
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "{} shuffled (seed {})",
            self.store.describe(),
            self.opts.seed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("saelab-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn spec(d: usize, dtype: Dtype, shard_rows: usize) -> StoreSpec {
        StoreSpec {
            model: "test-model".into(),
            hook: "blocks.0.hook_resid_post".into(),
            d_model: d,
            dtype,
            ctx_len: 16,
            shard_rows,
            dropped_token_ids: vec![1],
            norm_outlier_factor: None,
            source: serde_json::json!({"dataset": "synthetic"}),
        }
    }

    /// Deterministic synthetic stream: position p has token p % 16 (token 1 = "BOS",
    /// skipped) and a random row.
    fn stream(d: usize, n: usize) -> Vec<(u32, Vec<f32>)> {
        let mut r = Rng::new(42);
        (0..n)
            .map(|p| {
                let mut row = vec![0f32; d];
                r.fill_normal(&mut row, 1.0);
                ((p % 16) as u32, row)
            })
            .collect()
    }

    fn feed(w: &mut StoreWriter, data: &[(u32, Vec<f32>)], from: usize, to: usize) -> Result<()> {
        for (t, row) in &data[from..to] {
            if *t == 1 {
                w.skip(Skip::Special);
            } else {
                w.push(row, *t)?;
            }
        }
        Ok(())
    }

    fn dir_files(d: &Path) -> Vec<(String, Vec<u8>)> {
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

    #[test]
    fn xxh64_known_vectors() {
        assert_eq!(xxh64(b""), 0xEF46DB3751D8E999);
        assert_eq!(xxh64(b"a"), 0xD24EC4F1A98C6E5B);
        assert_eq!(xxh64(b"abc"), 0x44BC2CF5AD770999);
        assert_eq!(
            xxh64(b"Nobody inspects the spammish repetition"),
            0xFBCEA83C8A378BF1
        );
    }

    #[test]
    fn round_trip_all_dtypes() {
        let d = 7;
        let data = stream(d, 300);
        for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            let dir = tmpdir(&format!("rt-{}", dtype.name()));
            let mut w = StoreWriter::open(&dir, spec(d, dtype, 64)).unwrap();
            feed(&mut w, &data, 0, data.len()).unwrap();
            let m = w.finish().unwrap();
            let kept: Vec<&(u32, Vec<f32>)> = data.iter().filter(|(t, _)| *t != 1).collect();
            assert_eq!(m.total_rows as usize, kept.len());
            assert_eq!(m.positions, 300);
            assert_eq!(m.filters.dropped_special, 300 - kept.len() as u64);
            assert_eq!(m.shards.len(), kept.len().div_ceil(64));
            assert!(m.complete);
            let s = ActivationStore::open(&dir).unwrap();
            s.verify().unwrap();
            let tol = match dtype {
                Dtype::F32 => 0.0,
                Dtype::Bf16 => 1.0 / 256.0,
                Dtype::F16 => 1.0 / 1024.0,
            };
            let mut row = vec![0f32; d];
            let kept_pos: Vec<u64> = (0..data.len() as u64)
                .filter(|&p| data[p as usize].0 != 1)
                .collect();
            for (i, (t, want)) in kept.iter().enumerate() {
                s.read_row(i as u64, &mut row);
                assert_eq!(s.token(i as u64), *t);
                assert_eq!(s.position(i as u64), kept_pos[i]);
                for (a, b) in row.iter().zip(want) {
                    assert!(
                        (a - b).abs() <= tol * b.abs().max(1e-3),
                        "{dtype:?}: {a} vs {b}"
                    );
                }
            }
            // Bulk read agrees with single-row reads.
            let mut all = vec![0f32; kept.len() * d];
            s.read_rows(0, &mut all);
            s.read_row(kept.len() as u64 - 1, &mut row);
            assert_eq!(&all[(kept.len() - 1) * d..], &row[..]);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn bf16_encoding_rounds_to_nearest_even() {
        let mut b = Vec::new();
        Dtype::Bf16.encode(&[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5], &mut b);
        let mut out = [0f32; 3];
        Dtype::Bf16.decode(&b, &mut out);
        // 1+2^-8 is halfway between 1 and 1+2^-7: ties to even -> 1.0.
        assert_eq!(out, [1.0, 1.0 + 4.0 / 256.0, -2.5]);
    }

    #[test]
    fn shuffled_reader_serves_each_row_once_per_epoch() {
        let d = 3;
        let dir = tmpdir("shuffle");
        let mut w = StoreWriter::open(
            &dir,
            StoreSpec {
                dropped_token_ids: vec![],
                ..spec(d, Dtype::F32, 50)
            },
        )
        .unwrap();
        // Row i carries the value i in every component, so a served row names itself.
        for i in 0..450u32 {
            w.push(&[i as f32; 3], i % 16).unwrap();
        }
        w.finish().unwrap();
        let store = Arc::new(ActivationStore::open(&dir).unwrap());
        for window in [None, Some(120)] {
            let opts = ShuffleOptions {
                seed: 3,
                epochs: 2,
                window_rows: window,
                ..Default::default()
            };
            let mut r = ShuffledReader::new(store.clone(), opts.clone());
            assert_eq!(r.len_hint(), Some(900));
            let mut served = Vec::new();
            let mut buf = vec![0f32; 64 * d];
            loop {
                let n = r.next_batch(64, &mut buf).unwrap();
                if n == 0 {
                    break;
                }
                served.extend(buf[..n * d].chunks(d).map(|c| c[0] as u32));
            }
            assert_eq!(served.len(), 900);
            let (e0, e1) = served.split_at(450);
            for e in [e0, e1] {
                let mut s = e.to_vec();
                s.sort();
                assert_eq!(s, (0..450).collect::<Vec<_>>(), "each row once per epoch");
            }
            assert_ne!(e0, e1, "epochs use different permutations");
            // Non-trivial order: far from sorted (count ascending neighbours).
            let ascending = e0.windows(2).filter(|w| w[1] == w[0] + 1).count();
            assert!(ascending < 20, "{ascending} consecutive pairs");
            // Deterministic, and reset restarts the same sequence.
            let mut r2 = ShuffledReader::new(store.clone(), opts);
            let mut b2 = vec![0f32; 10 * d];
            r2.next_batch(10, &mut b2).unwrap();
            let first: Vec<u32> = b2.chunks(d).map(|c| c[0] as u32).collect();
            assert_eq!(first, served[..10]);
            r2.reset().unwrap();
            r2.next_batch(10, &mut b2).unwrap();
            assert_eq!(
                b2.chunks(d).map(|c| c[0] as u32).collect::<Vec<_>>(),
                served[..10]
            );
        }
        // With windows of 120 rows (2 of the 9 shards of 50), the first 100 rows served come
        // from at most two shards.
        let mut r = ShuffledReader::new(
            store.clone(),
            ShuffleOptions {
                window_rows: Some(120),
                ..Default::default()
            },
        );
        let mut buf = vec![0f32; 100 * d];
        r.next_batch(100, &mut buf).unwrap();
        let mut shards: Vec<u32> = buf.chunks(d).map(|c| c[0] as u32 / 50).collect();
        shards.sort();
        shards.dedup();
        assert!(shards.len() <= 2, "{shards:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resume_gives_identical_store() {
        let d = 5;
        let data = stream(d, 400);
        let full = tmpdir("full");
        let mut w = StoreWriter::open(&full, spec(d, Dtype::Bf16, 40)).unwrap();
        feed(&mut w, &data, 0, 400).unwrap();
        w.finish().unwrap();

        let part = tmpdir("part");
        let mut w = StoreWriter::open(&part, spec(d, Dtype::Bf16, 40)).unwrap();
        // Feed until two shards are durable plus some pending rows, then "crash".
        let mut p = 0;
        while w.manifest().shards.len() < 2 || w.rows() < 95 {
            feed(&mut w, &data, p, p + 1).unwrap();
            p += 1;
        }
        drop(w);
        // A crash can also leave a temp file behind.
        std::fs::write(part.join("shard-00002.act.tmp.99999"), b"partial").unwrap();
        let mut w = StoreWriter::open(&part, spec(d, Dtype::Bf16, 40)).unwrap();
        assert_eq!(w.manifest().shards.len(), 2);
        let resume = w.resume_position() as usize;
        assert!(resume < p, "pending rows were lost and are recomputed");
        feed(&mut w, &data, resume, 400).unwrap();
        w.finish().unwrap();
        assert_eq!(dir_files(&full), dir_files(&part));
        // A finished store reopens as complete; a different spec is refused.
        assert!(StoreWriter::open(&part, spec(d, Dtype::Bf16, 40))
            .unwrap()
            .is_complete());
        let err = StoreWriter::open(&part, spec(d, Dtype::F32, 40))
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("manifest.json") && format!("{err:#}").contains("dtype"),
            "{err:#}"
        );
        std::fs::remove_dir_all(&full).unwrap();
        std::fs::remove_dir_all(&part).unwrap();
    }

    #[test]
    fn corrupt_manifest_and_shards_are_reported() {
        let d = 4;
        let data = stream(d, 100);
        let dir = tmpdir("corrupt");
        let mut w = StoreWriter::open(&dir, spec(d, Dtype::F32, 30)).unwrap();
        feed(&mut w, &data, 0, 100).unwrap();
        w.finish().unwrap();
        let err = |dir: &Path| format!("{:#}", ActivationStore::open(dir).err().unwrap());

        // Flip one byte: sizes still match, the checksum does not.
        let shard = dir.join("shard-00001.act");
        let mut bytes = std::fs::read(&shard).unwrap();
        bytes[10] ^= 0x40;
        std::fs::write(&shard, &bytes).unwrap();
        let e = format!(
            "{:#}",
            ActivationStore::open(&dir).unwrap().verify().unwrap_err()
        );
        assert!(
            e.contains("shard-00001.act") && e.contains("checksum"),
            "{e}"
        );

        // Truncated shard: size mismatch at open.
        std::fs::write(&shard, &bytes[..bytes.len() - 4]).unwrap();
        let e = err(&dir);
        assert!(e.contains("shard-00001.act") && e.contains("rows"), "{e}");

        // Missing token file.
        std::fs::write(&shard, &bytes).unwrap();
        std::fs::remove_file(dir.join("tokens-00000.u32")).unwrap();
        let e = err(&dir);
        assert!(
            e.contains("tokens-00000.u32") && e.contains("missing"),
            "{e}"
        );

        // Inconsistent and unparsable manifests.
        let mpath = dir.join(MANIFEST);
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
        m["total_rows"] = serde_json::json!(5);
        std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
        let e = err(&dir);
        assert!(
            e.contains("manifest.json") && e.contains("total_rows"),
            "{e}"
        );
        std::fs::write(&mpath, b"{not json").unwrap();
        let e = err(&dir);
        assert!(
            e.contains("manifest.json") && e.contains("not a valid"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let e = err(&dir);
        assert!(e.contains("manifest.json"), "{e}");
    }

    #[test]
    fn failed_shard_write_leaves_no_partial_files() {
        let d = 4;
        let data = stream(d, 100);
        let dir = tmpdir("fail");
        let mut w = StoreWriter::open(
            &dir,
            StoreSpec {
                dropped_token_ids: vec![],
                ..spec(d, Dtype::F32, 30)
            },
        )
        .unwrap();
        // A directory squatting on the second shard's name makes its rename fail, the
        // way a full or read-only disk makes a write fail (we run as root in CI, so
        // permissions cannot be used to provoke it).
        std::fs::create_dir_all(dir.join("shard-00001.act").join("x")).unwrap();
        let mut result = Ok(());
        for (t, row) in &data {
            result = w.push(row, *t);
            if result.is_err() {
                break;
            }
        }
        let e = format!("{:#}", result.unwrap_err());
        assert!(e.contains("shard-00001.act"), "{e}");
        let names: Vec<String> = dir_files_names(&dir);
        assert!(names.iter().all(|n| !n.contains(".tmp.")), "{names:?}");
        assert_eq!(
            Manifest::read(&dir).unwrap().shards.len(),
            1,
            "manifest lists only complete shards"
        );
        // A path under a regular file cannot be a store directory.
        let f = dir.join("plain-file");
        std::fs::write(&f, b"x").unwrap();
        let e = format!(
            "{:#}",
            StoreWriter::open(&f.join("store"), spec(d, Dtype::F32, 30))
                .err()
                .unwrap()
        );
        assert!(e.contains("plain-file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn dir_files_names(d: &Path) -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn read_filters_drop_tokens_and_norm_outliers() {
        let d = 4;
        let dir = tmpdir("filter");
        let mut w = StoreWriter::open(
            &dir,
            StoreSpec {
                dropped_token_ids: vec![],
                ..spec(d, Dtype::F32, 16)
            },
        )
        .unwrap();
        let mut r = Rng::new(5);
        for i in 0..100u32 {
            let mut row = vec![0f32; d];
            r.fill_normal(&mut row, 1.0);
            if i % 25 == 7 {
                for v in &mut row {
                    *v *= 100.0; // attention-sink-like outlier
                }
            }
            w.push(&row, if i % 10 == 0 { 1 } else { 50 + i }).unwrap();
        }
        w.finish().unwrap();
        let store = Arc::new(ActivationStore::open(&dir).unwrap());
        let all = store.kept_rows(&ReadFilter::default());
        assert_eq!(all.len(), 100);
        let no_bos = store.kept_rows(&ReadFilter {
            exclude_tokens: vec![1],
            ..Default::default()
        });
        assert_eq!(no_bos.len(), 90);
        assert!(no_bos.iter().all(|&i| i % 10 != 0));
        let no_out = store.kept_rows(&ReadFilter {
            norm_outlier_factor: Some(10.0),
            ..Default::default()
        });
        assert_eq!(
            no_out,
            (0..100).filter(|i| i % 25 != 7).collect::<Vec<u64>>()
        );
        let mut seq = SequentialReader::new(
            store.clone(),
            &ReadFilter {
                exclude_tokens: vec![1],
                norm_outlier_factor: Some(10.0),
            },
        );
        assert_eq!(seq.len_hint(), Some(86));
        let mut buf = vec![0f32; 200 * d];
        assert_eq!(seq.next_batch(200, &mut buf).unwrap(), 86);
        assert_eq!(seq.next_batch(200, &mut buf).unwrap(), 0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
