//! The run directory and the results read back from it. The runner writes, the report
//! and `saelab compare` read: every number in a report comes from these files.
//!
//! ```text
//! RUN/saelab-run.json                       format version, plan name, saelab version
//! RUN/plan.toml                             the plan as given
//! RUN/activations/                          the activation store (shared by all variants)
//! RUN/variants/<variant>/seed-<s>/          SAELens folder (cfg.json, sae_weights.safetensors,
//!                                           sparsity.safetensors) + train_config.toml
//! RUN/variants/<variant>/seed-<s>/metrics.jsonl   training metrics, one JSON object per log step
//! RUN/variants/<variant>/seed-<s>/summary.json    steps, tokens, wall time, final metrics
//! RUN/variants/<variant>/seed-<s>/evals/<type>_eval_results.json  SAEBench JSON
//! RUN/results.csv, RUN/results.json         one row per variant x seed
//! ```

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Version of the run-directory layout; a run written by another version is refused.
pub const RUN_FORMAT_VERSION: u64 = 1;

pub fn variant_dir(run: &Path, variant: &str, seed: u64) -> PathBuf {
    run.join("variants")
        .join(sanitize(variant))
        .join(format!("seed-{seed}"))
}

/// Variant names may contain grid brackets and `=`; keep directory names portable.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.=,[]".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Everything recorded for one trained SAE.
#[derive(Clone, Debug)]
pub struct SeedRecord {
    pub variant: String,
    pub seed: u64,
    pub dir: PathBuf,
    /// summary.json (steps, tokens, wall_seconds, final{...}).
    pub summary: Map<String, Value>,
    /// metrics.jsonl rows.
    pub curve: Vec<Map<String, Value>>,
    /// eval name -> SAEBench JSON.
    pub evals: BTreeMap<String, Value>,
}

impl SeedRecord {
    /// The reason an evaluation gave no result, if it says so.
    pub fn eval_no_result(&self, eval: &str) -> Option<String> {
        let v = self
            .evals
            .get(eval)?
            .get("eval_result_unstructured")?
            .get("no_result")?;
        Some(
            v.as_str()
                .map(String::from)
                .unwrap_or_else(|| v.to_string()),
        )
    }

    pub fn num(&self, key: &str) -> Option<f64> {
        self.summary.get(key).and_then(Value::as_f64)
    }

    /// Flat scalar metrics: `train.<k>` from summary.final and
    /// `<eval>.<category>.<metric>` from each eval's `eval_result_metrics`.
    pub fn flat_metrics(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for k in ["steps", "tokens", "wall_seconds"] {
            if let Some(v) = self.num(k) {
                out.insert(k.to_string(), v);
            }
        }
        if let Some(Value::Object(f)) = self.summary.get("final") {
            for (k, v) in f {
                if let Some(x) = v.as_f64() {
                    out.insert(format!("train.{k}"), x);
                }
            }
            // Method metrics come as [name, value] pairs.
            if let Some(Value::Array(extra)) = f.get("extra") {
                for pair in extra {
                    if let (Some(k), Some(x)) = (
                        pair.get(0).and_then(Value::as_str),
                        pair.get(1).and_then(Value::as_f64),
                    ) {
                        out.insert(format!("train.{k}"), x);
                    }
                }
            }
        }
        for (e, json) in &self.evals {
            // An evaluation that could not produce a result (e.g. absorption's probe
            // gate) writes -1 placeholders: they are not measurements.
            if self.eval_no_result(e).is_some() {
                continue;
            }
            if let Some(Value::Object(cats)) = json.get("eval_result_metrics") {
                for (cat, metrics) in cats {
                    if let Value::Object(m) = metrics {
                        for (k, v) in m {
                            if let Some(x) = v.as_f64() {
                                // SAEBench writes NaN as -1; keep it visible as NaN.
                                out.insert(format!("{e}.{cat}.{k}"), x);
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Read `metrics.jsonl`; a torn last line (a run killed mid-write) is skipped.
pub fn read_jsonl(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut rows = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        match serde_json::from_str::<Value>(l) {
            Ok(Value::Object(m)) => rows.push(m),
            _ if i + 1 == lines.len() => {}
            _ => bail!("{} line {}: not a JSON object", path.display(), i + 1),
        }
    }
    Ok(rows)
}

/// Check the run directory's version stamp (absent = new run).
pub fn check_run_format(run: &Path) -> Result<()> {
    let stamp = run.join("saelab-run.json");
    if !stamp.exists() {
        return Ok(());
    }
    let v = read_json(&stamp)?;
    match v.get("format_version").and_then(Value::as_u64) {
        Some(RUN_FORMAT_VERSION) => Ok(()),
        Some(other) => bail!(
            "{} was written by an incompatible saelab (run format {other}, this saelab reads {RUN_FORMAT_VERSION}); use a new run directory",
            run.display()
        ),
        None => bail!("{} has no format_version: not a saelab run directory", stamp.display()),
    }
}

/// Load every seed record under `run/variants`, sorted by variant then seed.
pub fn load_records(run: &Path) -> Result<Vec<SeedRecord>> {
    check_run_format(run)?;
    let root = run.join("variants");
    let mut out = Vec::new();
    let Ok(variants) = std::fs::read_dir(&root) else {
        return Ok(out);
    };
    for v in variants.flatten() {
        let Ok(seeds) = std::fs::read_dir(v.path()) else {
            continue;
        };
        for s in seeds.flatten() {
            let dir = s.path();
            let summary_path = dir.join("summary.json");
            if !summary_path.exists() {
                continue;
            }
            let summary = match read_json(&summary_path)? {
                Value::Object(m) => m,
                _ => bail!("{} is not a JSON object", summary_path.display()),
            };
            let variant = summary
                .get("variant")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let seed = summary.get("seed").and_then(Value::as_u64).unwrap_or(0);
            let curve = read_jsonl(&dir.join("metrics.jsonl"))?;
            let mut evals = BTreeMap::new();
            if let Ok(es) = std::fs::read_dir(dir.join("evals")) {
                for e in es.flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "json") {
                        let json = read_json(&p)?;
                        // Keyed by the SAEBench eval_type_id the file declares.
                        let name = json
                            .get("eval_type_id")
                            .and_then(Value::as_str)
                            .map(String::from)
                            .unwrap_or_else(|| {
                                p.file_stem().unwrap().to_string_lossy().into_owned()
                            });
                        evals.insert(name, json);
                    }
                }
            }
            out.push(SeedRecord {
                variant,
                seed,
                dir,
                summary,
                curve,
                evals,
            });
        }
    }
    out.sort_by(|a, b| (&a.variant, a.seed).cmp(&(&b.variant, b.seed)));
    Ok(out)
}

/// Write results.csv and results.json (one row per variant x seed, every flat metric).
pub fn write_results_table(run: &Path, records: &[SeedRecord]) -> Result<()> {
    let flats: Vec<BTreeMap<String, f64>> = records.iter().map(|r| r.flat_metrics()).collect();
    let mut cols: Vec<String> = flats.iter().flat_map(|f| f.keys().cloned()).collect();
    cols.sort();
    cols.dedup();
    let mut csv = String::from("variant,seed");
    for c in &cols {
        csv.push(',');
        csv.push_str(c);
    }
    csv.push('\n');
    let mut rows = Vec::new();
    for (r, f) in records.iter().zip(&flats) {
        csv.push_str(&format!(
            "\"{}\",{}",
            r.variant.replace('"', "\"\""),
            r.seed
        ));
        let mut obj = Map::new();
        obj.insert("variant".into(), Value::from(r.variant.clone()));
        obj.insert("seed".into(), Value::from(r.seed));
        for c in &cols {
            csv.push(',');
            if let Some(v) = f.get(c) {
                csv.push_str(&format!("{v}"));
                obj.insert(
                    c.clone(),
                    serde_json::Number::from_f64(*v)
                        .map(Value::Number)
                        .unwrap_or(Value::Null),
                );
            }
        }
        csv.push('\n');
        rows.push(Value::Object(obj));
    }
    saelab_core::fsutil::write_atomic(&run.join("results.csv"), csv.as_bytes())?;
    let json = serde_json::to_string_pretty(&Value::Array(rows))?;
    saelab_core::fsutil::write_atomic(&run.join("results.json"), json.as_bytes())?;
    Ok(())
}
