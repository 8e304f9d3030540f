//! saelab-eval: the SAEBench evaluations.
