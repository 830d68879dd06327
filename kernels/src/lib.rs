//! polyburn's custom ops. Each op lives in its own module with a reference (the definition
//! every faster implementation is checked against), a fused implementation registered as a
//! Burn backend extension (Flex CPU kernels here) and, for differentiable ops, its Autodiff
//! backward.

pub mod attention;
pub mod diversity;
#[cfg(feature = "cube")]
mod cube_tensors;
mod flex_tensors;
pub mod lcs;
