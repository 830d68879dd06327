//! polyburn's custom ops. Each op lives in its own module with a reference (the definition
//! every faster implementation is checked against), a fused implementation registered as a
//! Burn backend extension (Flex CPU kernels here) and, for differentiable ops, its Autodiff
//! backward.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod diversity;
#[cfg(feature = "cube")]
mod cube_tensors;
mod flex_tensors;
pub mod lcs;
mod math;
pub mod norm;

/// Every device this build runs on, by the name configs use: `flex` (the CPU) always, `wgpu`
/// with the `wgpu` feature (whatever adapter wgpu finds: a GPU, or Mesa's software Vulkan),
/// `cuda` (GPU 0) with the `cuda` feature. Device selection, the kernel harness and the
/// kernel benchmark all take their devices from here.
pub fn compiled_devices() -> Vec<(&'static str, burn::tensor::Device)> {
    #[allow(unused_mut)]
    let mut devices = vec![("flex", burn::tensor::Device::flex())];
    #[cfg(feature = "wgpu")]
    devices.push(("wgpu", burn::tensor::Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)));
    #[cfg(feature = "cuda")]
    devices.push(("cuda", burn::tensor::Device::cuda(0usize)));
    devices
}

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
