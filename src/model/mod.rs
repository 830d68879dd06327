//! Models polyburn trains.

pub mod transformer;

pub use transformer::{Gpt, GptConfig};
