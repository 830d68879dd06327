//! `cargo bench --bench train`: the same measurement as `polyburn bench train`, on
//! `configs/bench.yaml` (tokens/s, matmul GFLOP/s and MFU from one run).

use polyburn::bench::{TrainBenchOptions, bench_train};
use polyburn::config::Config;

#[global_allocator]
static ALLOC: polyburn::memory::PeakAlloc = polyburn::memory::PeakAlloc;

fn main() -> anyhow::Result<()> {
    polyburn::memory::keep_freed_memory();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/bench.yaml");
    let config = Config::load(&path, &[])?;
    let report = bench_train(&config, &TrainBenchOptions { timed_steps: 5 })?;
    println!("{report}");
    Ok(())
}
