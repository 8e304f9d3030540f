//! Experiment plans: one TOML file names the model, hook, corpus, token budget, the SAE
//! variants (with grids) and the seeds. [`Plan::load`] rejects unknown keys with a
//! suggestion, expands grids into concrete variants and validates everything that can
//! be checked before any compute starts.
//!
//! ```toml
//! name = "quickstart"
//! model = "default"                   # the cached SmolLM2, or a .gguf / safetensors dir
//! hook = "blocks.15.hook_resid_post"
//! corpus = "default"                  # built-in corpus name or a file path
//! train_tokens = 1_000_000
//! seeds = [0, 1, 2]
//! evals = ["core", "absorption", "sparse_probing"]
//! baseline = "topk"
//!
//! [train]                             # shared `saelab train` settings
//! architecture = "topk"
//! d_sae = 4608
//!
//! [[variants]]
//! name = "topk"
//!
//! [[variants]]
//! name = "ortho"
//! train = { method = { kind = "progressive" } }
//! grid = { "method.lambda_max" = [0.1, 0.3] }   # expands into two variants
//! ```

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Evaluations a plan may name.
pub const KNOWN_EVALS: &[&str] = &["core", "absorption", "sparse_probing", "tpp", "scr"];

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub name: String,
    #[serde(default = "default_model")]
    pub model: String,
    pub hook: String,
    #[serde(default = "default_corpus")]
    pub corpus: String,
    /// Tokens each SAE trains on (cached once, shared by every variant and seed).
    pub train_tokens: u64,
    #[serde(default = "default_ctx")]
    pub ctx_len: usize,
    /// How documents fill the rows of the activation cache: "concat" (as SAELens) or
    /// "per-doc" (no concatenation: one document per row, padding not stored).
    #[serde(default = "default_pack")]
    pub pack: String,
    /// LM arithmetic for caching and the evaluations' LM passes: "f32" (exact),
    /// "bf16-weights" (half the weight memory, f32 arithmetic) or "bf16" (bf16 products
    /// with f32 sums, on AMX tiles where the CPU has them; ~2x faster there).
    #[serde(default = "default_lm_precision")]
    pub lm_precision: String,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    #[serde(default = "default_evals")]
    pub evals: Vec<String>,
    /// Variant the others are compared with (default: the first).
    #[serde(default)]
    pub baseline: Option<String>,
    /// Evaluation sizes: "default" (sized for a 2-core CPU), "quick" (half of it, for
    /// the quickstart), "saebench" (SAEBench's standard sizes) or "tiny" (smoke tests);
    /// see [`crate::evalsetup::EVAL_SIZES`].
    #[serde(default = "default_eval_sizes")]
    pub eval_sizes: String,
    /// Dead-fraction above which the report flags a variant.
    #[serde(default = "default_dead_flag")]
    pub flag_dead_fraction: f64,
    /// Feature browser (`saelab browse`) for each variant's first seed: rows of the
    /// activation store it scans; 0 writes none.
    #[serde(default = "default_browser_rows")]
    pub browser_rows: u64,
    /// Shared training settings (keys of `saelab train`'s TOML).
    #[serde(default)]
    pub train: toml::Table,
    pub variants: Vec<VariantSpec>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub name: String,
    /// Overrides merged over the plan's `[train]` table.
    #[serde(default)]
    pub train: toml::Table,
    /// Dotted train keys -> lists of values; the variant expands to their product.
    #[serde(default)]
    pub grid: toml::Table,
}

/// A concrete variant after grid expansion: its name and its full train table.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    pub name: String,
    pub train: toml::Table,
}

fn default_model() -> String {
    "default".into()
}
fn default_corpus() -> String {
    "default".into()
}
fn default_ctx() -> usize {
    128
}
fn default_pack() -> String {
    "concat".into()
}
fn default_lm_precision() -> String {
    "f32".into()
}
fn default_seeds() -> Vec<u64> {
    vec![0, 1, 2]
}
fn default_evals() -> Vec<String> {
    vec!["core".into()]
}
fn default_eval_sizes() -> String {
    "default".into()
}
fn default_dead_flag() -> f64 {
    0.5
}
fn default_browser_rows() -> u64 {
    crate::browser::BrowseOptions::default().max_rows
}

const TOP_KEYS: &[&str] = &[
    "name",
    "model",
    "hook",
    "corpus",
    "train_tokens",
    "ctx_len",
    "pack",
    "lm_precision",
    "seeds",
    "evals",
    "baseline",
    "eval_sizes",
    "flag_dead_fraction",
    "browser_rows",
    "train",
    "variants",
];
const VARIANT_KEYS: &[&str] = &["name", "train", "grid"];

/// Levenshtein distance, for "did you mean" suggestions.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// "unknown key `x`" plus the closest known key when one is near.
pub fn unknown_key_message(key: &str, known: &[&str], where_: &str) -> String {
    let best = known.iter().min_by_key(|k| edit_distance(key, k));
    match best {
        Some(b) if edit_distance(key, b) <= 3 => {
            format!("unknown key `{key}` in {where_} (did you mean `{b}`?)")
        }
        _ => format!(
            "unknown key `{key}` in {where_}; known keys: {}",
            known.join(", ")
        ),
    }
}

impl Plan {
    /// The LM precision the plan names (`lm_precision`), parsed.
    pub fn lm_weights(&self) -> Result<saelab_lm::WeightDtype> {
        self.lm_precision.parse().context("lm_precision")
    }

    /// The parsed `pack` key.
    pub fn pack_mode(&self) -> Result<saelab_data::packing::PackMode> {
        self.pack.parse().context("pack")
    }

    /// Read, check and parse a plan file.
    pub fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read plan {}", path.display()))?;
        Plan::parse(&text).with_context(|| format!("invalid plan {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Plan> {
        let table: toml::Table = toml::from_str(text).context("not valid TOML")?;
        for k in table.keys() {
            if !TOP_KEYS.contains(&k.as_str()) {
                bail!("{}", unknown_key_message(k, TOP_KEYS, "the plan"));
            }
        }
        if let Some(toml::Value::Array(vs)) = table.get("variants") {
            for (i, v) in vs.iter().enumerate() {
                if let Some(t) = v.as_table() {
                    for k in t.keys() {
                        if !VARIANT_KEYS.contains(&k.as_str()) {
                            bail!(
                                "{}",
                                unknown_key_message(
                                    k,
                                    VARIANT_KEYS,
                                    &format!("variant #{}", i + 1)
                                )
                            );
                        }
                    }
                }
            }
        }
        let plan: Plan = table
            .try_into()
            .context("plan fields have the wrong type")?;
        plan.validate()?;
        Ok(plan)
    }

    fn validate(&self) -> Result<()> {
        if self.name.is_empty() || self.name.contains(['/', '\\']) {
            bail!(
                "plan name `{}` must be non-empty and contain no path separators",
                self.name
            );
        }
        if self.train_tokens == 0 {
            bail!("train_tokens is 0: a run that trains zero steps is not an experiment");
        }
        if self.seeds.is_empty() {
            bail!("seeds is empty: give at least one seed");
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.seeds {
            if !seen.insert(s) {
                bail!("seed {s} is listed twice");
            }
        }
        for e in &self.evals {
            if !KNOWN_EVALS.contains(&e.as_str()) {
                let hint = match e.as_str() {
                    "unlearning" => {
                        " (not available: needs gemma-2-2b-it and the WMDP corpus)".to_string()
                    }
                    "autointerp" => " (not available: needs an LLM judge)".to_string(),
                    _ => format!(" ({})", unknown_key_message(e, KNOWN_EVALS, "evals")),
                };
                bail!("unknown evaluation `{e}`{hint}");
            }
        }
        if !crate::evalsetup::EVAL_SIZES.contains(&self.eval_sizes.as_str()) {
            bail!(
                "eval_sizes must be one of {}, not `{}`",
                crate::evalsetup::EVAL_SIZES.join(", "),
                self.eval_sizes
            );
        }
        self.lm_weights()?;
        self.pack_mode()?;
        if self.variants.is_empty() {
            bail!("the plan has no [[variants]]");
        }
        let variants = self.expand()?;
        let mut names = std::collections::BTreeSet::new();
        for v in &variants {
            if !names.insert(v.name.clone()) {
                bail!("two variants are named `{}`", v.name);
            }
        }
        if let Some(b) = &self.baseline {
            if !variants.iter().any(|v| &v.name == b) {
                bail!(
                    "baseline `{b}` is not one of the variants ({})",
                    variants
                        .iter()
                        .map(|v| v.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        Ok(())
    }

    /// The baseline variant's name.
    pub fn baseline_name(&self) -> Result<String> {
        match &self.baseline {
            Some(b) => Ok(b.clone()),
            None => Ok(self.expand()?[0].name.clone()),
        }
    }

    /// Expand grids: every variant's train table = plan.train <- variant.train <- grid point.
    pub fn expand(&self) -> Result<Vec<Variant>> {
        let mut out = Vec::new();
        for spec in &self.variants {
            if spec.name.is_empty() || spec.name.contains(['/', '\\', ' ']) {
                bail!(
                    "variant name `{}` must be non-empty, without spaces or path separators",
                    spec.name
                );
            }
            let mut base = self.train.clone();
            merge(&mut base, &spec.train);
            let mut points: Vec<(String, toml::Table)> = vec![(spec.name.clone(), base)];
            for (key, values) in &spec.grid {
                let toml::Value::Array(values) = values else {
                    bail!(
                        "grid key `{key}` of variant `{}` must map to a list of values",
                        spec.name
                    );
                };
                if values.is_empty() {
                    bail!("grid key `{key}` of variant `{}` has no values", spec.name);
                }
                let mut next = Vec::new();
                for (name, table) in &points {
                    for v in values {
                        let mut t = table.clone();
                        set_dotted(&mut t, key, v.clone())?;
                        next.push((format!("{name}[{key}={}]", short_value(v)), t));
                    }
                }
                points = next;
            }
            out.extend(
                points
                    .into_iter()
                    .map(|(name, train)| Variant { name, train }),
            );
        }
        Ok(out)
    }
}

fn short_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Deep-merge `over` into `base` (tables merge recursively; other values replace).
pub fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Set `a.b.c = value`, creating intermediate tables.
pub fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut t = table;
    for p in &parts[..parts.len() - 1] {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = match entry {
            toml::Value::Table(x) => x,
            _ => bail!("grid key `{key}`: `{p}` is not a table"),
        };
    }
    t.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = r#"
name = "t"
hook = "blocks.3.hook_resid_post"
train_tokens = 10000
seeds = [1, 2]
evals = ["core"]
[train]
d_sae = 64
k = 4
[[variants]]
name = "topk"
[[variants]]
name = "ortho"
train = { method = { kind = "progressive", lambda_max = 0.1 } }
grid = { "method.lambda_max" = [0.1, 0.3] }
"#;

    #[test]
    fn parses_and_expands_grids() {
        let p = Plan::parse(PLAN).unwrap();
        let v = p.expand().unwrap();
        let names: Vec<_> = v.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "topk",
                "ortho[method.lambda_max=0.1]",
                "ortho[method.lambda_max=0.3]"
            ]
        );
        let m = v[2].train["method"].as_table().unwrap();
        assert_eq!(m["lambda_max"].as_float(), Some(0.3));
        assert_eq!(m["kind"].as_str(), Some("progressive"));
        assert_eq!(v[2].train["d_sae"].as_integer(), Some(64));
        assert_eq!(p.baseline_name().unwrap(), "topk");
    }

    #[test]
    fn unknown_keys_get_suggestions() {
        let e = Plan::parse(&PLAN.replace("train_tokens", "train_tokns")).unwrap_err();
        assert!(
            format!("{e:#}").contains("did you mean `train_tokens`"),
            "{e:#}"
        );
        let e = Plan::parse(&PLAN.replace("grid =", "gird =")).unwrap_err();
        assert!(format!("{e:#}").contains("did you mean `grid`"), "{e:#}");
    }

    #[test]
    fn bad_plans_fail_before_compute() {
        for (from, to, msg) in [
            ("train_tokens = 10000", "train_tokens = 0", "zero steps"),
            ("evals = [\"core\"]", "evals = [\"unlearning\"]", "WMDP"),
            (
                "evals = [\"core\"]",
                "evals = [\"cor\"]",
                "did you mean `core`",
            ),
            ("seeds = [1, 2]", "seeds = [1, 1]", "twice"),
            (
                "seeds = [1, 2]",
                "seeds = [1, 2]\nlm_precision = \"fp8\"",
                "unknown LM precision \"fp8\"",
            ),
            (
                "seeds = [1, 2]",
                "seeds = [1, 2]\npack = \"per-document\"",
                "unknown packing \"per-document\"",
            ),
        ] {
            let e = Plan::parse(&PLAN.replacen(from, to, 1)).unwrap_err();
            assert!(format!("{e:#}").contains(msg), "{from} -> {e:#}");
        }
        let dup = PLAN
            .replacen("name = \"topk\"", "name = \"ortho\"", 1)
            .replace("grid = { \"method.lambda_max\" = [0.1, 0.3] }", "");
        let e = Plan::parse(&dup).unwrap_err();
        assert!(
            format!("{e:#}").contains("two variants are named `ortho`"),
            "{e:#}"
        );
    }
}

#[cfg(test)]
mod shipped_plans {
    use super::*;

    #[test]
    fn shipped_plans_parse_and_expand() {
        for (name, text, seeds) in [
            (
                "quickstart",
                include_str!("../../../plans/quickstart.toml"),
                3,
            ),
            ("research", include_str!("../../../plans/research.toml"), 3),
            (
                "research-300k",
                include_str!("../../../plans/research-300k.toml"),
                3,
            ),
        ] {
            let p = Plan::parse(text).unwrap_or_else(|e| panic!("plans/{name}.toml: {e:#}"));
            assert_eq!(p.name, name);
            assert!(p.expand().unwrap().len() >= 3);
            assert_eq!(p.seeds.len(), seeds);
        }
    }
}
