//! The optimizer side of a step: learning-rate schedule, AdamW with decoupled weight decay
//! on matrices only, gradient averaging over micro-batches and global-norm clipping.

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;

use crate::config::{OptimizerConfig, Schedule};

/// Learning rate for optimizer step `step` (0-based): a linear warm-up to the peak (but for
/// `constant`), then `o.schedule`. A pure function of the step, so the schedule needs no saved
/// state beyond the global step.
pub fn learning_rate(o: &OptimizerConfig, step: u64, max_steps: u64) -> f64 {
    let (peak, floor) = (o.learning_rate, o.min_lr);
    if o.schedule == Schedule::Constant {
        return peak;
    }
    let warmup = o.warmup(max_steps);
    if step < warmup {
        return peak * (step + 1) as f64 / (warmup + 1) as f64;
    }
    // Share of the decay phase done at `step`, from `start`.
    let progress = |start: u64| (step.saturating_sub(start) as f64 / max_steps.saturating_sub(start).max(1) as f64).min(1.0);
    match o.schedule {
        Schedule::Cosine => floor + 0.5 * (1.0 + (std::f64::consts::PI * progress(warmup)).cos()) * (peak - floor),
        Schedule::Linear => floor + (1.0 - progress(warmup)) * (peak - floor),
        Schedule::Constant | Schedule::ConstantWithWarmup => peak,
        Schedule::Wsd => {
            let decay_start = max_steps.saturating_sub((o.decay_fraction * max_steps as f64).round() as u64).max(warmup);
            if step < decay_start { peak } else { floor + (1.0 - progress(decay_start)) * (peak - floor) }
        }
    }
}

/// Ids of the parameters of rank ≥ 2 (weight matrices, embeddings): only these decay, as in
/// GPT-2/nanoGPT; biases and norm gains do not.
fn decayed_param_ids<M: Module>(model: &M) -> Vec<ParamId> {
    #[derive(Default)]
    struct Matrices(Vec<ParamId>);
    impl ModuleVisitor for Matrices {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if D >= 2 {
                self.0.push(param.id);
            }
        }
    }
    let mut v = Matrices::default();
    model.visit(&mut v);
    v.0
}

/// AdamW for `model`'s parameters. Build it after weights are loaded: groups match by id.
pub fn build_optimizer<M: Module>(o: &OptimizerConfig, model: &M) -> ModuleOptimizer {
    let adamw = |weight_decay: f64| {
        AdamWConfig::new()
            .with_beta_1(o.betas[0] as f32)
            .with_beta_2(o.betas[1] as f32)
            .with_epsilon(o.eps as f32)
            .with_weight_decay(weight_decay as f32)
    };
    adamw(0.0).init().with_group(ParamGroup::from_ids(decayed_param_ids(model)), adamw(o.weight_decay).build(), None)
}

/// Sums gradients of micro-batches; [`GradientSum::finish`] averages and clips them.
pub struct GradientSum {
    sum: Option<GradientsParams>,
    micro_batches: usize,
}

impl Default for GradientSum {
    fn default() -> Self {
        Self { sum: None, micro_batches: 0 }
    }
}

/// Visits parameters to apply a per-parameter function to their gradients.
struct ForEachGrad<'a, F> {
    grads: &'a mut GradientsParams,
    other: Option<&'a mut GradientsParams>,
    f: F,
}

/// What to do with one gradient (and its counterpart in a second set, when given).
trait GradOp {
    fn apply<const D: usize>(&mut self, id: ParamId, grad: Tensor<D>, other: Option<Tensor<D>>) -> Option<Tensor<D>>;
}

impl<F: GradOp> ModuleVisitor for ForEachGrad<'_, F> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let other = self.other.as_mut().and_then(|o| o.remove::<D>(param.id));
        match self.grads.remove::<D>(param.id) {
            Some(g) => {
                if let Some(new) = self.f.apply(param.id, g, other) {
                    self.grads.register(param.id, new);
                }
            }
            // A parameter absent from the first set but present in the other moves over.
            None => {
                if let Some(o) = other {
                    self.grads.register(param.id, o);
                }
            }
        }
    }
}

struct AddOther;
impl GradOp for AddOther {
    fn apply<const D: usize>(&mut self, _: ParamId, g: Tensor<D>, other: Option<Tensor<D>>) -> Option<Tensor<D>> {
        Some(match other {
            Some(o) => g + o,
            None => g,
        })
    }
}

struct SquaredNorms(Vec<Tensor<1>>);
impl GradOp for SquaredNorms {
    fn apply<const D: usize>(&mut self, _: ParamId, g: Tensor<D>, _: Option<Tensor<D>>) -> Option<Tensor<D>> {
        self.0.push(g.clone().square().sum());
        Some(g)
    }
}

struct Scale(f64);
impl GradOp for Scale {
    fn apply<const D: usize>(&mut self, _: ParamId, g: Tensor<D>, _: Option<Tensor<D>>) -> Option<Tensor<D>> {
        Some(g.mul_scalar(self.0))
    }
}

fn for_each_grad<M: Module, F: GradOp>(model: &M, grads: &mut GradientsParams, other: Option<&mut GradientsParams>, f: F) -> F {
    let mut v = ForEachGrad { grads, other, f };
    model.visit(&mut v);
    v.f
}

/// The averaged, clipped gradients of one optimizer step and their norm before clipping.
pub struct StepGradients {
    pub grads: GradientsParams,
    pub grad_norm: f64,
}

impl GradientSum {
    pub fn add<M: Module>(&mut self, model: &M, grads: GradientsParams) {
        self.micro_batches += 1;
        self.sum = Some(match self.sum.take() {
            None => grads,
            Some(mut sum) => {
                let mut grads = grads;
                for_each_grad(model, &mut sum, Some(&mut grads), AddOther);
                sum
            }
        });
    }

    /// Averages over micro-batches, then scales so the global L2 norm over all parameters is
    /// at most `max_norm` (0 = no clipping). The norm is of the averaged gradient.
    pub fn finish<M: Module>(self, model: &M, max_norm: f64) -> StepGradients {
        let mut grads = self.sum.expect("at least one micro-batch before finishing a step");
        let mean = 1.0 / self.micro_batches as f64;
        let norms = for_each_grad(model, &mut grads, None, SquaredNorms(Vec::new())).0;
        let sum_sq: f64 = Tensor::cat(norms, 0).sum().into_scalar::<f32>() as f64;
        let grad_norm = sum_sq.sqrt() * mean;
        let clip = if max_norm > 0.0 && grad_norm > max_norm { max_norm / (grad_norm + 1e-6) } else { 1.0 };
        let scale = mean * clip;
        if scale != 1.0 {
            for_each_grad(model, &mut grads, None, Scale(scale));
        }
        StepGradients { grads, grad_norm }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OptimizerConfig {
        OptimizerConfig { learning_rate: 1e-3, min_lr: 1e-4, warmup_steps: Some(10), ..Default::default() }
    }

    #[test]
    fn warmup_rises_to_peak_then_cosine_reaches_min() {
        let o = cfg();
        assert!(learning_rate(&o, 0, 110) < learning_rate(&o, 5, 110));
        assert!((learning_rate(&o, 10, 110) - 1e-3).abs() < 1e-12);
        let mid = learning_rate(&o, 60, 110);
        assert!((mid - 5.5e-4).abs() < 1e-12, "{mid}");
        assert!((learning_rate(&o, 110, 110) - 1e-4).abs() < 1e-12);
        for s in 10..110 {
            assert!(learning_rate(&o, s + 1, 110) <= learning_rate(&o, s, 110));
        }
    }

    #[test]
    fn every_schedule_has_its_shape() {
        let with = |schedule| OptimizerConfig { schedule, ..cfg() };
        let lr = |schedule, step| learning_rate(&with(schedule), step, 110);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        // linear: halfway through the decay is halfway between peak and floor.
        assert!(close(lr(Schedule::Linear, 60), 5.5e-4) && close(lr(Schedule::Linear, 110), 1e-4));
        // constant: the peak from step 0; constant_with_warmup: after the warm-up.
        assert!(close(lr(Schedule::Constant, 0), 1e-3) && close(lr(Schedule::Constant, 109), 1e-3));
        assert!(lr(Schedule::ConstantWithWarmup, 0) < 1e-3 && close(lr(Schedule::ConstantWithWarmup, 109), 1e-3));
        // wsd with the default 10 % decay over 120 steps: stable until step 108, then linear
        // to the floor at 120.
        let wsd = |step| learning_rate(&with(Schedule::Wsd), step, 120);
        assert!(close(wsd(50), 1e-3) && close(wsd(108), 1e-3) && wsd(109) < 1e-3);
        assert!(close(wsd(114), 5.5e-4) && close(wsd(120), 1e-4));
        assert!(wsd(0) < wsd(5));
        // warmup_ratio: 10 % of 110 steps = 11 warm-up steps.
        let ratio = OptimizerConfig { warmup_steps: None, warmup_ratio: Some(0.1), ..cfg() };
        assert_eq!(ratio.warmup(110), 11);
        assert!(learning_rate(&ratio, 10, 110) < 1e-3 && close(learning_rate(&ratio, 11, 110), 1e-3));
        assert_eq!(OptimizerConfig::default().warmup(5000), 100);
    }
}
