//! End to end on the real model: a tiny plan (a few thousand tokens, tiny SAEs) runs
//! through cache -> train -> evaluate -> report; a rerun skips finished work; a variant
//! whose record says it trained zero steps is flagged in the report; an SAE re-exported
//! since its evaluation is evaluated (and browsed) again.

use saelab_report::evalsetup::SuiteEvaluator;
use saelab_report::plan::Plan;
use saelab_report::runner::{run_plan, write_run_report, RunOptions};
use std::path::Path;

const PLAN: &str = r#"
name = "e2e"
model = "default"
hook = "blocks.3.hook_resid_post"
corpus = "moby-dick"
train_tokens = 6144
seeds = [0, 1]
evals = ["core"]
eval_sizes = "tiny"
baseline = "topk"

[train]
architecture = "topk"
d_sae = 128
k = 8
batch_size = 512
warmup_steps = 2
log_every = 2
hist_every = 4
checkpoint_every = 0
dead_tokens = 2048

[[variants]]
name = "topk"

[[variants]]
name = "relu"
train = { architecture = "standard", l1_coeff = 0.01 }
"#;

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn tiny_plan_end_to_end_then_resume_skips_and_flags_zero_steps() {
    let run = std::env::temp_dir().join(format!("saelab-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run);
    let plan = Plan::parse(PLAN).unwrap();
    let ev = SuiteEvaluator::new(Some(run.join("eval-cache")));
    let opts = RunOptions {
        run_dir: run.clone(),
        progress: false,
    };
    let report = run_plan(&plan, PLAN, &ev, &opts).unwrap();

    // Run directory and files.
    for f in [
        "saelab-run.json",
        "plan.toml",
        "activations/manifest.json",
        "results.csv",
        "results.json",
        "report.md",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    assert_eq!(report, run.join("report.html"));
    for v in ["topk", "relu"] {
        for s in [0, 1] {
            let d = run.join("variants").join(v).join(format!("seed-{s}"));
            for f in [
                "cfg.json",
                "sae_weights.safetensors",
                "metrics.jsonl",
                "summary.json",
                "evals/core_eval_results.json",
            ] {
                assert!(d.join(f).exists(), "missing {v}/seed-{s}/{f}");
            }
            let summary: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap())
                    .unwrap();
            assert_eq!(
                summary["steps"].as_u64(),
                Some(12),
                "6144 tokens / 512 per step"
            );
        }
    }
    // Results table: header + 4 rows, with core metrics measured.
    let csv = std::fs::read_to_string(run.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    let header = csv.lines().next().unwrap();
    assert!(
        header.contains("core.model_performance_preservation.ce_loss_score"),
        "{header}"
    );
    assert!(
        header.contains("train.fvu") || header.contains("train.loss"),
        "{header}"
    );
    // Report sections.
    let html = std::fs::read_to_string(&report).unwrap();
    for s in [
        "Setup",
        "Headline metrics",
        "Sparsity-fidelity frontier",
        "Training curves",
        "Feature separation",
        "Evaluations by k and N",
        "All metrics",
        "LM precision",
    ] {
        assert!(html.contains(s), "report lacks section {s}");
    }
    assert!(!html.contains("ZERO STEPS"));
    // Feature browsers for each variant's first seed, linked from the report.
    for v in ["topk", "relu"] {
        let d = run.join("variants").join(v);
        assert!(
            d.join("seed-0/browser/browser.html").exists(),
            "{v}: no browser"
        );
        assert!(d.join("seed-0/browser/features.json").exists());
        assert!(
            !d.join("seed-1/browser").exists(),
            "{v}: browser for a later seed"
        );
        assert!(
            html.contains(&format!("variants/{v}/seed-0/browser/browser.html")),
            "report does not link {v}'s browser"
        );
    }
    assert!(
        html.contains("complete: all 4 SAEs trained and evaluated"),
        "status row"
    );

    // Resume: nothing is redone.
    let sae_file = run.join("variants/topk/seed-0/sae_weights.safetensors");
    let eval_file = run.join("variants/relu/seed-1/evals/core_eval_results.json");
    let browser = run.join("variants/topk/seed-0/browser/browser.html");
    let (t_sae, t_eval, t_browser) = (mtime(&sae_file), mtime(&eval_file), mtime(&browser));
    run_plan(&plan, PLAN, &ev, &opts).unwrap();
    assert_eq!(mtime(&sae_file), t_sae, "finished training was redone");
    assert_eq!(mtime(&eval_file), t_eval, "finished evaluation was redone");
    assert_eq!(mtime(&browser), t_browser, "a current browser was redone");

    // A record of zero steps is flagged.
    let sp = run.join("variants/relu/seed-1/summary.json");
    let mut summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sp).unwrap()).unwrap();
    summary["steps"] = serde_json::json!(0);
    std::fs::write(&sp, summary.to_string()).unwrap();
    write_run_report(&run, &plan).unwrap();
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        md.lines()
            .any(|l| l.starts_with("| relu | 1 | 0 |") && l.contains("ZERO STEPS")),
        "{md}"
    );

    // A run missing an evaluation says its report is partial.
    std::fs::remove_file(&eval_file).unwrap();
    write_run_report(&run, &plan).unwrap();
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        md.contains("| status | PARTIAL: 4 of 4 SAEs trained, 3 of 4 evaluated"),
        "{md}"
    );

    // An SAE re-written from its checkpoint (`saelab export`) makes its evaluations
    // stale: the status counts it unevaluated, and a rerun redoes exactly those.
    let topk0 = run.join("variants/topk/seed-0");
    let topk0_eval = topk0.join("evals/core_eval_results.json");
    let untouched = run.join("variants/relu/seed-0/evals/core_eval_results.json");
    let t_untouched = mtime(&untouched);
    assert_eq!(saelab_sae::export_checkpoint(&topk0).unwrap(), (12, 12));
    assert!(mtime(&topk0.join("sae_weights.safetensors")) > mtime(&topk0_eval));
    write_run_report(&run, &plan).unwrap();
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        md.contains("| status | PARTIAL: 4 of 4 SAEs trained, 2 of 4 evaluated"),
        "{md}"
    );
    run_plan(&plan, PLAN, &ev, &opts).unwrap();
    assert!(mtime(&topk0_eval) >= mtime(&topk0.join("sae_weights.safetensors")));
    assert!(
        mtime(&browser) >= mtime(&topk0.join("sae_weights.safetensors")),
        "the re-exported SAE's browser was not redone"
    );
    assert!(eval_file.exists(), "the missing evaluation was redone");
    assert_eq!(
        mtime(&untouched),
        t_untouched,
        "a current evaluation was redone"
    );
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        md.contains("complete: all 4 SAEs trained and evaluated"),
        "{md}"
    );

    // browser_rows is output only: changing it does not make another plan.
    let no_browsers = format!("browser_rows = 0\n{PLAN}");
    let (t_eval, t_browser) = (mtime(&eval_file), mtime(&browser));
    run_plan(
        &Plan::parse(&no_browsers).unwrap(),
        &no_browsers,
        &ev,
        &opts,
    )
    .unwrap();
    assert_eq!(mtime(&eval_file), t_eval, "finished evaluation was redone");
    assert_eq!(
        mtime(&browser),
        t_browser,
        "an existing browser is kept as it is"
    );

    // A different plan in the same directory is refused before any compute.
    let other = PLAN.replace("train_tokens = 6144", "train_tokens = 8192");
    let e = run_plan(&Plan::parse(&other).unwrap(), &other, &ev, &opts).unwrap_err();
    assert!(format!("{e:#}").contains("different plan"), "{e:#}");

    // Activations cached in f32 are not reused by a plan asking for bf16 arithmetic.
    let run2 = run.with_extension("bf16");
    let _ = std::fs::remove_dir_all(&run2);
    std::fs::create_dir_all(run2.join("activations")).unwrap();
    for f in std::fs::read_dir(run.join("activations")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, run2.join("activations").join(f.file_name().unwrap())).unwrap();
    }
    let bf16 = PLAN.replace("seeds = [0, 1]", "seeds = [0, 1]\nlm_precision = \"bf16\"");
    let opts2 = RunOptions {
        run_dir: run2.clone(),
        progress: false,
    };
    let e = run_plan(&Plan::parse(&bf16).unwrap(), &bf16, &ev, &opts2).unwrap_err();
    assert!(
        format!("{e:#}").contains("holds activations of") && format!("{e:#}").contains("[bf16]"),
        "{e:#}"
    );
    // ... nor by a plan that packs one document per row.
    let _ = std::fs::remove_file(run2.join("plan.toml"));
    let per_doc = PLAN.replace("seeds = [0, 1]", "seeds = [0, 1]\npack = \"per-doc\"");
    let e = run_plan(&Plan::parse(&per_doc).unwrap(), &per_doc, &ev, &opts2).unwrap_err();
    assert!(format!("{e:#}").contains("packed as \"Concat\""), "{e:#}");
    std::fs::remove_dir_all(&run2).unwrap();
    std::fs::remove_dir_all(&run).unwrap();
}
