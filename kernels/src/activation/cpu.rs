//! GELU on the CPU (Flex): elementwise, in parallel chunks, each compiled for the widest
//! vector unit.

use rayon::prelude::*;

use crate::math::{exp_nonpositive, with_widest_simd};

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

/// GELU of every value.
pub fn gelu_values(x: &[f32], tanh_form: bool) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.len()]; // poisoned: every element must be written
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
        with_widest_simd(|| {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = gelu_and_slope(x, tanh_form).0;
            }
        })
    });
    out
}

/// `grad · GELU'(x)` for every value.
pub fn gelu_backward_values(x: &[f32], grad: &[f32], tanh_form: bool) -> Vec<f32> {
    assert_eq!(x.len(), grad.len(), "GELU backward: input and gradient sizes differ");
    let mut out = vec![f32::NAN; x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK))).for_each(|(o, (x, g))| {
        with_widest_simd(|| {
            for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                *o = g * gelu_and_slope(x, tanh_form).1;
            }
        })
    });
    out
}

mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::TensorData;

    use super::{gelu_backward_values, gelu_values};
    use crate::activation::GeluBackend;
    use crate::flex_tensors::{contiguous_f32 as contiguous, f32_values as values};

    impl GeluBackend for Flex {
        fn gelu_fused(x: FloatTensor<Self>, tanh: bool) -> FloatTensor<Self> {
            let shape = x.layout().shape().to_vec();
            let x = contiguous(&x);
            FlexTensor::from_data(TensorData::new(gelu_values(values(&x), tanh), shape))
        }

        fn gelu_fused_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>, tanh: bool) -> FloatTensor<Self> {
            let shape = x.layout().shape().to_vec();
            let (x, grad) = (contiguous(&x), contiguous(&grad));
            FlexTensor::from_data(TensorData::new(gelu_backward_values(values(&x), values(&grad), tanh), shape))
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
