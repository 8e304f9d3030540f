//! saelab-data: text in, activations out.
//!
//! (Module API summary is completed below as modules land.)

pub mod corpus;
pub mod packing;
pub mod store;
