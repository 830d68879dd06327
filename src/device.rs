//! Backend selection by name. Flex (pure-Rust CPU) is always built; `wgpu` and `cuda` are
//! cargo features, and asking for one that was not compiled in is a clear error.

use anyhow::{Result, bail};
use burn::tensor::Device;

pub fn device_from_name(name: &str) -> Result<Device> {
    if let Some((_, device)) = polyburn_kernels::compiled_devices().into_iter().find(|(n, _)| *n == name) {
        return Ok(device);
    }
    match name {
        "wgpu" | "cuda" => bail!("run.device: `{name}` was not compiled in; rebuild with `cargo build --features {name}`"),
        other => bail!("run.device: unknown device `{other}` (flex, wgpu or cuda)"),
    }
}
