//! Research hooks (regularizer, gate, re-initialisation, checkpointed hook state) and the
//! folding of normalisation scale and decoder norms into the saved weights.

use anyhow::Result;
use saelab_core::rng::Rng;
use saelab_core::source::MatrixSource;
use saelab_sae::codes::SparseCodes;
use saelab_sae::config::{Architecture, TrainConfig};
use saelab_sae::regularizer::{DecoderGrad, Gate, PenaltyOut, Regularizer, StepContext};
use saelab_sae::synth::sparse_mixture;
use saelab_sae::train::{export_checkpoint, train, TrainOptions};
use saelab_sae::trainer::{TrainHooks, TrainSae, W_DEC};

/// L1-like penalty `w * sum(codes) / B` that also pulls decoder row 0 towards zero,
/// asks for latent 5 to be re-initialised every 4 steps, and counts its calls (state).
struct TestReg {
    calls: u64,
}

impl Regularizer for TestReg {
    fn name(&self) -> &str {
        "testreg"
    }
    fn penalty(
        &mut self,
        ctx: &StepContext,
        codes: &SparseCodes,
        grad_val: &mut [f32],
        grad_dec: &mut DecoderGrad<'_>,
    ) -> Result<PenaltyOut> {
        self.calls += 1;
        let w = 1e-3f32;
        let b = codes.rows as f32;
        grad_val.iter_mut().for_each(|g| *g += w / b);
        for (g, v) in grad_dec.row_mut(0).iter_mut().zip(&ctx.w_dec[..ctx.d_in]) {
            *g += v * w;
        }
        assert_eq!(ctx.pre_active.unwrap().len(), codes.nnz());
        Ok(PenaltyOut {
            loss: (w * codes.val.iter().sum::<f32>() / b) as f64,
            metrics: vec![("calls".into(), self.calls as f64)],
        })
    }
    fn after_step(&mut self, ctx: &StepContext, _codes: &SparseCodes) -> Result<Vec<u32>> {
        Ok(if (ctx.step + 1).is_multiple_of(4) {
            vec![5]
        } else {
            vec![]
        })
    }
    fn save_state(&self) -> Result<Vec<u8>> {
        Ok(self.calls.to_le_bytes().to_vec())
    }
    fn load_state(&mut self, b: &[u8]) -> Result<()> {
        self.calls = u64::from_le_bytes(b.try_into()?);
        Ok(())
    }
}

struct FixedGate {
    t: Vec<f32>,
}

impl Gate for FixedGate {
    fn name(&self) -> &str {
        "fixed"
    }
    fn thresholds(&mut self, pre: &[f32], rows: usize, d_sae: usize) -> &[f32] {
        assert_eq!(pre.len(), rows * d_sae);
        &self.t
    }
}

fn tmp(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("saelab-sae-hooks-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

#[test]
fn regularizer_hooks_join_the_step_and_resume_exactly() {
    let d = 12;
    let data = sparse_mixture(32 * 16, d, 24, 3, 0.01, 9);
    let cfg = TrainConfig {
        architecture: Architecture::Topk,
        d_sae: 48,
        k: 4,
        batch_size: 32,
        total_tokens: 32 * 16,
        warmup_steps: 2,
        log_every: 1,
        checkpoint_every: 4,
        ..Default::default()
    };
    let hooks = || {
        vec![TrainHooks {
            regularizers: vec![Box::new(TestReg { calls: 0 })],
            gate: None,
        }]
    };
    let full = tmp("full");
    let mut src = MatrixSource::new(data.clone(), d, "s");
    let o = TrainOptions {
        progress: false,
        hooks: hooks(),
        ..Default::default()
    };
    let s = train(
        std::slice::from_ref(&cfg),
        &mut src,
        std::slice::from_ref(&full),
        o,
    )
    .unwrap();
    let extra = &s[0].final_metrics.extra;
    assert!(extra.contains(&("calls".to_string(), 16.0)), "{extra:?}");
    // Separation monitoring ran at the last step; `p` is in every row.
    assert!(extra.iter().any(|(k, _)| k == "sep_cos_mean"), "{extra:?}");
    let lines = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap();
    let reinit: Vec<u64> = lines
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("reinitialised")?
                .as_u64()
        })
        .collect();
    assert_eq!(
        reinit.iter().sum::<u64>(),
        4,
        "latent 5 re-initialised every 4 steps: {reinit:?}"
    );
    let last: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(last["p"], 1.0);
    assert_eq!(last["sep_cos_hist"].as_array().unwrap().len(), 20);
    assert_eq!(last["calls"], 16.0);
    // Interrupted at step 6 and resumed: identical weights and hook state.
    let part = tmp("part");
    let mut src = MatrixSource::new(data.clone(), d, "s");
    let o = TrainOptions {
        progress: false,
        hooks: hooks(),
        max_steps_this_run: Some(6),
        ..Default::default()
    };
    train(
        std::slice::from_ref(&cfg),
        &mut src,
        std::slice::from_ref(&part),
        o,
    )
    .unwrap();
    let mut src = MatrixSource::new(data.clone(), d, "s");
    let o = TrainOptions {
        progress: false,
        hooks: hooks(),
        resume: true,
        ..Default::default()
    };
    let s2 = train(
        std::slice::from_ref(&cfg),
        &mut src,
        std::slice::from_ref(&part),
        o,
    )
    .unwrap();
    assert_eq!(
        s2[0].final_metrics.extra, s[0].final_metrics.extra,
        "hook state restored"
    );
    assert_eq!(
        std::fs::read(full.join("sae_weights.safetensors")).unwrap(),
        std::fs::read(part.join("sae_weights.safetensors")).unwrap()
    );
    // Resuming without the hooks the checkpoint has state for is refused.
    let mut src = MatrixSource::new(data.clone(), d, "s");
    let o = TrainOptions {
        progress: false,
        resume: true,
        overwrite: true,
        ..Default::default()
    };
    let cfg_more = TrainConfig {
        total_tokens: 32 * 16,
        ..cfg.clone()
    };
    let e = train(&[cfg_more], &mut src, std::slice::from_ref(&part), o).unwrap_err();
    assert!(format!("{e:#}").contains("research hooks"), "{e:#}");
    std::fs::remove_dir_all(full).unwrap();
    std::fs::remove_dir_all(part).unwrap();
}

#[test]
fn a_gate_replaces_the_relu_rule() {
    let d = 10;
    let data = sparse_mixture(40, d, 20, 3, 0.01, 3);
    let cfg = TrainConfig {
        architecture: Architecture::Standard,
        d_sae: 30,
        batch_size: 40,
        ..Default::default()
    };
    let mut sae = TrainSae::new(&cfg, d, 10).unwrap();
    let mut plain = TrainHooks::default();
    let m0 = sae.train_step(&data, &mut plain).unwrap();
    // A very high threshold silences everything; a threshold of 0 is the ReLU rule.
    let mut high = TrainHooks {
        regularizers: vec![],
        gate: Some(Box::new(FixedGate { t: vec![1e9; 30] })),
    };
    let m1 = sae.train_step(&data, &mut high).unwrap();
    assert_eq!(m1.l0, 0.0);
    let mut zero = TrainHooks {
        regularizers: vec![],
        gate: Some(Box::new(FixedGate { t: vec![0.0; 30] })),
    };
    let mut twin = TrainSae::new(&cfg, d, 10).unwrap();
    twin.train_step(&data, &mut TrainHooks::default()).unwrap();
    twin.train_step(
        &data,
        &mut TrainHooks {
            regularizers: vec![],
            gate: Some(Box::new(FixedGate { t: vec![1e9; 30] })),
        },
    )
    .unwrap();
    let a = sae.train_step(&data, &mut zero).unwrap();
    let b = twin.train_step(&data, &mut TrainHooks::default()).unwrap();
    assert_eq!(a.loss, b.loss);
    assert!(m0.l0 > 0.0);
    // Wrong-length thresholds and gates on TopK are errors, not panics.
    let mut bad = TrainHooks {
        regularizers: vec![],
        gate: Some(Box::new(FixedGate { t: vec![0.0; 3] })),
    };
    assert!(sae
        .train_step(&data, &mut bad)
        .unwrap_err()
        .to_string()
        .contains("thresholds"));
    let mut topk = TrainSae::new(
        &TrainConfig {
            d_sae: 30,
            k: 3,
            ..Default::default()
        },
        d,
        10,
    )
    .unwrap();
    let mut g = TrainHooks {
        regularizers: vec![],
        gate: Some(Box::new(FixedGate { t: vec![0.0; 30] })),
    };
    assert!(topk.train_step(&data, &mut g).is_err());
}

fn perturb(sae: &mut TrainSae, seed: u64) {
    let mut r = Rng::new(seed);
    for t in sae.tensors.iter_mut() {
        for v in t.p.iter_mut() {
            *v += 0.2 * r.normal();
        }
    }
    // Thresholds stay positive.
    if sae.cfg.architecture == Architecture::Jumprelu {
        for v in sae.tensors[4].p.iter_mut() {
            *v = v.abs();
        }
    }
}

#[test]
fn folding_scale_and_decoder_norms_preserves_outputs() {
    let d = 8;
    let mut x = vec![0f32; 20 * d];
    Rng::new(4).fill_normal(&mut x, 3.0);
    for arch in [
        Architecture::Topk,
        Architecture::Standard,
        Architecture::StandardApril,
        Architecture::Jumprelu,
        Architecture::Gated,
    ] {
        let cfg = TrainConfig {
            architecture: arch,
            d_sae: 24,
            k: 5,
            ..Default::default()
        };
        let mut sae = TrainSae::new(&cfg, d, 10).unwrap();
        perturb(&mut sae, arch as u64);
        if arch == Architecture::StandardApril {
            // Decoder norms far from 1, so folding them matters.
            for (l, row) in sae.tensors[W_DEC].p.chunks_mut(d).enumerate() {
                row.iter_mut().for_each(|v| *v *= 0.3 + l as f32 * 0.1);
            }
        }
        let unscaled = sae.to_inference();
        let s = 0.37f32;
        sae.scale = s;
        let folded = sae.to_inference();
        // folded(x) must equal unscaled(s x) / s: the saved SAE takes raw activations.
        let xs: Vec<f32> = x.iter().map(|v| v * s).collect();
        let (c1, y1) = folded.forward(&x, 20);
        let (c2, y2) = unscaled.forward(&xs, 20);
        assert_eq!(c1.idx, c2.idx, "{arch:?}: same active latents");
        for (a, b) in y1.iter().zip(&y2) {
            assert!(
                (a - b / s).abs() < 1e-4 * (1.0 + a.abs()),
                "{arch:?}: {a} vs {}",
                b / s
            );
        }
        if arch == Architecture::StandardApril {
            // Decoder norms folded: unit rows, and the output equals the unfolded model's.
            for row in unscaled.w_dec.chunks(d) {
                let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                assert!((n - 1.0).abs() < 1e-5);
            }
            let (w, b, wd, bd) = (
                &sae.tensors[0].p,
                &sae.tensors[1].p,
                &sae.tensors[2].p,
                &sae.tensors[3].p,
            );
            for r in 0..20 {
                for j in 0..d {
                    let mut y = bd[j] as f64;
                    for l in 0..24 {
                        let pre: f64 = b[l] as f64
                            + (0..d)
                                .map(|i| xs[r * d + i] as f64 * w[l * d + i] as f64)
                                .sum::<f64>();
                        y += pre.max(0.0) * wd[l * d + j] as f64;
                    }
                    assert!((y2[r * d + j] as f64 - y).abs() < 1e-3 * (1.0 + y.abs()));
                }
            }
        }
    }
}

/// A config's `[method]` table is built into hooks by `train()` and its metrics logged.
#[test]
fn methods_from_the_config_train_end_to_end() {
    let d = 12;
    let data = sparse_mixture(32 * 8, d, 24, 3, 0.01, 11);
    for (arch, method) in [
        ("topk", "progressive_ortho"),
        ("standard", "self_correcting"),
    ] {
        let text = format!(
            "architecture = \"{arch}\"\nd_sae = 48\nk = 4\nbatch_size = 32\ntotal_tokens = 256\nwarmup_steps = 2\nlog_every = 1\n[method]\nmethod = \"{method}\"\n"
        );
        let cfg = TrainConfig::from_toml_str(&text).unwrap();
        let dir = tmp(&format!("method-{method}"));
        let mut src = MatrixSource::new(data.clone(), d, "s");
        let o = TrainOptions {
            progress: false,
            ..Default::default()
        };
        let s = train(
            std::slice::from_ref(&cfg),
            &mut src,
            std::slice::from_ref(&dir),
            o,
        )
        .unwrap();
        assert_eq!(s[0].steps, 8, "{method}");
        assert!(s[0].final_metrics.regularizer_loss.is_finite());
        assert!(
            !s[0].final_metrics.extra.is_empty(),
            "{method}: method metrics logged"
        );
        let written = std::fs::read_to_string(dir.join("train_config.toml")).unwrap();
        assert!(
            written.contains(method),
            "resolved config keeps the method: {written}"
        );
        // Re-exporting from the final checkpoint alone (config, width and hook state
        // read back from it) rewrites the same SAE folder, byte for byte.
        let files = [
            "cfg.json",
            "sae_weights.safetensors",
            "sparsity.safetensors",
            "train_config.toml",
        ];
        let saved: Vec<Vec<u8>> = files
            .iter()
            .map(|f| std::fs::read(dir.join(f)).unwrap())
            .collect();
        let cfg_json = String::from_utf8(saved[0].clone()).unwrap();
        let want_arch = if method == "self_correcting" {
            "jumprelu"
        } else {
            "topk"
        };
        assert!(
            cfg_json.contains(&format!("\"architecture\": \"{want_arch}\"")),
            "{method}: {cfg_json}"
        );
        for f in files {
            std::fs::remove_file(dir.join(f)).unwrap();
        }
        assert_eq!(export_checkpoint(&dir).unwrap(), (8, 8), "{method}");
        for (f, want) in files.iter().zip(&saved) {
            let got = std::fs::read(dir.join(f)).unwrap();
            assert!(&got == want, "{method}: re-exported {f} differs");
        }
        std::fs::remove_dir_all(&dir).unwrap();
        let err = export_checkpoint(&dir).unwrap_err();
        assert!(
            format!("{err:#}").contains("checkpoint.safetensors"),
            "names the missing file: {err:#}"
        );
    }
}

/// An SAE trained with a gate is exported as a JumpReLU applying the gate's thresholds:
/// on raw activations it computes the trained rule (`pre > threshold`), with the input
/// scale and (standard_april) decoder norms folded, not a ReLU firing every positive
/// pre-activation.
#[test]
fn a_gated_sae_exports_its_thresholds_as_a_jumprelu() {
    let (d, f, rows) = (8, 24, 30);
    let mut x = vec![0f32; rows * d];
    Rng::new(6).fill_normal(&mut x, 3.0);
    for arch in [Architecture::Standard, Architecture::StandardApril] {
        let cfg = TrainConfig {
            architecture: arch,
            d_sae: f,
            ..Default::default()
        };
        let mut sae = TrainSae::new(&cfg, d, 10).unwrap();
        perturb(&mut sae, 11 + arch as u64);
        for (l, row) in sae.tensors[W_DEC].p.chunks_mut(d).enumerate() {
            row.iter_mut().for_each(|v| *v *= 0.5 + l as f32 * 0.05);
        }
        let s = 0.6f32;
        sae.scale = s;
        let mut t = vec![0f32; f];
        Rng::new(7).fill_normal(&mut t, 0.5);
        t.iter_mut().for_each(|v| *v = v.abs());
        let exported = sae.to_inference_gated(Some(&t)).unwrap();
        assert!(
            exported.threshold.is_some(),
            "{arch:?}: exported as a JumpReLU"
        );
        let plain = sae.to_inference();
        assert!(plain.threshold.is_none());
        let err = sae.to_inference_gated(Some(&t[1..])).unwrap_err();
        assert!(
            format!("{err}").contains("23 thresholds for 24 latents"),
            "{err}"
        );
        let (codes, y) = exported.forward(&x, rows);
        let (w, b, wd, bd) = (
            &sae.tensors[0].p,
            &sae.tensors[1].p,
            &sae.tensors[2].p,
            &sae.tensors[3].p,
        );
        let (mut active, mut gated_off) = (0, 0);
        for r in 0..rows {
            // The training rule in the normalised space: pre on s x (- b_dec if used).
            let sub = if plain.apply_b_dec_to_input { 1.0 } else { 0.0 };
            let xs: Vec<f64> = (0..d)
                .map(|i| (s * x[r * d + i] - sub * bd[i]) as f64)
                .collect();
            let mut yr: Vec<f64> = bd.iter().map(|&v| v as f64).collect();
            let mut want = Vec::new();
            for l in 0..f {
                let pre: f64 =
                    b[l] as f64 + (0..d).map(|i| xs[i] * w[l * d + i] as f64).sum::<f64>();
                if pre > t[l] as f64 {
                    want.push(l as u32);
                    for j in 0..d {
                        yr[j] += pre * wd[l * d + j] as f64;
                    }
                } else if pre > 0.0 {
                    gated_off += 1;
                }
            }
            active += want.len();
            assert_eq!(codes.row(r).0, &want[..], "{arch:?} row {r}");
            for j in 0..d {
                let want = yr[j] / s as f64;
                let got = y[r * d + j] as f64;
                assert!(
                    (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "{arch:?}: {got} vs {want}"
                );
            }
        }
        assert!(
            active > 0 && gated_off > 0,
            "{arch:?}: {active} active, {gated_off} gated off"
        );
    }
    // A TopK SAE has no ReLU rule for a gate to replace: refused, not silently ignored.
    let topk = TrainSae::new(
        &TrainConfig {
            d_sae: f,
            k: 4,
            ..Default::default()
        },
        d,
        10,
    )
    .unwrap();
    let err = topk.to_inference_gated(Some(&vec![0.5; f])).unwrap_err();
    assert!(format!("{err}").contains("Topk"), "{err}");
}
