//! `cargo bench --bench kernels [--features wgpu|cuda]`: the same sweep as
//! `polyburn bench kernels` (fused vs reference, every op, every device compiled in), printed as
//! its table. Peak memory needs the counting allocator, installed here as in the binary.

use polyburn::kernel_bench::{KernelBenchOptions, bench_kernels};
use polyburn::memory::PeakAlloc;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

fn main() -> anyhow::Result<()> {
    polyburn::memory::keep_freed_memory();
    println!("{}", bench_kernels(&KernelBenchOptions::default())?);
    Ok(())
}
