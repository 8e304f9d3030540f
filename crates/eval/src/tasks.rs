//! Labelled texts, their LM activations, and pooling (shared by sparse probing, TPP, SCR).
//!
//! Texts are tokenized with BOS, truncated to the context length (beginning kept) and
//! run through the LM in batches of similar length, right-padded (the LM is causal, so
//! padding never changes earlier positions). Only the activations of non-ignored
//! tokens (not pad/eos/bos) are kept, per document ([`DocActs`]). Pooling is the mean
//! over those tokens, for the LM activations and for the SAE latents, as SAEBench does.
//! Because the SCR/TPP ablation `x' = x - sum_{j in A} f_j W_dec[j]` is linear in the
//! codes, the pooled ablated activation is `mean x - sum_{j in A} mean(f_j) W_dec[j]`,
//! so it is computed from the pooled latents without another pass over tokens.

use crate::cache::{ActCache, Blob};
use crate::lm_api::HookedLm;
use anyhow::{bail, Context, Result};
use saelab_sae::codes::SparseCodes;
use saelab_sae::model::Sae;
use std::collections::BTreeMap;
use std::path::Path;

/// One labelled text (mirrors `saelab_data::corpus::Document`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabeledText {
    pub text: String,
    pub labels: BTreeMap<String, String>,
}

impl LabeledText {
    pub fn new(text: impl Into<String>, labels: &[(&str, &str)]) -> Self {
        LabeledText {
            text: text.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// A named set of labelled texts and the label key that defines the classes.
#[derive(Clone, Debug)]
pub struct ProbeDataset {
    pub name: String,
    pub label_key: String,
    pub docs: Vec<LabeledText>,
}

/// Read a user task: `.jsonl` (one object per line; `text_field` is the text, every
/// other string/number field a label) or `.csv` (header row; same rule per column).
pub fn load_labeled_file(path: &Path, text_field: &str) -> Result<Vec<LabeledText>> {
    let raw =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut out = Vec::new();
    match ext.as_str() {
        "jsonl" => {
            for (i, line) in raw.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
                let obj = v
                    .as_object()
                    .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
                let text = obj
                    .get(text_field)
                    .and_then(|t| t.as_str())
                    .with_context(|| {
                        format!(
                            "{}:{}: no string field '{text_field}'",
                            path.display(),
                            i + 1
                        )
                    })?;
                let mut labels = BTreeMap::new();
                for (k, v) in obj {
                    if k == text_field {
                        continue;
                    }
                    match v {
                        serde_json::Value::String(s) => {
                            labels.insert(k.clone(), s.clone());
                        }
                        serde_json::Value::Number(n) => {
                            labels.insert(k.clone(), n.to_string());
                        }
                        serde_json::Value::Bool(b) => {
                            labels.insert(k.clone(), b.to_string());
                        }
                        _ => {}
                    }
                }
                out.push(LabeledText {
                    text: text.to_string(),
                    labels,
                });
            }
        }
        "csv" => {
            let rows =
                parse_csv(&raw).with_context(|| format!("{}: invalid CSV", path.display()))?;
            let Some((header, body)) = rows.split_first() else {
                bail!("{}: empty CSV", path.display())
            };
            let ti = header
                .iter()
                .position(|h| h == text_field)
                .with_context(|| {
                    format!(
                        "{}: no column '{text_field}' in header {header:?}",
                        path.display()
                    )
                })?;
            for (i, row) in body.iter().enumerate() {
                if row.len() != header.len() {
                    bail!(
                        "{}: row {} has {} fields, header has {}",
                        path.display(),
                        i + 2,
                        row.len(),
                        header.len()
                    );
                }
                let labels = header
                    .iter()
                    .zip(row)
                    .enumerate()
                    .filter(|(j, _)| *j != ti)
                    .map(|(_, (h, v))| (h.clone(), v.clone()))
                    .collect();
                out.push(LabeledText {
                    text: row[ti].clone(),
                    labels,
                });
            }
        }
        _ => bail!("{}: user tasks must be .jsonl or .csv", path.display()),
    }
    if out.is_empty() {
        bail!("{}: no rows", path.display());
    }
    Ok(out)
}

/// RFC 4180 CSV: quoted fields may hold commas, quotes (doubled) and newlines.
fn parse_csv(s: &str) -> Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    field.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            } else {
                field.push(c);
            }
        } else {
            match c {
                '"' if field.is_empty() => quoted = true,
                ',' => row.push(std::mem::take(&mut field)),
                '\r' => {}
                '\n' => {
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                _ => field.push(c),
            }
        }
    }
    if quoted {
        bail!("unterminated quoted field");
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

/// Per-document activations of the kept (non-ignored) tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct DocActs {
    pub d: usize,
    /// Document `i`'s rows are `offsets[i]..offsets[i + 1]`.
    pub offsets: Vec<usize>,
    pub acts: Vec<f32>,
}

impl DocActs {
    pub fn n_docs(&self) -> usize {
        self.offsets.len() - 1
    }
    pub fn doc(&self, i: usize) -> &[f32] {
        &self.acts[self.offsets[i] * self.d..self.offsets[i + 1] * self.d]
    }
    pub fn tokens(&self) -> usize {
        *self.offsets.last().unwrap()
    }

    fn to_blob(&self) -> Blob {
        Blob {
            f32s: vec![("acts".into(), self.acts.clone())],
            u64s: vec![(
                "offsets".into(),
                self.offsets.iter().map(|&o| o as u64).collect(),
            )],
            meta: serde_json::json!({ "d": self.d }),
        }
    }

    fn from_blob(mut b: Blob) -> Result<Self> {
        let d = b.meta["d"].as_u64().context("cache entry without d")? as usize;
        let offsets: Vec<usize> = b.u64("offsets")?.iter().map(|&o| o as usize).collect();
        let acts = b.take_f32("acts")?;
        if offsets.is_empty() || acts.len() != offsets.last().unwrap() * d {
            bail!("cache entry with inconsistent shapes");
        }
        Ok(DocActs { d, offsets, acts })
    }
}

/// FNV-1a over all texts, so a cache key changes when the texts do.
pub fn texts_fingerprint<'a>(texts: impl Iterator<Item = &'a str>) -> String {
    let h = crate::cache::fnv64(texts.flat_map(|t| t.bytes().chain(std::iter::once(0xff))));
    format!("{h:016x}")
}

/// Activations at `hook` of every text's kept tokens (BOS + text, truncated to `ctx`).
/// Errors on an empty text (it would have no token to pool).
///
/// Documents are reused across pools: sparse probing's datasets, TPP's and SCR's draw
/// from the same corpora (both SOTU tasks and SCR from one set of paragraphs), so a
/// per-model-and-hook document index ([`DocIndex`]) records where each token
/// sequence's activations were stored, and only sequences not seen before go through
/// the LM. A document's activations depend only on its own tokens (causal attention,
/// padding after them), so a reused document is the one the LM would compute.
pub fn collect_doc_acts(
    lm: &dyn HookedLm,
    hook: &str,
    texts: &[&str],
    ctx: usize,
    batch: usize,
    cache: &ActCache,
    key: &str,
) -> Result<DocActs> {
    if let Some(b) = cache.load(key) {
        if let Ok(a) = DocActs::from_blob(b) {
            if a.n_docs() == texts.len() && a.d == lm.d_model() {
                tracing::info!("eval cache hit: {key}");
                return Ok(a);
            }
        }
    }
    if ctx < 2 {
        bail!("context length {ctx} is too short");
    }
    let ignored = lm.ignored_ids();
    let mut seqs: Vec<Vec<u32>> = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        if t.trim().is_empty() {
            bail!("text {i} is empty: nothing to pool");
        }
        let mut ids = Vec::with_capacity(ctx);
        if let Some(b) = lm.bos_id() {
            ids.push(b);
        }
        ids.extend(
            lm.encode(t)
                .with_context(|| format!("cannot tokenize text {i}"))?,
        );
        ids.truncate(ctx);
        if !ids.iter().any(|id| !ignored.contains(id)) {
            bail!("text {i} has no non-special token");
        }
        seqs.push(ids);
    }
    let d = lm.d_model();
    let kept = |s: &[u32]| s.iter().filter(|id| !ignored.contains(id)).count();
    let index_key = DocIndex::key(&lm.name(), hook);
    let mut index = DocIndex::load(cache, &index_key);
    let hashes: Vec<u64> = seqs.iter().map(|s| seq_hash(s)).collect();
    let mut per_doc = index.reuse(cache, &hashes, d, |i, rows| rows == kept(&seqs[i]));
    let reused: Vec<bool> = per_doc.iter().map(|v| v.is_some()).collect();
    let todo: Vec<usize> = (0..seqs.len()).filter(|&i| per_doc[i].is_none()).collect();
    if todo.len() < seqs.len() {
        tracing::info!(
            "eval cache: {} of {} documents reused from earlier pools; LM pass over {}",
            seqs.len() - todo.len(),
            seqs.len(),
            todo.len()
        );
    }
    // Batch texts of similar length together to limit padding.
    let mut order = todo;
    order.sort_by_key(|&i| (seqs[i].len(), i));
    for chunk in order.chunks(batch.max(1)) {
        let seq = chunk.iter().map(|&i| seqs[i].len()).max().unwrap();
        let mut toks = vec![lm.fill_id(); chunk.len() * seq];
        for (r, &i) in chunk.iter().enumerate() {
            toks[r * seq..r * seq + seqs[i].len()].copy_from_slice(&seqs[i]);
        }
        let acts = lm.capture(&toks, chunk.len(), seq, hook)?;
        if acts.len() != chunk.len() * seq * d {
            bail!(
                "LM returned {} activation values for a [{}, {seq}, {d}] batch",
                acts.len(),
                chunk.len()
            );
        }
        for (r, &i) in chunk.iter().enumerate() {
            let mut v = Vec::with_capacity(kept(&seqs[i]) * d);
            for t in 0..seqs[i].len() {
                if !ignored.contains(&seqs[i][t]) {
                    v.extend_from_slice(&acts[(r * seq + t) * d..(r * seq + t + 1) * d]);
                }
            }
            per_doc[i] = Some(v);
        }
    }
    let mut offsets = vec![0usize];
    let mut all = Vec::with_capacity(per_doc.iter().flatten().map(|v| v.len()).sum());
    for v in per_doc {
        all.extend_from_slice(&v.expect("every document reused or computed"));
        offsets.push(all.len() / d);
    }
    let out = DocActs {
        d,
        offsets,
        acts: all,
    };
    if let Err(e) = cache.store(key, &out.to_blob()) {
        tracing::warn!("could not write eval cache entry: {e:#}");
    } else {
        index.add(key, &hashes, &reused);
        if let Err(e) = cache.store(&index_key, &index.to_blob()) {
            tracing::warn!("could not write the eval cache's document index: {e:#}");
        }
    }
    Ok(out)
}

/// FNV-1a over a token sequence (its length first), the document key of [`DocIndex`].
fn seq_hash(ids: &[u32]) -> u64 {
    let len = (ids.len() as u64).to_le_bytes();
    crate::cache::fnv64(
        len.into_iter()
            .chain(ids.iter().flat_map(|id| id.to_le_bytes())),
    )
}

/// Where each token sequence's activations were stored: (sequence hash, pool entry,
/// document index in that entry), one row per distinct sequence, for one model and
/// hook. An index that is missing, unreadable or points to a pool entry that is gone
/// only costs LM passes; a reused document is checked for its number of kept tokens.
#[derive(Debug, Default)]
struct DocIndex {
    pools: Vec<String>,
    hash: Vec<u64>,
    pool: Vec<u64>,
    doc: Vec<u64>,
    known: std::collections::HashMap<u64, usize>,
}

impl DocIndex {
    fn key(model: &str, hook: &str) -> String {
        format!("doc-index-v1|{model}|{hook}")
    }

    fn load(cache: &ActCache, key: &str) -> DocIndex {
        let mut ix = DocIndex::default();
        let Some(b) = cache.load(key) else {
            return ix;
        };
        let pools: Option<Vec<String>> = b.meta["pools"].as_array().map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        });
        let (Some(pools), Ok(hash), Ok(pool), Ok(doc)) =
            (pools, b.u64("hash"), b.u64("pool"), b.u64("doc"))
        else {
            return ix;
        };
        if hash.len() != pool.len()
            || hash.len() != doc.len()
            || pool.iter().any(|&p| p as usize >= pools.len())
        {
            return ix;
        }
        ix.pools = pools;
        (ix.hash, ix.pool, ix.doc) = (hash.to_vec(), pool.to_vec(), doc.to_vec());
        ix.known = ix.hash.iter().enumerate().map(|(r, &h)| (h, r)).collect();
        ix
    }

    /// Activations of every indexed document among `hashes` (`None` for the others),
    /// read from the pool entries that hold them, each entry loaded once. `fits(i,
    /// rows)` checks a found document against the sequence it should be.
    fn reuse(
        &self,
        cache: &ActCache,
        hashes: &[u64],
        d: usize,
        fits: impl Fn(usize, usize) -> bool,
    ) -> Vec<Option<Vec<f32>>> {
        let mut out: Vec<Option<Vec<f32>>> = vec![None; hashes.len()];
        let mut by_pool: BTreeMap<u64, Vec<(usize, usize)>> = BTreeMap::new();
        for (i, h) in hashes.iter().enumerate() {
            if let Some(&r) = self.known.get(h) {
                by_pool
                    .entry(self.pool[r])
                    .or_default()
                    .push((i, self.doc[r] as usize));
            }
        }
        for (p, wanted) in by_pool {
            let key = &self.pools[p as usize];
            let Some(acts) = cache.load(key).and_then(|b| DocActs::from_blob(b).ok()) else {
                continue;
            };
            if acts.d != d {
                continue;
            }
            for (i, j) in wanted {
                if j < acts.n_docs() && fits(i, acts.offsets[j + 1] - acts.offsets[j]) {
                    out[i] = Some(acts.doc(j).to_vec());
                }
            }
        }
        out
    }

    /// Record the documents of the pool entry `key`: the ones the index did not know,
    /// and the ones it knew but could not reuse (their old entry is gone or stale).
    fn add(&mut self, key: &str, hashes: &[u64], reused: &[bool]) {
        let p = match self.pools.iter().position(|k| k == key) {
            Some(p) => p,
            None => {
                self.pools.push(key.to_string());
                self.pools.len() - 1
            }
        };
        for (j, (&h, &was_reused)) in hashes.iter().zip(reused).enumerate() {
            match self.known.get(&h) {
                Some(_) if was_reused => {}
                Some(&r) => (self.pool[r], self.doc[r]) = (p as u64, j as u64),
                None => {
                    self.known.insert(h, self.hash.len());
                    self.hash.push(h);
                    self.pool.push(p as u64);
                    self.doc.push(j as u64);
                }
            }
        }
    }

    fn to_blob(&self) -> Blob {
        Blob {
            f32s: Vec::new(),
            u64s: vec![
                ("hash".into(), self.hash.clone()),
                ("pool".into(), self.pool.clone()),
                ("doc".into(), self.doc.clone()),
            ],
            meta: serde_json::json!({ "pools": self.pools }),
        }
    }
}

/// Mean LM activation per document, [n_docs, d].
pub fn pool_llm(a: &DocActs) -> Vec<f32> {
    let d = a.d;
    let mut out = vec![0f32; a.n_docs() * d];
    for i in 0..a.n_docs() {
        let rows = a.offsets[i + 1] - a.offsets[i];
        let mut s = vec![0f64; d];
        for r in a.doc(i).chunks_exact(d) {
            for (acc, v) in s.iter_mut().zip(r) {
                *acc += *v as f64;
            }
        }
        for (o, v) in out[i * d..(i + 1) * d].iter_mut().zip(&s) {
            *o = (*v / rows as f64) as f32;
        }
    }
    out
}

/// Mean SAE latents per document as sparse rows, [n_docs, d_sae].
pub fn pool_sae(a: &DocActs, sae: &Sae) -> Result<SparseCodes> {
    if sae.d_in != a.d {
        bail!(
            "SAE d_in {} differs from the LM width {} at the hook",
            sae.d_in,
            a.d
        );
    }
    // Documents are short (tens of tokens): encode groups of consecutive documents
    // (contiguous rows) at once, so the encoder GEMM sees thousands of rows per call
    // instead of repacking its weights for every document.
    Ok(pool_sae_grouped(a, sae, 4096))
}

/// [`pool_sae`] encoding groups of whole documents of at least `group_rows` rows.
fn pool_sae_grouped(a: &DocActs, sae: &Sae, group_rows: usize) -> SparseCodes {
    let (f, d) = (sae.d_sae, a.d);
    let mut out = SparseCodes::with_capacity(a.n_docs(), f, 0);
    let mut acc = vec![0f64; f];
    let mut touched: Vec<u32> = Vec::new();
    let mut first = 0;
    while first < a.n_docs() {
        let mut end = first + 1;
        while end < a.n_docs() && a.offsets[end] - a.offsets[first] < group_rows {
            end += 1;
        }
        let (r0, r1) = (a.offsets[first], a.offsets[end]);
        let codes = sae.encode(&a.acts[r0 * d..r1 * d], r1 - r0);
        for i in first..end {
            let rows = a.offsets[i + 1] - a.offsets[i];
            let (c0, c1) = (
                codes.offsets[a.offsets[i] - r0],
                codes.offsets[a.offsets[i + 1] - r0],
            );
            for (&j, &v) in codes.idx[c0..c1].iter().zip(&codes.val[c0..c1]) {
                if acc[j as usize] == 0.0 {
                    touched.push(j);
                }
                acc[j as usize] += v as f64;
            }
            touched.sort_unstable();
            out.push_row(
                touched
                    .iter()
                    .map(|&j| (j, (acc[j as usize] / rows as f64) as f32))
                    .filter(|e| e.1 != 0.0),
            );
            for &j in &touched {
                acc[j as usize] = 0.0;
            }
            touched.clear();
        }
        first = end;
    }
    out
}

/// Pooled activations with latents `ablate` removed: `x - sum_{j in A} f_j W_dec[j]`,
/// from the pooled LM activations and pooled latents (exact, the ablation is linear).
pub fn pool_ablated(
    pooled_x: &[f32],
    pooled_f: &SparseCodes,
    sae: &Sae,
    ablate: &[usize],
) -> Vec<f32> {
    let d = sae.d_in;
    let mut on = vec![false; sae.d_sae];
    for &j in ablate {
        on[j] = true;
    }
    let mut out = pooled_x.to_vec();
    for i in 0..pooled_f.rows {
        let (idx, val) = pooled_f.row(i);
        let o = &mut out[i * d..(i + 1) * d];
        for (&j, &v) in idx.iter().zip(val) {
            if on[j as usize] {
                for (a, w) in o
                    .iter_mut()
                    .zip(&sae.w_dec[j as usize * d..(j as usize + 1) * d])
                {
                    *a -= v * w;
                }
            }
        }
    }
    out
}

/// Rows `rows` of a row-major matrix of width `d`.
pub fn gather_rows(m: &[f32], d: usize, rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        out.extend_from_slice(&m[r * d..(r + 1) * d]);
    }
    out
}

/// Rows `rows` of sparse codes.
pub fn gather_codes(c: &SparseCodes, rows: &[usize]) -> SparseCodes {
    let mut out = SparseCodes::with_capacity(rows.len(), c.d_sae, 0);
    for &r in rows {
        let (i, v) = c.row(r);
        out.push_row(i.iter().copied().zip(v.iter().copied()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm_api::ToyLm;
    use crate::testutil::{random_sae, Counting};

    #[test]
    fn csv_and_jsonl_user_tasks() {
        let dir = std::env::temp_dir().join(format!("saelab-tasks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("t.csv");
        std::fs::write(
            &csv,
            "label,text\npos,\"hello, \"\"world\"\"\nline\"\nneg,plain\n",
        )
        .unwrap();
        let v = load_labeled_file(&csv, "text").unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].text, "hello, \"world\"\nline");
        assert_eq!(v[0].labels["label"], "pos");
        let jl = dir.join("t.jsonl");
        std::fs::write(
            &jl,
            "{\"text\": \"a b\", \"y\": 1}\n\n{\"text\": \"c\", \"y\": 0}\n",
        )
        .unwrap();
        let v = load_labeled_file(&jl, "text").unwrap();
        assert_eq!(v[1].labels["y"], "0");
        std::fs::write(&jl, "{\"txt\": \"a\"}\n").unwrap();
        assert!(load_labeled_file(&jl, "text")
            .unwrap_err()
            .to_string()
            .contains("no string field"));
        assert!(load_labeled_file(&dir.join("t.txt"), "text").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn documents_are_reused_across_pools() {
        let toy = ToyLm::new(&["alpha", "beta", "gamma", "delta"], 6, 1, 5);
        let lm = Counting {
            inner: &toy,
            tokens: std::cell::Cell::new(0),
        };
        let dir = std::env::temp_dir().join(format!("saelab-docreuse-{}", std::process::id()));
        let cache = ActCache::new(Some(dir.clone()));
        let hook = "blocks.0.hook_resid_post";
        let docs = [
            "alpha beta",
            "gamma gamma gamma alpha",
            "beta delta",
            "delta alpha gamma",
            "beta",
        ];
        let fresh_at = |texts: &[&str], ctx: usize| {
            collect_doc_acts(&toy, hook, texts, ctx, 2, &ActCache::default(), "x").unwrap()
        };
        let fresh = |texts: &[&str]| fresh_at(texts, 8);
        let a = collect_doc_acts(&lm, hook, &docs[..3], 8, 2, &cache, "pool-a").unwrap();
        assert_eq!(
            lm.tokens.get(),
            2 * 3 + 5,
            "the two short documents share a batch"
        );
        assert_eq!(a, fresh(&docs[..3]));
        // A second pool (another key) with two known documents runs the LM on the
        // other two only, and equals the pool computed from scratch.
        lm.tokens.set(0);
        let pool_b = [docs[3], docs[1], docs[4], docs[2]];
        let b = collect_doc_acts(&lm, hook, &pool_b, 8, 2, &cache, "pool-b").unwrap();
        assert_eq!(lm.tokens.get(), 2 * 4, "docs 3 and 4 in one padded batch");
        assert_eq!(b, fresh(&pool_b));
        // The same texts at a shorter context are other sequences: no reuse.
        lm.tokens.set(0);
        let c = collect_doc_acts(&lm, hook, &docs[1..2], 3, 2, &cache, "pool-c").unwrap();
        assert_eq!(lm.tokens.get(), 3);
        assert_eq!(c, fresh_at(&docs[1..2], 3));
        // A pool entry that is gone costs an LM pass, then the index points to the
        // new entry.
        std::fs::remove_dir_all(&dir).unwrap();
        lm.tokens.set(0);
        let d = collect_doc_acts(&lm, hook, &docs[..1], 8, 2, &cache, "pool-d").unwrap();
        assert_eq!(lm.tokens.get(), 3);
        assert_eq!(d, fresh(&docs[..1]));
        lm.tokens.set(0);
        let e = collect_doc_acts(&lm, hook, &docs[..1], 8, 2, &cache, "pool-e").unwrap();
        assert_eq!(lm.tokens.get(), 0);
        assert_eq!(e, d);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn doc_acts_pooling_and_linear_ablation() {
        let lm = ToyLm::new(&["alpha", "beta", "gamma"], 6, 1, 3);
        let texts = ["alpha beta", "gamma gamma gamma alpha", "beta"];
        let a = collect_doc_acts(
            &lm,
            "blocks.0.hook_resid_post",
            &texts,
            8,
            2,
            &ActCache::default(),
            "k",
        )
        .unwrap();
        // Kept tokens = the text's tokens (BOS dropped).
        assert_eq!(a.offsets, vec![0, 2, 6, 7]);
        // Same activations as a direct single-text forward.
        let ids: Vec<u32> = std::iter::once(ToyLm::BOS)
            .chain(lm.encode(texts[1]).unwrap())
            .collect();
        let direct = lm
            .capture(&ids, 1, ids.len(), "blocks.0.hook_resid_post")
            .unwrap();
        assert_eq!(a.doc(1), &direct[6..]);
        let sae = random_sae(6, 10, 4);
        let px = pool_llm(&a);
        let pf = pool_sae(&a, &sae).unwrap();
        // Encoding documents in groups pools the same as one document at a time.
        for group in [1, 3, 5] {
            let g = pool_sae_grouped(&a, &sae, group);
            assert_eq!(g.offsets, pf.offsets, "group {group}");
            assert_eq!(g.idx, pf.idx, "group {group}");
            for (x, y) in g.val.iter().zip(&pf.val) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "group {group}");
            }
        }
        for i in 0..3 {
            let rows = a.offsets[i + 1] - a.offsets[i];
            let dense = sae.encode(a.doc(i), rows).to_dense();
            let (idx, val) = pf.row(i);
            let mut want = [0f32; 10];
            for r in 0..rows {
                for j in 0..10 {
                    want[j] += dense[r * 10 + j] / rows as f32;
                }
            }
            let mut got = [0f32; 10];
            for (&j, &v) in idx.iter().zip(val) {
                got[j as usize] = v;
            }
            for j in 0..10 {
                assert!((got[j] - want[j]).abs() < 1e-5, "doc {i} latent {j}");
            }
        }
        // Pooled ablation equals the per-token ablation, then pooled.
        let ablate = vec![1usize, 4, 7];
        let fast = pool_ablated(&px, &pf, &sae, &ablate);
        for i in 0..3 {
            let rows = a.offsets[i + 1] - a.offsets[i];
            let codes = sae.encode(a.doc(i), rows);
            let mut dense = codes.to_dense();
            let full = sae.decode(&codes);
            for r in 0..rows {
                for &j in &ablate {
                    dense[r * 10 + j] = 0.0;
                }
            }
            let abl = sae.decode(&SparseCodes::from_dense(&dense, rows, 10));
            for j in 0..6 {
                let mut s = 0f64;
                for r in 0..rows {
                    let x = a.doc(i)[r * 6 + j];
                    s += (abl[r * 6 + j] + (x - full[r * 6 + j])) as f64;
                }
                let slow = s / rows as f64;
                assert!(
                    (slow - fast[i * 6 + j] as f64).abs() < 1e-4,
                    "doc {i} dim {j}: {slow} vs {}",
                    fast[i * 6 + j]
                );
            }
        }
        assert!(collect_doc_acts(
            &lm,
            "blocks.0.hook_resid_post",
            &["  "],
            8,
            2,
            &ActCache::default(),
            "k2"
        )
        .is_err());
        let wrong = random_sae(5, 10, 4);
        assert!(pool_sae(&a, &wrong)
            .unwrap_err()
            .to_string()
            .contains("d_in"));
    }
}
