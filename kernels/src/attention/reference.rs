use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Tensor};

use super::AttentionOptions;

/// The definition: materialises the `[B, H, Tq, Tk]` score matrix. A query row that sees no
/// key at all (causal with more queries than keys, or every key padded or of another
/// document) outputs 0, and no gradient flows through it.
pub fn attention_reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, options: AttentionOptions) -> Tensor<4> {
    let [batch, heads, tq, head_dim] = q.dims();
    let tk = k.dims()[2];
    let device = q.device();
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    let mut mask: Option<Tensor<4, Bool>> = None;
    if options.causal {
        // `tril_mask` is false on and below the (bottom-right aligned) diagonal, true above:
        // exactly the future keys.
        let future = Tensor::<2, Bool>::tril_mask([tq, tk], tk as i64 - tq as i64, &device);
        mask = Some(future.reshape([1, 1, tq, tk]).expand([batch, heads, tq, tk]));
    }
    if let Some(padding) = options.key_padding {
        let padding = padding.reshape([batch, 1, 1, tk]).expand([batch, heads, tq, tk]);
        mask = Some(match mask {
            Some(m) => m.bool_or(padding),
            None => padding,
        });
    }
    if let Some(documents) = options.documents {
        assert!(tq <= tk, "attention with documents needs Tq <= Tk (the queries are the last Tq keys), got Tq {tq}, Tk {tk}");
        let queries = documents.clone().narrow(1, tk - tq, tq).reshape([batch, 1, tq, 1]).expand([batch, heads, tq, tk]);
        let keys = documents.reshape([batch, 1, 1, tk]).expand([batch, heads, tq, tk]);
        let other_document = queries.not_equal(keys);
        mask = Some(match mask {
            Some(m) => m.bool_or(other_document),
            None => other_document,
        });
    }
    if let Some(extra) = options.mask {
        let extra = extra.expand([batch, heads, tq, tk]);
        mask = Some(match mask {
            Some(m) => m.bool_or(extra),
            None => extra,
        });
    }
    let Some(mask) = mask else {
        return softmax(scores, 3).matmul(v);
    };
    // Rows with every key hidden would be softmax(−∞, …) = NaN: unmask them for the softmax
    // and zero their output instead.
    let blind = mask.clone().bool_not().any_dim(3).bool_not(); // [B, H, Tq, 1]
    let mask = mask.bool_and(blind.clone().bool_not().expand([batch, heads, tq, tk]));
    let out = softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 3).matmul(v);
    let dim_v = out.dims()[3];
    out.mask_fill(blind.expand([batch, heads, tq, dim_v]), 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, TensorData};

    /// Attention by explicit loops over one head, the textbook formula.
    fn naive(q: &[f32], k: &[f32], v: &[f32], tq: usize, tk: usize, d: usize, causal: bool) -> Vec<f32> {
        let mut out = vec![0.0; tq * d];
        for i in 0..tq {
            let visible = if causal { (i + 1 + tk).saturating_sub(tq) } else { tk };
            let scores: Vec<f32> = (0..visible)
                .map(|j| (0..d).map(|c| q[i * d + c] * k[j * d + c]).sum::<f32>() / (d as f32).sqrt())
                .collect();
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f32 = weights.iter().sum();
            for (j, w) in weights.iter().enumerate().filter(|_| total > 0.0) {
                for c in 0..d {
                    out[i * d + c] += w / total * v[j * d + c];
                }
            }
        }
        out
    }

    #[test]
    fn matches_loops_causal_and_not_with_shorter_queries() {
        let device = Device::flex();
        // (6, 3): the first three queries see no key and output 0.
        for (tq, tk, causal) in [(5, 5, true), (5, 5, false), (2, 7, true), (1, 4, true), (6, 3, true)] {
            let d = 3;
            let rand = |t| Tensor::<4>::random([1, 1, t, d], Distribution::Normal(0.0, 1.0), &device);
            let (q, k, v) = (rand(tq), rand(tk), rand(tk));
            let vec = |t: &Tensor<4>| t.to_data().try_to_vec::<f32>().unwrap();
            let expected = naive(&vec(&q), &vec(&k), &vec(&v), tq, tk, d, causal);
            let got = attention_reference(q, k, v, AttentionOptions { causal, ..Default::default() });
            got.into_data().assert_approx_eq::<f32>(&TensorData::new(expected, [1, 1, tq, d]), Default::default());
        }
    }
}
