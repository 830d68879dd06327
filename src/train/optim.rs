//! The optimizer side of a step: learning-rate schedule, AdamW with decoupled weight decay
//! on matrices only, gradient averaging over micro-batches and global-norm clipping.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, ModuleOptimizer, Optimizer};
use burn::tensor::{Device, Tensor};
use polyburn_kernels::adamw::{AdamWImpl, AdamWStep, adamw};

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

/// The gradient scale of the step being taken (micro-batch mean × clip factor), as f32 bits:
/// set by [`ParamOptimizer::step`] and read by every parameter's update, so the gradients are
/// never scaled in a pass of their own.
#[derive(Clone, Default)]
struct GradScale(Arc<AtomicU32>);

impl GradScale {
    fn set(&self, scale: f32) {
        self.0.store(scale.to_bits(), Ordering::Relaxed);
    }
    fn get(&self) -> f32 {
        f32::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// AdamW through polyburn's `adamw` op: Burn's arithmetic and Burn's state type (so
/// `optimizer.bpk` is the record Burn's own `AdamW` writes), one pass per parameter.
#[derive(Clone)]
struct AdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    implementation: AdamWImpl,
    grad_scale: GradScale,
}

impl Optimizer for AdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(&self, lr: LearningRate, tensor: Tensor<D>, grad: Tensor<D>, state: Option<AdamWState<D>>) -> (Tensor<D>, Option<AdamWState<D>>) {
        let time = state.as_ref().map_or(1, |s| s.momentum.time + 1);
        let moments = state.map(|s| (s.momentum.moment_1, s.momentum.moment_2));
        let step = AdamWStep {
            learning_rate: lr,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            time,
            grad_scale: self.grad_scale.get(),
        };
        let (tensor, moment_1, moment_2) = adamw(tensor, grad, moments, step, self.implementation);
        (tensor, Some(AdamWState::new(AdaptiveMomentumState::new(time, moment_1, moment_2))))
    }

    fn to_device<const D: usize>(mut state: AdamWState<D>, device: &Device) -> AdamWState<D> {
        let m = &mut state.momentum;
        (m.moment_1, m.moment_2) = (m.moment_1.clone().to_device(device), m.moment_2.clone().to_device(device));
        state
    }
}

/// AdamW over a model's parameters, decaying the matrices only; its state is saved as
/// `optimizer.bpk` in checkpoints.
pub struct ParamOptimizer {
    modules: ModuleOptimizer,
    grad_scale: GradScale,
}

impl ParamOptimizer {
    /// Build it after weights are loaded: groups match by parameter id.
    pub fn new<M: Module>(o: &OptimizerConfig, implementation: AdamWImpl, model: &M) -> Self {
        let grad_scale = GradScale::default();
        let adamw = |weight_decay: f64| AdamW {
            beta_1: o.betas[0] as f32,
            beta_2: o.betas[1] as f32,
            epsilon: o.eps as f32,
            weight_decay: weight_decay as f32,
            implementation,
            grad_scale: grad_scale.clone(),
        };
        let modules = ModuleOptimizer::from(adamw(0.0)).with_group(ParamGroup::from_ids(decayed_param_ids(model)), adamw(o.weight_decay), None);
        Self { modules, grad_scale }
    }

    /// One update of `model` with the step's gradients at learning rate `lr`.
    pub fn step<M: Module>(&mut self, lr: f64, model: M, grads: StepGradients) -> M {
        self.grad_scale.set(grads.scale as f32);
        self.modules.step(lr, model, grads.grads)
    }

    pub fn save(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        self.modules.save(path.as_ref().to_path_buf()).map_err(|e| anyhow::anyhow!("writing optimizer state: {e:?}"))
    }

    pub fn load(self, path: &Path) -> anyhow::Result<Self> {
        let modules = self.modules.load(path).map_err(|e| anyhow::anyhow!("loading {}: {e:?}", path.display()))?;
        Ok(Self { modules, grad_scale: self.grad_scale })
    }
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

fn for_each_grad<M: Module, F: GradOp>(model: &M, grads: &mut GradientsParams, other: Option<&mut GradientsParams>, f: F) -> F {
    let mut v = ForEachGrad { grads, other, f };
    model.visit(&mut v);
    v.f
}

/// The summed gradients of one optimizer step, the factor that averages and clips them
/// (applied inside the optimizer's update) and the averaged gradient's norm before clipping.
pub struct StepGradients {
    pub grads: GradientsParams,
    pub scale: f64,
    pub grad_norm: f64,
}

/// Adds `other` into `sum`, parameter by parameter (a parameter in only one of them keeps
/// its gradient).
pub fn add_gradients<M: Module>(model: &M, sum: &mut GradientsParams, mut other: GradientsParams) {
    for_each_grad(model, sum, Some(&mut other), AddOther);
}

impl GradientSum {
    pub fn add<M: Module>(&mut self, model: &M, grads: GradientsParams) {
        self.micro_batches += 1;
        self.sum = Some(match self.sum.take() {
            None => grads,
            Some(mut sum) => {
                add_gradients(model, &mut sum, grads);
                sum
            }
        });
    }

    /// The factor that averages over micro-batches and then scales so the global L2 norm over
    /// all parameters is at most `max_norm` (0 = no clipping). The norm is of the averaged
    /// gradient.
    pub fn finish<M: Module>(self, model: &M, max_norm: f64) -> StepGradients {
        let mut grads = self.sum.expect("at least one micro-batch before finishing a step");
        let mean = 1.0 / self.micro_batches as f64;
        let norms = for_each_grad(model, &mut grads, None, SquaredNorms(Vec::new())).0;
        let sum_sq: f64 = Tensor::cat(norms, 0).sum().into_scalar::<f32>() as f64;
        let grad_norm = sum_sq.sqrt() * mean;
        let clip = if max_norm > 0.0 && grad_norm > max_norm { max_norm / (grad_norm + 1e-6) } else { 1.0 };
        StepGradients { grads, scale: mean * clip, grad_norm }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::AdamWConfig;
    use burn::tensor::Distribution;

    /// Both implementations of polyburn's AdamW against Burn's own `AdamW` (same groups, same
    /// hyper-parameters) over a few steps with a gradient scale: the parameters agree to f32
    /// rounding, and the fused one saves a record Burn's loads.
    #[test]
    fn adamw_matches_burns_adamw() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let o = OptimizerConfig { weight_decay: 0.1, ..Default::default() };
        let model: Linear = LinearConfig::new(37, 19).init(&device);
        let burn_adamw = |wd: f64| {
            AdamWConfig::new().with_beta_1(o.betas[0] as f32).with_beta_2(o.betas[1] as f32).with_epsilon(o.eps as f32).with_weight_decay(wd as f32)
        };
        let burns = burn_adamw(0.0).init().with_group(ParamGroup::from_ids(decayed_param_ids(&model)), burn_adamw(o.weight_decay).build(), None);
        let x = Tensor::<2>::random([5, 37], Distribution::Normal(0.0, 1.0), &device);
        let grads_of = |m: &Linear| GradientsParams::from_grads(m.forward(x.clone()).powi_scalar(2).sum().backward(), m);
        let scale = 0.37;
        let flat = |m: &Linear| {
            let mut v = m.weight.val().into_data().try_to_vec::<f32>().unwrap();
            v.extend(m.bias.as_ref().unwrap().val().into_data().try_to_vec::<f32>().unwrap());
            v
        };
        for implementation in [AdamWImpl::Fused, AdamWImpl::Reference] {
            let (mut ours, mut theirs) = (model.clone(), model.clone());
            let mut optimizer = ParamOptimizer::new(&o, implementation, &ours);
            let mut burns = burns.clone();
            for step in 0..4 {
                let lr = 1e-2 * (step + 1) as f64;
                ours = optimizer.step(lr, ours.clone(), StepGradients { grads: grads_of(&ours), scale, grad_norm: 0.0 });
                let mut scaled = grads_of(&theirs);
                let (weight, bias) = (theirs.weight.id, theirs.bias.as_ref().unwrap().id);
                let w = scaled.remove::<2>(weight).unwrap().mul_scalar(scale);
                let b = scaled.remove::<1>(bias).unwrap().mul_scalar(scale);
                scaled.register(weight, w);
                scaled.register(bias, b);
                theirs = burns.step(lr, theirs.clone(), scaled);
                for (a, b) in flat(&ours).iter().zip(flat(&theirs)) {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{implementation:?} step {step}: {a} vs {b}");
                }
            }
            let dir = tempfile::tempdir().unwrap();
            optimizer.save(dir.path().join("optimizer.bpk")).unwrap();
            burns = burns.load(dir.path().join("optimizer.bpk")).expect("Burn's AdamW loads polyburn's record");
        }
    }


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
