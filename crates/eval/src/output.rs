//! SAEBench-schema result files.
//!
//! One JSON object per evaluation with the top-level keys in SAEBench's order
//! (`eval_type_id, eval_config, eval_id, datetime_epoch_millis, eval_result_metrics,
//! eval_result_details, sae_bench_commit_hash, sae_lens_id, sae_lens_release_id,
//! sae_lens_version, sae_cfg_dict, eval_result_unstructured`). Key order matters to
//! readers that diff files, so values are built as an ordered [`J`] tree rather than a
//! hash map. Every non-finite number is written as -1 (SAEBench's convention).

use anyhow::Result;
use saelab_core::rng::Rng;
use saelab_sae::model::{InferenceArch, Sae};
use std::fmt::Write as _;
use std::path::Path;

/// An ordered JSON value.
#[derive(Clone, Debug, PartialEq)]
pub enum J {
    Null,
    Bool(bool),
    Num(f64),
    Int(i64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    pub fn obj(pairs: Vec<(&str, J)>) -> J {
        J::Obj(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }
    pub fn str(s: impl Into<String>) -> J {
        J::Str(s.into())
    }
    pub fn nums(v: &[f64]) -> J {
        J::Arr(v.iter().map(|x| J::Num(*x)).collect())
    }
    /// Look a key up in an object.
    pub fn get(&self, key: &str) -> Option<&J> {
        match self {
            J::Obj(p) => p.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn write(&self, out: &mut String, indent: usize, level: usize) {
        let pad = |out: &mut String, l: usize| {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', indent * l));
        };
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Int(i) => {
                let _ = write!(out, "{i}");
            }
            J::Num(x) => {
                if x.is_finite() {
                    // serde_json prints the shortest round-tripping form.
                    out.push_str(
                        &serde_json::Number::from_f64(*x)
                            .map(|n| n.to_string())
                            .unwrap_or("-1".into()),
                    );
                } else {
                    out.push_str("-1");
                }
            }
            J::Str(s) => out.push_str(&serde_json::to_string(s).expect("string serialisation")),
            J::Arr(v) => {
                if v.is_empty() {
                    out.push_str("[]");
                    return;
                }
                // Numeric arrays stay on one line (per-latent lists can be long).
                let flat = v
                    .iter()
                    .all(|e| matches!(e, J::Num(_) | J::Int(_) | J::Null | J::Bool(_)));
                out.push('[');
                for (i, e) in v.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        if flat {
                            out.push(' ');
                        }
                    }
                    if !flat {
                        pad(out, level + 1);
                    }
                    e.write(out, indent, level + 1);
                }
                if !flat {
                    pad(out, level);
                }
                out.push(']');
            }
            J::Obj(p) => {
                if p.is_empty() {
                    out.push_str("{}");
                    return;
                }
                out.push('{');
                for (i, (k, v)) in p.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    pad(out, level + 1);
                    out.push_str(&serde_json::to_string(k).expect("string serialisation"));
                    out.push_str(": ");
                    v.write(out, indent, level + 1);
                }
                pad(out, level);
                out.push('}');
            }
        }
    }

    pub fn to_pretty(&self) -> String {
        let mut s = String::new();
        self.write(&mut s, 2, 0);
        s.push('\n');
        s
    }
}

/// A random (version 4) UUID drawn from `rng`.
pub fn uuid4(rng: &mut Rng) -> String {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    b[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Metrics of one evaluation: ordered categories of flat named numbers.
pub type Metrics = Vec<(String, Vec<(String, f64)>)>;

/// Everything that goes into one result file.
#[derive(Clone, Debug)]
pub struct EvalResult {
    pub eval_type_id: String,
    pub eval_config: J,
    pub metrics: Metrics,
    pub details: Vec<J>,
    pub unstructured: J,
}

impl EvalResult {
    pub fn metric(&self, category: &str, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|(c, _)| c == category)
            .and_then(|(_, m)| m.iter().find(|(k, _)| k == name))
            .map(|(_, v)| *v)
    }
}

/// SAELens-style configuration dictionary of an SAE.
pub fn sae_cfg_dict(sae: &Sae) -> J {
    let arch = match sae.arch {
        InferenceArch::Standard => "standard",
        InferenceArch::Topk => "topk",
        InferenceArch::Jumprelu => "jumprelu",
        InferenceArch::Gated => "gated",
    };
    let mut p: Vec<(&str, J)> = vec![
        ("architecture", J::str(arch)),
        ("d_in", J::Int(sae.d_in as i64)),
        ("d_sae", J::Int(sae.d_sae as i64)),
        ("dtype", J::str("float32")),
        ("device", J::str("cpu")),
        ("apply_b_dec_to_input", J::Bool(sae.apply_b_dec_to_input)),
        ("normalize_activations", J::str("none")),
    ];
    if sae.arch == InferenceArch::Topk {
        p.push(("k", J::Int(sae.k as i64)));
    }
    p.push((
        "metadata",
        J::obj(vec![
            ("model_name", J::str(&sae.metadata.model_name)),
            ("hook_name", J::str(&sae.metadata.hook_name)),
            ("context_size", J::Int(sae.metadata.context_size as i64)),
            ("prepend_bos", J::Bool(sae.metadata.prepend_bos)),
            ("dataset_path", J::str(&sae.metadata.dataset_path)),
        ]),
    ));
    J::obj(p)
}

/// Identity of the evaluated SAE written into every result file.
#[derive(Clone, Debug, Default)]
pub struct SaeIdentity {
    pub sae_lens_id: String,
    pub sae_lens_release_id: String,
}

/// The full SAEBench-schema object of a result.
pub fn result_json(r: &EvalResult, sae: &Sae, id: &SaeIdentity, eval_id: &str, millis: i64) -> J {
    let metrics = J::Obj(
        r.metrics
            .iter()
            .map(|(cat, m)| {
                (
                    cat.clone(),
                    J::Obj(m.iter().map(|(k, v)| (k.clone(), J::Num(*v))).collect()),
                )
            })
            .collect(),
    );
    J::obj(vec![
        ("eval_type_id", J::str(&r.eval_type_id)),
        ("eval_config", r.eval_config.clone()),
        ("eval_id", J::str(eval_id)),
        ("datetime_epoch_millis", J::Int(millis)),
        ("eval_result_metrics", metrics),
        ("eval_result_details", J::Arr(r.details.clone())),
        (
            "sae_bench_commit_hash",
            J::str("saelab (SAEBench 0.6.0 definitions, reimplemented)"),
        ),
        ("sae_lens_id", J::str(&id.sae_lens_id)),
        ("sae_lens_release_id", J::str(&id.sae_lens_release_id)),
        ("sae_lens_version", J::str("6.18 (file format)")),
        ("sae_cfg_dict", sae_cfg_dict(sae)),
        ("eval_result_unstructured", r.unstructured.clone()),
    ])
}

/// Write a result file atomically.
pub fn write_result(path: &Path, json: &J) -> Result<()> {
    saelab_core::fsutil::write_atomic(path, json.to_pretty().as_bytes())
}

/// A compact text table of every metric of every result.
pub fn summary_table(results: &[EvalResult]) -> String {
    let mut rows: Vec<(String, String, String)> = Vec::new();
    for r in results {
        for (cat, m) in &r.metrics {
            for (k, v) in m {
                let val = if v.is_finite() {
                    format!("{v:.4}")
                } else {
                    "n/a".into()
                };
                rows.push((format!("{}/{}", r.eval_type_id, cat), k.clone(), val));
            }
        }
    }
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(4);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(6);
    let mut s = format!("{:<w0$}  {:<w1$}  value\n", "eval", "metric");
    for (a, b, c) in rows {
        let _ = writeln!(s, "{a:<w0$}  {b:<w1$}  {c}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_ordered_valid_and_nan_is_minus_one() {
        let j = J::obj(vec![
            ("z", J::Num(f64::NAN)),
            ("a", J::nums(&[1.5, f64::INFINITY])),
            ("s", J::str("q\"x")),
            ("o", J::obj(vec![("k", J::Int(3)), ("e", J::Arr(vec![]))])),
        ]);
        let text = j.to_pretty();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["z"], serde_json::json!(-1));
        assert_eq!(v["a"], serde_json::json!([1.5, -1]));
        assert_eq!(v["s"], "q\"x");
        assert_eq!(v["o"]["k"], 3);
        let pos: Vec<usize> = ["\"z\"", "\"a\"", "\"s\"", "\"o\""]
            .iter()
            .map(|k| text.find(k).unwrap())
            .collect();
        assert!(
            pos.windows(2).all(|w| w[0] < w[1]),
            "keys out of order: {text}"
        );
    }

    #[test]
    fn uuid_has_version_and_variant() {
        let mut r = Rng::new(1);
        let u = uuid4(&mut r);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!("89ab".contains(&u[19..20]));
        assert_ne!(u, uuid4(&mut r));
        assert_eq!(uuid4(&mut Rng::new(1)), u);
    }
}
