//! One harness for every fused op: fresh random inputs per case (a fixed seed each), shapes
//! that are not multiples of any tile, forward outputs and input gradients of the fused
//! implementation against the reference, with a tolerance stated per op.

use burn::tensor::{Bool, Device, Distribution, Int, Tensor, TensorData};
use polyburn_kernels::adamw::{AdamWImpl, AdamWStep, adamw};
use polyburn_kernels::activation::{ActivationImpl, Gate, GatedUnit, gated_unit, gelu};
use polyburn_kernels::attention::{AttentionImpl, AttentionOptions, attention};
use polyburn_kernels::cross_entropy::{CrossEntropyImpl, linear_cross_entropy};
use polyburn_kernels::diversity::{DiversityImpl, pairwise_cosine_diversity, pooled_cosine_diversity};
use polyburn_kernels::lcs::{LcsImpl, lcs_group_dp, lcs_groups, lcs_similarity};
use polyburn_kernels::norm::{NormImpl, NormKind, norm};

/// `|fused − reference| ≤ atol + rtol · |reference|` element-wise; a NaN on either side fails.
#[derive(Debug, Clone, Copy)]
struct Tolerance {
    atol: f32,
    rtol: f32,
}

fn assert_close(what: &str, fused: &[f32], reference: &[f32], tol: Tolerance) {
    assert_eq!(fused.len(), reference.len(), "{what}: lengths differ");
    let mut worst = (0.0f32, 0usize);
    for (i, (a, b)) in fused.iter().zip(reference).enumerate() {
        let excess = (a - b).abs() - (tol.atol + tol.rtol * b.abs());
        assert!(!a.is_nan() && !b.is_nan(), "{what}: element {i} is NaN (unwritten or invalid): fused {a}, reference {b}");
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    let i = worst.1;
    assert!(worst.0 <= 0.0, "{what}: element {i}: fused {} vs reference {} (tolerance {tol:?})", fused[i], reference[i]);
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// Flex, plus every Cube runtime compiled in: `--features wgpu` runs the CubeCL kernels on
/// whatever adapter wgpu finds (Mesa's software Vulkan in CI), `--features cuda` on GPU 0.
fn devices() -> Vec<Device> {
    polyburn_kernels::compiled_devices().into_iter().map(|(_, d)| d).collect()
}

/// Forward output and the gradients of `sum(out · w)` w.r.t. `inputs`, for one implementation.
fn forward_and_grads<const D: usize, const O: usize>(
    inputs: &[Tensor<D>],
    weights: &Tensor<O>,
    op: impl Fn(Vec<Tensor<D>>) -> Tensor<O>,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let tracked: Vec<Tensor<D>> = inputs.iter().map(|t| t.clone().require_grad()).collect();
    let out = op(tracked.clone());
    let grads = (out.clone() * weights.clone()).sum().backward();
    let input_grads = tracked.iter().map(|t| values(t.grad(&grads).expect("input gradient"))).collect();
    (values(out.inner()), input_grads)
}

/// Document ids `[b, tk]` for rows packing `docs` documents: row `r` cut at boundaries that
/// differ per row (some documents shorter than a tile, some crossing tile edges).
fn packed_documents(b: usize, tk: usize, docs: usize) -> Vec<i64> {
    let mut ids = Vec::with_capacity(b * tk);
    for row in 0..b {
        // Boundaries at pseudo-random, strictly increasing positions inside 1..tk.
        let mut cuts: Vec<usize> = (1..docs).map(|d| (d * tk / docs + (row * 7 + d * 13) % (tk / docs).max(1) / 2).min(tk - 1)).collect();
        cuts.dedup();
        ids.extend((0..tk).map(|j| cuts.iter().filter(|&&c| c <= j).count() as i64));
    }
    ids
}

#[test]
fn flash_attention_matches_reference_forward_and_gradients() {
    let tol = Tolerance { atol: 2e-5, rtol: 1e-4 };
    // (batch, heads, tq, tk, head_dim, causal, padded keys at the end, packed documents per row)
    let cases = [
        (1, 1, 1, 1, 3, true, 0, 0),
        (2, 2, 7, 7, 1, true, 0, 0),
        (1, 2, 33, 33, 3, false, 0, 0),
        (2, 1, 33, 33, 384, true, 0, 0),
        (1, 1, 257, 257, 16, true, 0, 0),
        (2, 3, 65, 65, 64, false, 5, 0),
        (2, 2, 70, 70, 8, true, 9, 0),
        (2, 2, 1, 33, 8, true, 0, 0),   // decoding: one query against a cache of keys
        (1, 2, 7, 40, 5, true, 3, 0),   // a chunk of queries after a cached prefix
        (1, 2, 9, 4, 8, true, 0, 0),    // more queries than keys: the first 5 see none (output 0)
        (2, 2, 300, 300, 16, false, 7, 0), // several 128-row tiles, not causal, padded
        (1, 1, 200, 200, 32, true, 5, 0),  // several tiles, causal and padded
        (2, 2, 37, 37, 8, true, 0, 3),     // packed documents in one tile
        (2, 1, 300, 300, 16, true, 0, 7),  // packed: whole tiles skipped, documents crossing tile edges
        (1, 2, 333, 333, 8, false, 0, 2),  // packed, not causal
        (2, 2, 150, 150, 24, true, 11, 4), // packed with padded keys
        (1, 2, 9, 45, 8, true, 0, 5),      // packed keys, queries the last 9 of them
    ];
    for device in devices() {
        let ad = device.clone().autodiff();
        for (case, &(b, h, tq, tk, d, causal, padded, docs)) in cases.iter().enumerate() {
            ad.seed(1000 + case as u64);
            let normal = Distribution::Normal(0.0, 1.0);
            let inputs = vec![
                Tensor::<4>::random([b, h, tq, d], normal, &ad),
                Tensor::<4>::random([b, h, tk, d], normal, &ad),
                Tensor::<4>::random([b, h, tk, d], normal, &ad),
            ];
            let weights = Tensor::<4>::random([b, h, tq, d], normal, &ad);
            let padding = (padded > 0).then(|| {
                let mask: Vec<bool> = (0..b * tk).map(|i| i % tk >= tk - padded).collect();
                Tensor::<2, Bool>::from_data(TensorData::new(mask, [b, tk]), &ad)
            });
            let documents = (docs > 0).then(|| Tensor::<2, Int>::from_data(TensorData::new(packed_documents(b, tk, docs), [b, tk]), &ad));
            let run = |implementation| {
                forward_and_grads(&inputs, &weights, |x| {
                    let options = AttentionOptions { causal, key_padding: padding.clone(), documents: documents.clone(), mask: None };
                    let [q, k, v]: [Tensor<4>; 3] = x.try_into().unwrap();
                    attention(q, k, v, options, implementation)
                })
            };
            let (fused, fused_grads) = run(AttentionImpl::Fused);
            let (reference, reference_grads) = run(AttentionImpl::Reference);
            let what = format!("{device:?} case {case} B={b} H={h} Tq={tq} Tk={tk} D={d} causal={causal} padded={padded} docs={docs}");
            assert_close(&format!("{what}: output"), &fused, &reference, tol);
            for (name, (f, r)) in ["dq", "dk", "dv"].iter().zip(fused_grads.iter().zip(&reference_grads)) {
                assert_close(&format!("{what}: {name}"), f, r, tol);
            }
        }
    }
}

/// Packed documents are independent: attention over a row packing two documents equals
/// attention over each document alone, in both implementations.
#[test]
fn packed_documents_attend_only_to_themselves() {
    let tol = Tolerance { atol: 2e-5, rtol: 1e-4 };
    for device in devices() {
        device.seed(5);
        let (h, d, first, second) = (2, 8, 150, 61);
        let t = first + second;
        let normal = Distribution::Normal(0.0, 1.0);
        let [q, k, v] = [0; 3].map(|_| Tensor::<4>::random([1, h, t, d], normal, &device));
        let ids: Vec<i64> = (0..t).map(|j| (j >= first) as i64).collect();
        let documents = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, t]), &device);
        for implementation in [AttentionImpl::Fused, AttentionImpl::Reference] {
            let options = AttentionOptions { causal: true, documents: Some(documents.clone()), ..Default::default() };
            let packed = attention(q.clone(), k.clone(), v.clone(), options, implementation);
            let alone = |start, len| {
                let part = |x: &Tensor<4>| x.clone().narrow(2, start, len);
                let options = AttentionOptions { causal: true, ..Default::default() };
                attention(part(&q), part(&k), part(&v), options, implementation)
            };
            let separate = Tensor::cat(vec![alone(0, first), alone(first, second)], 2);
            assert_close(&format!("{device:?} {implementation:?} packed vs separate"), &values(packed), &values(separate), tol);
        }
    }
}

/// q, k, v as transposed views (`[B, T, H, D]` storage seen as `[B, H, T, D]`, as the model's
/// head split makes them): the fused op must read strides, not assume contiguity.
#[test]
fn flash_attention_reads_strided_views() {
    let tol = Tolerance { atol: 2e-5, rtol: 1e-4 };
    for device in devices() {
        let ad = device.clone().autodiff();
        ad.seed(77);
        let (b, t, h, d) = (2, 37, 3, 8);
        let normal = Distribution::Normal(0.0, 1.0);
        let inputs: Vec<Tensor<4>> = (0..3).map(|_| Tensor::<4>::random([b, t, h, d], normal, &ad)).collect();
        let weights = Tensor::<4>::random([b, h, t, d], normal, &ad);
        let run = |implementation| {
            forward_and_grads(&inputs, &weights, |x| {
                let [q, k, v]: [Tensor<4>; 3] = x.try_into().unwrap();
                let options = AttentionOptions { causal: true, ..Default::default() };
                attention(q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2), options, implementation)
            })
        };
        let (fused, fused_grads) = run(AttentionImpl::Fused);
        let (reference, reference_grads) = run(AttentionImpl::Reference);
        assert_close(&format!("{device:?} strided: output"), &fused, &reference, tol);
        for (name, (f, r)) in ["dq", "dk", "dv"].iter().zip(fused_grads.iter().zip(&reference_grads)) {
            assert_close(&format!("{device:?} strided: {name}"), f, r, tol);
        }

        // q, k, v split from one fused projection `[B, T, 3·H·D]`, and the output turned back
        // to `[B, T, H, D]`, as the model's attention does (q, k, v rows 3·H·D apart and the
        // upstream gradient's rows H·D apart, all read in place on the CPU), over two tiles.
        let long = 150;
        let qkv = vec![Tensor::<3>::random([b, long, 3 * h * d], normal, &ad)];
        let weights = Tensor::<4>::random([b, long, h, d], normal, &ad);
        let run = |implementation| {
            forward_and_grads(&qkv, &weights, |x| {
                let part = |i: usize| x[0].clone().narrow(2, i * h * d, h * d).reshape([b, long, h, d]).swap_dims(1, 2);
                attention(part(0), part(1), part(2), AttentionOptions { causal: true, ..Default::default() }, implementation).swap_dims(1, 2)
            })
        };
        let (fused, fused_grads) = run(AttentionImpl::Fused);
        let (reference, reference_grads) = run(AttentionImpl::Reference);
        assert_close(&format!("{device:?} split projection: output"), &fused, &reference, tol);
        assert_close(&format!("{device:?} split projection: d qkv"), &fused_grads[0], &reference_grads[0], tol);

        // Keys and values as the KV cache's prefix: the first `t` of `capacity` rows per head
        // (read in place on the CPU), with left padding hidden and queries the last 3 tokens.
        let (capacity, tq) = (50, 3);
        let cache: Vec<Tensor<4>> = (0..2).map(|_| Tensor::<4>::random([b, h, capacity, d], normal, &ad)).collect();
        let q = vec![Tensor::<4>::random([b, h, tq, d], normal, &ad)];
        let q_weights = Tensor::<4>::random([b, h, tq, d], normal, &ad);
        let padding: Vec<bool> = (0..b * t).map(|i| i % t < 2 * (i / t)).collect();
        let padding = Tensor::<2, Bool>::from_data(TensorData::new(padding, [b, t]), &ad);
        let run = |implementation| {
            forward_and_grads(&q, &q_weights, |x| {
                let [q]: [Tensor<4>; 1] = x.try_into().unwrap();
                let options = AttentionOptions { causal: true, key_padding: Some(padding.clone()), ..Default::default() };
                attention(q, cache[0].clone().narrow(2, 0, t), cache[1].clone().narrow(2, 0, t), options, implementation)
            })
        };
        let (fused, fused_grads) = run(AttentionImpl::Fused);
        let (reference, reference_grads) = run(AttentionImpl::Reference);
        assert_close(&format!("{device:?} cache prefix: output"), &fused, &reference, tol);
        assert_close(&format!("{device:?} cache prefix: dq"), &fused_grads[0], &reference_grads[0], tol);
    }
}

/// The LM head + cross-entropy: loss and the gradients w.r.t. hidden states and head, fused
/// vs reference, with zero-weight rows, several 256-row chunks, and a transposed head view.
#[test]
fn linear_cross_entropy_matches_reference_loss_and_gradients() {
    let tol = Tolerance { atol: 1e-5, rtol: 1e-4 };
    // (rows, dim, vocab, head given as a transposed [D, V] view)
    let cases = [(1, 1, 2, false), (7, 3, 5, false), (33, 64, 67, true), (300, 17, 1000, false), (600, 8, 33, true)];
    for device in devices() {
        let ad = device.clone().autodiff();
        for (case, &(n, d, v, transposed)) in cases.iter().enumerate() {
            ad.seed(4000 + case as u64);
            let normal = Distribution::Normal(0.0, 1.0);
            let hidden = Tensor::<2>::random([n, d], normal, &ad);
            let head = if transposed { Tensor::<2>::random([d, v], normal, &ad) } else { Tensor::<2>::random([v, d], normal, &ad) };
            let targets: Vec<i64> = (0..n).map(|i| ((i * 7919 + case) % v) as i64).collect();
            let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &ad);
            // Every third row is masked out (weight 0); the rest share the mean.
            let kept = (0..n).filter(|i| i % 3 != 1).count().max(1);
            let w: Vec<f32> = (0..n).map(|i| if i % 3 == 1 { 0.0 } else { 1.0 / kept as f32 }).collect();
            let weights = Tensor::<1>::from_data(TensorData::new(w, [n]), &ad);
            let upstream = Tensor::<1>::from_data(TensorData::new(vec![1.7f32], [1]), &ad);
            let inputs = [hidden, head];
            let run = |implementation| {
                forward_and_grads(&inputs, &upstream, |x| {
                    let [hidden, head]: [Tensor<2>; 2] = x.try_into().unwrap();
                    let head = if transposed { head.transpose() } else { head };
                    linear_cross_entropy(hidden, head, targets.clone(), weights.clone(), implementation)
                })
            };
            let (fused, fused_grads) = run(CrossEntropyImpl::Fused);
            let (reference, reference_grads) = run(CrossEntropyImpl::Reference);
            let what = format!("{device:?} N={n} D={d} V={v} transposed={transposed}");
            assert_close(&format!("{what}: loss"), &fused, &reference, tol);
            assert_close(&format!("{what}: d_hidden"), &fused_grads[0], &reference_grads[0], tol);
            assert_close(&format!("{what}: d_head"), &fused_grads[1], &reference_grads[1], tol);
            if n >= 2 {
                assert!(fused_grads[0][d..2 * d].iter().all(|&g| g == 0.0), "{what}: masked row 1 got a gradient");
            }
        }
    }
}

/// GELU, exact and tanh form: values and input gradient, odd sizes, a strided view, and
/// arguments far into both tails. (In the far negative tail Burn's reference loses its
/// digits to `1 + tanh u` cancelling, by up to ~7e-6 absolute; hence the atol.)
#[test]
fn gelu_matches_reference_forward_and_gradient() {
    let tol = Tolerance { atol: 1e-5, rtol: 1e-5 };
    for device in devices() {
        let ad = device.clone().autodiff();
        for (case, &(rows, cols)) in [(1, 1), (3, 7), (33, 1000), (129, 257)].iter().enumerate() {
            ad.seed(5000 + case as u64);
            let x = Tensor::<2>::random([rows, cols], Distribution::Normal(0.0, 3.0), &ad);
            let w = Tensor::<2>::random([cols, rows], Distribution::Normal(0.0, 1.0), &ad);
            for tanh in [false, true] {
                // Through a transposed view: the op must read strides.
                let run = |implementation| forward_and_grads(&[x.clone()], &w, |x| gelu(x[0].clone().transpose(), tanh, implementation));
                let (fused, fused_grads) = run(ActivationImpl::Fused);
                let (reference, reference_grads) = run(ActivationImpl::Reference);
                let what = format!("{device:?} {rows}x{cols} tanh={tanh}");
                assert_close(&format!("{what}: gelu"), &fused, &reference, tol);
                assert_close(&format!("{what}: gradient"), &fused_grads[0], &reference_grads[0], tol);
            }
        }
        let tails = Tensor::<1>::from_data(TensorData::new(vec![-30.0f32, -9.0, -0.0, 0.0, 1e-4, 9.0, 30.0], [7]), &ad);
        for tanh in [false, true] {
            let (f, r) = (values(gelu(tails.clone(), tanh, ActivationImpl::Fused)), values(gelu(tails.clone(), tanh, ActivationImpl::Reference)));
            assert_close(&format!("{device:?} tails tanh={tanh}"), &f, &r, tol);
        }
    }
}

/// The paGating mix `a' ⊙ (α·g(b) + 1 − α)` for every gate (and paGTU's tanh value path):
/// output and the gradients w.r.t. `a`, `b` and a tracked α (learnable), odd sizes, a strided
/// view, α at both ends of its range.
#[test]
fn gated_unit_matches_reference_forward_and_gradients() {
    let tol = Tolerance { atol: 1e-5, rtol: 1e-5 };
    let gates = [Gate::Sigmoid, Gate::Tanh, Gate::Silu, Gate::Relu, Gate::Gelu, Gate::GeluTanh, Gate::Mish];
    for device in devices() {
        let ad = device.clone().autodiff();
        for (case, &(rows, cols, alpha)) in [(1, 1, 0.5f32), (3, 7, 0.0), (33, 1000, 0.3), (129, 257, 1.0)].iter().enumerate() {
            ad.seed(6000 + case as u64);
            let normal = Distribution::Normal(0.0, 3.0);
            let (a, b) = (Tensor::<2>::random([rows, cols], normal, &ad), Tensor::<2>::random([cols, rows], normal, &ad));
            let w = Tensor::<2>::random([rows, cols], Distribution::Normal(0.0, 1.0), &ad);
            for gate in gates {
                for tanh_value in [false, true] {
                    let unit = GatedUnit { gate, tanh_value };
                    let run = |implementation| {
                        let (a, b) = (a.clone().require_grad(), b.clone().require_grad());
                        let alpha = Tensor::<1>::from_data(TensorData::new(vec![alpha], [1]), &ad).require_grad();
                        // b through a transposed view: the op must read strides.
                        let out = gated_unit(a.clone(), b.clone().transpose(), alpha.clone(), unit, implementation);
                        let grads = (out.clone() * w.clone()).sum().backward();
                        let g = |t: &Tensor<2>| values(t.grad(&grads).expect("input gradient"));
                        (values(out.inner()), g(&a), g(&b), values(alpha.grad(&grads).expect("α gradient")))
                    };
                    let fused = run(ActivationImpl::Fused);
                    let reference = run(ActivationImpl::Reference);
                    let what = format!("{device:?} {rows}x{cols} α={alpha} {unit:?}");
                    assert_close(&format!("{what}: output"), &fused.0, &reference.0, tol);
                    assert_close(&format!("{what}: d a"), &fused.1, &reference.1, tol);
                    assert_close(&format!("{what}: d b"), &fused.2, &reference.2, tol);
                    // dα sums rows·cols terms; the reference sums them in another order.
                    assert_close(&format!("{what}: d α"), &fused.3, &reference.3, Tolerance { atol: 1e-4, rtol: 1e-4 });
                }
            }
        }
    }
}

/// LayerNorm (with and without β) and RMSNorm: output and the gradients w.r.t. x, γ and β,
/// odd widths, rows over several parallel tasks, a strided view, and rows with a large mean.
#[test]
fn norms_match_reference_forward_and_gradients() {
    let tol = Tolerance { atol: 2e-5, rtol: 1e-4 };
    for device in devices() {
        let ad = device.clone().autodiff();
        for (case, &(rows, d, offset)) in [(1, 1, 0.0f32), (3, 7, 0.0), (70, 33, 5.0), (129, 256, 0.0), (2, 1000, -3.0)].iter().enumerate() {
            ad.seed(7000 + case as u64);
            let x = Tensor::<3>::random([d, rows, 1], Distribution::Normal(offset as f64, 2.0), &ad);
            let w = Tensor::<3>::random([1, rows, d], Distribution::Normal(0.0, 1.0), &ad);
            let gamma = Tensor::<1>::random([d], Distribution::Normal(1.0, 0.5), &ad);
            let beta = Tensor::<1>::random([d], Distribution::Normal(0.0, 0.5), &ad);
            for (kind, with_beta) in [(NormKind::Layer, true), (NormKind::Layer, false), (NormKind::Rms, false)] {
                let run = |implementation| {
                    let (x, gamma, beta) = (x.clone().require_grad(), gamma.clone().require_grad(), beta.clone().require_grad());
                    // [d, rows, 1] seen as [1, rows, d]: a strided input.
                    let out = norm(x.clone().swap_dims(0, 2), gamma.clone(), with_beta.then(|| beta.clone()), 1e-5, kind, implementation);
                    let grads = (out.clone() * w.clone()).sum().backward();
                    let beta_grad = if with_beta { values(beta.grad(&grads).expect("β gradient")) } else { Vec::new() };
                    (values(out.inner()), values(x.grad(&grads).expect("x gradient")), values(gamma.grad(&grads).expect("γ gradient")), beta_grad)
                };
                let fused = run(NormImpl::Fused);
                let reference = run(NormImpl::Reference);
                let what = format!("{device:?} rows={rows} d={d} mean={offset} {kind:?} β={with_beta}");
                assert_close(&format!("{what}: output"), &fused.0, &reference.0, tol);
                assert_close(&format!("{what}: d x"), &fused.1, &reference.1, tol);
                // γ's and β's gradients sum over rows, in another order than the reference.
                let summed = Tolerance { atol: 1e-4, rtol: 1e-4 };
                assert_close(&format!("{what}: d γ"), &fused.2, &reference.2, summed);
                assert_close(&format!("{what}: d β"), &fused.3, &reference.3, summed);
            }
        }
    }
}

/// One AdamW update, fused vs reference: parameter and both moments, first step (no moments)
/// and a later one, with and without weight decay and a gradient scale, odd sizes.
#[test]
fn adamw_matches_reference() {
    let tol = Tolerance { atol: 1e-7, rtol: 1e-6 };
    for device in devices() {
        for (case, &n) in [1usize, 7, 1000, 40_000].iter().enumerate() {
            device.seed(8000 + case as u64);
            let normal = Distribution::Normal(0.0, 1.0);
            let [param, grad, m] = [(); 3].map(|_| Tensor::<1>::random([n], normal, &device));
            let v = Tensor::<1>::random([n], Distribution::Uniform(0.0, 2.0), &device);
            for (time, weight_decay, grad_scale, moments) in [(1, 0.0, 1.0, false), (1, 0.1, 0.5, false), (7, 0.1, 0.37, true), (300, 0.0, 1.0, true)] {
                let step = AdamWStep { learning_rate: 3e-3, beta_1: 0.9, beta_2: 0.95, epsilon: 1e-8, weight_decay, time, grad_scale };
                let run = |implementation| {
                    let moments = moments.then(|| (m.clone(), v.clone()));
                    let (p, m, v) = adamw(param.clone(), grad.clone(), moments, step, implementation);
                    [values(p), values(m), values(v)]
                };
                let (fused, reference) = (run(AdamWImpl::Fused), run(AdamWImpl::Reference));
                for (name, (f, r)) in ["parameter", "moment 1", "moment 2"].iter().zip(fused.iter().zip(&reference)) {
                    assert_close(&format!("{device:?} n={n} {step:?}: {name}"), f, r, tol);
                }
            }
        }
    }
}

#[test]
fn pairwise_cosine_diversity_matches_reference_forward_and_gradients() {
    let tol = Tolerance { atol: 1e-5, rtol: 1e-4 };
    let mut case = 0u64;
    for device in devices() {
        let ad = device.clone().autodiff();
        for g in [1, 3, 64] {
            for n in [1, 2, 5, 8] {
                for d in [1, 3, 384] {
                    case += 1;
                    ad.seed(2000 + case);
                    let mut e = Tensor::<3>::random([g, n, d], Distribution::Normal(0.0, 1.0), &ad);
                    let zero_row = g == 3 && n == 5;
                    if zero_row {
                        // An all-zero row: its unit vector is 0 (norm clamped), on both sides.
                        e = e.slice_assign([1..2, 2..3, 0..d], Tensor::zeros([1, 1, d], &ad));
                    }
                    let w = Tensor::<1>::random([g], Distribution::Normal(0.0, 1.0), &ad);
                    let what = format!("{device:?} G={g} N={n} D={d}");
                    if n == 1 {
                        // No pairs: defined as 0 (and no gradient to compare).
                        let fused = values(pairwise_cosine_diversity(e.clone(), DiversityImpl::Fused).inner());
                        assert_eq!(fused, vec![0.0; g], "{what}");
                        continue;
                    }
                    let run = |e: &Tensor<3>, w: &Tensor<1>, implementation| {
                        forward_and_grads(&[e.clone()], w, |x| pairwise_cosine_diversity(x[0].clone(), implementation))
                    };
                    let (fused, fused_grads) = run(&e, &w, DiversityImpl::Fused);
                    // The reference runs on flex with the same inputs: on wgpu, Burn 0.22.1's own
                    // fused reduce fails to expand the reference's `sum_dim` over D = 1.
                    let flex = Device::flex().autodiff();
                    let (e, w) = (Tensor::from_data(e.to_data(), &flex), Tensor::from_data(w.to_data(), &flex));
                    let (reference, reference_grads) = run(&e, &w, DiversityImpl::Reference);
                    assert_close(&format!("{what}: diversity"), &fused, &reference, tol);
                    let (mut fused_grad, mut reference_grad) = (fused_grads[0].clone(), reference_grads[0].clone());
                    if zero_row {
                        // The zero row's gradient is the others' unit-vector sum divided by the
                        // norm clamp (1e-12): every rounding difference in that sum is scaled by
                        // 1e12, so it is compared to 1 % of its largest element, and the other
                        // rows as usual.
                        let rows = (n + 2) * d..(n + 3) * d;
                        let scale = reference_grad[rows.clone()].iter().fold(0f32, |m, x| m.max(x.abs()));
                        let zero = Tolerance { atol: 1e-2 * scale, rtol: 0.0 };
                        assert_close(&format!("{what}: gradient of the zero row"), &fused_grad[rows.clone()], &reference_grad[rows.clone()], zero);
                        fused_grad.drain(rows.clone());
                        reference_grad.drain(rows);
                    }
                    assert_close(&format!("{what}: gradient"), &fused_grad, &reference_grad, tol);
                }
            }
        }
    }
}

#[test]
fn pooled_diversity_of_100k_embeddings_runs_in_linear_memory() {
    // 50,000 copies of u and 50,000 of −u: ordered pairs of equal vectors have cosine 1,
    // opposite ones −1, so the mean over the M(M−1) pairs is −1/(M−1) exactly.
    for device in devices() {
        pooled_diversity_case(&device);
    }
}

fn pooled_diversity_case(device: &Device) {
    // wgpu caps one buffer well below 100,000 × 384 floats (154 MB) on Mesa's software Vulkan.
    let m = if *device == Device::flex() { 100_000 } else { 40_000 };
    let d = 384;
    let device = device.clone();
    let u: Vec<f32> = (0..d).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
    let rows: Vec<f32> = (0..m).flat_map(|r| u.iter().map(move |x| if r % 2 == 0 { *x } else { -*x })).collect();
    let e = Tensor::<2>::from_data(TensorData::new(rows, [m, d]), &device);
    let got = values(pooled_cosine_diversity(e))[0] as f64;
    let want = 1.0 + 1.0 / (m as f64 - 1.0);
    assert!((got - want).abs() < 1e-5, "{device:?}: {got} vs {want}");
    // And on a size the reference can hold, the pooled value equals the reference's.
    device.seed(3);
    let small = Tensor::<2>::random([300, 17], Distribution::Normal(0.0, 1.0), &device);
    let pooled = values(pooled_cosine_diversity(small.clone()));
    let reference = values(pairwise_cosine_diversity(small.reshape([1, 300, 17]), DiversityImpl::Reference));
    assert_close(&format!("{device:?}: pooled vs reference"), &pooled, &reference, Tolerance { atol: 1e-5, rtol: 1e-4 });
}

#[test]
fn lcs_similarity_equals_dynamic_programming_exactly() {
    let mut case = 0u64;
    for device in devices() {
        for l in [1, 7, 16, 63, 64, 65, 130, 257] {
            for alphabet in [2, 4, 50] {
                case += 1;
                let (g, n) = (2, 3);
                let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ case;
                let mut next = move |below: u64| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % below) as i64
                };
                let tokens: Vec<i64> = (0..g * n * l).map(|_| next(alphabet)).collect();
                // Lengths from 0 to L: empty and full sequences included.
                let lengths: Vec<i64> = (0..g * n).map(|i| if i == 0 { 0 } else if i == 1 { l as i64 } else { next(l as u64 + 1) }).collect();
                let (tokens_host, lengths_host) = (tokens.clone(), lengths.clone());
                let t = Tensor::<3, Int>::from_data(TensorData::new(tokens, [g, n, l]), &device);
                let len = Tensor::<2, Int>::from_data(TensorData::new(lengths, [g, n]), &device);
                let ints = |x: Tensor<3, Int>| x.into_data().convert::<i64>().try_into_vec::<i64>().unwrap();
                let fused = ints(lcs_similarity(t.clone(), len.clone(), LcsImpl::Fused));
                let reference = ints(lcs_similarity(t, len, LcsImpl::Reference));
                assert_eq!(fused, reference, "{device:?} L={l} alphabet={alphabet}");
                assert!(fused.iter().all(|&x| x >= 0));
                // Host sequences through the placement rule: threshold 0 sends every batch to a
                // GPU device, the maximum keeps it on the CPU; both equal the dynamic program.
                let seqs: Vec<Vec<&[i64]>> = (0..g)
                    .map(|gi| (0..n).map(|i| &tokens_host[(gi * n + i) * l..(gi * n + i) * l + lengths_host[gi * n + i] as usize]).collect())
                    .collect();
                let dp: Vec<Vec<i64>> = seqs.iter().map(|s| lcs_group_dp(s)).collect();
                for threshold in [0, u64::MAX] {
                    assert_eq!(lcs_groups(&seqs, &device, threshold), dp, "{device:?} L={l} alphabet={alphabet} threshold={threshold}");
                }
            }
        }
    }
}
