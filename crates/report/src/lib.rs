//! saelab-report: experiment plans, the runner, and reports.
//!
//! - [`plan`]: the plan file (model, hook, corpus, budget, variants with grids, seeds).
//! - [`stats`]: means and 95% intervals over seeds, Welch differences to a baseline.
//! - [`plots`]: SVG charts rendered in-process (plotters).

pub mod plan;
pub mod plots;
pub mod stats;
