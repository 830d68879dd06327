//! Backend selection by name. Flex (pure-Rust CPU) is always built; `wgpu` and `cuda` are
//! cargo features, and asking for one that was not compiled in is a clear error.

use anyhow::{Result, bail};
use burn::tensor::Device;

pub fn device_from_name(name: &str) -> Result<Device> {
    match name {
        "flex" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(0usize)),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => not_compiled_in(name),
        #[cfg(not(feature = "cuda"))]
        "cuda" => not_compiled_in(name),
        other => bail!("run.device: unknown device `{other}` (flex, wgpu or cuda)"),
    }
}

#[allow(dead_code)] // unused when every backend feature is on
fn not_compiled_in(name: &str) -> Result<Device> {
    bail!("run.device: `{name}` was not compiled in; rebuild with `cargo build --features {name}`")
}
