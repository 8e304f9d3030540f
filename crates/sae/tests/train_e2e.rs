//! End-to-end behaviour of the trainer: every architecture learns, files round-trip,
//! resume is bit-identical, bad runs fail clearly.

use saelab_core::source::{ActivationSource, MatrixSource};
use saelab_sae::config::{Architecture, MatmulPrecision, Normalization, TrainConfig};
use saelab_sae::synth::sparse_mixture;
use saelab_sae::train::{train, TrainOptions};
use saelab_sae::trainer::{StepMetrics, TrainHooks, TrainSae};
use saelab_sae::Sae;
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("saelab-sae-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn small(arch: Architecture) -> TrainConfig {
    TrainConfig {
        architecture: arch,
        d_sae: 128,
        k: 6,
        batch_size: 64,
        total_tokens: 64 * 40,
        warmup_steps: 5,
        log_every: 5,
        hist_every: 20,
        checkpoint_every: 10,
        dead_tokens: 64 * 10,
        threshold_start_step: 5,
        l1_warmup_steps: 5,
        encoder_block_rows: 24,
        ..Default::default()
    }
}

fn opts() -> TrainOptions {
    TrainOptions {
        progress: false,
        ..Default::default()
    }
}

#[test]
fn topk_trains_on_a_matrix_source_and_saves_a_loadable_sae() {
    let d = 32;
    let data = sparse_mixture(64 * 40, d, 64, 4, 0.01, 1);
    let mut src = MatrixSource::new(data.clone(), d, "synthetic");
    let dir = tmp("topk");
    let cfg = TrainConfig {
        lr: Some(1e-2),
        ..small(Architecture::Topk)
    };
    let s = train(
        std::slice::from_ref(&cfg),
        &mut src,
        std::slice::from_ref(&dir),
        opts(),
    )
    .unwrap();
    assert_eq!(s[0].steps, 40);
    assert_eq!(s[0].tokens, 64 * 40);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses: Vec<f64> = lines
        .iter()
        .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
        .collect();
    assert!(losses.len() >= 8);
    let fvus: Vec<f64> = lines
        .iter()
        .filter_map(|v| v.get("fvu").and_then(|l| l.as_f64()))
        .collect();
    assert!(
        losses.last().unwrap() < &(0.5 * losses[0]),
        "loss did not decrease: {losses:?} (fvu {fvus:?})"
    );
    assert!(lines
        .iter()
        .any(|v| v.get("log10_density_histogram").is_some()));
    let fvu = lines
        .iter()
        .rev()
        .find_map(|v| v.get("fvu").and_then(|f| f.as_f64()))
        .unwrap();
    assert!(fvu < 0.5, "fvu {fvu}");
    // The saved SAE loads and reproduces what was saved; decoder rows are unit norm.
    let sae = Sae::load(&dir).unwrap();
    assert_eq!(sae.k, 6);
    for r in sae.w_dec.chunks(d) {
        let n: f32 = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-4, "decoder row norm {n}");
    }
    let x = &data[..16 * d];
    let (codes, x_hat) = sae.forward(x, 16);
    assert!(codes.mean_l0() <= 6.0 && codes.mean_l0() > 1.0);
    let err: f32 = x.iter().zip(&x_hat).map(|(a, b)| (a - b).powi(2)).sum();
    let var: f32 = x.iter().map(|a| a * a).sum();
    assert!(err < var, "reconstruction worse than zero");
    let toml = std::fs::read_to_string(dir.join("train_config.toml")).unwrap();
    let back = TrainConfig::from_toml_str(&toml).unwrap();
    assert_eq!(back.lr, Some(1e-2));
    assert_eq!(back.auxk_k, Some(16), "resolved defaults are written out");
    // Save -> load -> save gives identical outputs.
    let dir2 = tmp("topk2");
    sae.save(&dir2).unwrap();
    let again = Sae::load(&dir2).unwrap();
    assert_eq!(again.forward(x, 16), (codes, x_hat));
    // A second run into the same directory refuses to overwrite.
    src.reset().unwrap();
    let err = train(&[cfg], &mut src, std::slice::from_ref(&dir), opts()).unwrap_err();
    assert!(format!("{err:#}").contains("already holds"), "{err:#}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&dir2).unwrap();
}

/// Every architecture's loss decreases when stepping on one fixed batch.
/// `steps` steps on the same batch; the SAE and the first and last step's metrics.
fn train_on_one_batch(
    cfg: &TrainConfig,
    data: &[f32],
    d: usize,
    steps: usize,
) -> (TrainSae, StepMetrics, StepMetrics) {
    let mut sae = TrainSae::new(cfg, d, steps).unwrap();
    let mut hooks = TrainHooks::default();
    let first = sae.train_step(data, &mut hooks).unwrap();
    let mut last = first.clone();
    for _ in 1..steps {
        last = sae.train_step(data, &mut hooks).unwrap();
    }
    (sae, first, last)
}

#[test]
fn every_architecture_learns_a_fixed_batch() {
    let d = 24;
    let data = sparse_mixture(128, d, 48, 4, 0.01, 2);
    for arch in [
        Architecture::Topk,
        Architecture::Batchtopk,
        Architecture::MatryoshkaBatchtopk,
        Architecture::Standard,
        Architecture::StandardApril,
        Architecture::Jumprelu,
        Architecture::Gated,
    ] {
        let cfg = TrainConfig {
            lr: Some(if arch == Architecture::StandardApril {
                1e-3
            } else {
                5e-3
            }),
            l1_coeff: Some(if arch == Architecture::StandardApril {
                0.05
            } else {
                0.01
            }),
            target_l0: 8.0,
            l0_coeff: 0.1,
            jumprelu_threshold_init: 0.05,
            jumprelu_bandwidth: 0.05,
            total_tokens: 128 * 60,
            batch_size: 128,
            ..small(arch)
        };
        let (sae, first, last) = train_on_one_batch(&cfg, &data, d, 60);
        assert!(
            last.mse < 0.7 * first.mse,
            "{arch:?}: mse {} -> {}",
            first.mse,
            last.mse
        );
        assert!(last.loss.is_finite());
        if sae.cfg.unit_norm_decoder == Some(true) {
            let w = &sae.tensors[saelab_sae::trainer::W_DEC].p;
            for r in w.chunks(d) {
                let n: f32 = r.iter().map(|v| v * v).sum::<f32>().sqrt();
                assert!((n - 1.0).abs() < 1e-4, "{arch:?}: decoder norm {n}");
            }
        }
        if arch == Architecture::Batchtopk {
            assert!(
                (last.l0 - 6.0).abs() < 1e-9,
                "BatchTopK keeps exactly k*B: l0 {}",
                last.l0
            );
        }
        // The inference SAE reproduces the training forward on this batch (for BatchTopK
        // only approximately: the threshold replaces the batch selection).
        let inf = sae.to_inference();
        let (_, x_hat) = inf.forward(&data, 128);
        let mse: f64 = data
            .iter()
            .zip(&x_hat)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / 128.0;
        let var: f64 = data.iter().map(|a| (*a as f64).powi(2)).sum::<f64>() / 128.0;
        assert!(
            mse < var,
            "{arch:?}: inference mse {mse} vs raw energy {var}"
        );
    }
}

/// bf16 products learn as well as f32: the TopK family's selection (`encoder_precision`)
/// and a ReLU + L1 SAE's dense GEMMs (`dense_precision`, dense codes early in training);
/// same data, same seed, final reconstruction error within 5%.
#[test]
fn bf16_products_train_like_f32() {
    let d = 64;
    let data = sparse_mixture(256, d, 96, 4, 0.01, 4);
    for arch in [
        Architecture::Topk,
        Architecture::Batchtopk,
        Architecture::Standard,
    ] {
        let mut mse = Vec::new();
        for precision in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
            let topk = arch.is_topk_family();
            let cfg = TrainConfig {
                lr: Some(5e-3),
                l1_coeff: (!topk).then_some(0.01),
                total_tokens: 256 * 60,
                batch_size: 256,
                encoder_precision: if topk {
                    precision
                } else {
                    MatmulPrecision::F32
                },
                dense_precision: if topk {
                    MatmulPrecision::F32
                } else {
                    precision
                },
                ..small(arch)
            };
            let (_, first, last) = train_on_one_batch(&cfg, &data, d, 60);
            assert!(
                last.mse < 0.5 * first.mse,
                "{arch:?} {precision:?}: mse {} -> {}",
                first.mse,
                last.mse
            );
            mse.push(last.mse);
        }
        assert!(
            (mse[1] - mse[0]).abs() <= 0.05 * mse[0],
            "{arch:?}: final mse f32 {} vs bf16 selection {}",
            mse[0],
            mse[1]
        );
    }
}

/// Every tensor and metadata entry of a checkpoint (the header's key order is not fixed).
type Contents = (Vec<(String, Vec<u8>)>, Vec<(String, String)>);

fn checkpoint_contents(dir: &std::path::Path) -> Contents {
    let bytes = std::fs::read(dir.join("checkpoint.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    ts.sort();
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut md: Vec<(String, String)> = md.metadata().clone().unwrap().into_iter().collect();
    md.sort();
    (ts, md)
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() {
    let d = 16;
    let data = sparse_mixture(64 * 30, d, 32, 3, 0.01, 3);
    for arch in [Architecture::Topk, Architecture::Jumprelu] {
        let cfg = TrainConfig {
            total_tokens: 64 * 30,
            checkpoint_every: 10,
            normalize_activations: Normalization::ExpectedAverageOnlyIn,
            norm_estimation_batches: 3,
            dead_tokens: 64 * 4,
            ..small(arch)
        };
        let full = tmp(&format!("full{arch:?}"));
        let part = tmp(&format!("part{arch:?}"));
        let mut src = MatrixSource::new(data.clone(), d, "s");
        train(
            std::slice::from_ref(&cfg),
            &mut src,
            std::slice::from_ref(&full),
            opts(),
        )
        .unwrap();
        let mut src = MatrixSource::new(data.clone(), d, "s");
        let o = TrainOptions {
            max_steps_this_run: Some(13),
            ..opts()
        };
        let s = train(
            std::slice::from_ref(&cfg),
            &mut src,
            std::slice::from_ref(&part),
            o,
        )
        .unwrap();
        assert_eq!(s[0].steps, 13);
        let mut src = MatrixSource::new(data.clone(), d, "s");
        let o = TrainOptions {
            resume: true,
            ..opts()
        };
        let s = train(
            std::slice::from_ref(&cfg),
            &mut src,
            std::slice::from_ref(&part),
            o,
        )
        .unwrap();
        assert_eq!(s[0].steps, 30);
        // Resuming a finished run trains nothing more and changes nothing.
        let before = checkpoint_contents(&part);
        let mut src = MatrixSource::new(data.clone(), d, "s");
        let s = train(
            std::slice::from_ref(&cfg),
            &mut src,
            std::slice::from_ref(&part),
            TrainOptions {
                resume: true,
                ..opts()
            },
        )
        .unwrap();
        assert_eq!(s[0].steps, 30);
        assert!(checkpoint_contents(&part) == before);
        assert!(
            checkpoint_contents(&full) == checkpoint_contents(&part),
            "{arch:?}: resumed checkpoint differs"
        );
        assert_eq!(
            std::fs::read(full.join("sae_weights.safetensors")).unwrap(),
            std::fs::read(part.join("sae_weights.safetensors")).unwrap()
        );
        let m1 = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap();
        let m2 = std::fs::read_to_string(part.join("metrics.jsonl")).unwrap();
        let strip = |s: &str| -> Vec<String> { s.lines().map(|l| l.to_string()).collect() };
        assert_eq!(strip(&m1).len(), strip(&m2).len());
        // A checkpoint from a different configuration is refused.
        let other = TrainConfig {
            k: 5,
            ..cfg.clone()
        };
        let mut src = MatrixSource::new(data.clone(), d, "s");
        let e = train(
            &[other],
            &mut src,
            std::slice::from_ref(&part),
            TrainOptions {
                resume: true,
                ..opts()
            },
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("different training configuration"),
            "{e:#}"
        );
        std::fs::remove_dir_all(&full).unwrap();
        std::fs::remove_dir_all(&part).unwrap();
    }
}

#[test]
fn several_saes_from_one_read_match_separate_runs() {
    let d = 16;
    let data = sparse_mixture(64 * 12, d, 32, 3, 0.01, 4);
    let a = TrainConfig {
        total_tokens: 64 * 12,
        ..small(Architecture::Topk)
    };
    let b = TrainConfig {
        total_tokens: 64 * 8,
        d_sae: 64,
        k: 3,
        ..small(Architecture::Batchtopk)
    };
    let (da, db) = (tmp("multi-a"), tmp("multi-b"));
    let mut src = MatrixSource::new(data.clone(), d, "s");
    let s = train(
        &[a.clone(), b.clone()],
        &mut src,
        &[da.clone(), db.clone()],
        opts(),
    )
    .unwrap();
    assert_eq!((s[0].steps, s[1].steps), (12, 8));
    let sa = tmp("single-a");
    let mut src = MatrixSource::new(data.clone(), d, "s");
    train(&[a], &mut src, std::slice::from_ref(&sa), opts()).unwrap();
    assert_eq!(
        std::fs::read(da.join("sae_weights.safetensors")).unwrap(),
        std::fs::read(sa.join("sae_weights.safetensors")).unwrap()
    );
    for p in [da, db, sa] {
        std::fs::remove_dir_all(p).unwrap();
    }
}

#[test]
fn bad_runs_fail_clearly_and_write_nothing() {
    let d = 8;
    let data = sparse_mixture(64 * 4, d, 16, 2, 0.01, 5);
    let dir = tmp("bad");
    // Zero steps.
    let mut src = MatrixSource::new(data.clone(), d, "s");
    let cfg = TrainConfig {
        total_tokens: 1000,
        batch_size: 2048,
        ..small(Architecture::Topk)
    };
    let e = train(&[cfg], &mut src, std::slice::from_ref(&dir), opts()).unwrap_err();
    assert!(format!("{e:#}").contains("would train 0 steps"), "{e:#}");
    assert!(!dir.join("sae_weights.safetensors").exists());
    // Non-finite activations: the row is named.
    let mut bad = data.clone();
    bad[70 * d + 3] = f32::NAN;
    let mut src = MatrixSource::new(bad, d, "s");
    let cfg = TrainConfig {
        total_tokens: 64 * 4,
        d_sae: 32,
        k: 4,
        ..small(Architecture::Topk)
    };
    let e = train(
        std::slice::from_ref(&cfg),
        &mut src,
        std::slice::from_ref(&dir),
        opts(),
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("activation row 70 (column 3)"),
        "{e:#}"
    );
    // k > F, lr <= 0.
    let mut src = MatrixSource::new(data.clone(), d, "s");
    let e = train(
        &[TrainConfig {
            k: 64,
            ..cfg.clone()
        }],
        &mut src,
        std::slice::from_ref(&dir),
        opts(),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("k must be"), "{e:#}");
    let e = train(
        &[TrainConfig {
            lr: Some(-1.0),
            ..cfg.clone()
        }],
        &mut src,
        std::slice::from_ref(&dir),
        opts(),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("lr must be > 0"), "{e:#}");
    // bf16 selection is for the TopK family only.
    let e = train(
        &[TrainConfig {
            encoder_precision: MatmulPrecision::Bf16,
            l1_coeff: Some(0.01),
            ..small(Architecture::Standard)
        }],
        &mut src,
        std::slice::from_ref(&dir),
        opts(),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("encoder_precision"), "{e:#}");
    // A loss that becomes non-finite stops with an error (huge lr blows up).
    let mut src = MatrixSource::new(data.iter().map(|v| v * 1e18).collect(), d, "s");
    let e = train(
        &[TrainConfig {
            lr: Some(1e30),
            warmup_steps: 0,
            ..cfg
        }],
        &mut src,
        std::slice::from_ref(&dir),
        opts(),
    )
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("became") && (msg.contains("NaN") || msg.contains("inf")),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
