//! Training checkpoints: one safetensors file holding every parameter with its Adam
//! moments, the per-latent counters, and the research hooks' state; the metadata holds
//! the scalars (step, tokens, RNG state, scale and thresholds as exact bit patterns) and
//! the resolved configuration, so a resumed run continues bit for bit and a checkpoint
//! from a different configuration is refused.

use crate::config::TrainConfig;
use crate::io::{get, metadata_of, raw_f32, u64_bytes, Raw};
use crate::trainer::{TrainHooks, TrainSae};
use anyhow::{anyhow, bail, Context, Result};
use saelab_core::fsutil::write_atomic;
use saelab_core::rng::Rng;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
const FORMAT: &str = "saelab-checkpoint-1";

/// Write `dir/checkpoint.safetensors` atomically.
pub fn save_checkpoint(dir: &Path, sae: &TrainSae, hooks: &TrainHooks) -> Result<()> {
    let mut hook_states: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, r) in hooks.regularizers.iter().enumerate() {
        hook_states.push((format!("hook.regularizer.{i}"), r.save_state()?));
    }
    if let Some(g) = &hooks.gate {
        hook_states.push(("hook.gate".into(), g.save_state()?));
    }
    let mut ts: Vec<(String, Raw)> = Vec::new();
    for t in &sae.tensors {
        let shape = vec![t.rows, t.cols];
        ts.push((t.name.to_string(), raw_f32(&t.p, shape.clone())));
        ts.push((format!("{}.adam_m", t.name), raw_f32(&t.m, shape.clone())));
        ts.push((format!("{}.adam_v", t.name), raw_f32(&t.v, shape)));
    }
    let f = sae.d_sae;
    ts.push((
        "since_fired".into(),
        Raw {
            dtype: Dtype::U64,
            shape: vec![f],
            bytes: u64_bytes(&sae.since_fired),
        },
    ));
    ts.push((
        "window_fires".into(),
        Raw {
            dtype: Dtype::U64,
            shape: vec![f],
            bytes: u64_bytes(&sae.window_fires),
        },
    ));
    for (name, bytes) in &hook_states {
        ts.push((
            name.clone(),
            Raw {
                dtype: Dtype::U8,
                shape: vec![bytes.len()],
                bytes,
            },
        ));
    }
    let rng = sae.rng.state();
    let mut md = HashMap::new();
    md.insert("format".to_string(), FORMAT.to_string());
    md.insert("config".into(), sae.cfg.to_toml_string()?);
    md.insert("d_in".into(), sae.d_in.to_string());
    md.insert("step".into(), sae.step.to_string());
    md.insert("tokens".into(), sae.tokens.to_string());
    md.insert("total_steps".into(), sae.total_steps.to_string());
    md.insert(
        "rng".into(),
        rng.iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(","),
    );
    md.insert("window_tokens".into(), sae.window_tokens.to_string());
    md.insert(
        "threshold_ema_bits".into(),
        sae.threshold_ema.to_bits().to_string(),
    );
    md.insert(
        "last_min_act_bits".into(),
        sae.last_min_act.to_bits().to_string(),
    );
    md.insert("scale_bits".into(), sae.scale.to_bits().to_string());
    md.insert("initialized".into(), sae.initialized.to_string());
    md.insert("hooks".into(), hook_states.len().to_string());
    let bytes = safetensors::serialize(ts, Some(md))?;
    write_atomic(&dir.join(CHECKPOINT_FILE), &bytes)
}

/// A checkpoint file's bytes and metadata, its format checked.
struct CheckpointFile {
    path: PathBuf,
    bytes: Vec<u8>,
    md: HashMap<String, String>,
}

impl CheckpointFile {
    fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CHECKPOINT_FILE);
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let md = metadata_of(&bytes, &path)?;
        let f = CheckpointFile { path, bytes, md };
        if f.field("format")? != FORMAT {
            bail!(
                "{}: not a saelab checkpoint (format {})",
                f.path.display(),
                f.field("format")?
            );
        }
        Ok(f)
    }

    fn field(&self, k: &str) -> Result<&String> {
        self.md
            .get(k)
            .ok_or_else(|| anyhow!("{}: checkpoint metadata lacks '{k}'", self.path.display()))
    }

    fn num(&self, k: &str) -> Result<u64> {
        self.field(k)?
            .parse::<u64>()
            .with_context(|| format!("{}: bad '{k}' in checkpoint metadata", self.path.display()))
    }
}

/// Rebuild the trainer saved in `dir/checkpoint.safetensors` from the checkpoint alone:
/// the configuration, input width and planned steps come from its metadata, the research
/// hooks are rebuilt from the configuration's method and given their saved state.
pub fn restore_checkpoint(dir: &Path) -> Result<(TrainSae, TrainHooks)> {
    let file = CheckpointFile::read(dir)?;
    let what = || format!("{}", file.path.display());
    let cfg = TrainConfig::from_toml_str(file.field("config")?)
        .with_context(|| format!("{}: bad configuration in its metadata", what()))?;
    let d_in = file.num("d_in")? as usize;
    let mut sae = TrainSae::new(&cfg, d_in, file.num("total_steps")? as usize)
        .with_context(|| format!("{}: configuration in its metadata", what()))?;
    let mut hooks = TrainHooks::for_config(&sae.cfg, d_in).with_context(what)?;
    restore_into(&file, &mut sae, &mut hooks)?;
    Ok((sae, hooks))
}

/// Restore a checkpoint into `sae` (built from the same resolved config) and `hooks`.
/// Refuses checkpoints whose configuration or shapes differ.
pub fn load_checkpoint(dir: &Path, sae: &mut TrainSae, hooks: &mut TrainHooks) -> Result<()> {
    restore_into(&CheckpointFile::read(dir)?, sae, hooks)
}

/// [`load_checkpoint`] from a file already read.
fn restore_into(file: &CheckpointFile, sae: &mut TrainSae, hooks: &mut TrainHooks) -> Result<()> {
    let (path, bytes) = (&file.path, &file.bytes[..]);
    let field = |k: &str| file.field(k);
    let num = |k: &str| file.num(k);
    let want = sae.cfg.to_toml_string()?;
    if field("config")? != &want {
        bail!(
            "{}: checkpoint was written by a different training configuration; refusing to resume \
             (use a new output directory, or the original configuration)",
            path.display()
        );
    }
    if num("d_in")? as usize != sae.d_in {
        bail!(
            "{}: checkpoint has d_in {} but the activations have d_in {}",
            path.display(),
            num("d_in")?,
            sae.d_in
        );
    }
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    for t in sae.tensors.iter_mut() {
        let shape = [t.rows, t.cols];
        t.p = get(&st, path, t.name, &shape)?;
        t.m = get(&st, path, &format!("{}.adam_m", t.name), &shape)?;
        t.v = get(&st, path, &format!("{}.adam_v", t.name), &shape)?;
        t.g.iter_mut().for_each(|g| *g = 0.0);
    }
    let u64s = |name: &str| -> Result<Vec<u64>> {
        let t = st
            .tensor(name)
            .map_err(|_| anyhow!("{}: missing tensor '{name}'", path.display()))?;
        if t.dtype() != Dtype::U64 || t.shape() != [sae.d_sae] {
            bail!(
                "{}: tensor '{name}' has the wrong dtype or shape",
                path.display()
            );
        }
        Ok(t.data()
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect())
    };
    sae.since_fired = u64s("since_fired")?;
    sae.window_fires = u64s("window_fires")?;
    let n_hooks = num("hooks")? as usize;
    let have = hooks.regularizers.len() + hooks.gate.is_some() as usize;
    if n_hooks != have {
        bail!(
            "{}: checkpoint has state for {n_hooks} research hooks, this run has {have}",
            path.display()
        );
    }
    let blob = |name: &str| -> Result<Vec<u8>> {
        let t = st
            .tensor(name)
            .map_err(|_| anyhow!("{}: missing tensor '{name}'", path.display()))?;
        Ok(t.data().to_vec())
    };
    for (i, r) in hooks.regularizers.iter_mut().enumerate() {
        r.load_state(&blob(&format!("hook.regularizer.{i}"))?)
            .with_context(|| format!("{}: restoring regularizer '{}'", path.display(), r.name()))?;
    }
    if let Some(g) = hooks.gate.as_mut() {
        g.load_state(&blob("hook.gate")?)
            .with_context(|| format!("{}: restoring gate", path.display()))?;
    }
    sae.step = num("step")? as usize;
    sae.tokens = num("tokens")?;
    sae.total_steps = num("total_steps")? as usize;
    let rng: Vec<u64> = field("rng")?
        .split(',')
        .map(|s| s.parse::<u64>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("{}: bad rng state", path.display()))?;
    if rng.len() != 4 {
        bail!("{}: bad rng state", path.display());
    }
    sae.rng = Rng::from_state([rng[0], rng[1], rng[2], rng[3]]);
    sae.window_tokens = num("window_tokens")?;
    sae.threshold_ema = f32::from_bits(num("threshold_ema_bits")? as u32);
    sae.last_min_act = f32::from_bits(num("last_min_act_bits")? as u32);
    sae.scale = f32::from_bits(num("scale_bits")? as u32);
    sae.initialized = field("initialized")? == "true";
    Ok(())
}
