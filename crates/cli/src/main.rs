//! The `saelab` command line: one binary for the whole pipeline
//! (fetch -> cache activations -> train -> evaluate -> report).
//!
//! Each subcommand lives in its own module and only parses arguments and calls the
//! library crates; no numerics live here.

mod browse;
mod cache;
mod eval;
mod experiment;
mod fetch;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "saelab",
    version,
    about = "Train, evaluate and compare sparse autoencoders on real language-model activations",
    long_about = "saelab trains sparse autoencoders (SAEs) on the activations of a real language \
model, evaluates them with the SAEBench suite and writes reports.\n\n\
Start with `saelab quickstart`: it fetches the default model (SmolLM2-135M-Instruct) and corpora \
into $SAELAB_HOME, caches activations, trains a TopK baseline, the progressive-orthogonality method \
and its static control, evaluates them and prints where the report is.",
    after_help = "Environment: SAELAB_HOME (cache of models/corpora, default ~/.cache/saelab), \
RUST_LOG (log filter, default info), RAYON_NUM_THREADS (threads, default all cores)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download the default model and corpora into $SAELAB_HOME (idempotent).
    Fetch(fetch::FetchArgs),
    /// Run the LM over a corpus and store activations at a hook (resumable).
    Cache(cache::CacheArgs),
    /// Train SAEs from an activation store (several configs share one read).
    Train(train::TrainArgs),
    /// Re-write SAE folders from their checkpoints with this build's export (after an
    /// upgrade that changed how SAEs are saved); nothing is trained. `saelab experiment`
    /// redoes evaluations older than the SAE they evaluated.
    Export(train::ExportArgs),
    /// Evaluate an SAE with the SAEBench suite (core, absorption, sparse_probing, tpp, scr).
    Eval(eval::EvalArgs),
    /// Run an experiment plan: cache once, train variants x seeds, evaluate, report (resumable).
    Experiment(experiment::ExperimentArgs),
    /// Fetch the defaults and run plans/quickstart.toml; prints where the report is.
    Quickstart(experiment::QuickstartArgs),
    /// Re-render report.html / report.md of a run directory from its stored results.
    Report(experiment::ReportArgs),
    /// Print (and write RUN_B/compare.md) the differences between two runs.
    Compare(experiment::CompareArgs),
    /// Feature browser: each latent's top-activating tokens of an activation store, in
    /// context, as one browser.html that opens from disk (and features.json).
    Browse(browse::BrowseArgs),
}

fn main() {
    saelab_core::malloc::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch(a) => fetch::run(a),
        Command::Cache(a) => cache::run(a),
        Command::Train(a) => train::run(a),
        Command::Export(a) => train::export(a),
        Command::Eval(a) => eval::run(a),
        Command::Experiment(a) => experiment::experiment(a),
        Command::Quickstart(a) => experiment::quickstart(a),
        Command::Report(a) => experiment::report(a),
        Command::Compare(a) => experiment::compare(a),
        Command::Browse(a) => browse::run(a),
    }
}
