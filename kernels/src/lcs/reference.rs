use burn::tensor::{Int, Tensor, TensorData};

/// The definition: the textbook O(|a|·|b|) dynamic program (any comparable tokens: ids,
/// words).
pub fn lcs_length_dp<T: PartialEq>(a: &[T], b: &[T]) -> usize {
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

/// `[N, N]` LCS lengths of one group by dynamic programming.
pub fn lcs_group_dp<T: PartialEq>(seqs: &[&[T]]) -> Vec<i64> {
    let n = seqs.len();
    let mut out = vec![-1i64; n * n];
    for i in 0..n {
        out[i * n + i] = seqs[i].len() as i64;
        for j in i + 1..n {
            let v = lcs_length_dp(seqs[i], seqs[j]) as i64;
            out[i * n + j] = v;
            out[j * n + i] = v;
        }
    }
    out
}

/// `[G, N, N]` LCS lengths by dynamic programming, on the host.
pub fn lcs_similarity_reference(tokens: Tensor<3, Int>, lengths: Tensor<2, Int>) -> Tensor<3, Int> {
    let [g, n, l] = tokens.dims();
    let device = tokens.device();
    let t = tokens.into_data().convert::<i64>().try_into_vec::<i64>().expect("int tokens");
    let len = lengths.into_data().convert::<i64>().try_into_vec::<i64>().expect("int lengths");
    let out = super::group_sequences(&t, &len, g, n, l, lcs_group_dp::<i64>);
    Tensor::from_data(TensorData::new(out, [g, n, n]), &device)
}
