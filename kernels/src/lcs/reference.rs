use burn::tensor::{Int, Tensor, TensorData};

/// The definition: the textbook O(|a|·|b|) dynamic program.
pub fn lcs_length_dp(a: &[i64], b: &[i64]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            row[j + 1] = if x == y { prev[j] + 1 } else { prev[j + 1].max(row[j]) };
        }
        std::mem::swap(&mut prev, &mut row);
    }
    prev[b.len()]
}

/// `[G, N, N]` LCS lengths by dynamic programming, on the host.
pub fn lcs_similarity_reference(tokens: Tensor<3, Int>, lengths: Tensor<2, Int>) -> Tensor<3, Int> {
    let [g, n, l] = tokens.dims();
    let device = tokens.device();
    let t = tokens.into_data().convert::<i64>().try_into_vec::<i64>().expect("int tokens");
    let len = lengths.into_data().convert::<i64>().try_into_vec::<i64>().expect("int lengths");
    let out = super::group_sequences(&t, &len, g, n, l, super::lcs_group_dp);
    Tensor::from_data(TensorData::new(out, [g, n, n]), &device)
}
