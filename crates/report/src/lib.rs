//! saelab-report: experiment plans, the runner, reports.
