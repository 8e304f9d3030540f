//! Files: the SAELens SAE folder (`cfg.json`, `sae_weights.safetensors`,
//! `sparsity.safetensors`), sparsify's `cfg.json` + `sae.safetensors`, and the trainer's
//! checkpoints (parameters, Adam moments, counters, RNG and hook state in one
//! safetensors file whose metadata holds the scalars and the resolved config).
//! Every file is written atomically; every load checks names, shapes and dtypes and says
//! which file and tensor is wrong.

use crate::model::{InferenceArch, Sae, SaeMetadata};
use anyhow::{anyhow, bail, Context, Result};
use saelab_core::fsutil::write_atomic;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::{SafeTensors, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

pub const CFG_FILE: &str = "cfg.json";
pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";
pub const SPARSITY_FILE: &str = "sparsity.safetensors";

/// A borrowed little-endian tensor for serialisation.
pub(crate) struct Raw<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

impl View for Raw<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

pub(crate) fn f32_bytes(v: &[f32]) -> &[u8] {
    // Safety: f32 has no padding and any byte pattern is a valid u8; the machines we
    // target are little-endian, as the safetensors format requires.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

pub(crate) fn u64_bytes(v: &[u64]) -> &[u8] {
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

pub(crate) fn raw_f32(v: &[f32], shape: Vec<usize>) -> Raw<'_> {
    Raw {
        dtype: Dtype::F32,
        shape,
        bytes: f32_bytes(v),
    }
}

/// Convert a stored tensor to f32 (F32, F16, BF16, F64 accepted).
pub(crate) fn to_f32(t: &TensorView, file: &Path, name: &str) -> Result<Vec<f32>> {
    let b = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => bail!(
            "{}: tensor '{name}' has unsupported dtype {other:?}",
            file.display()
        ),
    })
}

/// Fetch a tensor, checking its shape.
pub(crate) fn get(st: &SafeTensors, file: &Path, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = st.tensor(name).map_err(|_| {
        let mut have = st
            .names()
            .into_iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>();
        have.sort();
        anyhow!(
            "{}: missing tensor '{name}' (found: {})",
            file.display(),
            have.join(", ")
        )
    })?;
    if t.shape() != shape {
        bail!(
            "{}: tensor '{name}' has shape {:?}, expected {:?}",
            file.display(),
            t.shape(),
            shape
        );
    }
    to_f32(&t, file, name)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn arch_name(a: InferenceArch) -> &'static str {
    match a {
        InferenceArch::Standard => "standard",
        InferenceArch::Topk => "topk",
        InferenceArch::Jumprelu => "jumprelu",
        InferenceArch::Gated => "gated",
    }
}

/// The SAELens cfg.json format version saelab writes (the v6 layout it follows).
pub const SAELENS_FORMAT_VERSION: &str = "6.18.0";

impl Sae {
    /// The SAELens `cfg.json` of this SAE (weights take raw activations, so
    /// `normalize_activations` is "none").
    pub fn cfg_json(&self) -> serde_json::Value {
        let m = &self.metadata;
        let mut cfg = serde_json::json!({
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "architecture": arch_name(self.arch),
            "metadata": {
                "model_name": m.model_name,
                "hook_name": m.hook_name,
                "hook_head_index": null,
                "context_size": m.context_size,
                "prepend_bos": m.prepend_bos,
                "dataset_path": m.dataset_path,
                "saelab_version": env!("CARGO_PKG_VERSION"),
                // SAELens >= 6 reads `metadata` only when it names the format version;
                // without it, it takes the folder for a pre-6 config and drops the hook
                // and model names (bench/saelens_compat.py showed this).
                "sae_lens_version": SAELENS_FORMAT_VERSION,
            },
        });
        if self.arch == InferenceArch::Topk {
            cfg["k"] = self.k.into();
            cfg["rescale_acts_by_decoder_norm"] = false.into();
        }
        cfg
    }

    /// Check internal consistency (lengths of every tensor).
    pub fn validate(&self) -> Result<()> {
        let (d, f) = (self.d_in, self.d_sae);
        if d == 0 || f == 0 {
            bail!("SAE has d_in = {d}, d_sae = {f}; both must be >= 1");
        }
        let chk = |n: &str, len: usize, want: usize| -> Result<()> {
            if len != want {
                bail!("SAE tensor {n} has {len} values, expected {want}");
            }
            Ok(())
        };
        chk("W_enc", self.w_enc.len(), d * f)?;
        chk("W_dec", self.w_dec.len(), d * f)?;
        chk("b_enc", self.b_enc.len(), f)?;
        chk("b_dec", self.b_dec.len(), d)?;
        match self.arch {
            InferenceArch::Topk if self.k == 0 || self.k > f => {
                bail!("TopK SAE with k = {} and d_sae = {f}", self.k)
            }
            InferenceArch::Jumprelu => chk(
                "threshold",
                self.threshold.as_ref().map_or(0, |t| t.len()),
                f,
            )?,
            InferenceArch::Gated => {
                chk("b_gate", self.b_gate.as_ref().map_or(0, |t| t.len()), f)?;
                chk("r_mag", self.r_mag.as_ref().map_or(0, |t| t.len()), f)?;
                chk("b_mag", self.b_mag.as_ref().map_or(0, |t| t.len()), f)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Write the SAELens folder (`cfg.json`, `sae_weights.safetensors`, and
    /// `sparsity.safetensors` when `log10_sparsity` is given), each file atomically.
    pub fn save_with_sparsity(&self, dir: &Path, log10_sparsity: Option<&[f32]>) -> Result<()> {
        self.validate()?;
        let (d, f) = (self.d_in, self.d_sae);
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut ts: Vec<(String, Raw)> = vec![
            ("W_enc".into(), raw_f32(&self.w_enc, vec![d, f])),
            ("W_dec".into(), raw_f32(&self.w_dec, vec![f, d])),
            ("b_dec".into(), raw_f32(&self.b_dec, vec![d])),
        ];
        match self.arch {
            InferenceArch::Gated => {
                ts.push((
                    "b_gate".into(),
                    raw_f32(self.b_gate.as_ref().unwrap(), vec![f]),
                ));
                ts.push((
                    "r_mag".into(),
                    raw_f32(self.r_mag.as_ref().unwrap(), vec![f]),
                ));
                ts.push((
                    "b_mag".into(),
                    raw_f32(self.b_mag.as_ref().unwrap(), vec![f]),
                ));
            }
            _ => ts.push(("b_enc".into(), raw_f32(&self.b_enc, vec![f]))),
        }
        if self.arch == InferenceArch::Jumprelu {
            ts.push((
                "threshold".into(),
                raw_f32(self.threshold.as_ref().unwrap(), vec![f]),
            ));
        }
        let bytes = safetensors::serialize(ts, None)?;
        write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
        if let Some(s) = log10_sparsity {
            if s.len() != f {
                bail!("sparsity has {} values, expected d_sae = {f}", s.len());
            }
            let bytes = safetensors::serialize([("sparsity", raw_f32(s, vec![f]))], None)?;
            write_atomic(&dir.join(SPARSITY_FILE), &bytes)?;
        }
        write_atomic(
            &dir.join(CFG_FILE),
            serde_json::to_string_pretty(&self.cfg_json())?.as_bytes(),
        )?;
        Ok(())
    }

    /// Write the SAELens folder without a sparsity file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_with_sparsity(dir, None)
    }

    /// Load a SAELens folder (also accepts sparsify's layout: `sae.safetensors` with
    /// `encoder.weight`; see [`Sae::load_sparsify`]).
    pub fn load(dir: &Path) -> Result<Sae> {
        if !dir.join(WEIGHTS_FILE).exists() && dir.join("sae.safetensors").exists() {
            return Sae::load_sparsify(dir);
        }
        let cfg_path = dir.join(CFG_FILE);
        let cfg: serde_json::Value = serde_json::from_slice(&read(&cfg_path)?)
            .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
        let num = |k: &str| -> Result<usize> {
            cfg.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| {
                    anyhow!("{}: missing or non-integer field '{k}'", cfg_path.display())
                })
        };
        let d = num("d_in")?;
        let f = num("d_sae")?;
        if d == 0 || f == 0 {
            bail!(
                "{}: d_in = {d} and d_sae = {f} must be >= 1",
                cfg_path.display()
            );
        }
        let arch = match cfg
            .get("architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("standard")
        {
            "standard" => InferenceArch::Standard,
            "topk" => InferenceArch::Topk,
            "jumprelu" => InferenceArch::Jumprelu,
            "gated" => InferenceArch::Gated,
            other => bail!("{}: unsupported architecture '{other}'", cfg_path.display()),
        };
        match cfg.get("normalize_activations").and_then(|v| v.as_str()).unwrap_or("none") {
            "none" => {}
            "expected_average_only_in" => tracing::warn!(
                "{}: normalize_activations = expected_average_only_in; assuming the scale is folded into the weights",
                cfg_path.display()
            ),
            other => bail!(
                "{}: normalize_activations = '{other}' needs per-token normalisation, which saelab's SAE does not apply",
                cfg_path.display()
            ),
        }
        if cfg
            .get("rescale_acts_by_decoder_norm")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
        {
            bail!(
                "{}: rescale_acts_by_decoder_norm = true is not supported (fold the norms first)",
                cfg_path.display()
            );
        }
        let k = if arch == InferenceArch::Topk {
            let k = num("k")?;
            if k == 0 || k > f {
                bail!("{}: k = {k} must be in 1..=d_sae ({f})", cfg_path.display());
            }
            k
        } else {
            0
        };
        let apply = cfg
            .get("apply_b_dec_to_input")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let metadata: SaeMetadata = cfg
            .get("metadata")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .unwrap_or(None)
            .unwrap_or_default();
        let wpath = dir.join(WEIGHTS_FILE);
        let bytes = read(&wpath)?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: not a safetensors file", wpath.display()))?;
        let gated = arch == InferenceArch::Gated;
        let sae = Sae {
            arch,
            d_in: d,
            d_sae: f,
            k,
            apply_b_dec_to_input: apply,
            w_enc: get(&st, &wpath, "W_enc", &[d, f])?,
            b_enc: if gated {
                vec![0.0; f]
            } else {
                get(&st, &wpath, "b_enc", &[f])?
            },
            w_dec: get(&st, &wpath, "W_dec", &[f, d])?,
            b_dec: get(&st, &wpath, "b_dec", &[d])?,
            threshold: if arch == InferenceArch::Jumprelu {
                Some(get(&st, &wpath, "threshold", &[f])?)
            } else {
                None
            },
            b_gate: if gated {
                Some(get(&st, &wpath, "b_gate", &[f])?)
            } else {
                None
            },
            r_mag: if gated {
                Some(get(&st, &wpath, "r_mag", &[f])?)
            } else {
                None
            },
            b_mag: if gated {
                Some(get(&st, &wpath, "b_mag", &[f])?)
            } else {
                None
            },
            metadata,
        };
        for (n, v) in [
            ("W_enc", &sae.w_enc),
            ("W_dec", &sae.w_dec),
            ("b_dec", &sae.b_dec),
        ] {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                bail!(
                    "{}: tensor '{n}' has a non-finite value at flat index {i}",
                    wpath.display()
                );
            }
        }
        Ok(sae)
    }

    /// Load the `sparsity` tensor (log10 firing frequency) of a SAELens folder, if present.
    pub fn load_sparsity(dir: &Path, d_sae: usize) -> Result<Option<Vec<f32>>> {
        let p = dir.join(SPARSITY_FILE);
        if !p.exists() {
            return Ok(None);
        }
        let bytes = read(&p)?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: not a safetensors file", p.display()))?;
        Ok(Some(get(&st, &p, "sparsity", &[d_sae])?))
    }

    /// Load an EleutherAI sparsify SAE: `cfg.json` (`k`, `d_in`, optional
    /// `skip_connection`) and `sae.safetensors` (`encoder.weight` [F, d], `encoder.bias`,
    /// `W_dec` [F, d], `b_dec`). sparsify subtracts `b_dec` before encoding and keeps the
    /// top k of ReLU(pre): a TopK SAE.
    pub fn load_sparsify(dir: &Path) -> Result<Sae> {
        let cfg_path = dir.join(CFG_FILE);
        let cfg: serde_json::Value = serde_json::from_slice(&read(&cfg_path)?)
            .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
        if cfg
            .get("skip_connection")
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
        {
            bail!(
                "{}: sparsify SAEs with a skip connection are not supported",
                cfg_path.display()
            );
        }
        let k = cfg
            .get("k")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| anyhow!("{}: missing integer field 'k'", cfg_path.display()))?
            as usize;
        let wpath = dir.join("sae.safetensors");
        let bytes = read(&wpath)?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: not a safetensors file", wpath.display()))?;
        let enc = st
            .tensor("encoder.weight")
            .map_err(|_| anyhow!("{}: missing tensor 'encoder.weight'", wpath.display()))?;
        if enc.shape().len() != 2 {
            bail!(
                "{}: 'encoder.weight' must be 2-D, has shape {:?}",
                wpath.display(),
                enc.shape()
            );
        }
        let (f, d) = (enc.shape()[0], enc.shape()[1]);
        if let Some(cd) = cfg.get("d_in").and_then(|v| v.as_u64()) {
            if cd as usize != d {
                bail!(
                    "{}: d_in = {cd} but encoder.weight has {d} columns",
                    cfg_path.display()
                );
            }
        }
        if k == 0 || k > f {
            bail!("{}: k = {k} must be in 1..={f}", cfg_path.display());
        }
        let w_lat = to_f32(&enc, &wpath, "encoder.weight")?;
        let mut w_enc = vec![0f32; d * f];
        for l in 0..f {
            for j in 0..d {
                w_enc[j * f + l] = w_lat[l * d + j];
            }
        }
        Ok(Sae {
            arch: InferenceArch::Topk,
            d_in: d,
            d_sae: f,
            k,
            apply_b_dec_to_input: true,
            w_enc,
            b_enc: get(&st, &wpath, "encoder.bias", &[f])?,
            w_dec: get(&st, &wpath, "W_dec", &[f, d])?,
            b_dec: get(&st, &wpath, "b_dec", &[d])?,
            threshold: None,
            b_gate: None,
            r_mag: None,
            b_mag: None,
            metadata: SaeMetadata::default(),
        })
    }
}

/// Metadata map of a safetensors buffer.
pub(crate) fn metadata_of(bytes: &[u8], file: &Path) -> Result<HashMap<String, String>> {
    let (_, md) = SafeTensors::read_metadata(bytes)
        .with_context(|| format!("{}: not a safetensors file", file.display()))?;
    Ok(md.metadata().clone().unwrap_or_default())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use saelab_core::rng::Rng;

    pub(crate) fn random_sae(arch: InferenceArch, d: usize, f: usize, seed: u64) -> Sae {
        let mut r = Rng::new(seed);
        let mut v = |n: usize, s: f32| {
            let mut x = vec![0f32; n];
            r.fill_normal(&mut x, s);
            x
        };
        let gated = arch == InferenceArch::Gated;
        Sae {
            arch,
            d_in: d,
            d_sae: f,
            k: if arch == InferenceArch::Topk { 3 } else { 0 },
            apply_b_dec_to_input: true,
            w_enc: v(d * f, 1.0),
            b_enc: v(f, 0.1),
            w_dec: v(f * d, 1.0),
            b_dec: v(d, 0.1),
            threshold: if arch == InferenceArch::Jumprelu {
                Some(v(f, 0.1).iter().map(|x| x.abs()).collect())
            } else {
                None
            },
            b_gate: if gated { Some(v(f, 0.1)) } else { None },
            r_mag: if gated { Some(v(f, 0.1)) } else { None },
            b_mag: if gated { Some(v(f, 0.1)) } else { None },
            metadata: SaeMetadata {
                model_name: "m".into(),
                hook_name: "blocks.1.hook_resid_post".into(),
                ..Default::default()
            },
        }
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("saelab-sae-io-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn saelens_roundtrip_every_architecture() {
        for (i, arch) in InferenceArch::ALL.into_iter().enumerate() {
            let sae = random_sae(arch, 6, 10, i as u64);
            let dir = tmp(&format!("rt{i}"));
            let sp: Vec<f32> = (0..10).map(|v| -(v as f32)).collect();
            sae.save_with_sparsity(&dir, Some(&sp)).unwrap();
            let back = Sae::load(&dir).unwrap();
            if arch == InferenceArch::Gated {
                // b_enc is not stored for gated SAEs.
                assert_eq!(back.b_gate, sae.b_gate);
            }
            let mut want = sae.clone();
            if arch == InferenceArch::Gated {
                want.b_enc = vec![0.0; 10];
            }
            assert_eq!(back, want);
            assert_eq!(Sae::load_sparsity(&dir, 10).unwrap().unwrap(), sp);
            let mut r = Rng::new(3);
            let mut x = vec![0f32; 4 * 6];
            r.fill_normal(&mut x, 1.0);
            assert_eq!(back.forward(&x, 4), want.forward(&x, 4));
            // cfg.json fields and tensor shapes as SAELens documents them.
            let cfg: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join(CFG_FILE)).unwrap()).unwrap();
            for key in [
                "d_in",
                "d_sae",
                "dtype",
                "device",
                "apply_b_dec_to_input",
                "normalize_activations",
                "reshape_activations",
                "architecture",
                "metadata",
            ] {
                assert!(cfg.get(key).is_some(), "cfg.json lacks {key}");
            }
            assert_eq!(cfg["d_in"], 6);
            assert_eq!(cfg["dtype"], "float32");
            assert_eq!(cfg["metadata"]["hook_name"], "blocks.1.hook_resid_post");
            assert_eq!(cfg["metadata"]["sae_lens_version"], SAELENS_FORMAT_VERSION);
            assert_eq!(cfg.get("k").is_some(), arch == InferenceArch::Topk);
            let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(st.tensor("W_enc").unwrap().shape(), &[6, 10]);
            assert_eq!(st.tensor("W_dec").unwrap().shape(), &[10, 6]);
            assert_eq!(st.tensor("b_dec").unwrap().shape(), &[6]);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn bad_folders_give_clear_errors() {
        let sae = random_sae(InferenceArch::Jumprelu, 4, 5, 1);
        let dir = tmp("bad");
        sae.save(&dir).unwrap();
        // Missing threshold tensor.
        let bytes = safetensors::serialize(
            [
                ("W_enc", raw_f32(&sae.w_enc, vec![4, 5])),
                ("W_dec", raw_f32(&sae.w_dec, vec![5, 4])),
                ("b_enc", raw_f32(&sae.b_enc, vec![5])),
                ("b_dec", raw_f32(&sae.b_dec, vec![4])),
            ],
            None,
        )
        .unwrap();
        std::fs::write(dir.join(WEIGHTS_FILE), &bytes).unwrap();
        let e = format!("{:#}", Sae::load(&dir).unwrap_err());
        assert!(
            e.contains("missing tensor 'threshold'") && e.contains(WEIGHTS_FILE),
            "{e}"
        );
        // Wrong shape.
        let bytes = safetensors::serialize(
            [
                ("W_enc", raw_f32(&sae.w_enc, vec![5, 4])),
                ("W_dec", raw_f32(&sae.w_dec, vec![5, 4])),
                ("b_enc", raw_f32(&sae.b_enc, vec![5])),
                ("b_dec", raw_f32(&sae.b_dec, vec![4])),
            ],
            None,
        )
        .unwrap();
        std::fs::write(dir.join(WEIGHTS_FILE), &bytes).unwrap();
        let e = format!("{:#}", Sae::load(&dir).unwrap_err());
        assert!(
            e.contains("'W_enc' has shape [5, 4], expected [4, 5]"),
            "{e}"
        );
        std::fs::remove_file(dir.join(CFG_FILE)).unwrap();
        let e = format!("{:#}", Sae::load(&dir).unwrap_err());
        assert!(e.contains("cfg.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sparsify_layout_loads_as_topk() {
        let sae = random_sae(InferenceArch::Topk, 4, 7, 2);
        let dir = tmp("sparsify");
        std::fs::create_dir_all(&dir).unwrap();
        let mut lat = vec![0f32; 7 * 4];
        for l in 0..7 {
            for j in 0..4 {
                lat[l * 4 + j] = sae.w_enc[j * 7 + l];
            }
        }
        let bytes = safetensors::serialize(
            [
                ("encoder.weight", raw_f32(&lat, vec![7, 4])),
                ("encoder.bias", raw_f32(&sae.b_enc, vec![7])),
                ("W_dec", raw_f32(&sae.w_dec, vec![7, 4])),
                ("b_dec", raw_f32(&sae.b_dec, vec![4])),
            ],
            None,
        )
        .unwrap();
        std::fs::write(dir.join("sae.safetensors"), bytes).unwrap();
        std::fs::write(dir.join(CFG_FILE), br#"{"expansion_factor": 2, "normalize_decoder": true, "num_latents": 7, "k": 3, "multi_topk": false, "d_in": 4}"#).unwrap();
        let back = Sae::load(&dir).unwrap();
        assert_eq!(back.w_enc, sae.w_enc);
        assert_eq!(back.k, 3);
        assert_eq!(back.arch, InferenceArch::Topk);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
