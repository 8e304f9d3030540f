//! Token packing: documents -> fixed-length rows of token ids.
//!
//! [`PackMode::Concat`] is SAELens' scheme (and the SAEBench token stream): documents
//! are tokenised without BOS, concatenated with a BOS between consecutive documents,
//! and cut into rows of `ctx_len - 1` tokens, each prefixed with BOS. A row never starts
//! with BOS BOS: when a cut falls just before a separator, that separator is consumed by
//! the row's own BOS. The incomplete last row is dropped (as SAELens does), so every
//! row is exactly `ctx_len` long.
//!
//! [`PackMode::PerDoc`] gives one row per document (BOS + the first `ctx_len - 1`
//! tokens, right-padded with the pad id): what probing needs, where each row must map
//! to one labelled document. [`PackedRows::lengths`] says how many positions are real.
//!
//! Both are deterministic: the document order is the dataset order, or a seeded
//! permutation of it ([`PackOptions::shuffle_seed`]). [`Packer`] is the streaming core
//! (bounded memory, used by the activation cache); [`pack_dataset`] packs a whole
//! dataset at once.

use crate::corpus::Dataset;
use anyhow::{bail, Result};
use saelab_core::rng::Rng;
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackMode {
    /// Concatenate documents with BOS separators, BOS at the start of every row.
    Concat,
    /// One document per row, truncated to `ctx_len` and padded.
    PerDoc,
}

impl std::str::FromStr for PackMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "concat" => PackMode::Concat,
            "per-doc" => PackMode::PerDoc,
            _ => bail!(
                "unknown packing {s:?}: concat (documents joined with BOS between them, every \
                 row full, as SAELens) or per-doc (one document per row, truncated and padded)"
            ),
        })
    }
}

#[derive(Clone, Debug)]
pub struct PackOptions {
    pub ctx_len: usize,
    pub mode: PackMode,
    /// Shuffle the document order with this seed (None: dataset order).
    pub shuffle_seed: Option<u64>,
    /// Stop after this many rows.
    pub max_rows: Option<usize>,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            ctx_len: 128,
            mode: PackMode::Concat,
            shuffle_seed: None,
            max_rows: None,
        }
    }
}

/// Rows of token ids, row-major `[rows, ctx_len]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedRows {
    pub ctx_len: usize,
    pub tokens: Vec<u32>,
    /// Number of real (non-pad) positions per row: `ctx_len` in concat mode.
    pub lengths: Vec<usize>,
    /// Index (into the dataset) of the document each row starts in.
    pub row_doc: Vec<usize>,
}

impl PackedRows {
    pub fn rows(&self) -> usize {
        self.lengths.len()
    }

    pub fn row(&self, i: usize) -> &[u32] {
        &self.tokens[i * self.ctx_len..(i + 1) * self.ctx_len]
    }
}

/// One packed row from [`Packer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub tokens: Vec<u32>,
    pub len: usize,
    pub doc: usize,
}

/// Streaming packer: push tokenised documents, pop complete rows.
pub struct Packer {
    ctx_len: usize,
    mode: PackMode,
    bos: u32,
    pad: u32,
    /// Pending stream tokens with the index of the document each belongs to.
    stream: VecDeque<(u32, usize)>,
    docs_pushed: usize,
    ready: VecDeque<Row>,
}

impl Packer {
    /// `bos` starts every row (and separates documents in concat mode); `pad` fills
    /// per-document rows.
    pub fn new(ctx_len: usize, mode: PackMode, bos: u32, pad: u32) -> Result<Packer> {
        if ctx_len < 2 {
            bail!("ctx_len must be at least 2 (BOS + one token), got {ctx_len}");
        }
        Ok(Packer {
            ctx_len,
            mode,
            bos,
            pad,
            stream: VecDeque::new(),
            docs_pushed: 0,
            ready: VecDeque::new(),
        })
    }

    /// Add the next document (tokens without BOS). Empty documents are skipped but
    /// still counted, so document indices stay aligned with the input order.
    pub fn push_doc(&mut self, tokens: &[u32]) {
        let doc = self.docs_pushed;
        self.docs_pushed += 1;
        if tokens.is_empty() {
            return;
        }
        match self.mode {
            PackMode::PerDoc => {
                let mut row = Vec::with_capacity(self.ctx_len);
                row.push(self.bos);
                row.extend_from_slice(&tokens[..tokens.len().min(self.ctx_len - 1)]);
                let len = row.len();
                row.resize(self.ctx_len, self.pad);
                self.ready.push_back(Row {
                    tokens: row,
                    len,
                    doc,
                });
            }
            PackMode::Concat => {
                if !self.stream.is_empty() {
                    self.stream.push_back((self.bos, doc));
                }
                self.stream.extend(tokens.iter().map(|&t| (t, doc)));
                self.cut_rows();
            }
        }
    }

    fn cut_rows(&mut self) {
        let body = self.ctx_len - 1;
        loop {
            // A separator at the head of a new row is the row's BOS already.
            if self.stream.front().is_some_and(|&(t, _)| t == self.bos) {
                self.stream.pop_front();
            }
            if self.stream.len() < body {
                return;
            }
            let doc = self.stream.front().map(|&(_, d)| d).unwrap_or(0);
            let mut row = Vec::with_capacity(self.ctx_len);
            row.push(self.bos);
            row.extend(self.stream.drain(..body).map(|(t, _)| t));
            self.ready.push_back(Row {
                tokens: row,
                len: self.ctx_len,
                doc,
            });
        }
    }

    pub fn pop_row(&mut self) -> Option<Row> {
        self.ready.pop_front()
    }

    /// Rows ready to pop.
    pub fn ready_rows(&self) -> usize {
        self.ready.len()
    }

    /// Documents pushed so far.
    pub fn docs_pushed(&self) -> usize {
        self.docs_pushed
    }
}

/// The document order used for packing: identity or a seeded permutation.
pub fn doc_order(n_docs: usize, shuffle_seed: Option<u64>) -> Vec<usize> {
    match shuffle_seed {
        Some(seed) => Rng::new(seed).permutation(n_docs),
        None => (0..n_docs).collect(),
    }
}

/// Pack already-tokenised documents (no BOS inside). `row_doc` indexes `docs`.
pub fn pack_tokens(
    docs: &[Vec<u32>],
    bos: u32,
    pad: u32,
    opts: &PackOptions,
) -> Result<PackedRows> {
    let mut packer = Packer::new(opts.ctx_len, opts.mode, bos, pad)?;
    let order = doc_order(docs.len(), opts.shuffle_seed);
    let max_rows = opts.max_rows.unwrap_or(usize::MAX);
    let mut out = PackedRows {
        ctx_len: opts.ctx_len,
        tokens: Vec::new(),
        lengths: Vec::new(),
        row_doc: Vec::new(),
    };
    'outer: for &i in &order {
        packer.push_doc(&docs[i]);
        while let Some(r) = packer.pop_row() {
            if out.rows() >= max_rows {
                break 'outer;
            }
            out.tokens.extend_from_slice(&r.tokens);
            out.lengths.push(r.len);
            out.row_doc.push(order[r.doc]);
        }
        if out.rows() >= max_rows {
            break;
        }
    }
    Ok(out)
}

/// Tokenise and pack a dataset. `encode` turns text into ids without BOS (e.g.
/// `|s| tokenizer.encode(s)`); documents are tokenised lazily, so `max_rows` bounds
/// the work on a large corpus.
pub fn pack_dataset(
    dataset: &Dataset,
    encode: impl Fn(&str) -> Result<Vec<u32>>,
    bos: u32,
    pad: u32,
    opts: &PackOptions,
) -> Result<PackedRows> {
    let mut packer = Packer::new(opts.ctx_len, opts.mode, bos, pad)?;
    let order = doc_order(dataset.len(), opts.shuffle_seed);
    let max_rows = opts.max_rows.unwrap_or(usize::MAX);
    let mut out = PackedRows {
        ctx_len: opts.ctx_len,
        tokens: Vec::new(),
        lengths: Vec::new(),
        row_doc: Vec::new(),
    };
    for &i in &order {
        if out.rows() >= max_rows {
            break;
        }
        packer.push_doc(&encode(&dataset.docs[i].text)?);
        while let Some(r) = packer.pop_row() {
            if out.rows() >= max_rows {
                break;
            }
            out.tokens.extend_from_slice(&r.tokens);
            out.lengths.push(r.len);
            out.row_doc.push(order[r.doc]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOS: u32 = 1;
    const PAD: u32 = 2;

    /// Random documents of tokens >= 10 (never BOS/PAD), some empty, some long.
    fn random_docs(seed: u64, n: usize) -> Vec<Vec<u32>> {
        let mut r = Rng::new(seed);
        (0..n)
            .map(|_| {
                let len = if r.below(10) == 0 {
                    0
                } else {
                    1 + r.below(300)
                };
                (0..len).map(|_| 10 + r.below(1000) as u32).collect()
            })
            .collect()
    }

    #[test]
    fn concat_rows_start_with_bos_and_separate_docs() {
        let docs = random_docs(5, 60);
        for ctx in [2usize, 3, 16, 128] {
            let o = PackOptions {
                ctx_len: ctx,
                ..Default::default()
            };
            let p = pack_tokens(&docs, BOS, PAD, &o).unwrap();
            assert_eq!(p.tokens.len(), p.rows() * ctx);
            assert!(p.lengths.iter().all(|&l| l == ctx));
            // The reference stream: non-empty documents joined by one BOS each.
            let mut expected: Vec<u32> = Vec::new();
            for d in docs.iter().filter(|d| !d.is_empty()) {
                if !expected.is_empty() {
                    expected.push(BOS);
                }
                expected.extend_from_slice(d);
            }
            // Each row is BOS + the next ctx-1 stream tokens, where a separator that
            // would open a row is absorbed by the row's own BOS.
            let mut pos = 0;
            for i in 0..p.rows() {
                let row = p.row(i);
                assert_eq!(row[0], BOS, "ctx {ctx} row {i}");
                if expected[pos] == BOS {
                    pos += 1;
                }
                assert_ne!(row[1], BOS, "double BOS at ctx {ctx} row {i}");
                assert_eq!(
                    &row[1..],
                    &expected[pos..pos + ctx - 1],
                    "ctx {ctx} row {i}"
                );
                pos += ctx - 1;
            }
            // Only an incomplete tail (plus possibly one absorbed separator) is dropped.
            let rest = expected.len() - pos;
            assert!(
                rest < ctx || (rest == ctx && expected[pos] == BOS),
                "ctx {ctx}: {rest} left"
            );
            assert!(p.rows() > 0);
        }
    }

    #[test]
    fn concat_exact_small_example() {
        let docs = vec![vec![10, 11, 12], vec![], vec![20, 21], vec![30, 31, 32, 33]];
        let p = pack_tokens(
            &docs,
            BOS,
            PAD,
            &PackOptions {
                ctx_len: 4,
                ..Default::default()
            },
        )
        .unwrap();
        // stream: 10 11 12 | 20 21 sep 30 31 32 33. Row 0 ends exactly at the end of
        // document 0, so the next row's BOS doubles as the separator (no BOS BOS); the
        // separator before 30 ends row 1; the tail "33" is dropped.
        assert_eq!(p.tokens, vec![1, 10, 11, 12, 1, 20, 21, 1, 1, 30, 31, 32]);
        assert_eq!(p.row_doc, vec![0, 2, 3]);
    }

    #[test]
    fn per_doc_rows_are_truncated_and_padded() {
        let docs = vec![vec![10, 11, 12, 13, 14], vec![20], vec![]];
        let p = pack_tokens(
            &docs,
            BOS,
            PAD,
            &PackOptions {
                ctx_len: 4,
                mode: PackMode::PerDoc,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.tokens, vec![1, 10, 11, 12, 1, 20, 2, 2]);
        assert_eq!(p.lengths, vec![4, 2]);
        assert_eq!(p.row_doc, vec![0, 1]);
    }

    #[test]
    fn shuffle_is_deterministic_and_max_rows_respected() {
        let docs = random_docs(9, 40);
        let o = |s| PackOptions {
            ctx_len: 32,
            shuffle_seed: Some(s),
            max_rows: Some(20),
            ..Default::default()
        };
        let a = pack_tokens(&docs, BOS, PAD, &o(1)).unwrap();
        let b = pack_tokens(&docs, BOS, PAD, &o(1)).unwrap();
        let c = pack_tokens(&docs, BOS, PAD, &o(2)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.tokens, c.tokens);
        assert_eq!(a.rows(), 20);
        // row_doc refers to dataset indices: the row's first token comes from that doc.
        for i in 0..a.rows() {
            let first = a.row(i)[1];
            assert!(docs[a.row_doc[i]].contains(&first));
        }
    }

    #[test]
    fn pack_dataset_matches_pack_tokens() {
        use crate::corpus::{Dataset, Document};
        let ds = Dataset::new(
            "t",
            ["a b c", "", "d e", "f g h i j k"]
                .iter()
                .map(|s| Document::new(*s))
                .collect(),
        );
        let encode = |s: &str| -> Result<Vec<u32>> {
            Ok(s.split_whitespace()
                .map(|w| w.as_bytes()[0] as u32)
                .collect())
        };
        let toks: Vec<Vec<u32>> = ds.docs.iter().map(|d| encode(&d.text).unwrap()).collect();
        for mode in [PackMode::Concat, PackMode::PerDoc] {
            let o = PackOptions {
                ctx_len: 3,
                mode,
                shuffle_seed: Some(4),
                max_rows: None,
            };
            assert_eq!(
                pack_dataset(&ds, encode, BOS, PAD, &o).unwrap(),
                pack_tokens(&toks, BOS, PAD, &o).unwrap()
            );
        }
        assert!(Packer::new(1, PackMode::Concat, BOS, PAD).is_err());
    }
}
