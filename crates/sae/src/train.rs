//! The training loop: reads batches through an [`ActivationSource`], feeds the same batch
//! to every SAE being trained (several SAEs from one read), logs metrics, writes
//! checkpoints (each also a usable SAELens folder), resumes bit-identically, and saves
//! the final SAEs with their resolved `train_config.toml`.

use crate::checkpoint::{load_checkpoint, restore_checkpoint, save_checkpoint, CHECKPOINT_FILE};
use crate::config::{Normalization, TrainConfig};
use crate::io::WEIGHTS_FILE;
use crate::trainer::{StepMetrics, TrainHooks, TrainSae};
use anyhow::{bail, Context, Result};
use saelab_core::fsutil::write_atomic;
use saelab_core::source::ActivationSource;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CONFIG_FILE: &str = "train_config.toml";

/// How to run [`train`].
pub struct TrainOptions {
    /// Continue from `checkpoint.safetensors` in each output directory.
    pub resume: bool,
    /// Allow writing into output directories that already hold an SAE or a checkpoint.
    pub overwrite: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Restart the source when it runs out (epochs) instead of stopping early.
    pub loop_source: bool,
    /// Stop after this many steps of this invocation (simulates preemption; a later
    /// `resume` continues). The final SAE is still saved at that point.
    pub max_steps_this_run: Option<usize>,
    /// Research-method hooks, one entry per config (empty = none).
    pub hooks: Vec<TrainHooks>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            resume: false,
            overwrite: false,
            progress: true,
            loop_source: false,
            max_steps_this_run: None,
            hooks: Vec::new(),
        }
    }
}

/// What a training run did, per SAE.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub out_dir: PathBuf,
    pub steps: usize,
    pub planned_steps: usize,
    pub tokens: u64,
    pub wall_seconds: f64,
    pub tokens_per_second: f64,
    pub normalization_scale: f32,
    pub final_metrics: StepMetrics,
}

fn metrics_line(m: &StepMetrics) -> String {
    let mut v = serde_json::to_value(m).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("extra");
        o.remove("arrays");
        for (k, x) in &m.extra {
            o.insert(k.clone(), serde_json::json!(x));
        }
        for (k, x) in &m.arrays {
            o.insert(k.clone(), serde_json::json!(x));
        }
    }
    v.to_string()
}

/// Keep only the metric lines of steps <= `step` (used on resume), atomically.
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let s =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = String::new();
    for line in s.lines() {
        let keep = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
            .is_some_and(|s| s as usize <= step);
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    write_atomic(path, out.as_bytes())
}

/// Write the usable SAE (SAELens folder) and the resolved config into `dir`.
fn save_outputs(dir: &Path, sae: &TrainSae, hooks: &TrainHooks) -> Result<()> {
    let gate = hooks.gate.as_ref().and_then(|g| g.inference_thresholds());
    let inf = sae
        .to_inference_gated(gate.as_deref())
        .with_context(|| format!("saving the SAE in {}", dir.display()))?;
    inf.save_with_sparsity(dir, Some(&sae.log10_density()))?;
    write_atomic(&dir.join(CONFIG_FILE), sae.cfg.to_toml_string()?.as_bytes())
}

/// Re-write the usable SAE in `dir` (SAELens folder, sparsity, `train_config.toml`) from
/// `dir/checkpoint.safetensors` with this build's export, e.g. after an upgrade that
/// changed how SAEs are saved. Returns the checkpoint's (step, planned steps). Nothing is
/// trained; files are replaced atomically.
pub fn export_checkpoint(dir: &Path) -> Result<(usize, usize)> {
    let (sae, hooks) = restore_checkpoint(dir)?;
    save_outputs(dir, &sae, &hooks)?;
    Ok((sae.step, sae.total_steps))
}

/// Read exactly `rows` rows unless the source ends; restart it once when `loop_source`.
fn read_batch(
    source: &mut dyn ActivationSource,
    rows: usize,
    buf: &mut [f32],
    loop_source: bool,
) -> Result<usize> {
    let d = source.d_in();
    let mut got = 0;
    let mut restarted = false;
    while got < rows {
        let n = source.next_batch(rows - got, &mut buf[got * d..rows * d])?;
        got += n;
        if n == 0 {
            if loop_source && !restarted {
                source.reset()?;
                restarted = true;
            } else {
                break;
            }
        } else {
            restarted = false;
        }
    }
    Ok(got)
}

/// Train every config on the same stream of batches; `out_dirs[i]` receives SAE i.
///
/// Errors (nothing is overwritten): no configs, mismatched batch sizes or checkpoint
/// intervals, a run that would train zero steps, a source too short for one batch,
/// an output directory holding an SAE when neither `resume` nor `overwrite` is set, a
/// checkpoint from another configuration, non-finite activations (the row is named),
/// or a loss that becomes NaN/Inf (the last good checkpoint is kept). SIGINT or SIGTERM
/// during the steps stops at the next step boundary with every checkpoint written, and
/// returns an error saying so (a resumed run continues bit for bit).
pub fn train(
    configs: &[TrainConfig],
    source: &mut dyn ActivationSource,
    out_dirs: &[PathBuf],
    opts: TrainOptions,
) -> Result<Vec<TrainSummary>> {
    let TrainOptions {
        resume,
        overwrite,
        progress,
        loop_source,
        max_steps_this_run,
        mut hooks,
    } = opts;
    if configs.is_empty() {
        bail!("no SAE configuration given");
    }
    if configs.len() != out_dirs.len() {
        bail!(
            "{} configurations but {} output directories",
            configs.len(),
            out_dirs.len()
        );
    }
    if hooks.is_empty() {
        // Each config's research method (if any) builds its own hooks.
        hooks = configs
            .iter()
            .map(|c| TrainHooks::for_config(c, source.d_in()))
            .collect::<Result<Vec<_>>>()?;
    }
    if hooks.len() != configs.len() {
        bail!(
            "{} configurations but {} hook sets",
            configs.len(),
            hooks.len()
        );
    }
    let d = source.d_in();
    let bsz = configs[0].batch_size;
    let ckpt_every = configs[0].checkpoint_every;
    for (i, c) in configs.iter().enumerate() {
        if c.batch_size != bsz {
            bail!("config {i}: batch_size {} differs from config 0's {bsz}; SAEs trained together share batches", c.batch_size);
        }
        if c.checkpoint_every != ckpt_every {
            bail!("config {i}: checkpoint_every differs from config 0's; SAEs trained together checkpoint together");
        }
    }
    let mut planned: Vec<usize> = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        let steps = c.steps();
        if steps == 0 {
            bail!(
                "config {i} ({}) would train 0 steps: total_tokens = {} is less than batch_size = {}",
                out_dirs[i].display(),
                c.total_tokens,
                c.batch_size
            );
        }
        planned.push(steps);
    }
    if let Some(n) = source.len_hint() {
        if n < bsz {
            bail!(
                "the activation source '{}' holds {n} rows, fewer than one batch of {bsz}",
                source.describe()
            );
        }
        if !loop_source {
            for (i, p) in planned.iter_mut().enumerate() {
                if *p > n / bsz {
                    tracing::warn!(
                        "config {i}: the source holds {n} rows = {} steps, fewer than the {} planned; training {} steps",
                        n / bsz,
                        *p,
                        n / bsz
                    );
                    *p = n / bsz;
                }
            }
        }
    }
    for dir in out_dirs {
        let occupied = dir.join(WEIGHTS_FILE).exists() || dir.join(CHECKPOINT_FILE).exists();
        if occupied && !resume && !overwrite {
            bail!(
                "{} already holds an SAE or a checkpoint; pass resume to continue it or overwrite to replace it",
                dir.display()
            );
        }
    }
    let mut saes: Vec<TrainSae> = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        let mut s = TrainSae::new(c, d, planned[i])
            .with_context(|| format!("config {i} ({})", out_dirs[i].display()))?;
        if resume && out_dirs[i].join(CHECKPOINT_FILE).exists() {
            load_checkpoint(&out_dirs[i], &mut s, &mut hooks[i])?;
            if s.total_steps != planned[i] {
                bail!(
                    "{}: checkpoint planned {} steps, this run plans {}",
                    out_dirs[i].display(),
                    s.total_steps,
                    planned[i]
                );
            }
            truncate_metrics(&out_dirs[i].join(METRICS_FILE), s.step)?;
        } else if !resume || !out_dirs[i].join(CHECKPOINT_FILE).exists() {
            std::fs::create_dir_all(&out_dirs[i])
                .with_context(|| format!("cannot create {}", out_dirs[i].display()))?;
            if out_dirs[i].join(METRICS_FILE).exists() {
                write_atomic(&out_dirs[i].join(METRICS_FILE), b"")?;
            }
        }
        saes.push(s);
    }
    // Unfinished SAEs must stand at the same step (they were fed the same batches).
    let start = saes
        .iter()
        .filter(|s| s.step < s.total_steps)
        .map(|s| s.step)
        .min()
        // All finished (resuming a completed run): nothing to read.
        .unwrap_or_else(|| saes.iter().map(|s| s.total_steps).max().unwrap_or(0));
    for (i, s) in saes.iter().enumerate() {
        if s.step < s.total_steps && s.step != start {
            bail!(
                "{}: checkpoint at step {} but the other SAEs are at step {start}",
                out_dirs[i].display(),
                s.step
            );
        }
    }
    let fresh = saes.iter().all(|s| s.step == 0);

    // Normalisation scale, estimated on the first batches, then the source restarts.
    let mut batch = vec![0f32; bsz * d];
    if fresh
        && configs
            .iter()
            .any(|c| c.normalize_activations != Normalization::None)
    {
        let nb = configs
            .iter()
            .map(|c| c.norm_estimation_batches)
            .max()
            .unwrap_or(1);
        let (mut sum_norm, mut sum_sq, mut n) = (0f64, 0f64, 0u64);
        for _ in 0..nb {
            let got = read_batch(source, bsz, &mut batch, false)?;
            if got == 0 {
                break;
            }
            check_finite(&batch[..got * d], d, n)?;
            for row in batch[..got * d].chunks_exact(d) {
                let s: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
                sum_sq += s;
                sum_norm += s.sqrt();
            }
            n += got as u64;
        }
        source.reset()?;
        if n == 0 || sum_sq == 0.0 {
            bail!("cannot estimate the normalisation scale: the source gave no non-zero rows");
        }
        for s in saes.iter_mut() {
            s.scale = match s.cfg.normalize_activations {
                Normalization::None => 1.0,
                Normalization::ExpectedAverageOnlyIn => {
                    ((d as f64).sqrt() / (sum_norm / n as f64)) as f32
                }
                Normalization::Rms => (1.0 / (sum_sq / n as f64).sqrt()) as f32,
            };
        }
    }
    // Resume: skip the rows already trained on.
    let max_steps = saes.iter().map(|s| s.total_steps).max().unwrap_or(0);
    if start > 0 && start < max_steps {
        source.reset()?;
        for _ in 0..start {
            if read_batch(source, bsz, &mut batch, loop_source)? < bsz {
                bail!("the activation source ended while skipping to step {start}; is it the same data?");
            }
        }
    }

    let stop_at = max_steps_this_run.map_or(max_steps, |m| (start + m).min(max_steps));
    let bar = if progress {
        let pb = indicatif::ProgressBar::new((max_steps - start) as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    let t0 = Instant::now();
    let mut last: Vec<StepMetrics> = vec![StepMetrics::default(); saes.len()];
    let mut xs = vec![0f32; bsz * d];
    let mut step = start;
    let mut metric_files: Vec<Option<std::fs::File>> = Vec::new();
    for dir in out_dirs {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(METRICS_FILE))
            .with_context(|| format!("cannot open {}", dir.join(METRICS_FILE).display()))?;
        metric_files.push(Some(f));
    }
    // Ctrl-C or SIGTERM stops between steps with every checkpoint written (below).
    let interrupt = saelab_core::interrupt::Guard::install();
    let mut interrupted = false;
    while step < stop_at {
        if saelab_core::interrupt::requested() {
            interrupted = true;
            break;
        }
        let got = read_batch(source, bsz, &mut batch, loop_source)?;
        if got < bsz {
            tracing::warn!("the activation source ended at step {step}; stopping early");
            break;
        }
        check_finite(&batch, d, step as u64 * bsz as u64)?;
        for (i, s) in saes.iter_mut().enumerate() {
            if s.step >= s.total_steps {
                continue;
            }
            let x: &[f32] = if s.scale != 1.0 {
                for (a, b) in xs.iter_mut().zip(&batch) {
                    *a = b * s.scale;
                }
                &xs
            } else {
                &batch
            };
            let m = s.train_step(x, &mut hooks[i]).with_context(|| {
                format!(
                    "training {} stopped; the last good checkpoint (if any) is kept in that directory",
                    out_dirs[i].display()
                )
            })?;
            let cfg = s.cfg.clone();
            let f = metric_files[i].as_mut().unwrap();
            let io = |e| anyhow::anyhow!("cannot write metrics in {}: {e}", out_dirs[i].display());
            let log_step = cfg.log_every > 0
                && (s.step.is_multiple_of(cfg.log_every) || s.step == 1 || s.step == s.total_steps);
            if log_step || !m.arrays.is_empty() {
                writeln!(f, "{}", metrics_line(&m)).map_err(io)?;
            }
            if cfg.hist_every > 0 && s.step % cfg.hist_every == 0 {
                let (edges, counts) = s.density_histogram();
                let line = serde_json::json!({"step": s.step, "tokens": s.tokens, "log10_density_histogram": {"edges": edges, "counts": counts}});
                writeln!(f, "{line}").map_err(io)?;
                s.reset_density_window();
            }
            if cfg.checkpoint_every > 0
                && s.step % cfg.checkpoint_every == 0
                && s.step < s.total_steps
            {
                f.flush().map_err(io)?;
                save_checkpoint(&out_dirs[i], s, &hooks[i])?;
                save_outputs(&out_dirs[i], s, &hooks[i])?;
            }
            last[i] = m;
        }
        step += 1;
        bar.inc(1);
        let el = t0.elapsed().as_secs_f64().max(1e-9);
        let m0 = &last[0];
        bar.set_message(format!(
            "{:.0} tok/s  loss {:.4}  fvu {:.3}  l0 {:.1}  dead {:.3}",
            ((step - start) * bsz) as f64 / el,
            m0.loss,
            m0.fvu,
            m0.l0,
            m0.dead_fraction
        ));
    }
    bar.finish_and_clear();
    drop(interrupt);
    let wall = t0.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for (i, s) in saes.iter().enumerate() {
        if let Some(f) = metric_files[i].as_mut() {
            f.flush().ok();
        }
        save_checkpoint(&out_dirs[i], s, &hooks[i])?;
        save_outputs(&out_dirs[i], s, &hooks[i])?;
        let trained = (step - start) as u64 * bsz as u64;
        out.push(TrainSummary {
            out_dir: out_dirs[i].clone(),
            steps: s.step,
            planned_steps: s.total_steps,
            tokens: s.tokens,
            wall_seconds: wall,
            tokens_per_second: trained as f64 / wall.max(1e-9),
            normalization_scale: s.scale,
            final_metrics: last[i].clone(),
        });
    }
    if interrupted {
        bail!(
            "interrupted at step {step} of {max_steps}: every checkpoint is written; \
             `saelab train --resume` or the same `saelab experiment` command continues"
        );
    }
    Ok(out)
}

/// Error naming the first non-finite activation (global row index, column).
pub fn check_finite(x: &[f32], d: usize, first_row: u64) -> Result<()> {
    if let Some(p) = x.iter().position(|v| !v.is_finite()) {
        bail!(
            "activation row {} (column {}) is {}: refusing to train on non-finite activations",
            first_row + (p / d) as u64,
            p % d,
            x[p]
        );
    }
    Ok(())
}
