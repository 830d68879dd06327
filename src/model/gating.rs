//! paGating: FFN units whose gating strength α moves between a linear map (α = 0) and a full
//! gated unit (α = 1):
//!
//! ```text
//! y = A(h) ⊙ (α · g(B(h)) + (1 − α))
//! ```
//!
//! `A` (value path) and `B` (gate path) are separate linear maps of the same width. The FFN is
//! `down(unit(h))`. α is static, learnable (α = sigmoid(θ), one θ per layer) or scheduled from
//! the trainer's global step, which is the only state a schedule needs.

use burn::module::{Module, Param};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Tensor};
use polyburn_kernels::activation::{ActivationImpl, Gate, GatedUnit, gate_reference, gated_unit, mix_reference, value_reference};

use super::lora::{LoraAdapter, adapted, token_linear};
use crate::config::{AlphaMode, FfnConfig, FfnUnit, GeluApproximation, LoraConfig, LoraTarget};

/// The elementwise part of a gated unit: its gate nonlinearity g (and paGTU's tanh value path).
pub fn gated_unit_of(unit: FfnUnit, approximate: GeluApproximation) -> GatedUnit {
    let gate = match unit {
        FfnUnit::Paglu => Gate::Sigmoid,
        FfnUnit::Pagtu => Gate::Tanh,
        // Swish with β = 1 is x·sigmoid(x), the same function as SiLU; both names are kept
        // because the paGating paper lists both units.
        FfnUnit::Paswishu | FfnUnit::Pasilu => Gate::Silu,
        FfnUnit::Pareglu => Gate::Relu,
        FfnUnit::Pagelu => match approximate {
            GeluApproximation::None => Gate::Gelu,
            GeluApproximation::Tanh => Gate::GeluTanh,
        },
        FfnUnit::Pamishu => Gate::Mish,
        FfnUnit::Gelu => panic!("`gelu` is the plain MLP, not a gated unit"),
    };
    GatedUnit { gate, tanh_value: unit == FfnUnit::Pagtu }
}

/// The gate nonlinearity g of each unit.
pub fn gate_activation<const D: usize>(unit: FfnUnit, x: Tensor<D>, approximate: GeluApproximation) -> Tensor<D> {
    gate_reference(gated_unit_of(unit, approximate).gate, x)
}

/// Half cosine from `max` (step 0) to `min` (step `steps` and after).
pub fn cosine_schedule(step: u64, steps: u64, max: f64, min: f64) -> f64 {
    let progress = (step.min(steps)) as f64 / steps.max(1) as f64;
    min + (max - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Straight line from `min` (step 0) to `max` (step `steps` and after).
pub fn linear_schedule(step: u64, steps: u64, min: f64, max: f64) -> f64 {
    let progress = (step.min(steps)) as f64 / steps.max(1) as f64;
    min + (max - min) * progress
}

/// Everything about a gated unit that is not a tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateSettings {
    pub unit: FfnUnit,
    pub alpha: AlphaMode,
    pub alpha_min: f64,
    pub alpha_max: f64,
    /// Schedule length (resolved: `alpha_steps` or the run's max_steps).
    pub alpha_steps: u64,
    pub approximate: GeluApproximation,
}

impl GateSettings {
    pub fn new(f: &FfnConfig, total_steps: u64) -> Self {
        Self {
            unit: f.unit,
            alpha: f.alpha_mode,
            alpha_min: f.alpha_min,
            alpha_max: f.alpha_max,
            alpha_steps: f.alpha_steps.map_or(total_steps, |s| s as u64),
            approximate: f.approximate,
        }
    }

    /// α at `global_step` for every mode but `learnable` (whose α lives in a parameter).
    pub fn fixed_alpha(&self, global_step: u64) -> Option<f64> {
        match self.alpha {
            AlphaMode::Static(a) => Some(a),
            AlphaMode::Learnable => None,
            AlphaMode::SchedulerCosine => {
                Some(cosine_schedule(global_step, self.alpha_steps, self.alpha_max, self.alpha_min))
            }
            AlphaMode::SchedulerLinear => {
                Some(linear_schedule(global_step, self.alpha_steps, self.alpha_min, self.alpha_max))
            }
        }
    }
}

/// `down(A(h) ⊙ (α · g(B(h)) + 1 − α))`.
#[derive(Module, Debug)]
pub struct GatedFfn {
    value: Linear,
    gate: Linear,
    gate_norm: Option<LayerNorm>,
    /// θ with α = sigmoid(θ), for `learnable`.
    alpha_logit: Option<Param<Tensor<1>>>,
    down: Linear,
    lora_gate: Option<LoraAdapter>,
    lora_up: Option<LoraAdapter>,
    lora_down: Option<LoraAdapter>,
    #[module(skip)]
    settings: GateSettings,
}

impl GatedFfn {
    /// `linear(d_in, d_out, residual_out)` builds the projections so they share the model's
    /// initialisation.
    pub fn new(
        settings: GateSettings,
        d_model: usize,
        d_ff: usize,
        gate_norm: bool,
        alpha_init: Option<f64>,
        linear: impl Fn(usize, usize, bool) -> Linear,
        device: &Device,
    ) -> Self {
        let alpha_logit = (settings.alpha == AlphaMode::Learnable).then(|| {
            let a = alpha_init.unwrap_or(0.5);
            let theta = (a / (1.0 - a)).ln();
            Initializer::Constant { value: theta }.init([1], device)
        });
        Self {
            value: linear(d_model, d_ff, false),
            gate: linear(d_model, d_ff, false),
            gate_norm: gate_norm.then(|| LayerNormConfig::new(d_ff).with_epsilon(1e-5).init(device)),
            alpha_logit,
            down: linear(d_ff, d_model, true),
            lora_gate: None,
            lora_up: None,
            lora_down: None,
            settings,
        }
    }

    /// Attaches LoRA adapters: `up` adapts the value path, `gate` the gate path.
    pub fn attach_lora(mut self, c: &LoraConfig, device: &Device) -> Self {
        let [d_model, d_ff] = self.value.weight.dims();
        let wants = |t| c.target_modules.contains(&t);
        self.lora_up = wants(LoraTarget::Up).then(|| LoraAdapter::new(c, d_model, d_ff, device));
        self.lora_gate = wants(LoraTarget::Gate).then(|| LoraAdapter::new(c, d_model, d_ff, device));
        self.lora_down = wants(LoraTarget::Down).then(|| LoraAdapter::new(c, d_ff, d_model, device));
        self
    }

    pub fn merge_lora(mut self) -> Self {
        for (linear, adapter) in
            [(&mut self.value, self.lora_up.take()), (&mut self.gate, self.lora_gate.take()), (&mut self.down, self.lora_down.take())]
        {
            if let Some(a) = adapter {
                linear.weight = linear.weight.clone().map(|w| w + a.delta());
            }
        }
        self
    }

    /// α as a one-element tensor (differentiable for `learnable`).
    fn alpha_tensor(&self, global_step: u64, device: &Device) -> Tensor<1> {
        match &self.alpha_logit {
            Some(theta) => sigmoid(theta.val()),
            None => Tensor::full([1], self.settings.fixed_alpha(global_step).expect("not learnable"), device),
        }
    }

    /// The effective α at `global_step`.
    pub fn alpha(&self, global_step: u64) -> f64 {
        match &self.alpha_logit {
            Some(theta) => sigmoid(theta.val()).into_scalar::<f32>() as f64,
            None => self.settings.fixed_alpha(global_step).expect("not learnable"),
        }
    }

    /// The unit alone (before `down`): `[.., d_model] → [.., d_ff]`.
    pub fn unit(&self, h: Tensor<3>, global_step: u64, implementation: ActivationImpl) -> Tensor<3> {
        let s = &self.settings;
        let unit = gated_unit_of(s.unit, s.approximate);
        let value = adapted(token_linear(&self.value, h.clone()), &self.lora_up, &h);
        let gate_input = adapted(token_linear(&self.gate, h.clone()), &self.lora_gate, &h);
        let alpha = self.alpha_tensor(global_step, &h.device());
        match &self.gate_norm {
            // α·g + (1 − α): at α = 0 the unit is the value path alone.
            None => gated_unit(value, gate_input, alpha, unit, implementation),
            // The norm sits between g and the mix, so the unit is not one elementwise pass.
            Some(norm) => mix_reference(value_reference(unit, value), norm.forward(gate_reference(unit.gate, gate_input)), alpha),
        }
    }

    pub fn forward(&self, h: Tensor<3>, global_step: u64, implementation: ActivationImpl) -> Tensor<3> {
        let u = self.unit(h, global_step, implementation);
        adapted(token_linear(&self.down, u.clone()), &self.lora_down, &u)
    }

    pub fn matmul_params(&self) -> usize {
        [&self.value, &self.gate, &self.down].iter().map(|l| l.weight.val().dims().iter().product::<usize>()).sum()
    }
}

/// Parameters and forward FLOPs per token of one FFN (for the start-up summary).
pub fn ffn_cost(unit: FfnUnit, d_model: usize, d_ff: usize, bias: bool, gate_norm: bool) -> (usize, usize) {
    let linear = |i: usize, o: usize| i * o + if bias { o } else { 0 };
    if unit.is_gated() {
        let params = 2 * linear(d_model, d_ff) + linear(d_ff, d_model) + if gate_norm { 2 * d_ff } else { 0 };
        // Three matmuls (2 FLOPs per multiply-add) plus the gate and the α mix per element.
        (params, 2 * (2 * d_model * d_ff + d_ff * d_model) + 6 * d_ff)
    } else {
        (linear(d_model, d_ff) + linear(d_ff, d_model), 2 * 2 * d_model * d_ff + 8 * d_ff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FfnConfig;
    use burn::tensor::activation::tanh;
    use burn::module::{ModuleMapper, ModuleVisitor, ParamId};
    use burn::nn::LinearConfig;
    use burn::tensor::{Distribution, TensorData};

    const UNITS: [FfnUnit; 7] = [
        FfnUnit::Paglu,
        FfnUnit::Pagtu,
        FfnUnit::Paswishu,
        FfnUnit::Pareglu,
        FfnUnit::Pagelu,
        FfnUnit::Pamishu,
        FfnUnit::Pasilu,
    ];

    fn unit_with(unit: FfnUnit, alpha_mode: &str, gate_norm: bool, device: &Device) -> GatedFfn {
        let f = FfnConfig { unit, alpha_mode: AlphaMode::parse(alpha_mode).unwrap(), gate_norm, ..Default::default() };
        let linear = |i, o, _| {
            LinearConfig::new(i, o).with_initializer(Initializer::Normal { mean: 0.0, std: 0.7 }).init(device)
        };
        let ffn = GatedFfn::new(GateSettings::new(&f, 100), 3, 5, gate_norm, Some(0.3), linear, device);
        crate::model::initialize_parameters(&ffn);
        ffn
    }

    fn input(device: &Device) -> Tensor<3> {
        device.seed(11);
        Tensor::random([1, 4, 3], Distribution::Normal(0.0, 1.0), device)
    }

    #[test]
    fn alpha_zero_is_the_value_path_and_alpha_one_the_gated_unit() {
        let device = Device::flex();
        for unit in UNITS {
            let h = input(&device);
            let zero = unit_with(unit, "static_0.0", false, &device);
            let mut value = token_linear(&zero.value, h.clone());
            if unit == FfnUnit::Pagtu {
                value = tanh(value);
            }
            zero.unit(h.clone(), 0, ActivationImpl::Reference).into_data().assert_approx_eq::<f32>(&value.into_data(), Default::default());

            let one = unit_with(unit, "static_1.0", false, &device);
            let mut value = token_linear(&one.value, h.clone());
            if unit == FfnUnit::Pagtu {
                value = tanh(value);
            }
            let gated = value * gate_activation(unit, token_linear(&one.gate, h.clone()), GeluApproximation::None);
            one.unit(h, 0, ActivationImpl::Reference).into_data().assert_approx_eq::<f32>(&gated.into_data(), Default::default());
        }
    }

    #[test]
    fn gelu_tanh_option_is_the_tanh_form() {
        let device = Device::flex();
        let x = Tensor::<1>::from_floats([-2.0, -0.5, 0.3, 1.7], &device);
        let c = (2.0f32 / std::f32::consts::PI).sqrt();
        let expected: Vec<f32> = [-2.0f32, -0.5, 0.3, 1.7]
            .iter()
            .map(|&v| 0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh()))
            .collect();
        gate_activation(FfnUnit::Pagelu, x.clone(), GeluApproximation::Tanh)
            .into_data()
            .assert_approx_eq::<f32>(&TensorData::from(expected.as_slice()), Default::default());
        let exact = gate_activation(FfnUnit::Pagelu, x, GeluApproximation::None).into_data().try_to_vec::<f32>().unwrap();
        assert!((exact[0] - (-2.0 * 0.5 * (1.0 + libm_erf(-2.0 / 2f64.sqrt())) as f32)).abs() < 1e-5);
    }

    fn libm_erf(x: f64) -> f64 {
        // Abramowitz–Stegun 7.1.26 is too coarse; use the series, fine for |x| < 3.
        let mut sum = x;
        let mut term = x;
        for n in 1..60 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    }

    #[test]
    fn gate_norm_output_is_standardised_before_its_affine_part() {
        let device = Device::flex();
        for unit in UNITS {
            let ffn = unit_with(unit, "static_1.0", true, &device);
            let g = gate_activation(unit, token_linear(&ffn.gate, input(&device)), GeluApproximation::None);
            let gate_rows = g.to_data().try_to_vec::<f32>().unwrap();
            // At initialisation the affine part is the identity (γ = 1, β = 0).
            let normed = ffn.gate_norm.as_ref().unwrap().forward(g);
            let rows = normed.into_data().try_to_vec::<f32>().unwrap();
            let stats = |row: &[f32]| {
                let mean = row.iter().sum::<f32>() / 5.0;
                (mean, row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 5.0)
            };
            for (row, gate) in rows.chunks(5).zip(gate_rows.chunks(5)) {
                let (mean, var) = stats(row);
                assert!(mean.abs() < 1e-5, "{unit:?}: mean {mean}");
                // Standardised with ε = 1e-5: variance v / (v + ε) of the gate row's v, so
                // 1 for a spread-out row and 0 for equal outputs (ReLU of negatives). (The
                // inputs come from the process-wide RNG other tests draw from in parallel,
                // so the rows vary between runs.)
                let raw = stats(gate).1;
                let want = raw / (raw + 1e-5);
                assert!((var - want).abs() < 1e-3, "{unit:?}: var {var}, expected {want} (gate row variance {raw})");
            }
        }
    }

    #[test]
    fn schedules_hit_endpoints_and_midpoint() {
        assert!((cosine_schedule(0, 100, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((cosine_schedule(50, 100, 1.0, 0.0) - 0.5).abs() < 1e-12);
        assert!((cosine_schedule(100, 100, 1.0, 0.0)).abs() < 1e-12);
        assert!((cosine_schedule(500, 100, 0.9, 0.1) - 0.1).abs() < 1e-12);
        assert!((linear_schedule(0, 10, 0.2, 0.8) - 0.2).abs() < 1e-12);
        assert!((linear_schedule(5, 10, 0.2, 0.8) - 0.5).abs() < 1e-12);
        assert!((linear_schedule(10, 10, 0.2, 0.8) - 0.8).abs() < 1e-12);
        let f = FfnConfig { unit: FfnUnit::Paglu, alpha_mode: AlphaMode::SchedulerCosine, ..Default::default() };
        let s = GateSettings::new(&f, 200);
        assert_eq!(s.fixed_alpha(100), Some(0.5));
    }

    /// Sum of the unit's output weighted by fixed random numbers: a scalar to differentiate.
    fn probe_loss(ffn: &GatedFfn, h: &Tensor<3>, weights: &Tensor<3>, implementation: ActivationImpl) -> Tensor<1> {
        (ffn.forward(h.clone(), 0, implementation) * weights.clone()).sum()
    }

    struct Perturb {
        id: ParamId,
        index: usize,
        delta: f32,
    }
    impl ModuleMapper for Perturb {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if param.id != self.id {
                return param;
            }
            let (index, delta) = (self.index, self.delta);
            param.map(|t| {
                let shape = t.shape();
                let device = t.device();
                let mut v = t.into_data().try_to_vec::<f32>().unwrap();
                v[index] += delta;
                Tensor::from_data(TensorData::new(v, shape), &device)
            })
        }
    }

    #[derive(Default)]
    struct Ids(Vec<(ParamId, usize)>);
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push((param.id, param.val().shape().num_elements()));
        }
    }

    #[test]
    fn gradients_of_all_parameters_match_finite_differences() {
        let device = Device::flex().autodiff();
        for (unit, implementation) in UNITS.into_iter().flat_map(|u| [(u, ActivationImpl::Reference), (u, ActivationImpl::Fused)]) {
            for gate_norm in [false, true] {
                let ffn = unit_with(unit, "learnable", gate_norm, &device);
                let h = input(&device);
                let weights = Tensor::<3>::random([1, 4, 3], Distribution::Normal(0.0, 1.0), &device);
                let grads = probe_loss(&ffn, &h, &weights, implementation).backward();
                let mut ids = Ids::default();
                ffn.visit(&mut ids);
                assert_eq!(ids.0.len(), if gate_norm { 9 } else { 7 }, "every parameter is visited");
                for (id, n) in ids.0 {
                    let analytic = ffn_grad(&ffn, id, &grads);
                    assert!(analytic.iter().any(|g| *g != 0.0), "{unit:?}: a parameter got no gradient");
                    for index in (0..n).step_by(n.div_ceil(4)) {
                        let eps = 1e-2;
                        let at = |delta| {
                            let moved = ffn.clone().map(&mut Perturb { id, index, delta });
                            probe_loss(&moved, &h, &weights, implementation).into_scalar::<f32>() as f64
                        };
                        let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                        let a = analytic[index] as f64;
                        assert!(
                            (numeric - a).abs() <= 5e-3 + 2e-2 * a.abs(),
                            "{unit:?} {implementation:?} gate_norm={gate_norm}: d/dp[{index}] analytic {a} vs numeric {numeric}"
                        );
                    }
                }
            }
        }
    }

    /// The gradient of parameter `id` as a flat vector.
    fn ffn_grad(ffn: &GatedFfn, id: ParamId, grads: &burn::tensor::Gradients) -> Vec<f32> {
        struct Find<'a> {
            id: ParamId,
            grads: &'a burn::tensor::Gradients,
            out: Vec<f32>,
        }
        impl ModuleVisitor for Find<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if param.id == self.id {
                    let g = param.val().grad(self.grads).expect("gradient present");
                    self.out = g.into_data().try_to_vec::<f32>().unwrap();
                }
            }
        }
        let mut find = Find { id, grads, out: Vec::new() };
        ffn.visit(&mut find);
        find.out
    }
}
