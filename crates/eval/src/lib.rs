//! saelab-eval: the SAEBench evaluations.

pub mod metrics;
pub mod probe;
