use burn::tensor::Tensor;

/// Guards the norm of an all-zero embedding (its cosine with anything is then 0).
const NORM_EPS: f64 = 1e-12;

/// `[G, N, D]` → `[G, N, N]` cosine similarities.
pub fn pairwise_cosine_similarity_reference(embeddings: Tensor<3>) -> Tensor<3> {
    // Clamping before the square root keeps the gradient of an all-zero row finite
    // (√ has an infinite slope at 0, and inf · 0 = NaN).
    let norms = embeddings.clone().powi_scalar(2).sum_dim(2).clamp_min(NORM_EPS * NORM_EPS).sqrt();
    let unit = embeddings / norms;
    unit.clone().matmul(unit.swap_dims(1, 2))
}

/// The definition: materialises the `[G, N, N]` similarity matrix and averages its
/// off-diagonal entries.
pub fn pairwise_cosine_diversity_reference(embeddings: Tensor<3>) -> Tensor<1> {
    let [groups, n, _] = embeddings.dims();
    if n < 2 {
        return Tensor::zeros([groups], &embeddings.device());
    }
    let device = embeddings.device();
    let similarity = pairwise_cosine_similarity_reference(embeddings);
    let off_diagonal = Tensor::<2>::eye(n, &device).neg().add_scalar(1.0).reshape([1, n, n]);
    let mean = (similarity * off_diagonal).sum_dim(2).sum_dim(1).reshape([groups]) / (n * (n - 1)) as f64;
    mean.neg().add_scalar(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn identical_orthogonal_and_opposite_groups() {
        let device = Device::flex();
        let e = Tensor::<3>::from_data(
            TensorData::new(
                vec![1f32, 0., 2., 0., /* same direction */ 1., 0., 0., 3., /* orthogonal */ 1., 1., -2., -2. /* opposite */],
                [3, 2, 2],
            ),
            &device,
        );
        let d = pairwise_cosine_diversity_reference(e).into_data().try_into_vec::<f32>().unwrap();
        for (got, want) in d.iter().zip([0.0, 1.0, 2.0]) {
            assert!((got - want).abs() < 1e-6, "{d:?}");
        }
        let single = Tensor::<3>::ones([2, 1, 4], &device);
        assert_eq!(pairwise_cosine_diversity_reference(single).into_data().try_into_vec::<f32>().unwrap(), vec![0.0, 0.0]);
    }
}
