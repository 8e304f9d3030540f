//! saelab-report: experiment plans, the runner, and reports.
//!
//! - [`stats`]: means and 95% intervals over seeds, Welch differences to a baseline.
//! - [`plots`]: SVG charts rendered in-process (plotters).

pub mod plots;
pub mod stats;
