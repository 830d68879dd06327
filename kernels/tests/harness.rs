//! One harness for every fused op: fresh random inputs per case (a fixed seed each), shapes
//! that are not multiples of any tile, forward outputs and input gradients of the fused
//! implementation against the reference, with a tolerance stated per op.

use burn::tensor::{Bool, Device, Distribution, Int, Tensor, TensorData};
use polyburn_kernels::attention::{AttentionImpl, AttentionOptions, attention};

/// `|fused − reference| ≤ atol + rtol · |reference|` element-wise.
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
        assert!(!a.is_nan() || b.is_nan(), "{what}: element {i} is NaN (unwritten or invalid), reference {b}");
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

fn devices() -> Vec<Device> {
    vec![Device::flex()]
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

#[test]
fn flash_attention_matches_reference_forward_and_gradients() {
    let tol = Tolerance { atol: 2e-5, rtol: 1e-4 };
    // (batch, heads, tq, tk, head_dim, causal, padded keys at the end)
    let cases = [
        (1, 1, 1, 1, 3, true, 0),
        (2, 2, 7, 7, 1, true, 0),
        (1, 2, 33, 33, 3, false, 0),
        (2, 1, 33, 33, 384, true, 0),
        (1, 1, 257, 257, 16, true, 0),
        (2, 3, 65, 65, 64, false, 5),
        (2, 2, 70, 70, 8, true, 9),
        (2, 2, 1, 33, 8, true, 0),   // decoding: one query against a cache of keys
        (1, 2, 7, 40, 5, true, 3),   // a chunk of queries after a cached prefix
    ];
    for device in devices() {
        let ad = device.clone().autodiff();
        for (case, &(b, h, tq, tk, d, causal, padded)) in cases.iter().enumerate() {
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
            let run = |implementation| {
                forward_and_grads(&inputs, &weights, |x| {
                    let options = AttentionOptions { causal, key_padding: padding.clone(), mask: None };
                    let [q, k, v]: [Tensor<4>; 3] = x.try_into().unwrap();
                    attention(q, k, v, options, implementation)
                })
            };
            let (fused, fused_grads) = run(AttentionImpl::Fused);
            let (reference, reference_grads) = run(AttentionImpl::Reference);
            let what = format!("{device:?} case {case} B={b} H={h} Tq={tq} Tk={tk} D={d} causal={causal} padded={padded}");
            assert_close(&format!("{what}: output"), &fused, &reference, tol);
            for (name, (f, r)) in ["dq", "dk", "dv"].iter().zip(fused_grads.iter().zip(&reference_grads)) {
                assert_close(&format!("{what}: {name}"), f, r, tol);
            }
        }
    }
}

#[allow(dead_code)]
fn _int_tensor_type_check(t: Tensor<2, Int>) -> Tensor<2, Int> {
    t
}
