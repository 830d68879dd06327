//! polyburn's custom ops. Each op lives in its own module with a reference (the definition
//! every faster implementation is checked against), a fused implementation registered as a
//! Burn backend extension (Flex CPU kernels here) and, for differentiable ops, its Autodiff
//! backward.

pub mod attention;
pub mod cross_entropy;
pub mod diversity;
#[cfg(feature = "cube")]
mod cube_tensors;
mod flex_tensors;
pub mod lcs;
mod math;

/// Whether `device` runs the CubeCL kernels (a GPU, or wgpu on a software Vulkan driver).
pub(crate) fn is_cube(device: &burn::tensor::Device) -> bool {
    #[cfg(feature = "cube")]
    {
        matches!(device.clone().inner().as_dispatch(), burn::backend::DispatchDevice::Cube(_))
    }
    #[cfg(not(feature = "cube"))]
    {
        let _ = device;
        false
    }
}
