//! `polyburn bench kernels`: every fused op against its reference on the same inputs, over a
//! size sweep, timed and memory-measured in one run (peak memory from [`crate::memory`]).

use std::fmt;

use anyhow::Result;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Distribution, Gradients, Tensor, TensorData};
use polyburn_kernels::attention::{AttentionImpl, AttentionOptions, attention};
use polyburn_kernels::activation::{ActivationImpl, Gate, GatedUnit, gated_unit, gelu};
use polyburn_kernels::adamw::{AdamWImpl, AdamWStep, adamw};
use polyburn_kernels::cross_entropy::{CrossEntropyImpl, linear_cross_entropy};
use polyburn_kernels::diversity::{DiversityImpl, pairwise_cosine_diversity};
use polyburn_kernels::lcs::{LcsImpl, lcs_groups, lcs_similarity};
use polyburn_kernels::norm::{NormImpl, NormKind, norm};
use serde::Serialize;

/// One row of the comparison (`--json` prints an array of these).
#[derive(Debug, Clone, Serialize)]
pub struct KernelRecord {
    pub op: String,
    pub device: String,
    pub size: String,
    pub fused_ms: f64,
    pub reference_ms: f64,
    /// `reference_ms / fused_ms`: the fused op's speedup.
    pub ratio: f64,
    pub fused_peak_bytes: Option<usize>,
    pub reference_peak_bytes: Option<usize>,
}

pub struct KernelTable(pub Vec<KernelRecord>);

impl fmt::Display for KernelTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: Option<usize>| b.map_or("-".into(), |b| format!("{:.1}", b as f64 / (1 << 20) as f64));
        writeln!(f, "{:<26} {:<6} {:<14} {:>11} {:>13} {:>8} {:>12} {:>14} {:>8}", "op", "device", "size", "fused ms", "reference ms", "speedup", "fused MiB", "reference MiB", "memory")?;
        for r in &self.0 {
            let mem = match (r.fused_peak_bytes, r.reference_peak_bytes) {
                (Some(a), Some(b)) if a > 0 => format!("{:.1}x", b as f64 / a as f64),
                _ => "-".into(),
            };
            writeln!(
                f,
                "{:<26} {:<6} {:<14} {:>11.2} {:>13.2} {:>7.1}x {:>12} {:>14} {:>8}",
                r.op, r.device, r.size, r.fused_ms, r.reference_ms, r.ratio, mib(r.fused_peak_bytes), mib(r.reference_peak_bytes), mem
            )?;
        }
        Ok(())
    }
}

/// A device the sweep runs on. Host peaks are only meaningful on the CPU (flex): a GPU
/// device's buffers are not host allocations, so its peaks are reported as unknown.
struct BenchDevice {
    device: Device,
    name: &'static str,
    host_memory: bool,
}

impl BenchDevice {
    /// Median wall time (ms) of `repeats` runs after one warm-up, and the largest peak seen.
    /// Every measured closure reads its results back, so GPU work is finished when it returns.
    fn time(&self, repeats: usize, mut f: impl FnMut()) -> (f64, Option<usize>) {
        let timed = crate::timing::time_infallible(1, repeats, |_| crate::memory::measure_peak(&mut f).1);
        let peak = timed.results.iter().copied().max().flatten();
        (timed.median_ms(), if self.host_memory { peak } else { None })
    }
}

fn record(op: &str, device: &str, size: String, fused: (f64, Option<usize>), reference: (f64, Option<usize>)) -> KernelRecord {
    KernelRecord {
        op: op.into(),
        device: device.into(),
        size,
        fused_ms: fused.0,
        reference_ms: reference.0,
        ratio: reference.0 / fused.0,
        fused_peak_bytes: fused.1,
        reference_peak_bytes: reference.1,
    }
}

/// Every timed call starts from host data, as the ops' callers do, so no device can serve a
/// result computed for an earlier call on the same tensors.
fn upload<const D: usize>(data: &TensorData, device: &Device) -> Tensor<D> {
    Tensor::from_data(data.clone(), device)
}

/// Reads each input's gradient back to the host (so GPU work is finished), taking it out of
/// `grads`: a gradient still shared with the container is copied by `into_data`, a cost of
/// the benchmark rather than of either side (at G 4096 that copy was 60 % of the fused
/// diversity's time).
fn read_gradients<const D: usize>(grads: &mut Gradients, inputs: &[&Tensor<D>]) {
    for x in inputs {
        let _ = x.grad_remove(grads).expect("gradient").into_data();
    }
}

/// Which sizes to sweep.
pub struct KernelBenchOptions {
    pub attention_t: Vec<usize>,
    pub diversity_g: Vec<usize>,
    pub lcs_l: Vec<usize>,
    pub cross_entropy_n: Vec<usize>,
    pub repeats: usize,
}

impl Default for KernelBenchOptions {
    fn default() -> Self {
        Self {
            attention_t: vec![128, 256, 512, 1024, 2048], diversity_g: vec![64, 256, 1024, 4096], lcs_l: vec![16, 32, 64, 128, 256],
            cross_entropy_n: vec![512, 2048],
            repeats: 3,
        }
    }
}

/// Attention forward + backward (B = 4, H = 4, Dh = 64, causal) on an autodiff device:
/// fused vs polyburn's reference, and fused vs Burn's own `attention` (which runs its unfused
/// fallback under autodiff).
fn bench_attention(d: &BenchDevice, o: &KernelBenchOptions, out: &mut Vec<KernelRecord>) {
    let (ad, name) = (d.device.clone().autodiff(), d.name);
    for &t in &o.attention_t {
        ad.seed(t as u64);
        let shape = [4, 4, t, 64];
        let normal = Distribution::Normal(0.0, 1.0);
        let host = || Tensor::<4>::random(shape, normal, &ad).into_data();
        let (q, k, v) = (host(), host(), host());
        let run = |f: &dyn Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>| {
            let (q, k, v) = (upload(&q, &ad).require_grad(), upload(&k, &ad).require_grad(), upload(&v, &ad).require_grad());
            let mut grads = f(q.clone(), k.clone(), v.clone()).sum().backward();
            read_gradients(&mut grads, &[&q, &k, &v]);
        };
        let ours = |implementation| move |q, k, v| attention(q, k, v, AttentionOptions { causal: true, ..Default::default() }, implementation);
        let fused = d.time(o.repeats, || run(&ours(AttentionImpl::Fused)));
        let reference = d.time(o.repeats, || run(&ours(AttentionImpl::Reference)));
        let burn = d.time(o.repeats, || {
            run(&|q, k, v| burn_attention(q, k, v, None, None, AttentionModuleOptions { scale: None, softcap: None, is_causal: true }))
        });
        out.push(record("flash_attention_fwd_bwd", name, format!("T={t}"), fused, reference));
        out.push(record("flash_attention_vs_burn", name, format!("T={t}"), fused, burn));
    }
}

/// Diversity forward + backward, N = 8, D = 384.
fn bench_diversity(d: &BenchDevice, o: &KernelBenchOptions, out: &mut Vec<KernelRecord>) {
    let (ad, name) = (d.device.clone().autodiff(), d.name);
    for &g in &o.diversity_g {
        ad.seed(g as u64);
        let e = Tensor::<3>::random([g, 8, 384], Distribution::Normal(0.0, 1.0), &ad).into_data();
        let run = |implementation| {
            let e: Tensor<3> = upload(&e, &ad).require_grad();
            let mut grads = pairwise_cosine_diversity(e.clone(), implementation).sum().backward();
            read_gradients(&mut grads, &[&e]);
        };
        let fused = d.time(o.repeats, || run(DiversityImpl::Fused));
        let reference = d.time(o.repeats, || run(DiversityImpl::Reference));
        out.push(record("pairwise_cosine_diversity", name, format!("G={g},N=8,D=384"), fused, reference));
    }
}

/// LM head + cross-entropy forward and backward at the bench model's head (D = 256,
/// V = 8192, untied [V, D] head), every row counted.
fn bench_cross_entropy(d: &BenchDevice, o: &KernelBenchOptions, out: &mut Vec<KernelRecord>) {
    let (ad, name) = (d.device.clone().autodiff(), d.name);
    let (dim, vocab) = (256, 8192);
    for &n in &o.cross_entropy_n {
        ad.seed(n as u64);
        let normal = Distribution::Normal(0.0, 1.0);
        let hidden = Tensor::<2>::random([n, dim], normal, &ad).into_data();
        let head = Tensor::<2>::random([vocab, dim], Distribution::Normal(0.0, 0.05), &ad).into_data();
        let targets: Vec<i64> = (0..n).map(|i| ((i * 7919) % vocab) as i64).collect();
        let targets = TensorData::new(targets, [n]);
        let weights = TensorData::new(vec![1.0 / n as f32; n], [n]);
        let run = |implementation| {
            let (h, w): (Tensor<2>, Tensor<2>) = (upload(&hidden, &ad).require_grad(), upload(&head, &ad).require_grad());
            let loss = linear_cross_entropy(h.clone(), w.clone(), Tensor::from_data(targets.clone(), &ad), upload(&weights, &ad), implementation);
            let mut grads = loss.backward();
            read_gradients(&mut grads, &[&h, &w]);
        };
        let fused = d.time(o.repeats, || run(CrossEntropyImpl::Fused));
        let reference = d.time(o.repeats, || run(CrossEntropyImpl::Reference));
        out.push(record("linear_cross_entropy", name, format!("N={n},D={dim},V={vocab}"), fused, reference));
    }
}

/// GELU forward + backward over `[N, 1024]` (the bench model's FFN width), exact form.
fn bench_gelu(d: &BenchDevice, o: &KernelBenchOptions, out: &mut Vec<KernelRecord>) {
    let (ad, name) = (d.device.clone().autodiff(), d.name);
    for &n in &o.cross_entropy_n {
        ad.seed(n as u64 + 1);
        let x = Tensor::<2>::random([n, 1024], Distribution::Normal(0.0, 1.0), &ad).into_data();
        let run = |implementation| {
            let x: Tensor<2> = upload(&x, &ad).require_grad();
            let mut grads = gelu(x.clone(), false, implementation).sum().backward();
            read_gradients(&mut grads, &[&x]);
        };
        let fused = d.time(o.repeats, || run(ActivationImpl::Fused));
        let reference = d.time(o.repeats, || run(ActivationImpl::Reference));
        out.push(record("gelu", name, format!("N={n},D=1024"), fused, reference));
    }
}

/// LayerNorm and RMSNorm forward + backward over `[N, 256]` (the bench model's width), with
/// gradients to the input and the affine parameters.
fn bench_norm(d: &BenchDevice, o: &KernelBenchOptions, out: &mut Vec<KernelRecord>) {
    let (ad, name) = (d.device.clone().autodiff(), d.name);
    let dim = 256;
    for &n in &o.cross_entropy_n {
        ad.seed(n as u64 + 2);
        let x = Tensor::<2>::random([n, dim], Distribution::Normal(0.5, 2.0), &ad).into_data();
        let gamma = Tensor::<1>::random([dim], Distribution::Normal(1.0, 0.1), &ad).into_data();
        let beta = Tensor::<1>::random([dim], Distribution::Normal(0.0, 0.1), &ad).into_data();
        for (kind, label) in [(NormKind::Layer, "layer_norm"), (NormKind::Rms, "rms_norm")] {
            let run = |implementation| {
                let x: Tensor<2> = upload(&x, &ad).require_grad();
                let g: Tensor<1> = upload(&gamma, &ad).require_grad();
                let b: Option<Tensor<1>> = (kind == NormKind::Layer).then(|| upload(&beta, &ad).require_grad());
                let mut grads = norm(x.clone(), g.clone(), b.clone(), 1e-5, kind, implementation).sum().backward();
                read_gradients(&mut grads, &[&x]);
                read_gradients(&mut grads, &[&g]);
                if let Some(b) = &b {
                    read_gradients(&mut grads, &[b]);
                }
            };
            let fused = d.time(o.repeats, || run(NormImpl::Fused));
            let reference = d.time(o.repeats, || run(NormImpl::Reference));
            out.push(record(label, name, format!("N={n},D={dim}"), fused, reference));
        }
    }
}

/// paGLU's mix `A ⊙ (α·σ(B) + 1 − α)` forward + backward over `[N, 1024]`, learnable α.
fn bench_gated_unit(d: &BenchDevice, o: &KernelBenchOptions, out: &mut Vec<KernelRecord>) {
    let (ad, name) = (d.device.clone().autodiff(), d.name);
    let unit = GatedUnit { gate: Gate::Sigmoid, tanh_value: false };
    for &n in &o.cross_entropy_n {
        ad.seed(n as u64 + 3);
        let normal = Distribution::Normal(0.0, 1.0);
        let (a, b) = (Tensor::<2>::random([n, 1024], normal, &ad).into_data(), Tensor::<2>::random([n, 1024], normal, &ad).into_data());
        let alpha = TensorData::new(vec![0.5f32], [1]);
        let run = |implementation| {
            let (a, b): (Tensor<2>, Tensor<2>) = (upload(&a, &ad).require_grad(), upload(&b, &ad).require_grad());
            let alpha: Tensor<1> = upload(&alpha, &ad).require_grad();
            let mut grads = gated_unit(a.clone(), b.clone(), alpha.clone(), unit, implementation).sum().backward();
            read_gradients(&mut grads, &[&a, &b]);
            read_gradients(&mut grads, &[&alpha]);
        };
        let fused = d.time(o.repeats, || run(ActivationImpl::Fused));
        let reference = d.time(o.repeats, || run(ActivationImpl::Reference));
        out.push(record("pagating_paglu", name, format!("N={n},D=1024"), fused, reference));
    }
}

/// One AdamW update of the bench model's `[8192, 256]` embedding (moments present, clip
/// scale ≠ 1).
fn bench_adamw(d: &BenchDevice, o: &KernelBenchOptions, out: &mut Vec<KernelRecord>) {
    let (device, name) = (&d.device, d.name);
    device.seed(4);
    let shape = [8192, 256];
    let normal = Distribution::Normal(0.0, 1.0);
    let host = || Tensor::<2>::random(shape, normal, device).into_data();
    let (param, grad, m) = (host(), host(), host());
    let v = Tensor::<2>::random(shape, Distribution::Uniform(0.0, 1.0), device).into_data();
    let step = AdamWStep { learning_rate: 1e-3, beta_1: 0.9, beta_2: 0.95, epsilon: 1e-8, weight_decay: 0.1, time: 10, grad_scale: 0.7 };
    let run = |implementation| {
        let moments = Some((upload::<2>(&m, device), upload::<2>(&v, device)));
        let (p, m, v) = adamw(upload(&param, device), upload(&grad, device), moments, step, implementation);
        for x in [p, m, v] {
            let _ = x.into_data();
        }
    };
    let fused = d.time(o.repeats, || run(AdamWImpl::Fused));
    let reference = d.time(o.repeats, || run(AdamWImpl::Reference));
    out.push(record("adamw", name, "param=8192x256".into(), fused, reference));
}

/// LCS lengths of every pair of 64 groups × 8 sequences (alphabet 64).
fn bench_lcs(d: &BenchDevice, o: &KernelBenchOptions, out: &mut Vec<KernelRecord>) {
    let (device, name) = (&d.device, d.name);
    for &l in &o.lcs_l {
        let (g, n) = (64, 8);
        let mut rng = crate::rng::SplitMix64::new(l as u64);
        let tokens: Vec<i64> = (0..g * n * l).map(|_| rng.below(64) as i64).collect();
        let t = TensorData::new(tokens.clone(), [g, n, l]);
        let len = TensorData::new(vec![l as i64; g * n], [g, n]);
        let run = |implementation| {
            let _ = lcs_similarity(Tensor::from_data(t.clone(), device), Tensor::from_data(len.clone(), device), implementation).into_data();
        };
        let fused = d.time(o.repeats, || run(LcsImpl::Fused));
        let reference = d.time(o.repeats, || run(LcsImpl::Reference));
        out.push(record("lcs_similarity", name, format!("G=64,N=8,L={l}"), fused, reference));
        if d.host_memory {
            continue;
        }
        // Where `kernels.lcs_gpu_min_cells` comes from: the same host sequences through the
        // GPU kernel (`fused_ms`, transfers included) and the CPU bit-parallel code
        // (`reference_ms`); `ratio` > 1 means the GPU wins at this size.
        let host: Vec<Vec<i64>> = tokens.chunks(l).map(<[i64]>::to_vec).collect();
        let groups: Vec<Vec<&[i64]>> = host.chunks(n).map(|g| g.iter().map(Vec::as_slice).collect()).collect();
        let cells = (g * n * n * l * l) as u64;
        let gpu = d.time(o.repeats, || drop(lcs_groups(&groups, device, 0)));
        let cpu = d.time(o.repeats, || drop(lcs_groups(&groups, device, u64::MAX)));
        out.push(record("lcs_gpu_vs_cpu", name, format!("cells={cells}"), gpu, cpu));
    }
}

/// Every op on every device compiled in: flex, and wgpu / cuda with those features.
pub fn bench_kernels(o: &KernelBenchOptions) -> Result<KernelTable> {
    let devices: Vec<BenchDevice> = polyburn_kernels::compiled_devices()
        .into_iter()
        .map(|(name, device)| BenchDevice { device, name, host_memory: name == "flex" })
        .collect();
    let mut out = Vec::new();
    for d in &devices {
        bench_cross_entropy(d, o, &mut out);
        bench_gelu(d, o, &mut out);
        bench_gated_unit(d, o, &mut out);
        bench_norm(d, o, &mut out);
        bench_adamw(d, o, &mut out);
        bench_diversity(d, o, &mut out);
        bench_lcs(d, o, &mut out);
        bench_attention(d, o, &mut out);
    }
    Ok(KernelTable(out))
}
