//! The fused diversity as CubeCL kernels (Cube backends: CUDA, wgpu). The same identity as the
//! CPU version, `Σ_{i≠j} u_i·u_j = ‖s‖² − Σ_i ‖u_i‖²`, split into data-parallel steps:
//! inverse norms per row, the unit-vector sum per (group, column), then one unit per group
//! (forward) or per row (backward). No `[G, N, N]` buffer exists.

use burn::backend::tensor::FloatTensor;
use burn::backend::TensorMetadata;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;

use super::DiversityBackend;
use crate::cube_tensors::{contiguous, elem, grid, poisoned, scratch};

/// Norms below this count as zero (as in the reference and the CPU version).
const NORM_EPS: f32 = 1e-12;

mod kernels {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    /// `inv[r] = 1 / max(‖x_r‖, eps)` and `self_dot[r] = ‖u_r‖²` (1, or 0 for a zero row).
    #[cube(launch)]
    pub fn row_norms<F: Float>(x: &Tensor<F>, inv: &mut Tensor<F>, self_dot: &mut Tensor<F>, dim: usize, eps: f32, #[define(F)] _dtype: ElemType) {
        let row = ABSOLUTE_POS;
        if row >= inv.len() {
            terminate!();
        }
        let mut sq = F::new(0.0);
        for c in 0..dim {
            let v = x[row * dim + c];
            sq += v * v;
        }
        let norm = F::sqrt(sq);
        let eps = F::cast_from(eps);
        let clamped = if norm > eps { norm } else { eps };
        let inv_norm = F::new(1.0) / clamped;
        inv[row] = inv_norm;
        self_dot[row] = (norm * inv_norm) * (norm * inv_norm);
    }

    /// `sum[g, c] = Σ_i x[g, i, c] · inv[g, i]`.
    #[cube(launch)]
    pub fn unit_sum<F: Float>(x: &Tensor<F>, inv: &Tensor<F>, sum: &mut Tensor<F>, n: usize, dim: usize, #[define(F)] _dtype: ElemType) {
        let pos = ABSOLUTE_POS;
        if pos >= sum.len() {
            terminate!();
        }
        let g = pos / dim;
        let c = pos % dim;
        let mut acc = F::new(0.0);
        for i in 0..n {
            acc += x[(g * n + i) * dim + c] * inv[g * n + i];
        }
        sum[pos] = acc;
    }

    /// `out[g] = 1 − (‖s_g‖² − Σ_i ‖u_i‖²) / (N(N−1))`.
    #[cube(launch)]
    pub fn group_diversity<F: Float>(sum: &Tensor<F>, self_dot: &Tensor<F>, out: &mut Tensor<F>, n: usize, dim: usize, #[define(F)] _dtype: ElemType) {
        let g = ABSOLUTE_POS;
        if g >= out.len() {
            terminate!();
        }
        let mut pairs = F::new(0.0);
        for c in 0..dim {
            let s = sum[g * dim + c];
            pairs += s * s;
        }
        for i in 0..n {
            pairs -= self_dot[g * n + i];
        }
        out[g] = F::new(1.0) - pairs / F::cast_from(n * (n - 1));
    }

    /// Per row: `g_u = coef · (s − u)`, `dx = (g_u − u (u·g_u)) / ‖x‖`, `coef = −2 grad[g] / (N(N−1))`.
    #[cube(launch)]
    pub fn diversity_backward<F: Float>(
        x: &Tensor<F>,
        inv: &Tensor<F>,
        sum: &Tensor<F>,
        grad: &Tensor<F>,
        dx: &mut Tensor<F>,
        n: usize,
        dim: usize,
        #[define(F)] _dtype: ElemType,
    ) {
        let row = ABSOLUTE_POS;
        if row >= inv.len() {
            terminate!();
        }
        let g = row / n;
        let inv_norm = inv[row];
        let coef = F::new(-2.0) * grad[g] / F::cast_from(n * (n - 1));
        let mut dot = F::new(0.0);
        for c in 0..dim {
            let u = x[row * dim + c] * inv_norm;
            dot += u * coef * (sum[g * dim + c] - u);
        }
        for c in 0..dim {
            let u = x[row * dim + c] * inv_norm;
            dx[row * dim + c] = (coef * (sum[g * dim + c] - u) - u * dot) * inv_norm;
        }
    }
}

/// The per-row inverse norms, self dots and per-group unit sums both passes start from.
struct UnitSums {
    inv: CubeTensor,
    self_dot: CubeTensor,
    sum: CubeTensor,
}

fn unit_sums(x: &CubeTensor, g: usize, n: usize, d: usize) -> UnitSums {
    let inv = scratch(x, [g * n], x.dtype);
    let self_dot = scratch(x, [g * n], x.dtype);
    let sum = scratch(x, [g, d], x.dtype);
    if let Some((count, dim)) = grid(x, g * n) {
        kernels::row_norms::launch(
            &x.client,
            count,
            dim,
            x.clone().into_tensor_arg(),
            inv.clone().into_tensor_arg(),
            self_dot.clone().into_tensor_arg(),
            d,
            NORM_EPS,
            elem(x),
        );
    }
    if let Some((count, dim)) = grid(x, g * d) {
        kernels::unit_sum::launch(&x.client, count, dim, x.clone().into_tensor_arg(), inv.clone().into_tensor_arg(), sum.clone().into_tensor_arg(), n, d, elem(x));
    }
    UnitSums { inv, self_dot, sum }
}

fn dims(x: &CubeTensor) -> (usize, usize, usize) {
    let [g, n, d] = x.shape().dims::<3>();
    (g, n, d)
}

impl DiversityBackend for CubeBackend {
    fn pairwise_cosine_diversity(embeddings: FloatTensor<Self>) -> FloatTensor<Self> {
        let x = contiguous(embeddings);
        let (g, n, d) = dims(&x);
        if n < 2 {
            return crate::cube_tensors::filled(&x, [g], x.dtype, 0.0);
        }
        let sums = unit_sums(&x, g, n, d);
        let out = poisoned(&x, [g]);
        if let Some((count, dim)) = grid(&x, g) {
            kernels::group_diversity::launch(
                &x.client,
                count,
                dim,
                sums.sum.into_tensor_arg(),
                sums.self_dot.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                n,
                d,
                elem(&x),
            );
        }
        out
    }

    fn pairwise_cosine_diversity_backward(embeddings: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let x = contiguous(embeddings);
        let grad = contiguous(grad);
        let (g, n, d) = dims(&x);
        if n < 2 || d == 0 {
            return crate::cube_tensors::filled(&x, [g, n, d], x.dtype, 0.0);
        }
        let sums = unit_sums(&x, g, n, d);
        let dx = poisoned(&x, [g, n, d]);
        if let Some((count, dim)) = grid(&x, g * n) {
            kernels::diversity_backward::launch(
                &x.client,
                count,
                dim,
                x.clone().into_tensor_arg(),
                sums.inv.into_tensor_arg(),
                sums.sum.into_tensor_arg(),
                grad.into_tensor_arg(),
                dx.clone().into_tensor_arg(),
                n,
                d,
                elem(&x),
            );
        }
        dx
    }
}
