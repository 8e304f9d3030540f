//! saelab-eval: the SAEBench evaluations.

pub mod absorption;
pub mod cache;
pub mod core_eval;
pub mod lm_api;
pub mod metrics;
pub mod output;
pub mod probe;
pub mod scr_tpp;
pub mod sparse_probing;
pub mod tasks;

#[cfg(test)]
pub(crate) mod testutil;
