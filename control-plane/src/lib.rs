//! control plane
pub mod model;
pub mod store;
pub mod testing;
