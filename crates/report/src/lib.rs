//! saelab-report: experiment plans, the runner, and reports.
//!
//! - [`evalsetup`]: evaluation tasks from the reachable corpora; the shared evaluator.
//! - [`plan`]: the plan file (model, hook, corpus, budget, variants with grids, seeds).
//! - [`results`]: the run-directory layout and the records read back from it.
//! - [`report`]: report.html / report.md with tables and plots from stored results.
//! - [`runner`]: `saelab experiment`: cache once, train variants x seeds, evaluate, report.
//! - [`stats`]: means and 95% intervals over seeds, differences to a baseline (paired over
//!   seeds, Welch when the seeds differ).
//! - [`plots`]: SVG charts rendered in-process (plotters).
//! - [`browser`]: the feature browser (top-activating tokens per latent, in context).

pub mod browser;
pub mod evalsetup;
pub mod plan;
pub mod plots;
pub mod report;
pub mod results;
pub mod runner;
pub mod stats;
