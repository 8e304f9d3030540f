//! A real SIGTERM (a scheduler's preemption notice) or Ctrl-C during training stops it
//! at the next step boundary with every checkpoint written; resuming gives the same SAE
//! as an uninterrupted run. Its own test binary: the stop request is process-wide.
#![cfg(target_os = "linux")]

use anyhow::Result;
use saelab_core::source::MatrixSource;
use saelab_sae::codes::SparseCodes;
use saelab_sae::config::TrainConfig;
use saelab_sae::regularizer::{DecoderGrad, PenaltyOut, Regularizer, StepContext};
use saelab_sae::synth::sparse_mixture;
use saelab_sae::train::{train, TrainOptions};
use saelab_sae::trainer::TrainHooks;
use std::path::PathBuf;

/// Changes nothing in training; at the end of step `at` it sends `signal` to this
/// process with the shell's kill and waits until the handler has recorded it.
struct Signaller {
    at: usize,
    signal: &'static str,
}

impl Regularizer for Signaller {
    fn name(&self) -> &str {
        "signaller"
    }
    fn penalty(
        &mut self,
        _ctx: &StepContext,
        _codes: &SparseCodes,
        _grad_val: &mut [f32],
        _grad_dec: &mut DecoderGrad<'_>,
    ) -> Result<PenaltyOut> {
        Ok(PenaltyOut {
            loss: 0.0,
            metrics: vec![],
        })
    }
    fn after_step(&mut self, ctx: &StepContext, _codes: &SparseCodes) -> Result<Vec<u32>> {
        if ctx.step + 1 == self.at {
            // sh's built-in kill: no procps needed on a minimal CI image.
            let cmd = format!("kill {} {}", self.signal, std::process::id());
            let ok = std::process::Command::new("sh")
                .args(["-c", &cmd])
                .status()?
                .success();
            assert!(ok, "{cmd}");
            let t = std::time::Instant::now();
            while !saelab_core::interrupt::requested() {
                assert!(t.elapsed().as_secs() < 10, "the signal never arrived");
                std::thread::yield_now();
            }
        }
        Ok(vec![])
    }
}

fn run(dir: &PathBuf, resume: bool, signal_at: Option<(usize, &'static str)>) -> Result<usize> {
    let cfg = TrainConfig {
        d_sae: 64,
        k: 4,
        batch_size: 32,
        total_tokens: 32 * 12,
        warmup_steps: 2,
        log_every: 1,
        checkpoint_every: 0,
        ..Default::default()
    };
    let d = 16;
    let mut src = MatrixSource::new(sparse_mixture(32 * 12, d, 40, 3, 0.01, 5), d, "mix");
    let (at, signal) = signal_at.unwrap_or((usize::MAX, "-TERM"));
    let hooks = vec![TrainHooks {
        regularizers: vec![Box::new(Signaller { at, signal })],
        gate: None,
    }];
    let o = TrainOptions {
        resume,
        progress: false,
        hooks,
        ..Default::default()
    };
    let s = train(
        std::slice::from_ref(&cfg),
        &mut src,
        std::slice::from_ref(dir),
        o,
    )?;
    Ok(s[0].steps)
}

#[test]
fn a_signal_stops_training_at_a_checkpoint_and_resume_matches() {
    let tmp = |n: &str| {
        let p = std::env::temp_dir().join(format!("saelab-interrupt-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    };
    let (whole, cut) = (tmp("whole"), tmp("cut"));
    assert_eq!(run(&whole, false, None).unwrap(), 12);
    for (round, signal) in [(5, "-TERM"), (9, "-INT")] {
        let err = run(&cut, round > 5, Some((round, signal))).unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("interrupted at step {round} of 12")),
            "{err:#}"
        );
        assert!(cut.join("checkpoint.safetensors").exists());
        assert!(cut.join("sae_weights.safetensors").exists());
    }
    // The handlers are gone with the guard: the signal's default action is back.
    assert_eq!(run(&cut, true, None).unwrap(), 12);
    for f in [
        "sae_weights.safetensors",
        "sparsity.safetensors",
        "checkpoint.safetensors",
    ] {
        let (a, b) = (
            std::fs::read(whole.join(f)).unwrap(),
            std::fs::read(cut.join(f)).unwrap(),
        );
        // Tensors and metadata (whose order in the header is not fixed) compared.
        let (ma, mb) = (
            safetensors::SafeTensors::read_metadata(&a).unwrap().1,
            safetensors::SafeTensors::read_metadata(&b).unwrap().1,
        );
        assert_eq!(ma.metadata(), mb.metadata(), "{f}: metadata differs");
        let (ta, tb) = (
            safetensors::SafeTensors::deserialize(&a).unwrap(),
            safetensors::SafeTensors::deserialize(&b).unwrap(),
        );
        let mut names = ta.names();
        names.sort();
        assert!(!names.is_empty());
        for n in names {
            let (x, y) = (ta.tensor(n).unwrap(), tb.tensor(n).unwrap());
            assert!(
                x.data() == y.data() && x.shape() == y.shape(),
                "{f}: tensor {n} differs between the interrupted and the whole run"
            );
        }
    }
    let metrics = std::fs::read_to_string(cut.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 12, "one line per step, none twice");
    std::fs::remove_dir_all(&whole).unwrap();
    std::fs::remove_dir_all(&cut).unwrap();
}
