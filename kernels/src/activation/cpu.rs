//! The FFN activations on the CPU (Flex): elementwise, in parallel chunks, each compiled for
//! the widest vector unit.

use rayon::prelude::*;

use super::{Gate, GatedUnit};
use crate::math::{exp_nonpositive, output_buffer, with_widest_simd};

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// √(2/π), the tanh form's scale.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// 1/√(2π), the normal density's scale.
const INV_SQRT_2PI: f32 = 0.398_942_3;
const TANH_CUBIC: f32 = 0.044_715;

/// `erf(x)` by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), branch-free.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp_nonpositive(-a * a)).copysign(x)
}

/// `(GELU(x), GELU'(x))`.
#[inline(always)]
fn gelu_and_slope(x: f32, tanh_form: bool) -> (f32, f32) {
    if tanh_form {
        // With e = e^(−2|u|): 1 + tanh u = 2/(1+e) for u ≥ 0 and 2e/(1+e) below, and
        // 1 − tanh² u = 4e/(1+e)², so the far negative tail has no cancellation.
        let u = SQRT_2_OVER_PI * (x + TANH_CUBIC * x * x * x);
        let e = exp_nonpositive(-2.0 * u.abs());
        let one_plus_t = if u >= 0.0 { 2.0 } else { 2.0 * e } / (1.0 + e);
        let sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e));
        let slope = 0.5 * one_plus_t + 0.5 * x * sech2 * SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * x * x);
        (0.5 * x * one_plus_t, slope)
    } else {
        let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
        let density = INV_SQRT_2PI * exp_nonpositive(-0.5 * x * x);
        (x * cdf, cdf + x * density)
    }
}

/// With `e = e^(−|x|)`, sigmoid is `1/(1+e)` for x ≥ 0 and `e/(1+e)` below, so neither tail
/// overflows or cancels.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    (if x >= 0.0 { 1.0 } else { e }) / (1.0 + e)
}

/// `tanh x = sign(x)·(1 − e)/(1 + e)` with `e = e^(−2|x|)`.
#[inline(always)]
fn tanh(x: f32) -> f32 {
    let e = exp_nonpositive(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

/// `(g(x), g'(x))` of each gate nonlinearity.
#[inline(always)]
fn gate_and_slope(gate: Gate, x: f32) -> (f32, f32) {
    match gate {
        Gate::Sigmoid => {
            let s = sigmoid(x);
            (s, s * (1.0 - s))
        }
        Gate::Tanh => {
            let t = tanh(x);
            (t, 1.0 - t * t)
        }
        Gate::Silu => {
            let s = sigmoid(x);
            (x * s, s + x * s * (1.0 - s))
        }
        Gate::Relu => {
            if x > 0.0 { (x, 1.0) } else { (0.0, 0.0) }
        }
        Gate::Gelu => gelu_and_slope(x, false),
        Gate::GeluTanh => gelu_and_slope(x, true),
        Gate::Mish => {
            // tanh(softplus x) = (u² + 2u)/(u² + 2u + 2) with u = eˣ; written in e = e^(−|x|)
            // (u = 1/e above 0) so that nothing overflows.
            let e = exp_nonpositive(-x.abs());
            let (t, s) = if x >= 0.0 {
                ((1.0 + 2.0 * e) / (1.0 + 2.0 * e + 2.0 * e * e), 1.0 / (1.0 + e))
            } else {
                ((e * e + 2.0 * e) / (e * e + 2.0 * e + 2.0), e / (1.0 + e))
            };
            (x * t, t + x * (1.0 - t * t) * s)
        }
    }
}

/// A loop over elements that calls a gate's `(g, g')`.
trait GateLoop {
    type Output;
    fn run(self, gate: impl Fn(f32) -> (f32, f32) + Sync + Copy) -> Self::Output;
}

/// Runs `body` with the gate as a compile-time constant, so each gate gets its own
/// vectorised loop instead of a branch per element.
fn with_gate<L: GateLoop>(gate: Gate, body: L) -> L::Output {
    match gate {
        Gate::Sigmoid => body.run(#[inline(always)] |x| gate_and_slope(Gate::Sigmoid, x)),
        Gate::Tanh => body.run(#[inline(always)] |x| gate_and_slope(Gate::Tanh, x)),
        Gate::Silu => body.run(#[inline(always)] |x| gate_and_slope(Gate::Silu, x)),
        Gate::Relu => body.run(#[inline(always)] |x| gate_and_slope(Gate::Relu, x)),
        Gate::Gelu => body.run(#[inline(always)] |x| gate_and_slope(Gate::Gelu, x)),
        Gate::GeluTanh => body.run(#[inline(always)] |x| gate_and_slope(Gate::GeluTanh, x)),
        Gate::Mish => body.run(#[inline(always)] |x| gate_and_slope(Gate::Mish, x)),
    }
}

/// GELU of every value.
pub fn gelu_values(x: &[f32], tanh_form: bool) -> Vec<f32> {
    let mut out = output_buffer(x.len());
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
        with_widest_simd(#[inline(always)] || {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = gelu_and_slope(x, tanh_form).0;
            }
        })
    });
    out
}

/// `grad ← grad · GELU'(x)` for every value, in the upstream gradient's buffer (autodiff
/// hands it over, so the backward allocates nothing of the activation's size).
pub fn gelu_backward_in_place(x: &[f32], grad: &mut [f32], tanh_form: bool) {
    assert_eq!(x.len(), grad.len(), "GELU backward: input and gradient sizes differ");
    grad.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(g, x)| {
        with_widest_simd(#[inline(always)] || {
            for (g, &x) in g.iter_mut().zip(x) {
                *g *= gelu_and_slope(x, tanh_form).1;
            }
        })
    });
}

/// `(a', d a'/da)`: the value path of a gated unit.
#[inline(always)]
fn value_and_slope(tanh_value: bool, a: f32) -> (f32, f32) {
    if tanh_value {
        let t = tanh(a);
        (t, 1.0 - t * t)
    } else {
        (a, 1.0)
    }
}

/// `a' ⊙ (α·g(b) + 1 − α)` for every element.
pub fn gated_unit_values(a: &[f32], b: &[f32], alpha: f32, unit: GatedUnit) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "gated unit: value and gate sizes differ");
    struct Forward<'a> {
        a: &'a [f32],
        b: &'a [f32],
        alpha: f32,
        tanh_value: bool,
    }
    impl GateLoop for Forward<'_> {
        type Output = Vec<f32>;
        fn run(self, gate: impl Fn(f32) -> (f32, f32) + Sync + Copy) -> Vec<f32> {
            let Forward { a, b, alpha, tanh_value } = self;
            let mut out = output_buffer(a.len());
            out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
                with_widest_simd(#[inline(always)] || {
                    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                        *o = value_and_slope(tanh_value, a).0 * (alpha * gate(b).0 + 1.0 - alpha);
                    }
                })
            });
            out
        }
    }
    with_gate(unit.gate, Forward { a, b, alpha, tanh_value: unit.tanh_value })
}

/// The gated unit's backward for the upstream gradient `grad`, which is overwritten with
/// `d a` (each element is read before its slot is written); returns `(d b, d α)`. dα is
/// summed per chunk (16 lanes, then f64) and over the chunks in order, so it does not depend
/// on thread timing.
pub fn gated_unit_backward_in_place(a: &[f32], b: &[f32], alpha: f32, grad: &mut [f32], unit: GatedUnit) -> (Vec<f32>, f32) {
    assert!(a.len() == b.len() && a.len() == grad.len(), "gated unit backward: sizes differ");
    struct Backward<'a> {
        a: &'a [f32],
        b: &'a [f32],
        grad: &'a mut [f32],
        alpha: f32,
        tanh_value: bool,
    }
    impl GateLoop for Backward<'_> {
        type Output = (Vec<f32>, f32);
        fn run(self, gate: impl Fn(f32) -> (f32, f32) + Sync + Copy) -> Self::Output {
            let Backward { a, b, grad, alpha, tanh_value } = self;
            let mut db = output_buffer(a.len());
            let partials: Vec<f64> = grad
                .par_chunks_mut(CHUNK)
                .zip(db.par_chunks_mut(CHUNK))
                .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .map(|((grad_to_da, db), (a, b))| {
                    with_widest_simd(#[inline(always)] || {
                        let mut dalpha = [0f32; 16];
                        for (i, (((slot, db), &a), &b)) in grad_to_da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).enumerate() {
                            let g = *slot;
                            let (v, dv) = value_and_slope(tanh_value, a);
                            let (gv, dg) = gate(b);
                            *slot = g * dv * (alpha * gv + 1.0 - alpha);
                            *db = g * v * alpha * dg;
                            dalpha[i % 16] += g * v * (gv - 1.0);
                        }
                        dalpha.iter().map(|&x| x as f64).sum::<f64>()
                    })
                })
                .collect();
            (db, partials.iter().sum::<f64>() as f32)
        }
    }
    with_gate(unit.gate, Backward { a, b, grad, alpha, tanh_value: unit.tanh_value })
}

mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::TensorData;

    use super::{gated_unit_backward_in_place, gated_unit_values, gelu_backward_in_place, gelu_values};
    use crate::activation::{ActivationBackend, GatedUnit};
    use crate::flex_tensors::{contiguous_f32 as contiguous, f32_values as values, writable_f32 as writable};

    fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    /// The one value of α's `[1]` tensor.
    fn scalar(alpha: &FlexTensor) -> f32 {
        let alpha = contiguous(alpha);
        let v = values(&alpha);
        assert_eq!(v.len(), 1, "gated unit: α must have one element");
        v[0]
    }

    impl ActivationBackend for Flex {
        fn gelu_fused(x: FloatTensor<Self>, tanh: bool) -> FloatTensor<Self> {
            let shape = x.layout().shape().to_vec();
            let x = contiguous(&x);
            tensor(gelu_values(values(&x), tanh), shape)
        }

        fn gelu_fused_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>, tanh: bool) -> FloatTensor<Self> {
            let (x, mut grad) = (contiguous(&x), writable(grad));
            gelu_backward_in_place(values(&x), grad.storage_mut(), tanh);
            grad
        }

        fn gated_unit_fused(a: FloatTensor<Self>, b: FloatTensor<Self>, alpha: FloatTensor<Self>, unit: GatedUnit) -> FloatTensor<Self> {
            let shape = a.layout().shape().to_vec();
            let (a, b) = (contiguous(&a), contiguous(&b));
            tensor(gated_unit_values(values(&a), values(&b), scalar(&alpha), unit), shape)
        }

        fn gated_unit_fused_backward(
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            alpha: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            unit: GatedUnit,
        ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let shape = a.layout().shape().to_vec();
            let (a, b, mut grad) = (contiguous(&a), contiguous(&b), writable(grad));
            let (db, dalpha) = gated_unit_backward_in_place(values(&a), values(&b), scalar(&alpha), grad.storage_mut(), unit);
            (grad, tensor(db, shape), tensor(vec![dalpha], vec![1]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Taylor series in f64 (converges fast for |x| ≤ 3), and 1 beyond.
    fn erf_f64(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_and_tanh_form_are_accurate() {
        // The formula's own error (1.5e-7), the fast exp's (1e-6 relative) and f32 rounding.
        let (mut worst_erf, mut worst_tanh) = (0f64, 0f64);
        for i in -4000..=4000 {
            let x = i as f32 / 1000.0;
            worst_erf = worst_erf.max((erf(x) as f64 - erf_f64(x as f64)).abs());
            // The tanh form and its slope against f64, the far negative tail included.
            let (x64, c) = (x as f64, 0.044715f64);
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x64 + c * x64.powi(3));
            let value = 0.5 * x64 * (1.0 + u.tanh());
            let slope = 0.5 * (1.0 + u.tanh()) + 0.5 * x64 * (1.0 - u.tanh().powi(2)) * (2.0 / std::f64::consts::PI).sqrt() * (1.0 + 3.0 * c * x64 * x64);
            let (got_value, got_slope) = gelu_and_slope(x, true);
            worst_tanh = worst_tanh.max((got_value as f64 - value).abs().max((got_slope as f64 - slope).abs()));
        }
        assert!(worst_erf < 5e-7 && worst_tanh < 2e-6, "erf error {worst_erf:e}, tanh-form GELU error {worst_tanh:e}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }
}
