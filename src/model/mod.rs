//! Models polyburn trains.

pub mod encoder;
pub mod gating;
pub mod generate;
pub mod hf;
pub mod lora;
pub mod norm;
pub mod transformer;

pub use transformer::{ForwardContext, Gpt, GptConfig, Positions};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// Initialises every lazily initialised parameter now, in module order. Burn draws initial
/// weights on first use; doing it right after seeding keeps initialisation a function of the
/// seed alone rather than of whatever RNG state the first forward pass happens to see.
pub fn initialize_parameters<M: Module>(module: &M) {
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}
