//! Feature browser: for every latent of an SAE, the tokens of an activation store that
//! activate it most, each with its context and the latent's activation on every context
//! token. Written as `browser.html` (one self-contained file that opens from disk: the
//! latents listed by firing density, a click shows a latent's examples) and
//! `features.json` (the same data for Python).
//!
//! Every number comes from the store and the SAE. The scan encodes the store's first
//! `max_rows` rows with the SAE's own `encode` and keeps, per latent, the number of rows
//! it fires on, the sum of its activations and its `examples` largest activations (ties:
//! the earlier row). Context comes from the store's token and position files: the rows
//! just before and after an example that lie in the same context window of the packed
//! stream (filtered rows, such as BOS, are absent). The context rows are encoded too,
//! so the activation shown on a context token is the SAE's, not an estimate.

use anyhow::{bail, Context, Result};
use saelab_data::store::ActivationStore;
use saelab_sae::Sae;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What to scan and how much to keep.
#[derive(Clone, Debug)]
pub struct BrowseOptions {
    /// Rows of the store to scan (from the start; capped at the store's size).
    pub max_rows: u64,
    /// Top examples kept per latent.
    pub examples: usize,
    /// Context tokens shown before and after an example's token.
    pub before: usize,
    pub after: usize,
}

impl Default for BrowseOptions {
    fn default() -> Self {
        BrowseOptions {
            max_rows: 250_000,
            examples: 12,
            before: 12,
            after: 4,
        }
    }
}

/// One top-activating token with its context.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Example {
    /// Store row of the token.
    pub row: u64,
    /// The latent's activation on it.
    pub value: f32,
    /// Token ids of the context, the example's token at `focus`.
    pub tokens: Vec<u32>,
    /// The latent's activation on each context token (0 where it does not fire).
    pub acts: Vec<f32>,
    pub focus: usize,
}

/// One latent's statistics over the scanned rows and its top examples (largest first).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Feature {
    pub id: usize,
    /// Rows on which the latent is nonzero.
    pub fires: u64,
    /// Those rows' activations counted in [`HIST_BINS`] log-spaced bins from
    /// [`HIST_LO`] to [`HIST_HI`] (values outside go to the first / last bin).
    pub hist: Vec<u32>,
    /// Mean activation over the rows it fires on (0 if it never fires).
    pub mean_active: f64,
    pub examples: Vec<Example>,
    /// Tokens whose logits the latent's decoder direction raises / lowers most
    /// (`Model::logit_effect`), `(token, effect)`, largest magnitude first; empty when
    /// no model was given.
    pub promotes: Vec<(u32, f32)>,
    pub suppresses: Vec<(u32, f32)>,
}

/// Activation histogram: bins of equal width in log10 between these bounds.
pub const HIST_BINS: usize = 25;
pub const HIST_LO: f32 = 1e-2;
pub const HIST_HI: f32 = 1e3;

/// The `HIST_BINS + 1` bin edges, `HIST_LO` to `HIST_HI` evenly in log10.
fn hist_edges() -> Vec<f32> {
    let (lo, hi) = (HIST_LO.log10(), HIST_HI.log10());
    (0..=HIST_BINS)
        .map(|i| 10f32.powf(lo + (hi - lo) * i as f32 / HIST_BINS as f32))
        .collect()
}

/// The bin of a positive activation given the edges: the number of inner edges at or
/// below it (a few comparisons; values outside the range fall in the end bins).
fn hist_bin(edges: &[f32], v: f32) -> usize {
    edges[1..HIST_BINS].partition_point(|&e| e <= v)
}

/// Per-latent top-k of `(value, row)`: strictly larger values enter, so among equal
/// values the earlier row stays; `floor` is the smallest kept value once full.
struct TopK {
    k: usize,
    kept: Vec<Vec<(f32, u64)>>,
    floor: Vec<f32>,
}

impl TopK {
    fn new(d_sae: usize, k: usize) -> Self {
        TopK {
            k,
            kept: vec![Vec::with_capacity(k); d_sae],
            floor: vec![f32::NEG_INFINITY; d_sae],
        }
    }

    fn offer(&mut self, latent: usize, value: f32, row: u64) {
        if self.k == 0 || value <= self.floor[latent] {
            return;
        }
        let kept = &mut self.kept[latent];
        if kept.len() < self.k {
            kept.push((value, row));
        } else {
            // Replace the smallest; among equal smallest, the latest row goes.
            let (i, _) = kept
                .iter()
                .enumerate()
                .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0).then(b.1 .1.cmp(&a.1 .1)))
                .expect("k > 0");
            kept[i] = (value, row);
        }
        if kept.len() == self.k {
            self.floor[latent] = kept.iter().map(|e| e.0).fold(f32::INFINITY, f32::min);
        }
    }
}

/// Scan the store and build every latent's statistics and top examples.
/// `progress(rows_done)` is called after each block of rows.
pub fn browse(
    store: &ActivationStore,
    sae: &Sae,
    opts: &BrowseOptions,
    progress: &dyn Fn(u64),
) -> Result<(u64, Vec<Feature>)> {
    let d = store.d_model();
    if d != sae.d_in {
        bail!(
            "the SAE reads {} dimensions but the store {} holds {d}",
            sae.d_in,
            store.dir().display()
        );
    }
    let rows = opts.max_rows.min(store.rows());
    if rows == 0 {
        bail!("{}: no activation rows to scan", store.dir().display());
    }
    const BLOCK: u64 = 4096;
    let f = sae.d_sae;
    let mut top = TopK::new(f, opts.examples);
    let mut fires = vec![0u64; f];
    let mut hist = vec![0u32; f * HIST_BINS];
    let edges = hist_edges();
    let mut sums = vec![0f64; f];
    let mut x = Vec::new();
    let mut start = 0u64;
    while start < rows {
        let n = BLOCK.min(rows - start);
        x.resize(n as usize * d, 0.0);
        store.read_rows(start, &mut x);
        let codes = sae.encode(&x, n as usize);
        for r in 0..n as usize {
            let (lo, hi) = (codes.offsets[r], codes.offsets[r + 1]);
            for (&l, &v) in codes.idx[lo..hi].iter().zip(&codes.val[lo..hi]) {
                if v != 0.0 {
                    let l = l as usize;
                    fires[l] += 1;
                    hist[l * HIST_BINS + hist_bin(&edges, v.abs())] += 1;
                    sums[l] += v as f64;
                    top.offer(l, v, start + r as u64);
                }
            }
        }
        start += n;
        progress(start);
    }

    // Context rows of every example, and which latents each needs the activation of.
    let ctx_len = store.manifest().ctx_len as u64;
    let window = |row: u64| -> Vec<u64> {
        let p = store.position(row);
        let same_window = |j: u64| {
            let q = store.position(j);
            q / ctx_len == p / ctx_len && q + opts.before as u64 >= p && q <= p + opts.after as u64
        };
        let mut w: Vec<u64> = (0..row).rev().take_while(|&j| same_window(j)).collect();
        w.reverse();
        w.push(row);
        w.extend((row + 1..store.rows()).take_while(|&j| same_window(j)));
        w
    };
    let mut needed: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    let mut layout: Vec<Vec<(f32, u64, Vec<u64>)>> = Vec::with_capacity(f);
    for (l, kept) in top.kept.iter_mut().enumerate() {
        kept.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut ex = Vec::with_capacity(kept.len());
        for &(v, row) in kept.iter() {
            let w = window(row);
            for &j in &w {
                needed.entry(j).or_default().push(l as u32);
            }
            ex.push((v, row, w));
        }
        layout.push(ex);
    }
    let acts = activations_at(store, sae, &needed);

    let features = layout
        .into_iter()
        .enumerate()
        .map(|(l, ex)| Feature {
            id: l,
            fires: fires[l],
            hist: hist[l * HIST_BINS..(l + 1) * HIST_BINS].to_vec(),
            mean_active: if fires[l] > 0 {
                sums[l] / fires[l] as f64
            } else {
                0.0
            },
            examples: ex
                .into_iter()
                .map(|(value, row, w)| Example {
                    row,
                    value,
                    focus: w
                        .iter()
                        .position(|&j| j == row)
                        .expect("row is in its window"),
                    tokens: w.iter().map(|&j| store.token(j)).collect(),
                    acts: w.iter().map(|&j| acts[&(j, l as u32)]).collect(),
                })
                .collect(),
            promotes: Vec::new(),
            suppresses: Vec::new(),
        })
        .collect();
    Ok((rows, features))
}

/// The SAE's activation of each needed latent at each needed row, by encoding those rows.
fn activations_at(
    store: &ActivationStore,
    sae: &Sae,
    needed: &BTreeMap<u64, Vec<u32>>,
) -> BTreeMap<(u64, u32), f32> {
    let d = store.d_model();
    let rows: Vec<u64> = needed.keys().copied().collect();
    let mut out = BTreeMap::new();
    let mut x = Vec::new();
    for chunk in rows.chunks(4096) {
        x.resize(chunk.len() * d, 0.0);
        for (i, &j) in chunk.iter().enumerate() {
            store.read_row(j, &mut x[i * d..(i + 1) * d]);
        }
        let codes = sae.encode(&x, chunk.len());
        for (i, &j) in chunk.iter().enumerate() {
            let (lo, hi) = (codes.offsets[i], codes.offsets[i + 1]);
            let idx = &codes.idx[lo..hi];
            for &l in &needed[&j] {
                // Indices within a row are ascending (`Sae::encode`).
                let v = idx.binary_search(&l).map_or(0.0, |p| codes.val[lo + p]);
                out.insert((j, l), v);
            }
        }
    }
    out
}

/// `(token, value)` pairs.
type TokenValues = Vec<(u32, f32)>;

/// The `n` largest and `n` smallest entries of `row` as `(index, value)`, largest first
/// and smallest first (ties: the lower index).
fn extremes(row: &[f32], n: usize) -> (TokenValues, TokenValues) {
    let n = n.min(row.len());
    let v = |i: &u32| row[*i as usize];
    // The first `n` in a strict order (value, then index), found by selection and then
    // sorted: linear in the vocabulary instead of a full sort per latent.
    let first_n = |cmp: &dyn Fn(&u32, &u32) -> std::cmp::Ordering| -> TokenValues {
        if n == 0 {
            return Vec::new();
        }
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        idx.select_nth_unstable_by(n - 1, cmp);
        idx.truncate(n);
        idx.sort_by(cmp);
        idx.into_iter().map(|i| (i, row[i as usize])).collect()
    };
    (
        first_n(&|a, b| v(b).total_cmp(&v(a)).then(a.cmp(b))),
        first_n(&|a, b| v(a).total_cmp(&v(b)).then(a.cmp(b))),
    )
}

/// Fill every feature's `promotes` / `suppresses` with the `n` tokens its decoder
/// direction raises and lowers most.
pub fn add_logit_effects(model: &saelab_lm::Model, sae: &Sae, features: &mut [Feature], n: usize) {
    use rayon::prelude::*;
    const CHUNK: usize = 128;
    let d = sae.d_in;
    for (c, chunk) in features.chunks_mut(CHUNK).enumerate() {
        let first = c * CHUNK;
        let dirs = &sae.w_dec[first * d..(first + chunk.len()) * d];
        let effect = model.logit_effect(dirs, chunk.len());
        let v = effect.len() / chunk.len();
        chunk
            .par_iter_mut()
            .zip(effect.par_chunks_exact(v))
            .for_each(|(f, row)| (f.promotes, f.suppresses) = extremes(row, n));
    }
}

#[derive(Serialize)]
struct BrowserData<'a> {
    sae: String,
    store: String,
    model: &'a str,
    hook: &'a str,
    rows_scanned: u64,
    /// Histogram bin edges (`HIST_BINS + 1` values).
    hist_edges: Vec<f32>,
    /// Token id -> its text, for every token in an example.
    vocab: BTreeMap<u32, String>,
    features: &'a [Feature],
}

/// The browser's page and its data file, inside the output folder.
pub const PAGE_FILE: &str = "browser.html";
pub const DATA_FILE: &str = "features.json";

/// Where an SAE's browser goes unless another folder is named: `SAE/browser`.
pub fn default_dir(sae_dir: &Path) -> PathBuf {
    sae_dir.join("browser")
}

/// Write [`PAGE_FILE`] and [`DATA_FILE`] into `out` (each atomically).
/// `token_text` gives the text of a token id (the model's tokenizer).
pub fn write_browser(
    out: &Path,
    sae_dir: &Path,
    store: &ActivationStore,
    rows_scanned: u64,
    features: &[Feature],
    token_text: &dyn Fn(u32) -> String,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut vocab = BTreeMap::new();
    let logit_tokens = features
        .iter()
        .flat_map(|f| f.promotes.iter().chain(&f.suppresses))
        .map(|(t, _)| t);
    for t in features
        .iter()
        .flat_map(|f| &f.examples)
        .flat_map(|e| &e.tokens)
        .chain(logit_tokens)
    {
        vocab.entry(*t).or_insert_with(|| token_text(*t));
    }
    let m = store.manifest();
    let data = BrowserData {
        sae: sae_dir.display().to_string(),
        store: store.dir().display().to_string(),
        model: &m.model,
        hook: &m.hook,
        rows_scanned,
        hist_edges: hist_edges(),
        vocab,
        features,
    };
    let json = serde_json::to_string(&data)?;
    saelab_core::fsutil::write_atomic(&out.join(DATA_FILE), json.as_bytes())?;
    // Inside <script>, "</" would end the element early: JSON allows "<\/".
    let html = BROWSER_HTML.replace("__DATA__", &json.replace("</", "<\\/"));
    saelab_core::fsutil::write_atomic(&out.join(PAGE_FILE), html.as_bytes())?;
    Ok(())
}

/// Tokens listed per latent as most promoted and most suppressed.
const LOGIT_TOKENS: usize = 8;

/// What [`write_sae_browser`] scanned and found.
pub struct BrowseSummary {
    pub rows_scanned: u64,
    pub latents: usize,
    /// Latents that fire on at least one scanned row.
    pub alive: usize,
}

/// The whole `saelab browse`: load the SAE folder, check it against the store (width,
/// hook) and the tokenizer against the store's tokens, scan, and write `out`.
pub fn write_sae_browser(
    model: &saelab_lm::Model,
    store: &ActivationStore,
    sae_dir: &Path,
    out: &Path,
    opts: &BrowseOptions,
    progress: &dyn Fn(u64),
) -> Result<BrowseSummary> {
    let sae = Sae::load(sae_dir)?;
    let hook = &store.manifest().hook;
    if !sae.metadata.hook_name.is_empty() && &sae.metadata.hook_name != hook {
        bail!(
            "{} was trained at {} but the store {} holds {hook}",
            sae_dir.display(),
            sae.metadata.hook_name,
            store.dir().display()
        );
    }
    let (rows_scanned, mut features) = browse(store, &sae, opts, progress)
        .with_context(|| format!("browsing {}", sae_dir.display()))?;
    let tokenizer = model.tokenizer();
    let vocab = tokenizer.vocab_size() as u32;
    if let Some(t) = features
        .iter()
        .flat_map(|f| &f.examples)
        .flat_map(|e| &e.tokens)
        .find(|&&t| t >= vocab)
    {
        bail!(
            "token id {t} in {} is outside the tokenizer's vocabulary ({vocab} tokens): the store was cached from another model",
            store.dir().display()
        );
    }
    if sae.d_in != model.config().d_model {
        bail!(
            "{} reads {} dimensions but the model's residual stream has {}",
            sae_dir.display(),
            sae.d_in,
            model.config().d_model
        );
    }
    add_logit_effects(model, &sae, &mut features, LOGIT_TOKENS);
    write_browser(out, sae_dir, store, rows_scanned, &features, &|t| {
        tokenizer.token_text(t)
    })?;
    Ok(BrowseSummary {
        rows_scanned,
        latents: features.len(),
        alive: features.iter().filter(|f| f.fires > 0).count(),
    })
}

const BROWSER_HTML: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>saelab feature browser</title>
<style>
body{font-family:sans-serif;margin:0;display:flex;height:100vh}
#list{width:34%;overflow:auto;border-right:1px solid #ccc;font-size:13px}
#main{flex:1;overflow:auto;padding:12px 18px}
table{border-collapse:collapse;width:100%}
td,th{padding:3px 6px;border-bottom:1px solid #eee;text-align:left}
tr.f:hover{background:#eef;cursor:pointer}
.ex{font-family:monospace;white-space:pre-wrap;margin:6px 0;padding:4px;border:1px solid #eee;line-height:1.7}
.tok{border-radius:2px}
.focus{outline:1px solid #c00}
#head{padding:8px;position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc}
small{color:#666}
.hist{display:flex;align-items:flex-end;gap:1px;height:62px;width:400px;border-bottom:1px solid #999;margin-top:6px}
.hist div{flex:1;background:#f80}
</style></head><body>
<div id="list"><div id="head"><b>saelab feature browser</b><br><small id="meta"></small><br>
latent <input id="q" size="6" placeholder="id"> <label><input type="checkbox" id="dead"> show dead</label></div>
<table id="t"><thead><tr><th>latent</th><th>density</th><th>max</th><th>top tokens</th></tr></thead><tbody></tbody></table></div>
<div id="main"><p>Click a latent (or open browser.html#ID). Each example is a token of the activation store with its context; the shade of a
token is this latent's activation on it relative to the latent's largest, the outlined token is the example.</p></div>
<script>
const DATA = __DATA__;
const V = DATA.vocab, N = DATA.rows_scanned;
document.getElementById('meta').textContent =
  `${DATA.model} · ${DATA.hook} · ${N} rows scanned · SAE ${DATA.sae}`;
function tok(t){ return V[t] ?? ('#' + t); }
function fmt(x){ return x >= 100 ? x.toFixed(0) : x.toPrecision(3); }
const order = DATA.features.slice().sort((a, b) => b.fires - a.fires || a.id - b.id);
function row(f){
  const tr = document.createElement('tr'); tr.className = 'f';
  const max = f.examples.length ? f.examples[0].value : 0;
  const top = [...new Set(f.examples.slice(0, 4).map(e => JSON.stringify(tok(e.tokens[e.focus]))))].join(' ');
  for (const c of [f.id, (100 * f.fires / N).toPrecision(3) + '%', f.fires ? fmt(max) : '—', top]) {
    const td = document.createElement('td'); td.textContent = c; tr.appendChild(td);
  }
  tr.onclick = () => { location.hash = f.id; }; return tr;
}
function list(){
  const tb = document.querySelector('#t tbody'); tb.textContent = '';
  const q = document.getElementById('q').value.trim(), dead = document.getElementById('dead').checked;
  for (const f of order) {
    if (q !== '' && String(f.id) !== q) continue;
    if (!dead && f.fires === 0) continue;
    tb.appendChild(row(f));
  }
}
function show(f){
  const m = document.getElementById('main'); m.textContent = '';
  const h = document.createElement('h2'); h.textContent = `latent ${f.id}`; m.appendChild(h);
  const p = document.createElement('p');
  p.textContent = `fires on ${f.fires} of ${N} rows (${(100 * f.fires / N).toPrecision(3)}%), mean activation when firing ${fmt(f.mean_active)}`;
  m.appendChild(p);
  if (f.fires) {
    // Activation histogram: log-spaced bins, bar height relative to the fullest bin.
    const top = Math.max(...f.hist), E = DATA.hist_edges;
    const h = document.createElement('div'); h.className = 'hist';
    f.hist.forEach((c, i) => {
      const b = document.createElement('div');
      b.style.height = (c ? Math.max(1, 60 * c / top) : 0) + 'px';
      b.title = `${fmt(E[i])} to ${fmt(E[i + 1])}: ${c} rows`;
      h.appendChild(b);
    });
    m.appendChild(h);
    const cap = document.createElement('small');
    cap.textContent = `activation histogram, log scale ${fmt(E[0])} to ${fmt(E[E.length - 1])} (hover a bar for its range and count)`;
    m.appendChild(cap);
  }
  for (const [label, list] of [['promotes', f.promotes], ['suppresses', f.suppresses]]) {
    if (!list.length) continue;
    const q = document.createElement('p');
    q.textContent = `${label} (logit effect of its decoder direction): ` +
      list.map(([t, v]) => `${JSON.stringify(tok(t))} ${v >= 0 ? '+' : ''}${fmt(v)}`).join('  ');
    m.appendChild(q);
  }
  const max = f.examples.length ? f.examples[0].value : 1;
  for (const e of f.examples) {
    const div = document.createElement('div'); div.className = 'ex';
    const v = document.createElement('small'); v.textContent = fmt(e.value) + '  '; div.appendChild(v);
    e.tokens.forEach((t, i) => {
      const s = document.createElement('span'); s.className = 'tok' + (i === e.focus ? ' focus' : '');
      s.textContent = tok(t);
      const a = Math.max(0, e.acts[i]) / max;
      if (a > 0) s.style.background = `rgba(255,120,0,${(0.15 + 0.85 * a).toFixed(3)})`;
      s.title = `activation ${fmt(e.acts[i])}`;
      div.appendChild(s);
    });
    m.appendChild(div);
  }
}
document.getElementById('q').oninput = list;
document.getElementById('dead').onchange = list;
// browser.html#ID opens latent ID (links to a latent can be shared).
function fromHash(){ const f = DATA.features[Number(location.hash.slice(1))]; if (location.hash && f) show(f); }
window.onhashchange = fromHash;
list(); fromHash();
</script></body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use saelab_core::rng::Rng;
    use saelab_data::store::{Dtype, Skip, StoreSpec, StoreWriter};
    use saelab_sae::model::{InferenceArch, SaeMetadata};

    /// A store of `n` random rows over a stream whose every 8th position is a skipped
    /// "BOS" (so context windows have gaps), tokens = position % 50.
    fn store(dir: &Path, d: usize, n: usize, rng: &mut Rng) -> ActivationStore {
        let spec = StoreSpec {
            model: "test-model".into(),
            hook: "blocks.0.hook_resid_post".into(),
            d_model: d,
            dtype: Dtype::F32,
            ctx_len: 16,
            shard_rows: 64,
            dropped_token_ids: vec![],
            norm_outlier_factor: None,
            source: serde_json::json!({"dataset": "synthetic"}),
        };
        let mut w = StoreWriter::open(dir, spec).unwrap();
        let mut pos = 0u64;
        let mut kept = 0;
        while kept < n {
            if pos.is_multiple_of(8) {
                w.skip(Skip::Special);
            } else {
                let row: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
                w.push(&row, (pos % 50) as u32).unwrap();
                kept += 1;
            }
            pos += 1;
        }
        w.finish().unwrap();
        ActivationStore::open(dir).unwrap()
    }

    fn sae(arch: InferenceArch, d: usize, f: usize, k: usize, rng: &mut Rng) -> Sae {
        let mut r = |n: usize, s: f32| (0..n).map(|_| rng.normal() * s).collect::<Vec<_>>();
        Sae {
            arch,
            d_in: d,
            d_sae: f,
            k,
            apply_b_dec_to_input: true,
            w_enc: r(d * f, 0.3),
            b_enc: r(f, 0.2),
            w_dec: r(f * d, 0.3),
            b_dec: r(d, 0.1),
            threshold: None,
            b_gate: None,
            r_mag: None,
            b_mag: None,
            metadata: SaeMetadata::default(),
        }
    }

    /// Dense reference: every row's code, per latent all (value, row), sorted.
    fn reference(
        store: &ActivationStore,
        sae: &Sae,
        rows: u64,
        k: usize,
    ) -> Vec<(u64, Vec<(f32, u64)>)> {
        let d = store.d_model();
        let mut x = vec![0.0; rows as usize * d];
        store.read_rows(0, &mut x);
        let codes = sae.encode(&x, rows as usize);
        let mut all: Vec<Vec<(f32, u64)>> = vec![Vec::new(); sae.d_sae];
        for r in 0..rows as usize {
            for p in codes.offsets[r]..codes.offsets[r + 1] {
                if codes.val[p] != 0.0 {
                    all[codes.idx[p] as usize].push((codes.val[p], r as u64));
                }
            }
        }
        all.into_iter()
            .map(|mut v| {
                let fires = v.len() as u64;
                v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                v.truncate(k);
                (fires, v)
            })
            .collect()
    }

    #[test]
    fn histogram_bins_are_log_spaced_and_clamped() {
        // 5 decades in 25 bins: 5 bins per decade.
        let e = hist_edges();
        assert_eq!((e.len(), e[0], e[10], e[HIST_BINS]), (26, 1e-2, 1.0, 1e3));
        let hist_bin = |v| hist_bin(&e, v);
        assert_eq!(hist_bin(1e-2), 0);
        assert_eq!(hist_bin(1e-5), 0);
        assert_eq!(hist_bin(0.99e-1), 4);
        assert_eq!(hist_bin(1.01e-1), 5);
        assert_eq!(hist_bin(1.0001), 10);
        assert_eq!(hist_bin(999.0), 24);
        assert_eq!(hist_bin(1e6), 24);
    }

    #[test]
    fn extremes_are_the_sorted_ends() {
        let mut rng = Rng::new(3);
        let mut row: Vec<f32> = (0..500).map(|_| rng.normal()).collect();
        row[7] = row[9]; // a tie
        let (top, bottom) = extremes(&row, 8);
        let mut sorted: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, v))
            .collect();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        assert_eq!(top, sorted[..8]);
        sorted.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        assert_eq!(bottom, sorted[..8]);
        assert_eq!(extremes(&row[..3], 8).0.len(), 3);
        assert_eq!(extremes(&row, 0), (vec![], vec![]));
    }

    #[test]
    fn top_examples_and_context_match_a_dense_scan() {
        let dir = std::env::temp_dir().join(format!("saelab-browser-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut rng = Rng::new(7);
        let (d, f, n) = (8, 24, 9000);
        let st = store(&dir.join("store"), d, n, &mut rng);
        for arch in [InferenceArch::Topk, InferenceArch::Standard] {
            let s = sae(arch, d, f, 3, &mut rng);
            // More rows than one scan block, fewer than the store: the cap applies.
            let opts = BrowseOptions {
                max_rows: 8500,
                examples: 5,
                before: 4,
                after: 2,
            };
            let (rows, feats) = browse(&st, &s, &opts, &|_| {}).unwrap();
            assert_eq!(rows, 8500);
            let want = reference(&st, &s, rows, opts.examples);
            assert!(
                want.iter().any(|(fires, _)| *fires > 5),
                "some latent fires often"
            );
            for (feat, (fires, top)) in feats.iter().zip(&want) {
                assert_eq!(feat.fires, *fires, "latent {}", feat.id);
                assert_eq!(feat.hist.iter().map(|&c| c as u64).sum::<u64>(), *fires);
                let got: Vec<(f32, u64)> = feat.examples.iter().map(|e| (e.value, e.row)).collect();
                assert_eq!(&got, top, "latent {}", feat.id);
                for e in &feat.examples {
                    // The focus token is the example's; the context is the stream around
                    // it inside one 16-token window, BOS positions absent.
                    let p = st.position(e.row);
                    assert_eq!(e.tokens[e.focus], st.token(e.row));
                    assert_eq!(e.acts[e.focus], e.value);
                    let expect: Vec<u32> = (p.saturating_sub(4)..=p + 2)
                        .filter(|q| q / 16 == p / 16 && q % 8 != 0)
                        .filter(|&q| q < st.position(st.rows() - 1) + 1)
                        .map(|q| (q % 50) as u32)
                        .collect();
                    assert_eq!(e.tokens, expect, "row {} at position {p}", e.row);
                    // A context token's activation is the SAE's on that row.
                    for (i, &a) in e.acts.iter().enumerate() {
                        let j = e.row + i as u64 - e.focus as u64;
                        let mut x = vec![0.0; d];
                        st.read_row(j, &mut x);
                        let c = s.encode(&x, 1);
                        let v = c
                            .idx
                            .iter()
                            .position(|&l| l as usize == feat.id)
                            .map_or(0.0, |q| c.val[q]);
                        assert_eq!(a, v);
                    }
                }
            }
            // Token texts that would end the script element if written raw.
            let text = |t: u32| format!("</script>{t}");
            write_browser(&dir.join("out"), &dir, &st, rows, &feats, &text).unwrap();
            let html = std::fs::read_to_string(dir.join("out/browser.html")).unwrap();
            assert!(!html.contains("__DATA__") && html.contains("\"rows_scanned\":8500"));
            assert_eq!(
                html.matches("</script>").count(),
                1,
                "only the real end tag"
            );
            let json: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join("out/features.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(json["features"].as_array().unwrap().len(), f);
            assert_eq!(json["vocab"]["3"], "</script>3");
        }
        // The SAE must read the store's width.
        let wrong = sae(InferenceArch::Topk, d + 1, f, 3, &mut rng);
        let err = browse(&st, &wrong, &BrowseOptions::default(), &|_| {}).unwrap_err();
        assert!(format!("{err:#}").contains("dimensions"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
