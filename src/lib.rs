//! polyburn: train language models from YAML configs on Burn.

pub mod config;
pub mod data;
pub mod device;
pub mod diversity;
pub mod eval;
pub mod hub;
pub mod model;
pub mod rng;
pub mod train;
pub mod weights;
pub mod bench;
pub mod kernel_bench;
pub mod memory;
pub mod plot;
pub mod sweep;
pub mod timing;
