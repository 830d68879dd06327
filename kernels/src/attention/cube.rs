//! Flash attention as CubeCL kernels (Cube backends: CUDA, wgpu). One unit per query row in the
//! forward and in the `dq` pass, one unit per key row in the `dk`/`dv` pass; each unit streams
//! over the other side's rows with an online softmax (forward) or the saved log-sum-exp
//! (backward), so no `[Tq, Tk]` buffer exists. Accumulators live in the output rows.
//!
//! A row that sees no key outputs zeros; its log-sum-exp is `NO_KEYS` (the backward never
//! reads it: such a row has no visible key to differentiate).

use burn::backend::tensor::FloatTensor;
use burn::backend::TensorMetadata;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;

use super::FlashAttentionBackend;
use crate::cube_tensors::{contiguous, elem, grid, poisoned};

/// The log-sum-exp of a row that sees no key: a finite stand-in for −∞ (WGSL has no infinity
/// literals).
const NO_KEYS: f32 = -3.0e38;

mod kernels {
    use burn_cubecl::cubecl;
    use burn_cubecl::cubecl::prelude::*;

    /// Number of keys `0..n` visible from query `i`: all of them, or (causal, bottom-right
    /// aligned) those with `j + tq <= i + tk`; keys of other segments are skipped separately.
    #[cube]
    fn visible_keys(i: usize, tq: usize, tk: usize, causal: u32) -> usize {
        let mut n = tk;
        if causal == 1 {
            if i + tk < tq {
                n = 0;
            } else if i + tk - tq + 1 < tk {
                n = i + tk - tq + 1;
            }
        }
        n
    }

    /// First query that sees key `j` when causal: `i >= j + tq − tk`.
    #[cube]
    fn first_query(j: usize, tq: usize, tk: usize, causal: u32) -> usize {
        let mut first = 0;
        if causal == 1 && j + tq > tk {
            first = j + tq - tk;
        }
        first
    }

    #[cube]
    fn dot<F: Float>(a: &Tensor<F>, a_row: usize, b: &Tensor<F>, b_row: usize, dim: usize) -> F {
        let mut acc = F::new(0.0);
        for c in 0..dim {
            acc += a[a_row * dim + c] * b[b_row * dim + c];
        }
        acc
    }

    /// One query row: `out = softmax(q kᵀ · scale) v`, `lse = log Σ exp(scores)`.
    #[cube(launch)]
    pub fn forward<F: Float>(
        q: &Tensor<F>,
        k: &Tensor<F>,
        v: &Tensor<F>,
        query_segments: &Tensor<F>,
        key_segments: &Tensor<F>,
        out: &mut Tensor<F>,
        lse: &mut Tensor<F>,
        heads: usize,
        tq: usize,
        tk: usize,
        dim: usize,
        causal: u32,
        scale: f32,
        no_keys: f32,
        #[define(F)] _dtype: ElemType,
    ) {
        let row = ABSOLUTE_POS;
        if row >= lse.len() {
            terminate!();
        }
        let bh = row / tq;
        let i = row % tq;
        let b = bh / heads;
        let scale = F::cast_from(scale);
        for c in 0..dim {
            out[row * dim + c] = F::new(0.0);
        }
        let mut max = F::cast_from(no_keys);
        let mut sum = F::new(0.0);
        let own = query_segments[b * tq + i];
        let n = visible_keys(i, tq, tk, causal);
        for j in 0..n {
            if key_segments[b * tk + j] == own {
                let key = bh * tk + j;
                let score = dot::<F>(q, row, k, key, dim) * scale;
                let new_max = if score > max { score } else { max };
                let correction = F::exp(max - new_max);
                let p = F::exp(score - new_max);
                sum = sum * correction + p;
                for c in 0..dim {
                    out[row * dim + c] = out[row * dim + c] * correction + p * v[key * dim + c];
                }
                max = new_max;
            }
        }
        if sum > F::new(0.0) {
            let inv = F::new(1.0) / sum;
            for c in 0..dim {
                out[row * dim + c] = out[row * dim + c] * inv;
            }
            lse[row] = max + F::ln(sum);
        } else {
            lse[row] = F::cast_from(no_keys);
        }
    }

    /// One query row of `dq = scale · Σ_j p_ij (dp_ij − δ_i) k_j`, with `p_ij = exp(s_ij − lse_i)`,
    /// `dp_ij = dO_i · v_j` and `δ_i = dO_i · O_i`; also stores `δ_i` for the `dk`/`dv` pass.
    #[cube(launch)]
    pub fn backward_dq<F: Float>(
        q: &Tensor<F>,
        k: &Tensor<F>,
        v: &Tensor<F>,
        query_segments: &Tensor<F>,
        key_segments: &Tensor<F>,
        out: &Tensor<F>,
        lse: &Tensor<F>,
        d_out: &Tensor<F>,
        dq: &mut Tensor<F>,
        delta: &mut Tensor<F>,
        heads: usize,
        tq: usize,
        tk: usize,
        dim: usize,
        causal: u32,
        scale: f32,
        #[define(F)] _dtype: ElemType,
    ) {
        let row = ABSOLUTE_POS;
        if row >= lse.len() {
            terminate!();
        }
        let bh = row / tq;
        let i = row % tq;
        let b = bh / heads;
        let scale = F::cast_from(scale);
        for c in 0..dim {
            dq[row * dim + c] = F::new(0.0);
        }
        let row_delta = dot::<F>(d_out, row, out, row, dim);
        delta[row] = row_delta;
        let row_lse = lse[row];
        let own = query_segments[b * tq + i];
        let n = visible_keys(i, tq, tk, causal);
        for j in 0..n {
            if key_segments[b * tk + j] == own {
                let key = bh * tk + j;
                let p = F::exp(dot::<F>(q, row, k, key, dim) * scale - row_lse);
                let ds = p * (dot::<F>(d_out, row, v, key, dim) - row_delta) * scale;
                for c in 0..dim {
                    dq[row * dim + c] += ds * k[key * dim + c];
                }
            }
        }
    }

    /// One key row of `dv = Σ_i p_ij dO_i` and `dk = scale · Σ_i p_ij (dp_ij − δ_i) q_i`, with the
    /// `δ_i` the `dq` pass stored.
    #[cube(launch)]
    pub fn backward_dkdv<F: Float>(
        q: &Tensor<F>,
        k: &Tensor<F>,
        v: &Tensor<F>,
        query_segments: &Tensor<F>,
        key_segments: &Tensor<F>,
        delta: &Tensor<F>,
        lse: &Tensor<F>,
        d_out: &Tensor<F>,
        dk: &mut Tensor<F>,
        dv: &mut Tensor<F>,
        heads: usize,
        tq: usize,
        tk: usize,
        dim: usize,
        causal: u32,
        scale: f32,
        #[define(F)] _dtype: ElemType,
    ) {
        let key = ABSOLUTE_POS;
        if key >= key_segments.len() * heads {
            terminate!();
        }
        let bh = key / tk;
        let j = key % tk;
        let b = bh / heads;
        let scale = F::cast_from(scale);
        for c in 0..dim {
            dk[key * dim + c] = F::new(0.0);
            dv[key * dim + c] = F::new(0.0);
        }
        let own = key_segments[b * tk + j];
        for i in first_query(j, tq, tk, causal)..tq {
            if query_segments[b * tq + i] == own {
                let row = bh * tq + i;
                let p = F::exp(dot::<F>(q, row, k, key, dim) * scale - lse[row]);
                let ds = p * (dot::<F>(d_out, row, v, key, dim) - delta[row]) * scale;
                for c in 0..dim {
                    dv[key * dim + c] += p * d_out[row * dim + c];
                    dk[key * dim + c] += ds * q[row * dim + c];
                }
            }
        }
    }
}

/// `(batch, heads, tq, tk, dim)` of a call.
fn shape_of(q: &CubeTensor, k: &CubeTensor) -> (usize, usize, usize, usize, usize) {
    let [b, h, tq, d] = q.shape().dims::<4>();
    (b, h, tq, k.shape().dims::<4>()[2], d)
}

impl FlashAttentionBackend for CubeBackend {
    fn flash_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        query_segments: FloatTensor<Self>,
        key_segments: FloatTensor<Self>,
        causal: bool,
        scale: f32,
    ) -> FloatTensor<Self> {
        Self::flash_attention_forward(q, k, v, query_segments, key_segments, causal, scale).0
    }

    fn flash_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        query_segments: FloatTensor<Self>,
        key_segments: FloatTensor<Self>,
        causal: bool,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let [q, k, v, query_segments, key_segments] = [q, k, v, query_segments, key_segments].map(contiguous);
        let (b, h, tq, tk, d) = shape_of(&q, &k);
        let out = poisoned(&q, [b, h, tq, d]);
        let lse = poisoned(&q, [b, h, tq]);
        if let Some((count, dim)) = grid(&q, b * h * tq) {
            kernels::forward::launch(
                &q.client,
                count,
                dim,
                q.clone().into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                query_segments.into_tensor_arg(),
                key_segments.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                lse.clone().into_tensor_arg(),
                h,
                tq,
                tk,
                d,
                causal as u32,
                scale,
                NO_KEYS,
                elem(&q),
            );
        }
        (out, lse)
    }

    fn flash_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        query_segments: FloatTensor<Self>,
        key_segments: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        causal: bool,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let [q, k, v, query_segments, key_segments, out, lse, d_out] =
            [q, k, v, query_segments, key_segments, out, lse, d_out].map(contiguous);
        let (b, h, tq, tk, d) = shape_of(&q, &k);
        let dq = poisoned(&q, [b, h, tq, d]);
        let (dk, dv) = (poisoned(&q, [b, h, tk, d]), poisoned(&q, [b, h, tk, d]));
        // δ_i = dO_i · O_i, computed once per query row by the dq pass.
        let delta = poisoned(&q, [b, h, tq]);
        let arg = |t: &CubeTensor| t.clone().into_tensor_arg();
        if let Some((count, dim)) = grid(&q, b * h * tq) {
            kernels::backward_dq::launch(
                &q.client,
                count,
                dim,
                arg(&q),
                arg(&k),
                arg(&v),
                arg(&query_segments),
                arg(&key_segments),
                arg(&out),
                arg(&lse),
                arg(&d_out),
                arg(&dq),
                arg(&delta),
                h,
                tq,
                tk,
                d,
                causal as u32,
                scale,
                elem(&q),
            );
        }
        if let Some((count, dim)) = grid(&q, b * h * tk) {
            kernels::backward_dkdv::launch(
                &q.client,
                count,
                dim,
                arg(&q),
                arg(&k),
                arg(&v),
                arg(&query_segments),
                arg(&key_segments),
                arg(&delta),
                arg(&lse),
                arg(&d_out),
                arg(&dk),
                arg(&dv),
                h,
                tq,
                tk,
                d,
                causal as u32,
                scale,
                elem(&q),
            );
        }
        (dq, dk, dv)
    }
}
