//! Timing of the research methods' penalties (not a test; `harness = false`).
//!
//! Run: `cargo bench -p saelab-sae --bench methods` (add `-- quick` for fewer repeats).
//! Prints, per case, the median wall time of the sparse Method 1 penalty (with and
//! without the EMA of `n_ij`) on synthetic TopK codes at F = 16384, k = 40, B = 2048,
//! the dense research formula at small F for comparison, and Method 2's penalty,
//! gate and randomized SVD.

use saelab_core::rng::Rng;
use saelab_sae::codes::SparseCodes;
use saelab_sae::config::{Architecture, TrainConfig};
use saelab_sae::methods::pairs::Csc;
use saelab_sae::methods::pairs::PairEma;
use saelab_sae::methods::progressive::{dense_reference, sparse_penalty};
use saelab_sae::methods::rsvd::{randomized_svd, DenseOp};
use saelab_sae::methods::self_correcting::{
    interference_candidates, interference_penalty, GateConfig, Overlap, Statistic, ZScoreGate,
};
use saelab_sae::methods::MethodConfig;
use saelab_sae::regularizer::{DecoderGradBuf, Gate};
use saelab_sae::synth::sparse_mixture;
use saelab_sae::trainer::{TrainHooks, TrainSae};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// TopK-like codes: each row picks k distinct latents, uniformly (`zipf = 0`) or with
/// probability proportional to `1 / (rank + 10)^zipf` (real SAEs have skewed firing
/// frequencies, which concentrates the pair events on fewer, hotter pairs).
fn synth_codes(rng: &mut Rng, b: usize, f: usize, k: usize, zipf: f64) -> SparseCodes {
    let weights: Vec<f64> = (0..f).map(|i| 1.0 / ((i + 10) as f64).powf(zipf)).collect();
    let mut cdf = Vec::with_capacity(f);
    let mut acc = 0.0;
    for w in &weights {
        acc += w;
        cdf.push(acc);
    }
    let perm = rng.permutation(f);
    let mut c = SparseCodes::with_capacity(b, f, b * k);
    let mut seen = vec![false; f];
    let mut row = Vec::with_capacity(k);
    for _ in 0..b {
        row.clear();
        while row.len() < k {
            let u = rng.f64() * acc;
            let r = cdf.partition_point(|&x| x < u).min(f - 1);
            let i = perm[r];
            if !seen[i] {
                seen[i] = true;
                row.push((i as u32, 0.1 + 3.0 * rng.f32()));
            }
        }
        for &(i, _) in &row {
            seen[i as usize] = false;
        }
        c.push_row(row.iter().copied());
    }
    c
}

/// A whole TopK training step (the trainer of `saelab_sae::trainer`, F = 16384, k = 40,
/// B = 2048, d_in = 576 as SmolLM2-135M) without and with each method's hooks. Steps of
/// the two models alternate, so slow phases of other load hit both alike. `warmup`
/// untimed steps come first: the default 2 times the methods while their pair stores
/// are still filling (Method 2's takes ~10 steps to reach its bound and steady state,
/// which is what the thousands of steps of a real run cost).
fn step_overhead(reps: usize, methods: &[(String, MethodConfig)], sweep: bool, warmup: usize) {
    let (f, k, b, d) = (16384usize, 40usize, 2048usize, 576usize);
    let steps = if sweep { 3 * reps.max(4) } else { reps.max(4) };
    let x = sparse_mixture(b * (steps + warmup), d, 4096, 40, 0.05, 7);
    let cfg = TrainConfig {
        architecture: Architecture::Topk,
        d_sae: f,
        k,
        batch_size: b,
        // `sweep`: the timed steps cover training progress p from 0 to 1 (the schedules,
        // and the pair statistics that follow them, change with p); otherwise p ~ 0.
        total_tokens: (b * if sweep { steps + warmup } else { 1000 }) as u64,
        ..Default::default()
    };
    for (preset, method) in methods {
        let mut plain = TrainSae::new(&cfg, d, 1000).expect("plain model");
        let mut with = TrainSae::new(&cfg, d, 1000).expect("method model");
        let mut none = TrainHooks::default();
        let mut hooks: TrainHooks = method.build(d, f, 1).expect("build").into();
        let (mut tp, mut tm) = (Vec::new(), Vec::new());
        for s in 0..steps + warmup {
            if s == warmup {
                // Per-phase wall time of the timed steps, to show where the method's cost is.
                plain.profile = Some(Vec::new());
                with.profile = Some(Vec::new());
            }
            let xb = &x[s * b * d..(s + 1) * b * d];
            let t = Instant::now();
            plain.train_step(xb, &mut none).expect("plain step");
            let a = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let sm = with.train_step(xb, &mut hooks).expect("method step");
            let m = t.elapsed().as_secs_f64() * 1e3;
            if std::env::var_os("SAELAB_BENCH_METRICS").is_some() {
                let ex: Vec<String> = sm
                    .extra
                    .iter()
                    .map(|(n, v)| format!("{n}={v:.4}"))
                    .collect();
                println!(
                    "    step {s} (p {:.2}): plain {a:.1} ms, method {m:.1} ms, {}",
                    sm.p,
                    ex.join(" ")
                );
            }
            if s >= warmup {
                tp.push(a);
                tm.push(m);
            }
        }
        tp.sort_by(|a, b| a.total_cmp(b));
        tm.sort_by(|a, b| a.total_cmp(b));
        let (pm, mm) = (tp[tp.len() / 2], tm[tm.len() / 2]);
        println!(
            "TopK step d_in={d} F={f} k={k} B={b}, {steps} alternating steps after {warmup}{}: plain median {pm:.1} ms (min {:.1}), \
             with {preset} median {mm:.1} ms (min {:.1}); ratio of medians {:.3}, of minima {:.3}, of sums {:.3}",
            if sweep { " over p = 0..1" } else { "" },
            tp[0],
            tm[0],
            mm / pm,
            tm[0] / tp[0],
            tm.iter().sum::<f64>() / tp.iter().sum::<f64>()
        );
        let (pp, wp) = (plain.profile.take().unwrap(), with.profile.take().unwrap());
        for (name, t) in &wp {
            let base = pp.iter().find(|e| e.0 == *name).map_or(0.0, |e| e.1);
            let per = |v: f64| v * 1e3 / steps as f64;
            if (per(*t) - per(base)).abs() >= 0.5 {
                println!(
                    "    {name:<48} plain {:6.1} ms/step, with {preset} {:6.1} ms/step",
                    per(base),
                    per(*t)
                );
            }
        }
    }
}

/// `(min, median)` wall time in ms; the minimum is the least disturbed by other load
/// on the machine, the median is reported alongside.
fn time_ms(mut f: impl FnMut(), reps: usize) -> (f64, f64) {
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f();
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    (t[0], t[t.len() / 2])
}

/// CPU time (user + system, all threads) of this process in ms, from /proc/self/stat
/// (clock ticks of 10 ms; used over many repetitions). Less sensitive than wall time to
/// other processes competing for the cores.
fn cpu_ms() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is index 0, utime is field 14 overall -> index 11.
    let ut: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    (ut + st) * 10.0
}

/// CPU ms per call over `reps` calls.
fn cpu_per_call(mut f: impl FnMut(), reps: usize) -> f64 {
    let c0 = cpu_ms();
    for _ in 0..reps {
        f();
    }
    (cpu_ms() - c0) / reps as f64
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    // As `saelab` runs (see saelab_core::malloc); SAELAB_SYSTEM_MALLOC=1 for glibc's default.
    saelab_core::malloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "quick");
    // Optional section filter: `m1`, `dense`, `m2`, `step` (default: all).
    let sections: Vec<&str> = ["m1", "dense", "m2", "step"]
        .into_iter()
        .filter(|s| args.iter().any(|a| a == s))
        .collect();
    let run = |name: &str| sections.is_empty() || sections.contains(&name);
    let reps = if quick { 3 } else { 9 };
    println!(
        "threads: {}, load average at start: {}",
        rayon::current_num_threads(),
        loadavg()
    );
    let (f, k, b) = (16384usize, 40usize, 2048usize);
    let mut rng = Rng::new(42);
    for zipf in [0.0, 1.0] {
        if !run("m1") {
            break;
        }
        let codes = synth_codes(&mut rng, b, f, k, zipf);
        let mut g = vec![0f32; codes.nnz()];
        let st = sparse_penalty(&codes, 0.5, 0.2, false, None, Some(&mut g));
        let (cmin, _) = time_ms(
            || {
                std::hint::black_box(Csc::build(&codes));
            },
            reps,
        );
        let (mn, md) = time_ms(
            || {
                g.iter_mut().for_each(|v| *v = 0.0);
                sparse_penalty(&codes, 0.5, 0.2, false, None, Some(&mut g));
            },
            reps,
        );
        let cpu = cpu_per_call(
            || {
                sparse_penalty(&codes, 0.5, 0.2, false, None, Some(&mut g));
            },
            if quick { 10 } else { 40 },
        );
        println!(
            "method1 sparse F={f} k={k} B={b} zipf={zipf}: wall min {mn:.1} ms, median {md:.1} ms per step, \
             CPU {cpu:.1} ms per step summed over threads \
             (sorting/transposing the codes: wall min {cmin:.1} ms; ordered co-firing pairs {}, ordered pair events {})",
            st.stats.pairs,
            b * k * (k - 1)
        );
        // EMA in steady state: feed fresh batches until the store stops growing.
        let mut ema = PairEma::<2>::new(f, 0.9, 0.01, 8_000_000);
        let batches: Vec<SparseCodes> = (0..4)
            .map(|_| synth_codes(&mut rng, b, f, k, zipf))
            .collect();
        for s in 0..40 {
            sparse_penalty(
                &batches[s % 4],
                0.5,
                0.2,
                false,
                Some(&mut ema),
                Some(&mut g),
            );
        }
        let mut s = 0;
        let (mn, md) = time_ms(
            || {
                s += 1;
                sparse_penalty(
                    &batches[s % 4],
                    0.5,
                    0.2,
                    false,
                    Some(&mut ema),
                    Some(&mut g),
                );
            },
            reps,
        );
        let cpu = cpu_per_call(
            || {
                s += 1;
                sparse_penalty(
                    &batches[s % 4],
                    0.5,
                    0.2,
                    false,
                    Some(&mut ema),
                    Some(&mut g),
                );
            },
            if quick { 10 } else { 40 },
        );
        println!(
            "method1 sparse+EMA(0.9, eps 0.01) F={f} k={k} B={b} zipf={zipf}: min {mn:.1} ms, median {md:.1} ms per step, \
             CPU {cpu:.1} ms per step summed over threads (stored entries {}, {:.0} MB, evicted so far {})",
            ema.entries(),
            ema.entries() as f64 * std::mem::size_of::<saelab_sae::methods::pairs::PairEntry<2>>() as f64 / 1e6,
            ema.evicted
        );
    }
    // Dense research formula vs sparse at small F (the dense one is O(B F^2) time and
    // 3 F^2 f64 memory; at F = 16384 that is 6.4 GB).
    for (f, k, b) in [(256usize, 16usize, 256usize), (1024, 32, 512)] {
        if !run("dense") {
            break;
        }
        let codes = synth_codes(&mut rng, b, f, k, 0.0);
        let dense = codes.to_dense();
        let (dms, _) = time_ms(
            || {
                dense_reference(&dense, b, f, 0.5, 0.2, false, None);
            },
            1,
        );
        let mut g = vec![0f32; codes.nnz()];
        let (sms, _) = time_ms(
            || {
                sparse_penalty(&codes, 0.5, 0.2, false, None, Some(&mut g));
            },
            reps,
        );
        println!(
            "F={f} k={k} B={b}: dense reference (f64, single thread) {dms:.1} ms ({:.1} MB of F x F f64 matrices), sparse {sms:.2} ms",
            3.0 * (f * f * 8) as f64 / 1e6
        );
    }

    if run("step") {
        // `step PRESET...` times only the named presets; `step FILE.toml` a method
        // configuration from a file (the `[method]` table of a training config, e.g.
        // `method = "self_correcting"` with `[penalty] ema_max_entries = 1_000_000`),
        // labelled by the file name.
        let all = ["progressive", "static_control", "self_correcting_no_gate"];
        let preset = |p: &str| (p.to_string(), MethodConfig::preset(p).expect("preset"));
        let mut methods: Vec<(String, MethodConfig)> = all
            .into_iter()
            .filter(|p| args.iter().any(|a| a == p))
            .map(preset)
            .collect();
        for a in args.iter().filter(|a| a.ends_with(".toml")) {
            let text = std::fs::read_to_string(a).unwrap_or_else(|e| panic!("{a}: {e}"));
            let m = MethodConfig::from_toml_str(&text, a, f).unwrap_or_else(|e| panic!("{e:#}"));
            methods.push((a.clone(), m));
        }
        if methods.is_empty() {
            methods = all.into_iter().map(preset).collect();
        }
        let sweep = args.iter().any(|a| a == "sweep");
        // `warmup=N`: untimed steps before the timed ones (default 2).
        let warmup = args
            .iter()
            .find_map(|a| a.strip_prefix("warmup="))
            .map_or(2, |n| n.parse().expect("warmup=N takes a number"));
        // `steps=N`: timed steps per model (default 9, `quick` 3): the ratio of two
        // medians of 9 steps moves by about +-0.04 from round to round.
        let steps = args
            .iter()
            .find_map(|a| a.strip_prefix("steps="))
            .map_or(reps, |n| n.parse().expect("steps=N takes a number"));
        step_overhead(steps, &methods, sweep, warmup);
    }
    if !run("m2") {
        println!("load average at end: {}", loadavg());
        return;
    }
    // Method 2 at F = 16384, d_in = 2304 (gemma-2-2b's width), k = 40, B = 2048.
    let (f, k, b, d_in) = (16384usize, 40usize, 2048usize, 2304usize);
    let mut w = vec![0f32; f * d_in];
    rng.fill_normal(&mut w, 1.0 / (d_in as f32).sqrt());
    // zipf = 1: skewed firing, fewer and hotter pairs; zipf = 0: nearly every pair
    // event a distinct pair (the store at its bound, as in the step benchmark).
    let mut last = (Vec::new(), 0);
    for zipf in [1.0, 0.0] {
        // Distinct batches throughout (repeating a few batches would make the same pairs
        // co-fire again and again); 20 untimed updates bring the store to steady state.
        let (warm, timed) = (20, 3 * reps);
        let batches: Vec<SparseCodes> = (0..warm + timed)
            .map(|_| synth_codes(&mut rng, b, f, k, zipf))
            .collect();
        let mut ema = PairEma::<1>::new(f, 0.99, 1e-3, 4_000_000);
        for batch in &batches[..warm] {
            interference_candidates(batch, &mut ema, Statistic::Correlation, 0.1, 16384);
        }
        let mut s = warm;
        let (mn, md) = time_ms(
            || {
                last = interference_candidates(
                    &batches[s],
                    &mut ema,
                    Statistic::Correlation,
                    0.1,
                    16384,
                );
                s += 1;
            },
            timed,
        );
        println!(
        "method2 pair statistics (EMA 0.99) F={f} k={k} B={b} zipf={zipf}: min {mn:.1} ms, median {md:.1} ms per step \
         (candidate pairs above tau=0.1: {}, kept {}, stored entries {})",
        last.1,
        last.0.len(),
        ema.entries()
    );
    }
    let pairs = last.0.clone();
    // Added into a dense gradient buffer that persists across steps, as the trainer's.
    let mut gd = DecoderGradBuf::zeros(f, d_in);
    let (mn, md) = time_ms(
        || {
            gd.touched.clear();
            interference_penalty(
                &pairs,
                &w,
                d_in,
                Overlap::CosSquared,
                0.01,
                Some(&mut gd.view()),
            );
        },
        reps,
    );
    println!("method2 decoder penalty+gradient, {} pairs, d_in={d_in}: min {mn:.1} ms, median {md:.1} ms", pairs.len());
    let mut pre = vec![0f32; b * f];
    rng.fill_normal(&mut pre, 1.0);
    let mut gate = ZScoreGate::new(GateConfig::default(), f, Arc::new(Mutex::new(Vec::new())));
    let (mn, md) = time_ms(
        || {
            std::hint::black_box(gate.thresholds(&pre, b, f));
        },
        reps,
    );
    println!("method2 z-score gate statistics on [{b} x {f}] pre-activations: min {mn:.1} ms, median {md:.1} ms");
    let mut r = Rng::new(1);
    let (mn, md) = time_ms(
        || {
            std::hint::black_box(randomized_svd(
                &DenseOp {
                    data: &w,
                    rows: f,
                    cols: d_in,
                },
                32,
                8,
                2,
                &mut r,
            ));
        },
        3,
    );
    println!("method2 rank-32 randomized SVD of the decoder [{f} x {d_in}] (profiling): min {mn:.0} ms, median {md:.0} ms");
    println!("load average at end: {}", loadavg());
}
